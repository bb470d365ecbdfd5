//! The upload protocol: every multi-step exchange between the session store and object
//! storage, in one place.
//!
//! The HTTP handlers (`crate::api`) parse a request, call one method here and render the
//! result; the reaper calls [`Uploads::reap_pass`]. Each rule has one home:
//!
//! | protocol | module | the rule |
//! |---|---|---|
//! | open the storage upload | [`parts`] | created lazily, one per file: the store keeps the first, a surplus one is aborted, an unknown outcome is left alone |
//! | part upload, presign | [`parts`] | the part-size rule before the first byte; presigned URLs sign the exact length |
//! | complete | [`complete`] | one caller holds a renewed lease (a drop guard gives it back); every part's size is checked; storage completes once |
//! | delete a file or session | [`cleanup`] | the store queues the storage cleanup in the same atomic step; 204 once storage confirmed or the queue holds it; the reaper retries |
//! | finalize | [`finalize`] | magic bytes checked on every completed file; the store refuses if a file completed after the check |
//! | reap | [`reap`] | expired sessions' open uploads aborted, queued cleanups done, completions in flight waited for |
//! | tus PATCH | [`tus`] | a stream becomes whole parts, the rest waits in the store as the tail; one writer per upload (a lock taken at the client's offset) |
//! | Uppy (Companion's S3 protocol) | [`uppy`] | registered before the bytes with the length unknown; the length learnt from storage's parts (or the landed object) and checked before completion |
//! | the expiry gate | [`open_gate`] | a store's gate becomes the contract's errors; the expiration event is logged once |
//!
//! Each tenant's storage calls go to its own storage ([`Storages`]).
//!
//! Everything here works on [`SessionStore`] and [`ObjectStore`] only, so it runs the same
//! on memory, Redis and Redis Cluster, filesystem and S3.

pub mod cleanup;
pub mod complete;
pub mod finalize;
pub mod parts;
pub mod reap;
pub mod tus;
pub mod uppy;

use std::sync::Arc;

use crate::error::AppError;
use crate::metrics::Metrics;
use crate::model::SessionRecord;
use crate::storage::{ObjectStore, Storages, TenantStorage};
use crate::store::{ExpiredInfo, Gate, SessionStore};

pub use complete::Waiters;

/// The upload protocol over one session store and the object stores of the tenants. Cheap
/// to share.
pub struct Uploads {
    store: Arc<dyn SessionStore>,
    storages: Arc<Storages>,
    metrics: Arc<Metrics>,
    waiters: Arc<Waiters>,
    timing: Timing,
    events: crate::events::deliver::Waker,
    /// The form uploads this replica signed, for the reaper to settle ([`uppy`]).
    pending_posts: Arc<uppy::PendingPosts>,
}

/// The protocol's clocks. [`Timing::default`] is what the gateway runs with; tests shorten
/// them.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a completion lease lasts without renewal: how long a crashed holder blocks
    /// the file's completion (and its deletion).
    pub complete_lease: std::time::Duration,
    /// How often the holder renews it (a third of the lease: two renewals may fail before
    /// the lease runs out).
    pub complete_renew: std::time::Duration,
    /// How long a concurrent `complete` waits for the holder before answering 409.
    pub complete_wait: std::time::Duration,
    /// When a storage cleanup that failed is tried again (by the reaper).
    pub cleanup_retry: std::time::Duration,
    /// Validity of an Uppy form upload's policy (`uppy`). Uppy asks for the policy when
    /// the file's upload starts, and S3 checks it when the POST starts, so a short window
    /// costs nothing and bounds how long a policy can be sent again.
    pub form_post_ttl: std::time::Duration,
    /// How long past its policy's expiry a form POST that started just before can still
    /// be landing: only then is its staged object removed. 15 minutes: a POST of
    /// `uppy::FORM_MAX_BYTES` at 114 KiB/s or faster.
    pub form_post_grace: std::time::Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            complete_lease: std::time::Duration::from_secs(60),
            complete_renew: std::time::Duration::from_secs(20),
            complete_wait: std::time::Duration::from_secs(5),
            cleanup_retry: std::time::Duration::from_secs(30),
            form_post_ttl: std::time::Duration::from_secs(300),
            form_post_grace: std::time::Duration::from_secs(900),
        }
    }
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads")
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl Uploads {
    /// The protocol over `store` and `storages`, counting into `metrics`.
    pub fn new(
        store: Arc<dyn SessionStore>,
        storages: Arc<Storages>,
        metrics: Arc<Metrics>,
        timing: Timing,
    ) -> Self {
        Uploads {
            store,
            storages,
            metrics,
            waiters: Arc::default(),
            timing,
            events: crate::events::deliver::Waker::default(),
            pending_posts: Arc::default(),
        }
    }

    /// Tells this replica's webhook worker to look at the session: a call that may have
    /// recorded an event was made.
    pub fn wake(&self, tenant: &str, session_id: &str) {
        self.events.wake(tenant, session_id);
    }

    /// The webhook worker's wake-ups ([`crate::events::deliver::run`] takes them).
    pub fn waker(&self) -> crate::events::deliver::Waker {
        self.events.clone()
    }

    /// Where `tenant`'s objects go.
    fn tenant_storage(&self, tenant: &str) -> &TenantStorage {
        self.storages.for_tenant(tenant)
    }

    /// `tenant`'s object store.
    fn storage(&self, tenant: &str) -> &Arc<dyn ObjectStore> {
        &self.storages.for_tenant(tenant).store
    }

    /// Files with completes waiting on this replica right now.
    pub fn waiting_files(&self) -> usize {
        self.waiters.files()
    }
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The store's live-session scope of one end user of `tenant` (`user_key`:
/// [`crate::jwt::user_key`]): counts the user's sessions for the token's `maxSessions`.
/// `~` is not in tenant ids, so no scope is a tenant's.
pub fn user_live_scope(tenant: &str, user_key: &str) -> String {
    format!("{tenant}~user~{user_key}")
}

/// Turns a store gate into the contract's errors; logs the expiration event for the one
/// request that observed the session's expiry first.
pub fn open_gate<T>(gate: Gate<T>, tenant: &str, now_ms: i64) -> Result<T, AppError> {
    match gate {
        Gate::Ok(v) => Ok(v),
        Gate::SessionNotFound => Err(AppError::SessionNotFound),
        Gate::FileNotFound => Err(AppError::FileNotFound),
        Gate::NotActive(status) => Err(AppError::SessionNotActive(status)),
        Gate::Expired(info) => Err(expired(&info, tenant, now_ms)),
    }
}

/// The 410 for an expired session, logging the expiration event when this call was first.
pub fn expired(info: &ExpiredInfo, tenant: &str, now_ms: i64) -> AppError {
    let s = &info.session;
    if info.first_observation {
        log_expiration(s, tenant, now_ms, "request");
    }
    AppError::SessionExpired {
        session_id: s.id.clone(),
        expires_at: s.expires_at,
        now: now_ms / 1000,
    }
}

/// The expiration event STORY-01721 asks for: logged exactly once per session, by whichever
/// request or reaper pass moved it to `expired`.
pub fn log_expiration(s: &SessionRecord, tenant: &str, now_ms: i64, observed_by: &str) {
    let now = now_ms / 1000;
    tracing::info!(
        event = "session_expired",
        session_id = %s.id,
        tenant = %tenant,
        seconds_since_expiry = now - s.expires_at,
        seconds_since_creation = now - s.created_at,
        files_registered = s.file_count,
        observed_by,
        "session expired"
    );
}
