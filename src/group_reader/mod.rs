//! The one consumer-group reader, used by the subscriptions (the streams the
//! rules judge) and the sink lanes (the outboxes) alike.
//!
//! Every reader has its own consumer name, so on start and after every Redis
//! error it first re-reads *its own* pending entries (id `0`, then the last
//! id seen per stream) before new ones (`>`): nobody else is working on them,
//! and they were read but never acknowledged. What one member of a group does
//! besides reading (delivery counts, claims, positions) is in [`member`]; the
//! socket the blocking reads go over, in [`fast`].

pub mod fast;
pub mod member;
pub mod reply;

use std::collections::HashMap;
use std::time::Duration;

use redis::RedisError;

pub use member::{Claimed, Delivered, Member, ensure_group, groups, position};
pub use reply::{Batches, StreamEntry};

use crate::redis_conn::RedisTarget;
use fast::ReadConn;

/// Reads one set of streams (those one XREADGROUP may name, see
/// [`RedisTarget::read_groups`]) as one consumer of one group.
pub struct GroupReader {
    /// The group and our consumer name in it.
    member: Member,
    /// The streams every read names, in the order given.
    streams: Vec<String>,
    /// Entries per stream per read: the batch size.
    count: usize,
    /// How long a read of new entries waits for one.
    block: Duration,
    /// The blocking reads' own connection, so a BLOCK never holds up a
    /// write; the fast path where the target allows.
    conn: ReadConn,
    /// While re-reading our own pending entries: the last id seen per stream
    /// still being drained. Empty once all are drained.
    draining: HashMap<String, String>,
    /// New entries read while the previous (full) batch was being handled
    /// ([`GroupReader::read_ahead`]), so the caller never waits for a read's
    /// round trip while there is a backlog. Its entries are in our pending
    /// list: dropped (after an error, or when a stream is drained again),
    /// they are read again by a drain.
    ahead: Option<Batches>,
}

/// What one read returned.
pub struct Read {
    /// The entries of each stream that had some.
    pub batches: Batches,
    /// Re-read from our own pending list rather than new: each has been
    /// delivered before ([`Member::deliveries`] tells how often).
    pub redelivered: bool,
}

