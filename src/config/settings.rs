//! The validated form of the configuration: what the engine runs with.
//!
//! [`Config`] is the file as written; [`Config::resolve`] checks all of it
//! and returns [`Settings`], with the Redis endpoint parsed, secrets read
//! from their variables, group names, concurrency and the instance name
//! filled in. Every problem found is reported, each at its file and line,
//! so a file with three mistakes takes one run to fix, not three.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::locate::{Seg, line_of};
use super::{
    AlertPolicy, Config, ConfigError, ConsumerCleanup, GatewayConfig, HttpConfig, Limits,
    MAX_SHARDS, OutboxConfig, RedisConfig, SubscriptionConfig,
};
use crate::alert::Policy;
use crate::redis_conn::{RedisEndpoint, RedisTarget};

/// Everything `run` and the commands need, checked and with defaults
/// filled in: nothing downstream parses or defaults a setting again.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file these came from, or `<built-in defaults>`: shown by
    /// `/api/v1/status`.
    pub origin: String,
    /// Where Redis is and how to reach it.
    pub redis: RedisSettings,
    /// Directory holding `**/*.rhai` rules (relative paths already joined to
    /// the config file's directory).
    pub rules_dir: PathBuf,
    /// Directory holding `*.yaml` sink manifests.
    pub plugins_dir: PathBuf,
    /// Base of the consumer names: `instance`, else the host name, else
    /// `tripline`; the consumer lease makes it unique.
    pub instance: String,
    /// Where alerts wait for the sinks.
    pub outbox: OutboxConfig,
    /// Sandbox limits for every rule.
    pub limits: Limits,
    /// Alert notification policy and how often its timers run.
    pub alerts: AlertSettings,
    /// The listener; `None` when `http.enabled` is false.
    pub http: Option<HttpSettings>,
    /// Removal of consumers that are gone.
    pub consumer_cleanup: ConsumerCleanup,
    /// How long SIGINT/SIGTERM waits for in-flight batches and sinks.
    pub shutdown_timeout: Duration,
    /// The consumer groups this instance joins.
    pub subscriptions: Vec<Subscription>,
}

/// The Redis to use, parsed once.
#[derive(Clone)]
pub struct RedisSettings {
    /// Single server or Cluster, for logs and the Cluster-only checks.
    pub endpoint: RedisEndpoint,
    /// What connections are opened from (TLS CA applied).
    pub target: RedisTarget,
}

/// `alerts.*` in the units the lifecycle works in.
#[derive(Debug, Clone, Copy)]
pub struct AlertSettings {
    /// Repeat, auto-resolve and flap limits for the alert book.
    pub policy: Policy,
    /// How often timers (auto-resolve, deadman, flap release) are checked.
    pub timer_interval: Duration,
}

/// `http.*` with its tokens read.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `host:port` to bind.
    pub listen: String,
    /// Bearer token of the endpoints that change the engine; `None`: open.
    pub admin_token: Option<String>,
    /// `None` when `http.gateway.enabled` is false.
    pub gateway: Option<GatewaySettings>,
    /// See [`HttpConfig::header_read_timeout`].
    pub header_read_timeout: Duration,
    /// See [`HttpConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`HttpConfig::max_connections`].
    pub max_connections: usize,
}

/// `http.gateway.*` with its token read.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Stream (or sharded topic) readings are appended to.
    pub stream: String,
    /// Shards of `stream`; above 1 a reading goes to its device's shard.
    pub shards: u32,
    /// Larger bodies get 413 before they are parsed.
    pub max_body_bytes: usize,
    /// Bearer token requests must carry; `None`: no authentication.
    pub token: Option<String>,
}

