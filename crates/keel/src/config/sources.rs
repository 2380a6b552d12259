//! Where a setting's text comes from: the flag or its environment variable (clap has merged
//! those), else the TOML file, else the declared default. Everything is text until its
//! parser reads it, so the file, the environment and the defaults go through one parser and
//! are refused in the same words.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use super::SETTINGS;

/// One `(field, problem)` per thing wrong with the configuration, in the order found.
pub(super) type Problems = Vec<(String, String)>;

/// Reads the TOML file into `name → text` pairs, refusing unknown keys (a typo must not be
/// silently ignored).
pub(super) fn read_file(path: &Path, problems: &mut Problems) -> BTreeMap<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => file_settings(&text, &path.display().to_string(), problems),
        Err(e) => {
            problems.push((
                "config".into(),
                format!("cannot read {}: {e}", path.display()),
            ));
            BTreeMap::new()
        }
    }
}

/// A config file's text (read from `origin`, named in messages) as `name → text` pairs.
pub(super) fn file_settings(
    text: &str,
    origin: &str,
    problems: &mut Problems,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            problems.push(("config".into(), format!("{origin} is not valid TOML: {e}")));
            return out;
        }
    };
    for (key, value) in table {
        if !SETTINGS.iter().any(|s| s.name == key) {
            problems.push((
                format!("config:{key}"),
                format!("unknown setting in {origin}"),
            ));
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => {
                problems.push((
                    format!("config:{key}"),
                    format!("unsupported value {other}"),
                ));
                continue;
            }
        };
        out.insert(key, text);
    }
    out
}

/// The text each setting was read from, and whether it was given (flag, env or file)
/// rather than defaulted: a few checks across settings depend on that, e.g. the admission
/// bounds left unset follow the ones that are set.
#[derive(Debug, Default)]
pub(super) struct Texts(BTreeMap<&'static str, (String, bool)>);

impl Texts {
    /// Whether `name` was given rather than defaulted.
    pub(super) fn given(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|(_, given)| *given)
    }

    /// The text `name` was parsed from (empty for a name never read).
    pub(super) fn text(&self, name: &str) -> &str {
        self.0.get(name).map_or("", |(text, _)| text)
    }
}

/// Reads settings, one at a time, from the file and the defaults under the flags, and
/// collects every problem.
pub(super) struct Sources {
    file: BTreeMap<String, String>,
    texts: Texts,
    problems: Problems,
}

impl Sources {
    /// Reads from `file` under the flags; `problems` already found (reading the file) come
    /// first in the report.
    pub(super) fn new(file: BTreeMap<String, String>, problems: Problems) -> Self {
        Self {
            file,
            texts: Texts::default(),
            problems,
        }
    }

    /// `name`'s value: the flag/env text, else the file's, else `default`, parsed. `None`
    /// only after a problem has been recorded, so a setting never goes missing silently.
    pub(super) fn get<T>(
        &mut self,
        name: &'static str,
        flag: Option<&str>,
        default: Cow<'static, str>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let (text, given) = match flag.or_else(|| self.file.get(name).map(String::as_str)) {
            Some(text) => (text.to_owned(), true),
            None => (default.into_owned(), false),
        };
        let parsed = parse(&text);
        self.texts.0.insert(name, (text, given));
        match parsed {
            Ok(v) => Some(v),
            Err(e) => {
                self.problems.push((name.to_owned(), e));
                None
            }
        }
    }

    /// What was read, and the problems found so far.
    pub(super) fn finish(self) -> (Texts, Problems) {
        (self.texts, self.problems)
    }
}
