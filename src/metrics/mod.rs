//! Internal events: each function here writes the log line *and* bumps the
//! metric for one kind of event, so the two can never disagree.
//!
//! One [`Metrics`] belongs to one engine: it is built with the runtime
//! context ([`crate::runtime::Runtime`]) and handed to every subsystem, which
//! emits into it; `/metrics` encodes it. Nothing is process-wide, so tests
//! run engines side by side. Hot-path handles (per rule) are resolved once at
//! compile time, not looked up per message.

pub mod record;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::Alert;
use record::Record;

type Labels = Vec<(&'static str, String)>;

fn eval_histogram() -> Histogram {
    // 1 µs .. ~16 ms: a rule call is around a microsecond.
    Histogram::new(exponential_buckets(1e-6, 2.0, 15))
}

/// Every metric family tripline exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The standard `process_*` metrics, unprefixed, encoded first
    /// ([`crate::metrics_process`]).
    process: Registry,
    /// Whether Redis is in an outage, so it is logged once per outage and
    /// not per retry.
    redis_down: AtomicBool,
    messages: Family<Labels, Counter>,
    rule_evaluations: Family<Labels, Counter>,
    rule_errors: Family<Labels, Counter>,
    rule_eval_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    alerts: Family<Labels, Counter>,
    sink_deliveries: Family<Labels, Counter>,
    sink_failures: Family<Labels, Counter>,
    sink_retries: Family<Labels, Counter>,
    sink_dead: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    last_reload: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    config_in_sync: Family<Labels, Gauge>,
    consumer_pending: Family<Labels, Gauge>,
    consumer_lag: Family<Labels, Gauge>,
    redis_up: Gauge,
    /// Resolves of removed rules' alerts that never reached the outbox.
    retired_unsent: Counter,
    /// Notifications a silence kept from a sink.
    sink_silenced: Family<Labels, Counter>,
    /// Notifications the lifecycle withheld because of a silence, by rule.
    alerts_silenced: Family<Labels, Counter>,
    /// `POST /telemetry-data` requests by result.
    gateway_requests: Family<Labels, Counter>,
    /// `POST /api/v1/ingest/{stream}` requests by result: refusals are
    /// a producer's bug to find, `unavailable` is ours.
    ingest_requests: Family<Labels, Counter>,
    /// Entries `POST /api/v1/ingest/{stream}` wrote, by stream: how much
    /// of a stream's traffic comes in over HTTP.
    ingest_entries: Family<Labels, Counter>,
    sink_lag: Family<Labels, Gauge>,
    sink_program_exits: Family<Labels, Counter>,
    /// Consumers deleted from a group for being idle with nothing pending.
    consumers_removed: Family<Labels, Counter>,
    /// Lifecycle decisions taken again because another writer moved the
    /// alert state, by stream and reason.
    state_redecisions: Family<Labels, Counter>,
    /// How Redis keeps data across its restart (1 on the mode found), so a
    /// Redis that will lose the alert state can be alerted on before it does.
    redis_persistence: Family<Labels, Gauge>,
    /// Times Redis was found to have lost tripline's data, by hash tag.
    redis_state_lost: Family<Labels, Counter>,
    /// Pending and firing alerts in the shared alert state, by state,
    /// severity and rule (see `status::gauge_loop`).
    alerts_active: Family<Labels, Gauge>,
    /// What the status API shows beside the counters: last errors, last
    /// reloads, sink health.
    pub record: Arc<Record>,
}

impl Metrics {
    /// Every family at zero, plus `collectors` read at scrape time (the
    /// rules' own gauges).
    pub fn new(collectors: Vec<Box<dyn Collector>>) -> Metrics {
        let mut registry = Registry::with_prefix("tripline");
        let m = Metrics {
            messages: Family::default(),
            rule_evaluations: Family::default(),
            rule_errors: Family::default(),
            rule_eval_seconds: Family::new_with_constructor(eval_histogram),
            alerts: Family::default(),
            sink_deliveries: Family::default(),
            sink_failures: Family::default(),
            sink_retries: Family::default(),
            sink_dead: Family::default(),
            reloads: Family::default(),
            last_reload: Family::default(),
            config_in_sync: Family::default(),
            consumer_pending: Family::default(),
            consumer_lag: Family::default(),
            redis_up: Gauge::default(),
            retired_unsent: Counter::default(),
            sink_silenced: Family::default(),
            alerts_silenced: Family::default(),
            gateway_requests: Family::default(),
            ingest_requests: Family::default(),
            ingest_entries: Family::default(),
            sink_lag: Family::default(),
            sink_program_exits: Family::default(),
            consumers_removed: Family::default(),
            state_redecisions: Family::default(),
            redis_persistence: Family::default(),
            redis_state_lost: Family::default(),
            alerts_active: Family::default(),
            record: Arc::default(),
            registry: Registry::default(),
            process: crate::metrics_process::registry(),
            redis_down: AtomicBool::new(false),
        };
        m.register_pipeline(&mut registry);
        m.register_delivery(&mut registry);
        m.register_operations(&mut registry);
        for collector in collectors {
            registry.register_collector(collector);
        }
        Metrics { registry, ..m }
    }

