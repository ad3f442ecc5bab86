//! The functions a rule can call: `alert`, `resolve`, `log`, `drop`, the
//! helpers, and `require`.
//!
//! Rules run on blocking threads, one message and one rule at a time per
//! thread, so each thread collects the actions of the rule it is running in a
//! thread-local [`Actions`]. That keeps the registered functions free of
//! locks and the `Engine` shareable and frozen.

use std::any::TypeId;
use std::cell::RefCell;
use std::collections::BTreeMap;

use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, Map, NativeCallContext, Position};

use super::kind::AlertKind;
use super::state::RuleState;
use crate::alert::{Fingerprint, Severity};

/// An alert as a rule asserted it, before identity and lifecycle.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawAlert {
    /// Defaults to the rule's name.
    pub name: Option<String>,
    pub severity: Severity,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `for_duration`: how long the condition must hold before it fires.
    pub for_ms: u64,
    /// `resolve_after`: auto-resolve when not re-asserted this long.
    pub resolve_after_ms: Option<u64>,
    /// `value`: the observed value, for `{{value}}` in summary/description.
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl From<LogLevel> for tracing::Level {
    fn from(level: LogLevel) -> tracing::Level {
        match level {
            LogLevel::Trace => tracing::Level::TRACE,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Error => tracing::Level::ERROR,
        }
    }
}

impl LogLevel {
    fn parse(s: &str) -> Option<LogLevel> {
        match s.to_ascii_lowercase().as_str() {
            "trace" => Some(LogLevel::Trace),
            "debug" => Some(LogLevel::Debug),
            "info" => Some(LogLevel::Info),
            "warn" | "warning" => Some(LogLevel::Warn),
            "error" => Some(LogLevel::Error),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// What one rule decided about one message.
#[derive(Debug, Default, Clone)]
pub struct Actions {
    pub alerts: Vec<RawAlert>,
    /// Fingerprints of the alerts resolved: the lifecycle resolves the
    /// alert it stored, so a resolve needs nothing else, unless `resolve()`
    /// gave text of its own (summary, description, annotations, value) for
    /// the resolved notification to say instead of the firing's.
    pub resolves: Vec<(u64, Option<RawAlert>)>,
    pub deadmen: Vec<Deadman>,
    pub logs: Vec<(LogLevel, String)>,
    pub drop: bool,
}

/// `deadman(alert, after)`: fire `alert` if this series stays silent for
/// `after_ms`. The alert is kept as the rule gave it (already checked) and
/// built only when the watch needs it: nearly every call re-confirms a
/// fresh watch ([`crate::alert::AlertBook::is_watched`]).
#[derive(Debug, Clone)]
pub struct Deadman {
    pub fp: u64,
    pub after_ms: u64,
    pub alert: DeadmanAlert,
}

/// The alert a deadman watch fires, as the rule gave it.
#[derive(Debug, Clone)]
pub enum DeadmanAlert {
    /// `deadman(map, after)`.
    Map(Map),
    /// `KIND.deadman(msg, after)`: the kind and the message's values of
    /// its label fields.
    Kind(AlertKind, Vec<Dynamic>),
}

impl DeadmanAlert {
    pub fn build(&self) -> Result<RawAlert, String> {
        match self {
            DeadmanAlert::Map(map) => raw_alert("deadman", map),
            DeadmanAlert::Kind(kind, values) => Ok(kind.build(values, None, None)),
        }
    }
}

impl Actions {
    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty()
            && self.resolves.is_empty()
            && self.deadmen.is_empty()
            && self.logs.is_empty()
            && !self.drop
    }
}

/// Which rule is running on this thread, and the message's time, for the
/// stateful helpers.
#[derive(Default)]
struct Running {
    rule: String,
    now_ms: u64,
}

thread_local! {
    static ACTIONS: RefCell<Actions> = RefCell::new(Actions::default());
    static RUNNING: RefCell<Running> = RefCell::new(Running::default());
}

/// Clears this thread's actions before `rule` runs on a message whose time
/// is `now_ms` (its own timestamp, or arrival; virtual in tests).
pub(crate) fn begin(rule: &str, now_ms: u64) {
    ACTIONS.with(|a| *a.borrow_mut() = Actions::default());
    RUNNING.with(|r| {
        let mut r = r.borrow_mut();
        if r.rule != rule {
            r.rule = rule.to_string();
        }
        r.now_ms = now_ms;
    });
}

pub(super) fn running<T>(f: impl FnOnce(&str, u64) -> T) -> T {
    RUNNING.with(|r| {
        let r = r.borrow();
        f(&r.rule, r.now_ms)
    })
}

/// Takes the actions the rule that just ran recorded on this thread.
pub(crate) fn take() -> Actions {
    ACTIONS.with(|a| std::mem::take(&mut *a.borrow_mut()))
}

pub(super) fn record(f: impl FnOnce(&mut Actions)) {
    ACTIONS.with(|a| f(&mut a.borrow_mut()));
}

pub(super) type Res<T> = Result<T, Box<EvalAltResult>>;

pub(super) fn fail<T>(ctx: &NativeCallContext, text: String) -> Res<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        text.into(),
        ctx.call_position(),
    )))
}

