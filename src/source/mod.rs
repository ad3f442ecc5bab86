//! The consumer side: per subscription, `concurrency` worker loops (read a
//! batch, judge it on a blocking thread, commit it), one claimer that takes
//! over entries abandoned by dead consumers, and a reporter of pending/lag.
//!
//! Every worker has its own consumer name (`<instance>-w<i>`), so on start or
//! after a Redis error it can safely re-read *its own* pending entries (id
//! `0`) before new ones (`>`): nobody else is working on them.

pub mod cleanup;
pub mod lease;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};
use tokio_util::sync::CancellationToken;

use crate::alert::Action;
use crate::alert::store::{DeadLetter, Settled, Settlement, Store};
use crate::config::Subscription;
use crate::metrics;
use crate::process::{Input, LoadedRules, Processor, Verdict, now_ms};
use crate::redis_conn::{
    self, Backoff, LazyConn, RedisConn, RedisTarget, StreamEntry, ensure_group, note_error,
    parse_entries, parse_groups, parse_pending, pause,
};
use crate::stream_reader::{Batches, ReadConn};

/// Reply timeout of connections that never block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What every loop of every subscription shares.
pub struct Shared {
    pub processor: Processor,
    pub target: RedisTarget,
    /// Where each batch's outcome and alert decisions are committed.
    pub store: Store,
}

/// An entry handed to us, with which delivery of it this is.
struct Delivered {
    id: String,
    fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    deliveries: u64,
}

/// The judged batch of one stream, ready for the lifecycle and the commit.
struct Judged {
    acks: Vec<String>,
    dead: Vec<DeadLetter>,
    /// Alert assertions of the whole batch, in message order.
    actions: Vec<Action>,
    processed: u64,
    dropped: u64,
    errored: u64,
}

fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// One read/judge/commit loop. Returns when `shutdown` fires, after the
/// batch in hand (and one read ahead, if any) is committed.
pub async fn run_worker(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    consumer: String,
    shutdown: CancellationToken,
) {
    let read_timeout = sub.block + Duration::from_secs(2).max(sub.block / 2);
    let mut read = ReadConn::new(&shared.target, read_timeout);
    let mut write = LazyConn::new(shared.target.clone(), WRITE_TIMEOUT);
    let mut backoff = backoff();
    let mut state = WorkerState {
        groups_ready: false,
        draining: initial_drain(&sub),
        ahead: None,
    };
    tracing::debug!(subscription = %sub.name, consumer, "worker started");
    while !shutdown.is_cancelled() {
        match worker_step(&shared, &sub, &consumer, &mut read, &mut write, &mut state).await {
            Ok(()) => {
                if backoff.attempts() > 0 {
                    redis_conn::check_health_now();
                    backoff.reset();
                }
            }
            Err(e) => {
                note_error(&format!("subscription {}", sub.name), &e);
                read.reset();
                write.reset();
                state.reset(&sub);
                if !pause(&mut backoff, &shutdown).await {
                    break;
                }
            }
        }
    }
    if let Some(batches) = state.ahead.take() {
        // Read before the shutdown: judged now rather than left pending.
        if let Err(e) = settle_batches(&shared, &sub, batches, &mut write, &mut state).await {
            note_error(&format!("subscription {}", sub.name), &e);
        }
    }
    tracing::debug!(subscription = %sub.name, consumer, "worker stopped");
}

struct WorkerState {
    /// Groups are (re)created after every (re)connect: a Redis that restarted
    /// without persistence has lost them.
    groups_ready: bool,
    /// While re-reading our own pending entries: the last id seen per stream
    /// still being drained. Empty once all are drained.
    draining: HashMap<String, String>,
    /// The next batch, read while the previous (full) one was judged and
    /// committed, so the judging threads never wait for a read's round trip
    /// while there is a backlog. Its
    /// entries are in our pending list: dropped (after an error, or when a
    /// batch is left pending), they are read again by the drain.
    ahead: Option<Batches>,
}

impl WorkerState {
    fn reset(&mut self, sub: &Subscription) {
        self.groups_ready = false;
        self.draining = initial_drain(sub);
        self.ahead = None;
    }
}