/// One consumer group over one or more streams, with its defaults filled.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Name used in logs and metrics.
    pub name: String,
    /// Consumer group (the subscription name unless given); read through
    /// [`Subscription::group`], so only validation sets it.
    group: String,
    /// Streams read as one, sharded topics expanded.
    pub streams: Vec<String>,
    /// Globs (relative to `rules_dir`) choosing the rules.
    pub rules: Vec<String>,
    /// Entries per XREADGROUP.
    pub batch_size: usize,
    /// Parallel read/evaluate/commit loops (one per core unless given).
    pub concurrency: usize,
    /// Id the group starts from when it is created.
    pub start_id: String,
    /// Consumer name base; `None`: the leased instance name.
    pub consumer: Option<String>,
    /// How long one XREADGROUP blocks.
    pub block: Duration,
    /// Pending entries idle this long belong to a dead consumer.
    pub claim_min_idle: Duration,
    /// How often to look for such entries.
    pub claim_interval: Duration,
    /// Deliveries after which an entry is dead-lettered.
    pub max_deliveries: u64,
}

/// The target holds clients without `Debug`; the endpoint says it all.
impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The same subscription over a part of its streams (one hash slot's
    /// worth on Cluster).
    pub fn with_streams(&self, streams: Vec<String>) -> Subscription {
        Subscription {
            streams,
            ..self.clone()
        }
    }
}

/// One thing wrong with the configuration, and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// `file:line`, the file alone when the key is not in it, or the
    /// environment variable the value came from.
    pub at: String,
    /// What is wrong, naming the key.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Where the configuration came from, to place problems in it.
#[derive(Debug, Default)]
pub struct Source {
    /// The file's name as the user gave it, or the built-in defaults'.
    pub origin: String,
    /// The file's text; `None` for the built-in defaults.
    pub text: Option<String>,
    /// `REDIS_ADDR` replaced `redis.url`/`redis.cluster`.
    pub redis_from_env: bool,
    /// `TRIPLINE_HTTP_LISTEN` replaced `http.listen`.
    pub listen_from_env: bool,
}

impl Source {
    /// Where the node at `path` is: the environment variable that set it,
    /// else its file and line.
    fn place(&self, path: &[Seg]) -> String {
        let starts =
            |a: &'static str, b: &'static str| path.starts_with(&[Seg::Key(a), Seg::Key(b)]);
        if self.redis_from_env && (starts("redis", "url") || starts("redis", "cluster")) {
            return "REDIS_ADDR".into();
        }
        if self.listen_from_env && starts("http", "listen") {
            return super::HTTP_LISTEN_ENV.into();
        }
        match self.text.as_deref().and_then(|t| line_of(t, path)) {
            Some(line) => format!("{}:{line}", self.origin),
            None => self.origin.clone(),
        }
    }
}

/// Problems found so far; validation goes on after each.
struct Problems<'s> {
    source: &'s Source,
    found: Vec<Problem>,
}

impl Problems<'_> {
    fn add(&mut self, path: &[Seg], message: impl Into<String>) {
        self.found.push(Problem {
            at: self.source.place(path),
            message: message.into(),
        });
    }

    /// The value of `result`, or `None` with its error recorded at `path`.
    fn take<T>(&mut self, path: &[Seg], result: Result<T, String>) -> Option<T> {
        result.map_err(|m| self.add(path, m)).ok()
    }
}

