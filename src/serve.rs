//! The accept loop: hyper connections (HTTP/1.1 and HTTP/2) serving the axum router, with the
//! protections `axum::serve` does not offer.
//!
//! * **Connection limit**: at most `max_connections` connections are served at once; further
//!   ones wait in the kernel's accept queue instead of exhausting memory or file descriptors.
//! * **Slow clients**: a client that trickles its request head is cut off after
//!   `header_read_timeout_seconds` (slowloris); a part body that stalls is cut off by the part
//!   handler's idle timeout.
//! * **Graceful shutdown**: once `shutdown` resolves the listener is closed, idle connections
//!   are closed, in-flight requests (part uploads included) run to completion within
//!   `grace`, then the rest are dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client gets to send a complete request head.
    pub header_read_timeout: Duration,
    /// Time in-flight requests get after shutdown begins.
    pub grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains within `limits.grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's default read buffer grows to ~400 KiB per connection; with 64 part
        // uploads in flight that alone broke the 64 MiB peak-RSS budget (benches/README.md).
        // 128 KiB keeps throughput within noise at bounded memory.
        .max_buf_size(128 * 1024)
        // While a request is in flight hyper otherwise polls the socket for an early EOF,
        // and that read reserves buffer space while the request's head still borrows the
        // old buffer: a fresh 8 KiB allocation per request (4-5 % of the gateway's CPU
        // under the register load, benches/README.md). With half-close a client that
        // shuts down its sending side still gets its response, and a handler is never cut
        // off mid-operation by a disconnect (completion and finalize run to their end;
        // a part upload still sees the broken body).
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: axum::http::Request<Incoming>| req.map(axum::body::Body::new)),
        );
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutdown requested: listener closed, finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(limits.grace) => {
            tracing::warn!(grace_seconds = limits.grace.as_secs(), "grace period over: dropping the remaining connections");
        }
    }
}
