//! The middleware stack, assembled in one place.
//!
//! Outermost first, and why each sits where it does:
//! 1. **Request id** (bound, set, then propagate): first, so every log line, problem document
//!    and response of every layer below carries `X-Request-Id`: the client's when it is 1 to
//!    128 visible ASCII characters, else a new UUID.
//! 2. **Trace span**: wraps everything else so the span (request id, method, route, tenant,
//!    session and file ids recorded further in) covers all work, rejections included.
//! 3. **Edge** (one hand-written middleware, so a request pays for one boxed future and one
//!    clone of the service below it instead of five), in this order:
//!    - **metrics**: counts every response by route and status, rejections included;
//!    - **control-plane timeout**: bounds JSON requests; part uploads and completes are
//!      exempt (parts are bounded by the idle timeout on their body and by the storage
//!      client's minimum throughput; completes by the storage client's timeout);
//!    - **authentication**: resolves the tenant; everything below is per tenant. A CORS
//!      preflight is let through unauthenticated (browsers send no credential on one).
//! 4. **CORS** (`tower_http::cors`, [`crate::cors`]): answers preflights for origins some
//!    tenant allows (before any policy layer: a preflight costs no rate-limit token), and
//!    adds the owning tenant's CORS headers to the responses of requests with an `Origin`;
//!    the edge sends requests without one past it.
//! 5. **Panic catcher**: turns a panic below into a 500 problem instead of a dropped
//!    connection; inside the edge, so panics are counted and get the tenant's CORS headers.
//! 6. **Layer failures** (`LayerFailure`): a policy layer's infrastructure error (Redis down
//!    behind the rate limiter, the idempotency store or the deadline lookup) becomes a 503.
//!
//! The edge and the failure mapping call the service below them directly from `call` (their
//! decisions are synchronous): no per-request clone of the stack below and no boxed future.
//! (As `axum::middleware::from_fn` and `HandleErrorLayer` they cloned everything below them
//! and boxed twice per request, ~6 % of the gateway's CPU under the register load.)
//! 7. **Rate limits**: per end user (`tenant:sub`, JWT requests only), then per tenant;
//!    before anything that touches Redis session scripts or storage, so a limited request
//!    costs one limiter decision and nothing else. The user's comes first, so a user over
//!    its own limit spends none of the tenant's quota.
//! 8. **Ownership** ([`crate::ownership`], JWT requests only): another user's session is
//!    404 before idempotency (nothing reserved for it) and before expiry (no 410 telling
//!    that it exists).
//! 9. **Idempotency** (POST with `Idempotency-Key`, scoped per tenant): after the rate limit
//!    (a rejected request must not reserve a key) and before the handlers, so a replay never
//!    re-runs registration or completion.
//! 10. **Expiry**: answers 410 from the session's immutable deadline before any handler work.
//! 11. **Count limit**: per-tenant cap on part uploads in flight, innermost so a slot is held
//!    only while the upload itself runs.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, Method};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use upgate_layers::count_limit::{CountLimitLayer, Release};
use upgate_layers::expiry::ExpiryLayer;
use upgate_layers::idempotency::{IdempotencyBody, IdempotencyLayer};
use upgate_layers::rate_limit::{RateLimitLayer, RateLimitStats};
use upgate_layers::BoxError;

use crate::api::AppState;
use crate::auth::{Authenticator, Principal, Refusal};
use crate::config::Config;
use crate::error::AppError;
use crate::policies::{
    EndUserQuota, ExpiredProblem, IdempotencyProblems, IdempotencyRecords, Limiter, RateLimited,
    SessionDeadlines, TenantQuota, TenantScope, TooManyUploads, UploadsInFlight,
};
use crate::store::redis::RedisHandle;
use crate::store::SessionStore;

