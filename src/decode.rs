//! Turns a stream entry's fields into the map a rule sees.
//!
//! Three shapes are accepted, tried in this order:
//! 1. Watermill's envelope: `_watermill_message_uuid`, `metadata` (a msgpack
//!    map of string → string) and `payload` (JSON bytes). This is what the
//!    seed's Go publishers write. A publisher that sets no metadata (the
//!    seed's way) gets an empty string there, which Watermill's own
//!    unmarshaller reads as "no metadata"; so do we, and likewise for a
//!    msgpack nil or no `metadata` field at all.
//! 2. A single `payload` or `data` field holding a JSON object.
//! 3. Flat fields, where values that look like numbers become numbers, so
//!    `XADD s * hostname r1 input_errors 600` works from `redis-cli`.
//!
//! In shapes 1 and 2 the JSON may also be a bare scalar (number, string,
//! boolean): the seed's transceiver publisher sends a reading as `-41.5`.
//! Rules see it as `#{value: -41.5}` ([`BARE_VALUE`]), so `msg` is always a
//! map.
//!
//! Anything else is a [`DecodeError`] whose text becomes the dead-letter reason.

use rhai::{Dynamic, Map};

/// Field names of Watermill's default Redis Streams marshaller.
pub const WATERMILL_UUID: &str = "_watermill_message_uuid";
pub const WATERMILL_METADATA: &str = "metadata";
pub const WATERMILL_PAYLOAD: &str = "payload";

/// The key under which a bare JSON scalar payload reaches rules
/// (`msg.value`), so every message is a map and rules index it one way.
pub const BARE_VALUE: &str = "value";

#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("empty entry: no fields")]
    Empty,
    #[error("field `{field}` is not valid JSON: {reason}")]
    Json { field: String, reason: String },
    #[error("field `{field}` is JSON but not an object or a scalar (got {got})")]
    NotObject { field: String, got: &'static str },
    #[error("Watermill `metadata` is not a msgpack map of strings: {0}")]
    Metadata(String),
    #[error("field name is not UTF-8")]
    FieldName,
}

/// A decoded message: the body rules read plus the envelope's extras.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The reading itself (always a map; a bare scalar is `#{value: …}`).
    pub body: Dynamic,
    /// Watermill metadata, empty for other shapes.
    pub metadata: Map,
    /// Watermill message UUID, when the envelope carried one.
    pub uuid: Option<String>,
}

pub fn decode(fields: &[(Vec<u8>, Vec<u8>)]) -> Result<Decoded, DecodeError> {
    if fields.is_empty() {
        return Err(DecodeError::Empty);
    }
    let find = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    };
    if let Some(payload) = find(WATERMILL_PAYLOAD)
        && (find(WATERMILL_UUID).is_some() || find(WATERMILL_METADATA).is_some())
    {
        let metadata = match find(WATERMILL_METADATA) {
            Some(raw) => decode_metadata(raw)?,
            None => Map::new(),
        };
        let uuid = find(WATERMILL_UUID).map(|u| String::from_utf8_lossy(u).into_owned());
        return Ok(Decoded {
            body: json_body(WATERMILL_PAYLOAD, payload)?,
            metadata,
            uuid,
        });
    }
    if fields.len() == 1 && (fields[0].0 == b"payload" || fields[0].0 == b"data") {
        let name = String::from_utf8_lossy(&fields[0].0).into_owned();
        return Ok(Decoded {
            body: json_body(&name, &fields[0].1)?,
            metadata: Map::new(),
            uuid: None,
        });
    }
    let mut map = Map::new();
    for (k, v) in fields {
        let key = std::str::from_utf8(k).map_err(|_| DecodeError::FieldName)?;
        map.insert(key.into(), scalar(v));
    }
    Ok(Decoded {
        body: Dynamic::from_map(map),
        metadata: Map::new(),
        uuid: None,
    })
}