    /// Messages, rule evaluations and the alerts they raise.
    fn register_pipeline(&self, registry: &mut Registry) {
        registry.register(
            "messages",
            "Stream entries by stream, group and outcome (processed, dropped, dead_lettered, error)",
            self.messages.clone(),
        );
        registry.register(
            "rule_evaluations",
            "Rule evaluations by rule and decision (alert, resolve, log, drop, pass, error)",
            self.rule_evaluations.clone(),
        );
        registry.register(
            "rule_errors",
            "Rule evaluations that threw or exceeded a limit",
            self.rule_errors.clone(),
        );
        registry.register(
            "rule_evaluation_seconds",
            "Time spent in one rule for one message",
            self.rule_eval_seconds.clone(),
        );
        registry.register(
            "alerts",
            "Alert notifications by rule, severity and status",
            self.alerts.clone(),
        );
        registry.register(
            "retired_alerts_unsent",
            "Resolved notifications for alerts of removed rules that could not be written to the outbox",
            self.retired_unsent.clone(),
        );
        registry.register(
            "alerts_active",
            "Pending and firing alerts in the alert state shared by the group (cluster-wide: every instance exports the same counts, aggregate with max), by state, severity and rule",
            self.alerts_active.clone(),
        );
        registry.register(
            "alerts_silenced",
            "Notifications withheld because a silence muted the alert's firing, by rule",
            self.alerts_silenced.clone(),
        );
        registry.register(
            "alert_state_redecisions",
            "Lifecycle decisions taken again because another writer changed the alert state first (reason: stale = the partition's generation moved, conflict = an alert relied on changed), by stream",
            self.state_redecisions.clone(),
        );
        registry.register(
            "gateway_requests",
            "POST /telemetry-data requests by result (accepted, malformed, invalid, too_large, unauthorized, unavailable)",
            self.gateway_requests.clone(),
        );
        registry.register(
            "ingest_requests",
            "POST /api/v1/ingest/{stream} requests by result (accepted, malformed, unknown_stream, too_large, unauthorized, unavailable)",
            self.ingest_requests.clone(),
        );
        registry.register(
            "ingest_entries",
            "Entries POST /api/v1/ingest/{stream} wrote, by stream",
            self.ingest_entries.clone(),
        );
    }

    /// The sinks: deliveries, failures, retries, lag.
    fn register_delivery(&self, registry: &mut Registry) {
        registry.register(
            "sink_deliveries",
            "Alerts delivered by sink",
            self.sink_deliveries.clone(),
        );
        registry.register(
            "sink_failures",
            "Failed delivery attempts by sink",
            self.sink_failures.clone(),
        );
        registry.register(
            "sink_retries",
            "Delivery retries by sink",
            self.sink_retries.clone(),
        );
        registry.register(
            "sink_dead_letters",
            "Alerts a sink gave up on after its attempts",
            self.sink_dead.clone(),
        );
        registry.register(
            "sink_silenced",
            "Notifications not sent because a silence matched, by sink",
            self.sink_silenced.clone(),
        );
        registry.register(
            "sink_lag",
            "Outbox entries a sink has not acknowledged yet (undelivered plus in retry), by sink",
            self.sink_lag.clone(),
        );
        registry.register(
            "sink_program_exits",
            "Exits of an exec sink's program (it is restarted on the next delivery), by sink",
            self.sink_program_exits.clone(),
        );
    }

