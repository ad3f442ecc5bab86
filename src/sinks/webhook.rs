//! `webhook`: HTTP POST of Alertmanager's webhook JSON (version 4), so
//! receivers written for Alertmanager work unchanged.
//!
//! A batch is split into groups by `group_by` labels, one POST per group,
//! as Alertmanager does per aggregation group: `groupKey`, `groupLabels`,
//! `commonLabels` and `commonAnnotations` then mean what receivers expect.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::http_post::{Poster, check_headers, check_url};
use super::{BuildContext, DeliverFuture, Sink, SinkSettings};
use crate::alert::{Alert, Status};

/// What Alertmanager writes as `endsAt` of a firing alert (Go's zero time).
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Where to POST (http or https). Put tokens in `${ENV}`: never logged.
    pub url: String,
    /// Extra request headers, e.g. `Authorization: Bearer ${TOKEN}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Labels that split a batch into groups, one POST each. `[]` sends a
    /// whole batch in one POST.
    #[serde(default = "default_group_by")]
    pub group_by: Vec<String>,
    /// The payload's `receiver`; default: the sink's name.
    #[serde(default)]
    pub receiver: Option<String>,
    /// The payload's `externalURL`, and every alert's `generatorURL`: where a
    /// human can look further (a dashboard, a runbook index).
    #[serde(default)]
    pub external_url: String,
}

fn default_group_by() -> Vec<String> {
    vec!["alertname".to_string()]
}

impl SinkSettings for WebhookSettings {
    fn validate(&self) -> Result<(), String> {
        check_url("url", &self.url)?;
        check_headers(&self.headers)?;
        Ok(())
    }

    fn build(self, cx: &BuildContext) -> Result<Box<dyn Sink>, String> {
        let poster = Poster::new(
            check_url("url", &self.url)?,
            check_headers(&self.headers)?,
            cx.timeout,
        )?;
        Ok(Box::new(WebhookSink {
            poster,
            receiver: self.receiver.unwrap_or_else(|| cx.sink.clone()),
            group_by: self.group_by,
            external_url: self.external_url,
        }))
    }
}

pub struct WebhookSink {
    poster: Poster,
    /// The payload's `receiver`.
    receiver: String,
    /// Labels that split a batch into POSTs.
    group_by: Vec<String>,
    /// The payload's `externalURL` and the alerts' `generatorURL`.
    external_url: String,
}

/// One alert as Alertmanager's webhook sends it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAlert {
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    pub fingerprint: String,
}

/// The body of one POST: Alertmanager's webhook message, version 4.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub version: String,
    pub group_key: String,
    pub truncated_alerts: u64,
    pub status: String,
    pub receiver: String,
    pub group_labels: BTreeMap<String, String>,
    pub common_labels: BTreeMap<String, String>,
    pub common_annotations: BTreeMap<String, String>,
    #[serde(rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<WebhookAlert>,
}

pub fn status_str(s: Status) -> &'static str {
    match s {
        Status::Firing => "firing",
        Status::Resolved => "resolved",
    }
}

/// The alert's labels plus `alertname` and `severity`, as Alertmanager
/// receivers expect to find them.
pub fn am_labels(a: &Alert) -> BTreeMap<String, String> {
    let mut labels = a.labels.clone();
    labels.insert("alertname".into(), a.name.clone());
    labels.insert("severity".into(), a.severity.as_str().into());
    labels
}

pub fn to_webhook_alert(a: &Alert, generator_url: &str) -> WebhookAlert {
    WebhookAlert {
        status: status_str(a.status).into(),
        labels: am_labels(a),
        annotations: a.annotations.clone(),
        starts_at: a.starts_at.clone(),
        ends_at: match a.status {
            Status::Firing => ZERO_TIME.into(),
            Status::Resolved => a.ends_at.clone().unwrap_or_else(|| ZERO_TIME.into()),
        },
        generator_url: generator_url.into(),
        fingerprint: a.fingerprint.clone(),
    }
}