/// A JSON field as the map rules read: an object as it is, a bare scalar
/// under [`BARE_VALUE`].
fn json_body(field: &str, raw: &[u8]) -> Result<Dynamic, DecodeError> {
    if let Ok(Object(map)) = serde_json::from_slice(raw) {
        return Ok(Dynamic::from_map(map));
    }
    // Not an object, or not JSON: parse again the general way, which says
    // which. Objects never get here, so the scalar case costs them nothing.
    let value: Dynamic = serde_json::from_slice(raw).map_err(|e| DecodeError::Json {
        field: field.to_string(),
        reason: e.to_string(),
    })?;
    if value.is_map() {
        Ok(value)
    } else if value.is_int() || value.is_float() || value.is_string() || value.is_bool() {
        Ok(Dynamic::from_map(Map::from([(BARE_VALUE.into(), value)])))
    } else {
        Err(DecodeError::NotObject {
            field: field.to_string(),
            got: if value.is_unit() {
                "null"
            } else {
                value.type_name()
            },
        })
    }
}

/// A payload's top-level JSON object as a rule map. Rhai's own `Dynamic`
/// deserializer allocates a `String` per key before turning it into the map's
/// inline key, and inserts one key at a time; here keys are borrowed from the
/// input and the map is built in one go. Values nest as usual.
struct Object(Map);

impl<'de> serde::Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        d.deserialize_map(ObjectVisitor)
    }
}

struct ObjectVisitor;

impl<'de> serde::de::Visitor<'de> for ObjectVisitor {
    type Value = Object;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Object, A::Error> {
        let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(8));
        while let Some(Key(key)) = access.next_key()? {
            entries.push((key, access.next_value::<Dynamic>()?));
        }
        // Like inserting one by one, the last of duplicate keys wins.
        Ok(Object(
            entries
                .into_iter()
                .map(|(k, v)| (k.as_ref().into(), v))
                .collect(),
        ))
    }
}

/// An object key, borrowed from the input unless it holds escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> serde::de::Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(v.into()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(Key(v.to_owned().into()))
    }

    fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
        Ok(Key(v.into()))
    }
}

/// A flat field value: integer, then float, then boolean, else string.
fn scalar(raw: &[u8]) -> Dynamic {
    let Ok(s) = std::str::from_utf8(raw) else {
        return Dynamic::from(String::from_utf8_lossy(raw).into_owned());
    };
    if let Ok(i) = s.parse::<i64>() {
        return Dynamic::from_int(i);
    }
    if let Ok(f) = s.parse::<f64>()
        && f.is_finite()
        && s.bytes().any(|b| b.is_ascii_digit())
    {
        return Dynamic::from_float(f);
    }
    match s {
        "true" => Dynamic::from_bool(true),
        "false" => Dynamic::from_bool(false),
        _ => Dynamic::from(s.to_string()),
    }
}

/// Watermill metadata as a rule map. The usual shape, a map of strings, is
/// read in place; anything else goes through `rmpv`, which reads every
/// shape (or says why it cannot), at the cost of building its own tree of
/// values and strings first.
///
/// An empty field is what Watermill writes for a message without metadata
/// (the seed never sets any), and its unmarshaller reads it back as none;
/// a msgpack nil says the same in msgpack. Both are the empty map.
fn decode_metadata(raw: &[u8]) -> Result<Map, DecodeError> {
    if matches!(raw, [] | [MSGPACK_NIL]) {
        return Ok(Map::new());
    }
    match read_string_map(raw) {
        Some(map) => Ok(map),
        None => decode_any_metadata(raw),
    }
}

/// msgpack's nil marker.
const MSGPACK_NIL: u8 = 0xc0;

/// A msgpack map whose keys are strings and values strings or nil (read as
/// empty, like `rmpv` does), with nothing after it; `None` for anything else.
fn read_string_map(raw: &[u8]) -> Option<Map> {
    let (&marker, mut rest) = raw.split_first()?;
    let len = match marker {
        0x80..=0x8f => usize::from(marker & 0x0f),
        0xde => usize::from(u16::from_be_bytes(take(&mut rest)?)),
        0xdf => usize::try_from(u32::from_be_bytes(take(&mut rest)?)).ok()?,
        _ => return None,
    };
    let mut map = Map::new();
    for _ in 0..len {
        let key = read_str(&mut rest)?;
        let value = if rest.first() == Some(&MSGPACK_NIL) {
            rest = &rest[1..];
            ""
        } else {
            read_str(&mut rest)?
        };
        map.insert(key.into(), rhai::ImmutableString::from(value).into());
    }
    rest.is_empty().then_some(map)
}

