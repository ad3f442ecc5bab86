//! What tripline is doing, for the person on call: the read API
//! (`/api/v1/alerts`, `/api/v1/rules`, `/api/v1/status`), Alertmanager's API
//! v2 where it fits ([`am_v2`], so `amtool` and Grafana work), and the
//! status page at `/` ([`page`]).
//!
//! Alerts come from the shared alert state in Redis ([`alerts`]), so every
//! instance answers for the whole group. Rules, reloads and sinks are this
//! instance's: its loaded rule set, its counters (read back from its own
//! metrics registry) and what its [`crate::metrics::record`] noted as
//! events happened.

pub mod alerts;
pub mod am_v2;
pub mod page;
pub mod rules;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::alert::AlertBook;
use crate::alert::silence::{self, Silence};
use crate::clock::now_ms;
use crate::config::Settings;
use crate::http::EngineHandle;
use crate::metrics::Metrics;
use crate::metrics::record;
use crate::redis_conn::{LazyConn, RedisConn, RedisEndpoint, RedisTarget};
use alerts::{AlertView, Filter};

/// What the handlers read from: the engine, Redis, and the settings that
/// name the streams and groups.
pub struct StatusApi {
    /// Its reloader holds the live rules and sinks (once the engine runs).
    engine: Arc<EngineHandle>,
    /// Where the alert state and silences are.
    target: RedisTarget,
    /// Shown with its password masked.
    endpoint: RedisEndpoint,
    /// Per subscription: its name, group and streams.
    subscriptions: Vec<(String, String, Vec<String>)>,
    /// Every stream consumed, once: their state hashes hold the alerts.
    streams: Vec<String>,
    /// Bearer token the mutating Alertmanager endpoints require.
    admin_token: Option<String>,
    /// The counters `/api/v1/rules` reads back, what the events recorded,
    /// and the gauge of active alerts.
    metrics: Arc<Metrics>,
    /// The config file `run` loaded (or the built-in defaults).
    config_file: String,
    /// For the uptime.
    started: std::time::Instant,
}

impl StatusApi {
    pub fn new(settings: &Settings, engine: Arc<EngineHandle>, metrics: Arc<Metrics>) -> StatusApi {
        let subscriptions: Vec<(String, String, Vec<String>)> = settings
            .subscriptions
            .iter()
            .map(|s| (s.name.clone(), s.group().to_string(), s.streams.clone()))
            .collect();
        let mut streams: Vec<String> = subscriptions
            .iter()
            .flat_map(|(_, _, s)| s.iter().cloned())
            .collect();
        streams.sort();
        streams.dedup();
        StatusApi {
            engine,
            target: settings.redis.target.clone(),
            endpoint: settings.redis.endpoint.clone(),
            subscriptions,
            streams,
            admin_token: settings.http.as_ref().and_then(|h| h.admin_token.clone()),
            metrics,
            config_file: settings.origin.clone(),
            started: std::time::Instant::now(),
        }
    }

    fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/api/v1/alerts", get(v1_alerts))
            .route("/api/v1/rules", get(v1_rules))
            .route("/api/v1/status", get(v1_status))
            .route("/", get(page::page))
            .with_state(self.clone())
            .merge(am_v2::routes(self))
    }

    /// Runs `f` on the instance's shared connection
    /// ([`crate::http::with_redis`]).
    async fn redis<T>(
        &self,
        f: impl AsyncFnOnce(&mut RedisConn) -> redis::RedisResult<T>,
    ) -> Result<T, Response> {
        crate::http::with_redis(&self.target, f).await
    }

    /// Every pending and firing alert matching `filter`, with the silences
    /// that mute each, and the active silences.
    async fn alerts(&self, filter: &Filter) -> Result<(Vec<AlertView>, Vec<Silence>), Response> {
        let now = now_ms();
        let (mut all, silences) = self
            .redis(async |c| {
                let a = alerts::read(c, &self.streams).await?;
                let s = silence::list(c, now).await?;
                Ok((a, s))
            })
            .await?;
        all.retain(|a| filter.matches(a));
        alerts::mark_silenced(&mut all, &silences, now);
        Ok((all, silences))
    }

    /// The rules as this instance runs them; empty while it starts.
    fn rules(&self) -> Vec<rules::RuleView> {
        match self.engine.reloader() {
            Some(r) => rules::views(&r.rules.load(), &self.subscriptions, &self.metrics),
            None => Vec::new(),
        }
    }

    async fn status(&self) -> StatusView {
        let cluster = self.endpoint.is_cluster();
        let streams: Vec<String> = self.streams.clone();
        let probe = self
            .redis(async |c| {
                let nodes = if cluster {
                    cluster_nodes(c).await?
                } else {
                    Vec::new()
                };
                let mut groups = BTreeMap::new();
                for stream in &streams {
                    let reply: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
                        redis::cmd("XINFO")
                            .arg("GROUPS")
                            .arg(stream)
                            .query_async(c)
                            .await;
                    // A stream nobody wrote to yet has no groups to show.
                    if let Ok(reply) = reply {
                        groups.insert(stream.clone(), reply.groups);
                    }
                }
                Ok((nodes, groups))
            })
            .await;
        let reachable = probe.is_ok();
        let (nodes, groups) = probe.unwrap_or_default();
        let subscriptions = self
            .subscriptions
            .iter()
            .map(|(name, group, streams)| SubscriptionView {
                name: name.clone(),
                group: group.clone(),
                streams: streams
                    .iter()
                    .map(|s| {
                        let g = groups
                            .get(s)
                            .and_then(|gs| gs.iter().find(|g| &g.name == group));
                        GroupView {
                            stream: s.clone(),
                            lag: g.and_then(|g| g.lag),
                            pending: g.map(|g| g.pending),
                            consumers: g.map(|g| g.consumers),
                        }
                    })
                    .collect(),
            })
            .collect();
        StatusView {
            version: env!("CARGO_PKG_VERSION"),
            build: BuildView {
                profile: if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
                target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            },
            instance: self.engine.instance().map(str::to_string),
            uptime_seconds: self.uptime_seconds().floor(),
            config_file: self.config_file.clone(),
            redis: RedisView {
                endpoint: self.endpoint.to_string(),
                cluster,
                reachable,
                nodes,
            },
            reloads: self.metrics.record.reloads(),
            subscriptions,
            sinks: self.metrics.record.sinks(),
        }
    }
}

