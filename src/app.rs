//! `run(config, shutdown)`: builds the engine, starts every task, and on
//! shutdown drains them in order: stop reading, finish and commit in-flight
//! batches, let the sinks deliver what was committed, exit.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::alert::store::Store;
use crate::alert::{self, AlertBook};
use crate::config::{Config, Subscription};
use crate::keys::outbox_key;
use crate::process::{LoadedRules, Processor};
use crate::redis_conn;
use crate::reload::Reloader;
use crate::rules::{RuleError, RuleSet, build_engine};
use crate::sinks::supervisor::Supervisor;
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
    /// A bad HTTP setting (a token variable unset, …) found at start-up.
    #[error("{0}")]
    Gateway(String),
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
    let endpoint = config.redis.endpoint().map_err(AppError::RedisAddr)?;
    let target = config.redis.target().map_err(AppError::RedisAddr)?;
    let prepared = prepare(&config)?;
    tracing::info!(
        rules = prepared.rules.set.rules.len(),
        sinks = prepared.plugins.iter().filter(|m| m.enabled).count(),
        redis = %endpoint,
        "tripline starting"
    );
    let live_rules = Arc::new(ArcSwap::from_pointee(prepared.rules));
    let book = Arc::new(AlertBook::new(config.alerts.policy()));
    let processor = Processor {
        engine: prepared.engine.clone(),
        rules: live_rules.clone(),
        book: book.clone(),
    };
    let store = Store::new(book, config.outbox.prefix.clone(), config.outbox.max_len);

    // Tasks that must outlive the workers (HTTP, lease, sinks) stop on `tail`.
    let tail = CancellationToken::new();
    let mut tail_tasks = JoinSet::new();
    let consumed: Vec<String> = config
        .subscriptions
        .iter()
        .flat_map(|s| s.streams.iter().cloned())
        .collect();
    tail_tasks.spawn(redis_conn::watch_health(
        target.clone(),
        Duration::from_secs(1),
        redis_conn::StateMarkers::new(&consumed),
        tail.clone(),
    ));
    // HTTP serves from here on: /readyz says why we are not ready yet.
    let engine_handle = Arc::new(http::EngineHandle::default());
    if config.http.enabled {
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .map_err(|source| AppError::Listen {
                addr: config.http.listen.clone(),
                source,
            })?;
        let admin_token = config.http.admin_token().map_err(AppError::Gateway)?;
        let gateway = if config.http.gateway.enabled {
            let token = config.http.gateway.token().map_err(AppError::Gateway)?;
            Some(http::Gateway::new(
                &config.http.gateway,
                token,
                target.clone(),
            ))
        } else {
            None
        };
        tracing::info!(listen = %config.http.listen, "HTTP listening");
        tail_tasks.spawn(http::serve(
            listener,
            http::State::new(
                engine_handle.clone(),
                gateway,
                crate::http_silences::SilenceApi::new(target.clone(), admin_token.clone()),
                admin_token,
            ),
            http::ConnectionLimits::of(&config.http),
            tail.clone(),
        ));
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

    // Silences load in the background from here on; the first read is a
    // single round trip, done long before a worker commits an alert.
    tail_tasks.spawn(crate::alert::silence::refresh_loop(
        target.clone(),
        Duration::from_secs(2),
        tail.clone(),
    ));
    // Sinks start (and their groups exist) before any worker can write an
    // alert, so no alert is queued before the group that delivers it.
    let sinks = Arc::new(Supervisor::new(
        outbox_streams(&config),
        instance.clone(),
        target.clone(),
        CancellationToken::new(),
    ));
    tokio::select! {
        _ = sinks.apply(prepared.plugins) => {}
        _ = shutdown.cancelled() => {
            sinks.stop_all().await;
            return Ok(());
        }
    }
    let reloader = Arc::new(Reloader {
        engine: prepared.engine,
        rules: live_rules,
        sinks: sinks.clone(),
        rules_dir: config.rules_dir.clone(),
        plugins_dir: config.plugins_dir.clone(),
        subscriptions: config.subscriptions.clone(),
        store: store.clone(),
        target: target.clone(),
        lock: Default::default(),
    });
    metrics::config_loaded("rules");
    metrics::config_loaded("plugins");
    tail_tasks.spawn(reload_on_sighup(reloader.clone(), tail.clone()));
    tail_tasks.spawn(crate::reload::watch::watch(reloader.clone(), tail.clone()));

    let shared = Arc::new(Shared {
        processor,
        target: target.clone(),
        store: store.clone(),
    });
    let workers_stop = shutdown.child_token();
    let mut workers = JoinSet::new();
    let subs: Vec<Arc<_>> = config.subscriptions.iter().cloned().map(Arc::new).collect();
    let mut own_consumers = vec![instance.clone()];
    for sub in &subs {
        for stream in &sub.streams {
            metrics::consuming(&sub.name, stream, sub.group());
        }
        let consumer_base = sub.consumer.clone().unwrap_or_else(|| instance.clone());
        // One XREADGROUP covers one hash slot on Cluster: each worker reads
        // one set of streams, and every set gets its share of `concurrency`.
        let parts = target.read_groups(&sub.streams);
        let per_part = sub.concurrency().div_ceil(parts.len());
        for part in parts {
            let part_sub = if part.len() == sub.streams.len() {
                sub.clone()
            } else {
                Arc::new(Subscription {
                    streams: part,
                    ..(**sub).clone()
                })
            };
            for i in 0..per_part {
                workers.spawn(source::run_worker(
                    shared.clone(),
                    part_sub.clone(),
                    format!("{consumer_base}-w{i}"),
                    workers_stop.clone(),
                ));
            }
        }
        own_consumers.extend((0..per_part).map(|i| format!("{consumer_base}-w{i}")));
        own_consumers.push(format!("{consumer_base}-claim"));
        workers.spawn(source::run_claimer(
            shared.clone(),
            sub.clone(),
            format!("{consumer_base}-claim"),
            workers_stop.clone(),
        ));
    }
    workers.spawn(source::cleanup::run(
        target.clone(),
        source::cleanup::Scope {
            subscriptions: subs
                .iter()
                .flat_map(|s| s.streams.iter().map(|x| (x.clone(), s.group().to_string())))
                .collect(),
            outboxes: outbox_streams(&config),
            own: own_consumers,
        },
        config.consumer_cleanup.clone(),
        workers_stop.clone(),
    ));
    let mut streams: Vec<String> = subs.iter().flat_map(|s| s.streams.clone()).collect();
    streams.sort();
    streams.dedup();
    workers.spawn(alert::timers::run(
        store,
        target.clone(),
        streams,
        config.alerts.timer_interval,
        crate::rules::state::evict_stale,
        workers_stop.clone(),
    ));
    workers.spawn(source::run_position_reporter(
        target.clone(),
        subs.clone(),
        Duration::from_secs(5),
        workers_stop.clone(),
    ));

    engine_handle.running(reloader);

    shutdown.cancelled().await;
    engine_handle.stopping();
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
    if tokio::time::timeout_at(deadline, sinks.stop_all())
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

async fn reload_on_sighup(reloader: Arc<Reloader>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload through the file watcher or HTTP");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => { reloader.reload("SIGHUP").await; }
            _ = stop.cancelled() => return,
        }
    }
}

async fn drain(set: &mut JoinSet<()>) {
    while set.join_next().await.is_some() {}
}