    /// Reloads, consumer groups, Redis health and the build.
    fn register_operations(&self, registry: &mut Registry) {
        registry.register(
            "reloads",
            "Reloads by kind and result",
            self.reloads.clone(),
        );
        registry.register(
            "last_reload_success_timestamp_seconds",
            "Unix time of the last successful reload, by kind",
            self.last_reload.clone(),
        );
        registry.register(
            "config_in_sync",
            "1 when what runs matches the files on disk; 0 while a reload failed, by kind",
            self.config_in_sync.clone(),
        );
        registry.register(
            "consumer_pending",
            "Entries delivered to the group and not yet acknowledged",
            self.consumer_pending.clone(),
        );
        registry.register(
            "consumer_lag",
            "Entries in the stream not yet delivered to the group",
            self.consumer_lag.clone(),
        );
        registry.register(
            "redis_up",
            "1 while Redis answers, 0 while it is unreachable",
            self.redis_up.clone(),
        );
        registry.register(
            "consumers_removed",
            "Consumers deleted from a group (idle longer than consumer_cleanup.max_idle, nothing pending), by stream and group",
            self.consumers_removed.clone(),
        );
        registry.register(
            "redis_persistence",
            "1 on how Redis keeps its data across a restart (mode: aof, rdb, none, unknown when CONFIG is refused; a Cluster counts as its weakest node), checked on every connect",
            self.redis_persistence.clone(),
        );
        registry.register(
            "redis_state_lost",
            "Times Redis was found to have lost tripline's data (alert state, outbox, groups) of a hash tag: restarted without persistence, flushed or evicted, by tag",
            self.redis_state_lost.clone(),
        );
        let build = prometheus_client::metrics::info::Info::new(vec![
            ("version", crate::version::VERSION.to_string()),
            ("commit", crate::version::COMMIT.to_string()),
        ]);
        registry.register("build", "tripline build information", build);
    }

    /// The OpenMetrics exposition of everything (what Prometheus asks for).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode_registry(&mut out, &self.process)
            .and_then(|()| encode(&mut out, &self.registry))
            .expect("writing to a String cannot fail");
        out
    }

    /// The Prometheus text format 0.0.4, for clients that do not ask for
    /// OpenMetrics: promtool, curl, older scrapers. Its counters carry the
    /// `_total` suffix in HELP/TYPE too and `info` becomes a gauge.
    pub fn encode_prometheus_text(&self) -> String {
        use prometheus_client::encoding::prometheus_text;
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.process)
            .and_then(|()| prometheus_text::encode(&mut out, &self.registry))
            .expect("writing to a String cannot fail");
        out
    }
}

/// How a Redis server keeps its data across a restart, weakest first: a
/// Cluster is as safe as its weakest node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Persistence {
    /// Neither AOF nor RDB snapshots: a restart starts empty.
    None,
    /// CONFIG is refused (ACLs, managed Redis) and INFO does not show AOF.
    Unknown,
    /// RDB snapshots only: a crash loses the writes since the last one.
    Rdb,
    /// Append-only file: loses at most the last `appendfsync` interval.
    Aof,
}

impl Persistence {
    pub const ALL: [Persistence; 4] = [
        Persistence::None,
        Persistence::Unknown,
        Persistence::Rdb,
        Persistence::Aof,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Persistence::None => "none",
            Persistence::Unknown => "unknown",
            Persistence::Rdb => "rdb",
            Persistence::Aof => "aof",
        }
    }
}

/// What one node said about its persistence.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePersistence {
    /// `host:port` of a Cluster node; empty on a single server, whose
    /// address the log already names.
    pub node: String,
    /// What the metric and the log level follow.
    pub mode: Persistence,
    /// The settings found (`appendonly no, save ""`), or why they could not
    /// be read: what the log line shows the operator.
    pub detail: String,
}

/// Per-rule handles, resolved when the rule is compiled.
pub struct RuleMetrics {
    rule: String,
    /// Where the rule's last error is kept for `/api/v1/rules`.
    record: Arc<Record>,
    by_decision: [Counter; 6],
    errors: Counter,
    seconds: Histogram,
}

/// Every `result` of `tripline_gateway_requests_total`.
const GATEWAY_RESULTS: [&str; 6] = [
    "accepted",
    "malformed",
    "invalid",
    "too_large",
    "unauthorized",
    "unavailable",
];

/// How one `POST /api/v1/ingest/{stream}` ended, as logged and counted.
#[derive(Debug)]
pub enum Ingest<'a> {
    /// Every entry was written; how many.
    Accepted(usize),
    /// Not JSON, not objects, or empty: the 400's text.
    Malformed(&'a str),
    /// No subscription reads the stream: the 404's text.
    UnknownStream(&'a str),
    /// Over the gateway's body limit.
    TooLarge,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// Redis did not take the entries (none was written).
    Unavailable(&'a redis::RedisError),
}

impl Ingest<'_> {
    /// Every `result` label, in the order of [`Ingest::result`]'s arms.
    const RESULTS: [&'static str; 6] = [
        "accepted",
        "malformed",
        "unknown_stream",
        "too_large",
        "unauthorized",
        "unavailable",
    ];

    /// The `result` label of `tripline_ingest_requests_total`.
    fn result(&self) -> &'static str {
        Self::RESULTS[match self {
            Ingest::Accepted(_) => 0,
            Ingest::Malformed(_) => 1,
            Ingest::UnknownStream(_) => 2,
            Ingest::TooLarge => 3,
            Ingest::Unauthorized => 4,
            Ingest::Unavailable(_) => 5,
        }]
    }
}

