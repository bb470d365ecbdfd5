//! Session state: the [`SessionStore`] trait and its two implementations.
//!
//! * [`memory::MemoryStore`]: the embedded default (one replica only; state dies with it).
//! * [`redis::RedisStore`]: Redis or Redis Cluster through Lua scripts, one script per
//!   operation, so every decision (expiry, fileKey uniqueness, file-count limit, completion
//!   ownership) is made atomically next to the data.
//!
//! Both implement exactly the semantics documented on the trait; `tests/store_conformance.rs`
//! runs one suite unchanged against each.
//!
//! ## The gate every operation passes
//! Every operation that names a session first checks, atomically with its own effect:
//! 1. the session exists for that tenant (else [`Gate::SessionNotFound`]: another tenant's
//!    session is indistinguishable from a missing one);
//! 2. the session is not past `expiresAt` (else [`Gate::Expired`]; the first caller to see it
//!    flips `active` to `expired` and gets `first_observation = true`, so the expiration event
//!    is logged exactly once across all replicas);
//! 3. for mutations, the session is `active` (else [`Gate::NotActive`]);
//! 4. for file operations, the file exists in that session (else [`Gate::FileNotFound`]).
//!
//! Times passed in (`now_ms`) come from the caller so tests can control them; stores never
//! read the clock themselves.

pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::model::{FileRecord, PartRecord, SessionRecord, SessionStatus};

/// An infrastructure failure of the store (unreachable, timed out, corrupt data). Mapped to
/// 503 `unavailable`; the message goes to the log, never to the client.
#[derive(Debug, thiserror::Error)]
#[error("session store: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    /// Builds an error from anything printable.
    pub fn new(msg: impl std::fmt::Display) -> Self {
        StoreError(msg.to_string())
    }
}

/// What the session looked like when a request found it expired.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiredInfo {
    /// The session (status already `expired` when it was `active`).
    pub session: SessionRecord,
    /// True for exactly one caller: the one whose call moved the session to `expired`.
    pub first_observation: bool,
}

/// The outcome of the common checks, wrapping the operation's own result.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate<T> {
    /// All checks passed; the operation's result.
    Ok(T),
    /// No such session for this tenant.
    SessionNotFound,
    /// No such file in this session.
    FileNotFound,
    /// The session is past `expiresAt`.
    Expired(Box<ExpiredInfo>),
    /// A mutation on a session that is not `active` (finalized or aborted).
    NotActive(SessionStatus),
}

/// The most files one call returns (a page of [`SessionStore::get_session`], the files
/// [`Finalized::Done`] embeds): API.md's bound on `GET /v1/sessions/{id}`'s `files`.
pub const FILES_PAGE_MAX: usize = 1000;

/// Which of a session's files a [`SessionStore::get_session`] call returns: at most `limit`
/// (capped at [`FILES_PAGE_MAX`]), in registration order, after the cursor `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// The `next_cursor` of the previous page; `None` for the first.
    pub after: Option<u64>,
    /// Page size (1 to [`FILES_PAGE_MAX`]).
    pub limit: usize,
}

impl Page {
    /// The first page of the largest size.
    pub const FIRST: Page = Page {
        after: None,
        limit: FILES_PAGE_MAX,
    };

    /// `limit` within 1..=[`FILES_PAGE_MAX`].
    pub fn limit(self) -> usize {
        self.limit.clamp(1, FILES_PAGE_MAX)
    }
}

/// A session with a page of its files, in registration order. Deleted files are not
/// listed: a file `DELETE` removes its record (an aborted session keeps its files' records,
/// `aborted`, until its retention ends).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionView {
    /// The session.
    pub session: SessionRecord,
    /// The page's files, oldest first.
    pub files: Vec<FileRecord>,
    /// The cursor of the next page (the registration sequence number of the page's last
    /// file); `None` when this page holds the last file.
    pub next_cursor: Option<u64>,
}

/// Storage work queued for a deleted file until [`SessionStore::cleanup_done`]: what the
/// cleanup needs, kept after the file's record is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleanup {
    /// The deleted file's id.
    pub file_id: String,
    /// Its object key in storage (deleted if present).
    pub object_key: String,
    /// Its storage multipart upload (aborted), if one was opened.
    pub upload_id: Option<String>,
}

