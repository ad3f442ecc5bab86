//! Static checks of compiled rules for `tripline check`: mistakes that
//! compile but fail every time the line runs, found before any message does.
//!
//! Today: map literals handed to the alert functions (`alert`, `resolve`,
//! `deadman`, `hysteresis_above/below`). Each key is checked by
//! [`super::api::raw_alert`] itself, so the lint can never disagree with
//! what the rule would do at run time. A value that is not a constant (a
//! variable, an `if` expression) is left to run time.

use rhai::{ASTNode, Dynamic, Expr, Map, Position, Stmt};

use super::{Rule, RuleSet};

/// Functions whose first argument is an alert map.
const ALERT_FUNCTIONS: [&str; 5] = [
    "alert",
    "resolve",
    "deadman",
    "hysteresis_above",
    "hysteresis_below",
];

/// One mistake, located and printed exactly like a compile error.
pub use super::CompileError as Finding;

/// Every finding of every rule, in rule order.
pub fn lint_set(set: &RuleSet) -> Vec<Finding> {
    set.rules.iter().flat_map(lint_rule).collect()
}

/// The findings of one rule, in source order.
pub fn lint_rule(rule: &Rule) -> Vec<Finding> {
    let mut found = Vec::new();
    rule.ast.walk(&mut |path: &[ASTNode]| {
        // A call is a statement (`alert(…);`) or part of an expression.
        let call = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(call, _)))
            | Some(ASTNode::Stmt(Stmt::FnCall(call, _))) => call,
            _ => return true,
        };
        if call.namespace.is_empty()
            && ALERT_FUNCTIONS.contains(&call.name.as_str())
            && let Some(first) = call.args.first()
        {
            for (pos, message) in check_literal(&call.name, first) {
                found.push(Finding {
                    path: rule.path.clone(),
                    line: pos.line(),
                    column: pos.position(),
                    message,
                });
            }
        }
        true
    });
    found.sort_by_key(|f| (f.line, f.column));
    found.dedup();
    found
}

/// The problems of `arg` when it is a map literal: as written (`Expr::Map`,
/// each key with its position) or folded by the optimizer into a constant
/// (all values constant; then only the map's position is known).
fn check_literal(func: &str, arg: &Expr) -> Vec<(Position, String)> {
    let mut out = Vec::new();
    match arg {
        Expr::Map(m, _) => {
            for (key, value) in &m.0 {
                let constant = value.get_literal_value(None);
                if let Err(e) = check_entry(func, &key.name, constant) {
                    let at = if key.name == "severity" {
                        value.position()
                    } else {
                        key.pos
                    };
                    out.push((at, e));
                }
            }
        }
        Expr::DynamicConstant(v, pos) => {
            if let Some(map) = v.read_lock::<Map>() {
                for (key, value) in map.iter() {
                    if let Err(e) = check_entry(func, key, Some(value.clone())) {
                        out.push((*pos, e));
                    }
                }
            }
        }
        _ => {}
    }
    out
}

/// Checks one key through [`super::api::raw_alert`]. A value only known at
/// run time is replaced by one that is valid for its key, so only the key
/// (and a constant value) can fail.
fn check_entry(func: &str, key: &str, value: Option<Dynamic>) -> Result<(), String> {
    let value = value.unwrap_or_else(|| match key {
        "labels" | "annotations" => Dynamic::from_map(Map::new()),
        "for_duration" | "for" | "resolve_after" => Dynamic::from_int(0),
        "severity" => Dynamic::from("info"),
        _ => Dynamic::from(""),
    });
    let mut single = Map::new();
    single.insert(key.into(), value);
    super::api::raw_alert(func, &single).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::runtime::Runtime;

    fn lint(source: &str) -> Vec<String> {
        let engine = Runtime::new().rule_engine(&Limits::default());
        let rule = super::super::compile_rule(
            &engine,
            std::path::Path::new("rules/r.rhai"),
            "r.rhai",
            source,
        )
        .unwrap();
        lint_rule(&rule).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_severity_and_key_in_alert_literals_are_located() {
        let found = lint(
            "fn on_message(msg, ctx) {\n    if msg.x > 1 {\n        alert(#{ name: \"A\", severity: \"crit\", labels: #{ h: msg.h } });\n    } else {\n        resolve(#{ name: \"A\", lables: #{ h: msg.h } });\n    }\n}\n",
        );
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("rules/r.rhai:3:39: alert(): severity `crit`"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("rules/r.rhai:5:31: resolve(): unknown field `lables`"),
            "{found:?}"
        );
    }

    #[test]
    fn constant_folded_maps_are_checked_too() {
        let found = lint(
            "const SEV = \"crit\";\nfn on_message(msg, ctx) {\n    deadman(#{ name: \"Quiet\", severity: \"Critical!\" }, \"5m\");\n}\n",
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains(":3:"), "{found:?}");
        assert!(found[0].contains("severity `Critical!`"), "{found:?}");
    }

    #[test]
    fn values_known_only_at_run_time_and_valid_literals_pass() {
        let found = lint(
            "fn on_message(msg, ctx) {\n    let labels = #{ h: msg.h };\n    alert(#{ name: \"A\", severity: if msg.x > 2 { \"critical\" } else { \"major\" }, labels: labels, for_duration: msg.d, summary: `x ${msg.x}` });\n    hysteresis_above(#{ name: \"B\", severity: \"warning\", value: msg.x }, msg.x, 5.0, 1.0);\n    let a = #{ severity: \"crit\" };\n}\n",
        );
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn shipped_rules_are_clean() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/rules"));
        let set = RuleSet::load(&build(), dir).unwrap();
        assert!(!set.rules.is_empty());
        assert_eq!(lint_set(&set), []);
    }

    fn build() -> std::sync::Arc<super::super::RuleEngine> {
        Runtime::new().rule_engine(&Limits::default())
    }
}
