//! The HTTP listener: `/metrics` for Prometheus, `/healthz` (the process
//! answers), `/readyz` (503 with the reasons while Redis is unreachable, the
//! engine is starting or shutting down), `POST /-/reload`, and
//! `POST /telemetry-data`, the seed's gateway for collectors that cannot
//! speak Redis.
//!
//! Every connection is bounded: its headers must arrive within
//! `http.header_read_timeout`, it is closed after `http.idle_timeout` with
//! no bytes moving, and at most `http.max_connections` are served at once
//! (see [`ConnectionLimits`]).
//!
//! The listener serves from the moment it is bound, before the engine is
//! set up: probes and scrapes get an honest "not ready" instead of a refused
//! connection while tripline waits for Redis.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use redis::RedisError;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{GatewayConfig, HttpConfig};
use crate::decode::{WATERMILL_METADATA, WATERMILL_PAYLOAD, WATERMILL_UUID, encode_metadata};
use crate::http_silences::SilenceApi;
use crate::metrics::Metrics;
use crate::redis_conn::{RedisConn, RedisTarget};
use crate::reload::Reloader;
use crate::shard::stream_for;

/// Reply timeout of the gateway's Redis connection: a collector waits for
/// our answer, so a stuck Redis must turn into a 503 quickly.
const GATEWAY_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The exact bodies of the seed's 400 answers; collectors may match on them.
const MALFORMED: &str = "Malformed data received";
const INCOMPLETE: &str = "Incomplete or invalid data received";

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// True when no token is required, or the request carries `Authorization:
/// Bearer <expected>`.
pub fn bearer_ok(headers: &HeaderMap, expected: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    presented.is_some_and(|p| constant_time_eq(p.as_bytes(), expected.as_bytes()))
}

/// 401 with the `WWW-Authenticate` challenge.
pub fn unauthorized() -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "Missing or invalid bearer token");
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The engine's phase as the HTTP side sees it; written by `app::run`.
#[derive(Default)]
pub struct EngineHandle {
    /// Set once the workers run; `/-/reload` needs it and readiness waits
    /// for it (rules loaded, groups joined).
    reloader: OnceLock<Arc<Reloader>>,
    /// Set when shutdown begins, so load balancers stop sending traffic
    /// while in-flight batches drain.
    stopping: AtomicBool,
}

impl EngineHandle {
    /// The workers run: the engine is ready (while Redis answers).
    pub fn running(&self, reloader: Arc<Reloader>) {
        let _ = self.reloader.set(reloader);
    }

    /// Shutdown began: not ready any more.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

pub fn router(state: State) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/-/reload", post(reload))
        .with_state(state.clone())
        .merge(state.silences.clone().routes());
    if let Some(gateway) = state.gateway {
        let limit = gateway.max_body_bytes;
        router = router.route(
            "/telemetry-data",
            post(telemetry)
                .with_state(gateway)
                .layer(DefaultBodyLimit::max(limit)),
        );
    }
    router
}

/// How the listener sheds slow, idle and excess clients, so that anyone
/// who can reach the port cannot hold its descriptors (`http.*`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A request's headers must be complete this long after the connection
    /// is ready for one (opened, or kept alive after the last response):
    /// stops clients that trickle header bytes or never send a request.
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is
    /// closed: a stalled request body, a client that stopped reading.
    pub idle_timeout: Duration,
    /// Connections served at once; beyond it new ones wait in the kernel's
    /// backlog until one closes, so descriptors stay bounded.
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub fn of(config: &HttpConfig) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        }
    }
}

