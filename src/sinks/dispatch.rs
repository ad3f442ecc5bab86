//! The per-sink delivery loop: read the outbox through the sink's own
//! consumer group, deliver what its route matches, acknowledge after
//! delivery. Failures are retried with exponential backoff and jitter; after
//! `max_attempts` the batch goes to the sink's dead-letter stream
//! (`<outbox>:dead:<sink>`, same hash slot as the outbox) and the sink moves on.
//!
//! Alerts left pending by an instance that died (its lease
//! `tripline:instance:<name>` expired) are taken over by a live one, so a
//! crash between reading and acknowledging loses nothing.

use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Manifest, Sink};
use crate::alert::Alert;
use crate::group_reader::{GroupReader, Member, StreamEntry, ensure_group, position};
use crate::instance::lease;
use crate::keys::{ALERT_FIELD, sink_dead_key, sink_group};
use crate::metrics::{self, Metrics};
use crate::redis_conn::{Backoff, LazyConn, RedisConn, RedisTarget, note_error, pause};
use crate::runtime::Runtime;

/// How long one XREADGROUP on the outbox blocks.
const BLOCK: Duration = Duration::from_millis(1000);
/// How often a sink looks for alerts stranded by a dead instance.
const ADOPT_EVERY: Duration = Duration::from_secs(10);
/// How often `tripline_sink_lag` is refreshed.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// Pending entries claimed per round trip when adopting.
const ADOPT_BATCH: usize = 1000;

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
        ensure_group(conn, outbox, &sink_group(sink), start).await?;
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
    placement: Placement,
    shutdown: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let Placement {
        outboxes,
        consumer,
        target,
        runtime,
    } = placement;
    let mut write = LazyConn::new(target.clone());
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
    let group = sink_group(&manifest.name);
    let lag_stop = CancellationToken::new();
    let lag_task = tokio::spawn(report_lag(
        target.clone(),
        manifest.name.clone(),
        group.clone(),
        outboxes.clone(),
        runtime.metrics.clone(),
        lag_stop.clone(),
    ));
    let mut lanes = tokio::task::JoinSet::new();
    for lane_outboxes in target.read_groups(&outboxes) {
        let member = Member {
            group: group.clone(),
            consumer: consumer.clone(),
        };
        let lane = Lane {
            sink: sink.clone(),
            manifest: manifest.clone(),
            reader: GroupReader::new(&target, member, lane_outboxes, manifest.batch_size, BLOCK),
            write: LazyConn::new(target.clone()),
            runtime: runtime.clone(),
        };
        lanes.spawn(lane.run(shutdown.clone()));
    }
    while lanes.join_next().await.is_some() {}
    if let Err(e) = sink.close().await {
        tracing::warn!(sink = %manifest.name, "closing the sink failed: {e}");
    }
    lag_stop.cancel();
    let _ = lag_task.await;
    runtime.metrics.sink_lag_clear(&manifest.name);
}

/// Where and as whom this instance's sinks read: the same for every sink.
#[derive(Clone)]
pub struct Placement {
    /// Outbox streams every sink reads.
    pub outboxes: Vec<String>,
    /// Consumer name of this instance in every sink group.
    pub consumer: String,
    pub target: RedisTarget,
    /// Where the sinks count deliveries and find the silences in force.
    pub runtime: Runtime,
}

/// Reads, delivers and acknowledges the alerts of one set of outboxes.
struct Lane {
    /// Shared by the sink's lanes: on Cluster they deliver concurrently.
    sink: Arc<dyn Sink>,
    /// Batch size, grouping, timeout, attempts and route of the deliveries.
    manifest: Arc<Manifest>,
    /// The sink's consumer of its group on these outboxes.
    reader: GroupReader,
    /// For acknowledgements, dead letters and adoptions, which must not wait
    /// behind a blocking read.
    write: LazyConn,
    /// The silences that mute deliveries and the metrics they count into.
    runtime: Runtime,
}

