//! Reading a request body into its keel-wire type, reporting every problem at once.
//!
//! A derived `Deserialize` stops at the first bad field. Clients fix requests faster when
//! they see all of them, so a body is first split into `(name, raw JSON)` members (any
//! valid JSON object splits; anything else is a `400` or a field error), then:
//! - a member the type does not have, or one given twice, is reported (the type's own
//!   field list is the reference, read from its `Deserialize`);
//! - the whole object is deserialized once: the path of every valid body;
//! - when that fails, each member is deserialized alone (every field of a keel-wire request
//!   type may be absent), each failure is reported under its name, and the type is read
//!   from the members that passed, so the caller's bound checks see the rest.
//!
//! Field paths get a prefix (`jobs[3].`, `job.`) so that nested bodies report where they
//! are.

use std::fmt;

use keel_core::FieldError;
use serde::de::{self, DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// A JSON object's members as raw JSON, in order, duplicates kept (so they can be
/// reported).
pub(crate) struct Members(pub(crate) Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    let value = map.next_value::<Box<RawValue>>()?;
                    members.push((name, value));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// Splits a request body into its members; `400` if it is not valid JSON or not an
/// object.
pub(crate) fn members_of_body(body: &[u8]) -> Result<Members, ApiError> {
    serde_json::from_slice::<Members>(body).map_err(|e| {
        let what = if e.is_data() {
            "the request body must be a JSON object"
        } else {
            "the request body is not valid JSON"
        };
        ApiError::BadRequest(format!("{what}: {e}"))
    })
}

/// A serde error message without its " at line 1 column 7" suffix, which points into the
/// field's own text and would only confuse.
fn serde_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    s.strip_suffix(&suffix).map_or(s.clone(), str::to_owned)
}

/// Collects field errors under a path prefix (`""` or `jobs[3].`).
pub(crate) struct Errors<'a> {
    pub(crate) prefix: &'a str,
    pub(crate) list: Vec<FieldError>,
}

impl Errors<'_> {
    pub(crate) fn new(prefix: &str) -> Errors<'_> {
        Errors {
            prefix,
            list: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        self.list.push(FieldError {
            field: format!("{}{field}", self.prefix),
            message: message.into(),
        });
    }

    /// Whether a problem was already recorded for `field` (so a field is reported once).
    pub(crate) fn names(&self, field: &str) -> bool {
        let path = format!("{}{field}", self.prefix);
        self.list.iter().any(|e| e.field == path)
    }

    /// The value, or a `422` listing every error.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, ApiError> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(ApiError::Validation(self.list))
        }
    }
}

/// The names of `T`'s fields, read from its `Deserialize` (which hands them to the
/// deserializer); empty for a type that is not a struct.
pub(crate) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    /// A deserializer that only listens for the field list, then gives up.
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// A body as read: the value built from the members that were fine (defaults for the
/// rest), and which fields were given at all (required ones are checked by the caller,
/// since every field of a keel-wire request type may be absent).
pub(crate) struct Read<T> {
    pub(crate) value: T,
    pub(crate) given: Vec<&'static str>,
}

impl<T> Read<T> {
    /// Whether the body had `field` (whatever its value).
    pub(crate) fn has(&self, field: &str) -> bool {
        self.given.contains(&field)
    }
}

/// Reads `members` as `T`, recording every problem in `errs`. `text` is the object the
/// members came from, read directly when nothing is wrong.
pub(crate) fn read_members<T: DeserializeOwned + Default>(
    members: Members,
    text: Option<&str>,
    errs: &mut Errors<'_>,
) -> Read<T> {
    let read = read_members_on::<T>(members, text, &[], errs);
    Read {
        value: read.value.unwrap_or_default(),
        given: read.given,
    }
}