impl GroupReader {
    pub fn new(
        target: &RedisTarget,
        member: Member,
        streams: Vec<String>,
        count: usize,
        block: Duration,
    ) -> GroupReader {
        // Above the BLOCK time, so a quiet stream is not taken for a dead
        // connection.
        let read_timeout = block + Duration::from_secs(2).max(block / 2);
        let draining = all_from_start(&streams);
        let conn = ReadConn::new(
            target,
            read_timeout,
            streams.first().map_or("", String::as_str),
        );
        GroupReader {
            member,
            streams,
            count,
            block,
            conn,
            draining,
            ahead: None,
        }
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    pub fn streams(&self) -> &[String] {
        &self.streams
    }

    /// The next entries for us: our own pending ones while any are left,
    /// else what was read ahead, else new ones, waiting up to the block time
    /// for them when `block`.
    pub async fn read(&mut self, block: bool) -> Result<Read, RedisError> {
        if self.draining.is_empty() {
            let batches = match self.ahead.take() {
                Some(batches) => batches,
                None => self.read_new(block).await?,
            };
            return Ok(Read {
                batches: non_empty(batches),
                redelivered: false,
            });
        }
        let (streams, ids): (Vec<String>, Vec<String>) = self
            .draining
            .iter()
            .map(|(s, id)| (s.clone(), id.clone()))
            .unzip();
        let batches = self.conn.read(&self.command(&streams, &ids, false)).await?;
        for stream in &streams {
            match batches.iter().find(|(s, _)| s == stream) {
                Some((_, entries)) if !entries.is_empty() => {
                    let last = entries.last().expect("not empty").id.clone();
                    self.draining.insert(stream.clone(), last);
                }
                _ => {
                    self.draining.remove(stream);
                }
            }
        }
        Ok(Read {
            batches: non_empty(batches),
            redelivered: true,
        })
    }

    /// New entries, without waiting for any: the rest of a burst.
    pub async fn read_more(&mut self) -> Result<Batches, RedisError> {
        self.read_new(false).await
    }

    /// Reads new entries now for the next [`GroupReader::read`] to return,
    /// while the caller still handles the previous batch.
    pub async fn read_ahead(&mut self) -> Result<(), RedisError> {
        self.ahead = Some(self.read_new(true).await?);
        Ok(())
    }

    /// What was read ahead and not returned yet: at shutdown, handled now
    /// rather than left pending.
    pub fn take_ahead(&mut self) -> Option<Read> {
        self.ahead.take().map(|batches| Read {
            batches: non_empty(batches),
            redelivered: false,
        })
    }

    /// Re-reads our pending entries of `stream` before anything new: a
    /// batch of it was left unacknowledged. Drops what was read ahead.
    pub fn redrain(&mut self, stream: String) {
        self.draining.insert(stream, "0".to_string());
        self.ahead = None;
    }

    /// After an error: the connection's state is unknown, and what was read
    /// may not have been handled, so everything is drained again.
    pub fn reset(&mut self) {
        self.conn.reset();
        self.draining = all_from_start(&self.streams);
        self.ahead = None;
    }

    async fn read_new(&mut self, block: bool) -> Result<Batches, RedisError> {
        let ids = vec![">".to_string(); self.streams.len()];
        let cmd = self.command(&self.streams, &ids, block);
        self.conn.read(&cmd).await
    }

    fn command(&self, streams: &[String], ids: &[String], block: bool) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.member.group)
            .arg(&self.member.consumer)
            .arg("COUNT")
            .arg(self.count);
        if block {
            cmd.arg("BLOCK").arg(self.block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(streams).arg(ids);
        cmd
    }
}

fn all_from_start(streams: &[String]) -> HashMap<String, String> {
    streams
        .iter()
        .map(|s| (s.clone(), "0".to_string()))
        .collect()
}

fn non_empty(mut batches: Batches) -> Batches {
    batches.retain(|(_, entries)| !entries.is_empty());
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_conn::RedisEndpoint;

    fn reader() -> GroupReader {
        let endpoint = RedisEndpoint::parse("127.0.0.1:1").unwrap();
        let target = RedisTarget::new(&endpoint, Duration::from_secs(1)).unwrap();
        let member = Member {
            group: "g".into(),
            consumer: "c".into(),
        };
        let streams = vec!["a".to_string(), "b".to_string()];
        GroupReader::new(&target, member, streams, 10, Duration::from_millis(500))
    }

    fn args(cmd: &redis::Cmd) -> String {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<not a plain argument>".into(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn only_reads_of_new_entries_wait() {
        let r = reader();
        let streams = r.streams().to_vec();
        assert_eq!(
            args(&r.command(&streams, &[">".into(), ">".into()], true)),
            "XREADGROUP GROUP g c COUNT 10 BLOCK 500 STREAMS a b > >"
        );
        assert_eq!(
            args(&r.command(&streams[..1], &["0".into()], false)),
            "XREADGROUP GROUP g c COUNT 10 STREAMS a 0"
        );
    }

    #[test]
    fn a_stream_drained_again_drops_what_was_read_ahead() {
        let mut r = reader();
        assert_eq!(
            r.draining.len(),
            2,
            "a new reader drains every stream first"
        );
        r.draining.clear();
        r.ahead = Some(vec![("a".into(), Vec::new())]);
        r.redrain("b".into());
        assert_eq!(r.draining.get("b").map(String::as_str), Some("0"));
        assert!(r.take_ahead().is_none());
        r.ahead = Some(Vec::new());
        r.reset();
        assert_eq!(r.draining.len(), 2);
        assert!(r.ahead.is_none());
    }
}
