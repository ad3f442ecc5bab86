//! The per-sink delivery loop: read the outbox through the sink's own
//! consumer group, deliver what its route matches, acknowledge after
//! delivery. Failures are retried with exponential backoff and jitter; after
//! `max_attempts` the batch goes to the sink's dead-letter stream
//! (`<outbox>:dead:<sink>`, same hash slot as the outbox) and the sink moves on.
//!
//! Alerts left pending by an instance that died (its lease
//! `tripline:instance:<name>` expired) are taken over by a live one, so a
//! crash between reading and acknowledging loses nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Manifest, Sink};
use crate::alert::Alert;
use crate::keys::{ALERT_FIELD, instance_key, sink_dead_key};
use crate::metrics;
use crate::redis_conn::{
    Backoff, LazyConn, RedisConn, RedisTarget, StreamEntry, note_error, parse_groups,
    parse_pending, parse_read_reply, pause,
};

/// How long one XREADGROUP on the outbox blocks.
const BLOCK: Duration = Duration::from_millis(1000);
/// How often a sink looks for alerts stranded by a dead instance.
const ADOPT_EVERY: Duration = Duration::from_secs(10);
/// How often `tripline_sink_lag` is refreshed.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// Pending entries claimed per round trip when adopting.
const ADOPT_BATCH: usize = 1000;

/// Start of every sink's consumer group name.
pub const SINK_GROUP_PREFIX: &str = "tripline-sink:";

pub fn group_name(sink: &str) -> String {
    format!("{SINK_GROUP_PREFIX}{sink}")
}

/// Creates the sink's group on every outbox stream. `start` is `$` when the
/// sink is new (it wants alerts from now on, not the outbox's history), `0`
/// when recreating a group that Redis lost along with its data.
pub async fn ensure_groups(
    conn: &mut RedisConn,
    sink: &str,
    outboxes: &[String],
    start: &str,
) -> Result<(), RedisError> {
    for outbox in outboxes {
        crate::redis_conn::ensure_group(conn, outbox, &group_name(sink), start).await?;
    }
    Ok(())
}

/// Runs one sink until `shutdown`; in-flight deliveries finish first, and
/// anything unacknowledged stays pending for the next start. `ready` fires
/// once the sink's groups exist, i.e. from when on no alert can miss it.
///
/// The outboxes are read in lanes, one per set a single XREADGROUP may name
/// ([`RedisTarget::read_groups`]): one lane on a single server, one per
/// outbox hash tag on Cluster. Lanes deliver independently (a sink may see
/// concurrent `deliver` calls on Cluster); the sink closes once all ended.
pub async fn run(
    sink: Arc<dyn Sink>,
    manifest: Arc<Manifest>,
    outboxes: Vec<String>,
    consumer: String,
    target: RedisTarget,
    shutdown: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut write = LazyConn::new(target.clone(), Duration::from_secs(5));
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let created = match write.get().await {
            Ok(c) => ensure_groups(c, &manifest.name, &outboxes, "$").await,
            Err(e) => Err(e),
        };
        match created {
            Ok(()) => break,
            Err(e) => {
                note_error(
                    &format!("creating the groups of sink {}", manifest.name),
                    &e,
                );
                write.reset();
                if !pause(&mut backoff, &shutdown).await {
                    return;
                }
            }
        }
    }
    drop(write);
    let _ = ready.send(());
    let group = group_name(&manifest.name);
    let lag_stop = CancellationToken::new();
    let lag_task = tokio::spawn(report_lag(
        target.clone(),
        manifest.name.clone(),
        group.clone(),
        outboxes.clone(),
        lag_stop.clone(),
    ));
    let mut lanes = tokio::task::JoinSet::new();
    for lane_outboxes in target.read_groups(&outboxes) {
        lanes.spawn(lane(
            sink.clone(),
            manifest.clone(),
            lane_outboxes,
            group.clone(),
            consumer.clone(),
            target.clone(),
            shutdown.clone(),
        ));
    }
    while lanes.join_next().await.is_some() {}
    if let Err(e) = sink.close().await {
        tracing::warn!(sink = %manifest.name, "closing the sink failed: {e}");
    }
    lag_stop.cancel();
    let _ = lag_task.await;
    metrics::sink_lag_clear(&manifest.name);
}

