//! The configuration file (`tripline.yaml`) as written, with its defaults;
//! [`settings`] turns it into the validated [`Settings`] the engine runs with.
//!
//! Parsing is strict: an unknown key is an error naming the key and its line,
//! because a misspelt `batch_sise` silently falling back to a default is the
//! kind of surprise an operator finds at 3 a.m.

pub mod locate;
pub mod settings;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::redis_conn::RedisEndpoint;
pub use settings::{
    AlertSettings, GatewaySettings, HttpSettings, Problem, RedisSettings, Settings, Source,
    Subscription,
};

/// Names the built-in defaults in errors, where a file name would be.
const BUILT_IN: &str = "<built-in defaults>";

/// Overrides `http.listen`, so a second engine (or the demo) can run beside
/// one holding the default port without editing the file.
pub const HTTP_LISTEN_ENV: &str = "TRIPLINE_HTTP_LISTEN";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    /// Every problem validation found, each with its place.
    #[error("{}", render(origin, problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

/// One problem on its own line; several under a count, so the first line
/// of the error says how many there are to fix.
fn render(origin: &str, problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let lines: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("{origin}: {} problems\n{}", many.len(), lines.join("\n"))
        }
    }
}

/// Top-level configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where Redis is; `REDIS_ADDR` overrides it so the seed's deployments
    /// keep working unchanged.
    pub redis: RedisConfig,
    /// Directory holding `**/*.rhai` rules, relative to the config file.
    pub rules_dir: PathBuf,
    /// Directory holding `*.yaml` sink manifests, relative to the config file.
    pub plugins_dir: PathBuf,
    /// Base of the consumer names; default is the host name. Two instances on
    /// one host get distinct names through the consumer lease, not this.
    pub instance: Option<String>,
    /// Where alerts wait for the sinks.
    pub outbox: OutboxConfig,
    /// Sandbox limits for every rule.
    pub limits: Limits,
    /// Alert notification policy.
    pub alerts: AlertPolicy,
    /// HTTP listener (metrics, health, gateway).
    pub http: HttpConfig,
    /// Removal of consumers that are gone (instances scaled away, renamed
    /// hosts) from the groups tripline reads.
    pub consumer_cleanup: ConsumerCleanup,
    /// How long SIGINT/SIGTERM waits for in-flight batches and sinks.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// The consumer groups this instance joins; absent means the seed's
    /// (see [`seed_subscriptions`]), so a config that only moves Redis
    /// still runs the shipped rules.
    pub subscriptions: Vec<SubscriptionConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `host:port`, `redis://[user:pass@]host:port[/db]`, `rediss://…`,
    /// `unix:///path`, or `redis+cluster://host:port,host:port` for a Redis
    /// Cluster. Unset: `127.0.0.1:6379`, unless `cluster` is given.
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`host:port` or `redis://` URLs), the
    /// readable alternative to a `redis+cluster://` URL; exclusive with `url`.
    pub cluster: Vec<String>,
    /// How long one connection attempt may take before backing off.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// PEM file of the CA certificate(s) a `rediss://` server's certificate
    /// must chain to, relative to the config file; unset, the system's
    /// trust store is used. For a Redis behind a private CA.
    pub tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// The outbox of stream `S` is `<prefix>:{S}`: the braces keep it in S's
    /// hash slot so it can share one atomic commit with S's XACK on Redis Cluster.
    pub prefix: String,
    /// Approximate cap on each outbox stream (XADD MAXLEN ~), so a sink that
    /// is down for days cannot exhaust Redis memory.
    pub max_len: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerCleanup {
    /// A consumer idle this long with nothing pending is deleted (XGROUP
    /// DELCONSUMER); `0s` keeps every consumer.
    #[serde(with = "humantime_serde")]
    pub max_idle: Duration,
    /// How often the groups are checked.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Rhai operations one rule may spend on one message; stops `loop {}`.
    pub max_operations: u64,
    /// Maximum function call depth (runaway recursion).
    pub max_call_levels: usize,
    /// Largest string a rule may build, in bytes.
    pub max_string_size: usize,
    /// Largest array a rule may build.
    pub max_array_size: usize,
    /// Largest map a rule may build.
    pub max_map_size: usize,
    /// Wall-clock time one rule may spend on one message. The operations
    /// limit counts steps, not their cost: a loop growing an array is
    /// quadratic and took seconds per message under it alone.
    #[serde(with = "humantime_serde")]
    pub max_eval_time: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertPolicy {
    /// A still-firing alert is sent to the sinks again at most this often.
    #[serde(with = "humantime_serde")]
    pub repeat_interval: Duration,
    /// A firing alert not re-asserted for this long resolves by itself;
    /// `0s` turns that off (alerts then resolve only through `resolve`).
    #[serde(with = "humantime_serde")]
    pub resolve_timeout: Duration,
    /// An alert changing state more often than this within `flap_window`
    /// is held (no notifications) until it settles; 0 turns detection off.
    pub flap_max_changes: u32,
    #[serde(with = "humantime_serde")]
    pub flap_window: Duration,
    /// How often timers (auto-resolve, deadman, flap release) are checked.
    #[serde(with = "humantime_serde")]
    pub timer_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the listener for /metrics, /healthz, /readyz and the gateway.
    pub listen: String,
    /// Turning it off is for tests and one-shot tools, not production.
    pub enabled: bool,
    /// `POST /telemetry-data`, the seed's gateway for collectors that cannot
    /// speak Redis, and `POST /api/v1/ingest/{stream}` for other producers.
    pub gateway: GatewayConfig,
    /// Bearer token the endpoints that change the engine (`POST /-/reload`,
    /// `POST`/`DELETE /api/silences`) require; none means open, which is
    /// only safe while `listen` is a loopback address.
    pub admin_token: Option<String>,
    /// Environment variable holding the admin token. Exclusive with
    /// `admin_token`.
    pub admin_token_env: Option<String>,
    /// A request's headers must be complete this long after the connection
    /// is ready for one (just opened, or kept alive after a response): a
    /// client trickling header bytes, or sending nothing, cannot hold a
    /// descriptor longer.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no byte moving either way for this long is closed
    /// (a stalled request body, a client that stopped reading).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog, so a
    /// flood cannot exhaust tripline's descriptors (Redis needs some too).
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Off when the listener is reachable by parties that must not publish.
    pub enabled: bool,
    /// Stream the accepted readings are appended to, in Watermill's envelope.
    pub stream: String,
    /// Above 1, `stream` is a sharded topic: a reading goes to the shard
    /// `<stream>:{n}` its `hostname` hashes to (see [`crate::shard`]).
    pub shards: u32,
    /// Larger bodies get 413 before they are parsed: a reading is a few
    /// hundred bytes, so anything near this is a mistake or an attack.
    pub max_body_bytes: usize,
    /// Bearer token a request must present; none means no authentication.
    pub token: Option<String>,
    /// Environment variable holding the token, so the secret need not be
    /// written in the config file. Exclusive with `token`.
    pub token_env: Option<String>,
}

/// One consumer group over one or more streams, with its own rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// Consumer group; defaults to the subscription name.
    #[serde(default)]
    pub group: Option<String>,
    /// Streams read as one; a sharded topic (`{topic: S, shards: N}`) is
    /// expanded here into its streams `S:{0}` … `S:{N-1}`.
    #[serde(deserialize_with = "deserialize_streams")]
    pub streams: Vec<String>,
    /// Globs (relative to `rules_dir`) choosing the rules; default all.
    #[serde(default = "default_rule_globs")]
    pub rules: Vec<String>,
    /// Entries per XREADGROUP.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Parallel read/evaluate/commit loops; default one per core.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Id the group starts from when it is created.
    #[serde(default = "default_start_id")]
    pub start_id: String,
    /// Consumer name base; default `<instance>` (the host name).
    #[serde(default)]
    pub consumer: Option<String>,
    /// How long one XREADGROUP blocks; also bounds how long shutdown waits
    /// for a read in progress.
    #[serde(default = "default_block", with = "humantime_serde")]
    pub block: Duration,
    /// Pending entries idle this long belong to a dead consumer and are claimed.
    #[serde(default = "default_claim_min_idle", with = "humantime_serde")]
    pub claim_min_idle: Duration,
    /// How often to look for such entries.
    #[serde(default = "default_claim_interval", with = "humantime_serde")]
    pub claim_interval: Duration,
    /// Deliveries after which an entry is dead-lettered instead of retried.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u64,
}