/// A listener held at its connection cap says so at most this often.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Pause after a failed accept (descriptors exhausted, most likely), so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves HTTP/1 until `shutdown`, then lets each connection finish its
/// request and waits for them. Connections are served by hyper directly
/// (not `axum::serve`), which is where the header timeout, the idle
/// timeout and the connection cap can be set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: State,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let router = router(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut warned_full: Option<Instant> = None;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if warned_full.is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL) {
                    warned_full = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "HTTP connection cap reached (`http.max_connections`); new connections wait"
                    );
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            stream,
            router.clone(),
            limits,
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one connection until the client closes it, a timeout ends it, or
/// shutdown lets its current request finish. Holds `_slot` throughout.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Activity::new();
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let idle_until = activity.last() + limits.idle_timeout;
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("HTTP connection closed: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(idle_until.into()) => {
                if activity.last() + limits.idle_timeout <= Instant::now() {
                    tracing::debug!("HTTP connection idle for {:?}; closed", limits.idle_timeout);
                    return;
                }
            }
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// When bytes last moved on a connection, shared between its socket and
/// the task that enforces the idle timeout.
#[derive(Clone)]
struct Activity {
    /// When the connection was accepted; `last` counts from here.
    epoch: Instant,
    /// Milliseconds from `epoch` to the last read or write that moved bytes.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The client's socket, noting every read or write that moves bytes.
struct Watched {
    /// The accepted connection.
    inner: TcpStream,
    /// Where progress is noted.
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reloads rules and plugins; 200 with what changed, or 500 with the
/// compile errors (the previous set keeps running).
async fn reload(AxState(state): AxState<State>, headers: HeaderMap) -> Response {
    if !bearer_ok(&headers, state.admin_token.as_deref()) {
        tracing::warn!("POST /-/reload refused: missing or wrong bearer token");
        return unauthorized();
    }
    let Some(reloader) = state.engine.reloader.get() else {
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

/// OpenMetrics when the client asks for it (Prometheus does), else the
/// classic text format, which promtool and older scrapers parse.
async fn metrics_text(AxState(state): AxState<State>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            state.metrics.encode(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            state.metrics.encode_prometheus_text(),
        )
    }
}

/// Whether an `Accept` header prefers OpenMetrics 1.0 over plain text,
/// weighing the `q` parameters.
fn wants_openmetrics(accept: &str) -> bool {
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut version) = (1.0f32, None);
        for param in parts {
            match param.split_once('=') {
                Some(("q", v)) => q = v.trim().parse().unwrap_or(0.0),
                Some(("version", v)) => version = Some(v.trim().to_string()),
                _ => {}
            }
        }
        match media.as_str() {
            "application/openmetrics-text" if version.as_deref().is_none_or(|v| v == "1.0.0") => {
                openmetrics = openmetrics.max(q);
            }
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

async fn ready(AxState(state): AxState<State>) -> impl IntoResponse {
    let mut reasons = Vec::new();
    if !state.metrics.redis_is_up() {
        reasons.push("Redis is unreachable");
    }
    if state.engine.stopping.load(Ordering::SeqCst) {
        reasons.push("shutting down");
    } else if state.engine.reloader.get().is_none() {
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

/// `POST /telemetry-data`: validates a reading and appends it to the
/// configured stream in Watermill's envelope.
pub struct Gateway {
    /// Stream (or sharded topic) readings are appended to.
    stream: String,
    /// Shards of `stream`; above 1 a reading goes to its device's shard.
    shards: u32,
    /// Bearer token requests must carry, if any.
    token: Option<String>,
    /// Body size limit in bytes.
    max_body_bytes: usize,
    /// Where to publish.
    target: RedisTarget,
    /// One multiplexed connection shared by all requests, opened on first
    /// use and dropped after a connection error so the next request
    /// reconnects. The lock is held only to open or clone it.
    conn: tokio::sync::Mutex<Option<RedisConn>>,
    /// Where requests are counted by result.
    metrics: Arc<Metrics>,
}

impl Gateway {
    /// `token` is the resolved [`GatewayConfig::token`].
    pub fn new(
        config: &GatewayConfig,
        token: Option<String>,
        target: RedisTarget,
        metrics: Arc<Metrics>,
    ) -> Gateway {
        Gateway {
            stream: config.stream.clone(),
            shards: config.shards,
            token,
            max_body_bytes: config.max_body_bytes,
            target,
            conn: tokio::sync::Mutex::new(None),
            metrics,
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        bearer_ok(headers, self.token.as_deref())
    }

    async fn connection(&self) -> Result<RedisConn, RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.target.connect(GATEWAY_REPLY_TIMEOUT).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn forget_connection(&self) {
        *self.conn.lock().await = None;
    }

    /// XADDs one reading; returns the entry id. A connection found dead
    /// (Redis restarted since the last request) is replaced and the XADD
    /// sent once more; a timeout is not retried, as Redis may have applied it.
    async fn publish(&self, stream: &str, payload: &[u8]) -> Result<String, RedisError> {
        let uuid = uuid::Uuid::new_v4().to_string();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream)
            .arg("*")
            .arg(WATERMILL_UUID)
            .arg(&uuid)
            .arg(WATERMILL_METADATA)
            .arg(encode_metadata(&[("source", "tripline-gateway")]))
            .arg(WATERMILL_PAYLOAD)
            .arg(payload);
        let first: Result<String, RedisError> =
            cmd.query_async(&mut self.connection().await?).await;
        let result = match first {
            Err(e) if e.is_connection_dropped() && !e.is_timeout() => {
                self.forget_connection().await;
                cmd.query_async(&mut self.connection().await?).await
            }
            other => other,
        };
        if let Err(e) = &result
            && e.code().is_none()
        {
            self.forget_connection().await;
        }
        result
    }
}

/// Compares without an early exit, so response time does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn telemetry(
    AxState(gateway): AxState<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !gateway.authorized(&headers) {
        gateway
            .metrics
            .gateway_rejected("unauthorized", "missing or wrong bearer token");
        return unauthorized();
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = gateway.max_body_bytes;
            gateway
                .metrics
                .gateway_rejected("too_large", &format!("body over {limit} bytes"));
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("Body larger than {limit} bytes"),
            );
        }
        Err(rejection) => {
            gateway
                .metrics
                .gateway_rejected("malformed", &rejection.body_text());
            return error(StatusCode::BAD_REQUEST, MALFORMED);
        }
    };
    let reading = match validate(&body) {
        Ok(r) => r,
        Err(Rejection::Malformed(why)) => {
            gateway.metrics.gateway_rejected("malformed", &why);
            return error(StatusCode::BAD_REQUEST, MALFORMED);
        }
        Err(Rejection::Invalid(why)) => {
            gateway.metrics.gateway_rejected("invalid", &why);
            return error(StatusCode::BAD_REQUEST, INCOMPLETE);
        }
    };
    let payload = serde_json::to_vec(&reading).expect("a JSON value serializes");
    let device = reading["hostname"].as_str().unwrap_or_default();
    let stream = stream_for(&gateway.stream, gateway.shards, device);
    match gateway.publish(&stream, &payload).await {
        Ok(id) => {
            gateway.metrics.gateway_accepted(&stream, &id);
            (StatusCode::OK, Json(json!({ "stream": stream, "id": id }))).into_response()
        }
        Err(e) => {
            gateway.metrics.gateway_publish_failed(&stream, &e);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Could not publish the reading; try again later",
            )
        }
    }
}

/// Why a body is refused; the text goes to the log, not to the client.
#[derive(Debug, PartialEq)]
enum Rejection {
    /// Not a JSON object with fields of the seed's types.
    Malformed(String),
    /// Well-formed, but the hostname is empty or the error count missing or
    /// not positive.
    Invalid(String),
}

/// The seed's checks: a JSON object whose `hostname` and `interface` are
/// strings and `input_errors` an integer (wrong types are malformed, as for
/// the Go decoder), with a non-empty hostname and a positive error count.
/// Extra fields are kept.
fn validate(body: &[u8]) -> Result<Value, Rejection> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Rejection::Malformed(format!("not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(Rejection::Malformed("not a JSON object".into()));
    };
    let string = |field: &str| match object.get(field) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(Rejection::Malformed(format!("`{field}` is not a string"))),
    };
    let hostname = string("hostname")?;
    string("interface")?;
    let errors = match object.get("input_errors") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| Rejection::Malformed("`input_errors` is not an integer".into()))?,
    };
    if hostname.trim().is_empty() {
        return Err(Rejection::Invalid("empty or missing `hostname`".into()));
    }
    if errors <= 0 {
        return Err(Rejection::Invalid(format!(
            "`input_errors` is missing, zero or negative ({errors})"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_curl_gets_text() {
        // Prometheus 2.x and 3.x scrape Accept headers.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(
            "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"
        ));
        assert!(!wants_openmetrics(
            "application/openmetrics-text;version=0.0.1"
        ));
    }

    #[test]
    fn seed_readings_are_validated_like_the_go_gateway() {
        let ok =
            validate(br#"{"hostname":"r1","interface":"et-0","input_errors":12,"site":"ams"}"#)
                .unwrap();
        assert_eq!(ok["site"], "ams");
        let malformed = |b: &[u8]| matches!(validate(b), Err(Rejection::Malformed(_)));
        let invalid = |b: &[u8]| matches!(validate(b), Err(Rejection::Invalid(_)));
        assert!(malformed(b"{not json"));
        assert!(malformed(b"[1, 2]"));
        assert!(malformed(br#"{"hostname": 5, "input_errors": 3}"#));
        assert!(malformed(
            br#"{"hostname": "r1", "interface": 1, "input_errors": 3}"#
        ));
        assert!(malformed(br#"{"hostname": "r1", "input_errors": "3"}"#));
        assert!(malformed(br#"{"hostname": "r1", "input_errors": 1.5}"#));
        assert!(invalid(br#"{"hostname": "", "input_errors": 3}"#));
        assert!(invalid(br#"{"input_errors": 3}"#));
        assert!(invalid(br#"{"hostname": "r1"}"#));
        assert!(invalid(br#"{"hostname": "r1", "input_errors": 0}"#));
        assert!(invalid(br#"{"hostname": "r1", "input_errors": -4}"#));
        assert!(invalid(br#"{"hostname": "r1", "input_errors": null}"#));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
    }
}