/// Reads, delivers and acknowledges the alerts of `outboxes` until
/// `shutdown`, then until they hold nothing new for us (the flush on exit).
async fn lane(
    sink: Arc<dyn Sink>,
    manifest: Arc<Manifest>,
    outboxes: Vec<String>,
    group: String,
    consumer: String,
    target: RedisTarget,
    shutdown: CancellationToken,
) {
    let mut read = LazyConn::new(target.clone(), BLOCK + Duration::from_secs(2));
    let mut write = LazyConn::new(target, Duration::from_secs(5));
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut draining: HashMap<String, String> =
        outboxes.iter().map(|o| (o.clone(), "0".into())).collect();
    let mut next_adopt = Instant::now();
    loop {
        // After `shutdown`, keep delivering until the outbox has nothing new
        // for us: that is the flush on exit.
        let finishing = shutdown.is_cancelled();
        if !finishing && Instant::now() >= next_adopt {
            next_adopt = Instant::now() + ADOPT_EVERY;
            match adopt_orphans(&manifest.name, &outboxes, &group, &consumer, &mut write).await {
                // Re-read our pending list there: it now holds the orphans.
                Ok(adopted) => draining.extend(adopted.into_iter().map(|o| (o, "0".into()))),
                Err(e) => {
                    note_error(&format!("sink {} adopting orphans", manifest.name), &e);
                    write.reset();
                }
            }
        }
        let step = step(
            &*sink,
            &manifest,
            &outboxes,
            &group,
            &consumer,
            &mut read,
            &mut write,
            &mut draining,
            &shutdown,
        )
        .await;
        match step {
            Ok(n) => {
                backoff.reset();
                if finishing && n == 0 {
                    break;
                }
            }
            Err(e) => {
                if e.code() == Some("NOGROUP")
                    && let Ok(c) = write.get().await
                {
                    let _ = ensure_groups(c, &manifest.name, &outboxes, "0").await;
                }
                note_error(&format!("sink {}", manifest.name), &e);
                read.reset();
                write.reset();
                draining = outboxes.iter().map(|o| (o.clone(), "0".into())).collect();
                if finishing || !pause(&mut backoff, &shutdown).await {
                    break;
                }
            }
        }
    }
}

