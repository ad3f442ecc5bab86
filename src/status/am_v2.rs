//! Alertmanager's API v2, where it fits, in the shapes of Alertmanager's
//! `api/v2/openapi.yaml`, so the tools operators already have (`amtool`,
//! Grafana's Alertmanager data source) list tripline's alerts and manage its
//! silences:
//!
//! - `GET /api/v2/alerts` (`filter`, `active`, `silenced`, `inhibited`,
//!   `unprocessed`): firing alerts as `gettableAlerts`. Pending alerts are
//!   not shown: Alertmanager only ever receives firing ones.
//! - `GET /api/v2/silences` (`filter`), `POST /api/v2/silences`,
//!   `DELETE /api/v2/silence/{id}`: the same silences as `/api/silences`.
//!   Negative matchers (`!=`, `!~`) are refused: tripline's silences cannot
//!   express them.
//! - `GET /api/v2/status`.
//!
//! The mutating ones require the admin token, like `/api/silences`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::alerts::{AlertView, Filter};
use super::{StatusApi, error};
use crate::alert::silence::{self, Matcher, Silence};
use crate::clock::{now_ms, parse_rfc3339, rfc3339};
use crate::http::auth::{bearer_ok, unauthorized};

pub fn routes(api: Arc<StatusApi>) -> Router {
    Router::new()
        .route("/api/v2/alerts", get(alerts))
        .route("/api/v2/silences", get(silences).post(add_silence))
        .route("/api/v2/silence/{id}", delete(expire_silence))
        .route("/api/v2/status", get(status))
        .with_state(api)
}

/// `filter` of Alertmanager: `name op value`, op one of `=`, `!=`, `=~`,
/// `!~`, the value optionally double-quoted.
#[derive(Debug, Clone)]
struct AmMatcher {
    name: String,
    equal: bool,
    /// Anchored, when the matcher is a regex one.
    regex: Option<regex::Regex>,
    value: String,
}

impl AmMatcher {
    fn parse(text: &str) -> Result<AmMatcher, String> {
        let t = text
            .trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .trim();
        let at = t.find(['=', '!']).ok_or_else(|| {
            format!("filter `{text}` is not name=value, name!=value, name=~regex or name!~regex")
        })?;
        let name = t[..at].trim().to_string();
        let rest = &t[at..];
        let (op, value) = ["=~", "!~", "!=", "="]
            .iter()
            .find_map(|op| rest.strip_prefix(op).map(|v| (*op, v.trim())))
            .ok_or_else(|| format!("filter `{text}` has no operator"))?;
        if name.is_empty() {
            return Err(format!("filter `{text}` has no label name"));
        }
        let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(quoted) => unquote(quoted),
            None => value.to_string(),
        };
        let regex = if op.ends_with('~') {
            Some(
                regex::Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("filter `{text}`: bad regex: {e}"))?,
            )
        } else {
            None
        };
        Ok(AmMatcher {
            name,
            equal: op.starts_with('='),
            regex,
            value,
        })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.name).map_or("", String::as_str);
        let hit = match &self.regex {
            Some(re) => re.is_match(v),
            None => v == self.value,
        };
        hit == self.equal
    }
}