/// `CLUSTER NODES`, one `address flags` line per node.
async fn cluster_nodes(c: &mut RedisConn) -> redis::RedisResult<Vec<String>> {
    let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(c).await?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let _id = parts.next()?;
            let addr = parts.next()?;
            let flags = parts.next()?;
            let addr = addr.split('@').next().unwrap_or(addr);
            Some(format!("{addr} {}", flags.replace("myself,", "")))
        })
        .collect())
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// `/api/v1/status`.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub version: &'static str,
    pub build: BuildView,
    /// The leased consumer name; `None` while the instance starts.
    pub instance: Option<String>,
    pub uptime_seconds: f64,
    pub config_file: String,
    pub redis: RedisView,
    /// By kind: `rules`, `plugins`.
    pub reloads: BTreeMap<String, record::Reload>,
    pub subscriptions: Vec<SubscriptionView>,
    /// By sink name.
    pub sinks: BTreeMap<String, record::Sink>,
}

#[derive(Debug, Serialize)]
pub struct BuildView {
    /// `release` or `debug`.
    pub profile: &'static str,
    /// `arch-os` the binary was built for.
    pub target: String,
}

#[derive(Debug, Serialize)]
pub struct RedisView {
    /// The configured address, password replaced by `***`.
    pub endpoint: String,
    pub cluster: bool,
    /// Whether this request reached it.
    pub reachable: bool,
    /// Cluster nodes as `address flags`; empty for a single server.
    pub nodes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SubscriptionView {
    pub name: String,
    pub group: String,
    pub streams: Vec<GroupView>,
}

/// The group on one stream, from `XINFO GROUPS`; `None` where Redis does not
/// know (the stream or group does not exist yet, or the lag is unknowable).
#[derive(Debug, Serialize)]
pub struct GroupView {
    pub stream: String,
    pub lag: Option<usize>,
    pub pending: Option<usize>,
    pub consumers: Option<usize>,
}

/// `filter` query parameters (repeatable), in the silences' matcher syntax.
fn filters(query: &[(String, String)]) -> Result<Filter, String> {
    let texts: Vec<&str> = query
        .iter()
        .filter(|(k, _)| k == "filter")
        .map(|(_, v)| v.as_str())
        .collect();
    Filter::parse(&texts)
}

async fn v1_alerts(
    State(api): State<Arc<StatusApi>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let filter = match filters(&query) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match api.alerts(&filter).await {
        Ok((alerts, _)) => Json(json!({ "alerts": alerts })).into_response(),
        Err(r) => r,
    }
}

async fn v1_rules(State(api): State<Arc<StatusApi>>) -> Response {
    Json(json!({ "rules": api.rules() })).into_response()
}

async fn v1_status(State(api): State<Arc<StatusApi>>) -> Response {
    Json(api.status().await).into_response()
}

/// Keeps the `tripline_alerts_active` gauge equal to the shared alert state
/// until `stop`: every instance exports the group's counts (aggregate them
/// with `max`, not `sum`).
///
/// A partition `book` (this instance's cache) holds as Redis does is
/// counted from the cache; any other is read whole (with a deadman watch
/// per router, megabytes), so on a connection of its own: on the shared one
/// its reply held up every commit and ack queued behind it, and decoding it
/// on a reactor thread held up every task there (measured at 5,000 alerting
/// readings/s with 50,000 alerts: gaps of 100–250 ms every 5 s in the
/// processing of both groups). [`alerts::count`] reads and decodes it a
/// page at a time.
pub async fn gauge_loop(
    api: Arc<StatusApi>,
    book: Arc<AlertBook>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut conn = LazyConn::own(api.target.clone(), Duration::from_secs(10));
    loop {
        let counted = match conn.get().await {
            Ok(c) => alerts::count(c, &api.streams, Some(&book)).await,
            Err(e) => Err(e),
        };
        match counted {
            Ok(counts) => api.metrics.alerts_active(&counts),
            Err(_) => conn.reset(),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