/// Refreshes `tripline_sink_lag` from XINFO GROUPS of every outbox, on its
/// own task so the gauge stays fresh while the sink is stuck retrying.
async fn report_lag(
    target: RedisTarget,
    sink: String,
    group: String,
    outboxes: Vec<String>,
    stop: CancellationToken,
) {
    let mut conn = LazyConn::new(target, Duration::from_secs(5));
    loop {
        let mut total = 0;
        let mut complete = true;
        for outbox in &outboxes {
            let reply: Result<Value, RedisError> = match conn.get().await {
                Ok(c) => {
                    redis::cmd("XINFO")
                        .arg("GROUPS")
                        .arg(outbox)
                        .query_async(c)
                        .await
                }
                Err(e) => Err(e),
            };
            match reply {
                Ok(v) => {
                    total += parse_groups(v)
                        .into_iter()
                        .filter(|(g, _, _)| *g == group)
                        .map(|(_, pending, lag)| pending + lag.unwrap_or(0))
                        .sum::<i64>();
                }
                // No such outbox yet: nothing queued there.
                Err(e) if e.code().is_some() => {}
                Err(_) => {
                    conn.reset();
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            metrics::sink_lag(&sink, total);
        }
        tokio::select! {
            _ = tokio::time::sleep(LAG_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Claims the pending entries of consumers whose instance lease is gone
/// (the process died before acknowledging them). Returns the outboxes where
/// something was claimed.
async fn adopt_orphans(
    sink: &str,
    outboxes: &[String],
    group: &str,
    consumer: &str,
    write: &mut LazyConn,
) -> Result<Vec<String>, RedisError> {
    let mut adopted = Vec::new();
    for outbox in outboxes {
        let reply: Result<Vec<HashMap<String, Value>>, RedisError> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(outbox)
            .arg(group)
            .query_async(write.get().await?)
            .await;
        let consumers = match reply {
            Ok(c) => c,
            Err(e) if e.code() == Some("NOGROUP") => continue,
            Err(e) => return Err(e),
        };
        for c in consumers {
            let name: String = match c.get("name").map(redis::from_redis_value_ref) {
                Some(Ok(n)) => n,
                _ => continue,
            };
            let pending: i64 = match c.get("pending").map(redis::from_redis_value_ref) {
                Some(Ok(p)) => p,
                _ => 0,
            };
            if name == consumer || pending == 0 {
                continue;
            }
            let alive: bool = redis::cmd("EXISTS")
                .arg(instance_key(&name))
                .query_async(write.get().await?)
                .await?;
            if alive {
                continue;
            }
            let mut taken = 0;
            loop {
                let rows: Value = redis::cmd("XPENDING")
                    .arg(outbox)
                    .arg(group)
                    .arg("-")
                    .arg("+")
                    .arg(ADOPT_BATCH)
                    .arg(&name)
                    .query_async(write.get().await?)
                    .await?;
                let ids: Vec<String> = parse_pending(rows).into_iter().map(|p| p.id).collect();
                if ids.is_empty() {
                    break;
                }
                let claimed: Vec<String> = redis::cmd("XCLAIM")
                    .arg(outbox)
                    .arg(group)
                    .arg(consumer)
                    .arg(0)
                    .arg(&ids)
                    .arg("JUSTID")
                    .query_async(write.get().await?)
                    .await?;
                taken += claimed.len();
                // Entries trimmed from the stream are dropped from the
                // pending list without being returned: stop when a round
                // makes no progress or the list is exhausted.
                if claimed.is_empty() || ids.len() < ADOPT_BATCH {
                    break;
                }
            }
            if taken > 0 {
                metrics::sink_adopted(sink, outbox, &name, taken as u64);
                adopted.push(outbox.clone());
            }
        }
    }
    Ok(adopted)
}

#[allow(clippy::too_many_arguments)]
async fn step(
    sink: &dyn Sink,
    manifest: &Manifest,
    outboxes: &[String],
    group: &str,
    consumer: &str,
    read: &mut LazyConn,
    write: &mut LazyConn,
    draining: &mut HashMap<String, String>,
    shutdown: &CancellationToken,
) -> Result<usize, RedisError> {
    let is_draining = !draining.is_empty();
    let (streams, ids): (Vec<String>, Vec<String>) = if is_draining {
        draining.iter().map(|(s, i)| (s.clone(), i.clone())).unzip()
    } else {
        (outboxes.to_vec(), vec![">".into(); outboxes.len()])
    };
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(manifest.batch_size);
    if !is_draining && !shutdown.is_cancelled() {
        cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
    }
    cmd.arg("STREAMS").arg(&streams).arg(&ids);
    let reply: Value = cmd.query_async(read.get().await?).await?;
    let mut batches = parse_read_reply(reply);
    let got_some = batches.iter().any(|(_, e)| !e.is_empty());
    if got_some && !is_draining && !manifest.group_wait.is_zero() && !shutdown.is_cancelled() {
        // Grouping: let the rest of a burst arrive, then deliver it together.
        tokio::select! {
            _ = tokio::time::sleep(manifest.group_wait) => {}
            _ = shutdown.cancelled() => {}
        }
        let mut more = redis::cmd("XREADGROUP");
        more.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(manifest.batch_size)
            .arg("STREAMS")
            .arg(&streams)
            .arg(&ids);
        let reply: Value = more.query_async(read.get().await?).await?;
        for (stream, entries) in parse_read_reply(reply) {
            match batches.iter_mut().find(|(s, _)| *s == stream) {
                Some((_, e)) => e.extend(entries),
                None => batches.push((stream, entries)),
            }
        }
    }
    if is_draining {
        for s in &streams {
            match batches.iter().find(|(n, _)| n == s) {
                Some((_, e)) if !e.is_empty() => {
                    draining.insert(s.clone(), e.last().expect("not empty").id.clone());
                }
                _ => {
                    draining.remove(s);
                }
            }
        }
    }
    batches.retain(|(_, e)| !e.is_empty());
    let seen = batches.iter().map(|(_, e)| e.len()).sum();
    if seen > 0 {
        deliver_batch(sink, manifest, group, batches, write, shutdown).await?;
    }
    Ok(seen)
}

fn parse_alert(e: &StreamEntry) -> Result<Alert, String> {
    let fields = e.fields.as_ref().ok_or("entry was deleted")?;
    let raw = fields
        .iter()
        .find(|(k, _)| k == ALERT_FIELD.as_bytes())
        .map(|(_, v)| v)
        .ok_or("no `alert` field")?;
    serde_json::from_slice(raw).map_err(|e| format!("bad alert JSON: {e}"))
}

/// Delivers what one read returned from every outbox of a lane in one
/// `deliver` call: a burst whose alerts were raised from streams of several
/// hash tags (so several outboxes) still leaves as one notification per
/// group, which per-outbox deliveries would split.
async fn deliver_batch(
    sink: &dyn Sink,
    manifest: &Manifest,
    group: &str,
    batches: Vec<(String, Vec<StreamEntry>)>,
    write: &mut LazyConn,
    shutdown: &CancellationToken,
) -> Result<(), RedisError> {
    let mut alerts = Vec::new();
    // Which outbox each alert came from, for its dead letter.
    let mut from = Vec::new();
    let silences = crate::alert::silence::active();
    let now = crate::process::now_ms();
    for (i, (outbox, entries)) in batches.iter().enumerate() {
        for e in entries {
            match parse_alert(e) {
                Ok(a) if manifest.route.matches(&a) => match silences.muting(&a, now) {
                    Some(silence) => metrics::sink_silenced(&manifest.name, &a, silence),
                    None => {
                        alerts.push(a);
                        from.push(i);
                    }
                },
                Ok(_) => {}
                Err(reason) => {
                    tracing::error!(sink = %manifest.name, outbox, id = %e.id, "skipping unreadable outbox entry: {reason}")
                }
            }
        }
    }
    let ack = |pipe: &mut redis::Pipeline| {
        for (outbox, entries) in &batches {
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            pipe.cmd("XACK").arg(outbox).arg(group).arg(ids).ignore();
        }
    };
    let mut attempt = 0;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    while !alerts.is_empty() {
        attempt += 1;
        let result = match tokio::time::timeout(manifest.timeout, sink.deliver(&alerts)).await {
            Ok(r) => r,
            Err(_) => Err(super::SinkError::Timeout(manifest.timeout)),
        };
        match result {
            Ok(()) => {
                metrics::sink_delivered(&manifest.name, alerts.len() as u64);
                break;
            }
            Err(e) if e.is_permanent() || attempt >= manifest.max_attempts => {
                if e.is_permanent() {
                    metrics::sink_rejected(&manifest.name, alerts.len() as u64, &e.to_string());
                } else {
                    metrics::sink_gave_up(&manifest.name, alerts.len() as u64, &e.to_string());
                }
                let mut pipe = redis::pipe();
                pipe.atomic();
                for (a, i) in alerts.iter().zip(&from) {
                    pipe.cmd("XADD")
                        .arg(sink_dead_key(&batches[*i].0, &manifest.name))
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(100_000)
                        .arg("*")
                        .arg(ALERT_FIELD)
                        .arg(serde_json::to_string(a).expect("alerts always serialize"))
                        .arg("reason")
                        .arg(e.to_string())
                        .ignore();
                }
                ack(&mut pipe);
                let _: Value = pipe.query_async(write.get().await?).await?;
                return Ok(());
            }
            Err(e) => {
                metrics::sink_failed(&manifest.name, attempt, &e.to_string());
                if !pause(&mut backoff, shutdown).await {
                    // Shutting down: leave the batch pending for next start.
                    return Ok(());
                }
            }
        }
    }
    let mut pipe = redis::pipe();
    ack(&mut pipe);
    let _: Value = pipe.query_async(write.get().await?).await?;
    Ok(())
}