/// Most shards a topic may have: far more than nodes in any cluster, few
/// enough that a typo (`shards: 80000`) is caught.
pub const MAX_SHARDS: u32 = 1024;

/// An entry of a subscription's `streams`: a stream name, or a topic split
/// over several streams.
enum StreamSpec {
    Name(String),
    Sharded(ShardedTopic),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardedTopic {
    /// The topic; its streams are `<topic>:{0}` … `<topic>:{shards-1}`.
    topic: String,
    /// How many streams the topic is split over.
    shards: u32,
}

impl<'de> Deserialize<'de> for StreamSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = StreamSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a stream name or {topic: NAME, shards: N}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StreamSpec, E> {
                Ok(StreamSpec::Name(v.to_string()))
            }
            // A stream may be named `2024`: YAML reads that as a number.
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StreamSpec, E> {
                Ok(StreamSpec::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<StreamSpec, A::Error> {
                ShardedTopic::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(StreamSpec::Sharded)
            }
        }
        d.deserialize_any(Visit)
    }
}

fn deserialize_streams<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    use serde::de::Error;
    let mut streams = Vec::new();
    for spec in Vec::<StreamSpec>::deserialize(d)? {
        match spec {
            StreamSpec::Name(s) => streams.push(s),
            StreamSpec::Sharded(t) => {
                if t.topic.trim().is_empty() || t.topic.contains(['{', '}']) {
                    return Err(D::Error::custom(format!(
                        "sharded topic `{}`: the name must be non-empty and without braces (its streams are `<topic>:{{n}}`)",
                        t.topic
                    )));
                }
                if !(1..=MAX_SHARDS).contains(&t.shards) {
                    return Err(D::Error::custom(format!(
                        "sharded topic `{}`: `shards` must be 1..={MAX_SHARDS}",
                        t.topic
                    )));
                }
                streams.extend(crate::shard::shard_streams(&t.topic, t.shards));
            }
        }
    }
    Ok(streams)
}

