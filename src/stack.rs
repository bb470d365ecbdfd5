//! The middleware stack, assembled in one place.
//!
//! Outermost first, and why each sits where it does:
//! 1. **Request id** (set, then propagate): first, so every log line, problem document and
//!    response of every layer below carries `X-Request-Id` (the client's, or a new UUID).
//! 2. **Trace span**: wraps everything else so the span (request id, method, route, tenant,
//!    session and file ids recorded further in) covers all work, rejections included.
//! 3. **Metrics**: counts every response by route and status, rejections included.
//! 4. **Panic catcher**: turns a handler panic into a 500 problem instead of a dropped
//!    connection; inside metrics so panics are counted.
//! 5. **Control-plane timeout**: bounds JSON requests; part uploads and completes are exempt
//!    (parts are bounded by the idle timeout on their body, so a slow but live upload
//!    survives; completes by the storage client's timeout).
//! 6. **CORS preflight**: answered before authentication (browsers send no API key on a
//!    preflight), for origins some tenant allows.
//! 7. **Authentication**: resolves the tenant. Everything below is per tenant; right below
//!    it, CORS headers for that tenant's origins are added to the response.
//! 8. **Rate limit** (per tenant): before anything that touches Redis session scripts or
//!    storage, so a limited request costs one limiter decision and nothing else.
//! 9. **Idempotency** (POST with `Idempotency-Key`, scoped per tenant): after the rate limit
//!    (a rejected request must not reserve a key) and before the handlers, so a replay never
//!    re-runs registration or completion.
//! 10. **Expiry**: answers 410 from the session's immutable deadline before any handler work.
//! 11. **Count limit**: per-tenant cap on part uploads in flight, innermost so a slot is held
//!     only while the upload itself runs.

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
const RATE_LIMIT_LEASE_TOKENS: u32 = 64;
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
    let tenants = Tenants::new(&state.config.tenants);
    let cors_origins = crate::cors::AnyTenantOrigins::new(&state.config.tenants);
    let timeout = state.config.request_timeout;
    let metrics_state = state.clone();
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
                // Continue the caller's trace (W3C traceparent) when it sent one.
                let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(
                    &span,
                    crate::telemetry::parent_context(req.headers()),
                );
                span
            }))
            .layer(middleware::from_fn_with_state(
                metrics_state,
                record_metrics,
            ))
            .layer(CatchPanicLayer::custom(
                |_panic: Box<dyn std::any::Any + Send>| {
                    AppError::Internal("handler panicked".into()).into_response()
                },
            ))
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                control_plane_timeout(timeout, req, next)
            }))
            .layer(middleware::from_fn_with_state(
                cors_origins,
                crate::cors::preflight,
            ))
            .layer(middleware::from_fn_with_state(
                tenants,
                crate::auth::authenticate,
            ))
            .layer(middleware::from_fn(crate::cors::per_tenant))
            .layer(HandleErrorLayer::new(layer_failure))
            .layer(layers.rate_limit.clone())
            .layer(layers.idempotency.clone())
            .layer(layers.expiry.clone())
            .layer(layers.uploads.clone()),
    )
}

async fn control_plane_timeout(limit: Duration, req: Request, next: Next) -> Response {
    // Part uploads are bounded by their body's idle timeout instead; completion can take
    // minutes on S3 for objects of thousands of parts, and is bounded by the storage
    // client's own timeout.
    if req.method() == Method::PUT || req.uri().path().ends_with("/complete") {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => AppError::Unavailable("request timed out".into()).into_response(),
    }
}

async fn record_metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let route: Option<MatchedPath> = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = req.method().clone();
    let start = Instant::now();
    let res = next.run(req).await;
    if let Some(code) = res.extensions().get::<crate::error::ErrorCode>() {
        state.metrics.rejections.inc_code(code.0);
    }
    if res.headers().contains_key("idempotent-replayed") {
        state.metrics.idempotent_replays.inc();
    }
    state.metrics.requests.inc(&[
        ("method", method.as_str()),
        ("route", route),
        ("status", res.status().as_str()),
    ]);
    state.metrics.request_seconds.observe(
        &[("method", method.as_str()), ("route", route)],
        start.elapsed(),
    );
    res
}
