//! Alert kinds: an alert's constant parts declared once, at load.
//!
//! ```rhai
//! const HIGH = alert_kind(#{ name: "HighErrors", severity: "major",
//!     labels: ["hostname", "interface"], summary: "{{hostname}}: {{value}} errors" });
//! fn on_message(msg, ctx) {
//!     if msg.errors > 1000 { HIGH.fire(msg, msg.errors) } else { HIGH.resolve(msg) }
//! }
//! ```
//!
//! With the map API a rule builds a map (and its labels map) per reading,
//! and the engine reads every key back out of it; a reading that only
//! confirms what is already known (a resolve of an alert that is not
//! firing, a deadman watch that is fresh, a rate inside its band) paid for
//! all of it. A kind reads its label values from the message natively,
//! hashes them into the alert's identity, and builds the alert only when
//! it is needed: for a firing, or a watch that must be (re)written.

use std::any::TypeId;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, ImmutableString, Map, NativeCallContext};

use super::api::{
    self, ALERT_KIND_KEYS, Res, duration_ms, fail, number, record, running, text, typed, with_text,
};
use super::api::{Deadman, DeadmanAlert, LogLevel, RawAlert};
use super::kind_check::{Check, Test};
use super::state::RuleState;
use crate::alert::{Fingerprint, Severity};

/// A declared alert, as `alert_kind(…)` returns it. Cloned for every call
/// of one of its methods: the declaration is shared, never copied.
#[derive(Debug, Clone)]
pub struct AlertKind(Arc<Declared>);

#[derive(Debug)]
struct Declared {
    /// `None`: named after the rule, like an alert map without `name`.
    name: Option<String>,
    severity: Severity,
    /// The message fields that label the alert (each label is named after
    /// its field), sorted: the fingerprint hashes labels in name order.
    labels: Vec<ImmutableString>,
    /// Summary, description and other annotations, `{{…}}` templates
    /// included: filled from the labels and value of each alert built.
    annotations: BTreeMap<String, String>,
    for_ms: u64,
    resolve_after_ms: Option<u64>,
    /// What the engine checks on every message itself (`check:`), if
    /// anything: such a kind is not only fired by the rule's code.
    check: Option<Check>,
}