const DECISIONS: [&str; 6] = ["alert", "log", "drop", "pass", "error", "resolve"];

/// What one rule decided about one message, as counted; in the order of
/// [`DECISIONS`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Alert,
    Log,
    Drop,
    Pass,
    Error,
    Resolve,
}

impl RuleMetrics {
    pub fn new(m: &Metrics, rule: &str) -> RuleMetrics {
        let counter = |d: &str| {
            m.rule_evaluations
                .get_or_create(&vec![
                    ("rule", rule.to_string()),
                    ("decision", d.to_string()),
                ])
                .clone()
        };
        let handles = RuleMetrics {
            rule: rule.to_string(),
            record: m.record.clone(),
            by_decision: DECISIONS.map(counter),
            errors: m
                .rule_errors
                .get_or_create(&vec![("rule", rule.to_string())])
                .clone(),
            seconds: m
                .rule_eval_seconds
                .get_or_create(&vec![("rule", rule.to_string())])
                .clone(),
        };
        // At 0 from compile time (start or the reload that added the rule),
        // so `increase()` sees the first withheld notification.
        let _created = m
            .alerts_silenced
            .get_or_create(&vec![("rule", rule.to_string())]);
        handles
    }

    pub fn observe(&self, decision: Decision, took: Duration) {
        self.seconds.observe(took.as_secs_f64());
        self.by_decision[decision as usize].inc();
    }

    /// A rule threw or hit a sandbox limit on one message.
    pub fn rule_failed(&self, msg_id: &str, error: &str) {
        self.errors.inc();
        self.record.rule_failed(&self.rule, msg_id, error);
        tracing::warn!(target: "tripline::rules", rule = %self.rule, msg_id, "rule failed: {error}");
    }
}

