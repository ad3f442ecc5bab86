//! What happens to one stream entry, independent of where it came from:
//! decode, run the subscription's rules, turn their actions into alert
//! notifications. The consumer loop, `replay` and `test` all call this, so a
//! rule behaves the same offline as in production.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rhai::{Dynamic, Map};

use crate::alert::{Action, ActionKind, Alert, AlertBook, Origin, Status, fingerprint};
use crate::decode;
use crate::rules::api::Deadman;
use crate::rules::{Actions, LogLevel, Message, RawAlert, Rule, RuleEngine, RuleSet};

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
    pub engine: Arc<RuleEngine>,
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

/// What the rules made of one entry, before the alert lifecycle decides
/// what to notify.
pub struct Evaluated {
    pub verdict: Verdict,
    /// Alert assertions, in rule order, for [`AlertBook::decide`].
    pub actions: Vec<Action>,
    /// Log lines the rules asked for: (rule, level, text).
    pub logs: Vec<(String, LogLevel, String)>,
    /// Rules that failed on this entry: (rule, error with file:line:col), so
    /// `test` and `replay` can show why, not only how many.
    pub errors: Vec<(String, String)>,
    /// The rule that called `drop()`, if one did.
    pub dropped_by: Option<String>,
}

/// The result of judging one entry, lifecycle included (offline use).
pub struct Output {
    pub verdict: Verdict,
    /// Notifications to send.
    pub notifications: Vec<Alert>,
    /// Log lines the rules asked for: (rule, level, text).
    pub logs: Vec<(String, LogLevel, String)>,
    /// Rules that failed on this entry: (rule, error with file:line:col), so
    /// `test` and `replay` can show why, not only how many.
    pub errors: Vec<(String, String)>,
    /// The rule that called `drop()`, if one did.
    pub dropped_by: Option<String>,
}

impl Processor {
    /// Judges one entry and runs the alert lifecycle on the cached state:
    /// what `test` and `replay` use. The consumer loop calls
    /// [`Processor::evaluate`] and decides per batch instead, so it can
    /// retry the decisions when another instance changed the state.
    pub fn process(&self, loaded: &LoadedRules, input: &Input) -> Output {
        let e = self.evaluate(loaded, input);
        let d = self.book.decide(input.stream, &e.actions, false);
        Output {
            verdict: e.verdict,
            notifications: d.notifications,
            logs: e.logs,
            errors: e.errors,
            dropped_by: e.dropped_by,
        }
    }

