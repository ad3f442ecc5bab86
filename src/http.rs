//! The HTTP listener: `/metrics` for Prometheus, `/healthz` (the process
//! answers), `/readyz` (503 with the reason while Redis is unreachable) and
//! `POST /-/reload`.

use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::reload::Reloader;

/// Shared state of the handlers.
#[derive(Clone, Default)]
pub struct State {
    /// Absent in tools that serve metrics without an engine.
    reloader: Option<Arc<Reloader>>,
}

impl State {
    pub fn new(reloader: Option<Arc<Reloader>>) -> State {
        State { reloader }
    }
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/-/reload", post(reload))
        .with_state(state)
}

/// Reloads rules and plugins; 200 with what changed, or 500 with the
/// compile errors (the previous set keeps running).
async fn reload(AxState(state): AxState<State>) -> impl IntoResponse {
    let Some(reloader) = state.reloader else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": "engine not running"})),
        );
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
}

pub async fn serve(listener: tokio::net::TcpListener, state: State, shutdown: CancellationToken) {
    let result = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!("HTTP server failed: {e}");
    }
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::get().encode(),
    )
}

async fn ready() -> impl IntoResponse {
    if metrics::redis_is_up() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Redis is unreachable\n".to_string(),
        )
    }
}
