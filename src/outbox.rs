//! The alert hand-off: alerts raised by a batch are appended to the outbox in
//! the same atomic step (one Lua script run) as the XACK of the entries that
//! raised them, together with any dead-letters and the alert-state writes
//! the alerts depend on. A crash therefore loses neither: either the entries
//! are still pending (and will be judged again) or their alerts are queued.
//!
//! Keys are Redis Cluster-safe: everything in one commit hashes to the source
//! stream's slot.

use redis::{RedisError, Value};

use crate::alert::{Alert, Write};
use crate::keys::{dead_key, gen_key, outbox_key, state_key};
use crate::redis_conn::RedisConn;

/// An entry that goes to the dead-letter stream instead of the rules.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub reason: String,
}

/// What the lifecycle decisions of a commit rested on, and so what the
/// commit checks before writing anything.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Basis {
    /// No decision: nothing to check.
    #[default]
    Nothing,
    /// The version of each alert in `writes` (check-only writes included).
    Versions,
    /// The whole cached partition, known to equal Redis at this generation:
    /// nobody else may have written since.
    Generation(u64),
}

/// Everything one batch settles for one stream.
#[derive(Debug, Default)]
pub struct Settlement<'a> {
    pub acks: &'a [String],
    pub alerts: &'a [Alert],
    pub dead: &'a [DeadLetter],
    /// Versioned alert-state writes the alerts depend on.
    pub writes: &'a [Write],
    pub basis: Basis,
}

/// How a commit ended.
#[derive(Debug, PartialEq)]
pub enum Committed {
    /// Written; the partition's generation is now this (0 when the commit
    /// was a plain XACK that neither read nor wrote the alert state).
    Done(u64),
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
return {'done', gen}
";

fn script() -> &'static redis::Script {
    static S: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    S.get_or_init(|| redis::Script::new(COMMIT_SCRIPT))
}

/// Commits one batch of `stream` (or, with no acks, a timer's decisions).
pub async fn commit(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
    outbox_prefix: &str,
    outbox_max_len: u64,
    s: &Settlement<'_>,
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
        return Ok(Committed::Done(0));
    }
    let based = match s.basis {
        Basis::Generation(g) => g.to_string(),
        Basis::Nothing | Basis::Versions => String::new(),
    };
    // Below 2^62, so INCR never overflows.
    let seed = rand::random::<u64>() >> 2;
    let mut inv = script().prepare_invoke();
    inv.key(state_key(stream))
        .key(outbox_key(outbox_prefix, stream))
        .key(dead_key(stream, conn.is_cluster()))
        .key(stream)
        .key(gen_key(stream))
        .arg(group)
        .arg(outbox_max_len)
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
        Some((_, [generation])) => Ok(Committed::Done(generation.parse().unwrap_or(0))),
        _ => Ok(Committed::Done(0)),
    }
}

/// Reads the generation of the alert state of `stream` (0 = never written).
pub async fn read_gen(conn: &mut RedisConn, stream: &str) -> Result<u64, RedisError> {
    let generation: Option<u64> = redis::cmd("GET")
        .arg(gen_key(stream))
        .query_async(conn)
        .await?;
    Ok(generation.unwrap_or(0))
}

/// Current values of alert-state fields (after a conflict).
pub async fn read_state(
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
