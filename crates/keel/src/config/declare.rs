//! The `settings!` macro: each setting is declared once (name, type, default, environment
//! variable, value placeholder, parser, doc line, flags) and expanded into everything that
//! must agree about it, so none of them can drift from the others:
//!
//! - [`ServeArgs`](super::ServeArgs), the clap arguments of `keel serve` (the doc comment is
//!   the `--help` text);
//! - [`Config`](super::Config), the typed, validated configuration, and its `Serialize`
//!   (`/debug/config`), where a `secret` setting is redacted;
//! - `Parsed`, every setting read and parsed, each `None` where its text was refused;
//! - [`SETTINGS`](super::SETTINGS), the metadata the TOML key check and the README's table
//!   are made from.
//!
//! A declaration reads
//!
//! ```text
//! /// Doc comment: the --help text and the README's "meaning" column.
//! name: Type = "default text", env "KEEL_NAME", value "PLACEHOLDER", parse parser [, secret] [, switch];
//! ```
//!
//! The default is text, read by the same parser as a given value, so a default can never be
//! a value the parser would refuse. A default computed at startup is written `(expr)
//! shown "what the docs say"`. `secret` redacts the value in `/debug/config` (the type must
//! implement [`Redact`](super::redact::Redact); one that only implements
//! [`Show`](super::redact::Show) is refused at compile time, so forgetting the flag on a
//! secret type cannot leak it) and keeps `--help` from echoing it from the environment.
//! `switch` lets the flag stand alone for `true` (`--insecure-no-auth`).

/// What the docs say about one setting, taken from its declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingDoc {
    /// The TOML key; the flag is the same with `-` for `_`.
    pub name: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// What a value looks like (`HOST:PORT`, `DURATION`, …), as `--help` shows it.
    pub value: &'static str,
    /// The default as the docs show it: the text the parser reads when nothing is given,
    /// or a description of a default computed at startup.
    pub default: &'static str,
    /// The doc comment, a line per entry (each with the leading space `///` leaves).
    pub doc: &'static [&'static str],
    /// Whether the value is secret (redacted in `/debug/config`).
    pub secret: bool,
}

impl SettingDoc {
    /// The flag, e.g. `--admin-addr`.
    pub fn flag(&self) -> String {
        format!("--{}", self.name.replace('_', "-"))
    }

    /// The doc comment as one line.
    pub fn doc_line(&self) -> String {
        self.doc
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `true` when the flag list (after `;`) holds the flag asked for (before `;`).
macro_rules! has_flag {
    ($want:ident;) => {
        false
    };
    (secret; secret $($rest:ident)*) => {
        true
    };
    (switch; switch $($rest:ident)*) => {
        true
    };
    ($want:ident; $other:ident $($rest:ident)*) => {
        $crate::config::declare::has_flag!($want; $($rest)*)
    };
}

/// The text a setting's parser reads when nothing is given.
macro_rules! default_text {
    ($text:literal) => {
        ::std::borrow::Cow::Borrowed($text)
    };
    (($computed:expr)) => {
        ::std::borrow::Cow::<'static, str>::Owned($computed)
    };
}

/// The default as the docs show it.
macro_rules! default_shown {
    ($text:literal) => {
        $text
    };
    ($default:tt, $shown:literal) => {
        $shown
    };
    (($computed:expr)) => {
        compile_error!("a computed default needs `shown \"…\"` for the docs")
    };
}

/// How a setting's value is rendered in `/debug/config`: redacted when it is secret.
macro_rules! shown_value {
    ($value:expr; secret $($rest:ident)*) => {
        $crate::config::redact::Redacted($value)
    };
    ($value:expr; $other:ident $($rest:ident)*) => {
        $crate::config::declare::shown_value!($value; $($rest)*)
    };
    ($value:expr;) => {
        $crate::config::redact::Shown($value)
    };
}

/// Expands the declarations (see the module docs).
macro_rules! settings {
    (
        $(
            $(#[doc = $doc:literal])*
            $name:ident : $ty:ty = $default:tt $(shown $shown:literal)?,
            env $env:literal, value $value:literal, parse $parse:expr
            $(, $flag:ident)* ;
        )*
    ) => {
        /// The `serve` settings as given (flags and env, through clap). Every field is
        /// optional text so that parsing problems are collected by [`Config::resolve`]
        /// rather than reported one at a time by the argument parser.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct ServeArgs {
            /// TOML file with any of the settings below (keys are the flag names with `_`).
            #[arg(long, env = "KEEL_CONFIG", value_name = "PATH")]
            pub config: Option<std::path::PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(
                    long,
                    env = $env,
                    value_name = $value,
                    hide_env_values = $crate::config::declare::has_flag!(secret; $($flag)*),
                    num_args = if $crate::config::declare::has_flag!(switch; $($flag)*) {
                        0..=1
                    } else {
                        1..=1
                    },
                    default_missing_value = if $crate::config::declare::has_flag!(switch; $($flag)*) {
                        Some("true")
                    } else {
                        None
                    }
                )]
                pub $name: Option<String>,
            )*
        }

        /// Effective, validated configuration: every setting parsed into its type and
        /// checked against the others. Its `Serialize` (and so `Debug`) is what
        /// `/debug/config` shows: secret settings redacted, durations as `…ms`.
        #[derive(Clone)]
        pub struct Config {
            $(
                $(#[doc = $doc])*
                pub $name: $ty,
            )*
        }

        impl serde::Serialize for Config {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct as _;
                let mut out = s.serialize_struct("Config", SETTINGS.len())?;
                $(
                    out.serialize_field(
                        stringify!($name),
                        &$crate::config::declare::shown_value!(&self.$name; $($flag)*),
                    )?;
                )*
                out.end()
            }
        }

        /// Every setting, parsed; `None` where the text was refused (the reason is
        /// recorded). Cross-field checks read and adjust it before it becomes a
        /// [`Config`].
        pub(super) struct Parsed {
            $( pub(super) $name: Option<$ty>, )*
        }

        impl Parsed {
            /// Reads each setting from the flags and env (`args`), else the file, else its
            /// default, parses it, and records every refusal in `sources`.
            pub(super) fn read(args: &ServeArgs, sources: &mut super::sources::Sources) -> Self {
                Self {
                    $(
                        $name: sources.get(
                            stringify!($name),
                            args.$name.as_deref(),
                            $crate::config::declare::default_text!($default),
                            $parse,
                        ),
                    )*
                }
            }

            /// The configuration, when every setting has a value.
            pub(super) fn finish(self) -> Option<Config> {
                Some(Config {
                    $( $name: self.$name?, )*
                })
            }
        }

        /// Every setting as declared, in declaration order (the order of `--help`, of
        /// `/debug/config` and of error messages).
        pub const SETTINGS: &[SettingDoc] = &[
            $(
                SettingDoc {
                    name: stringify!($name),
                    env: $env,
                    value: $value,
                    default: $crate::config::declare::default_shown!($default $(, $shown)?),
                    doc: &[$($doc),*],
                    secret: $crate::config::declare::has_flag!(secret; $($flag)*),
                },
            )*
        ];
    };
}

pub(crate) use {default_shown, default_text, has_flag, settings, shown_value};