/// The four policy layers, built once per gateway (their backends and counters are shared by
/// every connection).
/// The most rate-limit tokens one replica takes from Redis at once for a busy tenant.
const RATE_LIMIT_LEASE_TOKENS: u32 = 256;
/// How long leased tokens stay spendable: the bound on how far ahead of the shared bucket
/// a replica can admit (`requests_per_second` × this).
const RATE_LIMIT_LEASE_TTL: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct Layers {
    end_user_rate_limit: RateLimitLayer<EndUserQuota, Limiter, RateLimited>,
    rate_limit: RateLimitLayer<TenantQuota, Limiter, RateLimited>,
    ownership: crate::ownership::OwnershipLayer,
    idempotency: IdempotencyLayer<TenantScope, IdempotencyRecords, IdempotencyProblems>,
    expiry: ExpiryLayer<SessionDeadlines, ExpiredProblem>,
    uploads:
        CountLimitLayer<UploadsInFlight, upgate_layers::count_limit::InProcess, TooManyUploads>,
}

impl Layers {
    /// Backends in Redis when `redis` is given (shared by all replicas), in-process otherwise.
    /// The upload concurrency cap is always per replica: it protects this process's memory.
    pub fn new(
        config: &Config,
        store: Arc<dyn SessionStore>,
        redis: Option<RedisHandle>,
    ) -> Layers {
        let (limiter, records) = match redis {
            Some(handle) => (
                // Leases: a busy tenant's tokens come from Redis in batches instead of one
                // round trip per request; quiet tenants and bursts under 20 stay exact
                // (layers/src/rate_limit/lease.rs, benches/README.md).
                Limiter::Redis(Arc::new(
                    upgate_layers::rate_limit::RedisGcra::new(handle.clone())
                        .prefix("upgate:rl:")
                        .lease(RATE_LIMIT_LEASE_TOKENS, RATE_LIMIT_LEASE_TTL),
                )),
                IdempotencyRecords::Redis(Arc::new(upgate_layers::idempotency::RedisStore::new(
                    handle,
                ))),
            ),
            None => (
                Limiter::Local(Arc::new(upgate_layers::rate_limit::InProcess::new())),
                IdempotencyRecords::Local(Arc::new(upgate_layers::idempotency::InMemory::new())),
            ),
        };
        let max_body = config.max_json_body_bytes;
        Layers {
            end_user_rate_limit: RateLimitLayer::new(EndUserQuota, limiter.clone())
                .bypass(config.rate_limit_bypass)
                .rejection(RateLimited),
            rate_limit: RateLimitLayer::new(TenantQuota, limiter)
                .bypass(config.rate_limit_bypass)
                .rejection(RateLimited),
            ownership: crate::ownership::OwnershipLayer::new(crate::ownership::Owners::new(
                store.clone(),
            )),
            idempotency: IdempotencyLayer::new(TenantScope, records)
                .methods([Method::POST])
                .body_limit(max_body)
                // One stored response is at most 64 KiB (`../shared/API.md` v1.1 limits).
                .response_limit(IDEMPOTENCY_RECORD_LIMIT)
                .ttl(config.idempotency_ttl)
                .prefix("upgate:idem:")
                .rejection(IdempotencyProblems {
                    max_body: max_body as u64,
                }),
            expiry: ExpiryLayer::new(SessionDeadlines::new(store.clone()))
                .expired_response(ExpiredProblem::new(store)),
            uploads: CountLimitLayer::new(
                UploadsInFlight,
                upgate_layers::count_limit::InProcess::new(),
                Release::OnCompletion,
            )
            .rejection(TooManyUploads),
        }
    }

    /// Rate-limit decision counters.
    pub fn rate_limit_stats(&self) -> RateLimitStats {
        self.rate_limit.stats()
    }