impl Lane {
    /// Delivers until `shutdown`, then until the outboxes hold nothing new
    /// for us (the flush on exit).
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut next_adopt = Instant::now();
        loop {
            // After `shutdown`, keep delivering until the outbox has nothing
            // new for us: that is the flush on exit.
            let finishing = shutdown.is_cancelled();
            if !finishing && Instant::now() >= next_adopt {
                next_adopt = Instant::now() + ADOPT_EVERY;
                match self.adopt_orphans().await {
                    // Re-read our pending list there: it now holds the orphans.
                    Ok(adopted) => adopted.into_iter().for_each(|o| self.reader.redrain(o)),
                    Err(e) => {
                        note_error(&format!("sink {} adopting orphans", self.manifest.name), &e);
                        self.write.reset();
                    }
                }
            }
            match self.step(&shutdown).await {
                Ok(n) => {
                    backoff.reset();
                    if finishing && n == 0 {
                        break;
                    }
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP")
                        && let Ok(c) = self.write.get().await
                    {
                        let _ =
                            ensure_groups(c, &self.manifest.name, self.reader.streams(), "0").await;
                    }
                    note_error(&format!("sink {}", self.manifest.name), &e);
                    self.reader.reset();
                    self.write.reset();
                    if finishing || !pause(&mut backoff, &shutdown).await {
                        break;
                    }
                }
            }
        }
    }

    /// Claims the pending entries of consumers whose instance lease is gone
    /// (the process died before acknowledging them). Returns the outboxes
    /// where something was claimed.
    async fn adopt_orphans(&mut self) -> Result<Vec<String>, RedisError> {
        let member = self.reader.member();
        let mut adopted = Vec::new();
        for outbox in self.reader.streams() {
            for name in member
                .others_pending(self.write.get().await?, outbox)
                .await?
            {
                if lease::is_alive(self.write.get().await?, &name).await? {
                    continue;
                }
                let taken = member
                    .adopt(&mut self.write, outbox, &name, ADOPT_BATCH)
                    .await?;
                if taken > 0 {
                    metrics::sink_adopted(&self.manifest.name, outbox, &name, taken as u64);
                    adopted.push(outbox.clone());
                }
            }
        }
        Ok(adopted)
    }

    /// Reads once and delivers what came; returns how many entries came.
    async fn step(&mut self, shutdown: &CancellationToken) -> Result<usize, RedisError> {
        let read = self.reader.read(!shutdown.is_cancelled()).await?;
        let mut batches = read.batches;
        if !batches.is_empty()
            && !read.redelivered
            && !self.manifest.group_wait.is_zero()
            && !shutdown.is_cancelled()
        {
            // Grouping: let the rest of a burst arrive, then deliver it together.
            tokio::select! {
                _ = tokio::time::sleep(self.manifest.group_wait) => {}
                _ = shutdown.cancelled() => {}
            }
            for (stream, entries) in self.reader.read_more().await? {
                match batches.iter_mut().find(|(s, _)| *s == stream) {
                    Some((_, e)) => e.extend(entries),
                    None => batches.push((stream, entries)),
                }
            }
            batches.retain(|(_, e)| !e.is_empty());
        }
        let seen = batches.iter().map(|(_, e)| e.len()).sum();
        if seen > 0 {
            deliver_batch(
                &*self.sink,
                &self.manifest,
                &self.reader.member().group,
                batches,
                &mut self.write,
                &self.runtime,
                shutdown,
            )
            .await?;
        }
        Ok(seen)
    }
}

