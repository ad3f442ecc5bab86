//! `alertmanager`: POST `/api/v2/alerts` of a Prometheus Alertmanager, the
//! way Prometheus does: firing alerts with `startsAt`, resolved ones with
//! their `endsAt`, so they resolve there.
//!
//! For an Alertmanager cluster, write one manifest per member (Prometheus
//! also sends to every member): each gets its own cursor and retries.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::http_post::{Poster, check_headers, check_url};
use super::{BuildContext, DeliverFuture, Sink, SinkSettings};
use crate::alert::{Alert, Status};

/// Bounds `firing_ttl` so `now + ttl` cannot overflow.
const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerSettings {
    /// Base URL of the Alertmanager, e.g. `http://alertmanager:9093`
    /// (a path prefix is kept); `/api/v2/alerts` is appended.
    pub url: String,
    /// Extra request headers (an authenticating proxy in front of it).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Every alert's `generatorURL`: where a human can look further.
    #[serde(default)]
    pub generator_url: String,
    /// Sent as `endsAt` = now + this on firing alerts. Unset, Alertmanager
    /// applies its own `resolve_timeout` (5m by default): a firing alert
    /// tripline does not re-send (see `alerts.repeat_interval`) then
    /// resolves there on its own. Set it above `alerts.repeat_interval`.
    #[serde(default, with = "humantime_serde")]
    pub firing_ttl: Option<Duration>,
}

impl AlertmanagerSettings {
    fn endpoint(&self) -> Result<reqwest::Url, String> {
        let base = check_url("url", &self.url)?;
        let path = format!("{}/api/v2/alerts", base.path().trim_end_matches('/'));
        let mut url = base;
        url.set_path(&path);
        Ok(url)
    }
}

impl SinkSettings for AlertmanagerSettings {
    fn validate(&self) -> Result<(), String> {
        self.endpoint()?;
        check_headers(&self.headers)?;
        if self.firing_ttl.is_some_and(|t| t > MAX_TTL) {
            return Err("`firing_ttl` must be at most a year".into());
        }
        if self.generator_url.is_empty() {
            Ok(())
        } else {
            check_url("generator_url", &self.generator_url).map(drop)
        }
    }

    fn build(self, cx: &BuildContext) -> Result<Box<dyn Sink>, String> {
        let poster = Poster::new(self.endpoint()?, check_headers(&self.headers)?, cx.timeout)?;
        Ok(Box::new(AlertmanagerSink {
            poster,
            generator_url: self.generator_url,
            firing_ttl: self.firing_ttl,
        }))
    }
}

pub struct AlertmanagerSink {
    poster: Poster,
    /// Every alert's `generatorURL`.
    generator_url: String,
    /// `endsAt` of firing alerts, relative to the delivery time.
    firing_ttl: Option<Duration>,
}

/// One element of the POST body (Alertmanager's `postableAlert`).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
    #[serde(
        rename = "generatorURL",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub generator_url: String,
}

impl AlertmanagerSink {
    pub fn postable(&self, a: &Alert, now: chrono::DateTime<chrono::Utc>) -> PostableAlert {
        let ends_at = match a.status {
            // A resolve without a time (none today) resolves now.
            Status::Resolved => Some(
                a.ends_at
                    .clone()
                    .unwrap_or_else(|| now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            ),
            Status::Firing => self.firing_ttl.map(|ttl| {
                (now + chrono::Duration::from_std(ttl).expect("validated: at most a year"))
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }),
        };
        PostableAlert {
            labels: super::webhook::am_labels(a),
            annotations: a.annotations.clone(),
            starts_at: a.starts_at.clone(),
            ends_at,
            generator_url: self.generator_url.clone(),
        }
    }
}

impl Sink for AlertmanagerSink {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(async move {
            let now = chrono::Utc::now();
            let body: Vec<PostableAlert> = alerts.iter().map(|a| self.postable(a, now)).collect();
            self.poster.post_json(&body).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> AlertmanagerSettings {
        AlertmanagerSettings {
            url: url.into(),
            headers: Default::default(),
            generator_url: String::new(),
            firing_ttl: None,
        }
    }

    #[test]
    fn endpoint_keeps_a_path_prefix() {
        assert_eq!(
            settings("http://am:9093").endpoint().unwrap().as_str(),
            "http://am:9093/api/v2/alerts"
        );
        assert_eq!(
            settings("https://h/alertmanager/")
                .endpoint()
                .unwrap()
                .as_str(),
            "https://h/alertmanager/api/v2/alerts"
        );
    }
}
