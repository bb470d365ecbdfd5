//! CORS for browser uploads, configured per tenant (`cors_allowed_origins`).
//!
//! A preflight carries no API key, so it is answered for any origin that some tenant allows;
//! the real request is authenticated, and only the owning tenant's origins get
//! `Access-Control-Allow-Origin`. `ETag` is exposed so browsers can collect part ETags
//! (for presigned uploads the bucket's own CORS rule must expose it too: see the README).

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::config::TenantConfig;

const ALLOW_METHODS: &str = "GET, POST, PUT, DELETE, OPTIONS";
const ALLOW_HEADERS: &str = "authorization, content-type, content-md5, idempotency-key, x-request-id, traceparent, tracestate, \
x-amz-checksum-crc32, x-amz-checksum-crc32c, x-amz-checksum-sha1, x-amz-checksum-sha256";
const EXPOSE_HEADERS: &str =
    "etag, location, x-request-id, ratelimit, ratelimit-policy, retry-after, idempotent-replayed";

/// Every origin some tenant allows (`*` allows any).
#[derive(Debug, Clone, Default)]
pub struct AnyTenantOrigins(Arc<HashSet<String>>);

impl AnyTenantOrigins {
    /// The union of all tenants' origins.
    pub fn new(tenants: &[TenantConfig]) -> Self {
        AnyTenantOrigins(Arc::new(
            tenants
                .iter()
                .flat_map(|t| t.cors_allowed_origins.iter().cloned())
                .collect(),
        ))
    }
}

fn allows(list: impl IntoIterator<Item = impl AsRef<str>>, origin: &str) -> bool {
    list.into_iter()
        .any(|o| o.as_ref() == "*" || o.as_ref() == origin)
}

/// The answer to a CORS preflight (an `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`), given before authentication; `None` for any other
/// request.
pub fn preflight(origins: &AnyTenantOrigins, req: &Request) -> Option<Response> {
    let is_preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !is_preflight {
        return None;
    }
    let origin = req.headers().get(header::ORIGIN)?;
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    if origin.to_str().is_ok_and(|o| allows(origins.0.iter(), o)) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    Some(res)
}

/// The request's `Origin` when the authenticated tenant allows it.
pub fn allowed_origin(tenant: &TenantConfig, req: &Request) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    origin
        .to_str()
        .is_ok_and(|o| allows(&tenant.cors_allowed_origins, o))
        .then(|| origin.clone())
}

/// Adds the CORS response headers for an origin [`allowed_origin`] accepted.
pub fn expose(res: &mut Response, origin: HeaderValue) {
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    h.append(header::VARY, HeaderValue::from_static("origin"));
}
