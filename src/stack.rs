//! The middleware stack, assembled in one place.
//!
//! Outermost first, and why each sits where it does:
//! 1. **Request id** (set, then propagate): first, so every log line, problem document and
//!    response of every layer below carries `X-Request-Id` (the client's, or a new UUID).
//! 2. **Trace span**: wraps everything else so the span (request id, method, route, tenant,
//!    session and file ids recorded further in) covers all work, rejections included.
//! 3. **Edge** (one hand-written middleware, so a request pays for one boxed future and one
//!    clone of the service below it instead of five), in this order:
//!    - **metrics**: counts every response by route and status, rejections included;
//!    - **control-plane timeout**: bounds JSON requests; part uploads and completes are
//!      exempt (parts are bounded by the idle timeout on their body, so a slow but live
//!      upload survives; completes by the storage client's timeout);
//!    - **CORS preflight**: answered before authentication (browsers send no API key on a
//!      preflight), for origins some tenant allows;
//!    - **authentication**: resolves the tenant; everything below is per tenant;
//!    - **per-tenant CORS**: that tenant's origins get CORS headers on the response.
//! 4. **Panic catcher**: turns a panic below into a 500 problem instead of a dropped
//!    connection; inside the edge, so panics are counted and get the tenant's CORS headers.
//! 5. **Layer failures** (`HandleError`): a policy layer's infrastructure error (Redis down
//!    behind the rate limiter, the idempotency store or the deadline lookup) becomes a 503.
//! 6. **Rate limit** (per tenant): before anything that touches Redis session scripts or
//!    storage, so a limited request costs one limiter decision and nothing else.
//! 7. **Idempotency** (POST with `Idempotency-Key`, scoped per tenant): after the rate limit
//!    (a rejected request must not reserve a key) and before the handlers, so a replay never
//!    re-runs registration or completion.
//! 8. **Expiry**: answers 410 from the session's immutable deadline before any handler work.
//! 9. **Count limit**: per-tenant cap on part uploads in flight, innermost so a slot is held
//!    only while the upload itself runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use axum::error_handling::HandleErrorLayer;
use upgate_layers::count_limit::{CountLimitLayer, Release};
use upgate_layers::expiry::ExpiryLayer;
use upgate_layers::idempotency::IdempotencyLayer;
use upgate_layers::rate_limit::{RateLimitLayer, RateLimitStats};
use upgate_layers::BoxError;

use crate::api::AppState;
use crate::auth::Tenants;
use crate::config::Config;
use crate::error::AppError;
use crate::policies::{
    ExpiredProblem, IdempotencyProblems, IdempotencyRecords, Limiter, RateLimited,
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
    rate_limit: RateLimitLayer<TenantQuota, Limiter, RateLimited>,
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
            rate_limit: RateLimitLayer::new(TenantQuota, limiter)
                .bypass(config.rate_limit_bypass)
                .rejection(RateLimited),
            idempotency: IdempotencyLayer::new(TenantScope, records)
                .methods([Method::POST])
                .body_limit(max_body)
                .ttl(config.idempotency_ttl)
                .prefix("upgate:idem:")
                .rejection(IdempotencyProblems {
                    max_body: max_body as u64,
                }),
            expiry: ExpiryLayer::new(SessionDeadlines::new(store.clone()))
                .expired_response(ExpiredProblem { store }),
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
    pub fn metrics_text(&self) -> String {
        let s = self.rate_limit.stats();
        format!(
            "# HELP upgate_rate_limit_decisions_total Rate-limit decisions.\n# TYPE upgate_rate_limit_decisions_total counter\n\
upgate_rate_limit_decisions_total{{decision=\"admitted\"}} {}\n\
upgate_rate_limit_decisions_total{{decision=\"limited\"}} {}\n\
upgate_rate_limit_decisions_total{{decision=\"bypassed\"}} {}\n",
            s.admitted(),
            s.limited(),
            s.bypassed()
        )
    }
}