    /// Prometheus text for the layers' counters.
    pub fn metrics(&self) -> prometheus_client::registry::Registry {
        let s = self.rate_limit.stats();
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(crate::metrics::ConstCounters::new(
            "upgate_rate_limit_decisions",
            "Rate-limit decisions",
            "decision",
            move || {
                vec![
                    ("admitted", s.admitted()),
                    ("limited", s.limited()),
                    ("bypassed", s.bypassed()),
                ]
            },
        )));
        r
    }
}

/// A layer's infrastructure failure (Redis unreachable behind the rate limiter, the
/// idempotency store or the deadline lookup): 503, details to the log only.
fn layer_failure(result: Result<Response, BoxError>) -> Result<Response, Infallible> {
    Ok(result
        .unwrap_or_else(|err| AppError::Unavailable(format!("middleware: {err}")).into_response()))
}

/// Turns the policy layers' errors into responses ([`layer_failure`]), calling the service
/// below directly (what `axum::error_handling::HandleErrorLayer` does by cloning it per
/// request). An error from `poll_ready` is kept and answered by the next `call`.
#[derive(Clone, Copy)]
struct LayerFailureLayer;

impl<S> Layer<S> for LayerFailureLayer {
    type Service = LayerFailure<S>;

    fn layer(&self, inner: S) -> LayerFailure<S> {
        LayerFailure {
            inner,
            not_ready: None,
        }
    }
}

