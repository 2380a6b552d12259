//! Keel's binary crate as a library: configuration, telemetry, the CLI definition and the
//! [`App`] wiring, so integration tests (and Rust services embedding Keel) start exactly
//! what `keel serve` starts.

#![warn(missing_docs)]

pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub mod telemetry;

pub use app::App;
pub use config::{Config, ServeArgs};

/// Exit code for invalid configuration (sysexits `EX_CONFIG`): a supervisor should not
/// restart-loop on it.
pub const EX_CONFIG: u8 = 78;
/// Exit code when a server or database cannot be reached (sysexits `EX_UNAVAILABLE`).
pub const EX_UNAVAILABLE: u8 = 69;
/// Exit code when a listener cannot be bound, e.g. its port is in use (sysexits
/// `EX_OSERR`).
pub const EX_OSERR: u8 = 71;