impl Metrics {
    /// Entries of one batch with the same outcome.
    pub fn messages(&self, stream: &str, group: &str, outcome: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.messages
            .get_or_create(&vec![
                ("stream", stream.to_string()),
                ("group", group.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc_by(n);
    }

    /// An entry written to `<stream>:dead`.
    pub fn dead_lettered(&self, stream: &str, group: &str, id: &str, reason: &str) {
        tracing::warn!(target: "tripline::source", stream, group, id, reason, "entry dead-lettered");
        self.messages(stream, group, "dead_lettered", 1);
    }

    /// An alert notification committed to the outbox.
    pub fn alert_notified(&self, alert: &Alert) {
        tracing::info!(
            target: "tripline::alert", rule = %alert.rule,
            alert = %alert.name,
            severity = alert.severity.as_str(),
            status = ?alert.status,
            fingerprint = %alert.fingerprint,
            "{}",
            alert.summary()
        );
        self.alerts
            .get_or_create(&vec![
                ("rule", alert.rule.clone()),
                ("severity", alert.severity.as_str().to_string()),
                (
                    "status",
                    match alert.status {
                        crate::model::Status::Firing => "firing",
                        crate::model::Status::Resolved => "resolved",
                    }
                    .to_string(),
                ),
            ])
            .inc();
    }

    /// An alert from a rule in shadow mode: counted, never sent.
    pub fn alert_shadowed(&self, alert: &Alert) {
        tracing::debug!(target: "tripline::alert", rule = %alert.rule, alert = %alert.name, "shadow rule asserted an alert (not sent)");
        self.alerts
            .get_or_create(&vec![
                ("rule", alert.rule.clone()),
                ("severity", alert.severity.as_str().to_string()),
                ("status", "shadow".to_string()),
            ])
            .inc();
    }

    /// Redis stopped answering; logged once per outage, not per retry.
    pub fn redis_unreachable(&self, what: &str, error: &redis::RedisError) {
        self.redis_up.set(0);
        if !self.redis_down.swap(true, Ordering::SeqCst) {
            tracing::error!(
                target: "tripline::redis", during = what,
                "Redis unreachable, retrying with backoff: {error}"
            );
        }
    }

    /// Redis answers again.
    pub fn redis_reachable(&self) {
        self.redis_up.set(1);
        if self.redis_down.swap(false, Ordering::SeqCst) {
            tracing::info!(target: "tripline::redis", "Redis reachable again");
        }
    }

    /// The persistence settings of Redis, read on a (re)connect. One line: a
    /// WARN when some node persists nothing, since its restart silently drops
    /// the alert state.
    pub fn redis_persistence(&self, nodes: &[NodePersistence]) {
        let Some(weakest) = nodes.iter().map(|n| n.mode).min() else {
            return;
        };
        let m = self;
        for mode in Persistence::ALL {
            m.redis_persistence
                .get_or_create(&vec![("mode", mode.as_str().to_string())])
                .set(i64::from(mode == weakest));
        }
        let which: Vec<String> = nodes
            .iter()
            .filter(|n| n.mode == weakest)
            .map(|n| {
                if n.node.is_empty() {
                    n.detail.clone()
                } else {
                    format!("{}: {}", n.node, n.detail)
                }
            })
            .collect();
        let which = which.join("; ");
        match weakest {
            Persistence::None => tracing::warn!(
                target: "tripline::redis",
                "Redis persists nothing ({which}): a Redis restart loses the alert state (firing alerts then never resolve), queued alerts and consumer groups; enable AOF (appendonly yes, appendfsync everysec)"
            ),
            Persistence::Unknown => tracing::info!(
                target: "tripline::redis",
                "cannot tell whether Redis persists its data ({which}); it must (AOF recommended), or a Redis restart loses the alert state"
            ),
            Persistence::Rdb => tracing::info!(
                target: "tripline::redis",
                "Redis persists by RDB snapshots only ({which}): a crash loses what changed since the last snapshot; AOF is recommended"
            ),
            Persistence::Aof => {
                tracing::debug!(target: "tripline::redis", "Redis persists with AOF ({which})")
            }
        }
    }

    /// Lost-state detection starts for these hash tags: their counters exist
    /// (at 0) from now on, so `increase()` sees the first loss.
    pub fn redis_state_watched(&self, tags: &[String]) {
        let m = self;
        for tag in tags {
            let _created = m
                .redis_state_lost
                .get_or_create(&vec![("tag", tag.clone())]);
        }
    }

    /// Redis lost the data tripline keeps for these hash tags since the last
    /// check (their marker keys vanished).
    pub fn redis_state_lost(&self, tags: &[String]) {
        tracing::error!(
            target: "tripline::redis",
            tags = ?tags,
            "Redis lost tripline's data (it restarted without persistence, was flushed, or evicted keys): the alert state of these streams (pending and firing alerts: a firing alert is never resolved now), alerts queued for the sinks and the consumer groups are gone; groups are re-created and alerting starts over from the next readings"
        );
        let m = self;
        for tag in tags {
            m.redis_state_lost
                .get_or_create(&vec![("tag", tag.clone())])
                .inc();
        }
    }

    /// The pending and firing alerts of the shared state, counted; series of
    /// combinations no longer present are removed, not left at their last
    /// value.
    pub fn alerts_active(&self, counts: &BTreeMap<(&'static str, &'static str, String), i64>) {
        self.alerts_active.clear();
        for ((state, severity, rule), n) in counts {
            self.alerts_active
                .get_or_create(&vec![
                    ("state", state.to_string()),
                    ("severity", severity.to_string()),
                    ("rule", rule.clone()),
                ])
                .set(*n);
        }
    }

    pub fn redis_is_up(&self) -> bool {
        !self.redis_down.load(Ordering::SeqCst) && self.redis_up.get() == 1
    }

    pub fn sink_delivered(&self, sink: &str, n: u64) {
        tracing::debug!(target: "tripline::sinks", sink, n, "alerts delivered");
        self.sink_deliveries
            .get_or_create(&vec![("sink", sink.to_string())])
            .inc_by(n);
        self.record.sink_delivered(sink);
    }

    pub fn sink_failed(&self, sink: &str, attempt: u32, error: &str) {
        tracing::warn!(target: "tripline::sinks", sink, attempt, "delivery failed, will retry: {error}");
        self.record.sink_retrying(sink, error);
        let m = self;
        m.sink_failures
            .get_or_create(&vec![("sink", sink.to_string())])
            .inc();
        m.sink_retries
            .get_or_create(&vec![("sink", sink.to_string())])
            .inc();
    }

    pub fn sink_gave_up(&self, sink: &str, n: u64, error: &str) {
        tracing::error!(
            target: "tripline::sinks", sink,
            n,
            "delivery abandoned after all attempts, alerts moved to the sink's dead-letter stream: {error}"
        );
        let m = self;
        let labels = vec![("sink", sink.to_string())];
        // The last attempt failed too; it is just not retried.
        m.sink_failures.get_or_create(&labels).inc();
        m.sink_dead.get_or_create(&labels).inc_by(n);
        self.record.sink_failing(sink, n, error);
    }

    /// A sink's receiver refused a batch for good (e.g. HTTP 400): it goes to
    /// the dead-letter stream at once.
    pub fn sink_rejected(&self, sink: &str, n: u64, error: &str) {
        tracing::error!(
            target: "tripline::sinks", sink,
            n,
            "receiver rejected the batch, alerts moved to the sink's dead-letter stream: {error}"
        );
        let m = self;
        let labels = vec![("sink", sink.to_string())];
        m.sink_failures.get_or_create(&labels).inc();
        m.sink_dead.get_or_create(&labels).inc_by(n);
        self.record.sink_failing(sink, n, error);
    }

    /// Entries in a sink's outboxes not acknowledged yet, from XINFO GROUPS.
    pub fn sink_lag(&self, sink: &str, entries: i64) {
        self.record.sink_backlog(sink, entries);
        self.sink_lag
            .get_or_create(&vec![("sink", sink.to_string())])
            .set(entries);
    }

    /// A sink stopped: its lag is no longer measured, so it is not exported.
    pub fn sink_lag_clear(&self, sink: &str) {
        self.sink_lag.remove(&vec![("sink", sink.to_string())]);
    }

    /// An exec sink's program exited; the next delivery starts a new one.
    pub fn sink_program_exited(&self, sink: &str, pid: u32, status: &str) {
        tracing::warn!(
            target: "tripline::sinks", sink,
            pid,
            "exec program exited ({status}); it restarts on the next delivery"
        );
        self.sink_program_exits
            .get_or_create(&vec![("sink", sink.to_string())])
            .inc();
    }

    /// Pending and lag of one group on one stream, from XINFO GROUPS. Redis
    /// cannot always tell the lag (after XDEL, say); the series is removed then
    /// rather than left at a stale or made-up value.
    pub fn consumer_position(&self, stream: &str, group: &str, pending: i64, lag: Option<i64>) {
        let labels = vec![("stream", stream.to_string()), ("group", group.to_string())];
        let m = self;
        m.consumer_pending.get_or_create(&labels).set(pending);
        match lag {
            Some(lag) => {
                m.consumer_lag.get_or_create(&labels).set(lag);
            }
            None => {
                m.consumer_lag.remove(&labels);
            }
        }
    }

    /// A consumer idle for long with nothing pending was deleted from a group.
    pub fn consumer_removed(&self, stream: &str, group: &str, consumer: &str) {
        tracing::info!(
            target: "tripline::source", stream,
            group,
            consumer,
            "removed an idle consumer with nothing pending"
        );
        self.consumers_removed
            .get_or_create(&vec![
                ("stream", stream.to_string()),
                ("group", group.to_string()),
            ])
            .inc();
    }

    /// A lifecycle commit found the alert state changed by another writer
    /// (`stale`: the partition's generation moved; `conflict`: an alert the
    /// decisions relied on changed); the decisions are taken again.
    pub fn state_redecided(&self, stream: &str, reason: &'static str) {
        tracing::debug!(
            target: "tripline::alert", stream,
            reason,
            "alert state changed under a commit; deciding again"
        );
        self.state_redecisions
            .get_or_create(&vec![
                ("stream", stream.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// Rules or plugins loaded at startup: in sync, and the reload counters
    /// exist (at 0) before the first reload.
    pub fn config_loaded(&self, kind: &str) {
        self.record.reloaded(kind, "startup", true, "loaded");
        let m = self;
        for result in ["success", "failure"] {
            // Created at 0 so `increase()` sees the first reload.
            let _ = m.reloads.get_or_create(&vec![
                ("kind", kind.to_string()),
                ("result", result.to_string()),
            ]);
        }
        m.config_in_sync
            .get_or_create(&vec![("kind", kind.to_string())])
            .set(1);
        m.last_reload
            .get_or_create(&vec![("kind", kind.to_string())])
            .set(unix_now());
    }

    /// The lifecycle withheld a notification: a firing a silence mutes, or the
    /// resolve of an alert whose firing was withheld (`silence` is then empty).
    pub fn alert_silenced(&self, alert: &Alert, silence: &str) {
        tracing::debug!(alert = %alert.name, fingerprint = %alert.fingerprint, status = ?alert.status, silence, "notification withheld by a silence");
        self.alerts_silenced
            .get_or_create(&vec![("rule", alert.rule.clone())])
            .inc();
    }

    /// A sink did not send `alert` because a silence mutes it; it is
    /// acknowledged like a delivered one.
    pub fn sink_silenced(&self, sink: &str, alert: &Alert, silence: &str) {
        tracing::debug!(target: "tripline::sinks", sink, alert = %alert.name, fingerprint = %alert.fingerprint, silence, "alert silenced");
        self.sink_silenced
            .get_or_create(&vec![("sink", sink.to_string())])
            .inc();
    }

    /// A rules or plugins reload finished; `trigger` says what asked for it,
    /// `detail` is what changed or, on failure, the errors (file:line:col).
    pub fn reload(&self, kind: &str, trigger: &str, ok: bool, detail: &str) {
        self.record.reloaded(kind, trigger, ok, detail);
        let m = self;
        let result = if ok { "success" } else { "failure" };
        m.config_in_sync
            .get_or_create(&vec![("kind", kind.to_string())])
            .set(i64::from(ok));
        m.reloads
            .get_or_create(&vec![
                ("kind", kind.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
        if ok {
            m.last_reload
                .get_or_create(&vec![("kind", kind.to_string())])
                .set(unix_now());
            tracing::info!(target: "tripline::reload", kind, trigger, "{kind} reloaded: {detail}");
        } else {
            tracing::error!(
                target: "tripline::reload", kind,
                trigger,
                "{kind} reload failed, the last good {kind} keep running: {}",
                one_line(detail)
            );
        }
    }

    /// The resolves of removed rules' alerts could not be written to the outbox.
    pub fn retired_alerts_unsent(&self, alerts: &[Alert], error: &str) {
        let fingerprints: Vec<&str> = alerts.iter().map(|a| a.fingerprint.as_str()).collect();
        tracing::error!(
            target: "tripline::reload", n = alerts.len(),
            ?fingerprints,
            "cannot write the resolves of removed rules' alerts to the outbox, receivers keep them firing: {error}"
        );
        self.retired_unsent.inc_by(alerts.len() as u64);
    }

    /// A subscription starts consuming `stream`: its message, consumer
    /// cleanup and redecision counters exist (at 0) from now on, so rates
    /// and alerts on them work before the first dead-letter or error.
    pub fn consuming(&self, subscription: &str, stream: &str, group: &str) {
        tracing::info!(target: "tripline::source", subscription, stream, group, "consuming");
        let m = self;
        let labels = vec![("stream", stream.to_string()), ("group", group.to_string())];
        for outcome in ["processed", "dropped", "dead_lettered", "error"] {
            let mut by_outcome = labels.clone();
            by_outcome.push(("outcome", outcome.to_string()));
            let _created = m.messages.get_or_create(&by_outcome);
        }
        let _created = m.consumers_removed.get_or_create(&labels);
        for reason in ["stale", "conflict"] {
            let _created = m.state_redecisions.get_or_create(&vec![
                ("stream", stream.to_string()),
                ("reason", reason.to_string()),
            ]);
        }
    }

    /// A sink dispatcher started (at startup or by the reload that added
    /// it); its counters exist (at 0) from now on, the program exits too for
    /// an exec sink. Its lag is not set here: the dispatcher measures it
    /// first thing, and a 0 before that could hide a backlog.
    pub fn sink_started(&self, sink: &str, kind: &str) {
        tracing::info!(target: "tripline::sinks", sink, kind, "sink started");
        self.record.sink_started(sink, kind);
        let m = self;
        let labels = vec![("sink", sink.to_string())];
        for family in [
            &m.sink_deliveries,
            &m.sink_failures,
            &m.sink_retries,
            &m.sink_dead,
            &m.sink_silenced,
        ] {
            let _created = family.get_or_create(&labels);
        }
        if kind == "exec" {
            let _created = m.sink_program_exits.get_or_create(&labels);
        }
    }

    /// The gateway (and the ingest endpoint with it) serves from now on:
    /// its request counters exist (at 0), so the first refusal shows in
    /// `increase()`; so do the entry counters of every stream ingest may
    /// write.
    pub fn gateway_serving(&self, ingest_streams: &[String]) {
        for result in GATEWAY_RESULTS {
            let _created = self
                .gateway_requests
                .get_or_create(&vec![("result", result.to_string())]);
        }
        for result in Ingest::RESULTS {
            let _created = self
                .ingest_requests
                .get_or_create(&vec![("result", result.to_string())]);
        }
        for stream in ingest_streams {
            let _created = self
                .ingest_entries
                .get_or_create(&vec![("stream", stream.clone())]);
        }
    }

    /// One `POST /api/v1/ingest/{stream}` answered. `stream` comes from
    /// the URL, so entries are counted only once written (to a stream a
    /// subscription reads), and requests by result alone.
    pub fn ingest_request(&self, stream: &str, outcome: &Ingest) {
        let result = outcome.result();
        match outcome {
            Ingest::Accepted(entries) => {
                tracing::debug!(target: "tripline::http", stream, entries, "ingest request written");
                self.ingest_entries
                    .get_or_create(&vec![("stream", stream.to_string())])
                    .inc_by(*entries as u64);
            }
            Ingest::Unavailable(e) => {
                tracing::warn!(target: "tripline::http", stream, "ingest could not write the entries, none was: {e}");
            }
            Ingest::Malformed(why) | Ingest::UnknownStream(why) => {
                tracing::info!(target: "tripline::http", stream, result, "ingest request refused: {why}");
            }
            Ingest::TooLarge | Ingest::Unauthorized => {
                tracing::info!(target: "tripline::http", stream, result, "ingest request refused");
            }
        }
        self.ingest_requests
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    fn gateway_request(&self, result: &str) {
        self.gateway_requests
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// A reading posted to the gateway was appended to `stream`.
    pub fn gateway_accepted(&self, stream: &str, id: &str) {
        tracing::debug!(target: "tripline::http", stream, id, "gateway reading published");
        self.gateway_request("accepted");
    }

    /// A request to the gateway was refused; `result` is the metric label
    /// (malformed, invalid, too_large, unauthorized), `why` the detail.
    pub fn gateway_rejected(&self, result: &'static str, why: &str) {
        tracing::info!(target: "tripline::http", result, "gateway request rejected: {why}");
        self.gateway_request(result);
    }

    /// A valid reading could not be published; the client got 503.
    pub fn gateway_publish_failed(&self, stream: &str, error: &redis::RedisError) {
        tracing::warn!(target: "tripline::http", stream, "gateway could not publish a reading: {error}");
        self.gateway_request("unavailable");
    }
}

/// A `log(level, text)` from a rule.
pub fn rule_log(rule: &str, stream: &str, id: &str, level: tracing::Level, text: &str) {
    use tracing::Level;
    match level {
        Level::TRACE => tracing::trace!(target: "tripline::rule", rule, stream, id, "{text}"),
        Level::DEBUG => tracing::debug!(target: "tripline::rule", rule, stream, id, "{text}"),
        Level::INFO => tracing::info!(target: "tripline::rule", rule, stream, id, "{text}"),
        Level::WARN => tracing::warn!(target: "tripline::rule", rule, stream, id, "{text}"),
        Level::ERROR => tracing::error!(target: "tripline::rule", rule, stream, id, "{text}"),
    }
}

/// Redis refused the marker commands (an ACL without the `tripline:marker:*`
/// keys, …): lost state cannot be detected.
pub fn redis_state_uncheckable(error: &redis::RedisError) {
    tracing::warn!(
        target: "tripline::redis",
        "cannot detect lost Redis data, the marker keys are refused: {error}"
    );
}

/// A sink took over alerts a dead instance had read but not acknowledged.
pub fn sink_adopted(sink: &str, outbox: &str, from: &str, n: u64) {
    tracing::info!(
        target: "tripline::sinks", sink,
        outbox,
        from,
        n,
        "took over alerts left pending by a stopped instance"
    );
}

/// Joins the lines of `text` with "; ": a reload reports every compile
/// error at once, and a multi-line message would break line-based log
/// shipping and grep into pieces that no longer say what failed.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A reload removed `rule`: its state is gone and its firing alerts are
/// resolved (each resolve is counted by [`alert_notified`] once written).
pub fn rule_retired(rule: &str, resolved: usize) {
    tracing::info!(
        target: "tripline::reload", rule,
        resolved,
        "removed rule's state dropped, {resolved} firing alert(s) resolved"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_reload_errors_become_one_line() {
        assert_eq!(
            one_line("rules/a.rhai:2:7: expecting name\nrules/b.rhai:3:1: eof\r\n"),
            "rules/a.rhai:2:7: expecting name; rules/b.rhai:3:1: eof"
        );
        assert_eq!(one_line("added a"), "added a");
    }

    #[test]
    fn families_carry_the_prefix_and_count() {
        let m = Metrics::new(Vec::new());
        m.messages("s", "g", "processed", 3);
        let text = m.encode();
        assert!(
            text.contains(
                "tripline_messages_total{stream=\"s\",group=\"g\",outcome=\"processed\"} 3"
            ),
            "{text}"
        );
        let build = format!(
            "tripline_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::version::VERSION,
            crate::version::COMMIT
        );
        assert!(text.contains(&build), "{text}");
    }
}