impl From<&FileRecord> for Cleanup {
    fn from(f: &FileRecord) -> Self {
        Cleanup {
            file_id: f.id.clone(),
            object_key: f.object_key.clone(),
            upload_id: f.upload_id.clone(),
        }
    }
}

/// Outcome of [`SessionStore::register_file`].
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per call, never stored in bulk
pub enum Registered {
    /// Stored; the session's `file_count` was incremented.
    Created(FileRecord),
    /// The session already holds `file_limit` live files.
    CountExceeded {
        /// The enforced limit.
        file_limit: u32,
        /// Live files at the time of the attempt.
        file_count: u32,
    },
    /// A live (not aborted) file of the session already has this fileKey.
    DuplicateKey,
    /// Larger than the session's own `max_file_size_bytes` (the end user's limit).
    TooLarge(u64),
    /// A content type outside the session's own `allowed_content_types` (or none).
    ContentTypeNotAllowed(Vec<String>),
}

/// Outcome of [`SessionStore::set_upload_id`].
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per call, never stored in bulk
pub enum UploadIdSet {
    /// Ours was stored.
    Stored,
    /// Another caller stored one first: use this one (and abort ours).
    Existing(String),
    /// The file is completed or aborted (`registered` and `completing` files accept an
    /// upload id): abort ours.
    FileNotOpen(FileRecord),
}

/// Outcome of [`SessionStore::begin_complete`].
#[derive(Debug, Clone, PartialEq)]
pub enum BeginComplete {
    /// The file is already completed: answer with it (idempotent re-completion).
    AlreadyCompleted(FileRecord),
    /// The caller now holds the completion lease (until `now_ms + lease_ms`) and must either
    /// [`SessionStore::finish_complete`] or [`SessionStore::release_complete`]. The recorded
    /// parts are returned, sorted by part number.
    Acquired(FileRecord, Vec<PartRecord>),
    /// Another caller holds an unexpired lease: wait and try again.
    InProgress,
    /// The file was aborted.
    Aborted,
}

/// Outcome of [`SessionStore::abort_file`].
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per call, never stored in bulk
pub enum FileAborted {
    /// The file is deleted. `cleanup` is the storage work queued for it (its upload to abort,
    /// its object to delete), if any: the caller does it and reports
    /// [`SessionStore::cleanup_done`]; until then the reaper retries it. Deleting a deleted
    /// file whose cleanup is still queued answers this again (a repeated `DELETE` drives the
    /// cleanup); once the cleanup is done the file is unknown ([`Gate::FileNotFound`]).
    Deleted {
        /// Storage cleanup queued for this file.
        cleanup: Option<Cleanup>,
    },
    /// The file is `completing` under an unexpired lease: storage may be assembling it right
    /// now, so nothing changed (the caller answers 409 and the client retries).
    CompletionInProgress,
}

/// Outcome of [`SessionStore::abort_session`].
#[derive(Debug, Clone, PartialEq)]
pub enum SessionAborted {
    /// The session is `aborted`; every storage cleanup queued for the session (from earlier
    /// file deletions too) is to be done.
    Aborted(Vec<Cleanup>),
    /// The session was finalized: it is forgotten (every key removed), its objects stay.
    Forgotten,
    /// The session is finalized but files deleted before finalize still wait for their
    /// storage cleanup: nothing changed. Clean these, report them done, and ask again
    /// (forgetting the session would drop the queue).
    CleanupFirst(Vec<Cleanup>),
    /// A file is `completing` under an unexpired lease: nothing changed.
    CompletionInProgress,
}

/// Outcome of [`SessionStore::finalize`].
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per call, never stored in bulk
pub enum Finalized {
    /// Session status is now `finalized`; the view holds the first page of its files.
    Done(SessionView),
    /// These live files are not completed; nothing changed.
    Incomplete(Vec<String>),
    /// A live completed file is not among the files the caller checked (it was completed
    /// after the caller looked): nothing changed; check again.
    Unchecked(Vec<String>),
}

