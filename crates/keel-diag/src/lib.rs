//! Keel's diagnostics, the "MRI machine" of seed 000: what the process is spending its CPU
//! on, what holds its memory, where every async task is waiting, and the process, runtime
//! and allocator gauges that tell an operator which of those to look at first.
//!
//! - [`cpu`]: CPU profiles sampled with `SIGPROF` (pprof-rs), as gzipped pprof protobuf
//!   (what `go tool pprof` and `pprof` read) or a flamegraph SVG.
//! - [`heap`]: jemalloc's sampling heap profiler (jemalloc_pprof), switched on and off at
//!   runtime, dumped as symbolized pprof.
//! - [`tasks`]: a dump of every tokio task and the await point it is parked at, the
//!   equivalent of Go's `goroutine?debug=2`, and a summary grouping identical stacks.
//! - [`polls`]: which runtime workers are stuck inside one poll (a task blocking its
//!   thread), from two hooks the binary installs on its runtime builder.
//! - [`gauges`]: `keel_runtime_*`, `keel_allocator_*` and `process_*` gauges for
//!   `/metrics`, refreshed by the binary's gauge loop.
//!
//! No HTTP here: keel-api's admin router serves these on the private admin listener, and
//! the binary makes jemalloc its global allocator. Profilers are process-wide facilities
//! (one signal handler, one allocator), so each kind runs one at a time per process and a
//! second request is refused with [`DiagError::Busy`] rather than queued.

#![warn(missing_docs)]

pub mod allocator;
pub mod cpu;
pub mod gauges;
pub mod heap;
pub mod polls;
pub mod tasks;

mod error;
mod exclusive;
mod symbols;

pub use error::DiagError;
