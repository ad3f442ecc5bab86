//! The one owner of alert state in Redis: the commit that hands alerts off,
//! the compare-and-set around it and its retry loop, and the reads of the
//! state. Workers, timers and reload each settle through [`Store::settle`].
//!
//! Alerts raised by a batch are appended to the outbox in the same atomic
//! step (one Lua script run) as the XACK of the entries that raised them,
//! together with any dead-letters and the alert-state writes the alerts
//! depend on. A crash therefore loses neither: either the entries are still
//! pending (and will be judged again) or their alerts are queued.
//!
//! The decisions are taken on this instance's cache ([`AlertBook`]) under
//! the partition's gate, and the commit checks what they rested on (the
//! partition's generation, or a version per alert). When another instance
//! wrote first, nothing is written: the decisions are rolled back, the
//! cache refreshed, and the decisions taken again.
//!
//! Keys are Redis Cluster-safe: everything in one commit hashes to the source
//! stream's slot (see [`crate::keys`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};

use super::{Action, Alert, AlertBook, Decision, Snapshot, Write};
use crate::clock::now_ms;
use crate::keys::{dead_key, gen_key, hash_tag, outbox_key, state_key};
use crate::metrics::Metrics;
use crate::redis_conn::{LazyConn, RedisConn, scan_hash};

/// How often a batch retries its lifecycle decisions when other instances
/// keep changing the same alerts, before giving up (the batch then stays
/// pending and is re-read, which counts as a delivery). High, because each
/// give-up brings the batch closer to `max_deliveries`; the growing random
/// pause between attempts (up to 0.1 s) breaks lockstep long before.
const MAX_CONFLICTS: u32 = 100;

/// An entry that goes to the dead-letter stream instead of the rules.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The entry's id in its stream, recorded so it can be found again.
    pub id: String,
    /// The entry as it came, so nothing is lost.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Why it was not judged, for whoever reads the dead letters.
    pub reason: String,
}

/// What one [`Store::settle`] decides and commits.
#[derive(Debug, Clone, Copy)]
pub enum Settlement<'a> {
    /// A judged batch of `stream`, read by `group`: the entries it
    /// acknowledges and dead-letters, and the alert assertions its messages
    /// raised, in message order.
    Batch {
        stream: &'a str,
        group: &'a str,
        acks: &'a [String],
        dead: &'a [DeadLetter],
        actions: &'a [Action],
    },
    /// The timer-driven transitions due now in partition `tag` (see
    /// [`AlertBook::due_in`]).
    Due { tag: &'a str },
    /// The alerts of `rules`, which no longer exist, in partition `tag`:
    /// forgotten, the firing ones resolved.
    Retire { tag: &'a str, rules: &'a [String] },
}

impl Settlement<'_> {
    /// The partition whose state is decided.
    fn tag(&self) -> &str {
        match self {
            Settlement::Batch { stream, .. } => hash_tag(stream),
            Settlement::Due { tag } | Settlement::Retire { tag, .. } => tag,
        }
    }

    /// How often the decisions are taken again when the state changed
    /// under them. A batch must be decided (its entries stay pending
    /// otherwise); timers and retiring decide again on their next round.
    fn attempts(&self) -> u32 {
        match self {
            Settlement::Batch { .. } => MAX_CONFLICTS,
            Settlement::Due { .. } | Settlement::Retire { .. } => 1,
        }
    }

    /// The decisions on the cache; `checks` adds a check-only write for
    /// every alert a decision to do nothing rested on.
    fn decide(&self, book: &AlertBook, checks: bool) -> Decision {
        match *self {
            Settlement::Batch {
                stream, actions, ..
            } => book.decide(stream, actions, checks),
            Settlement::Due { tag } => book.due_in(tag, now_ms()),
            Settlement::Retire { tag, rules } => book.forget_rules(tag, rules, now_ms()),
        }
    }

    /// The group, acks and dead letters the commit carries.
    fn messages(&self) -> (&str, &[String], &[DeadLetter]) {
        match *self {
            Settlement::Batch {
                group, acks, dead, ..
            } => (group, acks, dead),
            Settlement::Due { .. } | Settlement::Retire { .. } => ("", &[], &[]),
        }
    }
}

/// How a [`Store::settle`] ended.
#[derive(Debug, PartialEq)]
pub enum Settled {
    /// Committed; these notifications went to the outbox.
    Committed(Vec<Alert>),
    /// Other instances kept changing the same alerts: nothing was written
    /// and the cache holds what Redis holds, for the caller to decide again
    /// (a batch stays pending; timers and retiring try on their next round).
    Contended,
}