const ALERT_KEYS: &str =
    "name, severity, labels, summary, description, annotations, value, for_duration, resolve_after";
/// What `alert_kind` reads: an alert map's keys but `value`, which each
/// reading gives, and the `check` the engine runs itself.
pub(super) const ALERT_KIND_KEYS: &str =
    "name, severity, labels, summary, description, annotations, for_duration, resolve_after, check";

/// A duration given as `"5m"`/`"30s"` or as a number of seconds.
pub(super) fn duration_ms(func: &str, key: &str, v: &Dynamic) -> Result<u64, String> {
    if let Ok(i) = v.as_int() {
        if i >= 0 {
            return Ok(i as u64 * 1000);
        }
    } else if let Ok(f) = v.as_float() {
        if f >= 0.0 && f.is_finite() {
            return Ok((f * 1000.0) as u64);
        }
    } else if let Some(s) = v.read_lock::<rhai::ImmutableString>()
        && let Ok(d) = humantime::parse_duration(s.trim())
    {
        return Ok(d.as_millis() as u64);
    }
    Err(format!(
        "{func}(): `{key}` must be a duration like \"5m\" or a number of seconds, got {v}"
    ))
}

pub(super) fn number(ctx: &NativeCallContext, func: &str, v: &Dynamic) -> Res<f64> {
    if let Ok(i) = v.as_int() {
        Ok(i as f64)
    } else if let Ok(f) = v.as_float() {
        Ok(f)
    } else {
        fail(
            ctx,
            format!("{func}(): expected a number, got {} ({v})", v.type_name()),
        )
    }
}

/// A value as text, the way Rhai prints it. Strings (nearly every label and
/// annotation) are copied directly rather than through the formatter.
pub(super) fn text(v: &Dynamic) -> String {
    with_text(v, str::to_owned)
}

/// `f` of the value as text, without copying a string value.
pub(super) fn with_text<T>(v: &Dynamic, f: impl FnOnce(&str) -> T) -> T {
    match v.read_lock::<rhai::ImmutableString>() {
        Some(s) => f(s.as_str()),
        None => f(&v.to_string()),
    }
}

fn not_a_map(func: &str, key: &str) -> String {
    format!("{func}(): `{key}` must be a map")
}

fn unknown_field(func: &str, key: &str) -> String {
    format!("{func}(): unknown field `{key}` (expected {ALERT_KEYS})")
}

/// A label whose value is `()`: almost always a field the message lacks
/// (`msg.hostname` of a message without one). An alert labelled
/// `hostname=""` would look real and merge every such message into one.
fn missing_label(func: &str, key: &str) -> String {
    format!(
        "{func}(): label `{key}` is () (a field missing from the message?); check it, or list it in require(msg, [...])"
    )
}

