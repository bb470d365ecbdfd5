//! The gateway's policies for the `upgate-layers` tower layers: which key and quota a request
//! has, how rejections are rendered (always through [`AppError`]), and which backend each
//! layer uses (Redis when the gateway runs on Redis, so every replica shares one decision;
//! in-process otherwise).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Method, Request, Response};
use axum::response::IntoResponse;
use upgate_layers::expiry::{DeadlineLookup, Expiring};
use upgate_layers::idempotency::{IdempotencyStore, Rejection, Reservation, StoredResponse};

use crate::store::Page;

/// The smallest page: recording an expiry needs the session, not its files.
const ONE_FILE: Page = Page {
    after: None,
    limit: 1,
};
use upgate_layers::rate_limit::{Decision, Quota, RateLimitBackend};
use upgate_layers::BoxError;

use crate::api::Tenant;
use crate::error::{AppError, FieldError};
use crate::store::redis::RedisHandle;
use crate::store::SessionStore;

fn tenant<B>(req: &Request<B>) -> Option<&Tenant> {
    req.extensions().get::<Tenant>()
}

// ----- rate limit -------------------------------------------------------------------------

/// Key = tenant id, quota = the tenant's `rate_limit`.
#[derive(Debug, Clone, Copy)]
pub struct TenantQuota;

impl upgate_layers::rate_limit::RateLimitPolicy<Body> for TenantQuota {
    fn classify(&self, req: &Request<Body>) -> Option<(String, Quota)> {
        let t = tenant(req)?;
        let q = t.0.rate_limit;
        Some((t.0.id.clone(), Quota::new(q.requests_per_second, q.burst)))
    }
}

/// Key = `tenant:user` (the user's [`crate::jwt::EndUser::key`]), quota = the tenant's
/// `end_user_rate_limit`; requests without an end user are not limited by it.
#[derive(Debug, Clone, Copy)]
pub struct EndUserQuota;

impl upgate_layers::rate_limit::RateLimitPolicy<Body> for EndUserQuota {
    fn classify(&self, req: &Request<Body>) -> Option<(String, Quota)> {
        let user = req.extensions().get::<crate::auth::User>()?;
        let t = tenant(req)?;
        let q = t.0.end_user_rate_limit;
        Some((
            format!("{}:{}", t.0.id, user.0.key),
            Quota::new(q.requests_per_second, q.burst),
        ))
    }
}

/// 429 `rateLimited` with `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimited;

impl upgate_layers::rate_limit::RejectionBuilder<Body> for RateLimited {
    fn rejected(&self, key: &str, decision: &Decision) -> Response<Body> {
        tracing::info!(key = %key, "rate limited");
        AppError::RateLimited {
            retry_after: decision.retry_after_secs().unwrap_or(1).max(1),
        }
        .into_response()
    }
}

/// The rate-limit backend: shared through Redis, or per process.
#[derive(Clone)]
pub enum Limiter {
    /// One in-process GCRA per tenant quota (single replica).
    Local(Arc<upgate_layers::rate_limit::InProcess>),
    /// GCRA in Redis: one script, one round trip, one decision for all replicas.
    Redis(Arc<upgate_layers::rate_limit::RedisGcra<RedisHandle>>),
}

impl RateLimitBackend for Limiter {
    fn check(
        &self,
        key: &str,
        quota: Quota,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send {
        // No copy of the key or of the backend per request: the backends' futures borrow.
        match self {
            Limiter::Local(l) => futures_util::future::Either::Left(l.check(key, quota)),
            Limiter::Redis(r) => futures_util::future::Either::Right(r.check(key, quota)),
        }
    }
}

// ----- idempotency ------------------------------------------------------------------------

/// Keys are scoped per tenant.
#[derive(Debug, Clone, Copy)]
pub struct TenantScope;

impl upgate_layers::idempotency::IdempotencyScope<Body> for TenantScope {
    /// The tenant; for an upload token, the tenant and its session; for an end user, the
    /// tenant and the user (a token's or user's requests never meet another credential's
    /// records).
    fn scope(&self, req: &Request<Body>) -> Option<String> {
        let tenant = tenant(req)?;
        if let Some(user) = req.extensions().get::<crate::auth::User>() {
            return Some(format!("{}/user/{}", tenant.0.id, user.0.key));
        }
        Some(match req.extensions().get::<crate::auth::SessionScope>() {
            Some(session) => format!("{}/upt/{}", tenant.0.id, session.0),
            None => tenant.0.id.clone(),
        })
    }
}

/// The contract's codes for the idempotency layer's own answers.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyProblems {
    /// The JSON body cap, reported in `payloadTooLarge`.
    pub max_body: u64,
}

