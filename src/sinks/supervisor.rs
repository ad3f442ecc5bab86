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

use super::dispatch::{self, Placement};
use super::{BuildContext, Manifest, Sink, kind};

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
    /// Where every sink reads, and the runtime it counts into.
    placement: Placement,
    /// Cancelled at process shutdown; every dispatcher's stop is its child.
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(placement: Placement, shutdown: CancellationToken) -> Supervisor {
        Supervisor {
            running: Mutex::new(HashMap::new()),
            placement,
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
                redis: self.placement.target.clone(),
                timeout: m.timeout,
                base_dir: m.dir(),
                metrics: self.placement.runtime.metrics.clone(),
            };
            let sink: Arc<dyn Sink> = match kind.build(&m.settings, &cx) {
                Ok(s) => Arc::from(s),
                Err(e) => {
                    tracing::error!(sink = %name, "sink failed to build: {e}");
                    continue;
                }
            };
            self.placement.runtime.metrics.sink_started(&name, &m.kind);
            let source_hash = m.source_hash;
            let stop = self.shutdown.child_token();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(dispatch::run(
                sink,
                Arc::new(m),
                self.placement.clone(),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::keys::ALERT_FIELD;
    use crate::keys::sink_group;
    use crate::runtime::Runtime;
    use crate::sinks::manifest;
    use crate::test_redis::TestRedis;

    const OUTBOX: &str = "tripline:outbox:{errors}";

    fn sink_groups(con: &mut redis::Connection) -> Vec<String> {
        let reply: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(OUTBOX)
            .query(con)
            .unwrap();
        crate::group_reader::reply::parse_groups(reply)
            .into_iter()
            .map(|(g, _, _)| g)
            .collect()
    }

    #[tokio::test]
    async fn apply_starts_restarts_and_stops_sinks_as_the_manifests_change() {
        let redis = TestRedis::start();
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new();
        let supervisor = Supervisor::new(
            Placement {
                outboxes: vec![OUTBOX.to_string()],
                consumer: "i1".into(),
                target: redis.target(),
                runtime: runtime.clone(),
            },
            CancellationToken::new(),
        );
        let manifest = |text: &str| manifest::parse(&dir.path().join("file.yaml"), text).unwrap();
        let v1 = "name: file\nkind: file\npath: out.jsonl\n";
        let v2 = "name: file\nkind: file\npath: out.jsonl\nbatch_size: 5\n";
        let off = "name: file\nkind: file\npath: out.jsonl\nenabled: false\n";
        let names = |n: &[&str]| n.iter().map(ToString::to_string).collect::<Vec<_>>();

        let changes = supervisor.apply(vec![manifest(v1)]).await;
        assert_eq!(changes.added, names(&["file"]), "{changes:?}");
        let mut con = redis.conn();
        assert_eq!(
            sink_groups(&mut con),
            [sink_group("file")],
            "groups exist on return"
        );
        assert!(
            runtime
                .metrics
                .encode()
                .contains("tripline_sink_deliveries_total{sink=\"file\"} 0")
        );
        let alert = crate::sinks::dispatch::tests::alert("r1");
        let _: String = redis::cmd("XADD")
            .arg(OUTBOX)
            .arg("*")
            .arg(ALERT_FIELD)
            .arg(serde_json::to_string(&alert).unwrap())
            .query(&mut con)
            .unwrap();
        let out = dir.path().join("out.jsonl");
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&out).map_or(0, |t| t.lines().count()) < 1 {
            assert!(
                std::time::Instant::now() < until,
                "the started sink delivers"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        assert_eq!(
            supervisor.apply(vec![manifest(v1)]).await,
            Changes::default(),
            "an unchanged manifest keeps its sink running"
        );
        let changes = supervisor.apply(vec![manifest(v2)]).await;
        assert_eq!(changes.changed, names(&["file"]), "{changes:?}");
        let changes = supervisor.apply(vec![manifest(off)]).await;
        assert_eq!(
            changes.removed,
            names(&["file"]),
            "disabled counts as removed"
        );
        assert_eq!(supervisor.apply(Vec::new()).await, Changes::default());
        assert_eq!(
            sink_groups(&mut con),
            [sink_group("file")],
            "a removed sink keeps its group"
        );
        supervisor.stop_all().await;
    }
}