/// [`read_members`] for a type with required fields that have no default (a nested object
/// such as `unique`): `stand_ins` gives a valid value for each, used to try each member
/// alone and to build the value when one is missing or bad (its problem is recorded, so the
/// value only serves the caller's further checks). `None` when even that fails.
pub(crate) fn read_members_on<T: DeserializeOwned>(
    members: Members,
    text: Option<&str>,
    stand_ins: &[(&'static str, &'static str)],
    errs: &mut Errors<'_>,
) -> Read<Option<T>> {
    let fields = fields_of::<T>();
    let before = errs.list.len();
    let mut kept: Vec<(&'static str, Box<RawValue>)> = Vec::with_capacity(members.0.len());
    for (name, raw) in members.0 {
        let Some(field) = fields.iter().copied().find(|f| *f == name) else {
            errs.add(
                &name,
                format!("unknown field; expected one of {}", fields.join(", ")),
            );
            continue;
        };
        if kept.iter().any(|(k, _)| *k == field) {
            errs.add(field, "duplicate field");
            continue;
        }
        kept.push((field, raw));
    }
    let given: Vec<&'static str> = kept.iter().map(|(f, _)| *f).collect();
    if errs.list.len() == before
        && let Some(text) = text
        && let Ok(value) = serde_json::from_str::<T>(text)
    {
        return Read {
            value: Some(value),
            given,
        };
    }
    let stand_ins: Vec<(&'static str, Box<RawValue>)> = stand_ins
        .iter()
        .filter_map(|(f, v)| Some((*f, RawValue::from_string((*v).to_owned()).ok()?)))
        .collect();
    // `members` over the stand-ins of the required fields they lack.
    let with_stand_ins = |members: &[(&'static str, &RawValue)]| {
        let mut all: Vec<(&str, &RawValue)> = stand_ins
            .iter()
            .filter(|(f, _)| !members.iter().any(|(m, _)| m == f))
            .map(|(f, r)| (*f, &**r))
            .collect();
        all.extend(members.iter().copied());
        object_text(&all)
    };
    // Each member alone: what is wrong with it, if anything.
    let mut good = Vec::with_capacity(kept.len());
    for (field, raw) in kept {
        match serde_json::from_str::<T>(&with_stand_ins(&[(field, &raw)])) {
            Ok(_) => good.push((field, raw)),
            Err(e) => match integral_floats_to_integers(&raw) {
                // A number with no fractional part counts as an integer (`5.0` as `5`), as
                // JSON Schema says it is: clients whose JSON libraries write every number as
                // a float must not see their integers refused.
                Some(fixed)
                    if serde_json::from_str::<T>(&with_stand_ins(&[(field, &fixed)])).is_ok() =>
                {
                    good.push((field, fixed));
                }
                _ => errs.add(field, serde_message(&e)),
            },
        }
    }
    let pairs: Vec<(&'static str, &RawValue)> = good.iter().map(|(f, r)| (*f, &**r)).collect();
    let value = match serde_json::from_str::<T>(&with_stand_ins(&pairs)) {
        Ok(value) => Some(value),
        Err(e) => {
            // Fields that are each fine but not together: not a shape keel-wire has.
            errs.add("", serde_message(&e));
            None
        }
    };
    Read { value, given }
}

/// Reads a whole request body as `T`: `400` if it is not a JSON object, otherwise the
/// value and every field problem found.
pub(crate) fn read_body<T: DeserializeOwned + Default>(
    body: &[u8],
    errs: &mut Errors<'_>,
) -> Result<Read<T>, ApiError> {
    let members = members_of_body(body)?;
    let text = std::str::from_utf8(body).ok();
    Ok(read_members(members, text, errs))
}

/// `{"a":1,"b":2}` from its members.
fn object_text(members: &[(&str, &RawValue)]) -> String {
    let mut s = String::from("{");
    for (i, (name, raw)) in members.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        // Field names come from a type's field list: plain identifiers.
        s.push('"');
        s.push_str(name);
        s.push_str("\":");
        s.push_str(raw.get());
    }
    s.push('}');
    s
}

/// `raw` with every float that has no fractional part (within the exactly representable
/// integers) written as an integer; `None` when there was none.
fn integral_floats_to_integers(raw: &RawValue) -> Option<Box<RawValue>> {
    fn fix(v: &mut serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                // Only exactly representable integers: |f| < 2^53.
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    *v = if f < 0.0 {
                        serde_json::Value::from(f as i64)
                    } else {
                        serde_json::Value::from(f as u64)
                    };
                    true
                } else {
                    false
                }
            }
            serde_json::Value::Array(items) => {
                items.iter_mut().fold(false, |changed, i| fix(i) | changed)
            }
            serde_json::Value::Object(members) => members
                .values_mut()
                .fold(false, |changed, m| fix(m) | changed),
            _ => false,
        }
    }
    let mut v = serde_json::from_str::<serde_json::Value>(raw.get()).ok()?;
    if fix(&mut v) {
        serde_json::value::to_raw_value(&v).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: DeserializeOwned + Default>(body: &str) -> (T, Vec<String>) {
        let mut errs = Errors::new("");
        let read = read_body::<T>(body.as_bytes(), &mut errs).unwrap();
        (read.value, errs.list.into_iter().map(|e| e.field).collect())
    }

    #[test]
    fn field_lists_come_from_the_type() {
        assert_eq!(
            fields_of::<keel_wire::UniqueIn>(),
            ["key", "scope", "period"]
        );
        assert!(fields_of::<keel_wire::JobIn>().contains(&"delay_ms"));
        assert!(fields_of::<u32>().is_empty());
    }

    #[test]
    fn every_bad_member_is_reported_and_the_good_ones_kept() {
        let (job, errors) = read::<keel_wire::JobIn>(
            r#"{"kind":"k","priority":"high","bogus":1,"queue":"q","queue":"r","tags":[1],"max_attempts":3.0}"#,
        );
        assert_eq!(errors, ["bogus", "queue", "priority", "tags"]);
        assert_eq!(job.kind, "k");
        assert_eq!(job.queue.as_deref(), Some("q"));
        assert_eq!(job.max_attempts, Some(3), "5.0 reads as 5");
        assert_eq!(job.priority, None);
    }

    #[test]
    fn a_valid_body_is_read_whole_and_args_stay_verbatim() {
        let (job, errors) =
            read::<keel_wire::JobIn>(r#"{"kind":"k","args":{"b": 1,  "a":[1, 2]},"tags":null}"#);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(job.args.unwrap().get(), r#"{"b": 1,  "a":[1, 2]}"#);
        assert_eq!(job.tags, None, "null is not given");
    }
}