fn default_rule_globs() -> Vec<String> {
    vec!["**/*.rhai".into()]
}
fn default_batch_size() -> usize {
    100
}
fn default_start_id() -> String {
    "0".into()
}
fn default_block() -> Duration {
    Duration::from_millis(1000)
}
fn default_claim_min_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_claim_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_max_deliveries() -> u64 {
    5
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redis: RedisConfig::default(),
            rules_dir: "rules".into(),
            plugins_dir: "plugins".into(),
            instance: None,
            outbox: OutboxConfig::default(),
            limits: Limits::default(),
            alerts: AlertPolicy::default(),
            http: HttpConfig::default(),
            consumer_cleanup: ConsumerCleanup::default(),
            shutdown_timeout: Duration::from_secs(10),
            subscriptions: seed_subscriptions(),
        }
    }
}

/// The seed system's consumer groups: two on `packet-counter-errors` (every
/// message reaches both) and one on the transceiver readings. The seed's
/// collectors write `transceiver_telemetry`; `transceiver-telemetry` is read
/// too, for publishers that followed tripline's earlier default.
pub fn seed_subscriptions() -> Vec<SubscriptionConfig> {
    let sub = |name: &str, streams: &[&str], rules: &str| SubscriptionConfig {
        name: name.into(),
        group: Some(name.into()),
        streams: streams.iter().map(|s| s.to_string()).collect(),
        rules: vec![rules.into()],
        batch_size: default_batch_size(),
        concurrency: None,
        start_id: default_start_id(),
        consumer: None,
        block: default_block(),
        claim_min_idle: default_claim_min_idle(),
        claim_interval: default_claim_interval(),
        max_deliveries: default_max_deliveries(),
    };
    vec![
        sub(
            "packet-error-alerts",
            &["packet-counter-errors"],
            "packet_errors/alert*.rhai",
        ),
        sub(
            "packet-error-logs",
            &["packet-counter-errors"],
            "packet_errors/log*.rhai",
        ),
        sub(
            "transceiver-alerts",
            &["transceiver_telemetry", "transceiver-telemetry"],
            "transceiver/*.rhai",
        ),
    ]
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            cluster: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            tls_ca_file: None,
        }
    }
}

/// Start of a certificate in a PEM file.
const CERTIFICATE_PEM: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// Redis when neither `redis.url`, `redis.cluster` nor `REDIS_ADDR` says.
pub const DEFAULT_REDIS: &str = "127.0.0.1:6379";

