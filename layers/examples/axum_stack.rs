//! All four layers in an axum `Router`, the way the gateway stacks them: the
//! layers' errors (backend failures) become `503` through `HandleErrorLayer`.
//!
//! ```text
//! cargo run -p upgate-layers --example axum_stack --features full
//! curl -i -X POST -H 'x-tenant: acme' -H 'idempotency-key: k1' localhost:3001/sessions/s1/parts
//! curl -i -X POST -H 'x-tenant: acme' localhost:3001/sessions/expired/parts
//! ```

use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use tower::{BoxError, ServiceBuilder};
use upgate_layers::count_limit::{self, CountLimitLayer, Release};
use upgate_layers::expiry::{Expiring, ExpiryLayer};
use upgate_layers::idempotency::{self, IdempotencyBody, IdempotencyLayer};
use upgate_layers::rate_limit::{self, Quota, RateLimitLayer};

/// What the gateway's auth layer inserts into the request extensions.
#[derive(Clone, Debug)]
struct Tenant {
    id: String,
    quota: Quota,
    max_concurrent_parts: u64,
}

#[derive(Clone, Debug)]
struct Session {
    id: String,
}

fn authenticate(mut req: Request) -> Request {
    if let Some(id) = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()) {
        let tenant = Tenant {
            id: format!("{{{id}}}"),
            quota: Quota::new(10, 20),
            max_concurrent_parts: 4,
        };
        req.extensions_mut().insert(tenant);
    }
    req
}

fn session_lookup(
    parts: &Parts,
) -> impl std::future::Future<Output = Result<Option<Expiring<Session>>, BoxError>> + Send + 'static
{
    let id = parts
        .uri
        .path()
        .strip_prefix("/sessions/")
        .and_then(|rest| rest.split('/').next())
        .map(str::to_owned);
    async move {
        Ok(id.map(|id| {
            // A real gateway reads the session from Redis.
            let expires_at = if id == "expired" {
                SystemTime::now() - Duration::from_secs(60)
            } else {
                SystemTime::now() + Duration::from_secs(3600)
            };
            Expiring {
                expires_at,
                info: Session { id },
            }
        }))
    }
}

fn problem(status: StatusCode, kind: &str) -> Response {
    let body = format!("{{\"type\":\"{kind}\",\"status\":{}}}", status.as_u16());
    Response::builder()
        .status(status)
        .header("content-type", "application/problem+json")
        .body(Body::from(Bytes::from(body)))
        .unwrap_or_default()
}

async fn upload_part(Extension(session): Extension<Expiring<Session>>) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("part stored in {}\n", session.info.id),
    )
}

async fn handle_layer_error(err: BoxError) -> (StatusCode, String) {
    let which = if err.is::<rate_limit::Error>() {
        "rate limit backend"
    } else if err.is::<idempotency::Error>() {
        "idempotency store"
    } else if err.is::<count_limit::Error>() {
        "count backend"
    } else {
        "backend"
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{which} unavailable\n"),
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let rate_limit = RateLimitLayer::new(
        |req: &Request| {
            let t = req.extensions().get::<Tenant>()?;
            Some((t.id.clone(), t.quota))
        },
        rate_limit::InProcess::new(),
    )
    .rejection(|_key: &str, _d: &rate_limit::Decision| {
        problem(StatusCode::TOO_MANY_REQUESTS, "rateLimited")
    });

    let idempotency = IdempotencyLayer::new(
        |req: &Request| req.extensions().get::<Tenant>().map(|t| t.id.clone()),
        idempotency::InMemory::new(),
    )
    .rejection(|r: idempotency::Rejection, _: &Parts| problem(r.status(), "idempotency"));

    let expiry = ExpiryLayer::new(session_lookup).expired_response(
        |e: &Expiring<Session>, _now: SystemTime, _: &Parts| {
            // The gateway also schedules the session's cleanup here.
            println!("session {} expired", e.info.id);
            problem(StatusCode::GONE, "sessionExpired")
        },
    );

    let parts_in_flight = CountLimitLayer::new(
        |req: &Request| {
            let t = req.extensions().get::<Tenant>()?;
            Some((format!("{}:parts", t.id), t.max_concurrent_parts))
        },
        count_limit::InProcess::new(),
        Release::OnCompletion,
    )
    .rejection(|_key: &str, _limit: u64| {
        problem(StatusCode::TOO_MANY_REQUESTS, "tooManyConcurrentUploads")
    });

    let app = Router::new()
        .route("/sessions/{id}/parts", post(upload_part))
        .layer(
            ServiceBuilder::new()
                .map_request(authenticate)
                .layer(HandleErrorLayer::new(handle_layer_error))
                .layer(rate_limit)
                .layer(expiry)
                .layer(parts_in_flight)
                // The idempotency layer's body keeps trailers (gRPC); axum wants its own.
                .map_response(|res: axum::http::Response<IdempotencyBody<Body>>| res.map(Body::new))
                .layer(idempotency),
        );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