/// Alert state in Redis and this instance's cache of it; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// The cache decisions are taken on; the workers' processor shares it.
    book: Arc<AlertBook>,
    /// Outbox key prefix; see [`outbox_key`].
    outbox_prefix: String,
    /// Approximate cap of each outbox stream.
    outbox_max_len: u64,
}

impl Store {
    pub fn new(book: Arc<AlertBook>, outbox_prefix: String, outbox_max_len: u64) -> Store {
        Store {
            book,
            outbox_prefix,
            outbox_max_len,
        }
    }

    /// The engine's metrics, which its decisions count into.
    pub fn metrics(&self) -> &Metrics {
        self.book.metrics()
    }

    /// Partitions this instance holds state of.
    pub fn tags(&self) -> Vec<String> {
        self.book.tags()
    }

    /// Decides `s` on the cache and commits it with its acks and
    /// dead-letters, holding the partition's gate from decision to commit.
    /// When the partition's generation moved (someone else wrote), the
    /// decisions are taken again with a version check per alert. On a
    /// version conflict (another instance changed one of the alerts) those
    /// alerts are refreshed and the decisions taken again, after a short
    /// random pause that grows with each conflict (instances committing the
    /// same alerts in lockstep would otherwise keep colliding). A batch that
    /// raised no assertion is acknowledged without the gate.
    pub async fn settle(
        &self,
        conn: &mut LazyConn,
        s: Settlement<'_>,
    ) -> Result<Settled, RedisError> {
        let (group, acks, dead) = s.messages();
        if let Settlement::Batch {
            stream,
            actions: [],
            ..
        } = s
        {
            let commit = Commit {
                acks,
                dead,
                ..Commit::default()
            };
            self.commit(conn.get().await?, stream, group, &commit)
                .await?;
            return Ok(Settled::Committed(Vec::new()));
        }
        let book = &self.book;
        let tag = s.tag();
        let gate = book.gate(tag);
        let _decided = gate.lock().await;
        for attempt in 0..s.attempts() {
            let synced = book.synced(tag);
            let decision = s.decide(book, synced.is_none());
            // Timers and retiring commit to the stream that raised the
            // alerts; nothing to write, nothing to commit.
            let stream = match s {
                Settlement::Batch { stream, .. } => stream.to_string(),
                Settlement::Due { .. } | Settlement::Retire { .. } => {
                    match decision.writes.first() {
                        Some(w) => w.stream.clone(),
                        None => return Ok(Settled::Committed(Vec::new())),
                    }
                }
            };
            let c = match conn.get().await {
                Ok(c) => c,
                Err(e) => {
                    book.rollback(tag, decision.undo);
                    return Err(e);
                }
            };
            let commit = Commit {
                acks,
                alerts: &decision.notifications,
                dead,
                writes: &decision.writes,
                basis: synced.map_or(Basis::Versions, Basis::Generation),
            };
            match self.commit(c, &stream, group, &commit).await {
                Ok(Committed::Done { found, generation }) => {
                    book.committed(tag, synced, found..=generation, &decision.writes);
                    return Ok(Settled::Committed(decision.notifications));
                }
                Ok(Committed::Stale) => {
                    book.rollback(tag, decision.undo);
                    book.unsync(tag);
                    book.metrics().state_redecided(&stream, "stale");
                }
                Ok(Committed::Conflict(fields)) => {
                    book.rollback(tag, decision.undo);
                    book.metrics().state_redecided(&stream, "conflict");
                    let pause = Duration::from_millis(u64::from(attempt)).mul_f64(rand::random());
                    tokio::time::sleep(pause).await;
                    let fresh = read_state(conn.get().await?, &stream, &fields).await?;
                    book.refresh(tag, fresh);
                }
                Err(e) => {
                    book.rollback(tag, decision.undo);
                    book.unsync(tag);
                    return Err(e);
                }
            }
        }
        Ok(Settled::Contended)
    }

    /// Forgets the alerts of `rules` in partition `tag` on this instance
    /// only, when their retirement could not be written to Redis; returns
    /// the resolves that were therefore never sent.
    pub async fn forget_here(&self, tag: &str, rules: &[String]) -> Vec<Alert> {
        let gate = self.book.gate(tag);
        let _decided = gate.lock().await;
        let forgotten = self.book.forget_rules(tag, rules, now_ms()).notifications;
        // The cache no longer equals Redis: the next full read must happen.
        self.book.unsync(tag);
        forgotten
    }