impl RedisConfig {
    /// The configured Redis, single server or Cluster.
    pub fn endpoint(&self) -> Result<RedisEndpoint, String> {
        match (&self.url, self.cluster.is_empty()) {
            (Some(_), false) => {
                Err("`redis.url` and `redis.cluster` are exclusive; keep one".into())
            }
            (Some(url), true) => RedisEndpoint::parse(url),
            (None, false) => RedisEndpoint::cluster_of(&self.cluster),
            (None, true) => RedisEndpoint::parse(DEFAULT_REDIS),
        }
    }

    /// The contents of `tls_ca_file`, checked to be usable: readable, PEM
    /// with at least one certificate, and for a `rediss://` server (on any
    /// other address it would silently do nothing).
    fn tls_ca(&self, endpoint: &RedisEndpoint) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let at = format!("`redis.tls_ca_file` {}", path.display());
        match endpoint {
            RedisEndpoint::Single(url) if url.starts_with("rediss://") => {}
            RedisEndpoint::Single(_) => {
                return Err(format!(
                    "{at} is set, but the Redis address is not a `rediss://` URL"
                ));
            }
            RedisEndpoint::Cluster(_) => {
                return Err(format!(
                    "{at}: a TLS CA file is supported for a single Redis server, not a Cluster"
                ));
            }
        }
        let pem = std::fs::read(path).map_err(|e| format!("{at}: cannot read: {e}"))?;
        if !pem
            .windows(CERTIFICATE_PEM.len())
            .any(|w| w == CERTIFICATE_PEM)
        {
            return Err(format!(
                "{at} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"
            ));
        }
        Ok(Some(pem))
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            prefix: "tripline:alerts".into(),
            max_len: 1_000_000,
        }
    }
}

impl Default for ConsumerCleanup {
    /// The seed's: every 5 minutes, consumers idle for 10.
    fn default() -> Self {
        ConsumerCleanup {
            max_idle: Duration::from_secs(600),
            interval: Duration::from_secs(300),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_levels: 32,
            max_string_size: 64 * 1024,
            max_array_size: 10_000,
            max_map_size: 10_000,
            max_eval_time: Duration::from_millis(50),
        }
    }
}

impl Default for AlertPolicy {
    fn default() -> Self {
        AlertPolicy {
            repeat_interval: Duration::from_secs(4 * 3600),
            resolve_timeout: Duration::ZERO,
            flap_max_changes: 0,
            flap_window: Duration::from_secs(600),
            timer_interval: Duration::from_secs(1),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
            enabled: true,
            gateway: GatewayConfig::default(),
            admin_token: None,
            admin_token_env: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            enabled: true,
            stream: "packet-counter-errors".into(),
            shards: 1,
            max_body_bytes: 64 * 1024,
            token: None,
            token_env: None,
        }
    }
}

impl Settings {
    /// Loads `path`, or `./tripline.yaml` when it exists, or the built-in
    /// defaults (the seed's setup, the same as the shipped `tripline.yaml`);
    /// then applies `REDIS_ADDR` and `TRIPLINE_HTTP_LISTEN` and validates.
    /// Relative paths are made relative to the file's directory.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let implicit = Path::new("tripline.yaml");
        let chosen = match path {
            Some(p) => Some(p.to_path_buf()),
            None if implicit.exists() => Some(implicit.to_path_buf()),
            None => None,
        };
        let mut source = Source {
            origin: BUILT_IN.into(),
            ..Source::default()
        };
        let mut config = match &chosen {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                source.origin = p.display().to_string();
                let mut c = Config::parse(&text, &source.origin)?;
                source.text = Some(text);
                let base = p.parent().unwrap_or(Path::new("."));
                c.rules_dir = base.join(&c.rules_dir);
                c.plugins_dir = base.join(&c.plugins_dir);
                c.redis.tls_ca_file = c.redis.tls_ca_file.map(|f| base.join(f));
                c
            }
            None => Config::default(),
        };
        if let Ok(addr) = std::env::var("REDIS_ADDR")
            && !addr.trim().is_empty()
        {
            config.redis.url = Some(addr.trim().to_string());
            config.redis.cluster.clear();
            source.redis_from_env = true;
        }
        if let Ok(listen) = std::env::var(HTTP_LISTEN_ENV)
            && !listen.trim().is_empty()
        {
            config.http.listen = listen.trim().to_string();
            source.listen_from_env = true;
        }
        config.resolve(&source)
    }

    /// Parses and validates YAML text as it stands (no environment, paths
    /// as written); `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Settings, ConfigError> {
        Config::parse(text, origin)?.resolve(&Source {
            origin: origin.into(),
            text: Some(text.into()),
            ..Source::default()
        })
    }
}