struct LayerFailure<S> {
    inner: S,
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for LayerFailure<S> {
    fn clone(&self) -> Self {
        LayerFailure {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

type Mapped<F> =
    futures_util::future::Map<F, fn(Result<Response, BoxError>) -> Result<Response, Infallible>>;

impl<S> Service<Request> for LayerFailure<S>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<Response, Infallible>>,
        Mapped<S::Future>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e);
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures_util::FutureExt as _;
        match self.not_ready.take() {
            Some(e) => {
                futures_util::future::Either::Left(std::future::ready(layer_failure(Err(e))))
            }
            None => futures_util::future::Either::Right(self.inner.call(req).map(
                layer_failure as fn(Result<Response, BoxError>) -> Result<Response, Infallible>,
            )),
        }
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Largest response an idempotency record stores; larger ones are answered but not stored.
const IDEMPOTENCY_RECORD_LIMIT: usize = 64 * 1024;

/// Longest client `X-Request-Id` kept (`../shared/API.md`, v1.1 limits).
const MAX_REQUEST_ID: usize = 128;

/// Removes a client `X-Request-Id` that is empty, longer than [`MAX_REQUEST_ID`] or not
/// visible ASCII, so that the next layer generates one: a client cannot make every log line
/// of its request carry kilobytes.
fn drop_invalid_request_id(mut req: Request) -> Request {
    let invalid = req.headers().get_all(&X_REQUEST_ID).iter().any(|v| {
        let b = v.as_bytes();
        b.is_empty() || b.len() > MAX_REQUEST_ID || !b.iter().all(u8::is_ascii_graphic)
    });
    if invalid {
        req.headers_mut().remove(&X_REQUEST_ID);
    }
    req
}

/// A path id as a log field: ids are UUIDs (36 characters); a longer segment is not an id of
/// ours and is left out, so a client cannot make every log line of its request carry it.
fn bounded_id(segment: Option<&str>) -> &str {
    segment.filter(|s| s.len() <= 64).unwrap_or("")
}

/// A method as a metric label or log field: the methods the API and CORS use, else
/// `other`, so no client string becomes a label (`../shared/API.md`, v1.1 limits).
/// The API router with its whole middleware stack.
pub fn build(state: AppState, layers: &Layers) -> Router {
    let cors = crate::cors::layer(&state.config.tenants);
    let edge = EdgeLayer {
        cors: cors.clone(),
        state: Arc::new(EdgeState {
            cors,
            metrics: state.metrics.clone(),
            auth: Authenticator::new(&state.config.tenants, state.tokens.clone()),
            store: state.store.clone(),
            timeout: state.config.request_timeout,
        }),
    };
    crate::api::routes(state).layer(
        ServiceBuilder::new()
            .map_request(drop_invalid_request_id)
            .layer(SetRequestIdLayer::new(
                X_REQUEST_ID.clone(),
                MakeRequestUuid,
            ))
            .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
            .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let request_id = req
                    .headers()
                    .get(&X_REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map(MatchedPath::as_str)
                    .unwrap_or("unmatched");
                // Ids from the path, so every event of the request (the layers' too) carries them.
                let mut segments = req.uri().path().split('/').skip(2);
                let session_id = if segments.next() == Some("sessions") {
                    segments.next()
                } else {
                    None
                };
                let file_id = if segments.next() == Some("files") {
                    segments.next()
                } else {
                    None
                };
                let span = tracing::info_span!(
                    "request",
                    request_id,
                    method = crate::metrics::method_label(req.method()),
                    route,
                    tenant = tracing::field::Empty,
                    session_id = bounded_id(session_id),
                    file_id = bounded_id(file_id),
                );
                // Continue the caller's trace (W3C traceparent) when it sent one (and the
                // span is recorded at all: with `RUST_LOG=warn` it is not).
                if !span.is_disabled() {
                    let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(
                        &span,
                        crate::telemetry::parent_context(req.headers()),
                    );
                }
                span
            }))
            .layer(edge)
            .layer(CatchPanicLayer::custom(
                |_panic: Box<dyn std::any::Any + Send>| {
                    AppError::Internal("handler panicked".into()).into_response()
                },
            ))
            .layer(LayerFailureLayer)
            .layer(layers.end_user_rate_limit.clone())
            .layer(layers.rate_limit.clone())
            .layer(layers.ownership.clone())
            // The idempotency layer's body keeps trailers; the layers above take axum's.
            .map_response(
                |res: axum::http::Response<IdempotencyBody<axum::body::Body>>| {
                    res.map(axum::body::Body::new)
                },
            )
            .layer(layers.idempotency.clone())
            .layer(layers.expiry.clone())
            .layer(layers.uploads.clone()),
    )
}

/// What the edge middleware needs, behind one `Arc` (cloned per request).
struct EdgeState {
    /// The CORS layer, also put around the edge's own refusals of browser requests.
    cors: tower_http::cors::CorsLayer,
    metrics: Arc<crate::metrics::Metrics>,
    auth: Authenticator,
    /// Asked for the upload token key when a token needs one not loaded yet.
    store: Arc<dyn crate::store::SessionStore>,
    timeout: Duration,
}

/// The edge (metrics, timeout, authentication) as a layer, with the CORS layer right below
/// it (see [`EdgeService`]).
#[derive(Clone)]
struct EdgeLayer {
    state: Arc<EdgeState>,
    cors: tower_http::cors::CorsLayer,
}

impl<S> Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            edge: self.state.clone(),
            inner: self.cors.layer(inner),
        }
    }
}

/// Metrics around everything; then timeout and authentication (see the module docs for the
/// order). Readiness is the inner service's; every decision is
/// made in `call`, which then calls the inner service at once (a preflight or an
/// unauthenticated request leaves its readiness unused, which the stack below allows: it
/// reserves nothing in `poll_ready`).
///
/// A request without `Origin` (every server-to-server call) skips the CORS layer and goes
/// to the service below it directly: it gets no CORS headers, as before, and does not pay
/// for tower-http's header work (about 0.5 µs a request, `benches/router.rs`).
#[derive(Clone)]
struct EdgeService<S> {
    edge: Arc<EdgeState>,
    inner: tower_http::cors::Cors<S>,
}

