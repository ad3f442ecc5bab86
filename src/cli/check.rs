//! `tripline check`: loads the config, compiles every rule and validates
//! every plugin through the same code `run` uses, and reports all errors.
//! Then the lint ([`crate::rules::lint`]): mistakes that compile but fail
//! every time they run are errors too. What is legal but likely unintended
//! (no sink enabled, a subscription without rules) is a warning.

use std::path::Path;

use crate::app;
use crate::config::Settings;
use crate::escape::escape;
use crate::rules::lint;
use crate::runtime::Runtime;

pub fn check(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Settings::load(config_path)?;
    let prepared = app::prepare(&config, &Runtime::new())?;
    let findings = lint::lint_set(&prepared.rules.set);
    for f in &findings {
        eprintln!("error: {}", escape(&f.to_string()));
    }
    if !findings.is_empty() {
        anyhow::bail!(
            "{} mistake(s) in rules (above); they would fail every time they run",
            findings.len()
        );
    }
    let enabled = prepared.plugins.iter().filter(|m| m.enabled).count();
    println!(
        "OK: {} subscription(s), {} rule(s), {} sink(s) ({enabled} enabled)",
        config.subscriptions.len(),
        prepared.rules.set.rules.len(),
        prepared.plugins.len(),
    );
    for sub in &config.subscriptions {
        let names: Vec<&str> = prepared
            .rules
            .selections
            .get(&sub.name)
            .map(|ix| {
                ix.iter()
                    .map(|&i| prepared.rules.set.rules[i].name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        // Rule names are file names, which may hold any byte but `/`.
        let line = format!(
            "  {} (group {}, streams {}): {}",
            sub.name,
            sub.group(),
            sub.streams.join(", "),
            if names.is_empty() {
                "no rules".to_string()
            } else {
                names.join(", ")
            }
        );
        println!("{}", escape(&line));
        if names.is_empty() {
            eprintln!(
                "warning: subscription `{}` selects no rule (`rules`: {} under {}): no rule judges its messages",
                sub.name,
                sub.rules.join(", "),
                config.rules_dir.display()
            );
        }
    }
    // What each declaring rule is for: a declaration that is too narrow
    // silently skips messages, so `check` shows it.
    for rule in &prepared.rules.set.rules {
        if let Some(when) = rule.when() {
            let line = format!("  rule {} runs only when: {when}", rule.name);
            println!("{}", escape(&line));
        }
        let kinds = rule.alert_kinds();
        if !kinds.is_empty() {
            let line = format!("  rule {} declares alerts: {}", rule.name, kinds.join(", "));
            println!("{}", escape(&line));
        }
    }
    if enabled == 0 {
        eprintln!(
            "warning: no sink is enabled in {}: alerts are raised but go nowhere (set `enabled: true` in a manifest)",
            config.plugins_dir.display()
        );
    }
    Ok(())
}
