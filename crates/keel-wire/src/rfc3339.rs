//! Timestamps in request bodies: RFC 3339 exactly (`2030-01-01T00:00:00Z`), as the OpenAPI
//! document's pattern states, rather than chrono's more lenient `FromStr`.

/// For `Option<Timestamp>` fields.
pub(crate) mod option {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de};

    /// Writes the timestamp in RFC 3339 with a `Z`.
    pub(crate) fn serialize<S: Serializer>(
        t: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => s.serialize_none(),
        }
    }

    /// Reads an RFC 3339 timestamp, or `null`. A leap second (`…:60`) is kept as chrono
    /// keeps it (a nanosecond count past 1e9), for the server to refuse by name.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        DateTime::parse_from_rfc3339(&s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| {
                de::Error::custom("must be an RFC 3339 timestamp, e.g. 2030-01-01T00:00:00Z")
            })
    }
}
