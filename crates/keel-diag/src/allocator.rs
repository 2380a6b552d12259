//! Is jemalloc this process's allocator, and what does it hold?
//!
//! The `keel` binary makes jemalloc its global allocator on Linux. A process that links
//! this crate may not (the integration-test binary, a Rust service embedding Keel): there
//! jemalloc is linked but idle, its statistics would describe nothing and a heap profile
//! would be empty, so both are only offered when [`jemalloc_is_global`] says so.

/// Whether jemalloc serves this process's Rust allocations. Asked of jemalloc itself, once:
/// allocate through the global allocator and see whether jemalloc counted the bytes for
/// this thread.
pub fn jemalloc_is_global() -> bool {
    #[cfg(target_os = "linux")]
    {
        static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ANSWER.get_or_init(linux::probe)
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// jemalloc's own account of the memory it manages, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes in live allocations: what the program holds.
    pub allocated: u64,
    /// Bytes in physically resident pages jemalloc has mapped (live data, metadata, and
    /// dirty pages not yet returned to the OS). A growing gap between the two is
    /// fragmentation or retained free memory, not a leak in Keel's data.
    pub resident: u64,
}

/// Fresh statistics (the epoch is advanced first: jemalloc caches them), or `None` when
/// jemalloc is not the global allocator or cannot say.
pub fn stats() -> Option<AllocatorStats> {
    #[cfg(target_os = "linux")]
    {
        if !jemalloc_is_global() {
            return None;
        }
        linux::stats()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use tikv_jemalloc_ctl::{epoch, stats, thread};

    use super::AllocatorStats;

    /// Bytes allocated by the probe: far more than any allocation the thread could make
    /// between the two reads of its counter.
    const PROBE_BYTES: usize = 1 << 16;

    pub(super) fn probe() -> bool {
        let Ok(counter) = thread::allocatedp::read() else {
            return false;
        };
        let before = counter.get();
        let probe = std::hint::black_box(Vec::<u8>::with_capacity(PROBE_BYTES));
        let after = counter.get();
        drop(probe);
        after.saturating_sub(before) >= PROBE_BYTES as u64
    }

    pub(super) fn stats() -> Option<AllocatorStats> {
        epoch::advance().ok()?;
        Some(AllocatorStats {
            allocated: stats::allocated::read().ok()? as u64,
            resident: stats::resident::read().ok()? as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_on_the_system_allocator_is_not_taken_for_jemalloc() {
        // Unit tests run on the system allocator: jemalloc is linked here but idle.
        assert!(!jemalloc_is_global());
        assert_eq!(stats(), None);
    }
}
