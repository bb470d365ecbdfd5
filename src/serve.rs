//! The accept loop: hyper connections (HTTP/1.1 and HTTP/2) serving an axum router, with the
//! protections `axum::serve` does not offer. The API and the admin listener both use it.
//!
//! * **Connection limit and load shedding**: at most `max_connections` connections are
//!   served at once. A connection beyond them is accepted and answered at once with 503
//!   `unavailable` and `Retry-After: 1` (an HTTP/1.1 response, then closed), so clients
//!   back off instead of waiting in the kernel's accept queue; at most [`SHED_AT_ONCE`] such
//!   answers are in flight, and connections beyond those are closed unanswered.
//! * **Silent and slow clients**: a watchdog per connection closes it when it has had no
//!   request in flight for `header_read_timeout` since it was opened (a client that sends
//!   nothing, only the HTTP/2 preface, or trickles its first request head), or for
//!   `idle_timeout` since its last response (an idle keep-alive connection, HTTP/1 or HTTP/2).
//!   hyper's own HTTP/1 header timeout also bounds every later request head, and runs while
//!   an HTTP/1 connection waits for its next request: there the smaller of the two applies. A part body that
//!   stalls is cut off by the part handler's idle timeout.
//! * **Bounded HTTP/2**: at most [`H2_MAX_STREAMS`] concurrent streams per connection and
//!   [`H2_MAX_HEADER_LIST`] bytes of headers per request.
//! * **Graceful shutdown**: once `shutdown` resolves the listener is closed, idle connections
//!   are closed, in-flight requests (part uploads included) run to completion within
//!   `grace`, then the rest are dropped.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Concurrent HTTP/2 streams per connection.
pub const H2_MAX_STREAMS: u32 = 100;
/// Largest HTTP/2 header list of one request, in bytes.
pub const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// Overload answers being written at once; beyond them a connection is closed unanswered.
pub const SHED_AT_ONCE: usize = 256;
/// How long writing one overload answer may take.
const SHED_WRITE: Duration = Duration::from_secs(1);
/// How long a connection the watchdog closed gets to finish its close (HTTP/2 GOAWAY)
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a new connection gets to have its first request under way.
    pub header_read_timeout: Duration,
    /// Time a connection may stay without a request in flight after its last response.
    pub idle_timeout: Duration,
    /// Time in-flight requests get after shutdown begins.
    pub grace: Duration,
}

/// Requests in flight on one connection and when it last became idle.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request ended; `u64::MAX` before any.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// When the watchdog should close the connection if nothing happens until then; `None`
    /// while a request is in flight.
    fn deadline(&self, limits: &ServeLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.idle_since_ms.load(Ordering::Acquire) {
            u64::MAX => self.opened + limits.header_read_timeout,
            ms => self.opened + Duration::from_millis(ms) + limits.idle_timeout,
        })
    }
}

/// Held while a request is in flight; dropping it (response ready, or the request's future
/// cancelled) marks the connection idle from now.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's default read buffer grows to ~400 KiB per connection; with 64 part
        // uploads in flight that alone broke the 64 MiB peak-RSS budget (benches/README.md).
        // 128 KiB keeps throughput within noise at bounded memory.
        .max_buf_size(128 * 1024)
        // While a request is in flight hyper otherwise polls the socket for an early EOF,
        // and that read reserves buffer space while the request's head still borrows the
        // old buffer: a fresh 8 KiB allocation per request (4-5 % of the gateway's CPU
        // under the register load, benches/README.md). With half-close a client that
        // shuts down its sending side still gets its response, and a disconnect does not
        // cancel a handler (a part upload still sees the broken body).
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains within `limits.grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = builder();
    builder
        .http1()
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let shedding = Arc::new(Semaphore::new(SHED_AT_ONCE));
    let overload = overload_answer();
    tokio::pin!(shutdown);
    loop {
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shed(stream, &shedding, overload.clone());
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let counted = activity.clone();
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: axum::http::Request<Incoming>| req.map(axum::body::Body::new))
                .map_future(move |response| {
                    let in_flight = InFlight::start(&counted);
                    async move {
                        let response = response.await;
                        drop(in_flight);
                        response
                    }
                }),
        );
        let builder = builder.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let close =
                |c: std::pin::Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
            watch(conn, close, &activity, &limits, &stop, peer).await;
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutdown requested: listener closed, finishing in-flight requests");
    stop.cancel();
    connections.close();
    tokio::select! {
        _ = connections.wait() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(limits.grace) => {
            tracing::warn!(grace_seconds = limits.grace.as_secs(), "grace period over: dropping the remaining connections");
        }
    }
}

/// The bytes of the overload answer: 503 `unavailable` as a problem document.
fn overload_answer() -> bytes::Bytes {
    let body = crate::error::AppError::Unavailable("connection limit reached".into())
        .problem()
        .to_string();
    bytes::Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// Answers a connection over the limit with the overload answer and closes it, or closes
/// it at once when [`SHED_AT_ONCE`] answers are already being written.
fn shed(mut stream: tokio::net::TcpStream, shedding: &Arc<Semaphore>, answer: bytes::Bytes) {
    let Ok(permit) = shedding.clone().try_acquire_owned() else {
        return; // dropped: closed unanswered
    };
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let _ = tokio::time::timeout(SHED_WRITE, async {
            stream.write_all(&answer).await?;
            stream.shutdown().await
        })
        .await;
        drop(permit);
    });
}

/// Drives one connection to its end, closing it when it has been without a request for too
/// long (see the module docs) or when the server shuts down.
async fn watch<C, E>(
    conn: C,
    close: impl Fn(std::pin::Pin<&mut C>),
    activity: &Activity,
    limits: &ServeLimits,
    stop: &CancellationToken,
    peer: std::net::SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let far = || Instant::now() + Duration::from_secs(24 * 3_600);
    let timer = tokio::time::sleep_until(activity.deadline(limits).unwrap_or_else(far));
    tokio::pin!(timer);
    // Set once the connection was asked to close: then it only gets CLOSE_GRACE more while
    // nothing is in flight.
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.cancelled(), if !closing => {
                closing = true;
                close(conn.as_mut());
                // In-flight requests get the server's grace, enforced by `serve`.
                timer.as_mut().reset(far());
            }
            _ = timer.as_mut() => {
                match activity.deadline(limits) {
                    // A request is in flight: look again one idle period from now.
                    None => timer.as_mut().reset(Instant::now() + limits.idle_timeout),
                    Some(_) if closing => return,
                    Some(at) if at > Instant::now() => timer.as_mut().reset(at),
                    Some(_) => {
                        tracing::debug!(peer = %peer, "closing a connection without requests");
                        closing = true;
                        close(conn.as_mut());
                        timer.as_mut().reset(Instant::now() + CLOSE_GRACE);
                    }
                }
            }
        }
    }
}