impl<S, B> Service<Request> for EdgeService<S>
where
    S: Service<Request, Response = axum::http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Default + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let edge = self.edge.clone();
        let route: Option<MatchedPath> = req.extensions().get::<MatchedPath>().cloned();
        let method = req.method().clone();
        let start = Instant::now();
        let deadline = (!exempt_from_timeout(&req)).then_some(edge.timeout);
        // Decided here, synchronously: a missing/unknown key is answered without calling the
        // inner service; a preflight goes to the CORS layer below unauthenticated.
        let preflight = crate::cors::is_preflight(&req);
        // tus's `OPTIONS` (capabilities) needs no credential either.
        let open = preflight
            || (method == Method::OPTIONS
                && route
                    .as_ref()
                    .is_some_and(|r| r.as_str().starts_with(crate::api::path::TUS)));
        let mut call = |req: Request| {
            use futures_util::FutureExt as _;
            let body = |res: Result<axum::http::Response<B>, Infallible>| {
                res.map(|res| res.map(axum::body::Body::new))
            };
            if preflight || req.headers().contains_key(axum::http::header::ORIGIN) {
                futures_util::future::Either::Left(self.inner.call(req).map(body))
            } else {
                futures_util::future::Either::Right(self.inner.get_mut().call(req).map(body))
            }
        };
        let route_str = route.as_ref().map(MatchedPath::as_str);
        let mut scoped = false;
        // A browser's `Origin` and the tenant, kept for a timeout's answer (the request
        // itself is gone into the service below by then).
        let mut origin = req.headers().get(axum::http::header::ORIGIN).cloned();
        let mut origin_tenant = None;
        let admitted = if open {
            origin = None;
            Ok(futures_util::future::Either::Left(call(req)))
        } else {
            match edge.auth.authenticate(&req, route_str, false) {
                Ok(principal) => {
                    if origin.is_some() {
                        origin_tenant = Some(principal.tenant.clone());
                    }
                    scoped = admit(&mut req, principal);
                    Ok(futures_util::future::Either::Left(call(req)))
                }
                Err(refusal @ (Refusal::Error(_) | Refusal::Denied(..))) => Err((refusal, req)),
                // Rare (the first token after start, or one signed with a key the store
                // replaced): the keys are asked for, then the request goes to a clone of
                // the service below, driven with `oneshot`.
                Err(Refusal::ReloadKeys) => {
                    let inner = self.inner.clone();
                    let edge = edge.clone();
                    let route = route_str.map(str::to_owned);
                    Ok(futures_util::future::Either::Right(Box::pin(async move {
                        if let Err(e) = edge.auth.tokens.reload(&*edge.store).await {
                            tracing::warn!(error = %e, "loading the upload token key failed");
                        }
                        match edge.auth.authenticate(&req, route.as_deref(), true) {
                            Ok(principal) => {
                                let scoped = admit(&mut req, principal);
                                tower::ServiceExt::oneshot(inner, req)
                                    .await
                                    .map(|res| hide_gone(res.map(axum::body::Body::new), scoped))
                            }
                            Err(refusal) => Ok(refuse(&edge.cors, refusal, req).await),
                        }
                    })
                        as futures_util::future::BoxFuture<
                            'static,
                            Result<Response, Infallible>,
                        >))
                }
            }
        };
        Box::pin(async move {
            let res = match admitted {
                Err((refusal, req)) => refuse(&edge.cors, refusal, req).await,
                Ok(fut) => {
                    let outcome = match deadline {
                        None => Ok(fut.await),
                        Some(d) => tokio::time::timeout(d, fut).await,
                    };
                    match outcome {
                        Ok(Ok(res)) => {
                            let mut res = hide_gone(res, scoped);
                            // A preflight has no content: 204 (tower-http answers 200).
                            if preflight && res.status() == axum::http::StatusCode::OK {
                                *res.status_mut() = axum::http::StatusCode::NO_CONTENT;
                            }
                            res
                        }
                        Ok(Err(never)) => match never {},
                        Err(_) => {
                            let timed_out = AppError::Unavailable("request timed out".into());
                            match origin {
                                // Through the CORS layer, like the edge's other refusals.
                                Some(origin) => {
                                    let mut probe = Request::new(axum::body::Body::empty());
                                    *probe.method_mut() = method.clone();
                                    probe
                                        .headers_mut()
                                        .insert(axum::http::header::ORIGIN, origin);
                                    let refusal = match origin_tenant {
                                        Some(t) => Refusal::Denied(timed_out, t),
                                        None => Refusal::Error(timed_out),
                                    };
                                    refuse(&edge.cors, refusal, probe).await
                                }
                                None => timed_out.into_response(),
                            }
                        }
                    }
                }
            };
            record_metrics(
                &edge.metrics,
                &method,
                route.as_ref().map_or("unmatched", MatchedPath::as_str),
                &res,
                start,
            );
            Ok(res)
        })
    }
}

