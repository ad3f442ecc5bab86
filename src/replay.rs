//! The replay file: one stream entry per line as JSON, written by
//! `tripline record` and read by `tripline replay`, so yesterday's telemetry
//! can be judged again offline by changed rules.
//!
//! A line is an object with optional `stream`, `id`, `timestamp` (or `ts`),
//! Watermill `metadata` and `uuid`, and the message as one of:
//! - `payload`: the JSON message (an object; a string is taken verbatim as
//!   the payload's text, so broken JSON replays as broken);
//! - `fields`: the entry's raw stream fields, decoded as the engine decodes
//!   flat fields (numbers become numbers);
//! - neither: every other key of the line is the message.
//!
//! `docs/rules-testing.md` documents it for users.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::clock::parse_rfc3339;
use crate::decode::{self, WATERMILL_METADATA, WATERMILL_PAYLOAD, WATERMILL_UUID, encode_metadata};

#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum LineError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("a line must be a JSON object, got {0}")]
    NotObject(&'static str),
    #[error("`{key}` must be {expected}")]
    Type { key: String, expected: &'static str },
    #[error("`{0}` and `{1}` both given; use one")]
    Both(&'static str, &'static str),
    #[error("unexpected key `{0}` beside `{1}` (message fields go inside `{1}`)")]
    Beside(String, &'static str),
    #[error(
        "`metadata` and `uuid` describe a Watermill envelope around a `payload`, not raw `fields`"
    )]
    EnvelopeWithoutPayload,
    #[error("no message: the line has no `payload`, no `fields` and no message keys")]
    Empty,
}

/// One line of a replay file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The stream the entry was read from; replay can supply a default.
    pub stream: Option<String>,
    /// The entry id, shown in output and passed to rules as `ctx.id`.
    pub id: Option<String>,
    /// Virtual time of the entry (milliseconds since the epoch).
    pub timestamp_ms: Option<u64>,
    /// The message itself.
    pub body: Body,
}

/// The message of a line.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A JSON message, carried as the entry's `payload` field, inside a
    /// Watermill envelope when `metadata` or `uuid` is present.
    Json {
        /// The message; a string is the payload's raw text.
        payload: Value,
        /// Watermill metadata, when the entry had an envelope.
        metadata: Option<BTreeMap<String, String>>,
        /// Watermill message UUID, when the entry had an envelope.
        uuid: Option<String>,
    },
    /// Raw stream fields, as `XADD s * k v …` wrote them.
    Fields(Vec<(String, String)>),
}

/// The fields of one stream entry, in stream order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The millisecond part of a stream id (`1700000000000-3` → 1700000000000).
pub fn id_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// The fields of an entry carrying `payload` as JSON; with `envelope`
/// (uuid, metadata) in Watermill's form, else as one `payload` field. A
/// string payload is used verbatim.
pub fn json_fields(payload: &Value, envelope: Option<(&str, &[(&str, &str)])>) -> Fields {
    let body = match payload {
        Value::String(raw) => raw.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    };
    match envelope {
        None => vec![(WATERMILL_PAYLOAD.as_bytes().to_vec(), body)],
        Some((uuid, metadata)) => vec![
            (WATERMILL_UUID.as_bytes().to_vec(), uuid.as_bytes().to_vec()),
            (
                WATERMILL_METADATA.as_bytes().to_vec(),
                encode_metadata(metadata),
            ),
            (WATERMILL_PAYLOAD.as_bytes().to_vec(), body),
        ],
    }
}

/// A scalar as the text a stream field would hold.
fn field_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Result<Option<String>, LineError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(LineError::Type {
            key: key.into(),
            expected: "a string",
        }),
    }
}

fn timestamp(key: &'static str, v: Value) -> Result<u64, LineError> {
    let bad = || LineError::Type {
        key: key.into(),
        expected: "an RFC 3339 time or integer milliseconds since the epoch",
    };
    match v {
        Value::String(s) => parse_rfc3339(&s).ok_or_else(bad),
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        _ => Err(bad()),
    }
}

