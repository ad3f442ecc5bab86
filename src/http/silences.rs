//! `/api/silences`: list, add and expire silences over HTTP, the same
//! store `tripline silence` uses (Redis), so every instance honours them.
//!
//! - `GET /api/silences` → `[{id, matchers, starts_at, ends_at, created_by,
//!   comment}]`, times in RFC 3339 (as Alertmanager's)
//! - `POST /api/silences` with `{"matchers": ["hostname=core-1",
//!   "alertname=~High.*"], "duration": "2h", "comment": "…",
//!   "created_by": "…"}` → the silence in the same shape; 400 naming what
//!   is wrong
//! - `DELETE /api/silences/{id}` → 200, or 404 when there is no such silence

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::{bearer_ok, unauthorized};
use crate::alert::silence::{self, Matcher, Silence};
use crate::clock::{now_ms, rfc3339};
use crate::redis_conn::{RedisConn, RedisTarget};

/// Where silences are stored, read and written over the instance's shared
/// connection.
pub struct SilenceApi {
    target: RedisTarget,
    /// Bearer token adding or ending a silence requires
    /// (`http.admin_token`); listing is open, like `/metrics`.
    admin_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    matchers: Vec<String>,
    /// e.g. "30m", "2h".
    duration: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    created_by: String,
}

impl SilenceApi {
    pub fn new(target: RedisTarget, admin_token: Option<String>) -> SilenceApi {
        SilenceApi {
            target,
            admin_token,
        }
    }

    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/api/silences", get(list).post(add))
            .route("/api/silences/{id}", delete(expire))
            .with_state(self)
    }

    /// Runs `f` on the shared connection ([`super::with_redis`]).
    async fn redis<T>(
        &self,
        f: impl AsyncFnOnce(&mut RedisConn) -> redis::RedisResult<T>,
    ) -> Result<T, Response> {
        super::with_redis(&self.target, f).await
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

async fn list(State(api): State<Arc<SilenceApi>>) -> Response {
    match api.redis(async |c| silence::list(c, now_ms()).await).await {
        Ok(all) => Json(all.iter().map(silence_view).collect::<Vec<_>>()).into_response(),
        Err(r) => r,
    }
}

async fn add(
    State(api): State<Arc<SilenceApi>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !bearer_ok(&headers, api.admin_token.as_deref()) {
        tracing::warn!("POST /api/silences refused: missing or wrong bearer token");
        return unauthorized();
    }
    let new: NewSilence = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return bad_request(format!("invalid silence: {e}")),
    };
    let matchers = match new
        .matchers
        .iter()
        .map(|m| Matcher::parse(m))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(m) => m,
        Err(e) => return bad_request(e),
    };
    let duration = match humantime::parse_duration(new.duration.trim()) {
        Ok(d) => d,
        Err(e) => return bad_request(format!("duration `{}`: {e}", new.duration)),
    };
    let s = match Silence::new(matchers, now_ms(), duration, new.created_by, new.comment) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    match api.redis(async |c| silence::add(c, &s).await).await {
        Ok(()) => {
            tracing::info!(id = %s.id, ends_at = %rfc3339(s.ends_ms), "silence added over HTTP");
            Json(silence_view(&s)).into_response()
        }
        Err(r) => r,
    }
}

async fn expire(
    State(api): State<Arc<SilenceApi>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !bearer_ok(&headers, api.admin_token.as_deref()) {
        tracing::warn!("DELETE /api/silences refused: missing or wrong bearer token");
        return unauthorized();
    }
    match api.redis(async |c| silence::expire(c, &id).await).await {
        Ok(true) => {
            tracing::info!(id, "silence expired over HTTP");
            Json(json!({ "expired": id })).into_response()
        }
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no silence with id {id}") })),
        )
            .into_response(),
        Err(r) => r,
    }
}
/// A silence with RFC 3339 times, the one shape every API answers with.
pub fn silence_view(s: &Silence) -> serde_json::Value {
    json!({
        "id": s.id,
        "matchers": s.matchers,
        "starts_at": rfc3339(s.starts_ms),
        "ends_at": rfc3339(s.ends_ms),
        "created_by": s.created_by,
        "comment": s.comment,
    })
}
