//! One diagnostic of a kind at a time per process.
//!
//! The profilers and the task dump are process-wide (one `SIGPROF` handler and interval
//! timer, one allocator, one runtime to pause), so the flag that guards each is a process
//! fact too, not state of any one admin router: two routers in one process (tests start
//! many apps) must still not run two CPU profiles at once.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::DiagError;

/// Held while a diagnostic runs; dropping it (however the work ends: finished, failed,
/// or cancelled because the client went away) lets the next one start.
#[derive(Debug)]
pub(crate) struct Claim(&'static AtomicBool);

impl Claim {
    /// Takes `flag`, or says `busy` when another diagnostic holds it.
    pub(crate) fn take(flag: &'static AtomicBool, busy: &str) -> Result<Self, DiagError> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Claim(flag))
            .map_err(|_| DiagError::Busy(busy.to_owned()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_at_a_time_and_released_on_drop() {
        static FLAG: AtomicBool = AtomicBool::new(false);
        let first = Claim::take(&FLAG, "busy").unwrap();
        assert!(matches!(Claim::take(&FLAG, "busy"), Err(DiagError::Busy(m)) if m == "busy"));
        drop(first);
        assert!(Claim::take(&FLAG, "busy").is_ok());
    }
}