/// A msgpack string (valid UTF-8) at the start of `rest`, which moves past it.
fn read_str<'a>(rest: &mut &'a [u8]) -> Option<&'a str> {
    let (&marker, tail) = rest.split_first()?;
    *rest = tail;
    let len = match marker {
        0xa0..=0xbf => usize::from(marker & 0x1f),
        0xd9 => usize::from(u8::from_be_bytes(take(rest)?)),
        0xda => usize::from(u16::from_be_bytes(take(rest)?)),
        0xdb => usize::try_from(u32::from_be_bytes(take(rest)?)).ok()?,
        _ => return None,
    };
    let (text, tail) = rest.split_at_checked(len)?;
    *rest = tail;
    std::str::from_utf8(text).ok()
}

/// The first `N` bytes of `rest`, which moves past them.
fn take<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = rest.split_first_chunk::<N>()?;
    *rest = tail;
    Some(*head)
}

/// Metadata of any shape: other values than strings become their text.
fn decode_any_metadata(raw: &[u8]) -> Result<Map, DecodeError> {
    let mut cursor = raw;
    let value =
        rmpv::decode::read_value(&mut cursor).map_err(|e| DecodeError::Metadata(e.to_string()))?;
    if !cursor.is_empty() {
        return Err(DecodeError::Metadata(format!(
            "{} trailing bytes after the map",
            cursor.len()
        )));
    }
    let rmpv::Value::Map(entries) = value else {
        return Err(DecodeError::Metadata(format!(
            "expected a map, got {value}"
        )));
    };
    let mut map = Map::new();
    for (k, v) in entries {
        let key = k
            .as_str()
            .ok_or_else(|| DecodeError::Metadata(format!("key {k} is not a string")))?;
        let text = match v {
            rmpv::Value::String(s) => s.into_str().unwrap_or_default(),
            rmpv::Value::Nil => String::new(),
            other => other.to_string(),
        };
        map.insert(key.into(), Dynamic::from(text));
    }
    Ok(map)
}

/// Encodes Watermill metadata, for publishers (`simulate`, the gateway,
/// the `redis_stream` sink) that speak the envelope.
pub fn encode_metadata(pairs: &[(&str, &str)]) -> Vec<u8> {
    let map = rmpv::Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (rmpv::Value::from(*k), rmpv::Value::from(*v)))
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).expect("writing to a Vec cannot fail");
    out
}

