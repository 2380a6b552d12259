//! Keel's configuration: defaults, an optional TOML file, `KEEL_*` environment variables and
//! command-line flags, in rising order of precedence (a flag beats its env var, which beats
//! the file, which beats the default).
//!
//! Everything arrives as text and is validated in one pass before any network or database
//! I/O, so a misconfigured deployment hears about *every* bad field in one message and exits
//! with code 78 (`EX_CONFIG`) instead of failing on the first one, being fixed, and failing
//! on the next. Secrets (the database password, API key digests) never appear in `Debug`
//! output or in `/debug/config`.
//!
//! Where things are:
//! - [`settings`]: every setting, declared once (expanded by [`declare`]'s macro into
//!   [`ServeArgs`], [`Config`], the TOML key list and [`SETTINGS`]);
//! - `parse`: text → value for each kind of setting, with the bounds of a single value;
//! - `validate`: the checks across settings, by concern;
//! - `sources`: flags, file and defaults, and the TOML file;
//! - `redact`: how values appear in `/debug/config`;
//! - `components`: the config of each part of Keel, cut from [`Config`].

use std::fmt;

use serde::Serialize;

mod components;
pub mod declare;
mod parse;
mod redact;
pub mod settings;
mod sources;
mod validate;

pub use declare::SettingDoc;
pub use parse::parse_duration;
pub use settings::{Config, SETTINGS, ServeArgs};

use settings::Parsed;
use sources::{Problems, Sources};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (default: what log pipelines ingest).
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// Every problem found in the configuration, as `(field, problem)` in the order found:
/// reading the file, then each setting in declaration order, then the checks across
/// settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<(String, String)>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for (field, msg) in &self.0 {
            writeln!(f, "  {field}: {msg}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The JSON form is already redacted; reuse it so Debug can never leak more.
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => f.write_str("Config { .. }"),
        }
    }
}

impl Config {
    /// Merges the file (if any), env and flags, and validates everything, returning every
    /// problem at once.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigErrors> {
        let mut problems = Problems::new();
        let file = args
            .config
            .as_deref()
            .map(|p| sources::read_file(p, &mut problems))
            .unwrap_or_default();
        Self::resolve_sources(args, Sources::new(file, problems))
    }

    /// The settings of a config file's text alone, with no flags or environment: what
    /// `--config` reads, callable without a file (the config fuzz target and its proptest
    /// twin).
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let mut problems = Problems::new();
        let file = sources::file_settings(text, "the config file", &mut problems);
        Self::resolve_sources(&ServeArgs::default(), Sources::new(file, problems))
    }

    fn resolve_sources(args: &ServeArgs, mut sources: Sources) -> Result<Self, ConfigErrors> {
        let mut parsed = Parsed::read(args, &mut sources);
        let (texts, mut problems) = sources.finish();
        validate::check(&mut parsed, &texts, &mut problems);
        // A setting is missing only where a problem was recorded, so with no problems
        // `finish` has every value.
        match parsed.finish() {
            Some(config) if problems.is_empty() => Ok(config),
            _ => {
                debug_assert!(!problems.is_empty(), "a setting went missing silently");
                Err(ConfigErrors(problems))
            }
        }
    }
}

#[cfg(test)]
mod readme;
#[cfg(test)]
mod tests;
