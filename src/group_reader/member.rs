//! What one consumer of a group does besides reading: learn how often an
//! entry was delivered, claim entries other consumers left behind, and see
//! how far the group is behind its stream.

use std::collections::HashMap;

use redis::{RedisError, Value};

use super::reply::{parse_entries, parse_groups, parse_pending};
use super::{Read, StreamEntry};
use crate::redis_conn::{LazyConn, RedisConn};

/// A consumer in a group: who reads, claims and acknowledges.
#[derive(Debug, Clone)]
pub struct Member {
    /// The consumer group, shared by every instance.
    pub group: String,
    /// Our name in it, unique among live consumers: the pending entries
    /// under it are ours alone to re-read.
    pub consumer: String,
}

/// An entry handed to us, with which delivery of it this is.
#[derive(Debug)]
pub struct Delivered {
    /// What acknowledges it.
    pub id: String,
    /// See [`StreamEntry::fields`].
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// 1 for a first delivery; what decides when an entry is dead-lettered.
    pub deliveries: u64,
}

/// Entries taken over from another consumer by [`Member::claim_idle`].
pub struct Claimed {
    /// Now pending under us, each counting this delivery.
    pub entries: Vec<Delivered>,
    /// The consumer the first of them was pending under, for the log.
    pub from: String,
    /// As many as asked for: more may be waiting.
    pub full: bool,
}

impl Member {
    /// The entries of `read`, each with which delivery of it this is: the
    /// first for new entries, from XPENDING for those re-read from our own
    /// pending list.
    pub async fn deliveries(
        &self,
        write: &mut LazyConn,
        read: Read,
    ) -> Result<Vec<(String, Vec<Delivered>)>, RedisError> {
        let mut delivered = Vec::with_capacity(read.batches.len());
        for (stream, entries) in read.batches {
            let counts = if read.redelivered {
                self.delivery_counts(write.get().await?, &stream, &entries)
                    .await?
            } else {
                HashMap::new()
            };
            let entries = entries
                .into_iter()
                .map(|e| Delivered {
                    deliveries: counts.get(&e.id).copied().unwrap_or(1),
                    id: e.id,
                    fields: e.fields,
                })
                .collect();
            delivered.push((stream, entries));
        }
        Ok(delivered)
    }

    /// Delivery counts of entries re-read from our own pending list.
    async fn delivery_counts(
        &self,
        conn: &mut RedisConn,
        stream: &str,
        entries: &[StreamEntry],
    ) -> Result<HashMap<String, u64>, RedisError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let reply: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&self.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(entries.len())
            .arg(&self.consumer)
            .query_async(conn)
            .await?;
        Ok(parse_pending(reply)
            .into_iter()
            .map(|p| (p.id, p.deliveries))
            .collect())
    }

    /// Takes over up to `count` entries of `stream` idle at least `min_idle`
    /// ms under any consumer (theirs is dead or stuck). `None` when there are
    /// none, or the group is gone (Redis restarted empty: the readers
    /// recreate it, and nothing is pending).
    pub async fn claim_idle(
        &self,
        conn: &mut LazyConn,
        stream: &str,
        min_idle: u64,
        count: usize,
    ) -> Result<Option<Claimed>, RedisError> {
        let reply: Result<Value, RedisError> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&self.group)
            .arg("IDLE")
            .arg(min_idle)
            .arg("-")
            .arg("+")
            .arg(count)
            .query_async(conn.get().await?)
            .await;
        let stale = match reply {
            Ok(v) => parse_pending(v),
            Err(e) if e.code() == Some("NOGROUP") => return Ok(None),
            Err(e) => return Err(e),
        };
        if stale.is_empty() {
            return Ok(None);
        }
        let counts: HashMap<String, u64> =
            stale.iter().map(|p| (p.id.clone(), p.deliveries)).collect();
        let reply: Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(min_idle)
            .arg(stale.iter().map(|p| p.id.as_str()).collect::<Vec<_>>())
            .query_async(conn.get().await?)
            .await?;
        let entries: Vec<Delivered> = parse_entries(reply)
            .into_iter()
            .map(|e| Delivered {
                deliveries: counts.get(&e.id).copied().unwrap_or(0) + 1,
                id: e.id,
                fields: e.fields,
            })
            .collect();
        if entries.is_empty() {
            return Ok(None);
        }
        Ok(Some(Claimed {
            entries,
            full: stale.len() >= count,
            from: stale.into_iter().next().expect("not empty").consumer,
        }))
    }

    /// The other consumers of the group on `stream` that have entries
    /// pending; none when the group does not exist.
    pub async fn others_pending(
        &self,
        conn: &mut RedisConn,
        stream: &str,
    ) -> Result<Vec<String>, RedisError> {
        let reply: Result<Vec<HashMap<String, Value>>, RedisError> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(&self.group)
            .query_async(conn)
            .await;
        let consumers = match reply {
            Ok(c) => c,
            Err(e) if e.code() == Some("NOGROUP") => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut others = Vec::new();
        for c in consumers {
            let name: String = match c.get("name").map(redis::from_redis_value_ref) {
                Some(Ok(n)) => n,
                _ => continue,
            };
            let pending: i64 = match c.get("pending").map(redis::from_redis_value_ref) {
                Some(Ok(p)) => p,
                _ => 0,
            };
            if name != self.consumer && pending > 0 {
                others.push(name);
            }
        }
        Ok(others)
    }

    /// Moves every entry pending under `from` on `stream` to us, `batch` per
    /// round trip, without reading them: a re-read of our own pending list
    /// then delivers them. Returns how many moved.
    pub async fn adopt(
        &self,
        conn: &mut LazyConn,
        stream: &str,
        from: &str,
        batch: usize,
    ) -> Result<usize, RedisError> {
        let mut taken = 0;
        loop {
            let rows: Value = redis::cmd("XPENDING")
                .arg(stream)
                .arg(&self.group)
                .arg("-")
                .arg("+")
                .arg(batch)
                .arg(from)
                .query_async(conn.get().await?)
                .await?;
            let ids: Vec<String> = parse_pending(rows).into_iter().map(|p| p.id).collect();
            if ids.is_empty() {
                return Ok(taken);
            }
            let claimed: Vec<String> = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&ids)
                .arg("JUSTID")
                .query_async(conn.get().await?)
                .await?;
            taken += claimed.len();
            // Entries trimmed from the stream are dropped from the pending
            // list without being returned: stop when a round makes no
            // progress or the list is exhausted.
            if claimed.is_empty() || ids.len() < batch {
                return Ok(taken);
            }
        }
    }
}

/// XGROUP CREATE … MKSTREAM, treating "group already exists" as success.
pub async fn ensure_group(
    conn: &mut RedisConn,
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

/// XINFO GROUPS of `stream`: each group's name, pending count and lag (see
/// [`parse_groups`]). None when Redis refuses, as it does for a stream that
/// does not exist yet.
pub async fn groups(
    conn: &mut RedisConn,
    stream: &str,
) -> Result<Vec<(String, i64, Option<i64>)>, RedisError> {
    let reply: Result<Value, RedisError> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    match reply {
        Ok(v) => Ok(parse_groups(v)),
        Err(e) if e.code().is_some() => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// How far `group` is behind on `stream`: entries pending (read, not
/// acknowledged) and lag (not read yet); `None` when the group is not there.
pub async fn position(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
) -> Result<Option<(i64, Option<i64>)>, RedisError> {
    Ok(groups(conn, stream)
        .await?
        .into_iter()
        .find(|(g, _, _)| g == group)
        .map(|(_, pending, lag)| (pending, lag)))
}