fn initial_drain(sub: &Subscription) -> HashMap<String, String> {
    sub.streams
        .iter()
        .map(|s| (s.clone(), "0".to_string()))
        .collect()
}

fn read_command(
    sub: &Subscription,
    consumer: &str,
    streams: &[String],
    ids: &[String],
) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(sub.group())
        .arg(consumer)
        .arg("COUNT")
        .arg(sub.batch_size);
    if ids.iter().all(|id| id == ">") {
        cmd.arg("BLOCK").arg(sub.block.as_millis() as u64);
    }
    cmd.arg("STREAMS").arg(streams).arg(ids);
    cmd
}

async fn worker_step(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    consumer: &str,
    read: &mut ReadConn,
    write: &mut LazyConn,
    state: &mut WorkerState,
) -> Result<(), RedisError> {
    if !state.groups_ready {
        let conn = write.get().await?;
        for stream in &sub.streams {
            ensure_group(conn, stream, sub.group(), &sub.start_id).await?;
        }
        state.groups_ready = true;
        redis_conn::check_health_now();
    }
    let new_entries = vec![">".to_string(); sub.streams.len()];
    if !state.draining.is_empty() {
        let (streams, ids): (Vec<String>, Vec<String>) = state
            .draining
            .iter()
            .map(|(s, id)| (s.clone(), id.clone()))
            .unzip();
        let batches = read
            .read(&read_command(sub, consumer, &streams, &ids))
            .await?;
        for stream in &streams {
            match batches.iter().find(|(s, _)| s == stream) {
                Some((_, entries)) if !entries.is_empty() => {
                    let last = entries.last().expect("not empty").id.clone();
                    state.draining.insert(stream.clone(), last);
                }
                _ => {
                    state.draining.remove(stream);
                }
            }
        }
        let mut batches_with_counts = Vec::with_capacity(batches.len());
        for (stream, entries) in batches {
            let counts =
                delivery_counts(write.get().await?, &stream, sub.group(), consumer, &entries)
                    .await?;
            batches_with_counts.push((stream, entries, counts));
        }
        return settle_delivered(shared, sub, batches_with_counts, write, state).await;
    }
    let batches = match state.ahead.take() {
        Some(batches) => batches,
        None => {
            read.read(&read_command(sub, consumer, &sub.streams, &new_entries))
                .await?
        }
    };
    if batches.iter().all(|(_, entries)| entries.is_empty()) {
        return Ok(());
    }
    // Reading ahead pays only with a backlog (a full batch). Without one,
    // the read would wait here for the next entry, which an idle worker of
    // the group should take at once instead.
    if batches
        .iter()
        .all(|(_, entries)| entries.len() < sub.batch_size)
    {
        return settle_batches(shared, sub, batches, write, state).await;
    }
    let next = read_command(sub, consumer, &sub.streams, &new_entries);
    let read_next = read.read(&next);
    let (settled, next) = tokio::join!(
        settle_batches(shared, sub, batches, write, state),
        read_next
    );
    settled?;
    if state.draining.is_empty() {
        state.ahead = Some(next?);
    }
    Ok(())
}

/// Judges and commits new entries (first deliveries).
async fn settle_batches(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    batches: Vec<(String, Vec<StreamEntry>)>,
    write: &mut LazyConn,
    state: &mut WorkerState,
) -> Result<(), RedisError> {
    let batches = batches
        .into_iter()
        .map(|(stream, entries)| (stream, entries, HashMap::new()))
        .collect();
    settle_delivered(shared, sub, batches, write, state).await
}

/// Judges and commits batches given with their delivery counts (absent:
/// a first delivery). A batch left pending after too many state conflicts
/// is read again from our own pending list at once, not after
/// `claim_min_idle`.
async fn settle_delivered(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    batches: Vec<(String, Vec<StreamEntry>, HashMap<String, u64>)>,
    write: &mut LazyConn,
    state: &mut WorkerState,
) -> Result<(), RedisError> {
    for (stream, entries, deliveries) in batches {
        if entries.is_empty() {
            continue;
        }
        let delivered = entries
            .into_iter()
            .map(|e| Delivered {
                deliveries: deliveries.get(&e.id).copied().unwrap_or(1),
                id: e.id,
                fields: e.fields,
            })
            .collect();
        if !settle(shared, sub, &stream, delivered, write).await? {
            state.draining.insert(stream, "0".to_string());
        }
    }
    Ok(())
}

