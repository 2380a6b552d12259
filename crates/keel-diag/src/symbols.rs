//! The symbolizer's memory.
//!
//! Turning addresses into function names parses the binary's debug info, and the
//! `backtrace` crate (which pprof-rs, tokio's task dumps and jemalloc_pprof all use) keeps
//! what it parsed for the life of the process. For Keel's release binary that is some
//! 150 MB of heap, measured: a process idling at 17 MB of RSS sat at 490 MB after one
//! CPU profile and one task dump. Diagnostics are rare, so each one pays to parse again
//! (a second or two of CPU on the blocking pool) and gives the memory back when done.

/// Drops the symbolizer's cache. Called at the end of every diagnostic that symbolized.
pub(crate) fn release() {
    backtrace::clear_symbol_cache();
}
