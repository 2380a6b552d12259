//! Heap profiles: which call stacks hold the memory that is live now.
//!
//! jemalloc samples one allocation per 2^`lg_prof_sample` bytes allocated (512 KiB by
//! default) and records its stack; a dump lists the sampled allocations still live, scaled
//! up to estimate every live byte, and jemalloc_pprof turns it into a symbolized pprof
//! profile (`inuse_space`). Two dumps taken minutes apart and compared with
//! `pprof -diff_base` show what grew: the memory-leak runbook of docs/operations.md.
//!
//! Keel's build compiles the profiler in and active (`prof:true,prof_active:true` in
//! `.cargo/config.toml`), as Go's heap profile always is: a leak can be diffed against a
//! baseline taken before it began, where it happens, without a restart. Its cost at the
//! default rate is within run-to-run noise (docs/operations.md). [`deactivate`] stops
//! sampling in the running process (discarding what was recorded) and [`activate`] starts
//! it again, seeing only allocations made from then on; `_RJEM_MALLOC_CONF=prof_active:false`
//! starts Keel with it off.

use serde::Serialize;

use crate::DiagError;

/// Where heap profiling stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HeapStatus {
    /// Whether allocations are being sampled.
    pub active: bool,
    /// Whether the call that returned this changed `active` (false when it already was).
    pub changed: bool,
    /// Average bytes allocated between two samples (2^`lg_prof_sample`).
    pub sample_interval_bytes: u64,
}

/// How to switch sampling on, for the operator who asked for a profile while it was off.
pub const HOW_TO_ACTIVATE: &str = "heap profiling is inactive: activate it with \
    `curl -X POST <admin>/debug/pprof/heap/activate` (it records allocations made from \
    then on; take a first profile as the baseline and diff a later one against it), or \
    start Keel with _RJEM_MALLOC_CONF=prof_active:true to record from the start";

/// Switches sampling on (idempotent).
pub async fn activate() -> Result<HeapStatus, DiagError> {
    set_active(true).await
}

/// Switches sampling off (idempotent) and discards what was recorded, so the next
/// activation starts from a clean slate.
pub async fn deactivate() -> Result<HeapStatus, DiagError> {
    set_active(false).await
}

/// The live heap as a gzipped, symbolized pprof profile.
///
/// Fails with [`DiagError::Off`] while sampling is inactive (saying how to activate it) and
/// with [`DiagError::Unsupported`] when jemalloc is not this process's allocator.
pub async fn profile() -> Result<Vec<u8>, DiagError> {
    imp::profile().await
}

async fn set_active(active: bool) -> Result<HeapStatus, DiagError> {
    imp::set_active(active).await
}

#[cfg(target_os = "linux")]
mod imp {
    use std::sync::Arc;

    use jemalloc_pprof::JemallocProfCtl;
    use tokio::sync::Mutex;

    use super::{HOW_TO_ACTIVATE, HeapStatus};
    use crate::DiagError;
    use crate::allocator::jemalloc_is_global;