impl Record {
    /// Parses one line (not blank).
    pub fn parse(line: &str) -> Result<Record, LineError> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| LineError::Json(e.to_string()))?;
        let Value::Object(mut map) = value else {
            return Err(LineError::NotObject(decode::json_kind(&value)));
        };
        let stream = take_string(&mut map, "stream")?;
        let id = take_string(&mut map, "id")?;
        let timestamp_ms = match (map.remove("timestamp"), map.remove("ts")) {
            (Some(_), Some(_)) => return Err(LineError::Both("timestamp", "ts")),
            (Some(v), None) => Some(timestamp("timestamp", v)?),
            (None, Some(v)) => Some(timestamp("ts", v)?),
            (None, None) => None,
        };
        let metadata = match map.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                Some(m.into_iter().map(|(k, v)| (k, field_text(v))).collect())
            }
            Some(_) => {
                return Err(LineError::Type {
                    key: "metadata".into(),
                    expected: "an object of strings",
                });
            }
        };
        let uuid = take_string(&mut map, "uuid")?;
        let body = match (map.remove("payload"), map.remove("fields")) {
            (Some(_), Some(_)) => return Err(LineError::Both("payload", "fields")),
            (Some(payload), None) => {
                if let Some(k) = map.keys().next() {
                    return Err(LineError::Beside(k.clone(), "payload"));
                }
                Body::Json {
                    payload,
                    metadata,
                    uuid,
                }
            }
            (None, Some(fields)) => {
                if let Some(k) = map.keys().next() {
                    return Err(LineError::Beside(k.clone(), "fields"));
                }
                if metadata.is_some() || uuid.is_some() {
                    return Err(LineError::EnvelopeWithoutPayload);
                }
                let Value::Object(fields) = fields else {
                    return Err(LineError::Type {
                        key: "fields".into(),
                        expected: "an object of field names to values",
                    });
                };
                Body::Fields(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k, field_text(v)))
                        .collect(),
                )
            }
            (None, None) if map.is_empty() => return Err(LineError::Empty),
            (None, None) => Body::Json {
                payload: Value::Object(map),
                metadata,
                uuid,
            },
        };
        Ok(Record {
            stream,
            id,
            timestamp_ms,
            body,
        })
    }

    /// The stream fields this line stands for, as the engine would read them.
    pub fn fields(&self) -> Fields {
        match &self.body {
            Body::Fields(f) => f
                .iter()
                .map(|(k, v)| (k.clone().into_bytes(), v.clone().into_bytes()))
                .collect(),
            Body::Json {
                payload,
                metadata,
                uuid,
            } => {
                if metadata.is_none() && uuid.is_none() {
                    return json_fields(payload, None);
                }
                let pairs: Vec<(&str, &str)> = metadata
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                json_fields(payload, Some((uuid.as_deref().unwrap_or(""), &pairs)))
            }
        }
    }

    /// The line for a stream entry: JSON entries (Watermill envelope or one
    /// `payload`/`data` field) as `payload`, with the envelope's metadata and
    /// uuid; anything else, including entries that cannot be decoded, as raw
    /// `fields` (bytes that are not UTF-8 are replaced), so replaying it
    /// reproduces what the engine saw.
    pub fn from_entry(stream: &str, id: &str, fields: &[(Vec<u8>, Vec<u8>)]) -> Record {
        let find = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .map(|(_, v)| v.as_slice())
        };
        let is_envelope = find(WATERMILL_PAYLOAD).is_some()
            && (find(WATERMILL_UUID).is_some() || find(WATERMILL_METADATA).is_some());
        let single_json =
            fields.len() == 1 && (fields[0].0 == b"payload" || fields[0].0 == b"data");
        // A string `payload` in a line is raw text, so a JSON string payload
        // (which decodes to `msg.value`) keeps its quotes there.
        let json_body = |raw: &[u8]| match serde_json::from_slice::<Value>(raw).ok()? {
            Value::String(_) => Some(Value::String(std::str::from_utf8(raw).ok()?.to_owned())),
            other => Some(other),
        };
        let body = match decode::decode(fields) {
            Ok(decoded) if is_envelope => {
                find(WATERMILL_PAYLOAD)
                    .and_then(json_body)
                    .map(|payload| Body::Json {
                        payload,
                        metadata: find(WATERMILL_METADATA).map(|_| {
                            decoded
                                .metadata
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect()
                        }),
                        uuid: decoded.uuid,
                    })
            }
            Ok(_) if single_json => json_body(&fields[0].1).map(|payload| Body::Json {
                payload,
                metadata: None,
                uuid: None,
            }),
            _ => None,
        }
        .unwrap_or_else(|| {
            Body::Fields(
                fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        )
                    })
                    .collect(),
            )
        });
        Record {
            stream: Some(stream.to_string()),
            id: Some(id.to_string()),
            timestamp_ms: id_ms(id),
            body,
        }
    }

    /// The line's JSON text (no newline); entry keys first, for readability.
    pub fn to_line(&self) -> String {
        /// The fields of [`Record`] in the order a reader wants them.
        #[derive(Serialize)]
        struct Line<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            stream: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            timestamp: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            uuid: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            metadata: Option<&'a BTreeMap<String, String>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload: Option<&'a Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            fields: Option<OrderedFields<'a>>,
        }
        let mut line = Line {
            stream: self.stream.as_deref(),
            id: self.id.as_deref(),
            timestamp: self.timestamp_ms.map(crate::clock::rfc3339),
            uuid: None,
            metadata: None,
            payload: None,
            fields: None,
        };
        match &self.body {
            Body::Json {
                payload,
                metadata,
                uuid,
            } => {
                line.payload = Some(payload);
                line.metadata = metadata.as_ref();
                line.uuid = uuid.as_deref();
            }
            Body::Fields(f) => line.fields = Some(OrderedFields(f)),
        }
        serde_json::to_string(&line).expect("a replay line always serializes")
    }
}

