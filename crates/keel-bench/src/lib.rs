//! Keel's load tools, the library behind two commands of the `keel` binary:
//!
//! - [`bench`]: `keel bench`, the performance protocol of SPEC §7. It starts `keel serve`
//!   children (the running executable, so it must be called from the `keel` binary), runs
//!   the workloads W1–W5 against them over loopback HTTP, and reports medians, targets and
//!   pgbench references.
//! - [`load`]: `keel load`, an open- or closed-model HTTP load generator aimed at a running
//!   Keel.
//!
//! Both drive the same lean HTTP/1.1 generator (`generator`), record latencies in the same
//! HDR histograms (`stats`) and draw the same progress bars (`progress`). The binary keeps
//! the CLI and the exit codes; what goes wrong here is reported to a terminal, so errors are
//! `anyhow` chains with a few typed markers (`Unreachable`) the binary maps to exit codes.

#![warn(missing_docs)]

pub mod bench;
mod generator;
pub mod load;
mod progress;
mod stats;

use std::time::Duration;

/// Reads a duration option (`--duration 20s`, `2m`, `1m30s`, `500ms`) with the parser of
/// the API's duration fields (keel-wire's), so the commands and the server take one syntax.
fn parse_duration(s: &str) -> Result<Duration, String> {
    keel_client::parse_duration_text(s).ok_or_else(|| {
        format!(
            "{s:?} is not a duration: use whole numbers with units ms, s, m, h or d, e.g. 500ms, 30s or 1m30s"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units_and_may_combine_them() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["20", "fast", "2w", ""] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("is not a duration"), "{bad:?}: {err}");
        }
    }
}
