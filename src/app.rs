//! `run(config, shutdown)`: builds the engine, starts every task, and on
//! shutdown drains them in order: stop reading, finish and commit in-flight
//! batches, let the sinks deliver what was committed, exit.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::alert::AlertBook;
use crate::config::{Config, redis_url};
use crate::outbox::outbox_key;
use crate::process::{LoadedRules, Processor};
use crate::redis_conn::{Backoff, LazyConn, RedisTarget, note_error, pause};
use crate::rules::{RuleError, RuleSet, build_engine};
use crate::sinks::{self, Manifest, PluginError};
use crate::source::{self, Shared, lease};
use crate::{http, metrics};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    #[error("invalid Redis address: {0}")]
    RedisAddr(String),
    #[error("rules failed to load:\n{0}")]
    Rules(#[from] RuleError),
    #[error("plugins failed to load:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Plugins(Vec<PluginError>),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// Everything `check` validates and `run` needs before touching Redis.
pub struct Prepared {
    pub engine: Arc<rhai::Engine>,
    pub rules: LoadedRules,
    pub plugins: Vec<Manifest>,
}

/// Compiles rules and plugins exactly as the running engine does.
pub fn prepare(config: &Config) -> Result<Prepared, AppError> {
    let engine = build_engine(&config.limits);
    let set = RuleSet::load(&engine, &config.rules_dir)?;
    let rules = LoadedRules::new(set, &config.subscriptions);
    for sub in &config.subscriptions {
        if rules.selections.get(&sub.name).is_none_or(|s| s.is_empty()) {
            tracing::warn!(
                subscription = %sub.name,
                globs = ?sub.rules,
                "no rule matches this subscription; its messages are acknowledged without evaluation"
            );
        }
    }
    let plugins = sinks::load_dir(&config.plugins_dir).map_err(AppError::Plugins)?;
    Ok(Prepared {
        engine,
        rules,
        plugins,
    })
}

/// Every outbox stream the subscriptions write to.
pub fn outbox_streams(config: &Config) -> Vec<String> {
    let mut keys: Vec<String> = config
        .subscriptions
        .iter()
        .flat_map(|s| s.streams.iter())
        .map(|s| outbox_key(&config.outbox.prefix, s))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AppError> {
    let url = redis_url(&config.redis.url).map_err(AppError::RedisAddr)?;
    let target = RedisTarget::new(&url, config.redis.connect_timeout)
        .map_err(|e| AppError::RedisAddr(e.to_string()))?;
    let prepared = prepare(&config)?;
    tracing::info!(
        rules = prepared.rules.set.rules.len(),
        sinks = prepared.plugins.iter().filter(|m| m.enabled).count(),
        redis = %redact(&url),
        "tripline starting"
    );
    let processor = Processor {
        engine: prepared.engine,
        rules: Arc::new(ArcSwap::from_pointee(prepared.rules)),
        book: Arc::new(AlertBook::new(config.alerts.repeat_interval)),
    };

    // Tasks that must outlive the workers (HTTP, lease, sinks) stop on `tail`.
    let tail = CancellationToken::new();
    let mut tail_tasks = JoinSet::new();
    if config.http.enabled {
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .map_err(|source| AppError::Listen {
                addr: config.http.listen.clone(),
                source,
            })?;
        tracing::info!(listen = %config.http.listen, "HTTP listening");
        tail_tasks.spawn(http::serve(listener, http::State::new(), tail.clone()));
    }

    let base = config
        .instance
        .clone()
        .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
        .unwrap_or_else(|| "tripline".into());
    let Some((instance, token)) = lease::acquire(&target, &base, &shutdown).await else {
        return Ok(());
    };
    tracing::info!(instance, "instance name acquired");
    tail_tasks.spawn(lease::keep(
        target.clone(),
        instance.clone(),
        token,
        tail.clone(),
    ));

    let outboxes = outbox_streams(&config);
    let sinks_enabled: Vec<Manifest> = prepared.plugins.into_iter().filter(|m| m.enabled).collect();
    if !create_sink_groups(&target, &sinks_enabled, &outboxes, &shutdown).await {
        return Ok(());
    }
    let sinks_finish = CancellationToken::new();
    let mut sink_tasks = JoinSet::new();
    for m in sinks_enabled {
        let build = sinks::builder(&m.kind).expect("validated at load");
        let sink: Arc<dyn sinks::Sink> = Arc::from(build(&m.settings).expect("validated at load"));
        tracing::info!(sink = %m.name, kind = %m.kind, "sink started");
        sink_tasks.spawn(sinks::dispatch::run(
            sink,
            Arc::new(m),
            outboxes.clone(),
            instance.clone(),
            target.clone(),
            sinks_finish.clone(),
        ));
    }

    let shared = Arc::new(Shared {
        processor,
        target: target.clone(),
        outbox_prefix: config.outbox.prefix.clone(),
        outbox_max_len: config.outbox.max_len,
    });
    let workers_stop = shutdown.child_token();
    let mut workers = JoinSet::new();
    let subs: Vec<Arc<_>> = config.subscriptions.iter().cloned().map(Arc::new).collect();
    for sub in &subs {
        let consumer_base = sub.consumer.clone().unwrap_or_else(|| instance.clone());
        for i in 0..sub.concurrency() {
            workers.spawn(source::run_worker(
                shared.clone(),
                sub.clone(),
                format!("{consumer_base}-w{i}"),
                workers_stop.clone(),
            ));
        }
        workers.spawn(source::run_claimer(
            shared.clone(),
            sub.clone(),
            format!("{consumer_base}-claim"),
            workers_stop.clone(),
        ));
    }
    workers.spawn(source::run_position_reporter(
        target.clone(),
        subs.clone(),
        Duration::from_secs(5),
        workers_stop.clone(),
    ));

    shutdown.cancelled().await;
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    tracing::info!("shutting down: finishing in-flight batches");
    workers_stop.cancel();
    if tokio::time::timeout_at(deadline, drain(&mut workers))
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown timeout reached with batches in flight; they stay pending and will be redelivered"
        );
    }
    tracing::info!("flushing sinks");
    sinks_finish.cancel();
    if tokio::time::timeout_at(deadline, drain(&mut sink_tasks))
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown timeout reached before sinks finished; undelivered alerts stay queued in the outbox"
        );
    }
    tail.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), drain(&mut tail_tasks)).await;
    tracing::info!("tripline stopped");
    Ok(())
}

async fn drain(set: &mut JoinSet<()>) {
    while set.join_next().await.is_some() {}
}

/// Creates every sink's group before any worker can write an alert, so no
/// alert is written before the group that should deliver it exists.
async fn create_sink_groups(
    target: &RedisTarget,
    sinks: &[Manifest],
    outboxes: &[String],
    shutdown: &CancellationToken,
) -> bool {
    let mut conn = LazyConn::new(target.clone(), Duration::from_secs(5));
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let mut result = Ok(());
        for m in sinks {
            result = match conn.get().await {
                Ok(c) => sinks::dispatch::ensure_groups(c, &m.name, outboxes, "$").await,
                Err(e) => Err(e),
            };
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
                metrics::redis_reachable();
                return true;
            }
            Err(e) => {
                note_error("creating sink groups", &e);
                conn.reset();
                if !pause(&mut backoff, shutdown).await {
                    return false;
                }
            }
        }
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let user = cred.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_password() {
        assert_eq!(super::redact("redis://u:secret@h:1/"), "redis://u:***@h:1/");
        assert_eq!(super::redact("redis://h:1/"), "redis://h:1/");
    }
}