    /// jemalloc's profiler control, or why there is none.
    fn controller() -> Result<&'static Arc<Mutex<JemallocProfCtl>>, DiagError> {
        if !jemalloc_is_global() {
            return Err(DiagError::Unsupported(
                "heap profiles need jemalloc as the global allocator, which the keel binary \
                 sets on Linux; this process allocates through another allocator"
                    .to_owned(),
            ));
        }
        jemalloc_pprof::PROF_CTL.as_ref().ok_or_else(|| {
            DiagError::Unsupported(
                "jemalloc's heap profiler was disabled when this process started (opt.prof is \
                 false); start Keel with _RJEM_MALLOC_CONF=prof:true,prof_active:true,\
                 lg_prof_sample:19"
                    .to_owned(),
            )
        })
    }

    fn status(ctl: &JemallocProfCtl, changed: bool) -> HeapStatus {
        HeapStatus {
            active: ctl.activated(),
            changed,
            sample_interval_bytes: 1u64 << ctl.lg_sample().min(63),
        }
    }

    pub(super) async fn set_active(active: bool) -> Result<HeapStatus, DiagError> {
        let mut ctl = controller()?.lock().await;
        if ctl.activated() == active {
            return Ok(status(&ctl, false));
        }
        if active {
            ctl.activate()
                .map_err(DiagError::failed("activating jemalloc heap profiling"))?;
            tracing::warn!("jemalloc heap profiling activated through the admin listener");
        } else {
            ctl.deactivate()
                .map_err(DiagError::failed("deactivating jemalloc heap profiling"))?;
            tracing::info!("jemalloc heap profiling deactivated through the admin listener");
        }
        Ok(status(&ctl, true))
    }

    pub(super) async fn profile() -> Result<Vec<u8>, DiagError> {
        let mut ctl = Arc::clone(controller()?).try_lock_owned().map_err(|_| {
            DiagError::Busy(
                "a heap profile is already being written in this process; retry in a moment"
                    .to_owned(),
            )
        })?;
        if !ctl.activated() {
            return Err(DiagError::Off(HOW_TO_ACTIVATE.to_owned()));
        }
        // jemalloc writes the dump to a temporary file, which is then parsed and
        // symbolized against the binary's debug info: blocking work.
        tokio::task::spawn_blocking(move || {
            let gz = ctl.dump_pprof();
            drop(ctl);
            crate::symbols::release();
            hide_allocator_frames(&gz.map_err(DiagError::failed("dumping the heap profile"))?)
        })
        .await
        .map_err(DiagError::failed("dumping the heap profile"))?
    }

    /// The allocator's own frames at the tip of every sampled stack (jemalloc's profiler,
    /// its entry points, Rust's allocation shims): a regular expression for the profile's
    /// `drop_frames`, which pprof applies when it loads the file, dropping the first
    /// matching frame of each stack and everything it called. `top` then lists the code
    /// that allocated (`Vec::reserve` in a Keel function), not `prof_backtrace_impl` 100 %.
    const ALLOCATOR_FRAMES: &str = concat!(
        r"__rust_(alloc|alloc_zeroed|realloc)|__rdl_.*|_rjem_.*|je_.*|prof_.*|imalloc.*|",
        r"do_rallocx|.*tikv_jemallocator.*|alloc::alloc::.*|<alloc::alloc::Global.*|",
        r"alloc::raw_vec::.*"
    );

    fn hide_allocator_frames(gz: &[u8]) -> Result<Vec<u8>, DiagError> {
        use std::io::Read as _;

        use pprof::protos::Message as _;

        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .map_err(DiagError::failed("reading the heap profile"))?;
        let mut profile = pprof::protos::Profile::decode(raw.as_slice())
            .map_err(DiagError::failed("reading the heap profile"))?;
        profile.drop_frames = i64::try_from(profile.string_table.len())
            .map_err(DiagError::failed("annotating the heap profile"))?;
        profile.string_table.push(ALLOCATOR_FRAMES.to_owned());
        crate::cpu::gzip(&profile.encode_to_vec())
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::HeapStatus;
    use crate::DiagError;

    fn unsupported() -> DiagError {
        DiagError::Unsupported(
            "heap profiles need jemalloc, which Keel uses as its allocator on Linux only"
                .to_owned(),
        )
    }

    pub(super) async fn set_active(_active: bool) -> Result<HeapStatus, DiagError> {
        Err(unsupported())
    }

    pub(super) async fn profile() -> Result<Vec<u8>, DiagError> {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_without_jemalloc_says_heap_profiles_need_it() {
        // Unit tests run on the system allocator.
        let err = profile().await.unwrap_err();
        assert!(
            matches!(&err, DiagError::Unsupported(m) if m.contains("jemalloc")),
            "{err:?}"
        );
        assert!(matches!(activate().await, Err(DiagError::Unsupported(_))));
    }
}