/// Outcome of [`SessionStore::reap`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reaped {
    /// The session after the call (status `expired` when it was `active`).
    pub session: SessionRecord,
    /// True when this call moved the session from `active` to `expired`.
    pub first_observation: bool,
    /// Past expiry: live files whose storage uploads must be aborted (registered, or
    /// completing under a lease that ran out, with an upload id). Repeated on every call
    /// until the session leaves the reaper index.
    pub open_uploads: Vec<FileRecord>,
    /// Deleted files whose storage cleanup is queued ([`FileAborted::Aborted`]'s `cleanup`);
    /// report each one done with [`SessionStore::cleanup_done`].
    pub cleanup: Vec<Cleanup>,
    /// Past expiry, files `completing` under an unexpired lease are left alone: the earliest
    /// time (ms) their leases run out, when the session must be looked at again.
    pub busy_until: Option<i64>,
}

/// Due events of one session, handed to a delivery attempt
/// ([`SessionStore::claim_events`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClaimedEvents {
    /// The due events, oldest first, each leased to the caller (no other claim gets it
    /// until the lease ends).
    pub events: Vec<crate::events::StoredEvent>,
    /// Events of the session still pending after the claim (the claimed ones included).
    pub pending: u64,
    /// When the earliest pending event is due next (ms; a claimed one at its lease end).
    pub next_due_ms: Option<i64>,
    /// The session is gone and nothing of its outbox is pending or dead-lettered: it can
    /// leave the outbox index.
    pub drained: bool,
}

/// What an attempt at an event came to ([`SessionStore::event_attempted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempted {
    /// Every endpoint took it: it leaves the outbox.
    Delivered,
    /// Attempt again at this time (ms).
    RetryAt(i64),
    /// Its retry window is over: dead-lettered.
    Dead,
}

/// A file's tus state ([`crate::uploads::tus`]): how many bytes are durably received. The
/// bytes past the last whole part (`offset % part_size`, fewer than one part) wait in the
/// store as the file's tail until the part they start is whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TusState {
    /// Bytes received and kept (in stored parts plus the tail).
    pub offset: u64,
    /// The upload's length is not known yet (`Upload-Defer-Length`, or an IETF upload
    /// without `Upload-Length`): the file's `size_bytes` is a placeholder until it is.
    pub deferred: bool,
    /// When a PATCH's lock on the upload ends (ms), if one holds it.
    pub locked_until: Option<i64>,
}

/// What [`SessionStore::tus_begin`] is asked.
#[derive(Debug, Clone, Copy)]
pub struct TusBegin<'a> {
    /// The PATCH's lock token (fresh per request).
    pub token: &'a str,
    /// The lock lasts until `now + lease_ms` unless renewed.
    pub lease_ms: i64,
    /// The offset the client sent (`Upload-Offset`): the lock is taken only at it.
    pub offset: u64,
}

/// Outcome of [`SessionStore::tus_begin`].
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per call, never stored in bulk
pub enum TusBegun {
    /// The lock is this token's; the file and its tus state as they are now.
    Held(FileRecord, TusState),
    /// Another request holds the lock (an unexpired lease).
    Locked,
    /// The upload is at another offset.
    OffsetMismatch(u64),
    /// The file is not `registered` (completing, completed or aborted): as it is.
    NotOpen(FileRecord),
}

/// What happens to a file's tail in [`SessionStore::tus_advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailOp<'a> {
    /// Unchanged.
    Keep,
    /// These bytes are appended.
    Append(&'a [u8]),
    /// The tail becomes these bytes (the old tail went into a part).
    Set(&'a [u8]),
}

/// What [`SessionStore::tus_advance`] is asked: the bytes from `from` to `to` are kept, in
/// `parts` (stored in object storage, recorded here) and the tail.
#[derive(Debug, Clone, Copy)]
pub struct TusAdvance<'a> {
    /// The lock token.
    pub token: &'a str,
    /// The lock is renewed to `now + lease_ms`.
    pub lease_ms: i64,
    /// The offset before (the store refuses if it is not the stored one).
    pub from: u64,
    /// The offset after.
    pub to: u64,
    /// The tail's length before (the store refuses if it differs).
    pub tail_len: u64,
    /// Parts stored in object storage from these bytes.
    pub parts: &'a [PartRecord],
    /// The tail's change.
    pub tail: TailOp<'a>,
    /// The upload's length and part count, when it became known with these bytes.
    pub length: Option<(u64, u32)>,
}

