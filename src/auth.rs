//! Bearer API-key authentication: a key belongs to exactly one tenant.
//!
//! Keys are configured as SHA-256 digests, so the configuration never holds a usable key;
//! the presented key is hashed and looked up. The key itself is never logged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header::AUTHORIZATION;

use sha2::{Digest, Sha256};

use crate::config::TenantConfig;

/// API-key digest → tenant.
#[derive(Debug, Clone, Default)]
pub struct Tenants(Arc<HashMap<[u8; 32], Arc<TenantConfig>>>);

impl Tenants {
    /// Indexes every configured key digest.
    pub fn new(tenants: &[TenantConfig]) -> Self {
        let mut map = HashMap::new();
        for t in tenants {
            let t = Arc::new(t.clone());
            // The configuration was validated: every digest is 64 hex digits.
            for k in &t.api_keys_sha256 {
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(k, &mut digest).is_ok() {
                    map.insert(digest, t.clone());
                }
            }
        }
        Tenants(Arc::new(map))
    }

    /// The tenant owning the presented key.
    pub fn resolve(&self, key: &str) -> Option<Arc<TenantConfig>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.0.get(&digest).cloned()
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
