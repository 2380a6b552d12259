//! Why a diagnostic was not produced, by what the operator should do about it.

use std::error::Error as StdError;

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a profile or dump was not produced. The messages are written for the operator who
/// asked (the admin listener sends them back in its problem documents), so each one says
/// what to do next.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// The same kind of diagnostic is already being taken in this process. Profilers are
    /// process-wide, so a second one would only disturb the first: retry when it ends.
    #[error("{0}")]
    Busy(String),
    /// Available in this process but switched off; the message says how to switch it on.
    #[error("{0}")]
    Off(String),
    /// Not available in this process: the platform, the build flags or the allocator rule
    /// it out; the message says which.
    #[error("{0}")]
    Unsupported(String),
    /// It did not finish within its time bound; the message says what that suggests.
    #[error("{0}")]
    TimedOut(String),
    /// Refused because the runtime is in a state where it could do harm (a worker is
    /// blocked); the message says what that state means and what to do instead.
    #[error("{0}")]
    Blocked(String),
    /// The profiler itself failed (a dump file could not be written, an encoding error).
    #[error("{what}")]
    Failed {
        /// What was being attempted, e.g. "starting the CPU profiler".
        what: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

impl DiagError {
    /// A [`DiagError::Failed`] maker for `map_err`.
    pub(crate) fn failed<E: Into<BoxError>>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |e| DiagError::Failed {
            what,
            source: e.into(),
        }
    }
}
