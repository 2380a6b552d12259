//! The rules every piece of JSON a client hands Keel must meet before it is stored (job
//! `args`, results reported by workers, the args of a schedule's job template), checked on
//! the raw text so that what is stored is exactly what was sent.
//!
//! Why these rules, beyond "it parses":
//! - **Depth.** serde_json skips a raw value iteratively, so text nested 100,000 deep parses,
//!   and is stored, and then breaks whoever reads it: Postgres's JSON functions overflow their
//!   stack, and most JSON libraries (serde_json's default, Python's `json`, `jq`) refuse
//!   more than ~128 levels, so a listing page holding one such job cannot be read at all.
//!   [`MAX_DEPTH`] keeps every stored document readable everywhere.
//! - **Lone surrogates.** `"\ud800"` is valid JSON syntax but no Unicode text: decoders
//!   either fail (Python, serde_json into a `String`) or substitute, so the job would not
//!   read back as it was written. Refused.
//! - **NUL.** `"\u0000"` is a valid character, and `args`, results and templates are stored
//!   as the text received (Postgres `json`, SQLite `TEXT`), so both backends keep it
//!   identically. Only where Keel stores JSON as `jsonb` (tags, error messages) can a NUL not
//!   be represented; those are strings Keel validates itself (see `NewJob::validate` and
//!   `AttemptError::new`), not documents checked here.

use std::fmt;

/// Deepest nesting of arrays and objects accepted; a scalar is depth 0, `[1]` depth 1.
pub const MAX_DEPTH: usize = 64;

/// Why a JSON text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonTextError {
    /// Arrays and objects nest deeper than the limit.
    TooDeep {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A `\uD800`–`\uDFFF` escape that is not half of a valid surrogate pair.
    LoneSurrogate {
        /// Byte offset of the escape in the text.
        at: usize,
    },
}

impl fmt::Display for JsonTextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonTextError::TooDeep { limit } => {
                write!(f, "nests arrays and objects deeper than {limit} levels")
            }
            JsonTextError::LoneSurrogate { at } => write!(
                f,
                "holds a lone UTF-16 surrogate escape at byte {at}, which is not Unicode text"
            ),
        }
    }
}

impl std::error::Error for JsonTextError {}

/// Checks `text`, which must already be valid JSON (parsed by serde_json), against
/// [`MAX_DEPTH`] and for lone surrogate escapes. One pass over the bytes, no allocation,
/// no recursion: safe on any input size the body limit lets through.
pub fn check(text: &str) -> Result<(), JsonTextError> {
    check_with_depth(text, MAX_DEPTH)
}

/// [`check`] with another depth limit.
pub fn check_with_depth(text: &str, max_depth: usize) -> Result<(), JsonTextError> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(JsonTextError::TooDeep { limit: max_depth });
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => i = string_end(bytes, i + 1)?,
            _ => i += 1,
        }
    }
    Ok(())
}

/// Scans a string whose opening quote is just before `i`; returns the index after its
/// closing quote. Checks every `\u` escape for surrogate pairing.
fn string_end(bytes: &[u8], mut i: usize) -> Result<usize, JsonTextError> {
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Ok(i + 1),
            b'\\' => match bytes.get(i + 1) {
                Some(b'u') => {
                    let at = i;
                    let unit = hex4(bytes, i + 2);
                    i += 6;
                    match unit {
                        Some(0xD800..=0xDBFF) => {
                            // A high surrogate must be followed at once by a low one.
                            let low = (bytes.get(i) == Some(&b'\\')
                                && bytes.get(i + 1) == Some(&b'u'))
                            .then(|| hex4(bytes, i + 2))
                            .flatten();
                            match low {
                                Some(0xDC00..=0xDFFF) => i += 6,
                                _ => return Err(JsonTextError::LoneSurrogate { at }),
                            }
                        }
                        Some(0xDC00..=0xDFFF) => return Err(JsonTextError::LoneSurrogate { at }),
                        _ => {}
                    }
                }
                // Any other escape is two bytes.
                _ => i += 2,
            },
            _ => i += 1,
        }
    }
    // Unterminated: the text was not valid JSON; nothing more to check.
    Ok(i)
}

/// The value of four hex digits at `at`, if they are there.
fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = bytes.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u16::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn depth_counts_arrays_and_objects_not_brackets_in_strings() {
        assert_eq!(check("1"), Ok(()));
        assert_eq!(check(r#"{"a":"[[[[{{{{"}"#), Ok(()));
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check(&nested(MAX_DEPTH)), Ok(()));
        assert_eq!(
            check(&nested(MAX_DEPTH + 1)),
            Err(JsonTextError::TooDeep { limit: MAX_DEPTH })
        );
        assert!(
            check(&nested(100_000)).is_err(),
            "no recursion, no overflow"
        );
        // Siblings do not add up.
        let wide = format!("[{}]", vec!["[[]]"; 1000].join(","));
        assert_eq!(check(&wide), Ok(()));
    }

    #[test]
    fn lone_surrogates_are_refused_and_pairs_are_not() {
        assert_eq!(check(r#""\ud83d\ude00""#), Ok(()), "a valid pair (😀)");
        assert_eq!(check(r#""\uD83D\uDE00""#), Ok(()), "upper-case hex");
        assert_eq!(
            check(r#"{"a":"\ud800"}"#),
            Err(JsonTextError::LoneSurrogate { at: 6 })
        );
        assert!(check(r#""\udc00""#).is_err(), "a low surrogate first");
        assert!(check(r#""\ud800\u0041""#).is_err(), "high then not low");
        assert!(check(r#""\ud800x""#).is_err());
        assert_eq!(check(r#""\u0000 and \\u and \"""#), Ok(()));
    }

    proptest! {
        /// Any JSON serde_json writes for a value built from strings, numbers, arrays and
        /// objects passes (serde_json never writes a lone surrogate), and the depth it
        /// reports matches the value's.
        #[test]
        fn what_serde_json_writes_passes(s in ".*", n in any::<i64>(), depth in 0usize..80) {
            let mut v = serde_json::json!([s, n]);
            for _ in 0..depth {
                v = serde_json::json!({ "k": v });
            }
            let text = serde_json::to_string(&v).unwrap();
            let total = depth + 1;
            prop_assert_eq!(check(&text).is_ok(), total <= MAX_DEPTH);
        }

        /// Whatever the bytes, the check ends without panicking.
        #[test]
        fn never_panics(text in ".*") {
            let _ = check(&text);
        }
    }
}
