//! What happens to one stream entry, independent of where it came from:
//! decode, run the subscription's rules, turn their actions into alert
//! notifications. The consumer loop, `replay` and `test` all call this, so a
//! rule behaves the same offline as in production.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rhai::{Dynamic, Engine, Map};

use crate::alert::{Alert, AlertBook, Origin, Status, Transition, fingerprint};
use crate::decode;
use crate::rules::{LogLevel, RuleSet};

/// A compiled rule set plus, per subscription, which of its rules apply.
/// Swapped whole on reload, so a batch sees one consistent version.
pub struct LoadedRules {
    pub set: RuleSet,
    /// Subscription name → indices into `set.rules`, in path order.
    pub selections: HashMap<String, Vec<usize>>,
}

impl LoadedRules {
    pub fn new(set: RuleSet, subscriptions: &[crate::config::Subscription]) -> LoadedRules {
        let selections = subscriptions
            .iter()
            .map(|s| (s.name.clone(), set.select(&s.rules)))
            .collect();
        LoadedRules { set, selections }
    }
}

/// Everything needed to judge a message.
pub struct Processor {
    pub engine: Arc<Engine>,
    /// The live rule set; reload stores a new one, readers load it per batch.
    pub rules: Arc<ArcSwap<LoadedRules>>,
    /// Which alerts are firing, shared by every worker of this instance.
    pub book: Arc<AlertBook>,
}

/// One entry to judge.
pub struct Input<'a> {
    pub subscription: &'a str,
    pub group: &'a str,
    pub stream: &'a str,
    pub id: &'a str,
    /// This delivery's ordinal (1 for a first read).
    pub deliveries: u64,
    pub fields: &'a [(Vec<u8>, Vec<u8>)],
    /// Milliseconds since the epoch; virtual in `test` and `replay`.
    pub now_ms: u64,
}

#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// The rules ran; `dropped` if one called `drop()`.
    Processed { dropped: bool, rule_errors: usize },
    /// The entry could not be decoded: it goes to the dead-letter stream.
    Undecodable(String),
}

/// The result of judging one entry.
pub struct Output {
    pub verdict: Verdict,
    /// Notifications to commit to the outbox with this entry's ack.
    pub notifications: Vec<Alert>,
    /// Alert-book changes to undo if that commit fails.
    pub transitions: Vec<Transition>,
    /// Log lines the rules asked for: (rule, level, text).
    pub logs: Vec<(String, LogLevel, String)>,
    /// Rules that failed on this entry: (rule, error with file:line:col), so
    /// `test` and `replay` can show why, not only how many.
    pub errors: Vec<(String, String)>,
    /// The rule that called `drop()`, if one did.
    pub dropped_by: Option<String>,
}

impl Processor {
    pub fn process(&self, loaded: &LoadedRules, input: &Input) -> Output {
        let mut out = Output {
            verdict: Verdict::Processed {
                dropped: false,
                rule_errors: 0,
            },
            notifications: Vec::new(),
            transitions: Vec::new(),
            logs: Vec::new(),
            errors: Vec::new(),
            dropped_by: None,
        };
        let decoded = match decode::decode(input.fields) {
            Ok(d) => d,
            Err(e) => {
                out.verdict = Verdict::Undecodable(e.to_string());
                return out;
            }
        };
        let Some(selected) = loaded.selections.get(input.subscription) else {
            return out;
        };
        let ctx = context(input, decoded.metadata, decoded.uuid);
        let msg = decoded.body.into_shared();
        let results =
            loaded
                .set
                .evaluate(&self.engine, selected, input.stream, &msg, &ctx, input.id);
        let mut dropped = false;
        let mut rule_errors = 0;
        let now = rfc3339(input.now_ms);
        for r in results {
            let rule = &loaded.set.rules[r.rule];
            let actions = match r.outcome {
                Ok(actions) => actions,
                Err(text) => {
                    rule_errors += 1;
                    out.errors.push((rule.name.clone(), text));
                    continue;
                }
            };
            if actions.drop {
                dropped = true;
                out.dropped_by = Some(rule.name.clone());
            }
            for (level, text) in actions.logs {
                out.logs.push((rule.name.clone(), level, text));
            }
            for raw in actions.alerts {
                let name = raw.name.unwrap_or_else(|| rule.name.clone());
                let fp = fingerprint(&rule.name, &name, &raw.labels);
                let alert = Alert {
                    fingerprint: format!("{fp:016x}"),
                    rule: rule.name.clone(),
                    name,
                    severity: raw.severity,
                    status: Status::Firing,
                    labels: raw.labels,
                    annotations: raw.annotations,
                    starts_at: now.clone(),
                    ends_at: None,
                    origin: Origin {
                        stream: input.stream.to_string(),
                        id: input.id.to_string(),
                        group: input.group.to_string(),
                    },
                };
                if let Some((n, t)) = self.book.fire(fp, alert, input.now_ms) {
                    out.notifications.push(n);
                    out.transitions.push(t);
                }
            }
            for raw in actions.resolves {
                let name = raw.name.unwrap_or_else(|| rule.name.clone());
                let fp = fingerprint(&rule.name, &name, &raw.labels);
                if let Some((mut n, t)) = self.book.resolve(fp, now.clone()) {
                    n.origin = Origin {
                        stream: input.stream.to_string(),
                        id: input.id.to_string(),
                        group: input.group.to_string(),
                    };
                    out.notifications.push(n);
                    out.transitions.push(t);
                }
            }
        }
        out.verdict = Verdict::Processed {
            dropped,
            rule_errors,
        };
        out
    }
}

fn context(input: &Input, metadata: Map, uuid: Option<String>) -> Dynamic {
    let mut ctx = Map::new();
    ctx.insert("stream".into(), input.stream.into());
    ctx.insert("id".into(), input.id.into());
    ctx.insert("group".into(), input.group.into());
    ctx.insert(
        "delivery_count".into(),
        Dynamic::from_int(input.deliveries as i64),
    );
    ctx.insert("metadata".into(), Dynamic::from_map(metadata));
    ctx.insert(
        "uuid".into(),
        uuid.map(Dynamic::from).unwrap_or(Dynamic::UNIT),
    );
    ctx.insert(
        "timestamp_ms".into(),
        Dynamic::from_int(input.now_ms as i64),
    );
    Dynamic::from_map(ctx)
}

/// Milliseconds since the epoch as RFC 3339 UTC, the form Alertmanager wants.
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Wall-clock milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
