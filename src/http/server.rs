//! The listener loop: HTTP/1 served by hyper directly, with every
//! connection bounded (see [`ConnectionLimits`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSettings;

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
    pub fn of(config: &HttpSettings) -> ConnectionLimits {
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
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
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
