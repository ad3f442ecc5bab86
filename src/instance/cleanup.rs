//! Consumer housekeeping, as the seed did it: on an interval, consumers idle
//! longer than `consumer_cleanup.max_idle` with nothing pending are deleted
//! from the groups tripline reads (the subscriptions' groups and the sinks'
//! groups on the outboxes). Instances scaled away or renamed hosts otherwise
//! leave consumers behind forever.
//!
//! The check and the XGROUP DELCONSUMER run in one script, atomically: a
//! consumer that gets an entry between a separate check and the delete
//! would take that entry's pending record with it.

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerCleanup;
use crate::group_reader::groups as groups_of;
use crate::keys::SINK_GROUP_PREFIX;
use crate::metrics::Metrics;
use crate::redis_conn::{LazyConn, RedisTarget, note_error};

/// Deletes the consumers of group ARGV[1] on stream KEYS[1] idle at least
/// ARGV[2] ms with nothing pending, except those named in ARGV[3..] (this
/// instance's own). Returns their names; nothing when the group is missing.
const CLEANUP_SCRIPT: &str = r"
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers['err'] then return {} end
local removed = {}
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if not keep[f['name']] and f['pending'] == 0 and f['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
";

/// The groups to keep clean: each subscription's group on its streams,
/// and every sink's group on the outboxes.
pub struct Scope {
    /// (stream, group) of every subscription.
    pub subscriptions: Vec<(String, String)>,
    /// Outbox streams; their `tripline-sink:*` groups are found with XINFO
    /// GROUPS, so sinks added by a reload are covered.
    pub outboxes: Vec<String>,
    /// Consumer names this instance uses; never removed by it.
    pub own: Vec<String>,
}

/// Runs until `shutdown`; does nothing when `max_idle` is 0.
pub async fn run(
    target: RedisTarget,
    scope: Scope,
    policy: ConsumerCleanup,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    if policy.max_idle.is_zero() {
        return;
    }
    let mut conn = LazyConn::new(target);
    let script = redis::Script::new(CLEANUP_SCRIPT);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(policy.interval) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = sweep(&mut conn, &script, &scope, policy.max_idle, &metrics).await {
            note_error("removing idle consumers", &e);
            conn.reset();
        }
    }
}

async fn sweep(
    conn: &mut LazyConn,
    script: &redis::Script,
    scope: &Scope,
    max_idle: Duration,
    metrics: &Metrics,
) -> Result<(), RedisError> {
    let mut groups = scope.subscriptions.clone();
    for outbox in &scope.outboxes {
        // No outbox yet (no alert was ever raised there): no groups.
        groups.extend(
            groups_of(conn.get().await?, outbox)
                .await?
                .into_iter()
                .filter(|(g, _, _)| g.starts_with(SINK_GROUP_PREFIX))
                .map(|(g, _, _)| (outbox.clone(), g)),
        );
    }
    for (stream, group) in groups {
        let removed: Vec<String> = script
            .key(&stream)
            .arg(&group)
            .arg(max_idle.as_millis() as u64)
            .arg(&scope.own)
            .invoke_async(conn.get().await?)
            .await?;
        for consumer in removed {
            metrics.consumer_removed(&stream, &group, &consumer);
        }
    }
    Ok(())
}
