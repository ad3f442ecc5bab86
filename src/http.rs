//! The HTTP listener: `/metrics` for Prometheus, `/healthz` (the process
//! answers) and `/readyz` (503 with the reason while Redis is unreachable).

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// Shared state of the handlers; grows with the gateway and reload endpoints.
#[derive(Clone, Default)]
pub struct State {}

impl State {
    pub fn new() -> State {
        State {}
    }
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
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
