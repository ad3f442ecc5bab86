//! `/healthz` (the process answers) and `/readyz` (503 with the reasons
//! while Redis is unreachable, the engine is starting or shutting down).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::reload::Reloader;

/// The engine's phase as the HTTP side sees it; written by `app::run`.
#[derive(Default)]
pub struct EngineHandle {
    /// Set once the workers run; `/-/reload` needs it and readiness waits
    /// for it (rules loaded, groups joined).
    reloader: OnceLock<Arc<Reloader>>,
    /// Set when shutdown begins, so load balancers stop sending traffic
    /// while in-flight batches drain.
    stopping: AtomicBool,
    /// The consumer name the instance leased, for the status API.
    instance: OnceLock<String>,
}

impl EngineHandle {
    /// The workers run: the engine is ready (while Redis answers).
    pub fn running(&self, reloader: Arc<Reloader>) {
        let _ = self.reloader.set(reloader);
    }

    /// The instance leased its consumer name.
    pub fn named(&self, instance: &str) {
        let _ = self.instance.set(instance.to_string());
    }

    /// The leased consumer name; `None` while the instance starts.
    pub fn instance(&self) -> Option<&str> {
        self.instance.get().map(String::as_str)
    }

    /// Shutdown began: not ready any more.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// The reloader, once the engine runs.
    pub fn reloader(&self) -> Option<&Arc<Reloader>> {
        self.reloader.get()
    }
}

/// The probe routes, answering from `engine`.
pub fn routes(engine: Arc<EngineHandle>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state((engine, metrics))
}

async fn ready(
    State((engine, metrics)): State<(Arc<EngineHandle>, Arc<Metrics>)>,
) -> impl IntoResponse {
    let mut reasons = Vec::new();
    if !metrics.redis_is_up() {
        reasons.push("Redis is unreachable");
    }
    if engine.stopping.load(Ordering::SeqCst) {
        reasons.push("shutting down");
    } else if engine.reloader.get().is_none() {
        reasons.push("engine is starting");
    }
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
    }
}
