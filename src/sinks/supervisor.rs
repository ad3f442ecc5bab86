//! Starts, restarts and stops sink dispatchers as the plugin set changes.
//! A changed sink is stopped (finishing the batch in hand) before its new
//! version starts on the same group and consumer, so alerts queued for it
//! are picked up from its pending list: nothing is lost across a reload.
//! A removed or disabled sink keeps its group in Redis: re-adding it resumes
//! where it stopped.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{BuildContext, Manifest, Sink, dispatch, kind};
use crate::redis_conn::RedisTarget;
use crate::runtime::Runtime;

struct Running {
    source_hash: u64,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// What an [`Supervisor::apply`] changed, for the reload log line.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

pub struct Supervisor {
    running: Mutex<HashMap<String, Running>>,
    /// Outbox streams every sink reads.
    outboxes: Vec<String>,
    /// Consumer name of this instance in every sink group.
    consumer: String,
    target: RedisTarget,
    /// Where the sinks count deliveries and find the silences in force.
    runtime: Runtime,
    /// Cancelled at process shutdown; every dispatcher's stop is its child.
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(
        outboxes: Vec<String>,
        consumer: String,
        target: RedisTarget,
        runtime: Runtime,
        shutdown: CancellationToken,
    ) -> Supervisor {
        Supervisor {
            running: Mutex::new(HashMap::new()),
            outboxes,
            consumer,
            target,
            runtime,
            shutdown,
        }
    }

    /// Makes the running sinks match `manifests` (disabled ones count as
    /// absent). Returns once every started sink's groups exist.
    pub async fn apply(&self, manifests: Vec<Manifest>) -> Changes {
        let mut running = self.running.lock().await;
        let wanted: HashMap<String, Manifest> = manifests
            .into_iter()
            .filter(|m| m.enabled)
            .map(|m| (m.name.clone(), m))
            .collect();
        let mut changes = Changes::default();
        let names: Vec<String> = running.keys().cloned().collect();
        for name in names {
            let keep = wanted
                .get(&name)
                .is_some_and(|m| m.source_hash == running[&name].source_hash);
            if keep {
                continue;
            }
            let r = running.remove(&name).expect("listed");
            r.stop.cancel();
            let _ = r.task.await;
            if wanted.contains_key(&name) {
                changes.changed.push(name);
            } else {
                tracing::info!(sink = %name, "sink stopped");
                changes.removed.push(name);
            }
        }
        let mut readies = Vec::new();
        for (name, m) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            if !changes.changed.contains(&name) {
                changes.added.push(name.clone());
            }
            let kind = kind(&m.kind).expect("kind validated at load");
            let cx = BuildContext {
                sink: name.clone(),
                redis: self.target.clone(),
                timeout: m.timeout,
                base_dir: m.dir(),
                metrics: self.runtime.metrics.clone(),
            };
            let sink: Arc<dyn Sink> = match kind.build(&m.settings, &cx) {
                Ok(s) => Arc::from(s),
                Err(e) => {
                    tracing::error!(sink = %name, "sink failed to build: {e}");
                    continue;
                }
            };
            self.runtime.metrics.sink_started(&name, &m.kind);
            let source_hash = m.source_hash;
            let stop = self.shutdown.child_token();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(dispatch::run(
                sink,
                Arc::new(m),
                self.outboxes.clone(),
                self.consumer.clone(),
                self.target.clone(),
                self.runtime.clone(),
                stop.clone(),
                ready_tx,
            ));
            readies.push(ready_rx);
            running.insert(
                name,
                Running {
                    source_hash,
                    stop,
                    task,
                },
            );
        }
        drop(running);
        for r in readies {
            let _ = r.await;
        }
        changes.added.sort();
        changes.changed.sort();
        changes.removed.sort();
        changes
    }

    /// Stops every sink, letting each deliver what is already queued.
    pub async fn stop_all(&self) {
        let mut running = self.running.lock().await;
        for r in running.values() {
            r.stop.cancel();
        }
        for (_, r) in running.drain() {
            let _ = r.task.await;
        }
    }
}