impl Config {
    /// Parses YAML text; `origin` names it in errors. A file with no
    /// settings at all (empty, or only comments) is the built-in defaults.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        if let Ok(serde_yaml::Value::Null) = serde_yaml::from_str(text) {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped file, read at test time: the binary no longer embeds it.
    fn shipped() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tripline.yaml")).unwrap()
    }

    fn built_in() -> Source {
        Source {
            origin: BUILT_IN.into(),
            ..Source::default()
        }
    }

    #[test]
    fn shipped_config_parses_and_validates() {
        let c = Settings::parse(&shipped(), "shipped").unwrap();
        assert!(c.subscriptions.len() >= 3);
    }

    #[test]
    fn built_in_defaults_are_the_seed_setup() {
        let c = Config::default().resolve(&built_in()).unwrap();
        assert_eq!(c.rules_dir, Path::new("rules"));
        assert_eq!(c.plugins_dir, Path::new("plugins"));
        assert_eq!(c.http.unwrap().listen, "127.0.0.1:9464");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        let subs: Vec<(&str, &str, Vec<&str>, Vec<&str>)> = c
            .subscriptions
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.group(),
                    s.streams.iter().map(String::as_str).collect(),
                    s.rules.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            subs,
            [
                (
                    "packet-error-alerts",
                    "packet-error-alerts",
                    vec!["packet-counter-errors"],
                    vec!["packet_errors/alert*.rhai"]
                ),
                (
                    "packet-error-logs",
                    "packet-error-logs",
                    vec!["packet-counter-errors"],
                    vec!["packet_errors/log*.rhai"]
                ),
                (
                    "transceiver-alerts",
                    "transceiver-alerts",
                    vec!["transceiver_telemetry", "transceiver-telemetry"],
                    vec!["transceiver/*.rhai"]
                ),
            ]
        );
        for s in &c.subscriptions {
            assert_eq!(
                (s.batch_size, s.claim_min_idle, s.max_deliveries),
                (100, Duration::from_secs(60), 5),
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn config_without_subscriptions_gets_the_seeds() {
        let c = Settings::parse("redis: {url: \"10.0.0.1:6379\"}\n", "t").unwrap();
        let names: Vec<&str> = c.subscriptions.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "packet-error-alerts",
                "packet-error-logs",
                "transceiver-alerts"
            ]
        );
        for empty in ["{}", "", "# only a comment\n"] {
            let c = Settings::parse(empty, "t").unwrap();
            assert_eq!(c.subscriptions.len(), 3, "{empty:?}");
        }
    }

    #[test]
    fn seed_rule_globs_select_shipped_rules() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
        for s in seed_subscriptions() {
            for g in &s.rules {
                let m = globset::Glob::new(g).unwrap().compile_matcher();
                let found = walk(Path::new(dir))
                    .iter()
                    .any(|p| m.is_match(p.strip_prefix(dir).unwrap()));
                assert!(found, "{}: `{g}` selects no shipped rule", s.name);
            }
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "rhai") {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "subscriptions:\n  - name: a\n    streams: [s]\n    batch_sise: 3\n";
        let err = Config::parse(text, "t.yaml").unwrap_err().to_string();
        assert!(err.contains("batch_sise"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    fn endpoint(yaml: &str) -> Result<RedisEndpoint, String> {
        let text = format!("redis:\n{yaml}subscriptions:\n  - {{name: a, streams: [s]}}\n");
        let c = Settings::parse(&text, "t").map_err(|e| e.to_string())?;
        Ok(c.redis.endpoint)
    }

    #[test]
    fn redis_single_or_cluster() {
        assert_eq!(
            endpoint("  connect_timeout: 1s\n").unwrap(),
            RedisEndpoint::Single("redis://127.0.0.1:6379/".into())
        );
        assert_eq!(
            endpoint("  cluster: [\"10.0.0.1:7000\", \"redis://10.0.0.2:7000/\"]\n").unwrap(),
            RedisEndpoint::Cluster(vec![
                "redis://10.0.0.1:7000/".into(),
                "redis://10.0.0.2:7000/".into()
            ])
        );
        assert_eq!(
            endpoint("  url: \"redis+cluster://10.0.0.1:7000\"\n").unwrap(),
            RedisEndpoint::Cluster(vec!["redis://10.0.0.1:7000/".into()])
        );
        let err = endpoint("  url: \"h:1\"\n  cluster: [\"h:2\"]\n").unwrap_err();
        assert!(err.contains("exclusive"), "{err}");
        let err = endpoint("  cluster: [\"nohostport\"]\n").unwrap_err();
        assert!(err.contains("nohostport"), "{err}");
    }

    #[test]
    fn tls_ca_file_must_hold_a_certificate_and_go_with_rediss() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let not_pem = dir.path().join("key.txt");
        let truncated = dir.path().join("truncated.pem");
        std::fs::write(&ca, TEST_CA).unwrap();
        std::fs::write(
            &truncated,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(&not_pem, "hello").unwrap();
        let check = |url: &str, file: &Path| {
            let mut c =
                Config::parse("subscriptions:\n  - {name: a, streams: [s]}\n", "t").unwrap();
            c.redis.url = Some(url.into());
            c.redis.tls_ca_file = Some(file.to_path_buf());
            c.resolve(&Source {
                origin: "t".into(),
                ..Source::default()
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        check("rediss://127.0.0.1:6380/", &ca).unwrap();
        let err = check("redis://127.0.0.1:6379/", &ca).unwrap_err();
        assert!(err.contains("not a `rediss://` URL"), "{err}");
        let err = check("rediss://127.0.0.1:6380/", &not_pem).unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = check("rediss://127.0.0.1:6380/", &dir.path().join("gone.pem")).unwrap_err();
        assert!(err.contains("gone.pem: cannot read"), "{err}");
        // Parsed when the settings are built, so `tripline check` sees it.
        let err = check("rediss://127.0.0.1:6380/", &truncated).unwrap_err();
        assert!(err.contains("truncated.pem: Unable to parse"), "{err}");
    }

    /// A self-signed CA certificate (its key thrown away): TLS settings are
    /// built while loading, so the file must hold a real certificate.
    const TEST_CA: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBjjCCATOgAwIBAgIUehfk8M9WYty/Eqn0mHpz7ZE13yIwCgYIKoZIzj0EAwIw\n\
GzEZMBcGA1UEAwwQdHJpcGxpbmUgdGVzdCBDQTAgFw0yNjExMjgwOTE3MjZaGA8y\n\
MTI2MTEwNDA5MTcyNlowGzEZMBcGA1UEAwwQdHJpcGxpbmUgdGVzdCBDQTBZMBMG\n\
ByqGSM49AgEGCCqGSM49AwEHA0IABFL17Tk12nEII8KBmHrG3ejaQudaE7beFFKQ\n\
ckgMBHTUkdVh7Cl8uj0Ye8D8+KylHnQmhFkd1I/Meo7Y8SgsnfKjUzBRMB0GA1Ud\n\
DgQWBBQD47rz02nTbCpqZ7br3b/sp6T5ezAfBgNVHSMEGDAWgBQD47rz02nTbCpq\n\
Z7br3b/sp6T5ezAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDJ\n\
FvlOkIEg2URBnLb0F4Q624z9GHLsLKP/FL7k71PZFwIhAN0joX5qjhMOgaS65Lqa\n\
dbIwh2dEIpUCT/uBN9T9hoLj\n\
-----END CERTIFICATE-----\n";

    fn validate_http(yaml: &str) -> Result<(), String> {
        let text = format!("http:\n{yaml}subscriptions:\n  - {{name: a, streams: [s]}}\n");
        Settings::parse(&text, "t")
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn gateway_settings_are_validated() {
        validate_http("  gateway: {token: s3cret, max_body_bytes: 100}\n").unwrap();
        let err = validate_http("  gateway: {token: a, token_env: B}\n").unwrap_err();
        assert!(err.contains("exclusive"), "{err}");
        let err = validate_http("  gateway: {token: \"\"}\n").unwrap_err();
        assert!(err.contains("`http.gateway.token` is empty"), "{err}");
        let err = validate_http("  gateway: {token_env: TRIPLINE_TEST_VARIABLE_NOBODY_SETS}\n")
            .unwrap_err();
        assert!(
            err.contains("`TRIPLINE_TEST_VARIABLE_NOBODY_SETS` is not set"),
            "{err}"
        );
        let err = validate_http("  gateway: {max_body_bytes: 0}\n").unwrap_err();
        assert!(err.contains("max_body_bytes"), "{err}");
        let err = validate_http("  gateway: {stream: \" \"}\n").unwrap_err();
        assert!(err.contains("`http.gateway.stream` is empty"), "{err}");
        let err = validate_http("  listen: \"9464\"\n").unwrap_err();
        assert!(err.contains("`http.listen` `9464`"), "{err}");
        let err = validate_http("  gateway: {tokn: x}\n").unwrap_err();
        assert!(err.contains("tokn"), "{err}");
    }

    #[test]
    fn connection_limits_are_validated() {
        validate_http("  header_read_timeout: 2s\n  idle_timeout: 1m\n  max_connections: 64\n")
            .unwrap();
        let err = validate_http("  header_read_timeout: 0s\n").unwrap_err();
        assert!(
            err.contains("`http.header_read_timeout` must be positive"),
            "{err}"
        );
        let err = validate_http("  idle_timeout: 0s\n").unwrap_err();
        assert!(
            err.contains("`http.idle_timeout` must be positive"),
            "{err}"
        );
        let err = validate_http("  max_connections: 0\n").unwrap_err();
        assert!(
            err.contains("`http.max_connections` must be at least 1"),
            "{err}"
        );
        let err = validate_http("  header_read_timeout: soon\n").unwrap_err();
        assert!(err.contains("header_read_timeout"), "{err}");
    }

    #[test]
    fn disabled_parts_skip_their_validation() {
        validate_http("  enabled: false\n  listen: nonsense\n").unwrap();
        validate_http(
            "  gateway: {enabled: false, token_env: TRIPLINE_TEST_VARIABLE_NOBODY_SETS}\n",
        )
        .unwrap();
    }

    #[test]
    fn sharded_topics_expand() {
        let text =
            "subscriptions:\n  - name: a\n    streams: [plain, {topic: t, shards: 3}, 2024]\n";
        let c = Settings::parse(text, "t").unwrap();
        assert_eq!(
            c.subscriptions[0].streams,
            ["plain", "t:{0}", "t:{1}", "t:{2}", "2024"]
        );
        let bad = |streams: &str| {
            let text = format!("subscriptions:\n  - name: a\n    streams: {streams}\n");
            Config::parse(&text, "t").unwrap_err().to_string()
        };
        let err = bad("[{topic: t, shard: 3}]");
        assert!(err.contains("unknown field `shard`"), "{err}");
        let err = bad("[{topic: t, shards: 0}]");
        assert!(err.contains("1..=1024"), "{err}");
        let err = bad("[{topic: \"t:{1}\", shards: 2}]");
        assert!(err.contains("without braces"), "{err}");
    }

    #[test]
    fn cluster_rejects_streams_without_a_usable_tag() {
        let text = "redis: {url: \"redis+cluster://h:1\"}\nsubscriptions:\n  - {name: a, streams: [\"a{}b\"]}\n";
        let err = Settings::parse(text, "t").unwrap_err();
        assert!(err.to_string().contains("no hash tag"), "{err}");
        let text = "subscriptions:\n  - {name: a, streams: [\"a{}b\"]}\n";
        Settings::parse(text, "t").unwrap();
    }

    fn validate_limits(yaml: &str) -> Result<(), String> {
        let text = format!("limits:\n{yaml}subscriptions:\n  - {{name: a, streams: [s]}}\n");
        Settings::parse(&text, "t")
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn max_eval_time_rejects_zero_nonsense_and_hours() {
        validate_limits("  max_eval_time: 20ms\n").unwrap();
        let err = validate_limits("  max_eval_time: 0s\n").unwrap_err();
        assert!(
            err.contains("`limits.max_eval_time` must be positive"),
            "{err}"
        );
        let err = validate_limits("  max_eval_time: soon\n").unwrap_err();
        assert!(err.contains("max_eval_time"), "{err}");
        let err = validate_limits("  max_eval_time: 1h\n").unwrap_err();
        assert!(err.contains("is above 10s"), "{err}");
    }

    #[test]
    fn a_zero_size_limit_is_not_silently_unlimited() {
        let err = validate_limits("  max_array_size: 0\n").unwrap_err();
        assert!(
            err.contains("`limits.max_array_size` must be positive"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_group_on_stream_is_rejected() {
        let text = "subscriptions:\n  - {name: a, group: g, streams: [s]}\n  - {name: b, group: g, streams: [s]}\n";
        let err = Settings::parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("already used"), "{err}");
    }
}
