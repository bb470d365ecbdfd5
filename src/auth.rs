//! Bearer authentication: an API key (belongs to exactly one tenant), an upload token
//! (one session of one tenant, [`crate::tokens`]) or an end-user JWT (the sessions one
//! user of a tenant owns, [`crate::jwt`]).
//!
//! Keys are configured as SHA-256 digests, so the configuration never holds a usable key;
//! the presented key is hashed and looked up. No credential is ever logged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use axum::http::Method;

use sha2::{Digest, Sha256};

use crate::config::TenantConfig;
use crate::error::AppError;
use crate::jwt::{EndUser, EndUserTokens};
use crate::tokens::{Invalid, UploadTokens};

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

/// The request's credential: its `Authorization: Bearer` token, else, on the Uppy routes
/// (whose client sends no headers of its own), the upload token in the path
/// (`/v1/uppy/{uploadToken}/...`).
fn bearer(req: &Request) -> Option<&str> {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return req
            .uri()
            .path()
            .strip_prefix(crate::api::path::UPPY)
            .and_then(|rest| rest.split('/').next())
            .filter(|t| !t.is_empty());
    };
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The one session an upload token covers, in the request extensions of a request it
/// authenticated (the idempotency scope includes it).
#[derive(Debug, Clone)]
pub struct SessionScope(pub String);

/// In a response's extensions: the session it is about was deleted (`aborted`). An upload
/// token's request then answers 404 `sessionNotFound` instead (API.md v1.1: after `DELETE`
/// of the session, 404); the API key keeps the answer.
#[derive(Debug, Clone, Copy)]
pub struct SessionGone;

/// The end user of a request authenticated by a JWT, in its extensions: handlers apply
/// the token's limits and make the user the owner of the sessions it creates; the
/// ownership check ([`crate::stack`]) answers 404 on other users' sessions.
#[derive(Debug, Clone)]
pub struct User(pub Arc<EndUser>);

/// Who a request is: its tenant, and the session or user its credential is limited to
/// (neither: an API key, every session of the tenant).
#[derive(Debug, Clone)]
pub struct Principal {
    /// The tenant.
    pub tenant: Arc<TenantConfig>,
    /// The upload token's session.
    pub session: Option<String>,
    /// The JWT's end user.
    pub user: Option<Arc<EndUser>>,
}

/// Why [`Authenticator::authenticate`] did not admit a request.
#[derive(Debug)]
pub enum Refusal {
    /// The answer to send.
    Error(AppError),
    /// The answer to send to a known tenant's credential (its CORS origins apply).
    Denied(AppError, Arc<TenantConfig>),
    /// An upload token that may be signed with a key this replica has not loaded yet: ask
    /// the store ([`crate::tokens::UploadTokens::reload`]) and authenticate again.
    ReloadKeys,
}

/// Resolves a request's credential and checks that it covers the route.
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: Tenants,
    by_id: Arc<HashMap<String, Arc<TenantConfig>>>,
    /// The upload token keys.
    pub tokens: Arc<UploadTokens>,
    end_users: Arc<EndUserTokens>,
}

impl Authenticator {
    /// For `tenants`, verifying upload tokens with `tokens`.
    pub fn new(tenants: &[TenantConfig], tokens: Arc<UploadTokens>) -> Self {
        let shared: Vec<Arc<TenantConfig>> = tenants.iter().map(|t| Arc::new(t.clone())).collect();
        Authenticator {
            keys: Tenants::new(tenants),
            by_id: Arc::new(shared.iter().map(|t| (t.id.clone(), t.clone())).collect()),
            tokens,
            end_users: Arc::new(EndUserTokens::new(&shared)),
        }
    }

