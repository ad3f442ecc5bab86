//! `tripline check`: loads the config, compiles every rule and validates
//! every plugin through the same code `run` uses, and reports all errors.

use std::path::Path;

use crate::app;
use crate::config::Config;
use crate::escape::escape;

pub fn check(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let prepared = app::prepare(&config)?;
    println!(
        "OK: {} subscription(s), {} rule(s), {} sink(s) ({} enabled)",
        config.subscriptions.len(),
        prepared.rules.set.rules.len(),
        prepared.plugins.len(),
        prepared.plugins.iter().filter(|m| m.enabled).count()
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
    }
    Ok(())
}
