//! `tripline silence add | list | expire`: manage silences stored in Redis,
//! honoured by every instance within seconds.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::alert::silence::{self, Matcher, Silence};
use crate::clock::{now_ms, rfc3339};
use crate::config::Settings;
use crate::escape::escape;

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Mute alerts matching every MATCHER (label=value or label=~regex;
    /// alertname, severity and rule match the alert's own fields).
    #[command(
        after_help = "Example:\n  tripline silence add hostname=core-1 alertname=HighInputErrors --duration 2h --comment \"line card swap\""
    )]
    Add {
        #[arg(required = true, value_name = "MATCHER")]
        matchers: Vec<String>,
        /// How long, e.g. 30m, 2h.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "")]
        comment: String,
        /// Who set it; default $USER, else the host name, else "unknown".
        #[arg(long)]
        created_by: Option<String>,
    },
    /// List active silences.
    List,
    /// End a silence now.
    Expire { id: String },
}

/// Who a silence is recorded as set by: never empty, because the question
/// "who muted this?" is asked when the person is not around to answer.
fn author(given: Option<String>, user: Option<String>) -> String {
    [given, user]
        .into_iter()
        .flatten()
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
        .or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.trim().is_empty())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn silence(config_path: Option<&Path>, action: Action) -> anyhow::Result<()> {
    let config = Settings::load(config_path)?;
    let endpoint = config.redis.endpoint.clone();
    let target = config.redis.target;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut conn = target
            .connect(super::REDIS_REPLY_TIMEOUT)
            .await
            .with_context(|| format!("cannot connect to Redis at {endpoint}"))?;
        match action {
            Action::Add {
                matchers,
                duration,
                comment,
                created_by,
            } => {
                let matchers = matchers
                    .iter()
                    .map(|m| Matcher::parse(m))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(anyhow::Error::msg)?;
                let who = author(created_by, std::env::var("USER").ok());
                let s = Silence::new(matchers, now_ms(), duration, who, comment)
                    .map_err(anyhow::Error::msg)?;
                silence::add(&mut conn, &s).await?;
                println!("{} until {}", s.id, rfc3339(s.ends_ms));
            }
            Action::List => {
                for s in silence::list(&mut conn, now_ms()).await? {
                    let m: Vec<String> = s
                        .matchers
                        .iter()
                        .map(|m| {
                            format!("{}{}{}", m.label, if m.regex { "=~" } else { "=" }, m.value)
                        })
                        .collect();
                    // Matchers and comments may come from anyone holding
                    // the admin token: one silence stays one line.
                    let line = format!(
                        "{}  until {}  {}  by {:?}: {}",
                        s.id,
                        rfc3339(s.ends_ms),
                        m.join(" "),
                        s.created_by,
                        s.comment
                    );
                    println!("{}", escape(&line));
                }
            }
            Action::Expire { id } => {
                if !silence::expire(&mut conn, &id).await? {
                    anyhow::bail!("no silence with id {id}");
                }
                println!("expired {id}");
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::author;

    #[test]
    fn silence_without_user_is_not_anonymous() {
        assert_eq!(author(Some("ana".into()), Some("bob".into())), "ana");
        assert_eq!(author(None, Some("bob".into())), "bob");
        let fallback = author(None, None);
        assert!(!fallback.trim().is_empty());
        assert_eq!(author(Some(" ".into()), Some(String::new())), fallback);
    }
}
