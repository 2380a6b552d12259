//! Durations as the API writes them: whole milliseconds (`3600000`) or a string of
//! `<number><unit>` parts (`"1h"`, `"1h30m"`, `"500ms"`; units ms, s, m, h, d).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a duration field accepts, for messages.
pub const DURATION_SYNTAX: &str = "must be a duration: whole milliseconds, or a string \
    of numbers with units ms, s, m, h, d, such as \"500ms\", \"30s\", \"1h\" or \"1h30m\"";

/// What a duration field that needs a unit accepts, for messages.
pub const UNIT_DURATION_SYNTAX: &str =
    "must be a string with a unit, such as \"30m\" or \"1h\" (a bare number is ambiguous)";

/// A duration given as whole milliseconds or as a string with units. Written as a string
/// with units (`"1h30m"`, `"1500ms"`), which every server reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

/// A duration that must carry its unit (`"30m"`, `"1h"`): for fields whose name gives none
/// and whose values are minutes or hours (a schedule's `catch_up`), where `5` meant as five
/// minutes would silently become 5 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnitDuration(pub Duration);

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<Duration> for UnitDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

/// `d` as a string with units: the largest units that divide it exactly (`"1h30m"`), or
/// milliseconds when it is not a whole number of seconds.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    out
}

/// Parses a string of `<number><unit>` parts; `None` when it is not one or overflows.
pub fn parse_duration_text(s: &str) -> Option<Duration> {
    let mut total_ms: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let per_unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_ms = total_ms.checked_add(n.checked_mul(per_unit_ms)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl Serialize for UnitDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// Reads either form; `numbers` says whether a bare number (milliseconds) is accepted.
struct DurationVisitor {
    numbers: bool,
}

impl DurationVisitor {
    fn refuse_number<E: de::Error>(&self) -> E {
        E::custom(UNIT_DURATION_SYNTAX)
    }
}

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.numbers {
            f.write_str("a duration: whole milliseconds or a string such as \"30s\"")
        } else {
            f.write_str("a duration string with a unit, such as \"30m\"")
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        if !self.numbers {
            return Err(self.refuse_number());
        }
        Ok(Duration::from_millis(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        if !self.numbers {
            return Err(self.refuse_number());
        }
        u64::try_from(v)
            .map(Duration::from_millis)
            .map_err(|_| E::custom(DURATION_SYNTAX))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        if !self.numbers {
            return Err(self.refuse_number());
        }
        // A whole number written as a float (`5.0`) is that integer, as JSON Schema says;
        // only exactly representable ones (below 2^53).
        if v.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&v) {
            Ok(Duration::from_millis(v as u64))
        } else {
            Err(E::custom(DURATION_SYNTAX))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration_text(v).ok_or_else(|| {
            E::custom(if self.numbers {
                DURATION_SYNTAX
            } else {
                UNIT_DURATION_SYNTAX
            })
        })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor { numbers: true })
            .map(Self)
    }
}

impl<'de> Deserialize<'de> for UnitDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor { numbers: false })
            .map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn human(json: &str) -> Result<Duration, String> {
        serde_json::from_str::<HumanDuration>(json)
            .map(|d| d.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn both_forms_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!(human("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(human("1500.0"), Ok(Duration::from_millis(1500)));
        assert_eq!(human("\"1h30m\""), Ok(Duration::from_secs(5400)));
        assert_eq!(human("\"500ms\""), Ok(Duration::from_millis(500)));
        assert_eq!(human("\" 2d \""), Ok(Duration::from_secs(2 * 86_400)));
        for bad in [
            "-1",
            "1.5",
            "\"\"",
            "\"1x\"",
            "\"h\"",
            "true",
            "\"99999999999999999999d\"",
        ] {
            let e = human(bad).unwrap_err();
            assert!(e.contains("duration"), "{bad}: {e}");
        }
        let e = serde_json::from_str::<UnitDuration>("5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bare number"), "{e}");
        assert_eq!(
            serde_json::from_str::<UnitDuration>("\"5m\"").unwrap().0,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn written_with_units_and_read_back_the_same() {
        for ms in [
            0u64, 1, 999, 1000, 60_000, 5_400_000, 90_061_000, 86_400_000,
        ] {
            let d = HumanDuration(Duration::from_millis(ms));
            let text = serde_json::to_string(&d).unwrap();
            assert_eq!(
                serde_json::from_str::<HumanDuration>(&text).unwrap(),
                d,
                "{text}"
            );
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