/// Outcome of [`SessionStore::tus_advance`].
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // returned once per call, never stored in bulk
pub enum TusAdvanced {
    /// Recorded; the lock is renewed.
    Done,
    /// The token no longer holds the lock (or the offset or tail moved): nothing recorded.
    Lost,
    /// The file is not `registered` any more: nothing recorded.
    NotOpen(FileRecord),
}

impl<T> Gate<T> {
    /// The gate with its result passed through `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Gate<U> {
        match self {
            Gate::Ok(v) => Gate::Ok(f(v)),
            Gate::SessionNotFound => Gate::SessionNotFound,
            Gate::FileNotFound => Gate::FileNotFound,
            Gate::Expired(e) => Gate::Expired(e),
            Gate::NotActive(s) => Gate::NotActive(s),
        }
    }
}

/// The session store. Every method is atomic with respect to every other call on the same
/// session, across all gateway replicas sharing the backend.
#[async_trait]
#[allow(clippy::too_many_arguments)] // `finish_complete`, `event_attempted`
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session (status `active`, `file_count` 0) and indexes it for the reaper
    /// at its `expires_at`. State lives at least until `expires_at + retention` so the
    /// gateway can still answer 410 for a while after expiry.
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError>;

    /// The session and one page of its files. Gate: exists, not expired (no active check).
    async fn get_session(
        &self,
        tenant: &str,
        session_id: &str,
        page: Page,
        now_ms: i64,
    ) -> Result<Gate<SessionView>, StoreError>;

    /// The session's `expires_at` and `created_at` only (cheap; cached by the expiry layer).
    /// No gate: `None` when missing.
    async fn session_deadline(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<(i64, i64)>, StoreError>;

    /// The session's `owner` (cheap; cached per replica by the ownership check): `None`
    /// when there is no such session, `Some(None)` for a session without an owner. No gate.
    async fn session_owner(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<Option<String>>, StoreError>;

    /// Registers `file` (status `registered`) in one atomic step: gate (exists, not expired,
    /// active), then fileKey uniqueness among live files, then `file_count < file_limit`,
    /// then write and increment `file_count`. The file's part size and count are those the
    /// session's part size gives it (`model::part_size_for`), whatever `file` says; the
    /// created file is returned as stored.
    async fn register_file(
        &self,
        tenant: &str,
        file: &FileRecord,
        now_ms: i64,
    ) -> Result<Gate<Registered>, StoreError>;

    /// One file. Gate: exists, not expired, (when `require_active`) active, file exists.
    async fn get_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        require_active: bool,
        now_ms: i64,
    ) -> Result<Gate<FileRecord>, StoreError>;

    /// Stores the storage upload id if the file has none yet. Gate: exists, not expired,
    /// active, file exists.
    async fn set_upload_id(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<Gate<UploadIdSet>, StoreError>;

    /// Records (or replaces) an uploaded part. Gate: exists, not expired, active, file exists.
    /// Returns the file; the part is only recorded while the file is `registered`
    /// (otherwise the file is returned unchanged and the caller reports its status).
    async fn record_part(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        part: &PartRecord,
        now_ms: i64,
    ) -> Result<Gate<FileRecord>, StoreError>;

    /// Recorded parts, sorted by part number. Gate: exists, not expired, file exists.
    async fn list_parts(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<Vec<PartRecord>>, StoreError>;

    /// Tries to take the completion lease. Gate: exists, not expired, file exists; a completed
    /// file is returned as [`BeginComplete::AlreadyCompleted`] whatever the session status;
    /// otherwise the session must be active. A `completing` file whose lease (`token`,
    /// `lease_until`) has run out can be taken over.
    async fn begin_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Gate<BeginComplete>, StoreError>;

    /// Marks the file `completed` with its URL and ETag, if `token` still holds the lease
    /// (or the file is already completed, which is then returned unchanged). No expiry gate:
    /// a storage completion that succeeded is recorded even if the session expired meanwhile.
    /// `Gate::Ok(None)` when the lease was lost to someone else and the file is not completed.
    async fn finish_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        file_url: &str,
        etag: &str,
        now_ms: i64,
    ) -> Result<Gate<Option<FileRecord>>, StoreError>;

    /// Extends the lease `token` holds to `now_ms + lease_ms`. False when `token` no longer
    /// holds it (taken over, file aborted or gone). No gate.
    async fn renew_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Gives the lease back (file back to `registered`) if `token` holds it. No gate.
    async fn release_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
    ) -> Result<(), StoreError>;

    /// Registers `file` as [`SessionStore::register_file`] does, as a tus upload whose
    /// length is not known yet when `deferred` (its `size_bytes` is then 0 until
    /// [`SessionStore::tus_advance`] sets it). With the outcome, the session's `expires_at`
    /// (what `Upload-Expires` says; 0 unless the file was created).
    async fn register_tus_file(
        &self,
        tenant: &str,
        file: &FileRecord,
        deferred: bool,
        now_ms: i64,
    ) -> Result<Gate<(Registered, i64)>, StoreError>;

    /// A file with its tus state (a file never PATCHed is at offset 0). Gate: exists, not
    /// expired, file exists.
    async fn tus_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<(FileRecord, TusState)>, StoreError>;

    /// Takes (or, for the token holding it, renews) the upload's PATCH lock, only at the
    /// client's offset. Gate:
    /// exists, not expired, active, file exists.
    async fn tus_begin(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: &TusBegin<'_>,
        now_ms: i64,
    ) -> Result<Gate<TusBegun>, StoreError>;

    /// Records, for the lock's holder, the parts and tail change of bytes received, the new
    /// offset and (when it became known) the length, in one atomic step. Gate: exists, not
    /// expired, active, file exists.
    async fn tus_advance(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: &TusAdvance<'_>,
        now_ms: i64,
    ) -> Result<Gate<TusAdvanced>, StoreError>;

    /// The file's tail (empty when it has none). No gate: read by the lock's holder.
    async fn tus_tail(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<Vec<u8>, StoreError>;

    /// Gives the PATCH lock back if `token` holds it. No gate.
    async fn tus_release(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
    ) -> Result<(), StoreError>;

    /// Deletes one file: its record, parts and list entry removed, its count slot and
    /// fileKey freed. Gate: exists, not expired, active, file exists (or its cleanup is
    /// still queued). A file `completing` under an unexpired lease is left alone
    /// ([`FileAborted::CompletionInProgress`]).
    ///
    /// A file with storage state (an upload id, or completed) gets its cleanup queued in the
    /// same atomic step, until [`SessionStore::cleanup_done`]; after that nothing of the
    /// file is left. Object keys carry the file id, so the cleanup cannot touch a file
    /// registered later under the same fileKey.
    async fn abort_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<FileAborted>, StoreError>;

    /// Aborts the session: status `aborted`, every live file `aborted` (completed ones
    /// included: deleting a session that is not finalized removes everything it stored),
    /// cleanup queued as for [`SessionStore::abort_file`]. Repeatable: an aborted session
    /// reports its queued cleanups again. A finalized session is forgotten
    /// ([`SessionAborted::Forgotten`]) once it has no queued cleanup
    /// ([`SessionAborted::CleanupFirst`]). Gate: exists, not expired.
    async fn abort_session(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<Gate<SessionAborted>, StoreError>;

    /// Storage confirmed the cleanup of these files: their queue entries go. Unknown ids are
    /// ignored; no gate (a session that expired meanwhile is still cleaned).
    async fn cleanup_done(
        &self,
        tenant: &str,
        session_id: &str,
        file_ids: &[String],
    ) -> Result<(), StoreError>;

    /// Asks the reaper to look at the session by `at_ms` (earlier if it was already due
    /// earlier): used when a cleanup could not be done at once.
    async fn schedule_reap(
        &self,
        tenant: &str,
        session_id: &str,
        at_ms: i64,
    ) -> Result<(), StoreError>;

    /// Finalizes: gate (exists, not expired, active), then every live file must be
    /// `completed` (else [`Finalized::Incomplete`] with their ids) and among `checked`, the
    /// files whose content the caller verified (else [`Finalized::Unchecked`]), then status
    /// `finalized`.
    async fn finalize(
        &self,
        tenant: &str,
        session_id: &str,
        checked: &[String],
        now_ms: i64,
    ) -> Result<Gate<Finalized>, StoreError>;

    /// Sessions due for reaping (past `expires_at`, or moved earlier by
    /// [`SessionStore::schedule_reap`] or [`SessionStore::reap_done`]), claimed for `lease_ms`
    /// so that no other replica gets them until then: at most `limit` `(tenant, session_id)`
    /// pairs. A claimed session that is not [`SessionStore::reap_done`] within the lease
    /// becomes due again.
    async fn claim_expired(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError>;

    /// Moves a claimed session to `expired` if it is still `active` and returns the uploads
    /// to abort. `None` when the session is gone (retention passed).
    async fn reap(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<Option<Reaped>, StoreError>;

    /// Ends a claim taken by [`SessionStore::claim_expired`] at `claimed_until` (the lease end
    /// it set): removes the session from the reaper index (`next_ms` `None`: nothing left to
    /// do) or makes it due again at `next_ms`. When the entry no longer carries the claim's
    /// score (a [`SessionStore::schedule_reap`] moved it meanwhile), it is left as it is.
    async fn reap_done(
        &self,
        tenant: &str,
        session_id: &str,
        claimed_until: i64,
        next_ms: Option<i64>,
    ) -> Result<(), StoreError>;

    /// Counts `session_id` (live until `expires_at_ms`) among the tenant's live sessions if
    /// fewer than `limit` of them are live at `now_ms`: true when counted (or counted
    /// already), false when the tenant is at its limit. A session stops counting at its
    /// expiry, or at [`SessionStore::release_live`] (finalized or deleted).
    async fn reserve_live(
        &self,
        tenant: &str,
        session_id: &str,
        expires_at_ms: i64,
        limit: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// The session no longer counts among the tenant's live sessions.
    async fn release_live(&self, tenant: &str, session_id: &str) -> Result<(), StoreError>;

    /// The key upload tokens are signed with when `upload_token_secrets` is not configured:
    /// [`crate::tokens::KEY_LEN`] random bytes, created by the first replica to ask and the
    /// same for every replica sharing this store from then on.
    async fn upload_token_key(&self) -> Result<Vec<u8>, StoreError>;

    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    // --- Events (the outbox, [`crate::events`]) -----------------------------------------
    //
    // Every method above that changes a session whose record has `outbox_keep_ms` records
    // the event of the change in the same atomic step: `create_session` (session.created),
    // `register_file` (file.registered), `finish_complete` (file.completed, once),
    // `abort_file` (file.deleted, once), `finalize` (session.finalized),
    // `abort_session` (session.deleted, once), and whichever call first finds the session
    // past expiry (session.expired). `create_session` also puts the session in its
    // tenant's outbox index, due at once.

    /// Sessions of `tenant` in the outbox index due at `now_ms`, claimed for `lease_ms` (as
    /// [`SessionStore::claim_expired`] does for the reaper): at most `limit` session ids.
    async fn claim_event_sessions(
        &self,
        tenant: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// Ends a claim of [`SessionStore::claim_event_sessions`] (score `claimed_until`):
    /// the session is looked at again at `next_ms`, or leaves the index (`None`). Left as
    /// it is when the entry no longer carries the claim's score.
    async fn event_session_done(
        &self,
        tenant: &str,
        session_id: &str,
        claimed_until: i64,
        next_ms: Option<i64>,
    ) -> Result<(), StoreError>;

    /// The session's pending events due at `now_ms` (at most `limit`, oldest first), each
    /// leased until `now_ms + lease_ms`. No gate: events outlive their session.
    async fn claim_events(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<ClaimedEvents, StoreError>;

    /// Records an attempt at pending event `sequence`: its new delivery state and what
    /// follows. Ignored when the event is no longer pending.
    async fn event_attempted(
        &self,
        tenant: &str,
        session_id: &str,
        sequence: u64,
        delivery: &crate::events::Delivery,
        outcome: Attempted,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Events of `tenant`, pending (`failed` false) or dead-lettered, ordered by session id
    /// then sequence, after `after` (a session id and sequence), at most `limit`. A
    /// session found with no dead letter left (all retried, or run out) for a minute before
    /// `now_ms` is dropped from the tenant's dead-letter index on the way.
    async fn list_events(
        &self,
        tenant: &str,
        failed: bool,
        after: Option<(&str, u64)>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<crate::events::StoredEvent>, StoreError>;

    /// Makes dead-lettered event `sequence` pending again, due at `now_ms`, with a new
    /// retry window. False when there is no such dead-lettered event.
    async fn retry_event(
        &self,
        tenant: &str,
        session_id: &str,
        sequence: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
}
