//! The functions a rule can call: `alert`, `resolve`, `log`, `drop`.
//!
//! Rules run on blocking threads, one message and one rule at a time per
//! thread, so each thread collects the actions of the rule it is running in a
//! thread-local [`Actions`]. That keeps the registered functions free of
//! locks and the `Engine` shareable and frozen.

use std::cell::RefCell;
use std::collections::BTreeMap;

use rhai::{Dynamic, Engine, EvalAltResult, Map, NativeCallContext, Position};

use super::state;
use crate::alert::Severity;

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
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Actions {
    pub alerts: Vec<RawAlert>,
    pub resolves: Vec<RawAlert>,
    /// `deadman(alert, after)`: fire `alert` if this series stays silent
    /// for `after` milliseconds.
    pub deadmen: Vec<(RawAlert, u64)>,
    pub logs: Vec<(LogLevel, String)>,
    pub drop: bool,
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

fn running<T>(f: impl FnOnce(&str, u64) -> T) -> T {
    RUNNING.with(|r| {
        let r = r.borrow();
        f(&r.rule, r.now_ms)
    })
}

/// Takes the actions the rule that just ran recorded on this thread.
pub(crate) fn take() -> Actions {
    ACTIONS.with(|a| std::mem::take(&mut *a.borrow_mut()))
}

fn record(f: impl FnOnce(&mut Actions)) {
    ACTIONS.with(|a| f(&mut a.borrow_mut()));
}

type Res<T> = Result<T, Box<EvalAltResult>>;

fn fail<T>(ctx: &NativeCallContext, text: String) -> Res<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        text.into(),
        ctx.call_position(),
    )))
}

const ALERT_KEYS: &str =
    "name, severity, labels, summary, description, annotations, value, for_duration, resolve_after";

/// A duration given as `"5m"`/`"30s"` or as a number of seconds.
fn duration_ms(ctx: &NativeCallContext, func: &str, key: &str, v: &Dynamic) -> Res<u64> {
    if let Ok(i) = v.as_int() {
        if i >= 0 {
            return Ok(i as u64 * 1000);
        }
    } else if let Ok(f) = v.as_float() {
        if f >= 0.0 && f.is_finite() {
            return Ok((f * 1000.0) as u64);
        }
    } else if let Ok(s) = v.clone().into_string()
        && let Ok(d) = humantime::parse_duration(s.trim())
    {
        return Ok(d.as_millis() as u64);
    }
    fail(
        ctx,
        format!("{func}(): `{key}` must be a duration like \"5m\" or a number of seconds, got {v}"),
    )
}