    /// Reads every partition of `streams` whole into the cache: picks up
    /// alerts other instances raised (so this instance's timers cover them)
    /// and forgets deleted ones. The generation is read under the
    /// partition's gate before and again after: equal, or moved by this
    /// instance's own commits alone, and the cache is known to equal Redis
    /// from then on (see `alert::book`). A partition already known to equal
    /// Redis at the generation Redis still holds is not read again, unless
    /// `every_partition`.
    pub async fn load(
        &self,
        conn: &mut LazyConn,
        streams: &[String],
        every_partition: bool,
    ) -> Result<(), RedisError> {
        let book = &self.book;
        for (tag, stream) in partitions(streams) {
            let gate = book.gate(&tag);
            let before = {
                let _decided = gate.lock().await;
                let before = read_gen(conn.get().await?, &stream).await?;
                if !every_partition && book.synced(&tag) == Some(before) {
                    continue;
                }
                book.begin_read(&tag);
                before
            };
            let read = async {
                let fields = scan_hash(conn.get().await?, &state_key(&stream)).await?;
                let snapshot = Snapshot::decode(&fields);
                drop(fields);
                let decided = gate.lock().await;
                let after = read_gen(conn.get().await?, &stream).await?;
                Ok::<_, RedisError>((snapshot, decided, after))
            };
            match read.await {
                Ok((snapshot, decided, after)) => {
                    let replaced = book.load_partition(&tag, snapshot, before, after);
                    drop(decided);
                    drop(replaced);
                }
                Err(e) => {
                    book.read_failed(&tag);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Commits one batch of `stream` (or, with no acks, a timer's decisions).
    async fn commit(
        &self,
        conn: &mut RedisConn,
        stream: &str,
        group: &str,
        s: &Commit<'_>,
    ) -> Result<Committed, RedisError> {
        let checks_generation = matches!(s.basis, Basis::Generation(_));
        if s.alerts.is_empty() && s.dead.is_empty() && s.writes.is_empty() && !checks_generation {
            if !s.acks.is_empty() {
                let _: Value = redis::cmd("XACK")
                    .arg(stream)
                    .arg(group)
                    .arg(s.acks)
                    .query_async(conn)
                    .await?;
            }
            return Ok(Committed::Done {
                found: 0,
                generation: 0,
            });
        }
        let based = match s.basis {
            Basis::Generation(g) => g.to_string(),
            Basis::Nothing | Basis::Versions => String::new(),
        };
        // Below 2^62, so INCR never overflows.
        let seed = rand::random::<u64>() >> 2;
        let mut inv = script().prepare_invoke();
        inv.key(state_key(stream))
            .key(outbox_key(&self.outbox_prefix, stream))
            .key(dead_key(stream, conn.is_cluster()))
            .key(stream)
            .key(gen_key(stream))
            .arg(group)
            .arg(self.outbox_max_len)
            .arg(based)
            .arg(seed)
            .arg(s.writes.len());
        for w in s.writes {
            // `=`: check only; ``: delete; else the new value (which starts
            // with its version digits, so neither marker can collide).
            let op = if w.check_only {
                "="
            } else {
                w.value.as_deref().unwrap_or("")
            };
            inv.arg(&w.field).arg(w.expected).arg(op);
        }
        inv.arg(s.alerts.len());
        for a in s.alerts {
            inv.arg(serde_json::to_string(a).expect("alerts always serialize"));
        }
        inv.arg(s.dead.len());
        for d in s.dead {
            inv.arg(&d.id).arg(&d.reason).arg(d.fields.len());
            for (k, v) in &d.fields {
                inv.arg(k.as_slice()).arg(v.as_slice());
            }
        }
        inv.arg(s.acks.len());
        for id in s.acks {
            inv.arg(id);
        }
        let reply: Vec<String> = inv.invoke_async(conn).await?;
        match reply.split_first() {
            Some((tag, fields)) if tag == "conflict" => Ok(Committed::Conflict(fields.to_vec())),
            Some((tag, _)) if tag == "stale" => Ok(Committed::Stale),
            Some((_, [generation, found])) => Ok(Committed::Done {
                found: found.parse().unwrap_or(0),
                generation: generation.parse().unwrap_or(0),
            }),
            _ => Ok(Committed::Done {
                found: 0,
                generation: 0,
            }),
        }
    }
}

/// One representative stream per hash tag: they share a state hash.
fn partitions(streams: &[String]) -> BTreeMap<String, String> {
    streams
        .iter()
        .map(|s| (hash_tag(s).to_string(), s.clone()))
        .collect()
}

/// What the lifecycle decisions of a commit rested on, and so what the
/// commit checks before writing anything.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Basis {
    /// No decision: nothing to check.
    #[default]
    Nothing,
    /// The version of each alert in `writes` (check-only writes included).
    Versions,
    /// The whole cached partition, known to equal Redis at this generation:
    /// nobody else may have written since.
    Generation(u64),
}

/// Everything one commit writes for one stream.
#[derive(Debug, Default)]
struct Commit<'a> {
    acks: &'a [String],
    alerts: &'a [Alert],
    dead: &'a [DeadLetter],
    /// Versioned alert-state writes the alerts depend on.
    writes: &'a [Write],
    basis: Basis,
}

/// How a commit ended.
#[derive(Debug, PartialEq)]
enum Committed {
    /// Written; the partition's generation was `found` (0: absent) and is
    /// now `generation` (both 0 when the commit was a plain XACK that
    /// neither read nor wrote the alert state). A first write seeds the
    /// generation at random: only `found` tells a full read under way
    /// that the step from it was this commit's.
    Done { found: u64, generation: u64 },
    /// Another instance changed these state fields since we read them;
    /// nothing was written.
    Conflict(Vec<String>),
    /// The partition's generation moved away from [`Basis::Generation`]:
    /// someone else wrote; nothing was written.
    Stale,
}

/// Checks the partition generation or the state versions, then writes
/// state, alerts and dead-letters and acknowledges — all or nothing, in one
/// script run. A counter that starts over (a Redis that lost its data)
/// starts from a random seed, so an old generation cannot come back.
const COMMIT_SCRIPT: &str = r"
local state, outbox, dead, stream, gen_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, maxlen, based, seed = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local gen = redis.call('GET', gen_key) or '0'
local found = gen
if based ~= '' and based ~= gen then return {'stale'} end
local i = 5
local ncas = tonumber(ARGV[i]); i = i + 1
if based == '' then
  local conflicts = {}
  for c = 1, ncas do
    local cur = redis.call('HGET', state, ARGV[i])
    local ver = 0
    if cur then ver = tonumber(string.match(cur, '^(%d+)|')) or 0 end
    if ver ~= tonumber(ARGV[i + 1]) then conflicts[#conflicts + 1] = ARGV[i] end
    i = i + 3
  end
  if #conflicts > 0 then
    table.insert(conflicts, 1, 'conflict')
    return conflicts
  end
end
i = 6
local wrote = false
for c = 1, ncas do
  if ARGV[i + 2] == '' then
    redis.call('HDEL', state, ARGV[i])
    wrote = true
  elseif ARGV[i + 2] ~= '=' then
    redis.call('HSET', state, ARGV[i], ARGV[i + 2])
    wrote = true
  end
  i = i + 3
end
if wrote then
  if gen == '0' then redis.call('SET', gen_key, seed) end
  redis.call('INCR', gen_key)
  gen = redis.call('GET', gen_key)
end
local nnotes = tonumber(ARGV[i]); i = i + 1
for n = 1, nnotes do
  redis.call('XADD', outbox, 'MAXLEN', '~', maxlen, '*', 'alert', ARGV[i])
  i = i + 1
end
local ndead = tonumber(ARGV[i]); i = i + 1
for d = 1, ndead do
  local nf = tonumber(ARGV[i + 2])
  local args = {'XADD', dead, '*', 'tripline_source_stream', stream, 'tripline_source_id',
    ARGV[i], 'tripline_group', group, 'tripline_reason', ARGV[i + 1]}
  i = i + 3
  for f = 1, nf * 2 do
    args[#args + 1] = ARGV[i]
    i = i + 1
  end
  redis.call(unpack(args))
end
local nacks = tonumber(ARGV[i]); i = i + 1
local ids = {}
for a = 1, nacks do
  ids[#ids + 1] = ARGV[i]
  i = i + 1
  if #ids == 500 or a == nacks then
    redis.call('XACK', stream, group, unpack(ids))
    ids = {}
  end
end
return {'done', gen, found}
";

fn script() -> &'static redis::Script {
    static S: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    S.get_or_init(|| redis::Script::new(COMMIT_SCRIPT))
}

/// Reads the generation of the alert state of `stream` (0 = never written).
async fn read_gen(conn: &mut RedisConn, stream: &str) -> Result<u64, RedisError> {
    let generation: Option<u64> = redis::cmd("GET")
        .arg(gen_key(stream))
        .query_async(conn)
        .await?;
    Ok(generation.unwrap_or(0))
}

/// Current values of alert-state fields (after a conflict).
async fn read_state(
    conn: &mut RedisConn,
    stream: &str,
    fields: &[String],
) -> Result<Vec<(String, Option<String>)>, RedisError> {
    if fields.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(state_key(stream))
        .arg(fields)
        .query_async(conn)
        .await?;
    Ok(fields.iter().cloned().zip(values).collect())
}
