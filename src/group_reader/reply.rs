//! The replies of the stream commands (XREADGROUP, XCLAIM, XRANGE, XPENDING,
//! XINFO GROUPS) from redis-rs's `Value` tree into the values the readers
//! use. The fast path ([`super::fast`]) parses XREADGROUP straight from
//! the bytes and must agree with [`parse_read_reply`] here.

use redis::Value;

use crate::redis_conn::{items, text};

/// One stream entry as read from Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: String,
    /// `None` when the entry was deleted while pending (XREADGROUP and XCLAIM
    /// report such ids with no fields); it can only be acknowledged.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// Parses a list of `[id, [field, value, …]]` entries (XRANGE, XCLAIM, one
/// stream of XREADGROUP).
pub fn parse_entries(v: Value) -> Vec<StreamEntry> {
    items(v)
        .into_iter()
        .filter_map(|e| {
            let mut parts = items(e).into_iter();
            let id = text(parts.next()?)?;
            let fields = match parts.next() {
                Some(Value::Nil) | None => None,
                Some(f) => {
                    let mut flat = items(f).into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        if let (Some(k), Some(v)) = (bytes(k), bytes(v)) {
                            pairs.push((k, v));
                        }
                    }
                    Some(pairs)
                }
            };
            Some(StreamEntry { id, fields })
        })
        .collect()
}

/// XREADGROUP's reply: the entries of each stream, in the order given.
pub type Batches = Vec<(String, Vec<StreamEntry>)>;

/// Parses an XREADGROUP reply into (stream, entries) pairs; Nil (timeout)
/// gives nothing.
pub fn parse_read_reply(v: Value) -> Batches {
    let per_stream: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        Value::Array(a) => a
            .into_iter()
            .filter_map(|s| {
                let mut p = items(s).into_iter();
                Some((p.next()?, p.next()?))
            })
            .collect(),
        _ => Vec::new(),
    };
    per_stream
        .into_iter()
        .filter_map(|(name, entries)| Some((text(name)?, parse_entries(entries))))
        .collect()
}

/// One row of the extended XPENDING form.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEntry {
    pub id: String,
    pub consumer: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

pub fn parse_pending(v: Value) -> Vec<PendingEntry> {
    items(v)
        .into_iter()
        .filter_map(|row| {
            let mut p = items(row).into_iter();
            let id = text(p.next()?)?;
            let consumer = text(p.next()?)?;
            let idle_ms = int(p.next()?)? as u64;
            let deliveries = int(p.next()?)? as u64;
            Some(PendingEntry {
                id,
                consumer,
                idle_ms,
                deliveries,
            })
        })
        .collect()
}

fn int(v: Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(i),
        other => text(other)?.parse().ok(),
    }
}

/// XINFO GROUPS → (group, pending, lag); lag is `None` on servers before
/// 7.0 and when Redis cannot compute it (entries deleted with XDEL).
pub fn parse_groups(v: Value) -> Vec<(String, i64, Option<i64>)> {
    items(v)
        .into_iter()
        .filter_map(|g| {
            let mut flat = items(g).into_iter();
            let (mut name, mut pending, mut lag) = (None, 0, None);
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                match text(k).as_deref() {
                    Some("name") => name = text(v),
                    Some("pending") => pending = int(v).unwrap_or(0),
                    Some("lag") => lag = int(v),
                    _ => {}
                }
            }
            Some((name?, pending, lag))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.into())
    }

    #[test]
    fn read_reply_with_deleted_entry() {
        let v = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("a"), bulk("1")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let r = parse_read_reply(v);
        assert_eq!(r[0].0, "s");
        assert_eq!(r[0].1[0].fields.as_ref().unwrap()[0].0, b"a");
        assert_eq!(r[0].1[1].fields, None);
        assert!(parse_read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn groups_with_and_without_lag() {
        let group = |name: &str, lag: Value| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("pending"),
                Value::Int(3),
                bulk("lag"),
                lag,
            ])
        };
        let v = Value::Array(vec![group("a", Value::Int(7)), group("b", Value::Nil)]);
        assert_eq!(
            parse_groups(v),
            vec![("a".to_string(), 3, Some(7)), ("b".to_string(), 3, None)]
        );
    }
}
