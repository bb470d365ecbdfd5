//! Bearer API-key authentication: a key belongs to exactly one tenant.
//!
//! Keys are configured as SHA-256 digests, so the configuration never holds a usable key;
//! the presented key is hashed and looked up. The key itself is never logged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header::AUTHORIZATION;

use crate::config::{Config, TenantConfig};

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

/// The tenant whose API key the request's `Authorization: Bearer` header carries.
pub fn tenant_of(tenants: &Tenants, req: &Request) -> Option<Arc<TenantConfig>> {
    bearer(req).and_then(|k| tenants.resolve(k))
}