    pub fn evaluate(&self, loaded: &LoadedRules, input: &Input) -> Evaluated {
        let mut out = Evaluated {
            verdict: Verdict::Processed {
                dropped: false,
                rule_errors: 0,
            },
            actions: Vec::new(),
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
        // The message's own timestamp, else when Redis received it (the
        // entry id), which unlike processing time is distinct per message
        // and the same on redelivery.
        let event_ms = event_time(&decoded.body)
            .or_else(|| id_time(input.id))
            .unwrap_or(input.now_ms);
        let ctx = if loaded.set.reads_context(selected, input.stream) {
            context(input, decoded.metadata, decoded.uuid, event_ms)
        } else {
            Dynamic::UNIT
        };
        let msg = decoded.body.into_shared();
        let results = loaded.set.evaluate(
            &self.engine,
            selected,
            Message {
                stream: input.stream,
                body: &msg,
                ctx,
                id: input.id,
                now_ms: event_ms,
            },
        );
        let mut dropped = false;
        let mut rule_errors = 0;
        for r in results {
            let rule = &loaded.set.rules[r.rule];
            match r.outcome {
                Ok(actions) => {
                    dropped |= actions.drop;
                    rule_errors += self.collect(rule, actions, input, &mut out);
                }
                Err(text) => {
                    rule_errors += 1;
                    out.errors.push((rule.name.clone(), text));
                }
            }
        }
        out.verdict = Verdict::Processed {
            dropped,
            rule_errors,
        };
        out
    }

    /// One rule's actions on one message, added to `out`: its logs, its
    /// alerts and resolves (counted, not sent, for a shadow rule) and its
    /// deadmen. Returns the errors among them (a deadman alert that does
    /// not build).
    fn collect(&self, rule: &Rule, actions: Actions, input: &Input, out: &mut Evaluated) -> usize {
        if actions.drop {
            out.dropped_by = Some(rule.name.clone());
        }
        for (level, text) in actions.logs {
            out.logs.push((rule.name.clone(), level, text));
        }
        let origin = || Origin {
            stream: input.stream.to_string(),
            id: input.id.to_string(),
            group: input.group.to_string(),
        };
        for raw in actions.alerts {
            let kind = ActionKind::Fire {
                for_ms: raw.for_ms,
                resolve_after_ms: raw.resolve_after_ms,
            };
            let (fp, alert) = build_alert(&rule.name, raw, origin());
            if rule.shadow {
                self.engine.metrics().alert_shadowed(&alert);
                continue;
            }
            out.actions.push(Action {
                fp,
                kind,
                alert: Some(alert),
                now_ms: input.now_ms,
            });
        }
        if !rule.shadow {
            out.actions
                .extend(actions.resolves.into_iter().map(|(fp, text)| Action {
                    fp,
                    kind: ActionKind::Resolve,
                    alert: text.map(|raw| build_alert(&rule.name, raw, origin()).1),
                    now_ms: input.now_ms,
                }));
        }
        self.collect_deadmen(rule, actions.deadmen, input, &origin, out)
    }

    /// A rule's deadman timers: armed with their alert unless the book
    /// already watches them; returns the alerts that did not build.
    fn collect_deadmen(
        &self,
        rule: &Rule,
        deadmen: Vec<Deadman>,
        input: &Input,
        origin: &dyn Fn() -> Origin,
        out: &mut Evaluated,
    ) -> usize {
        let mut errors = 0;
        for d in deadmen {
            let kind = ActionKind::Deadman {
                after_ms: d.after_ms,
            };
            let watched = !rule.shadow
                && self
                    .book
                    .is_watched(input.stream, d.fp, d.after_ms, input.now_ms);
            let alert = if watched {
                None
            } else {
                match d.alert.build() {
                    Ok(raw) => Some(build_alert(&rule.name, raw, origin()).1),
                    Err(text) => {
                        errors += 1;
                        out.errors.push((rule.name.clone(), text));
                        continue;
                    }
                }
            };
            if rule.shadow {
                if let Some(alert) = &alert {
                    self.engine.metrics().alert_shadowed(alert);
                }
                continue;
            }
            out.actions.push(Action {
                fp: d.fp,
                kind,
                alert,
                now_ms: input.now_ms,
            });
        }
        errors
    }
}

/// Gives a rule's alert its identity and fills `{{label}}`, `{{value}}` and
/// `{{name}}` placeholders in its annotations.
fn build_alert(rule: &str, raw: RawAlert, origin: Origin) -> (u64, Alert) {
    let name = raw.name.unwrap_or_else(|| rule.to_string());
    let fp = fingerprint(rule, &name, &raw.labels);
    let mut annotations = raw.annotations;
    for text in annotations.values_mut() {
        if find_pair(text, b'{').is_some() {
            *text = template(text, &name, &raw.labels, raw.value.as_deref());
        }
    }
    let alert = Alert {
        fingerprint: format!("{fp:016x}"),
        rule: rule.to_string(),
        name,
        severity: raw.severity,
        status: Status::Firing,
        labels: raw.labels,
        annotations,
        starts_at: String::new(),
        ends_at: None,
        origin,
    };
    (fp, alert)
}

fn template(
    text: &str,
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
    value: Option<&str>,
) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(start) = find_pair(rest, b'{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = find_pair(after, b'}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let key = after[..end].trim();
        let key = key.strip_prefix("labels.").unwrap_or(key);
        match key {
            "value" => out.push_str(value.unwrap_or("")),
            "name" | "alertname" => out.push_str(name),
            k => match labels.get(k) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[start..start + 2 + end + 2]),
            },
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Where `text` first holds `b` twice in a row (`{{` or `}}`). A byte scan:
/// `str::find` sets up a substring searcher on every call, which cost more
/// than the rest of filling a firing alert's two annotations.
fn find_pair(text: &str, b: u8) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(off) = bytes[from..].iter().position(|&c| c == b) {
        let at = from + off;
        if bytes.get(at + 1) == Some(&b) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Milliseconds part of a stream entry id (`<ms>-<seq>`).
fn id_time(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

/// The message's own time, from a `timestamp`, `ts` or `time` field: epoch
/// seconds, milliseconds, microseconds or nanoseconds, or RFC 3339.
fn event_time(body: &Dynamic) -> Option<u64> {
    let map = body.read_lock::<Map>()?;
    let v = ["timestamp", "ts", "time"]
        .iter()
        .find_map(|k| map.get(*k))?;
    if let Ok(i) = v.as_int() {
        let i = u64::try_from(i).ok()?;
        return Some(match i {
            0..100_000_000_000 => i * 1000,
            100_000_000_000..100_000_000_000_000 => i,
            100_000_000_000_000..100_000_000_000_000_000 => i / 1000,
            _ => i / 1_000_000,
        });
    }
    if let Ok(f) = v.as_float() {
        return (f > 0.0 && f < 1e11).then_some((f * 1000.0) as u64);
    }
    let s = v.clone().into_string().ok()?;
    chrono::DateTime::parse_from_rfc3339(&s)
        .ok()
        .and_then(|d| u64::try_from(d.timestamp_millis()).ok())
}

thread_local! {
    /// The context map of the last message judged on this thread, with the
    /// stream and group it was built for: the next message of the same batch
    /// copies it (one tree node) and overwrites the six values that differ,
    /// cheaper than building and sorting eight entries per message.
    static CONTEXT: RefCell<Option<(String, String, Map)>> = const { RefCell::new(None) };
}

fn context(input: &Input, metadata: Map, uuid: Option<String>, event_ms: u64) -> Dynamic {
    let values = [
        ("id", input.id.into()),
        ("delivery_count", Dynamic::from_int(input.deliveries as i64)),
        ("metadata", Dynamic::from_map(metadata)),
        ("uuid", uuid.map(Dynamic::from).unwrap_or(Dynamic::UNIT)),
        ("timestamp_ms", Dynamic::from_int(event_ms as i64)),
        ("received_ms", Dynamic::from_int(input.now_ms as i64)),
    ];
    let mut ctx = CONTEXT.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((stream, group, ctx)) if stream == input.stream && group == input.group => {
                ctx.clone()
            }
            _ => {
                let ctx: Map = [
                    ("stream", input.stream.into()),
                    ("group", input.group.into()),
                ]
                .into_iter()
                .chain(values.iter().map(|(k, _)| (*k, Dynamic::UNIT)))
                .map(|(k, v)| (k.into(), v))
                .collect();
                *last = Some((
                    input.stream.to_string(),
                    input.group.to_string(),
                    ctx.clone(),
                ));
                ctx
            }
        }
    });
    for (key, value) in values {
        if let Some(slot) = ctx.get_mut(key) {
            *slot = value;
        }
    }
    Dynamic::from_map(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_labels_value_and_name() {
        let labels = [("hostname".to_string(), "r1".to_string())].into();
        assert_eq!(
            template(
                "{{hostname}} {{ labels.hostname }}: {{value}} ({{name}}) {{nope}}",
                "A",
                &labels,
                Some("7")
            ),
            "r1 r1: 7 (A) {{nope}}"
        );
        for (text, filled) in [
            ("a { b } {{value}}", "a { b } 7"),
            ("{{value", "{{value"),
            ("x}}y{{name}}", "x}}yA"),
            ("{{{hostname}}}", "{{{hostname}}}"),
            ("ü{{hostname}}ü{", "ür1ü{"),
            ("", ""),
        ] {
            assert_eq!(template(text, "A", &labels, Some("7")), filled, "{text}");
        }
    }

    #[test]
    fn event_time_units() {
        let t =
            |json: &str| event_time(&serde_json::from_str::<Dynamic>(json).unwrap().into_shared());
        assert_eq!(t(r#"{"timestamp": 1700000000}"#), Some(1_700_000_000_000));
        assert_eq!(t(r#"{"ts": 1700000000123}"#), Some(1_700_000_000_123));
        assert_eq!(
            t(r#"{"time": "2023-11-14T22:13:20Z"}"#),
            Some(1_700_000_000_000)
        );
        assert_eq!(t(r#"{"x": 1}"#), None);
    }
}
