//! CORS for browser uploads, configured per tenant (`cors_allowed_origins`), on
//! [`tower_http::cors`].
//!
//! The edge ([`crate::stack`]) lets a preflight through unauthenticated (browsers send no
//! credential on one), authenticates everything else before this layer sees it, and sends
//! requests without `Origin` past it (they get no CORS headers). The origin
//! predicate therefore sees either a preflight, allowed for any origin that some tenant
//! allows, or an authenticated request, allowed only for the owning tenant's origins. `ETag`
//! is exposed so browsers can collect part ETags (for presigned uploads the bucket's own CORS
//! rule must expose it too: see the README).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::Tenant;
use crate::config::TenantConfig;

const ALLOW_HEADERS: [&str; 11] = [
    "authorization",
    "content-type",
    "content-md5",
    "idempotency-key",
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-amz-checksum-crc32",
    "x-amz-checksum-crc32c",
    "x-amz-checksum-sha1",
    "x-amz-checksum-sha256",
];
const EXPOSE_HEADERS: [&str; 9] = [
    "upgate-session-id",
    "upgate-file-id",
    "etag",
    "location",
    "x-request-id",
    "ratelimit",
    "ratelimit-policy",
    "retry-after",
    "idempotent-replayed",
];

fn allows<'a>(list: impl IntoIterator<Item = &'a String>, origin: &HeaderValue) -> bool {
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    list.into_iter().any(|o| o == "*" || o == origin)
}

/// True for a CORS preflight: an `OPTIONS` with `Access-Control-Request-Method`.
pub fn is_preflight(req: &Request) -> bool {
    req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The CORS layer for these tenants (see the module docs).
pub fn layer(tenants: &[TenantConfig]) -> CorsLayer {
    let any_tenant: Arc<HashSet<String>> = Arc::new(
        tenants
            .iter()
            .flat_map(|t| t.cors_allowed_origins.iter().cloned())
            .collect(),
    );
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, parts| {
            match parts.extensions.get::<Tenant>() {
                Some(Tenant(tenant)) => allows(&tenant.cors_allowed_origins, origin),
                None => {
                    any_tenant.contains("*")
                        || origin.to_str().is_ok_and(|o| any_tenant.contains(o))
                }
            }
        }))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
            Method::PATCH,
            Method::HEAD,
        ])
        .allow_headers(
            ALLOW_HEADERS
                .iter()
                .chain(crate::api::tus::ALLOWED.iter())
                .map(|h| HeaderName::from_static(h))
                .collect::<Vec<_>>(),
        )
        .expose_headers(
            EXPOSE_HEADERS
                .iter()
                .chain(crate::api::tus::EXPOSED.iter())
                .map(|h| HeaderName::from_static(h))
                .collect::<Vec<_>>(),
        )
        .max_age(Duration::from_secs(600))
}
