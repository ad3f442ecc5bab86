//! The functions a rule can call: `alert`, `resolve`, `log`, `drop`.
//!
//! Rules run on blocking threads, one message and one rule at a time per
//! thread, so each thread collects the actions of the rule it is running in a
//! thread-local [`Actions`]. That keeps the registered functions free of
//! locks and the `Engine` shareable and frozen.

use std::cell::RefCell;
use std::collections::BTreeMap;

use rhai::{Dynamic, Engine, EvalAltResult, Map, NativeCallContext, Position};

use crate::alert::Severity;

/// An alert as a rule asserted it, before identity and lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub struct RawAlert {
    /// Defaults to the rule's name.
    pub name: Option<String>,
    pub severity: Severity,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
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
    pub logs: Vec<(LogLevel, String)>,
    pub drop: bool,
}

impl Actions {
    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty() && self.resolves.is_empty() && self.logs.is_empty() && !self.drop
    }
}

thread_local! {
    static ACTIONS: RefCell<Actions> = RefCell::new(Actions::default());
}

/// Clears this thread's actions before a rule runs.
pub(crate) fn begin() {
    ACTIONS.with(|a| *a.borrow_mut() = Actions::default());
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

const ALERT_KEYS: &str = "name, severity, labels, summary, description, annotations";

/// Validates an alert map here, so a typo fails the rule with a position
/// instead of producing a half-filled alert.
fn parse_alert(ctx: &NativeCallContext, func: &str, map: Map) -> Res<RawAlert> {
    let mut alert = RawAlert {
        name: None,
        severity: Severity::Warning,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    };
    for (key, value) in map {
        match key.as_str() {
            "name" => alert.name = Some(value.to_string()),
            "severity" => {
                let text = value.to_string();
                alert.severity = match Severity::parse(&text) {
                    Some(s) => s,
                    None => {
                        return fail(
                            ctx,
                            format!(
                                "{func}(): severity `{text}` is not one of info, warning, major, critical"
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
                    target.insert(k.to_string(), v.to_string());
                }
            }
            "summary" | "description" => {
                alert.annotations.insert(key.to_string(), value.to_string());
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
            severity: Severity::Warning,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        };
        record(|acts| acts.resolves.push(a));
    });
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