/// Puts the principal in the request extensions (the tenant for every layer below; the
/// session scope of an upload token) and in the request's span; true for an upload token.
fn admit(req: &mut Request, principal: Principal) -> bool {
    tracing::Span::current().record("tenant", principal.tenant.id.as_str());
    req.extensions_mut()
        .insert(crate::api::Tenant(principal.tenant));
    if let Some(user) = principal.user {
        req.extensions_mut().insert(crate::auth::User(user));
        return true;
    }
    match principal.session {
        Some(session) => {
            req.extensions_mut()
                .insert(crate::auth::SessionScope(session));
            true
        }
        None => false,
    }
}

/// An upload token's answer about a deleted session is 404 `sessionNotFound`
/// ([`crate::auth::SessionGone`]), with the CORS and rate-limit headers the answer had.
fn hide_gone(res: Response, scoped: bool) -> Response {
    if !scoped || res.extensions().get::<crate::auth::SessionGone>().is_none() {
        return res;
    }
    let mut hidden = AppError::SessionNotFound.into_response();
    for (name, value) in res.headers() {
        let n = name.as_str();
        if n.starts_with("access-control-") || n == "vary" || n.starts_with("ratelimit") {
            hidden.headers_mut().append(name.clone(), value.clone());
        }
    }
    hidden
}

/// The edge's answer to a request it does not admit. A browser's request (with `Origin`)
/// gets it through the CORS layer, so the page can read it: a known tenant's origins
/// apply, else those some tenant allows.
async fn refuse(
    cors: &tower_http::cors::CorsLayer,
    refusal: Refusal,
    mut req: Request,
) -> Response {
    let res = match refusal {
        Refusal::Error(e) => e.into_response(),
        Refusal::Denied(e, tenant) => {
            req.extensions_mut().insert(crate::api::Tenant(tenant));
            e.into_response()
        }
        Refusal::ReloadKeys => {
            AppError::Unavailable("the upload token keys are not loaded".into()).into_response()
        }
    };
    if !req.headers().contains_key(axum::http::header::ORIGIN) {
        return res;
    }
    let mut res = Some(res);
    let answer = tower::service_fn(move |_: Request| {
        let res = res.take().unwrap_or_default();
        async move { Ok::<_, Infallible>(res) }
    });
    match tower::ServiceExt::oneshot(cors.layer(answer), req).await {
        Ok(res) => res.map(axum::body::Body::new),
        Err(never) => match never {},
    }
}

/// Part uploads are bounded by their body's idle timeout instead; completion can take
/// minutes on S3 for objects of thousands of parts, and is bounded by the storage client's
/// own timeout.
fn exempt_from_timeout(req: &Request) -> bool {
    // tus PATCHes and creations stream bytes (bounded by the body's idle timeout), and the
    // last one completes the file; a final upload's creation copies its partial uploads
    // (bounded by the storage client's timeouts).
    req.method() == Method::PUT
        || req.method() == Method::PATCH
        || req.uri().path().ends_with("/complete")
        || (req.method() == Method::POST && req.uri().path().starts_with("/v1/tus"))
}