const fn key(k: &'static str) -> Seg<'static> {
    Seg::Key(k)
}

impl Config {
    /// Checks what types cannot (names unique, numbers in range, URL
    /// usable, secrets present) and fills in every default. Reports all
    /// problems at once.
    pub fn resolve(self, source: &Source) -> Result<Settings, ConfigError> {
        let mut p = Problems {
            source,
            found: Vec::new(),
        };
        let redis = resolve_redis(&self.redis, &mut p);
        let is_cluster = redis.as_ref().is_some_and(|r| r.endpoint.is_cluster());
        let subscriptions = resolve_subscriptions(&self.subscriptions, is_cluster, &mut p);
        check_timers(&self.consumer_cleanup, &self.alerts, &mut p);
        check_limits(&self.limits, &mut p);
        let http = match self.http.enabled {
            true => resolve_http(&self.http, &mut p),
            false => None,
        };
        match redis {
            Some(redis) if p.found.is_empty() => Ok(Settings {
                origin: source.origin.clone(),
                redis,
                rules_dir: self.rules_dir,
                plugins_dir: self.plugins_dir,
                instance: instance_name(self.instance),
                outbox: self.outbox,
                limits: self.limits,
                alerts: AlertSettings {
                    policy: self.alerts.policy(),
                    timer_interval: self.alerts.timer_interval,
                },
                http,
                consumer_cleanup: self.consumer_cleanup,
                shutdown_timeout: self.shutdown_timeout,
                subscriptions,
            }),
            _ => Err(ConfigError::Invalid {
                origin: source.origin.clone(),
                problems: p.found,
            }),
        }
    }
}

/// `instance`, else the host name, else `tripline`.
fn instance_name(configured: Option<String>) -> String {
    configured
        .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
        .unwrap_or_else(|| "tripline".into())
}

fn resolve_redis(c: &RedisConfig, p: &mut Problems) -> Option<RedisSettings> {
    let at = match &c.url {
        Some(_) if c.cluster.is_empty() => [key("redis"), key("url")],
        _ => [key("redis"), key("cluster")],
    };
    let endpoint = p.take(&at, c.endpoint())?;
    let ca_at = [key("redis"), key("tls_ca_file")];
    let ca = p.take(&ca_at, c.tls_ca(&endpoint))?;
    let target = RedisTarget::new(&endpoint, c.connect_timeout).map_err(|e| e.to_string());
    let target = p.take(&at, target)?;
    let target = match ca {
        Some(pem) => {
            let file = c.tls_ca_file.as_deref().unwrap_or(Path::new(""));
            let trusted = target
                .with_tls_ca(pem)
                .map_err(|e| format!("`redis.tls_ca_file` {}: {e}", file.display()));
            p.take(&ca_at, trusted)?
        }
        None => target,
    };
    Some(RedisSettings { endpoint, target })
}

fn resolve_subscriptions(
    subs: &[SubscriptionConfig],
    is_cluster: bool,
    p: &mut Problems,
) -> Vec<Subscription> {
    if subs.is_empty() {
        p.add(
            &[key("subscriptions")],
            "`subscriptions` is empty: nothing to consume (leave the key out for the seed's subscriptions)",
        );
    }
    let mut names = HashSet::new();
    let mut groups = HashSet::new();
    let mut resolved = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let at = |k| [key("subscriptions"), Seg::Item(i), key(k)];
        let group = s.group.clone().unwrap_or_else(|| s.name.clone());
        if s.name.trim().is_empty() {
            p.add(&at("name"), "a subscription has an empty `name`");
        } else if !names.insert(s.name.clone()) {
            let name = &s.name;
            p.add(
                &at("name"),
                format!("subscription `{name}`: duplicate subscription name"),
            );
        }
        for stream in &s.streams {
            if !groups.insert((group.clone(), stream.clone())) {
                p.add(
                    &at("streams"),
                    format!(
                        "subscription `{}`: group `{group}` on stream `{stream}` is already used by another subscription",
                        s.name
                    ),
                );
            }
        }
        check_subscription(s, is_cluster, |k, m| p.add(&at(k), m));
        resolved.push(Subscription {
            name: s.name.clone(),
            group,
            streams: s.streams.clone(),
            rules: s.rules.clone(),
            batch_size: s.batch_size,
            concurrency: s.concurrency.unwrap_or_else(cores),
            start_id: s.start_id.clone(),
            consumer: s.consumer.clone(),
            block: s.block,
            claim_min_idle: s.claim_min_idle,
            claim_interval: s.claim_interval,
            max_deliveries: s.max_deliveries,
        });
    }
    resolved
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The checks of one subscription on its own; `add(key, message)` records
/// a problem at one of its keys.
fn check_subscription(
    s: &SubscriptionConfig,
    is_cluster: bool,
    mut add: impl FnMut(&'static str, String),
) {
    let at = format!("subscription `{}`", s.name);
    if s.streams.is_empty() || s.streams.iter().any(|x| x.trim().is_empty()) {
        add("streams", format!("{at}: `streams` must list stream names"));
    }
    for stream in &s.streams {
        if is_cluster && crate::keys::hash_tag(stream).contains(['{', '}']) {
            add(
                "streams",
                format!(
                    "{at}: stream `{stream}` has braces but no hash tag; on Redis Cluster its outbox and dead-letter stream could not share its slot (name it `name:{{tag}}`, or without braces)"
                ),
            );
        }
    }
    if s.batch_size == 0 || s.batch_size > 10_000 {
        add(
            "batch_size",
            format!("{at}: `batch_size` must be 1..=10000"),
        );
    }
    if s.concurrency == Some(0) {
        add(
            "concurrency",
            format!("{at}: `concurrency` must be at least 1"),
        );
    }
    if s.max_deliveries == 0 {
        add(
            "max_deliveries",
            format!("{at}: `max_deliveries` must be at least 1"),
        );
    }
    if s.block.is_zero() {
        add(
            "block",
            format!("{at}: `block` must be positive (0 would block forever)"),
        );
    }
    if s.claim_interval.is_zero() {
        add(
            "claim_interval",
            format!("{at}: `claim_interval` must be positive"),
        );
    }
    for g in &s.rules {
        if let Err(e) = globset::Glob::new(g) {
            add("rules", format!("{at}: bad rule glob `{g}`: {e}"));
        }
    }
}

fn check_timers(cleanup: &ConsumerCleanup, alerts: &AlertPolicy, p: &mut Problems) {
    if !cleanup.max_idle.is_zero() && cleanup.interval.is_zero() {
        p.add(
            &[key("consumer_cleanup"), key("interval")],
            "`consumer_cleanup.interval` must be positive (or set `max_idle: 0s` to turn cleanup off)",
        );
    }
    if alerts.timer_interval.is_zero() {
        p.add(
            &[key("alerts"), key("timer_interval")],
            "`alerts.timer_interval` must be positive",
        );
    }
    if alerts.flap_max_changes > 0 && alerts.flap_window.is_zero() {
        p.add(
            &[key("alerts"), key("flap_window")],
            "`alerts.flap_window` must be positive when `flap_max_changes` is set",
        );
    }
}

/// The longest `limits.max_eval_time` accepted: each rule call holds its
/// message, and the batch, this long.
const MAX_EVAL_TIME_CEILING: Duration = Duration::from_secs(10);

/// Rhai reads 0 as "no limit" for sizes and depths: a 0 here is a typo or
/// a wish to turn the sandbox off, and both get an error.
fn check_limits(l: &Limits, p: &mut Problems) {
    for (name, value) in [
        ("max_operations", l.max_operations),
        ("max_call_levels", l.max_call_levels as u64),
        ("max_string_size", l.max_string_size as u64),
        ("max_array_size", l.max_array_size as u64),
        ("max_map_size", l.max_map_size as u64),
    ] {
        if value == 0 {
            p.add(
                &[key("limits"), key(name)],
                format!("`limits.{name}` must be positive (0 would turn the limit off)"),
            );
        }
    }
    let at = [key("limits"), key("max_eval_time")];
    if l.max_eval_time.is_zero() {
        p.add(&at, "`limits.max_eval_time` must be positive, e.g. `50ms`");
    } else if l.max_eval_time > MAX_EVAL_TIME_CEILING {
        p.add(
            &at,
            format!(
                "`limits.max_eval_time` {} is above {}: one rule call holds its whole batch that long",
                humantime::format_duration(l.max_eval_time),
                humantime::format_duration(MAX_EVAL_TIME_CEILING)
            ),
        );
    }
}

/// Checks the listen address, the connection limits and the gateway; reads
/// the tokens' environment variables, so a missing secret is caught at
/// start-up.
fn resolve_http(c: &HttpConfig, p: &mut Problems) -> Option<HttpSettings> {
    let at = |k| [key("http"), key(k)];
    let listen_ok = match c.listen.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    };
    if !listen_ok {
        p.add(
            &at("listen"),
            format!(
                "`http.listen` `{}` is not host:port (e.g. 127.0.0.1:9464)",
                c.listen
            ),
        );
    }
    let admin = resolve_token(
        &[key("http")],
        ("admin_token", &c.admin_token),
        ("admin_token_env", &c.admin_token_env),
        p,
    );
    for (name, zero, what) in [
        (
            "header_read_timeout",
            c.header_read_timeout.is_zero(),
            "be positive",
        ),
        ("idle_timeout", c.idle_timeout.is_zero(), "be positive"),
        ("max_connections", c.max_connections == 0, "be at least 1"),
    ] {
        if zero {
            p.add(&at(name), format!("`http.{name}` must {what}"));
        }
    }
    let gateway = match c.gateway.enabled {
        true => Some(resolve_gateway(&c.gateway, p)?),
        false => None,
    };
    Some(HttpSettings {
        listen: c.listen.clone(),
        admin_token: admin?,
        gateway,
        header_read_timeout: c.header_read_timeout,
        idle_timeout: c.idle_timeout,
        max_connections: c.max_connections,
    })
}

fn resolve_gateway(g: &GatewayConfig, p: &mut Problems) -> Option<GatewaySettings> {
    let at = |k| [key("http"), key("gateway"), key(k)];
    if g.stream.trim().is_empty() {
        p.add(&at("stream"), "`http.gateway.stream` is empty");
    }
    if !(1..=MAX_SHARDS).contains(&g.shards) {
        p.add(
            &at("shards"),
            format!("`http.gateway.shards` must be 1..={MAX_SHARDS}"),
        );
    }
    if g.max_body_bytes == 0 {
        p.add(
            &at("max_body_bytes"),
            "`http.gateway.max_body_bytes` must be positive",
        );
    }
    let token = resolve_token(
        &[key("http"), key("gateway")],
        ("token", &g.token),
        ("token_env", &g.token_env),
        p,
    )?;
    Some(GatewaySettings {
        stream: g.stream.clone(),
        shards: g.shards,
        max_body_bytes: g.max_body_bytes,
        token,
    })
}

/// A secret given inline or through an environment variable (so it need
/// not be in the file), under `section`; `None` inside: no secret, open.
fn resolve_token(
    section: &[Seg],
    (name, token): (&'static str, &Option<String>),
    (env_name, env): (&'static str, &Option<String>),
    p: &mut Problems,
) -> Option<Option<String>> {
    let dotted = |k: &str| {
        let mut keys: Vec<&str> = section
            .iter()
            .filter_map(|s| match s {
                Seg::Key(k) => Some(*k),
                Seg::Item(_) => None,
            })
            .collect();
        keys.push(k);
        keys.join(".")
    };
    let (key_name, env_key) = (dotted(name), dotted(env_name));
    let (at, result) = match (token, env) {
        (Some(_), Some(_)) => (
            env_name,
            Err(format!("`{key_name}` and `{env_key}` are exclusive")),
        ),
        (Some(t), None) if t.trim().is_empty() => (
            name,
            Err(format!(
                "`{key_name}` is empty; remove it to turn authentication off"
            )),
        ),
        (Some(t), None) => (name, Ok(Some(t.clone()))),
        (None, Some(var)) => (
            env_name,
            match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Ok(Some(t)),
                Ok(_) => Err(format!(
                    "`{env_key}`: environment variable `{var}` is empty"
                )),
                Err(_) => Err(format!(
                    "`{env_key}`: environment variable `{var}` is not set"
                )),
            },
        ),
        (None, None) => (name, Ok(None)),
    };
    let mut path = section.to_vec();
    path.push(key(at));
    p.take(&path, result)
}

impl AlertPolicy {
    fn policy(&self) -> Policy {
        Policy {
            repeat_ms: self.repeat_interval.as_millis() as u64,
            resolve_after_ms: self.resolve_timeout.as_millis() as u64,
            flap_max_changes: self.flap_max_changes,
            flap_window_ms: self.flap_window.as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Settings::parse(text, "t.yaml") {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_line() {
        let text = "\
subscriptions:
  - name: a
    streams: [s]
    batch_size: 0
  - {name: a, streams: [t], block: 0s}
alerts:
  timer_interval: 0s
limits:
  max_eval_time: 1h
http:
  listen: \"9464\"
  gateway:
    token: \"\"
";
        assert_eq!(
            problems(text),
            [
                "t.yaml:4: subscription `a`: `batch_size` must be 1..=10000",
                "t.yaml:5: subscription `a`: duplicate subscription name",
                "t.yaml:5: subscription `a`: `block` must be positive (0 would block forever)",
                "t.yaml:7: `alerts.timer_interval` must be positive",
                "t.yaml:9: `limits.max_eval_time` 1h is above 10s: one rule call holds its whole batch that long",
                "t.yaml:11: `http.listen` `9464` is not host:port (e.g. 127.0.0.1:9464)",
                "t.yaml:13: `http.gateway.token` is empty; remove it to turn authentication off",
            ]
        );
        let err = Settings::parse(text, "t.yaml").unwrap_err().to_string();
        assert!(err.starts_with("t.yaml: 7 problems\nt.yaml:4: "), "{err}");
    }

    #[test]
    fn a_single_problem_is_one_line_naming_file_and_line() {
        let text = "subscriptions:\n  - name: a\n    streams: [s]\n    max_deliveries: 0\n";
        let err = Settings::parse(text, "t.yaml").unwrap_err().to_string();
        assert_eq!(
            err,
            "t.yaml:4: subscription `a`: `max_deliveries` must be at least 1"
        );
    }

    #[test]
    fn a_bad_redis_address_does_not_hide_the_other_problems() {
        let text = "redis:\n  url: \"nohostport\"\nsubscriptions: []\n";
        let found = problems(text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("t.yaml:2: Redis address `nohostport`"));
        assert!(found[1].starts_with("t.yaml:3: `subscriptions` is empty"));
    }

    #[test]
    fn values_from_the_environment_name_their_variable() {
        let mut config = Config::parse("http: {listen: nonsense}\n", "t.yaml").unwrap();
        config.redis.url = Some("nohostport".into());
        let source = Source {
            origin: "t.yaml".into(),
            text: Some("http: {listen: nonsense}\n".into()),
            redis_from_env: true,
            listen_from_env: true,
        };
        let Err(ConfigError::Invalid { problems, .. }) = config.resolve(&source) else {
            panic!("expected problems");
        };
        assert_eq!(problems[0].at, "REDIS_ADDR");
        assert_eq!(problems[1].at, super::super::HTTP_LISTEN_ENV);
    }

    #[test]
    fn defaults_are_filled_in_once() {
        let text = "instance: edge-1\nsubscriptions:\n  - {name: a, streams: [s], concurrency: 3}\n  - {name: b, group: g, streams: [t]}\n";
        let s = Settings::parse(text, "t").unwrap();
        assert_eq!(s.instance, "edge-1");
        assert_eq!(s.subscriptions[0].group(), "a");
        assert_eq!(s.subscriptions[0].concurrency, 3);
        assert_eq!(s.subscriptions[1].group(), "g");
        assert!(s.subscriptions[1].concurrency >= 1);
        let http = s.http.unwrap();
        assert_eq!(http.admin_token, None);
        assert_eq!(http.gateway.unwrap().stream, "packet-counter-errors");
        assert!(!s.redis.endpoint.is_cluster());
    }
}