thread_local! {
    /// While a rule file's top level runs: how many kinds with a `check`
    /// it has declared so far. `None` otherwise, when declaring one is an
    /// error: a check runs only if the kind is one of the rule's top-level
    /// constants, and one declared per message would never run.
    static LOADING: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Counts the checked kinds declared on this thread until dropped (see
/// [`Loading::declared`]); the rule loader holds one while a file's top
/// level runs.
pub(crate) struct Loading;

impl Loading {
    pub(crate) fn start() -> Loading {
        LOADING.set(Some(0));
        Loading
    }

    /// Kinds with a `check` declared since [`Loading::start`]: if the rule's
    /// top-level constants hold fewer, some are out of the engine's sight
    /// (inside an array or a map) and their checks would never run.
    pub(crate) fn declared(&self) -> usize {
        LOADING.get().unwrap_or(0)
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        LOADING.set(None);
    }
}

impl AlertKind {
    /// Reads a declaration; every key and value is checked here, at load,
    /// so a call per message has nothing left to validate but the message.
    pub fn declare(map: &Map) -> Result<AlertKind, String> {
        const F: &str = "alert_kind";
        let mut d = Declared {
            name: None,
            severity: Severity::default(),
            labels: Vec::new(),
            annotations: BTreeMap::new(),
            for_ms: 0,
            resolve_after_ms: None,
            check: None,
        };
        for (key, value) in map {
            match key.as_str() {
                "name" if value.is_unit() => return Err(format!("{F}(): `name` is ()")),
                "name" => d.name = Some(text(value)),
                "severity" => {
                    let level = text(value);
                    d.severity = Severity::parse(&level).ok_or_else(|| {
                        format!(
                            "{F}(): severity `{level}` is not one of info, warning, major, critical"
                        )
                    })?;
                }
                "labels" => d.labels = label_fields(value)?,
                "summary" | "description" => {
                    d.annotations.insert(key.to_string(), text(value));
                }
                "annotations" => {
                    let Some(inner) = value.read_lock::<Map>() else {
                        return Err(format!("{F}(): `annotations` must be a map"));
                    };
                    for (k, v) in inner.iter() {
                        d.annotations.insert(k.to_string(), text(v));
                    }
                }
                "for_duration" | "for" => d.for_ms = duration_ms(F, key, value)?,
                "resolve_after" => d.resolve_after_ms = Some(duration_ms(F, key, value)?),
                "check" => d.check = Some(Check::parse(value)?),
                "value" => {
                    return Err(format!(
                        "{F}(): `value` is given per reading (`KIND.fire(msg, value)`), not declared"
                    ));
                }
                other => {
                    return Err(format!(
                        "{F}(): unknown field `{other}` (expected {ALERT_KIND_KEYS})"
                    ));
                }
            }
        }
        if d.check.is_some() {
            let Some(n) = LOADING.get() else {
                return Err(format!(
                    "{F}(): a kind with a `check` must be declared as a top-level constant (`const K = alert_kind(…)`): the engine runs the check, and a kind declared while a message is judged would never be checked"
                ));
            };
            LOADING.set(Some(n + 1));
        }
        Ok(AlertKind(Arc::new(d)))
    }

    /// Whether `other` is this same declaration (under another name).
    pub fn is(&self, other: &AlertKind) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether `other` raises the same alerts: same name (or both the
    /// rule's) and the same label fields, so the same identities.
    pub fn same_alerts(&self, other: &AlertKind) -> bool {
        self.0.name == other.0.name && self.0.labels == other.0.labels
    }

    /// The check the engine runs for this kind on every message, if any.
    pub fn check(&self) -> Option<&Check> {
        self.0.check.as_ref()
    }

    /// `Name (severity; label, label)`, for `tripline check`; the name is
    /// the rule's when the declaration has none.
    pub fn describe(&self, rule: &str) -> String {
        let d = &self.0;
        let labels: Vec<&str> = d.labels.iter().map(ImmutableString::as_str).collect();
        let checked = d
            .check
            .as_ref()
            .map(|c| format!("; checks {}", c.describe()))
            .unwrap_or_default();
        format!(
            "{} ({}; {}{checked})",
            self.name(rule),
            d.severity.as_str(),
            if labels.is_empty() {
                "no labels".to_string()
            } else {
                labels.join(", ")
            }
        )
    }

    fn name<'a>(&'a self, rule: &'a str) -> &'a str {
        self.0.name.as_deref().unwrap_or(rule)
    }

    /// The values of the kind's label fields in `msg`; fails naming every
    /// field the message lacks (or holds as `()`). String values are
    /// shared with the message, not copied.
    fn values(&self, ctx: &NativeCallContext, func: &str, msg: &Dynamic) -> Res<Vec<Dynamic>> {
        let Some(m) = msg.read_lock::<Map>() else {
            return fail(
                ctx,
                format!(
                    "{func}(): the first argument must be the message (a map), got {}",
                    msg.type_name()
                ),
            );
        };
        self.label_values(func, &m).or_else(|e| fail(ctx, e))
    }

    /// [`AlertKind::values`] of a message already read as a map.
    fn label_values(&self, func: &str, m: &Map) -> Result<Vec<Dynamic>, String> {
        let mut values = Vec::with_capacity(self.0.labels.len());
        let mut missing = Vec::new();
        for field in &self.0.labels {
            match m.get(field.as_str()) {
                Some(v) if !v.is_unit() => values.push(v.clone()),
                _ => missing.push(format!("`{field}`")),
            }
        }
        if missing.is_empty() {
            Ok(values)
        } else {
            Err(format!(
                "{func}(): {} of alert {} missing from the message: {}",
                if missing.len() == 1 {
                    "label field"
                } else {
                    "label fields"
                },
                running(|rule, _| self.name(rule).to_string()),
                missing.join(", ")
            ))
        }
    }

    /// The fingerprint of the alert these label values make, as
    /// [`crate::alert::fingerprint`] computes it from the built alert.
    fn identity(&self, values: &[Dynamic]) -> u64 {
        running(|rule, _| {
            let mut fp = Fingerprint::new(rule, self.name(rule));
            for (field, v) in self.0.labels.iter().zip(values) {
                with_text(v, |v| fp.label(field, v));
            }
            fp.finish()
        })
    }

    /// The alert these label values make, with `value` for `{{value}}` and
    /// `severity` instead of the declared one.
    pub fn build(
        &self,
        values: &[Dynamic],
        value: Option<&Dynamic>,
        severity: Option<Severity>,
    ) -> RawAlert {
        let d = &self.0;
        RawAlert {
            name: d.name.clone(),
            severity: severity.unwrap_or(d.severity),
            labels: d
                .labels
                .iter()
                .zip(values)
                .map(|(k, v)| (k.to_string(), text(v)))
                .collect(),
            annotations: d.annotations.clone(),
            for_ms: d.for_ms,
            resolve_after_ms: d.resolve_after_ms,
            value: value.map(text),
        }
    }

    fn fire(
        &self,
        ctx: &NativeCallContext,
        func: &str,
        msg: &Dynamic,
        value: Option<&Dynamic>,
        severity: Option<&str>,
    ) -> Res<()> {
        let severity = match severity {
            Some(level) => match Severity::parse(level) {
                Some(s) => Some(s),
                None => {
                    return fail(
                        ctx,
                        format!(
                            "{func}(): severity `{level}` is not one of info, warning, major, critical"
                        ),
                    );
                }
            },
            None => None,
        };
        let values = self.values(ctx, func, msg)?;
        let a = self.build(&values, value, severity);
        record(|acts| acts.alerts.push(a));
        Ok(())
    }

    fn resolve(&self, ctx: &NativeCallContext, func: &str, msg: &Dynamic) -> Res<()> {
        let values = self.values(ctx, func, msg)?;
        let fp = self.identity(&values);
        record(|acts| acts.resolves.push((fp, None)));
        Ok(())
    }

    /// Watches the series of these label values for `after_ms` of silence.
    fn watch(&self, values: Vec<Dynamic>, after_ms: u64) {
        let fp = self.identity(&values);
        let alert = DeadmanAlert::Kind(self.clone(), values);
        record(|acts| {
            acts.deadmen.push(Deadman {
                fp,
                after_ms,
                alert,
            })
        });
    }

    /// Runs this kind's check on `msg`, whose checked field holds `reading`
    /// (the number `value`); rates keep their series in `state`.
    fn run_check(
        &self,
        check: &Check,
        msg: &Map,
        reading: &Dynamic,
        value: f64,
        state: &RuleState,
    ) -> Result<(), String> {
        let values = self.label_values("check", msg)?;
        let t = match &check.test {
            Test::Silent { after_ms } => {
                self.watch(values, *after_ms);
                return Ok(());
            }
            Test::Threshold(t) => t,
        };
        let fp = self.identity(&values);
        let (value, shown) = if t.rate {
            // One series per alert: the fingerprint names the rule, the
            // kind and the label values.
            let key = format!("{fp:016x}");
            let Some(per_second) = running(|rule, now| state.known_rate(rule, &key, value, now))
            else {
                return Ok(());
            };
            // To the hundredth: a rate is an estimate, and the summary
            // should not print 17 digits of it.
            let per_second = (per_second * 100.0).round() / 100.0;
            (per_second, Dynamic::from_float(per_second))
        } else {
            (value, reading.clone())
        };
        if t.fires(value) {
            let a = self.build(&values, Some(&shown), t.severity(value));
            record(|acts| acts.alerts.push(a));
        } else if t.clears(value) {
            record(|acts| acts.resolves.push((fp, None)));
        }
        Ok(())
    }
}

/// Runs the checks of `kinds` (the rule's checked kinds, in declaration
/// order) on one message, recording their alerts, resolves and watches
/// with the running rule's actions. A message whose checked field is
/// missing or not a number is not a reading: the rule logs a warning (once
/// per field) and that field's checks do nothing; a message without one
/// of a kind's label fields fails the rule, as `KIND.fire(msg)` would.
pub fn run_checks(kinds: &[AlertKind], msg: &Dynamic, state: &RuleState) -> Result<(), String> {
    let Some(m) = msg.read_lock::<Map>() else {
        return Err(format!(
            "alert checks read the message as a map, got {}",
            msg.type_name()
        ));
    };
    let mut warned: Vec<&str> = Vec::new();
    for kind in kinds {
        let Some(check) = kind.check() else {
            continue;
        };
        let reading = m.get(check.field.as_str());
        let value = reading.and_then(|v| {
            v.as_int()
                .map(|i| i as f64)
                .or_else(|_| v.as_float())
                .ok()
                .filter(|f| f.is_finite())
        });
        match (reading, value) {
            (Some(reading), Some(value)) => kind.run_check(check, &m, reading, value, state)?,
            _ if warned.contains(&check.field.as_str()) => {}
            _ => {
                warned.push(check.field.as_str());
                let text = not_a_reading(&check.field, reading);
                record(|acts| acts.logs.push((LogLevel::Warn, text)));
            }
        }
    }
    Ok(())
}

/// The warning for a message whose checked `field` holds no number.
fn not_a_reading(field: &str, got: Option<&Dynamic>) -> String {
    /// Enough of a wrong value to recognise it; the rest would only make
    /// the line longer.
    const SHOWN: usize = 80;
    match got {
        None => format!("reading without a numeric {field}: the field is missing"),
        Some(v) if v.is_unit() => format!("reading without a numeric {field}: the field is ()"),
        Some(v) => with_text(v, |t| {
            let cut = t.char_indices().nth(SHOWN).map_or(t, |(i, _)| &t[..i]);
            let more = if cut.len() < t.len() { "…" } else { "" };
            format!(
                "reading without a numeric {field}: {cut}{more} ({})",
                v.type_name()
            )
        }),
    }
}

/// `labels: ["hostname", "interface"]`: the fields, sorted and unique.
fn label_fields(value: &Dynamic) -> Result<Vec<ImmutableString>, String> {
    const WANT: &str = "alert_kind(): `labels` must list the message fields that label the alert, like [\"hostname\", \"interface\"]";
    let Some(list) = value.read_lock::<Array>() else {
        return Err(format!("{WANT}, got {}", value.type_name()));
    };
    let mut fields = Vec::with_capacity(list.len());
    for item in list.iter() {
        match item.read_lock::<ImmutableString>() {
            Some(s) if !s.is_empty() => fields.push(s.clone()),
            _ => return Err(format!("{WANT}; got {item} ({})", item.type_name())),
        }
    }
    fields.sort();
    if let Some(w) = fields.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("alert_kind(): label `{}` is listed twice", w[0]));
    }
    Ok(fields)
}

/// `alert_kind(map)` and the methods of the kinds it returns.
///
/// Every method is registered for each combination of the argument types
/// it is meant for (a map, numbers as `INT` or `FLOAT`, strings), which
/// Rhai finds by one hash lookup and calls with the arguments as they are
/// (the message is read in place, not converted to a map copy); and with
/// `Dynamic` arguments, found only when no typed version matches: Rhai
/// tries every combination of typed and `Dynamic` parameters to find it,
/// which costs more than the call itself, but it is what turns a wrong
/// argument into an error naming it instead of "function not found".
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<AlertKind>("AlertKind");
    engine.register_fn(
        "alert_kind",
        |ctx: NativeCallContext, map: Map| -> Res<AlertKind> {
            AlertKind::declare(&map).or_else(|e| fail(&ctx, e))
        },
    );
    let kind = TypeId::of::<AlertKind>();
    let msg = TypeId::of::<Map>();
    let int = TypeId::of::<rhai::INT>();
    let float = TypeId::of::<rhai::FLOAT>();
    let string = TypeId::of::<ImmutableString>();
    let dynamic = TypeId::of::<Dynamic>();
    let numbers = [int, float];
    let values = [int, float, string, TypeId::of::<bool>(), dynamic];
    let fire = |ctx: &NativeCallContext, args: &mut [&mut Dynamic]| -> Res<()> {
        let k = receiver(args);
        let severity = match args.get(3) {
            Some(level) => Some(level_text(ctx, "fire", level)?),
            None => None,
        };
        k.fire(
            ctx,
            "fire",
            args[1],
            args.get(2).map(|v| &**v),
            severity.as_deref(),
        )
    };
    typed(engine, "fire", &[&[kind], &[msg, dynamic]], fire);
    typed(engine, "fire", &[&[kind], &[msg, dynamic], &values], fire);
    typed(
        engine,
        "fire",
        &[&[kind], &[msg, dynamic], &values, &[string, dynamic]],
        fire,
    );
    typed(
        engine,
        "resolve",
        &[&[kind], &[msg, dynamic]],
        |ctx, args| receiver(args).resolve(ctx, "resolve", args[1]),
    );
    typed(
        engine,
        "deadman",
        &[&[kind], &[msg, dynamic], &[string, int, float, dynamic]],
        |ctx, args| {
            let k = receiver(args);
            let after_ms = api::deadman_after(ctx, args[2])?;
            k.watch(k.values(ctx, "deadman", args[1])?, after_ms);
            Ok(())
        },
    );
    for (name, rising) in [("hysteresis_above", true), ("hysteresis_below", false)] {
        let band = move |ctx: &NativeCallContext, args: &mut [&mut Dynamic]| -> Res<()> {
            let k = receiver(args);
            let v = number(ctx, name, args[2])?;
            let (fires, clears) = api::band_sides(ctx, name, rising, v, args[3], args[4])?;
            if fires {
                k.fire(ctx, name, args[1], Some(args[2]), None)
            } else if clears {
                k.resolve(ctx, name, args[1])
            } else {
                k.values(ctx, name, args[1]).map(drop)
            }
        };
        typed(
            engine,
            name,
            &[&[kind], &[msg], &numbers, &numbers, &numbers],
            band,
        );
        typed(
            engine,
            name,
            &[&[kind], &[dynamic], &[dynamic], &[dynamic], &[dynamic]],
            band,
        );
    }
}