/// Delivery counts of entries re-read from our own pending list.
async fn delivery_counts(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
    consumer: &str,
    entries: &[StreamEntry],
) -> Result<HashMap<String, u64>, RedisError> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Ok(HashMap::new());
    };
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(&first.id)
        .arg(&last.id)
        .arg(entries.len())
        .arg(consumer)
        .query_async(conn)
        .await?;
    Ok(parse_pending(reply)
        .into_iter()
        .map(|p| (p.id, p.deliveries))
        .collect())
}

/// Judges a batch of one stream and commits its outcome; false when it was
/// left pending because the alert state kept changing under it (see
/// [`Store::settle`]).
async fn settle(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    stream: &str,
    batch: Vec<Delivered>,
    write: &mut LazyConn,
) -> Result<bool, RedisError> {
    // Held until the batch is committed or rolled back: a reload that
    // removes a rule waits for every batch judged with the old set to let go
    // of it before resolving that rule's alerts.
    let rules = shared.processor.rules.load_full();
    let judged = {
        let shared = shared.clone();
        let sub = sub.clone();
        let stream = stream.to_string();
        let rules = rules.clone();
        tokio::task::spawn_blocking(move || judge(&shared, &rules, &sub, &stream, batch))
            .await
            .expect("judge catches rule panics itself")
    };
    let settled = shared
        .store
        .settle(
            write,
            Settlement::Batch {
                stream,
                group: sub.group(),
                acks: &judged.acks,
                dead: &judged.dead,
                actions: &judged.actions,
            },
        )
        .await?;
    let Settled::Committed(notified) = settled else {
        tracing::warn!(
            stream,
            "alert state kept changing under this batch; it stays pending and is judged again"
        );
        return Ok(false);
    };
    drop(rules);
    let group = sub.group();
    metrics::messages(stream, group, "processed", judged.processed);
    metrics::messages(stream, group, "dropped", judged.dropped);
    metrics::messages(stream, group, "error", judged.errored);
    for d in &judged.dead {
        metrics::dead_lettered(stream, group, &d.id, &d.reason);
    }
    for a in &notified {
        metrics::alert_notified(a);
    }
    Ok(true)
}

fn judge(
    shared: &Shared,
    loaded: &LoadedRules,
    sub: &Subscription,
    stream: &str,
    batch: Vec<Delivered>,
) -> Judged {
    let mut j = Judged {
        acks: Vec::with_capacity(batch.len()),
        dead: Vec::new(),
        actions: Vec::new(),
        processed: 0,
        dropped: 0,
        errored: 0,
    };
    let now = now_ms();
    for d in batch {
        j.acks.push(d.id.clone());
        let Some(fields) = d.fields else {
            // Deleted while pending: nothing to judge, only to acknowledge.
            continue;
        };
        if d.deliveries > sub.max_deliveries {
            j.dead.push(DeadLetter {
                reason: format!(
                    "delivered {} times, more than max_deliveries ({})",
                    d.deliveries, sub.max_deliveries
                ),
                id: d.id,
                fields,
            });
            continue;
        }
        let input = Input {
            subscription: &sub.name,
            group: sub.group(),
            stream,
            id: &d.id,
            deliveries: d.deliveries,
            fields: &fields,
            now_ms: now,
        };
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
            shared.processor.evaluate(loaded, &input)
        }));
        let out = match out {
            Ok(out) => out,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                j.dead.push(DeadLetter {
                    reason: format!("rule engine panicked: {what}"),
                    id: d.id,
                    fields,
                });
                continue;
            }
        };
        for (rule, level, text) in &out.logs {
            metrics::rule_log(rule, stream, &d.id, *level, text);
        }
        match out.verdict {
            Verdict::Undecodable(reason) => {
                j.dead.push(DeadLetter {
                    id: d.id,
                    fields,
                    reason,
                });
            }
            Verdict::Processed {
                dropped,
                rule_errors,
            } => {
                if rule_errors > 0 {
                    j.errored += 1;
                } else if dropped {
                    j.dropped += 1;
                } else {
                    j.processed += 1;
                }
            }
        }
        j.actions.extend(out.actions);
    }
    j
}

