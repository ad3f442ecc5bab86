//! The HTTP listener: `/metrics` for Prometheus, `/healthz` (the process
//! answers), `/readyz` (503 with the reasons while Redis is unreachable, the
//! engine is starting or shutting down), `POST /-/reload`, and
//! `POST /telemetry-data`, the seed's gateway for collectors that cannot
//! speak Redis, `POST /api/v1/ingest/{stream}` for any other producer, and
//! `/api/silences`. One file per concern: [`probes`], [`metrics`],
//! [`gateway`], [`ingest`], [`silences`]; [`auth`] holds the bearer check
//! they share and [`server`] the listener loop.
//!
//! Every connection is bounded: its headers must arrive within
//! `http.header_read_timeout`, it is closed after `http.idle_timeout` with
//! no bytes moving, and at most `http.max_connections` are served at once
//! (see [`ConnectionLimits`]).
//!
//! The listener serves from the moment it is bound, before the engine is
//! set up: probes and scrapes get an honest "not ready" instead of a refused
//! connection while tripline waits for Redis.

pub mod auth;
pub mod gateway;
pub mod ingest;
pub mod metrics;
pub mod probes;
pub mod server;
pub mod silences;

use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use auth::{bearer_ok, unauthorized};
pub use gateway::Gateway;
pub use probes::EngineHandle;
pub use server::{ConnectionLimits, serve};
use silences::SilenceApi;

use crate::metrics::Metrics;
use crate::redis_conn::{RedisConn, RedisTarget};

/// Runs `f` on `target`'s shared connection
/// ([`RedisTarget::with_shared`]) for a request: a Redis that does not
/// answer within 2 s is a 503 naming the error, in the JSON shape every
/// endpoint answers errors in.
pub async fn with_redis<T>(
    target: &RedisTarget,
    f: impl AsyncFnOnce(&mut RedisConn) -> redis::RedisResult<T>,
) -> Result<T, Response> {
    target
        .with_shared(std::time::Duration::from_secs(2), f)
        .await
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": format!("Redis unavailable: {e}") })),
            )
                .into_response()
        })
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct State {
    /// What the engine behind the listener is doing.
    engine: Arc<EngineHandle>,
    /// Absent when the gateway is turned off (its route is not served).
    gateway: Option<Arc<Gateway>>,
    /// `/api/silences`.
    silences: Arc<SilenceApi>,
    /// Bearer token `POST /-/reload` requires (`http.admin_token`); none
    /// means open.
    admin_token: Option<Arc<str>>,
    /// What `/metrics` encodes, and whether Redis answers for `/readyz`.
    metrics: Arc<Metrics>,
}

impl State {
    pub fn new(
        engine: Arc<EngineHandle>,
        gateway: Option<Gateway>,
        silences: SilenceApi,
        admin_token: Option<String>,
        metrics: Arc<Metrics>,
    ) -> State {
        State {
            engine,
            gateway: gateway.map(Arc::new),
            silences: Arc::new(silences),
            admin_token: admin_token.map(Arc::from),
            metrics,
        }
    }
}

/// Every route the listener serves; the gateway's only when it is on.
pub fn router(state: State) -> Router {
    let mut router = Router::new()
        .route("/-/reload", post(reload))
        .with_state(state.clone())
        .merge(probes::routes(state.engine.clone(), state.metrics.clone()))
        .merge(metrics::routes(state.metrics.clone()))
        .merge(state.silences.clone().routes());
    if let Some(gateway) = state.gateway {
        router = router.merge(gateway.routes());
    }
    router
}

/// Reloads rules and plugins; 200 with what changed, or 500 with the
/// compile errors (the previous set keeps running).
async fn reload(AxState(state): AxState<State>, headers: HeaderMap) -> Response {
    if !bearer_ok(&headers, state.admin_token.as_deref()) {
        tracing::warn!("POST /-/reload refused: missing or wrong bearer token");
        return unauthorized();
    }
    let Some(reloader) = state.engine.reloader() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "engine is starting"})),
        )
            .into_response();
    };
    let report = reloader.reload("HTTP /-/reload").await;
    let status = if report.ok() {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (
        status,
        Json(serde_json::to_value(&report).expect("reports serialize")),
    )
        .into_response()
}
