//! `run(settings, shutdown)`: builds the engine, starts every task, and on
//! shutdown drains them in order: stop reading, finish and commit in-flight
//! batches, let the sinks deliver what was committed, exit. Each stage is a
//! function of its own: start HTTP, take an instance name, start the sinks,
//! spawn the consumers, drain.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::alert;
use crate::alert::AlertBook;
use crate::alert::store::Store;
use crate::config::{Settings, Subscription};
use crate::consume::{self, Shared};
use crate::http;
use crate::instance::{cleanup, lease};
use crate::keys::outbox_key;
use crate::process::{LoadedRules, Processor};
use crate::redis_conn;
use crate::reload::Reloader;
use crate::rules::{RuleEngine, RuleError, RuleSet};
use crate::runtime::Runtime;
use crate::sinks::dispatch::Placement;
use crate::sinks::supervisor::Supervisor;
use crate::sinks::{self, Manifest, PluginError};
use crate::status;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
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
    pub engine: Arc<RuleEngine>,
    pub rules: LoadedRules,
    pub plugins: Vec<Manifest>,
}

/// Compiles rules and plugins exactly as the running engine does, the
/// engine bound to `runtime`.
pub fn prepare(config: &Settings, runtime: &Runtime) -> Result<Prepared, AppError> {
    let engine = runtime.rule_engine(&config.limits);
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
pub fn outbox_streams(config: &Settings) -> Vec<String> {
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

pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), AppError> {
    let runtime = Runtime::new();
    let prepared = prepare(&settings, &runtime)?;
    tracing::info!(
        rules = prepared.rules.set.rules.len(),
        sinks = prepared.plugins.iter().filter(|m| m.enabled).count(),
        redis = %settings.redis.endpoint,
        "tripline starting"
    );
    let target = &settings.redis.target;
    let mut tail = Tail::default();
    tail.tasks.spawn(redis_conn::watch_health(
        target.clone(),
        Duration::from_secs(1),
        redis_conn::StateMarkers::new(&consumed_streams(&settings.subscriptions), &runtime.metrics),
        runtime.metrics.clone(),
        tail.stop.clone(),
    ));
    // Before HTTP: the gauge of active alerts counts from its cache.
    let book = Arc::new(runtime.alert_book(settings.alerts.policy));
    let engine_handle = start_http(&settings, &runtime, &book, &mut tail).await?;
    let Some(instance) = take_instance(&settings, &mut tail, &shutdown).await else {
        return Ok(());
    };
    engine_handle.named(&instance);
    // Silences load in the background from here on; the first read is a
    // single round trip, done long before a worker commits an alert.
    tail.tasks.spawn(crate::alert::silence::refresh_loop(
        target.clone(),
        Duration::from_secs(2),
        runtime.silences.clone(),
        tail.stop.clone(),
    ));
    let Some(sinks) =
        start_sinks(&settings, &runtime, &instance, prepared.plugins, &shutdown).await
    else {
        return Ok(());
    };
    let live_rules = Arc::new(ArcSwap::from_pointee(prepared.rules));
    let store = Store::new(
        book.clone(),
        settings.outbox.prefix.clone(),
        settings.outbox.max_len,
    );
    let reloader = start_reloads(
        &settings,
        &runtime,
        &prepared.engine,
        &live_rules,
        &store,
        &sinks,
        &mut tail,
    );
    let shared = Arc::new(Shared {
        processor: Processor {
            engine: prepared.engine,
            rules: live_rules,
            book,
        },
        target: target.clone(),
        store,
        runtime: runtime.clone(),
    });
    let workers_stop = shutdown.child_token();
    let mut workers = spawn_consumers(&settings, &shared, &instance, &workers_stop);
    engine_handle.running(reloader);

    shutdown.cancelled().await;
    engine_handle.stopping();
    let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
    workers_stop.cancel();
    drain_in_order(deadline, &mut workers, &sinks, tail).await;
    Ok(())
}

/// Tasks that must outlive the workers (health, HTTP, lease, silences,
/// reloads), stopped last.
#[derive(Default)]
struct Tail {
    /// Cancelled once workers and sinks are done.
    stop: CancellationToken,
    /// The tasks, awaited (briefly) after `stop`.
    tasks: JoinSet<()>,
}

/// Every stream some subscription reads, once each.
fn consumed_streams(subs: &[Subscription]) -> Vec<String> {
    let mut streams: Vec<String> = subs.iter().flat_map(|s| s.streams.clone()).collect();
    streams.sort();
    streams.dedup();
    streams
}

/// Binds the listener and serves from here on, so `/readyz` says why the
/// engine is not ready yet instead of refusing connections.
async fn start_http(
    settings: &Settings,
    runtime: &Runtime,
    book: &Arc<AlertBook>,
    tail: &mut Tail,
) -> Result<Arc<http::EngineHandle>, AppError> {
    let engine_handle = Arc::new(http::EngineHandle::default());
    let Some(config) = &settings.http else {
        return Ok(engine_handle);
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let target = &settings.redis.target;
    let gateway = config.gateway.as_ref().map(|g| {
        let streams = consumed_streams(&settings.subscriptions);
        http::Gateway::new(g, streams, target.clone(), runtime.metrics.clone())
    });
    let silences = http::silences::SilenceApi::new(target.clone(), config.admin_token.clone());
    let status = Arc::new(status::StatusApi::new(
        settings,
        engine_handle.clone(),
        runtime.metrics.clone(),
    ));
    tail.tasks.spawn(status::gauge_loop(
        status.clone(),
        book.clone(),
        Duration::from_secs(5),
        tail.stop.clone(),
    ));
    tracing::info!(listen = %config.listen, "HTTP listening");
    tail.tasks.spawn(http::serve(
        listener,
        http::router(http::State::new(
            engine_handle.clone(),
            gateway,
            silences,
            config.admin_token.clone(),
            runtime.metrics.clone(),
        ))
        .merge(status.routes()),
        http::ConnectionLimits::of(config),
        tail.stop.clone(),
    ));
    Ok(engine_handle)
}

/// Leases a consumer name unique among live instances and keeps it;
/// `None` when shutdown came first.
async fn take_instance(
    settings: &Settings,
    tail: &mut Tail,
    shutdown: &CancellationToken,
) -> Option<String> {
    let target = &settings.redis.target;
    let (instance, token) = lease::acquire(target, &settings.instance, shutdown).await?;
    tracing::info!(instance, "instance name acquired");
    tail.tasks.spawn(lease::keep(
        target.clone(),
        instance.clone(),
        token,
        tail.stop.clone(),
    ));
    Some(instance)
}

/// Sinks start (and their groups exist) before any worker can write an
/// alert, so no alert is queued before the group that delivers it. `None`
/// when shutdown came first (the sinks started so far are stopped).
async fn start_sinks(
    settings: &Settings,
    runtime: &Runtime,
    instance: &str,
    plugins: Vec<Manifest>,
    shutdown: &CancellationToken,
) -> Option<Arc<Supervisor>> {
    let sinks = Arc::new(Supervisor::new(
        Placement {
            outboxes: outbox_streams(settings),
            consumer: instance.to_string(),
            target: settings.redis.target.clone(),
            runtime: runtime.clone(),
        },
        CancellationToken::new(),
    ));
    tokio::select! {
        _ = sinks.apply(plugins) => Some(sinks),
        _ = shutdown.cancelled() => {
            sinks.stop_all().await;
            None
        }
    }
}

/// The reloader, and the SIGHUP and file-watch triggers that call it.
fn start_reloads(
    settings: &Settings,
    runtime: &Runtime,
    engine: &Arc<RuleEngine>,
    rules: &Arc<ArcSwap<LoadedRules>>,
    store: &Store,
    sinks: &Arc<Supervisor>,
    tail: &mut Tail,
) -> Arc<Reloader> {
    let reloader = Arc::new(Reloader {
        engine: engine.clone(),
        rules: rules.clone(),
        sinks: sinks.clone(),
        rules_dir: settings.rules_dir.clone(),
        plugins_dir: settings.plugins_dir.clone(),
        subscriptions: settings.subscriptions.clone(),
        store: store.clone(),
        target: settings.redis.target.clone(),
        lock: Default::default(),
        runtime: runtime.clone(),
    });
    runtime.metrics.config_loaded("rules");
    runtime.metrics.config_loaded("plugins");
    tail.tasks
        .spawn(reload_on_sighup(reloader.clone(), tail.stop.clone()));
    tail.tasks.spawn(crate::reload::watch::watch(
        reloader.clone(),
        tail.stop.clone(),
    ));
    reloader
}

/// The workers of every subscription, its claimer, and the tasks that
/// stop with them (consumer cleanup, timers, position reports).
fn spawn_consumers(
    settings: &Settings,
    shared: &Arc<Shared>,
    instance: &str,
    stop: &CancellationToken,
) -> JoinSet<()> {
    let target = &settings.redis.target;
    let mut workers = JoinSet::new();
    let subs: Vec<Arc<Subscription>> = settings
        .subscriptions
        .iter()
        .cloned()
        .map(Arc::new)
        .collect();
    let mut own_consumers = vec![instance.to_string()];
    for sub in &subs {
        own_consumers.extend(spawn_subscription(
            sub,
            shared,
            instance,
            stop,
            &mut workers,
        ));
    }
    workers.spawn(cleanup::run(
        target.clone(),
        cleanup::Scope {
            subscriptions: subs
                .iter()
                .flat_map(|s| s.streams.iter().map(|x| (x.clone(), s.group().to_string())))
                .collect(),
            outboxes: outbox_streams(settings),
            own: own_consumers,
        },
        settings.consumer_cleanup.clone(),
        shared.runtime.metrics.clone(),
        stop.clone(),
    ));
    let rules = shared.runtime.rules.clone();
    workers.spawn(alert::timers::run(
        shared.store.clone(),
        target.clone(),
        consumed_streams(&settings.subscriptions),
        settings.alerts.timer_interval,
        move |now| rules.evict_stale(now),
        stop.clone(),
    ));
    workers.spawn(consume::run_position_reporter(
        target.clone(),
        subs,
        Duration::from_secs(5),
        shared.runtime.metrics.clone(),
        stop.clone(),
    ));
    workers
}

/// One subscription's workers and claimer; returns the consumer names they
/// use.
fn spawn_subscription(
    sub: &Arc<Subscription>,
    shared: &Arc<Shared>,
    instance: &str,
    stop: &CancellationToken,
    workers: &mut JoinSet<()>,
) -> Vec<String> {
    for stream in &sub.streams {
        shared
            .runtime
            .metrics
            .consuming(&sub.name, stream, sub.group());
    }
    let consumer_base = sub.consumer.as_deref().unwrap_or(instance);
    // One XREADGROUP covers one hash slot on Cluster: each worker reads
    // one set of streams, and every set gets its share of `concurrency`.
    let parts = shared.target.read_groups(&sub.streams);
    let per_part = sub.concurrency.div_ceil(parts.len());
    for part in parts {
        let part_sub = if part.len() == sub.streams.len() {
            sub.clone()
        } else {
            Arc::new(sub.with_streams(part))
        };
        for i in 0..per_part {
            workers.spawn(consume::run_worker(
                shared.clone(),
                part_sub.clone(),
                format!("{consumer_base}-w{i}"),
                stop.clone(),
            ));
        }
    }
    let claimer = format!("{consumer_base}-claim");
    workers.spawn(consume::run_claimer(
        shared.clone(),
        sub.clone(),
        claimer.clone(),
        stop.clone(),
    ));
    let mut names: Vec<String> = (0..per_part)
        .map(|i| format!("{consumer_base}-w{i}"))
        .collect();
    names.push(claimer);
    names
}

/// Finishes in-flight batches, then lets the sinks deliver what was
/// committed, both by `deadline`; then stops the tail tasks.
async fn drain_in_order(
    deadline: tokio::time::Instant,
    workers: &mut JoinSet<()>,
    sinks: &Supervisor,
    mut tail: Tail,
) {
    tracing::info!("shutting down: finishing in-flight batches");
    if tokio::time::timeout_at(deadline, drain(workers))
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
    tail.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), drain(&mut tail.tasks)).await;
    tracing::info!("tripline stopped");
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