fn record_metrics(
    metrics: &crate::metrics::Metrics,
    method: &Method,
    route: &str,
    res: &Response,
    start: Instant,
) {
    if let Some(code) = res.extensions().get::<crate::error::ErrorCode>() {
        metrics.rejection(code.0);
    }
    if res.headers().contains_key("idempotent-replayed") {
        metrics.idempotent_replays.inc();
    }
    let method = crate::metrics::method_label(method);
    metrics.request(
        method,
        crate::metrics::route_label(Some(route)),
        res.status().as_u16(),
        start.elapsed(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::method_label;
    use tower::ServiceExt as _;

    /// A stand-in for a policy layer (pure logic test): fails `poll_ready` or `call` on demand.
    #[derive(Clone)]
    struct Failing {
        ready_fails: bool,
        call_fails: bool,
    }

    impl Service<Request> for Failing {
        type Response = Response;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(if self.ready_fails {
                Err("redis down (ready)".into())
            } else {
                Ok(())
            })
        }

        fn call(&mut self, _: Request) -> Self::Future {
            std::future::ready(if self.call_fails {
                Err("redis down (call)".into())
            } else {
                Ok(axum::http::StatusCode::NO_CONTENT.into_response())
            })
        }
    }

    async fn status(ready_fails: bool, call_fails: bool) -> (u16, String) {
        let svc = LayerFailureLayer.layer(Failing {
            ready_fails,
            call_fails,
        });
        let res = svc
            .oneshot(Request::new(axum::body::Body::empty()))
            .await
            .unwrap_or_else(|never| match never {});
        let status = res.status().as_u16();
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn only_the_api_methods_become_labels() {
        for (m, label) in [("GET", "GET"), ("PATCH", "PATCH"), ("OPTIONS", "OPTIONS")] {
            assert_eq!(
                method_label(&Method::from_bytes(m.as_bytes()).expect("method")),
                label
            );
        }
        for m in ["TRACE", "CONNECT", "PROPFIND", "get", &"X".repeat(20_000)] {
            let method = Method::from_bytes(m.as_bytes()).expect("method");
            assert_eq!(method_label(&method), "other", "{}", &m[..m.len().min(10)]);
        }
    }

    #[test]
    fn a_request_id_is_kept_only_when_short_and_visible_ascii() {
        let with = |v: &[u8]| {
            let mut req = Request::new(axum::body::Body::empty());
            req.headers_mut().insert(
                X_REQUEST_ID.clone(),
                axum::http::HeaderValue::from_bytes(v).expect("header value"),
            );
            drop_invalid_request_id(req)
                .headers()
                .get(&X_REQUEST_ID)
                .map(|v| v.as_bytes().to_vec())
        };
        let ok = "a".repeat(MAX_REQUEST_ID);
        assert_eq!(with(ok.as_bytes()), Some(ok.clone().into_bytes()));
        assert_eq!(with(b"req-1.2_3:x"), Some(b"req-1.2_3:x".to_vec()));
        for bad in [
            "a".repeat(MAX_REQUEST_ID + 1).into_bytes(),
            b"has space".to_vec(),
            b"tab\there".to_vec(),
            "caf\u{e9}".as_bytes().to_vec(),
            b"".to_vec(),
        ] {
            assert_eq!(with(&bad), None, "{:?}", String::from_utf8_lossy(&bad));
        }
    }

    /// Errors from `poll_ready` and from `call` both become the 503 problem, with no
    /// internal detail in the body; success passes through untouched.
    #[tokio::test]
    async fn layer_failures_become_503_without_details() {
        assert_eq!(status(false, false).await.0, 204);
        for (ready_fails, call_fails) in [(true, false), (false, true)] {
            let (code, body) = status(ready_fails, call_fails).await;
            assert_eq!(code, 503, "{body}");
            assert!(body.contains("\"unavailable\""), "{body}");
            assert!(
                !body.contains("redis down"),
                "internal detail leaked: {body}"
            );
        }
    }
}
