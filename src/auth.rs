//! Bearer API-key authentication: a key belongs to exactly one tenant.
//!
//! Keys are configured as SHA-256 digests, so the configuration never holds a usable key;
//! the presented key is hashed and looked up. The key itself is never logged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::Tenant;
use crate::config::{Config, TenantConfig};
use crate::error::AppError;

/// API-key digest → tenant.
#[derive(Debug, Clone, Default)]
pub struct Tenants(Arc<HashMap<String, Arc<TenantConfig>>>);

impl Tenants {
    /// Indexes every configured key digest.
    pub fn new(tenants: &[TenantConfig]) -> Self {
        let mut map = HashMap::new();
        for t in tenants {
            let t = Arc::new(t.clone());
            for k in &t.api_keys_sha256 {
                map.insert(k.to_ascii_lowercase(), t.clone());
            }
        }
        Tenants(Arc::new(map))
    }

    /// The tenant owning the presented key.
    pub fn resolve(&self, key: &str) -> Option<Arc<TenantConfig>> {
        self.0.get(&Config::hash_key(key)).cloned()
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Middleware: resolves the tenant into the request extensions or answers 401.
pub async fn authenticate(
    State(tenants): State<Tenants>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(tenant) = bearer(&req).and_then(|k| tenants.resolve(k)) else {
        return AppError::Unauthorized.into_response();
    };
    tracing::Span::current().record("tenant", tenant.id.as_str());
    req.extensions_mut().insert(Tenant(tenant));
    next.run(req).await
}