fn number(ctx: &NativeCallContext, func: &str, v: &Dynamic) -> Res<f64> {
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
fn text(v: &Dynamic) -> String {
    match v.read_lock::<rhai::ImmutableString>() {
        Some(s) => s.as_str().to_owned(),
        None => v.to_string(),
    }
}

/// Validates an alert map here, so a typo fails the rule with a position
/// instead of producing a half-filled alert.
fn parse_alert(ctx: &NativeCallContext, func: &str, map: Map) -> Res<RawAlert> {
    let mut alert = RawAlert::default();
    for (key, value) in map {
        match key.as_str() {
            "value" => alert.value = Some(text(&value)),
            // `for` is a Rhai keyword: `for_duration` reads better than `"for"`.
            "for_duration" | "for" => alert.for_ms = duration_ms(ctx, func, &key, &value)?,
            "resolve_after" => {
                alert.resolve_after_ms = Some(duration_ms(ctx, func, "resolve_after", &value)?)
            }
            "name" => alert.name = Some(text(&value)),
            "severity" => {
                let level = text(&value);
                alert.severity = match Severity::parse(&level) {
                    Some(s) => s,
                    None => {
                        return fail(
                            ctx,
                            format!(
                                "{func}(): severity `{level}` is not one of info, warning, major, critical"
                            ),
                        );
                    }
                }
            }
            "labels" | "annotations" => {
                let Some(inner) = value.try_cast::<Map>() else {
                    return fail(ctx, format!("{func}(): `{key}` must be a map"));
                };
                let target = if key == "labels" {
                    &mut alert.labels
                } else {
                    &mut alert.annotations
                };
                for (k, v) in inner {
                    target.insert(k.to_string(), text(&v));
                }
            }
            "summary" | "description" => {
                alert.annotations.insert(key.to_string(), text(&value));
            }
            other => {
                return fail(
                    ctx,
                    format!("{func}(): unknown field `{other}` (expected {ALERT_KEYS})"),
                );
            }
        }
    }
    Ok(alert)
}

/// Fires when `fire`, resolves when `clear`, and between the two leaves the
/// alert as it is: the band that stops an alert flapping on a threshold.
fn band(ctx: &NativeCallContext, func: &str, map: Map, fire: bool, clear: bool) -> Res<()> {
    let a = parse_alert(ctx, func, map)?;
    if fire {
        record(|acts| acts.alerts.push(a));
    } else if clear {
        record(|acts| acts.resolves.push(a));
    }
    Ok(())
}

fn export(ctx: &NativeCallContext, name: &str, value: &Dynamic, labels: Map) -> Res<()> {
    let v = number(ctx, "metric", value)?;
    let labels: Vec<(String, String)> = labels
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    running(|rule, _| state::set_gauge(rule, name, v, labels))
        .or_else(|e| fail(ctx, format!("metric(): {e}")))
}

/// Registers the rule API on an engine that is about to be frozen.
pub fn register(engine: &mut Engine) {
    engine.register_fn("alert", |ctx: NativeCallContext, map: Map| -> Res<()> {
        let a = parse_alert(&ctx, "alert", map)?;
        record(|acts| acts.alerts.push(a));
        Ok(())
    });
    engine.register_fn("resolve", |ctx: NativeCallContext, map: Map| -> Res<()> {
        let a = parse_alert(&ctx, "resolve", map)?;
        record(|acts| acts.resolves.push(a));
        Ok(())
    });
    engine.register_fn("resolve", |name: &str| {
        let a = RawAlert {
            name: Some(name.to_string()),
            ..RawAlert::default()
        };
        record(|acts| acts.resolves.push(a));
    });
    // Rising thresholds: fire above, clear below; falling ones the mirror.
    for (name, rising) in [("hysteresis_above", true), ("hysteresis_below", false)] {
        engine.register_fn(
            name,
            move |ctx: NativeCallContext,
                  map: Map,
                  value: Dynamic,
                  fire: Dynamic,
                  clear: Dynamic|
                  -> Res<()> {
                let (v, fire, clear) = (
                    number(&ctx, name, &value)?,
                    number(&ctx, name, &fire)?,
                    number(&ctx, name, &clear)?,
                );
                if (rising && clear > fire) || (!rising && clear < fire) {
                    let side = if rising { "above" } else { "below" };
                    return fail(
                        &ctx,
                        format!(
                            "{name}(): clear threshold {clear} is {side} fire threshold {fire}"
                        ),
                    );
                }
                if rising {
                    band(&ctx, name, map, v > fire, v < clear)
                } else {
                    band(&ctx, name, map, v < fire, v > clear)
                }
            },
        );
    }
    engine.register_fn(
        "deadman",
        |ctx: NativeCallContext, map: Map, after: Dynamic| -> Res<()> {
            let ms = duration_ms(&ctx, "deadman", "after", &after)?;
            if ms == 0 {
                return fail(&ctx, "deadman(): the silence must be longer than 0".into());
            }
            let a = parse_alert(&ctx, "deadman", map)?;
            record(|acts| acts.deadmen.push((a, ms)));
            Ok(())
        },
    );
    engine.register_fn(
        "rate",
        |ctx: NativeCallContext, key: &str, value: Dynamic| -> Res<f64> {
            let v = number(&ctx, "rate", &value)?;
            Ok(running(|rule, now| state::rate(rule, key, v, now)))
        },
    );
    engine.register_fn(
        "delta",
        |ctx: NativeCallContext, key: &str, value: Dynamic| -> Res<f64> {
            let v = number(&ctx, "delta", &value)?;
            Ok(running(|rule, now| state::delta(rule, key, v, now)))
        },
    );
    engine.register_fn(
        "metric",
        |ctx: NativeCallContext, name: &str, value: Dynamic, labels: Map| -> Res<()> {
            export(&ctx, name, &value, labels)
        },
    );
    engine.register_fn(
        "metric",
        |ctx: NativeCallContext, name: &str, value: Dynamic| -> Res<()> {
            export(&ctx, name, &value, Map::new())
        },
    );
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
    // `print` and `debug` would write to stdout; route them into our logs.
    engine.on_print(|text| tracing::info!(target: "tripline::rule", "{text}"));
    engine.on_debug(|text, source, pos: Position| {
        tracing::debug!(target: "tripline::rule", source = source.unwrap_or(""), %pos, "{text}")
    });
}
