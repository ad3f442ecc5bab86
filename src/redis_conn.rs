//! Redis connections: one place that knows about reply timeouts, reconnect
//! backoff and parsing the stream replies we read.
//!
//! redis-rs times out every reply after 500 ms by default, BLOCK included, so
//! each blocking reader gets its own connection with a timeout above its block
//! time; writes (XACK, XADD, claims) use another connection.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Value};
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// Where Redis is, plus how long a connection attempt may take.
#[derive(Clone)]
pub struct RedisTarget {
    client: Client,
    connect_timeout: Duration,
}

impl RedisTarget {
    pub fn new(url: &str, connect_timeout: Duration) -> Result<RedisTarget, RedisError> {
        Ok(RedisTarget {
            client: Client::open(url)?,
            connect_timeout,
        })
    }

    pub async fn connect(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(response_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

/// Exponential backoff with full jitter, capped; reset after a success.
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            attempt: 0,
            base,
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Half fixed, half random: spreads reconnect storms without ever
        // retrying immediately.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// A connection opened on first use and dropped after an error, so the next
/// use reconnects.
pub struct LazyConn {
    target: RedisTarget,
    response_timeout: Duration,
    conn: Option<MultiplexedConnection>,
}

impl LazyConn {
    pub fn new(target: RedisTarget, response_timeout: Duration) -> LazyConn {
        LazyConn {
            target,
            response_timeout,
            conn: None,
        }
    }

    pub async fn get(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            self.conn = Some(self.target.connect(self.response_timeout).await?);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Forget the connection after an error; its state is unknown.
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// Sleeps for the next backoff delay; false if shutdown came first.
pub async fn pause(backoff: &mut Backoff, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff.next_delay()) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Records an error from Redis: a server error reply is the command's fault,
/// anything else means Redis is unreachable.
pub fn note_error(what: &str, e: &RedisError) {
    if e.kind() == redis::ErrorKind::Client {
        // Raised by us (e.g. a batch that keeps conflicting): retried like a
        // Redis error, but Redis itself is fine.
        tracing::warn!(during = what, "{e}; retrying");
    } else if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        || e.code().is_some()
    {
        tracing::warn!(during = what, "Redis refused a command: {e}");
    } else {
        metrics::redis_unreachable(what, e);
    }
}

/// One stream entry as read from Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: String,
    /// `None` when the entry was deleted while pending (XREADGROUP and XCLAIM
    /// report such ids with no fields); it can only be acknowledged.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
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

/// Parses an XREADGROUP reply into (stream, entries) pairs; Nil (timeout)
/// gives nothing.
pub fn parse_read_reply(v: Value) -> Vec<(String, Vec<StreamEntry>)> {
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

/// XGROUP CREATE … MKSTREAM, treating "group already exists" as success.
pub async fn ensure_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    start_id: &str,
) -> Result<(), RedisError> {
    let created: Result<Value, RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(start_id)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// PINGs Redis every `every` until `shutdown`, so an outage is noticed (and
/// `/readyz` and `tripline_redis_up` follow it) even while every worker sits
/// in a blocking read and no message flows.
pub async fn watch_health(target: RedisTarget, every: Duration, shutdown: CancellationToken) {
    let mut conn = LazyConn::new(target, every);
    loop {
        let pong: Result<String, RedisError> = match conn.get().await {
            Ok(c) => redis::cmd("PING").query_async(c).await,
            Err(e) => Err(e),
        };
        match pong {
            Ok(_) => metrics::redis_reachable(),
            Err(e) => {
                note_error("health check", &e);
                conn.reset();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
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

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
    }
}