/// Refreshes `tripline_sink_lag` from XINFO GROUPS of every outbox, on its
/// own task so the gauge stays fresh while the sink is stuck retrying.
async fn report_lag(
    target: RedisTarget,
    sink: String,
    group: String,
    outboxes: Vec<String>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut conn = LazyConn::new(target);
    loop {
        let mut total = 0;
        let mut complete = true;
        for outbox in &outboxes {
            let found = match conn.get().await {
                Ok(c) => position(c, outbox, &group).await,
                Err(e) => Err(e),
            };
            match found {
                Ok(Some((pending, lag))) => total += pending + lag.unwrap_or(0),
                // No such outbox yet: nothing queued there.
                Ok(None) => {}
                Err(_) => {
                    conn.reset();
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            metrics.sink_lag(&sink, total);
        }
        tokio::select! {
            _ = tokio::time::sleep(LAG_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
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
    runtime: &Runtime,
    shutdown: &CancellationToken,
) -> Result<(), RedisError> {
    let mut alerts = Vec::new();
    // Which outbox each alert came from, for its dead letter.
    let mut from = Vec::new();
    let silences = runtime.silences.active();
    let m = &runtime.metrics;
    let now = crate::clock::now_ms();
    for (i, (outbox, entries)) in batches.iter().enumerate() {
        for e in entries {
            match parse_alert(e) {
                Ok(a) if manifest.route.matches(&a) => match silences.muting(&a, now) {
                    Some(silence) => m.sink_silenced(&manifest.name, &a, silence),
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
                m.sink_delivered(&manifest.name, alerts.len() as u64);
                break;
            }
            Err(e) if e.is_permanent() || attempt >= manifest.max_attempts => {
                if e.is_permanent() {
                    m.sink_rejected(&manifest.name, alerts.len() as u64, &e.to_string());
                } else {
                    m.sink_gave_up(&manifest.name, alerts.len() as u64, &e.to_string());
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
                m.sink_failed(&manifest.name, attempt, &e.to_string());
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

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;
    use crate::alert::silence::{Matcher, Silence};
    use crate::alert::{Origin, Severity, Status};
    use crate::sinks::{BuildContext, kind, manifest};
    use crate::test_redis::TestRedis;

    pub(crate) fn alert(host: &str) -> Alert {
        Alert {
            fingerprint: format!("fp-{host}"),
            rule: "errors".into(),
            name: "Errors".into(),
            severity: Severity::Major,
            status: Status::Firing,
            labels: [("host".to_string(), host.to_string())].into(),
            annotations: Default::default(),
            starts_at: String::new(),
            ends_at: None,
            origin: Origin::default(),
        }
    }

    /// A `file` sink appending to `out.jsonl` in `dir`, built as the
    /// supervisor builds one.
    fn file_sink(dir: &Path, runtime: &Runtime, target: &RedisTarget) -> (Manifest, Box<dyn Sink>) {
        let m = manifest::parse(
            &dir.join("file.yaml"),
            "name: file\nkind: file\npath: out.jsonl\n",
        )
        .unwrap();
        let cx = BuildContext {
            sink: m.name.clone(),
            redis: target.clone(),
            timeout: m.timeout,
            base_dir: m.dir(),
            metrics: runtime.metrics.clone(),
        };
        let sink = kind(&m.kind).unwrap().build(&m.settings, &cx).unwrap();
        (m, sink)
    }

    #[tokio::test]
    async fn delivery_skips_silenced_alerts_acknowledges_all_and_counts_into_its_runtime() {
        let redis = TestRedis::start();
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new();
        let target = redis.target();
        let (manifest, sink) = file_sink(dir.path(), &runtime, &target);
        let silence = Silence::new(
            vec![Matcher::parse("host=r1").unwrap()],
            crate::clock::now_ms(),
            Duration::from_secs(600),
            "test".into(),
            String::new(),
        )
        .unwrap();
        runtime.silences.set(vec![silence]);
        let outbox = "tripline:outbox:{errors}".to_string();
        let group = sink_group(&manifest.name);
        let mut write = LazyConn::new(target.clone());
        ensure_groups(
            write.get().await.unwrap(),
            &manifest.name,
            std::slice::from_ref(&outbox),
            "0",
        )
        .await
        .unwrap();
        let mut con = redis.conn();
        for host in ["r1", "r2"] {
            let _: String = redis::cmd("XADD")
                .arg(&outbox)
                .arg("*")
                .arg(ALERT_FIELD)
                .arg(serde_json::to_string(&alert(host)).unwrap())
                .query(&mut con)
                .unwrap();
        }
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&group)
            .arg("c1")
            .arg("STREAMS")
            .arg(&outbox)
            .arg(">")
            .query(&mut con)
            .unwrap();
        let batches = crate::group_reader::reply::parse_read_reply(reply);
        deliver_batch(
            &*sink,
            &manifest,
            &group,
            batches,
            &mut write,
            &runtime,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let written = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
        assert_eq!(written.lines().count(), 1, "{written}");
        assert!(written.contains("\"host\":\"r2\""), "{written}");
        let pending: (u64, Value, Value, Value) = redis::cmd("XPENDING")
            .arg(&outbox)
            .arg(&group)
            .query(&mut con)
            .unwrap();
        assert_eq!(pending.0, 0, "the silenced alert is acknowledged too");
        let text = runtime.metrics.encode();
        for line in [
            "tripline_sink_deliveries_total{sink=\"file\"} 1",
            "tripline_sink_silenced_total{sink=\"file\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
