//! `tripline alerts`: the pending and firing alerts of a running instance
//! (cluster-wide, from its `/api/v1/alerts`), as a table or JSON, the way
//! `amtool alert query` lists Alertmanager's.

use std::path::Path;

use anyhow::Context;

use crate::escape::escape;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only alerts matching every MATCHER (label=value or label=~regex;
    /// alertname, severity and rule match the alert's own fields).
    #[arg(value_name = "MATCHER")]
    pub matchers: Vec<String>,
    /// Base URL of a running instance; default: the config's `http.listen`.
    #[arg(long)]
    pub url: Option<String>,
    /// `table` for people, `json` for scripts (the API's answer as is).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `--url`, else `http://` + the config's listen address.
pub fn base_url(config: Option<&Path>, url: Option<String>) -> anyhow::Result<String> {
    if let Some(u) = url {
        return Ok(u.trim_end_matches('/').to_string());
    }
    let settings = crate::config::Settings::load(config)?;
    let http = settings
        .http
        .context("http is disabled in the config; pass --url of a running instance")?;
    Ok(format!("http://{}", http.listen))
}

/// GETs `path` with `query` and returns the JSON body; the error says which
/// URL failed and what it answered.
pub fn get_json(
    base: &str,
    path: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let url = reqwest::Url::parse_with_params(&format!("{base}{path}"), query)
        .with_context(|| format!("`{base}` is not a URL"))?;
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .get(url.clone())
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("cannot reach tripline at {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!("{url} answered {status}: {}", escape(text.trim()));
        }
        serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))
    })
}

pub fn alerts(config: Option<&Path>, args: Args) -> anyhow::Result<()> {
    let base = base_url(config, args.url)?;
    let query: Vec<(&str, &str)> = args
        .matchers
        .iter()
        .map(|m| ("filter", m.as_str()))
        .collect();
    let body = get_json(&base, "/api/v1/alerts", &query)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&body)?),
        Output::Table => print!("{}", table(&body)),
    }
    Ok(())
}

/// One line per alert; every cell escaped, so a label cannot forge a line.
fn table(body: &serde_json::Value) -> String {
    let empty = Vec::new();
    let alerts = body["alerts"].as_array().unwrap_or(&empty);
    let mut rows = vec![[
        "ALERTNAME".to_string(),
        "STATE".into(),
        "SEVERITY".into(),
        "SINCE".into(),
        "LABELS".into(),
        "SILENCED BY".into(),
        "SUMMARY".into(),
    ]];
    for a in alerts {
        let text = |v: &serde_json::Value| escape(v.as_str().unwrap_or("")).into_owned();
        let labels: Vec<String> = a["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let silenced: Vec<String> = a["silenced_by"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|v| v.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        rows.push([
            text(&a["name"]),
            text(&a["state"]),
            text(&a["severity"]),
            text(&a["active_since"]),
            escape(&labels.join(",")).into_owned(),
            if silenced.is_empty() {
                "-".into()
            } else {
                escape(&silenced.join(",")).into_owned()
            },
            text(&a["annotations"]["summary"]),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn a_label_with_a_newline_stays_on_its_row() {
        let body = serde_json::json!({"alerts": [{
            "name": "Hot", "state": "firing", "severity": "major",
            "active_since": "2026-01-01T00:00:00.000Z",
            "labels": {"host": "a\nFAKE ROW"}, "silenced_by": [], "annotations": {}
        }]});
        let t = table(&body);
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(t.contains("host=a\\nFAKE ROW"), "{t}");
    }
}