/// Raw fields as a JSON object in their stream order.
struct OrderedFields<'a>(&'a [(String, String)]);

impl Serialize for OrderedFields<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::f;

    #[test]
    fn message_at_top_level_or_under_payload_or_fields() {
        let top = Record::parse(r#"{"stream":"s","ts":5,"hostname":"r1","n":600}"#).unwrap();
        assert_eq!(top.stream.as_deref(), Some("s"));
        assert_eq!(top.timestamp_ms, Some(5));
        let under =
            Record::parse(r#"{"stream":"s","ts":5,"payload":{"hostname":"r1","n":600}}"#).unwrap();
        assert_eq!(top, under);
        let flat = Record::parse(r#"{"fields":{"hostname":"r1","n":600}}"#).unwrap();
        assert_eq!(
            flat.body,
            Body::Fields(vec![
                ("hostname".into(), "r1".into()),
                ("n".into(), "600".into())
            ])
        );
        let t = Record::parse(r#"{"timestamp":"2025-01-01T00:00:01Z","x":1}"#).unwrap();
        assert_eq!(t.timestamp_ms, Some(1_735_689_601_000));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let err = |l: &str| Record::parse(l).unwrap_err().to_string();
        assert!(err("{nope").starts_with("not JSON"));
        assert_eq!(err("[1]"), "a line must be a JSON object, got an array");
        assert!(err(r#"{"payload":{},"x":1}"#).contains("unexpected key `x` beside `payload`"));
        assert!(err(r#"{"ts":"yesterday","x":1}"#).contains("`ts` must be"));
        assert!(err(r#"{"stream":"s"}"#).contains("no message"));
        assert!(err(r#"{"ts":1,"timestamp":2,"x":1}"#).contains("both given"));
    }

    #[test]
    fn entries_round_trip_through_lines() {
        let meta = encode_metadata(&[("source", "c1")]);
        let entries = [
            f(&[
                (WATERMILL_UUID, b"u-1"),
                (WATERMILL_METADATA, &meta),
                (
                    WATERMILL_PAYLOAD,
                    br#"{"hostname":"r1","input_errors":12000}"#,
                ),
            ]),
            f(&[("payload", br#"{"a":1}"#)]),
            f(&[("hostname", b"r1"), ("input_errors", b"600")]),
            f(&[("payload", b"not json")]),
            f(&[
                (WATERMILL_UUID, b"u-2"),
                (WATERMILL_METADATA, b""),
                (WATERMILL_PAYLOAD, b"-41.5"),
            ]),
            f(&[("payload", br#""dark""#)]),
        ];
        for fields in entries {
            let rec = Record::from_entry("s", "1700000000000-1", &fields);
            assert_eq!(rec.timestamp_ms, Some(1_700_000_000_000));
            let back = Record::parse(&rec.to_line()).unwrap();
            assert_eq!(back, rec);
            let a = decode::decode(&fields).map(|d| (d.body.to_string(), d.uuid));
            let b = decode::decode(&back.fields()).map(|d| (d.body.to_string(), d.uuid));
            assert_eq!(a, b);
        }
    }
}