/// What a JSON value is, in words, for the errors that refuse it ("a
/// string is not a JSON object").
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Stream fields from literal pairs (also used by `replay`'s tests).
    pub(crate) fn f(pairs: &[(&str, &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn watermill_envelope() {
        let meta = encode_metadata(&[("source", "collector-1")]);
        let d = decode(&f(&[
            (WATERMILL_UUID, b"u-1"),
            (WATERMILL_METADATA, &meta),
            (
                WATERMILL_PAYLOAD,
                br#"{"hostname":"r1","input_errors":600}"#,
            ),
        ]))
        .unwrap();
        assert_eq!(d.uuid.as_deref(), Some("u-1"));
        assert_eq!(
            d.metadata["source"].clone().into_string().unwrap(),
            "collector-1"
        );
        let body = d.body.cast::<Map>();
        assert_eq!(body["input_errors"].as_int().unwrap(), 600);
    }

    /// The seed's first entry as Watermill wrote it
    /// (tests/fixtures/watermill/seed-publisher.jsonl), with the `metadata`
    /// field under test in place of its empty one (`None`: no field).
    fn seed_entry(metadata: Option<&[u8]>) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields = vec![(
            WATERMILL_UUID,
            b"bc8976a3-98a5-4177-a0a0-5baa42278cb9".as_slice(),
        )];
        if let Some(raw) = metadata {
            fields.push((WATERMILL_METADATA, raw));
        }
        fields.push((
            WATERMILL_PAYLOAD,
            br#"{"hostname":"dc-router-1","interface":"GigabitEthernet0/1/0","input_errors":0}"#,
        ));
        f(&fields)
    }

    fn assert_seed_reading_without_metadata(d: &Decoded) {
        assert!(d.metadata.is_empty(), "{:?}", d.metadata);
        assert_eq!(
            d.uuid.as_deref(),
            Some("bc8976a3-98a5-4177-a0a0-5baa42278cb9")
        );
        let body = d.body.clone().cast::<Map>();
        assert_eq!(
            body["hostname"].clone().into_string().unwrap(),
            "dc-router-1"
        );
        assert_eq!(body["input_errors"].as_int().unwrap(), 0);
    }

    #[test]
    fn empty_watermill_metadata_is_no_metadata() {
        let d = decode(&seed_entry(Some(b""))).unwrap();
        assert_seed_reading_without_metadata(&d);
    }

    #[test]
    fn nil_watermill_metadata_is_no_metadata() {
        let d = decode(&seed_entry(Some(&[0xc0]))).unwrap();
        assert_seed_reading_without_metadata(&d);
    }

    #[test]
    fn missing_watermill_metadata_is_no_metadata() {
        let d = decode(&seed_entry(None)).unwrap();
        assert_seed_reading_without_metadata(&d);
    }

    #[test]
    fn empty_msgpack_map_metadata_is_no_metadata() {
        let d = decode(&seed_entry(Some(&[0x80]))).unwrap();
        assert_seed_reading_without_metadata(&d);
    }

    #[test]
    fn watermill_metadata_set_by_the_publisher() {
        // The fixture's entry with metadata, byte for byte.
        let d = decode(&seed_entry(Some(b"\x81\xa6region\xa7eu-west"))).unwrap();
        assert_eq!(d.metadata.len(), 1);
        assert_eq!(
            d.metadata["region"].clone().into_string().unwrap(),
            "eu-west"
        );
    }

    #[test]
    fn only_an_empty_field_or_a_lone_nil_means_no_metadata() {
        for raw in [&[0xc0, 0xc0][..], &[0x20], b" ", &[0xa0]] {
            let err = decode(&seed_entry(Some(raw))).unwrap_err();
            assert!(matches!(err, DecodeError::Metadata(_)), "{raw:x?}: {err}");
        }
    }

    #[test]
    fn bare_scalar_payload_is_msg_value() {
        let value = |fields: &[(Vec<u8>, Vec<u8>)]| {
            let body = decode(fields).unwrap().body.cast::<Map>();
            assert_eq!(body.len(), 1, "{body:?}");
            body[BARE_VALUE].clone()
        };
        // The seed's transceiver reading, as Watermill wrote it.
        let seed = f(&[
            (WATERMILL_UUID, b"b761aedd-5b52-429b-bc6f-da1219a35248"),
            (WATERMILL_METADATA, b""),
            (WATERMILL_PAYLOAD, b"-41.5"),
        ]);
        assert_eq!(value(&seed).as_float().unwrap(), -41.5);
        assert_eq!(value(&f(&[("payload", b"-3.2")])).as_float().unwrap(), -3.2);
        assert_eq!(value(&f(&[("data", b" 42\n")])).as_int().unwrap(), 42);
        assert!(value(&f(&[("payload", b"true")])).as_bool().unwrap());
        assert_eq!(
            value(&f(&[("payload", br#""dark""#)]))
                .into_string()
                .unwrap(),
            "dark"
        );
        for (raw, got) in [(&b"null"[..], "null"), (b"[1,2]", "array")] {
            let err = decode(&f(&[(WATERMILL_UUID, b"u"), (WATERMILL_PAYLOAD, raw)])).unwrap_err();
            assert_eq!(
                err,
                DecodeError::NotObject {
                    field: "payload".into(),
                    got
                }
            );
        }
        // Text that is not JSON stays an error, not a string value.
        let err = decode(&f(&[("payload", b"dark")])).unwrap_err();
        assert!(matches!(err, DecodeError::Json { .. }), "{err}");
    }

    #[test]
    fn broken_msgpack_is_an_error() {
        let err = decode(&f(&[
            (WATERMILL_UUID, b"u"),
            (WATERMILL_METADATA, &[0xc1, 0xff]),
            (WATERMILL_PAYLOAD, b"{}"),
        ]))
        .unwrap_err();
        assert!(matches!(err, DecodeError::Metadata(_)), "{err}");
    }

    #[test]
    fn non_json_payload_names_field() {
        let err = decode(&f(&[
            (WATERMILL_UUID, b"u"),
            (WATERMILL_PAYLOAD, b"not json"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("`payload` is not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn single_data_field_and_non_object() {
        assert!(decode(&f(&[("data", br#"{"a":1}"#)])).is_ok());
        let err = decode(&f(&[("data", b"[1,2]")])).unwrap_err();
        assert!(matches!(err, DecodeError::NotObject { .. }));
    }

    #[test]
    fn flat_fields_parse_numbers() {
        let d = decode(&f(&[
            ("hostname", b"r1"),
            ("input_errors", b"600"),
            ("rx", b"-40.5"),
        ]))
        .unwrap();
        let m = d.body.cast::<Map>();
        assert_eq!(m["input_errors"].as_int().unwrap(), 600);
        assert_eq!(m["rx"].as_float().unwrap(), -40.5);
        assert_eq!(m["hostname"].clone().into_string().unwrap(), "r1");
        assert!(decode(&f(&[("name", b"inf")])).unwrap().body.cast::<Map>()["name"].is_string());
    }

    #[test]
    fn payload_keys_with_escapes_nesting_and_duplicates() {
        let d = decode(&f(&[(
            "payload",
            br#"{"a\u0062":1,"n":{"x":[1,"y"]},"d":1,"d":2}"#,
        )]))
        .unwrap();
        let m = d.body.cast::<Map>();
        assert_eq!(m["ab"].as_int().unwrap(), 1);
        assert_eq!(m["d"].as_int().unwrap(), 2, "last duplicate wins");
        let n = m["n"].clone().cast::<Map>();
        assert_eq!(n["x"].clone().into_array().unwrap().len(), 2);
    }

    #[test]
    fn metadata_read_in_place_as_rmpv_reads_it() {
        use rmpv::Value as V;
        let encode = |pairs: Vec<(V, V)>| {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &V::Map(pairs)).unwrap();
            out
        };
        let s = |t: &str| V::from(t);
        let many: Vec<(V, V)> = (0..20)
            .map(|i| (s(&format!("k{i}")), s(&"v".repeat(i * 20))))
            .collect();
        let in_place = [
            encode(vec![]),
            encode(vec![(s("source"), s("bench")), (s("name"), V::Nil)]),
            encode(vec![(s("d"), s("1")), (s("d"), s("2"))]),
            encode(many),
            // Longer forms than needed: str8, str32 and map32.
            vec![0x81, 0xd9, 1, b'a', 0xdb, 0, 0, 0, 1, b'b'],
            vec![0xdf, 0, 0, 0, 1, 0xa1, b'a', 0xa1, b'b'],
        ];
        let other = [
            encode(vec![(s("n"), V::from(5)), (s("b"), V::Boolean(true))]),
            encode(vec![(V::from(1), s("x"))]),
            vec![0x81, 0xa1, b'u', 0xa2, 0xff, b'a'],
            [encode(vec![(s("a"), s("b"))]), vec![0xc0]].concat(),
            vec![0x92, 0xa1, b'a', 0xa1, b'b'],
            vec![0x81, 0xa3, b'a'],
            vec![0xc1, 0xff],
        ];
        for raw in in_place.iter().chain(&other) {
            assert_eq!(
                format!("{:?}", decode_metadata(raw)),
                format!("{:?}", decode_any_metadata(raw)),
                "{raw:x?}"
            );
        }
        assert!(in_place.iter().all(|raw| read_string_map(raw).is_some()));
        assert!(other.iter().all(|raw| read_string_map(raw).is_none()));
    }

    #[test]
    fn empty_entry() {
        assert_eq!(decode(&[]).unwrap_err(), DecodeError::Empty);
    }
}