impl upgate_layers::idempotency::RejectionBuilder<Body> for IdempotencyProblems {
    fn rejected(&self, rejection: Rejection, _parts: &Parts) -> Response<Body> {
        match rejection {
            Rejection::InvalidKey => AppError::Validation(vec![FieldError::new(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )]),
            Rejection::PayloadTooLarge => AppError::PayloadTooLarge(self.max_body),
            Rejection::InProgress => AppError::RequestInProgress,
            Rejection::FingerprintMismatch => AppError::IdempotencyKeyReused,
            // The enum is non-exhaustive: a future rejection is still the client's problem.
            _ => AppError::Validation(vec![FieldError::new("Idempotency-Key", "rejected")]),
        }
        .into_response()
    }
}

/// The idempotency record store: Redis (shared) or in-process.
#[derive(Clone)]
pub enum IdempotencyRecords {
    /// In-process (single replica).
    Local(Arc<upgate_layers::idempotency::InMemory>),
    /// Redis: SET NX reservation by script.
    Redis(Arc<upgate_layers::idempotency::RedisStore<RedisHandle>>),
}

impl IdempotencyStore for IdempotencyRecords {
    fn reserve(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        owner: &str,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<Reservation, BoxError>> + Send {
        let (this, key, fp, owner) = (self.clone(), key.to_owned(), *fingerprint, owner.to_owned());
        async move {
            match this {
                IdempotencyRecords::Local(s) => s.reserve(&key, &fp, &owner, lock_ttl).await,
                IdempotencyRecords::Redis(s) => s.reserve(&key, &fp, &owner, lock_ttl).await,
            }
        }
    }

    fn complete(
        &self,
        key: &str,
        owner: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let (this, key, owner, response) = (
            self.clone(),
            key.to_owned(),
            owner.to_owned(),
            response.clone(),
        );
        async move {
            match this {
                IdempotencyRecords::Local(s) => s.complete(&key, &owner, &response, ttl).await,
                IdempotencyRecords::Redis(s) => s.complete(&key, &owner, &response, ttl).await,
            }
        }
    }

    fn release(&self, key: &str, owner: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let (this, key, owner) = (self.clone(), key.to_owned(), owner.to_owned());
        async move {
            match this {
                IdempotencyRecords::Local(s) => s.release(&key, &owner).await,
                IdempotencyRecords::Redis(s) => s.release(&key, &owner).await,
            }
        }
    }
}

// ----- expiry -----------------------------------------------------------------------------

/// What the expiry layer knows about a session.
#[derive(Debug, Clone)]
pub struct SessionDeadline {
    /// Owning tenant.
    pub tenant: String,
    /// The session.
    pub session_id: String,
}

/// Cached entries at most; the cache is cleared when full (entries are cheap to refetch).
const DEADLINE_CACHE_MAX: usize = 100_000;

/// Resolves `/v1/sessions/{id}/...` to the session's deadline. A session's `expiresAt` never
/// changes, so deadlines are cached per replica: after the first request on a session, the
/// expiry check costs no Redis round trip.
#[derive(Clone)]
pub struct SessionDeadlines {
    store: Arc<dyn SessionStore>,
    cache: Arc<Mutex<HashMap<(String, String), i64>>>,
}

impl SessionDeadlines {
    /// Over `store`.
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        SessionDeadlines {
            store,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn session_id_of(path: &str) -> Option<&str> {
    crate::api::session_in_path(path)
}

impl DeadlineLookup for SessionDeadlines {
    type Info = SessionDeadline;

    fn lookup(
        &self,
        parts: &Parts,
    ) -> impl Future<Output = Result<Option<Expiring<SessionDeadline>>, BoxError>> + Send {
        let target = match (
            parts.extensions.get::<Tenant>(),
            session_id_of(parts.uri.path()),
        ) {
            (Some(t), Some(sid)) => Some((t.0.id.clone(), sid.to_owned())),
            _ => None,
        };
        let this = self.clone();
        async move {
            let Some((tenant, session_id)) = target else {
                return Ok(None);
            };
            let key = (tenant, session_id);
            let cached = this
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied();
            let expires_at = match cached {
                Some(at) => at,
                None => match this.store.session_deadline(&key.0, &key.1).await? {
                    Some((at, _created)) => {
                        let mut cache = this.cache.lock().unwrap_or_else(|e| e.into_inner());
                        if cache.len() >= DEADLINE_CACHE_MAX {
                            cache.clear();
                        }
                        cache.insert(key.clone(), at);
                        at
                    }
                    None => return Ok(None),
                },
            };
            Ok(Some(Expiring {
                expires_at: UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(expires_at).unwrap_or(0)),
                info: SessionDeadline {
                    tenant: key.0,
                    session_id: key.1,
                },
            }))
        }
    }
}

/// Expiry recordings in flight at once on this replica; a 410 beyond them records nothing
/// (the reaper records the transition anyway).
const EXPIRY_RECORDINGS: usize = 8;
/// Sessions remembered as recorded, so repeated 410s on one session cost no store call; the
/// set is cleared when it reaches this size.
const EXPIRY_SEEN: usize = 10_000;

/// 410 `sessionExpired`; also makes the store record the expiry (the first observer logs the
/// expiration event exactly once across replicas), at most once per session per replica and
/// [`EXPIRY_RECORDINGS`] at a time, so a client hammering expired sessions cannot make the
/// gateway queue store calls.
#[derive(Clone)]
pub struct ExpiredProblem {
    store: Arc<dyn SessionStore>,
    recordings: Arc<tokio::sync::Semaphore>,
    seen: Arc<std::sync::Mutex<std::collections::HashSet<(String, String)>>>,
}

impl ExpiredProblem {
    /// Records expiries in `store`.
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        ExpiredProblem {
            store,
            recordings: Arc::new(tokio::sync::Semaphore::new(EXPIRY_RECORDINGS)),
            seen: Arc::default(),
        }
    }