/// Takes over entries idle longer than `claim_min_idle` (their consumer is
/// dead or stuck) and judges them here; entries delivered too often are
/// dead-lettered instead.
pub async fn run_claimer(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    consumer: String,
    shutdown: CancellationToken,
) {
    let mut write = LazyConn::new(shared.target.clone(), WRITE_TIMEOUT);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(sub.claim_interval) => {}
            _ = shutdown.cancelled() => break,
        }
        for stream in &sub.streams {
            if let Err(e) = claim_stream(&shared, &sub, stream, &consumer, &mut write).await {
                note_error(&format!("claiming on {stream}"), &e);
                write.reset();
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
    }
}

async fn claim_stream(
    shared: &Arc<Shared>,
    sub: &Arc<Subscription>,
    stream: &str,
    consumer: &str,
    write: &mut LazyConn,
) -> Result<(), RedisError> {
    let min_idle = sub.claim_min_idle.as_millis() as u64;
    loop {
        let reply: Result<Value, RedisError> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(sub.group())
            .arg("IDLE")
            .arg(min_idle)
            .arg("-")
            .arg("+")
            .arg(sub.batch_size)
            .query_async(write.get().await?)
            .await;
        let stale = match reply {
            Ok(v) => parse_pending(v),
            // The group or stream vanished (Redis restarted empty): the
            // workers recreate it; nothing is pending.
            Err(e) if e.code() == Some("NOGROUP") => return Ok(()),
            Err(e) => return Err(e),
        };
        if stale.is_empty() {
            return Ok(());
        }
        let full = stale.len() >= sub.batch_size;
        let counts: HashMap<String, u64> =
            stale.iter().map(|p| (p.id.clone(), p.deliveries)).collect();
        let reply: Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg(sub.group())
            .arg(consumer)
            .arg(min_idle)
            .arg(stale.iter().map(|p| p.id.as_str()).collect::<Vec<_>>())
            .query_async(write.get().await?)
            .await?;
        let claimed: Vec<Delivered> = parse_entries(reply)
            .into_iter()
            .map(|e| Delivered {
                deliveries: counts.get(&e.id).copied().unwrap_or(0) + 1,
                id: e.id,
                fields: e.fields,
            })
            .collect();
        if claimed.is_empty() {
            return Ok(());
        }
        tracing::info!(
            subscription = %sub.name,
            stream,
            n = claimed.len(),
            from = %stale[0].consumer,
            "claimed entries idle longer than claim_min_idle"
        );
        settle(shared, sub, stream, claimed, write).await?;
        if !full {
            return Ok(());
        }
    }
}

/// Refreshes the pending and lag gauges of every group on an interval (not
/// per scrape: a scrape must not cost Redis round trips). Every instance
/// reports the same group-wide figures; aggregate them with `max`, not `sum`.
pub async fn run_position_reporter(
    target: RedisTarget,
    subs: Vec<Arc<Subscription>>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut conn = LazyConn::new(target, WRITE_TIMEOUT);
    loop {
        for sub in &subs {
            for stream in &sub.streams {
                let reply: Result<Value, RedisError> = match conn.get().await {
                    Ok(c) => {
                        redis::cmd("XINFO")
                            .arg("GROUPS")
                            .arg(stream)
                            .query_async(c)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match reply {
                    Ok(v) => {
                        for (group, pending, lag) in parse_groups(v) {
                            if group == sub.group() {
                                metrics::consumer_position(stream, &group, pending, lag);
                            }
                        }
                    }
                    Err(e) if e.code().is_some() => {}
                    Err(_) => conn.reset(),
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