    /// An end-user JWT's principal, when `credential` is one (three dot-separated parts,
    /// and some tenant takes JWTs): `None` when it is not a JWT of any tenant's issuer
    /// (then it may still be an API key).
    fn end_user(
        &self,
        req: &Request,
        route: Option<&str>,
        credential: &str,
    ) -> Option<Result<Principal, Refusal>> {
        if !self.end_users.any() || credential.bytes().filter(|b| *b == b'.').count() != 2 {
            return None;
        }
        let now = u64::try_from(crate::model::now_ms() / 1000).unwrap_or(0);
        let (tenant, user) = match self.end_users.verify(credential, now) {
            Ok(found) => found,
            Err(crate::jwt::Refused::Malformed | crate::jwt::Refused::UnknownIssuer) => {
                return None
            }
            Err(why) => {
                tracing::debug!(reason = ?why, "end-user token refused");
                return Some(Err(Refusal::Error(AppError::InvalidToken)));
            }
        };
        // An allow-list: creating sessions and the routes under one session (minting
        // included); the user's ownership of that session is checked in the stack.
        match route {
            Some(r) if r == crate::api::path::SESSIONS && req.method() == Method::POST => {}
            Some(r) if r.starts_with(crate::api::path::SESSION) => {}
            Some(r) if r.starts_with(crate::api::path::TUS) => {}
            Some(_) => return Some(Err(Refusal::Denied(AppError::InsufficientScope, tenant))),
            None => {}
        }
        Some(Ok(Principal {
            tenant,
            session: None,
            user: Some(user),
        }))
    }

    /// The request's principal, or why it has none. `route` is the matched route template
    /// (`None`: no route matched; the router answers 404 after authentication).
    ///
    /// An upload token admits only the routes under its own session: creating a session or
    /// minting tokens is 403 `insufficientScope`; another session's route is 404
    /// `sessionNotFound`, as another tenant's session is (its files are under it, so they
    /// are 404 too). `reloaded` says the keys were just asked for: a token that still does
    /// not verify is refused instead of asking again.
    pub fn authenticate(
        &self,
        req: &Request,
        route: Option<&str>,
        reloaded: bool,
    ) -> Result<Principal, Refusal> {
        let Some(credential) = bearer(req) else {
            return Err(Refusal::Error(AppError::Unauthorized));
        };
        if !credential.starts_with(crate::tokens::PREFIX) {
            if let Some(verified) = self.end_user(req, route, credential) {
                return verified;
            }
            return self
                .keys
                .resolve(credential)
                .map(|tenant| Principal {
                    tenant,
                    session: None,
                    user: None,
                })
                .ok_or(Refusal::Error(AppError::InvalidToken));
        }
        let now = crate::model::now_ms() / 1000;
        let claims = match self.tokens.verify(credential, now) {
            Ok(claims) => claims,
            // `reload` decides, under its lock, whether the store is asked (at most once a
            // second) or an ask in flight is waited for.
            Err(Invalid::KeysUnavailable) if !reloaded => return Err(Refusal::ReloadKeys),
            Err(Invalid::KeysUnavailable) => {
                return Err(Refusal::Error(AppError::Unavailable(
                    "the upload token keys could not be loaded from the session store".into(),
                )))
            }
            Err(Invalid::BadSignature) if !reloaded && !self.tokens.is_configured() => {
                return Err(Refusal::ReloadKeys)
            }
            Err(why) => {
                tracing::debug!(reason = ?why, "upload token refused");
                return Err(Refusal::Error(AppError::InvalidToken));
            }
        };
        let tenant = self
            .by_id
            .get(&claims.tenant)
            .cloned()
            .ok_or(Refusal::Error(AppError::InvalidToken))?;
        // An allow-list: the routes under one session, minting excepted. Any other route
        // (creating sessions, minting, whatever tenant-wide route comes later) is 403; no
        // route matched is the router's 404.
        match route {
            Some(r)
                if r.starts_with(crate::api::path::SESSION)
                    && r != crate::api::path::UPLOAD_TOKENS =>
            {
                // `/v1/sessions/{session_id}...`: the third segment is the session id.
                let session = req.uri().path().split('/').nth(3).unwrap_or("");
                if session != claims.session_id {
                    return Err(Refusal::Denied(AppError::SessionNotFound, tenant));
                }
            }
            // tus: creating an upload (the handler keeps it in the token's session), and
            // the uploads of the token's session.
            Some(r) if r == crate::api::path::TUS => {}
            // Uppy: the routes act on the token's session only.
            Some(r) if r.starts_with(crate::api::path::UPPY) => {}
            Some(r) if r == crate::api::path::TUS_UPLOAD => {
                let session = crate::api::session_in_path(req.uri().path()).unwrap_or("");
                if session != claims.session_id {
                    return Err(Refusal::Denied(AppError::FileNotFound, tenant));
                }
            }
            Some(_) => return Err(Refusal::Denied(AppError::InsufficientScope, tenant)),
            None => {}
        }
        Ok(Principal {
            tenant,
            session: Some(claims.session_id),
            user: None,
        })
    }
}
