//! `tripline status`: how a running instance is doing (its
//! `/api/v1/status`): Redis, the last reloads, groups and sinks.

use std::path::Path;

use super::alerts::{Output, base_url, get_json};
use crate::escape::escape;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of a running instance; default: the config's `http.listen`.
    #[arg(long)]
    pub url: Option<String>,
    /// `table` for people, `json` for scripts (the API's answer as is).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub fn status(config: Option<&Path>, args: Args) -> anyhow::Result<()> {
    let base = base_url(config, args.url)?;
    let s = get_json(&base, "/api/v1/status", &[])?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => print!("{}", report(&s)),
    }
    Ok(())
}

fn report(s: &serde_json::Value) -> String {
    let t = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => escape(s).into_owned(),
        serde_json::Value::Null => "-".into(),
        other => escape(&other.to_string()).into_owned(),
    };
    let mut out = format!(
        "tripline {} ({}), instance {}, up {}s, config {}\nRedis {} cluster={} reachable={}\n",
        t(&s["version"]),
        t(&s["build"]["profile"]),
        t(&s["instance"]),
        t(&s["uptime_seconds"]),
        t(&s["config_file"]),
        t(&s["redis"]["endpoint"]),
        t(&s["redis"]["cluster"]),
        t(&s["redis"]["reachable"]),
    );
    for n in s["redis"]["nodes"].as_array().into_iter().flatten() {
        out.push_str(&format!("  node {}\n", t(n)));
    }
    for (kind, r) in s["reloads"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "reload {} {} at {} ({}): {}\n",
            escape(kind),
            t(&r["result"]),
            t(&r["at"]),
            t(&r["trigger"]),
            t(&r["detail"])
        ));
    }
    for sub in s["subscriptions"].as_array().into_iter().flatten() {
        for g in sub["streams"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "subscription {} group {} stream {}: lag {} pending {} consumers {}\n",
                t(&sub["name"]),
                t(&sub["group"]),
                t(&g["stream"]),
                t(&g["lag"]),
                t(&g["pending"]),
                t(&g["consumers"])
            ));
        }
    }
    for (name, k) in s["sinks"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "sink {} ({}): {}, backlog {}, dead letters {}, last success {}, last error {}\n",
            escape(name),
            t(&k["kind"]),
            t(&k["state"]),
            t(&k["backlog"]),
            t(&k["dead_letters"]),
            t(&k["last_success"]),
            t(&k["last_error"]["error"])
        ));
    }
    out
}