/// Fails like a missing label for each `labels` entry that is `()`, and
/// for a `name` that is `()` (it becomes the `alertname` label).
fn check_labels(func: &str, key: &str, value: &Dynamic) -> Result<(), String> {
    match key {
        "name" if value.is_unit() => Err(missing_label(func, "name")),
        "labels" => match value.read_lock::<Map>() {
            Some(labels) => match labels.iter().find(|(_, v)| v.is_unit()) {
                Some((k, _)) => Err(missing_label(func, k)),
                None => Ok(()),
            },
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

fn bad_severity(func: &str, level: &str) -> String {
    format!("{func}(): severity `{level}` is not one of info, warning, major, critical")
}

/// Checks an alert map the way [`raw_alert`] reads it, without building
/// anything: a typo fails the rule with a position instead of producing a
/// half-filled alert, even when the alert is never built.
fn check_alert(func: &str, map: &Map) -> Result<(), String> {
    for (key, value) in map {
        check_labels(func, key, value)?;
        match key.as_str() {
            "value" | "name" | "summary" | "description" => {}
            "for_duration" | "for" | "resolve_after" => {
                duration_ms(func, key, value)?;
            }
            "severity" => with_text(value, |level| {
                Severity::parse(level)
                    .map(|_| ())
                    .ok_or_else(|| bad_severity(func, level))
            })?,
            "labels" | "annotations" if value.is_map() => {}
            "labels" | "annotations" => return Err(not_a_map(func, key)),
            other => return Err(unknown_field(func, other)),
        }
    }
    Ok(())
}

/// The fingerprint [`crate::alert::fingerprint`] gives the alert `map`
/// describes once built, computed from the map itself.
fn identity(rule: &str, map: &Map) -> u64 {
    let hash = |name: &str| {
        let mut fp = Fingerprint::new(rule, name);
        if let Some(labels) = map.get("labels").and_then(|l| l.read_lock::<Map>()) {
            for (k, v) in labels.iter() {
                with_text(v, |v| fp.label(k, v));
            }
        }
        fp.finish()
    };
    match map.get("name") {
        Some(name) => with_text(name, hash),
        None => hash(rule),
    }
}

/// Reads an alert map into an alert; fails like [`check_alert`].
pub fn raw_alert(func: &str, map: &Map) -> Result<RawAlert, String> {
    let mut alert = RawAlert::default();
    for (key, value) in map {
        check_labels(func, key, value)?;
        match key.as_str() {
            "value" => alert.value = Some(text(value)),
            // `for` is a Rhai keyword: `for_duration` reads better than `"for"`.
            "for_duration" | "for" => alert.for_ms = duration_ms(func, key, value)?,
            "resolve_after" => {
                alert.resolve_after_ms = Some(duration_ms(func, "resolve_after", value)?)
            }
            "name" => alert.name = Some(text(value)),
            "severity" => {
                let level = text(value);
                alert.severity =
                    Severity::parse(&level).ok_or_else(|| bad_severity(func, &level))?;
            }
            "labels" | "annotations" => {
                let Some(inner) = value.read_lock::<Map>() else {
                    return Err(not_a_map(func, key));
                };
                let target = if key == "labels" {
                    &mut alert.labels
                } else {
                    &mut alert.annotations
                };
                for (k, v) in inner.iter() {
                    target.insert(k.to_string(), text(v));
                }
            }
            "summary" | "description" => {
                alert.annotations.insert(key.to_string(), text(value));
            }
            other => return Err(unknown_field(func, other)),
        }
    }
    Ok(alert)
}

fn parse_alert(ctx: &NativeCallContext, func: &str, map: &Map) -> Res<RawAlert> {
    raw_alert(func, map).or_else(|e| fail(ctx, e))
}

/// Records a resolve of the alert `map` describes; with `own_text`, the
/// text the map carries is what the resolved notification says.
fn resolve_map(ctx: &NativeCallContext, func: &str, map: &Map, own_text: bool) -> Res<()> {
    check_alert(func, map).or_else(|e| fail(ctx, e))?;
    let fp = running(|rule, _| identity(rule, map));
    let text = own_text
        && ["summary", "description", "annotations", "value"]
            .iter()
            .any(|k| map.contains_key(*k));
    let text = if text {
        Some(parse_alert(ctx, func, map)?)
    } else {
        None
    };
    record(|acts| acts.resolves.push((fp, text)));
    Ok(())
}

/// Fires when `fire`, resolves when `clear`, and between the two leaves the
/// alert as it is: the band that stops an alert flapping on a threshold.
fn band(ctx: &NativeCallContext, func: &str, map: &Map, fire: bool, clear: bool) -> Res<()> {
    if fire {
        let a = parse_alert(ctx, func, map)?;
        record(|acts| acts.alerts.push(a));
        Ok(())
    } else if clear {
        // The map describes the firing side: its text would not fit a resolve.
        resolve_map(ctx, func, map, false)
    } else {
        check_alert(func, map).or_else(|e| fail(ctx, e))
    }
}

/// Which side of a hysteresis band `value` is on: (fires, clears). Rising
/// bands fire above `fire` and clear below `clear`; falling ones mirror
/// that. Fails on thresholds the wrong way round.
pub(super) fn band_sides(
    ctx: &NativeCallContext,
    func: &str,
    rising: bool,
    value: f64,
    fire: &Dynamic,
    clear: &Dynamic,
) -> Res<(bool, bool)> {
    let (fire, clear) = (number(ctx, func, fire)?, number(ctx, func, clear)?);
    if (rising && clear > fire) || (!rising && clear < fire) {
        let side = if rising { "above" } else { "below" };
        return fail(
            ctx,
            format!("{func}(): clear threshold {clear} is {side} fire threshold {fire}"),
        );
    }
    Ok(if rising {
        (value > fire, value < clear)
    } else {
        (value < fire, value > clear)
    })
}

/// The silence of a deadman watch, in ms: a duration longer than 0.
pub(super) fn deadman_after(ctx: &NativeCallContext, after: &Dynamic) -> Res<u64> {
    match duration_ms("deadman", "after", after) {
        Ok(0) => fail(ctx, "deadman(): the silence must be longer than 0".into()),
        Ok(ms) => Ok(ms),
        Err(e) => fail(ctx, e),
    }
}

/// `require(msg, fields)`: fails the rule, naming every field of `fields`
/// that `msg` lacks or holds as `()`, so a rule states up front what it
/// reads instead of failing later on the first missing one.
fn require(ctx: &NativeCallContext, msg: &Map, fields: &[Dynamic]) -> Res<()> {
    let mut missing = Vec::new();
    for field in fields {
        let Some(name) = field.read_lock::<rhai::ImmutableString>() else {
            return fail(
                ctx,
                format!(
                    "require(): field names must be strings, got {} ({field})",
                    field.type_name()
                ),
            );
        };
        if msg.get(name.as_str()).is_none_or(Dynamic::is_unit) {
            missing.push(format!("`{}`", name.as_str()));
        }
    }
    match missing.len() {
        0 => Ok(()),
        1 => fail(
            ctx,
            format!("require(): the message has no field {}", missing[0]),
        ),
        _ => fail(
            ctx,
            format!(
                "require(): the message has no fields {}",
                missing.join(", ")
            ),
        ),
    }
}

fn export(
    state: &RuleState,
    ctx: &NativeCallContext,
    name: &str,
    value: &Dynamic,
    labels: Map,
) -> Res<()> {
    let v = number(ctx, "metric", value)?;
    let labels: Vec<(String, String)> = labels
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    running(|rule, _| state.set_gauge(rule, name, v, labels))
        .or_else(|e| fail(ctx, format!("metric(): {e}")))
}

const NO_SLEEP: &str = "rules cannot sleep (sandbox): a rule call holds its message's batch; use for_duration or deadman to wait";

/// Registers `f` as `name` once for every combination of the types each
/// parameter may have (`slots`, one list per parameter).
pub(super) fn typed<T: rhai::Variant + Clone>(
    engine: &mut Engine,
    name: &'static str,
    slots: &[&[TypeId]],
    f: impl Fn(&NativeCallContext, &mut [&mut Dynamic]) -> Res<T> + Send + Sync + 'static,
) {
    let f = Arc::new(f);
    let mut signatures: Vec<Vec<TypeId>> = vec![Vec::new()];
    for slot in slots {
        signatures = signatures
            .into_iter()
            .flat_map(|sig| {
                slot.iter().map(move |t| {
                    let mut s = sig.clone();
                    s.push(*t);
                    s
                })
            })
            .collect();
    }
    for sig in signatures {
        let f = f.clone();
        engine.register_raw_fn(name, sig, move |ctx, args| f(&ctx, args));
    }
}

/// `rate` or `delta` (`func`) of `value` on the series `key` of the running
/// rule, at the message's time.
fn series(
    state: &RuleState,
    ctx: &NativeCallContext,
    func: &str,
    key: &str,
    value: &Dynamic,
) -> Res<f64> {
    let v = number(ctx, func, value)?;
    Ok(running(|rule, now| {
        if func == "rate" {
            state.rate(rule, key, v, now)
        } else {
            state.delta(rule, key, v, now)
        }
    }))
}

/// The types a number argument may have, for [`typed`].
pub(super) fn numbers() -> [TypeId; 2] {
    [TypeId::of::<rhai::INT>(), TypeId::of::<rhai::FLOAT>()]
}

/// Registers the rule API on an engine that is about to be frozen. The
/// stateful helpers (`rate`, `delta`, `metric`) keep their series in
/// `state`, this engine's own.
pub fn register(engine: &mut Engine, state: &Arc<RuleState>) {
    register_alerting(engine);
    super::kind::register(engine);
    register_series(engine, state);
    register_output(engine);
    register_sandbox(engine);
}

/// `alert`, `resolve`, the hysteresis bands and `deadman`: what a rule
/// asserts about alerts.
fn register_alerting(engine: &mut Engine) {
    // `&mut`: a map held in a variable (`alert(a)`) is read in place
    // instead of copied for the call; neither function changes it.
    engine.register_fn(
        "alert",
        |ctx: NativeCallContext, map: &mut Map| -> Res<()> {
            let a = parse_alert(&ctx, "alert", map)?;
            record(|acts| acts.alerts.push(a));
            Ok(())
        },
    );
    engine.register_fn(
        "resolve",
        |ctx: NativeCallContext, map: &mut Map| -> Res<()> {
            resolve_map(&ctx, "resolve", map, true)
        },
    );
    engine.register_fn("resolve", |name: &str| {
        let fp = running(|rule, _| Fingerprint::new(rule, name).finish());
        record(|acts| acts.resolves.push((fp, None)));
    });
    // Rising thresholds: fire above, clear below; falling ones the mirror.
    // Typed for numbers (found at once), `Dynamic` for the errors (see
    // `kind::register`).
    let numbers = numbers();
    let any = [TypeId::of::<Dynamic>()];
    let map = [TypeId::of::<Map>()];
    for (name, rising) in [("hysteresis_above", true), ("hysteresis_below", false)] {
        let f = move |ctx: &NativeCallContext, args: &mut [&mut Dynamic]| -> Res<()> {
            let v = number(ctx, name, args[1])?;
            let (fires, clears) = band_sides(ctx, name, rising, v, args[2], args[3])?;
            // By reference: a map held in a variable is read in place.
            let map = args[0].read_lock::<Map>().expect("registered for maps");
            band(ctx, name, &map, fires, clears)
        };
        typed(engine, name, &[&map, &numbers, &numbers, &numbers], f);
        typed(engine, name, &[&map, &any, &any, &any], f);
    }
    engine.register_fn(
        "deadman",
        |ctx: NativeCallContext, map: Map, after: Dynamic| -> Res<()> {
            let after_ms = deadman_after(&ctx, &after)?;
            check_alert("deadman", &map).or_else(|e| fail(&ctx, e))?;
            let fp = running(|rule, _| identity(rule, &map));
            record(|acts| {
                acts.deadmen.push(Deadman {
                    fp,
                    after_ms,
                    alert: DeadmanAlert::Map(map),
                })
            });
            Ok(())
        },
    );
}

/// `rate`, `delta` and `metric`: the helpers that keep series in `state`.
fn register_series(engine: &mut Engine, state: &Arc<RuleState>) {
    // Typed for numbers (found at once), `Dynamic` for the errors (see
    // `kind::register`).
    for name in ["rate", "delta"] {
        let s = state.clone();
        let f = move |ctx: &NativeCallContext, args: &mut [&mut Dynamic]| -> Res<f64> {
            let key = args[0]
                .read_lock::<ImmutableString>()
                .expect("registered for strings");
            series(&s, ctx, name, &key, args[1])
        };
        let string = [TypeId::of::<ImmutableString>()];
        let any = [TypeId::of::<Dynamic>()];
        typed(engine, name, &[&string, &numbers()], f.clone());
        typed(engine, name, &[&string, &any], f);
    }
    let s = state.clone();
    engine.register_fn(
        "metric",
        move |ctx: NativeCallContext, name: &str, value: Dynamic, labels: Map| -> Res<()> {
            export(&s, &ctx, name, &value, labels)
        },
    );
    let s = state.clone();
    engine.register_fn(
        "metric",
        move |ctx: NativeCallContext, name: &str, value: Dynamic| -> Res<()> {
            export(&s, &ctx, name, &value, Map::new())
        },
    );
}

/// `log`, `drop` and `require`: what a rule says about the message itself.
fn register_output(engine: &mut Engine) {
    engine.register_fn(
        "log",
        |ctx: NativeCallContext, level: &str, text: Dynamic| -> Res<()> {
            let Some(level) = LogLevel::parse(level) else {
                return fail(
                    &ctx,
                    format!("log(): level `{level}` is not one of trace, debug, info, warn, error"),
                );
            };
            let text = text.to_string();
            record(|acts| acts.logs.push((level, text)));
            Ok(())
        },
    );
    engine.register_fn("log", |text: Dynamic| {
        let text = text.to_string();
        record(|acts| acts.logs.push((LogLevel::Info, text)));
    });
    engine.register_fn("drop", || record(|acts| acts.drop = true));
    engine.register_fn(
        "require",
        |ctx: NativeCallContext, msg: &mut Map, fields: rhai::Array| -> Res<()> {
            require(&ctx, msg, &fields)
        },
    );
    engine.register_fn(
        "require",
        |ctx: NativeCallContext, msg: &mut Map, field: &str| -> Res<()> {
            require(&ctx, msg, &[field.into()])
        },
    );
}

/// The sandbox's replacements for Rhai's `sleep`, `print` and `debug`.
fn register_sandbox(engine: &mut Engine) {
    // Rhai's standard `sleep` blocks the thread, and the time budget cannot
    // interrupt a native call: these take its place (the engine's own
    // functions are found before its packages').
    engine.register_fn("sleep", |ctx: NativeCallContext, _: rhai::INT| -> Res<()> {
        fail(&ctx, NO_SLEEP.into())
    });
    engine.register_fn(
        "sleep",
        |ctx: NativeCallContext, _: rhai::FLOAT| -> Res<()> { fail(&ctx, NO_SLEEP.into()) },
    );
    // `print` and `debug` would write to stdout, unlabelled and in the way
    // of the CLI's output: they are `log("info", …)` and `log("debug", …)`,
    // with the rule, stream and message id, and discarded with the rule's
    // other actions if it fails.
    engine.on_print(|text| record(|acts| acts.logs.push((LogLevel::Info, text.to_string()))));
    engine.on_debug(|text, _, _: Position| {
        record(|acts| acts.logs.push((LogLevel::Debug, text.to_string())))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(json: &str) -> Map {
        serde_json::from_str::<Dynamic>(json).unwrap().cast::<Map>()
    }

    #[test]
    fn identity_matches_the_built_alerts_fingerprint() {
        for json in [
            r#"{"name": "X", "labels": {"b": "2", "a": 1, "c": true}, "summary": "s"}"#,
            r#"{"labels": {"hostname": "r1"}}"#,
            r#"{"name": "Only"}"#,
        ] {
            let raw = raw_alert("resolve", &map(json)).unwrap();
            let name = raw.name.clone().unwrap_or_else(|| "rule".to_string());
            assert_eq!(
                identity("rule", &map(json)),
                crate::alert::fingerprint("rule", &name, &raw.labels),
                "{json}"
            );
        }
    }

    #[test]
    fn check_alert_fails_where_raw_alert_fails() {
        for json in [
            r#"{"severity": "bad"}"#,
            r#"{"labels": "x"}"#,
            r#"{"for_duration": "soon"}"#,
            r#"{"colour": "red"}"#,
            r#"{"labels": {"hostname": null}}"#,
            r#"{"name": null}"#,
        ] {
            let checked = check_alert("alert", &map(json)).unwrap_err();
            assert_eq!(raw_alert("alert", &map(json)).unwrap_err(), checked);
        }
        assert!(check_alert("alert", &map(r#"{"severity": "major", "for": 5}"#)).is_ok());
    }
}