    /// True when this replica should record `key`'s expiry now (first time, a slot free).
    fn should_record(&self, key: &(String, String)) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(key) {
            return None;
        }
        let permit = self.recordings.clone().try_acquire_owned().ok()?;
        if seen.len() >= EXPIRY_SEEN {
            seen.clear();
        }
        seen.insert(key.clone());
        Some(permit)
    }

    /// Recording tasks running now.
    pub fn recordings_in_flight(&self) -> usize {
        EXPIRY_RECORDINGS - self.recordings.available_permits()
    }
}

impl upgate_layers::expiry::ExpiredResponse<SessionDeadline, Body> for ExpiredProblem {
    fn expired(
        &self,
        expiring: &Expiring<SessionDeadline>,
        now: SystemTime,
        _parts: &Parts,
    ) -> Response<Body> {
        let now_ms = i64::try_from(
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(i64::MAX);
        let expires_at = i64::try_from(
            expiring
                .expires_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        )
        .unwrap_or(0);
        let info = expiring.info.clone();
        let store = self.store.clone();
        let key = (info.tenant.clone(), info.session_id.clone());
        // Recording the transition is the store's atomic step; the response does not wait.
        if let Some(permit) = self.should_record(&key) {
            tokio::spawn(async move {
                match store
                    .get_session(&info.tenant, &info.session_id, ONE_FILE, now_ms)
                    .await
                {
                    Ok(crate::store::Gate::Expired(e)) if e.first_observation => {
                        crate::uploads::log_expiration(&e.session, &info.tenant, now_ms, "request");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "recording a session's expiry failed"),
                }
                drop(permit);
            });
        }
        AppError::SessionExpired {
            session_id: expiring.info.session_id.clone(),
            expires_at,
            now: now_ms / 1000,
        }
        .into_response()
    }
}

// ----- count limit ------------------------------------------------------------------------

/// Part uploads in flight per tenant (`max_concurrent_uploads`), on this replica.
#[derive(Debug, Clone, Copy)]
pub struct UploadsInFlight;

impl upgate_layers::count_limit::CountPolicy<Body> for UploadsInFlight {
    fn classify(&self, req: &Request<Body>) -> Option<(String, u64)> {
        // Part PUTs and tus PATCHes (and creations carrying bytes, which the handler runs
        // as a PATCH).
        let uploading = req.method() == Method::PUT
            || req.method() == Method::PATCH
            || (req.method() == Method::POST
                && req.uri().path().starts_with("/v1/tus")
                && req.headers().contains_key("x-http-method-override"));
        if !uploading {
            return None;
        }
        let t = tenant(req)?;
        Some((t.0.id.clone(), t.0.max_concurrent_uploads))
    }
}

/// 429 `tooManyConcurrentUploads`.
#[derive(Debug, Clone, Copy)]
pub struct TooManyUploads;

impl upgate_layers::count_limit::RejectionBuilder<Body> for TooManyUploads {
    fn rejected(&self, _key: &str, _limit: u64) -> Response<Body> {
        AppError::TooManyConcurrentUploads.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 410 records a session's expiry once per replica, and at most
    /// `EXPIRY_RECORDINGS` recordings run at once.
    #[tokio::test]
    async fn expiry_is_recorded_once_per_session_and_boundedly() {
        let p = ExpiredProblem::new(Arc::new(crate::store::memory::MemoryStore::new(
            std::time::Duration::from_secs(60),
        )));
        let first = ("t".to_owned(), "s-0".to_owned());
        let held = p.should_record(&first).expect("first 410 records");
        assert!(p.should_record(&first).is_none(), "once per session");
        let more: Vec<_> = (1..100)
            .filter_map(|i| p.should_record(&("t".to_owned(), format!("s-{i}"))))
            .collect();
        assert_eq!(more.len(), EXPIRY_RECORDINGS - 1);
        assert_eq!(p.recordings_in_flight(), EXPIRY_RECORDINGS);
        drop(held);
        drop(more);
        assert_eq!(p.recordings_in_flight(), 0);
        // Sessions refused for want of a slot are recorded by a later 410.
        assert!(p
            .should_record(&("t".to_owned(), "s-99".to_owned()))
            .is_some());
    }
}