/// The kind a method was called on, borrowed where it is (a copy would
/// allocate on every call).
fn receiver<'a>(args: &'a [&mut Dynamic]) -> impl std::ops::Deref<Target = AlertKind> + 'a {
    args[0]
        .read_lock::<AlertKind>()
        .expect("registered for AlertKind")
}

/// A severity argument as text.
fn level_text(ctx: &NativeCallContext, func: &str, level: &Dynamic) -> Res<String> {
    match level.read_lock::<ImmutableString>() {
        Some(s) => Ok(s.to_string()),
        None => fail(
            ctx,
            format!(
                "{func}(): the severity must be a string (info, warning, major, critical), got {}",
                level.type_name()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(json: &str) -> Map {
        serde_json::from_str::<Dynamic>(json).unwrap().cast::<Map>()
    }

    #[test]
    fn a_declaration_names_what_is_wrong() {
        for (json, says) in [
            (r#"{"severity": "urgent"}"#, "severity `urgent`"),
            (r#"{"labels": "hostname"}"#, "must list the message fields"),
            (r#"{"labels": ["a", 1]}"#, "got 1 (i64)"),
            (r#"{"labels": ["a", "a"]}"#, "label `a` is listed twice"),
            (r#"{"value": 3}"#, "`value` is given per reading"),
            (r#"{"colour": "red"}"#, "unknown field `colour`"),
            (
                r#"{"for_duration": "soon"}"#,
                "`for_duration` must be a duration",
            ),
            (r#"{"annotations": 1}"#, "`annotations` must be a map"),
        ] {
            let e = AlertKind::declare(&map(json)).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
    }

    #[test]
    fn a_built_alert_has_the_declared_parts_and_the_readings_values() {
        let k = AlertKind::declare(&map(
            r#"{"name": "N", "severity": "major", "labels": ["z", "a"], "summary": "{{a}} {{value}}", "for": 5}"#,
        ))
        .unwrap();
        let raw = k.build(
            &[Dynamic::from("x"), Dynamic::from(7_i64)],
            Some(&Dynamic::from(3.5_f64)),
            Some(Severity::Critical),
        );
        assert_eq!(raw.name.as_deref(), Some("N"));
        assert_eq!(raw.severity, Severity::Critical);
        let labels: Vec<_> = raw.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            labels,
            ["a=x", "z=7"],
            "labels sorted by name, values in that order"
        );
        assert_eq!(raw.annotations["summary"], "{{a}} {{value}}");
        assert_eq!(raw.value.as_deref(), Some("3.5"));
        assert_eq!(raw.for_ms, 5000);
    }
}