/// A layer's infrastructure failure (Redis unreachable behind the rate limiter, the
/// idempotency store or the deadline lookup): 503, details to the log only.
async fn layer_failure(err: BoxError) -> Response {
    AppError::Unavailable(format!("middleware: {err}")).into_response()
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The API router with its whole middleware stack.
pub fn build(state: AppState, layers: &Layers) -> Router {
    let edge = Edge(Arc::new(EdgeState {
        metrics: state.metrics.clone(),
        tenants: Tenants::new(&state.config.tenants),
        preflight_origins: crate::cors::AnyTenantOrigins::new(&state.config.tenants),
        timeout: state.config.request_timeout,
    }));
    crate::api::routes(state).layer(
        ServiceBuilder::new()
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
                    method = %req.method(),
                    route,
                    tenant = tracing::field::Empty,
                    session_id = session_id.unwrap_or(""),
                    file_id = file_id.unwrap_or(""),
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
            .layer(middleware::from_fn_with_state(edge, edge_middleware))
            .layer(CatchPanicLayer::custom(
                |_panic: Box<dyn std::any::Any + Send>| {
                    AppError::Internal("handler panicked".into()).into_response()
                },
            ))
            .layer(HandleErrorLayer::new(layer_failure))
            .layer(layers.rate_limit.clone())
            .layer(layers.idempotency.clone())
            .layer(layers.expiry.clone())
            .layer(layers.uploads.clone()),
    )
}

/// What the edge middleware needs, behind one `Arc` (cloned per request).
struct EdgeState {
    metrics: Arc<crate::metrics::Metrics>,
    tenants: Tenants,
    preflight_origins: crate::cors::AnyTenantOrigins,
    timeout: Duration,
}

#[derive(Clone)]
struct Edge(Arc<EdgeState>);

/// Metrics around everything; then timeout, preflight, authentication and per-tenant CORS
/// (see the module docs for the order).
async fn edge_middleware(
    axum::extract::State(edge): axum::extract::State<Edge>,
    req: Request,
    next: Next,
) -> Response {
    let route: Option<MatchedPath> = req.extensions().get::<MatchedPath>().cloned();
    let method = req.method().clone();
    let start = Instant::now();
    let res = if exempt_from_timeout(&req) {
        authenticated(&edge.0, req, next).await
    } else {
        match tokio::time::timeout(edge.0.timeout, authenticated(&edge.0, req, next)).await {
            Ok(res) => res,
            Err(_) => AppError::Unavailable("request timed out".into()).into_response(),
        }
    };
    record_metrics(
        &edge.0.metrics,
        &method,
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        &res,
        start,
    );
    res
}

/// Part uploads are bounded by their body's idle timeout instead; completion can take
/// minutes on S3 for objects of thousands of parts, and is bounded by the storage client's
/// own timeout.
fn exempt_from_timeout(req: &Request) -> bool {
    req.method() == Method::PUT || req.uri().path().ends_with("/complete")
}

async fn authenticated(edge: &EdgeState, mut req: Request, next: Next) -> Response {
    if let Some(res) = crate::cors::preflight(&edge.preflight_origins, &req) {
        return res;
    }
    let Some(tenant) = crate::auth::tenant_of(&edge.tenants, &req) else {
        return AppError::Unauthorized.into_response();
    };
    tracing::Span::current().record("tenant", tenant.id.as_str());
    let cors_origin = crate::cors::allowed_origin(&tenant, &req);
    req.extensions_mut().insert(crate::api::Tenant(tenant));
    let mut res = next.run(req).await;
    if let Some(origin) = cors_origin {
        crate::cors::expose(&mut res, origin);
    }
    res
}

fn record_metrics(
    metrics: &crate::metrics::Metrics,
    method: &Method,
    route: &str,
    res: &Response,
    start: Instant,
) {
    if let Some(code) = res.extensions().get::<crate::error::ErrorCode>() {
        metrics.rejections.inc_code(code.0);
    }
    if res.headers().contains_key("idempotent-replayed") {
        metrics.idempotent_replays.inc();
    }
    metrics.requests.inc(&[
        ("method", method.as_str()),
        ("route", route),
        ("status", res.status().as_str()),
    ]);
    metrics.request_seconds.observe(
        &[("method", method.as_str()), ("route", route)],
        start.elapsed(),
    );
}