/// `\"`, `\\` and `\n` inside a quoted matcher value.
fn unquote(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

/// The labels Alertmanager holds for the alert when tripline's
/// `alertmanager` sink sent it: its own plus `alertname` and `severity`.
fn am_labels(a: &AlertView) -> BTreeMap<String, String> {
    crate::sinks::webhook::am_labels(&a.subject())
}

fn flag(query: &[(String, String)], name: &str) -> Result<bool, String> {
    match query.iter().rev().find(|(k, _)| k == name) {
        None => Ok(true),
        Some((_, v)) => v
            .parse()
            .map_err(|_| format!("`{name}` must be true or false, not `{v}`")),
    }
}

fn am_filters(query: &[(String, String)]) -> Result<Vec<AmMatcher>, String> {
    query
        .iter()
        .filter(|(k, _)| k == "filter")
        .map(|(_, v)| AmMatcher::parse(v))
        .collect()
}

async fn alerts(
    State(api): State<Arc<StatusApi>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (filters, active, silenced) = match (|| {
        Ok::<_, String>((
            am_filters(&query)?,
            flag(&query, "active")?,
            flag(&query, "silenced")?,
        ))
    })() {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let (all, _) = match api.alerts(&Filter::of(Vec::new())).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let now = rfc3339(now_ms());
    let out: Vec<serde_json::Value> = all
        .iter()
        .filter(|a| a.state == "firing")
        .filter(|a| {
            if a.silenced_by.is_empty() {
                active
            } else {
                silenced
            }
        })
        .filter_map(|a| {
            let labels = am_labels(a);
            filters.iter().all(|f| f.matches(&labels)).then(|| {
                json!({
                    "labels": labels,
                    "annotations": a.annotations,
                    "startsAt": a.active_since,
                    "endsAt": "0001-01-01T00:00:00.000Z",
                    "updatedAt": now,
                    "generatorURL": "",
                    "fingerprint": a.fingerprint,
                    "receivers": [{"name": "tripline"}],
                    "status": {
                        "state": if a.silenced_by.is_empty() { "active" } else { "suppressed" },
                        "silencedBy": a.silenced_by,
                        "inhibitedBy": [],
                        "mutedBy": [],
                    },
                })
            })
        })
        .collect();
    Json(out).into_response()
}

/// `matcher` of the API.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiMatcher {
    name: String,
    value: String,
    is_regex: bool,
    /// Absent means true (older clients).
    #[serde(default = "yes")]
    is_equal: bool,
}

fn yes() -> bool {
    true
}

/// `postableSilence`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostableSilence {
    /// Given when updating an existing silence.
    #[serde(default)]
    id: Option<String>,
    matchers: Vec<ApiMatcher>,
    starts_at: String,
    ends_at: String,
    #[serde(default)]
    created_by: String,
    #[serde(default)]
    comment: String,
}

fn gettable(s: &Silence, now: u64) -> serde_json::Value {
    let state = if now < s.starts_ms {
        "pending"
    } else if s.active(now) {
        "active"
    } else {
        "expired"
    };
    let matchers: Vec<ApiMatcher> = s
        .matchers
        .iter()
        .map(|m| ApiMatcher {
            name: m.label.clone(),
            value: m.value.clone(),
            is_regex: m.regex,
            is_equal: true,
        })
        .collect();
    json!({
        "id": s.id,
        "status": {"state": state},
        "updatedAt": rfc3339(s.starts_ms),
        "matchers": matchers,
        "startsAt": rfc3339(s.starts_ms),
        "endsAt": rfc3339(s.ends_ms),
        "createdBy": s.created_by,
        "comment": s.comment,
    })
}

async fn silences(
    State(api): State<Arc<StatusApi>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let filters = match am_filters(&query) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let now = now_ms();
    let all = match api.redis(async |c| silence::list(c, now).await).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    // Alertmanager selects silences whose own equality matchers satisfy
    // the filter.
    let out: Vec<serde_json::Value> = all
        .iter()
        .filter(|s| {
            let labels: BTreeMap<String, String> = s
                .matchers
                .iter()
                .filter(|m| !m.regex)
                .map(|m| (m.label.clone(), m.value.clone()))
                .collect();
            filters.iter().all(|f| f.matches(&labels))
        })
        .map(|s| gettable(s, now))
        .collect();
    Json(out).into_response()
}