/// Pairs present with the same value in every map.
fn common(maps: &[&BTreeMap<String, String>]) -> BTreeMap<String, String> {
    let Some((first, rest)) = maps.split_first() else {
        return BTreeMap::new();
    };
    first
        .iter()
        .filter(|(k, v)| rest.iter().all(|m| m.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `{}:{alertname="X"}`: Alertmanager's group key of the root route.
fn group_key(group_labels: &BTreeMap<String, String>) -> String {
    let inner = group_labels
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
        .collect::<Vec<_>>()
        .join(",");
    format!("{{}}:{{{inner}}}")
}

impl WebhookSink {
    /// The POST bodies for one batch, one per group, in first-seen order.
    pub fn messages(&self, alerts: &[Alert]) -> Vec<Message> {
        let mut groups: Vec<(BTreeMap<String, String>, Vec<WebhookAlert>)> = Vec::new();
        for a in alerts {
            let wa = to_webhook_alert(a, &self.external_url);
            let key: BTreeMap<String, String> = self
                .group_by
                .iter()
                .filter_map(|l| wa.labels.get(l).map(|v| (l.clone(), v.clone())))
                .collect();
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(wa),
                None => groups.push((key, vec![wa])),
            }
        }
        groups
            .into_iter()
            .map(|(group_labels, alerts)| {
                let labels: Vec<_> = alerts.iter().map(|a| &a.labels).collect();
                let annotations: Vec<_> = alerts.iter().map(|a| &a.annotations).collect();
                let firing = alerts.iter().any(|a| a.status == "firing");
                Message {
                    version: "4".into(),
                    group_key: group_key(&group_labels),
                    truncated_alerts: 0,
                    status: if firing { "firing" } else { "resolved" }.into(),
                    receiver: self.receiver.clone(),
                    common_labels: common(&labels),
                    common_annotations: common(&annotations),
                    group_labels,
                    external_url: self.external_url.clone(),
                    alerts,
                }
            })
            .collect()
    }
}

impl Sink for WebhookSink {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(async move {
            for m in self.messages(alerts) {
                self.poster.post_json(&m).await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Origin, Severity};

    fn alert(name: &str, host: &str, status: Status) -> Alert {
        Alert {
            fingerprint: format!("fp-{name}-{host}"),
            rule: "r".into(),
            name: name.into(),
            severity: Severity::Critical,
            status,
            labels: [("hostname".to_string(), host.to_string())].into(),
            annotations: [("summary".to_string(), format!("{name} on {host}"))].into(),
            starts_at: "2026-01-01T00:00:00Z".into(),
            ends_at: (status == Status::Resolved).then(|| "2026-01-01T00:05:00Z".into()),
            origin: Origin::default(),
        }
    }

    fn sink(group_by: &[&str]) -> WebhookSink {
        WebhookSink {
            poster: Poster::new(
                reqwest::Url::parse("http://127.0.0.1:9/").unwrap(),
                Default::default(),
                std::time::Duration::from_secs(1),
            )
            .unwrap(),
            receiver: "hook".into(),
            group_by: group_by.iter().map(|s| s.to_string()).collect(),
            external_url: String::new(),
        }
    }

    #[test]
    fn groups_by_alertname_like_alertmanager() {
        let batch = [
            alert("A", "r1", Status::Firing),
            alert("B", "r1", Status::Resolved),
            alert("A", "r2", Status::Resolved),
        ];
        let m = sink(&["alertname"]).messages(&batch);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].group_key, r#"{}:{alertname="A"}"#);
        assert_eq!(m[0].status, "firing");
        assert_eq!(m[0].alerts.len(), 2);
        assert_eq!(m[0].alerts[0].ends_at, ZERO_TIME);
        assert_eq!(m[0].alerts[1].ends_at, "2026-01-01T00:05:00Z");
        assert_eq!(m[0].common_labels["alertname"], "A");
        assert!(!m[0].common_labels.contains_key("hostname"));
        assert_eq!(m[1].status, "resolved");
        assert_eq!(m[1].common_labels["hostname"], "r1");
        assert_eq!(m[1].common_annotations["summary"], "B on r1");
        assert_eq!(sink(&[]).messages(&batch).len(), 1);
    }

    #[test]
    fn body_uses_alertmanager_field_names() {
        let m = &sink(&["alertname"]).messages(&[alert("A", "r1", Status::Firing)])[0];
        let v = serde_json::to_value(m).unwrap();
        for key in [
            "version",
            "groupKey",
            "truncatedAlerts",
            "status",
            "receiver",
            "groupLabels",
            "commonLabels",
            "commonAnnotations",
            "externalURL",
            "alerts",
        ] {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        let a = &v["alerts"][0];
        for key in [
            "status",
            "labels",
            "annotations",
            "startsAt",
            "endsAt",
            "generatorURL",
            "fingerprint",
        ] {
            assert!(a.get(key).is_some(), "missing alerts[].{key}: {a}");
        }
        assert_eq!(a["labels"]["severity"], "critical");
    }
}