async fn add_silence(
    State(api): State<Arc<StatusApi>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !bearer_ok(&headers, api.admin_token.as_deref()) {
        tracing::warn!("POST /api/v2/silences refused: missing or wrong bearer token");
        return unauthorized();
    }
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    let new: PostableSilence = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return bad(format!("invalid silence: {e}")),
    };
    let mut matchers = Vec::new();
    for m in &new.matchers {
        if !m.is_equal {
            return bad(format!(
                "matcher `{}`: negative matchers (!=, !~) are not supported by tripline's silences",
                m.name
            ));
        }
        let op = if m.is_regex { "=~" } else { "=" };
        match Matcher::parse(&format!("{}{op}{}", m.name, m.value)) {
            Ok(parsed) => matchers.push(parsed),
            Err(e) => return bad(e),
        }
    }
    if matchers.is_empty() {
        return bad("a silence needs at least one matcher (it would mute everything)".into());
    }
    let now = now_ms();
    let (Some(starts), Some(ends)) = (parse_rfc3339(&new.starts_at), parse_rfc3339(&new.ends_at))
    else {
        return bad(format!(
            "startsAt `{}` and endsAt `{}` must be RFC 3339 times",
            new.starts_at, new.ends_at
        ));
    };
    if ends <= starts.max(now) {
        return bad("endsAt must be after startsAt and in the future".into());
    }
    let existing = match &new.id {
        Some(id) if !id.is_empty() => Some(id.clone()),
        _ => None,
    };
    let s = Silence {
        id: existing
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        matchers,
        starts_ms: starts,
        ends_ms: ends,
        created_by: new.created_by,
        comment: new.comment,
    };
    let stored = api
        .redis(async |c| {
            if let Some(id) = &existing
                && !silence::list(c, now).await?.iter().any(|s| &s.id == id)
            {
                return Ok(false);
            }
            silence::add(c, &s).await.map(|()| true)
        })
        .await;
    match stored {
        Ok(true) => {
            tracing::info!(id = %s.id, ends_at = %rfc3339(s.ends_ms), "silence added over the Alertmanager API");
            Json(json!({ "silenceID": s.id })).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no silence with id {}", s.id),
        ),
        Err(r) => r,
    }
}

async fn expire_silence(
    State(api): State<Arc<StatusApi>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !bearer_ok(&headers, api.admin_token.as_deref()) {
        tracing::warn!("DELETE /api/v2/silence refused: missing or wrong bearer token");
        return unauthorized();
    }
    match api.redis(async |c| silence::expire(c, &id).await).await {
        Ok(true) => {
            tracing::info!(id, "silence expired over the Alertmanager API");
            StatusCode::OK.into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no silence with id {id}")),
        Err(r) => r,
    }
}

async fn status(State(api): State<Arc<StatusApi>>) -> Response {
    let started = now_ms().saturating_sub((api.uptime_seconds() * 1000.0) as u64);
    let name = api.engine.instance().unwrap_or_default().to_string();
    Json(json!({
        "cluster": {"name": name, "status": "ready", "peers": [{"name": name, "address": ""}]},
        "versionInfo": {
            "version": env!("CARGO_PKG_VERSION"),
            "revision": "",
            "branch": "",
            "buildUser": "",
            "buildDate": "",
            "goVersion": "none (tripline)",
        },
        "config": {"original": "# tripline speaks Alertmanager's API v2; its configuration is not served over HTTP\n"},
        "uptime": rfc3339(started),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amtool_filters_parse_with_quotes_and_negation() {
        let m = AmMatcher::parse(r#"alertname="Hot""#).unwrap();
        let labels: BTreeMap<String, String> =
            [("alertname".to_string(), "Hot".to_string())].into();
        assert!(m.matches(&labels));
        assert!(!AmMatcher::parse("alertname!=Hot").unwrap().matches(&labels));
        assert!(
            AmMatcher::parse(r#"{host=~"a\"b"}"#)
                .unwrap()
                .matches(&[("host".to_string(), "a\"b".to_string())].into())
        );
        assert!(
            AmMatcher::parse("host!~x.*").unwrap().matches(&labels),
            "absent is empty"
        );
        assert!(AmMatcher::parse("host").is_err());
        assert!(AmMatcher::parse("=x").is_err());
    }
}
