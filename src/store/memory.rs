//! The embedded session store: everything in one process behind one mutex per store.
//!
//! This is the reference implementation of the semantics documented on
//! [`SessionStore`]; the Redis store's Lua scripts mirror it step by step. Critical sections
//! are short (no I/O while the lock is held), so a plain `std::sync::Mutex` is right here.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    Attempted, BeginComplete, ClaimedEvents, Cleanup, ExpiredInfo, FileAborted, Finalized, Gate,
    Page, Reaped, Registered, SessionAborted, SessionStore, SessionView, StoreError, TailOp,
    TusAdvance, TusAdvanced, TusBegin, TusBegun, TusState, UploadIdSet,
};
use crate::events::{Delivery, EventStatus, EventType, StoredEvent};
use crate::model::{
    part_count, part_size_for, FileRecord, FileStatus, PartRecord, SessionRecord, SessionStatus,
};

#[derive(Debug)]
struct FileEntry {
    file: FileRecord,
    /// Registration sequence number (the key of `SessionEntry::order`).
    seq: u64,
    parts: BTreeMap<u32, PartRecord>,
    lease: Option<(String, i64)>,
    tus: Tus,
}

/// A file's tus state: offset, deferred length, PATCH lock, tail bytes.
#[derive(Debug, Default)]
struct Tus {
    offset: u64,
    deferred: bool,
    lock: Option<(String, i64)>,
    tail: Vec<u8>,
}

impl Tus {
    fn state(&self) -> TusState {
        TusState {
            offset: self.offset,
            deferred: self.deferred,
            locked_until: self.lock.as_ref().map(|(_, until)| *until),
        }
    }
}

#[derive(Debug)]
struct SessionEntry {
    session: SessionRecord,
    /// Registration sequence number → file id, of the files not deleted.
    order: BTreeMap<u64, String>,
    /// The last sequence number given out.
    seq: u64,
    files: HashMap<String, FileEntry>,
    /// fileKey → fileId of live files.
    keys: HashMap<String, String>,
    /// Queued storage cleanups, by file id.
    cleanup: BTreeMap<String, Cleanup>,
}

impl SessionEntry {
    /// A page of the listed files and the next page's cursor (the sequence number of the
    /// page's last file, when more follow).
    fn page(&self, page: Page) -> (Vec<FileRecord>, Option<u64>) {
        let from = page.after.map_or(Bound::Unbounded, Bound::Excluded);
        let limit = page.limit();
        let mut listed = self.order.range((from, Bound::Unbounded));
        let taken: Vec<(u64, FileRecord)> = listed
            .by_ref()
            .take(limit)
            .filter_map(|(seq, id)| self.files.get(id).map(|f| (*seq, f.file.clone())))
            .collect();
        let next = match listed.next() {
            Some(_) => taken.last().map(|(seq, _)| *seq),
            None => None,
        };
        (taken.into_iter().map(|(_, f)| f).collect(), next)
    }

    fn queued(&self) -> Vec<Cleanup> {
        self.cleanup.values().cloned().collect()
    }
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<(String, String), SessionEntry>,
    /// (tenant, session) → time (ms) at which the reaper may take it.
    reap_index: HashMap<(String, String), i64>,
    /// tenant → live session → its expiry (ms).
    live: HashMap<String, HashMap<String, i64>>,
    /// (tenant, session) → its events (kept after the session is gone).
    outboxes: HashMap<(String, String), Outbox>,
    /// tenant → session → when the delivery worker looks at it (ms).
    event_index: HashMap<String, HashMap<String, i64>>,
}

/// A session's events.
#[derive(Debug, Default)]
struct Outbox {
    /// The last sequence number given out.
    seq: u64,
    events: BTreeMap<u64, StoredEvent>,
    /// Forgotten at this time (ms): its last event's time plus the session's
    /// `outbox_keep_ms`.
    keep_until: i64,
}

/// Records event `kind` of `session` (its state after the change) when the session has an
/// outbox (its tenant had webhooks when it was created).
fn record(
    outboxes: &mut HashMap<(String, String), Outbox>,
    session: &SessionRecord,
    kind: EventType,
    file: Option<FileRecord>,
    now_ms: i64,
) {
    let Some(keep) = session.outbox_keep_ms else {
        return;
    };
    let ob = outboxes
        .entry(key(&session.tenant, &session.id))
        .or_default();
    ob.seq += 1;
    ob.keep_until = now_ms.saturating_add(keep);
    ob.events.insert(
        ob.seq,
        StoredEvent {
            sequence: ob.seq,
            kind,
            at_ms: now_ms,
            session: session.clone(),
            file,
            delivery: Delivery {
                window_start_ms: now_ms,
                ..Delivery::default()
            },
            status: EventStatus::Pending(now_ms),
        },
    );
}

/// In-memory [`SessionStore`]. State is lost on restart and not shared between replicas.
///
/// ```
/// let store = upgate::store::memory::MemoryStore::new(std::time::Duration::from_secs(3600));
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    retention_ms: i64,
    token_key: [u8; crate::tokens::KEY_LEN],
}

impl MemoryStore {
    /// A store that forgets a session `retention` after its `expires_at`.
    pub fn new(retention: std::time::Duration) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            token_key: crate::tokens::random_key(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change (every
        // mutation below is a few field writes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops sessions whose retention has passed, and outboxes past theirs (called
    /// opportunistically).
    fn evict(&self, inner: &mut Inner, now_ms: i64) {
        let retention = self.retention_ms;
        inner.sessions.retain(|_, e| {
            now_ms
                < e.session
                    .expires_at
                    .saturating_mul(1000)
                    .saturating_add(retention)
        });
        inner.outboxes.retain(|_, ob| now_ms < ob.keep_until);
    }
}

fn key(tenant: &str, session_id: &str) -> (String, String) {
    (tenant.to_owned(), session_id.to_owned())
}

/// The common gate: exists, not expired (flipping `active` → `expired` once), optionally active.
fn gate<'a>(
    inner: &'a mut Inner,
    tenant: &str,
    session_id: &str,
    require_active: bool,
    now_ms: i64,
) -> Result<&'a mut SessionEntry, Gate<()>> {
    let Some(entry) = inner.sessions.get_mut(&key(tenant, session_id)) else {
        return Err(Gate::SessionNotFound);
    };
    if entry.session.is_past_expiry(now_ms) {
        let first = entry.session.status == SessionStatus::Active;
        if first {
            entry.session.status = SessionStatus::Expired;
        }
        let session = entry.session.clone();
        if first {
            record(
                &mut inner.outboxes,
                &session,
                EventType::SessionExpired,
                None,
                now_ms,
            );
        }
        return Err(Gate::Expired(Box::new(ExpiredInfo {
            session,
            first_observation: first,
        })));
    }
    if require_active && entry.session.status != SessionStatus::Active {
        return Err(Gate::NotActive(entry.session.status));
    }
    Ok(entry)
}

/// A `completing` file whose lease has not run out: storage may be assembling it now.
fn completion_in_flight(f: &FileEntry, now_ms: i64) -> bool {
    f.file.status == FileStatus::Completing && f.lease.as_ref().is_some_and(|(_, u)| *u > now_ms)
}

/// The bookkeeping of aborting the live file `before`: frees its fileKey and count slot
/// and, when it has storage state, queues its cleanup (returned).
fn abort_live(entry: &mut SessionEntry, before: &FileRecord) -> Option<Cleanup> {
    entry.keys.remove(&before.file_key);
    entry.session.file_count = entry.session.file_count.saturating_sub(1);
    let queue = before.upload_id.is_some() || before.status == FileStatus::Completed;
    queue.then(|| {
        let c = Cleanup::from(before);
        entry.cleanup.insert(before.id.clone(), c.clone());
        c
    })
}

fn regate<T>(g: Gate<()>) -> Gate<T> {
    match g {
        Gate::Ok(()) | Gate::SessionNotFound => Gate::SessionNotFound,
        Gate::FileNotFound => Gate::FileNotFound,
        Gate::Expired(e) => Gate::Expired(e),
        Gate::NotActive(s) => Gate::NotActive(s),
    }
}

macro_rules! gate_or_return {
    ($inner:expr, $tenant:expr, $sid:expr, $active:expr, $now:expr) => {
        match gate($inner, $tenant, $sid, $active, $now) {
            Ok(entry) => entry,
            Err(g) => return Ok(regate(g)),
        }
    };
}

macro_rules! file_or_return {
    ($entry:expr, $fid:expr) => {
        match $entry.files.get_mut($fid) {
            Some(f) => f,
            None => return Ok(Gate::FileNotFound),
        }
    };
}

impl MemoryStore {
    /// `register_file`, as a tus upload of unknown length when `deferred`; with the
    /// session's `expires_at` (0 unless created).
    fn register(
        &self,
        tenant: &str,
        file: &FileRecord,
        deferred: bool,
        now_ms: i64,
    ) -> Result<Gate<(Registered, i64)>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, &file.session_id, true, now_ms);
        if let Some(max) = entry
            .session
            .max_file_size_bytes
            .filter(|max| file.size_bytes > *max)
        {
            return Ok(Gate::Ok((Registered::TooLarge(max), 0)));
        }
        if let Some(allowed) = &entry.session.allowed_content_types {
            let limits = crate::jwt::Limits {
                allowed_content_types: Some(allowed.clone()),
                ..Default::default()
            };
            if !limits.allows_content_type(file.content_type.as_deref()) {
                return Ok(Gate::Ok((
                    Registered::ContentTypeNotAllowed(allowed.clone()),
                    0,
                )));
            }
        }
        if entry.keys.contains_key(&file.file_key) {
            return Ok(Gate::Ok((Registered::DuplicateKey, 0)));
        }
        if entry.session.file_count >= entry.session.file_limit {
            return Ok(Gate::Ok((
                Registered::CountExceeded {
                    file_limit: entry.session.file_limit,
                    file_count: entry.session.file_count,
                },
                0,
            )));
        }
        // The part size derives from the session's, whatever the caller assumed.
        let part_size_bytes = part_size_for(entry.session.part_size_bytes, file.size_bytes);
        let file = FileRecord {
            part_size_bytes,
            part_count: part_count(file.size_bytes, part_size_bytes),
            ..file.clone()
        };
        entry.session.file_count += 1;
        entry.keys.insert(file.file_key.clone(), file.id.clone());
        entry.seq += 1;
        entry.order.insert(entry.seq, file.id.clone());
        entry.files.insert(
            file.id.clone(),
            FileEntry {
                file: file.clone(),
                seq: entry.seq,
                parts: BTreeMap::new(),
                lease: None,
                tus: Tus {
                    deferred,
                    ..Tus::default()
                },
            },
        );
        let session = entry.session.clone();
        record(
            &mut inner.outboxes,
            &session,
            EventType::FileRegistered,
            Some(file.clone()),
            now_ms,
        );
        let expires_at = session.expires_at;
        Ok(Gate::Ok((Registered::Created(file), expires_at)))
    }
}

#[async_trait]
#[allow(clippy::too_many_arguments)]
impl SessionStore for MemoryStore {
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let now = session.created_at.saturating_mul(1000);
        self.evict(&mut inner, now);
        let k = key(&session.tenant, &session.id);
        inner
            .reap_index
            .insert(k.clone(), session.expires_at.saturating_mul(1000));
        inner.sessions.insert(
            k,
            SessionEntry {
                session: session.clone(),
                order: BTreeMap::new(),
                seq: 0,
                files: HashMap::new(),
                keys: HashMap::new(),
                cleanup: BTreeMap::new(),
            },
        );
        if session.outbox_keep_ms.is_some() {
            inner
                .event_index
                .entry(session.tenant.clone())
                .or_default()
                .insert(session.id.clone(), now);
            record(
                &mut inner.outboxes,
                session,
                EventType::SessionCreated,
                None,
                now,
            );
        }
        Ok(())
    }

    async fn get_session(
        &self,
        tenant: &str,
        session_id: &str,
        page: Page,
        now_ms: i64,
    ) -> Result<Gate<SessionView>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, false, now_ms);
        let (files, next_cursor) = entry.page(page);
        Ok(Gate::Ok(SessionView {
            session: entry.session.clone(),
            files,
            next_cursor,
        }))
    }

    async fn session_deadline(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .sessions
            .get(&key(tenant, session_id))
            .map(|e| (e.session.expires_at, e.session.created_at)))
    }

    async fn session_owner(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<Option<String>>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .sessions
            .get(&key(tenant, session_id))
            .map(|e| e.session.owner.clone()))
    }

    async fn register_file(
        &self,
        tenant: &str,
        file: &FileRecord,
        now_ms: i64,
    ) -> Result<Gate<Registered>, StoreError> {
        self.register(tenant, file, false, now_ms)
            .map(|g| g.map(|(r, _)| r))
    }

    async fn register_tus_file(
        &self,
        tenant: &str,
        file: &FileRecord,
        deferred: bool,
        now_ms: i64,
    ) -> Result<Gate<(Registered, i64)>, StoreError> {
        self.register(tenant, file, deferred, now_ms)
    }

    async fn tus_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<(FileRecord, TusState)>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, false, now_ms);
        let f = file_or_return!(entry, file_id);
        let mut state = f.tus.state();
        state.locked_until = state.locked_until.filter(|until| *until > now_ms);
        Ok(Gate::Ok((f.file.clone(), state)))
    }

    async fn tus_begin(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: &TusBegin<'_>,
        now_ms: i64,
    ) -> Result<Gate<TusBegun>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, true, now_ms);
        let f = file_or_return!(entry, file_id);
        if f.file.status != FileStatus::Registered {
            return Ok(Gate::Ok(TusBegun::NotOpen(f.file.clone())));
        }
        if matches!(&f.tus.lock, Some((token, until)) if token != req.token && *until > now_ms) {
            return Ok(Gate::Ok(TusBegun::Locked));
        }
        if f.tus.offset != req.offset {
            return Ok(Gate::Ok(TusBegun::OffsetMismatch(f.tus.offset)));
        }
        f.tus.lock = Some((req.token.to_owned(), now_ms.saturating_add(req.lease_ms)));
        Ok(Gate::Ok(TusBegun::Held(f.file.clone(), f.tus.state())))
    }

    async fn tus_advance(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: &TusAdvance<'_>,
        now_ms: i64,
    ) -> Result<Gate<TusAdvanced>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, true, now_ms);
        let f = file_or_return!(entry, file_id);
        if f.file.status != FileStatus::Registered {
            return Ok(Gate::Ok(TusAdvanced::NotOpen(f.file.clone())));
        }
        let held = matches!(&f.tus.lock, Some((token, _)) if token == req.token);
        if !held || f.tus.offset != req.from || f.tus.tail.len() as u64 != req.tail_len {
            return Ok(Gate::Ok(TusAdvanced::Lost));
        }
        for part in req.parts {
            f.parts.insert(part.part_number, part.clone());
        }
        match req.tail {
            TailOp::Keep => {}
            TailOp::Append(bytes) => f.tus.tail.extend_from_slice(bytes),
            TailOp::Set(bytes) => f.tus.tail = bytes.to_vec(),
        }
        if let Some((size, count)) = req.length {
            f.file.size_bytes = size;
            f.file.part_count = count;
            f.tus.deferred = false;
        }
        f.tus.offset = req.to;
        f.tus.lock = Some((req.token.to_owned(), now_ms.saturating_add(req.lease_ms)));
        Ok(Gate::Ok(TusAdvanced::Done))
    }

    async fn tus_tail(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<Vec<u8>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .sessions
            .get(&key(tenant, session_id))
            .and_then(|e| e.files.get(file_id))
            .map(|f| f.tus.tail.clone())
            .unwrap_or_default())
    }

    async fn tus_release(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(f) = inner
            .sessions
            .get_mut(&key(tenant, session_id))
            .and_then(|e| e.files.get_mut(file_id))
        {
            if matches!(&f.tus.lock, Some((t, _)) if t == token) {
                f.tus.lock = None;
            }
        }
        Ok(())
    }

    async fn get_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        require_active: bool,
        now_ms: i64,
    ) -> Result<Gate<FileRecord>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, require_active, now_ms);
        let f = file_or_return!(entry, file_id);
        Ok(Gate::Ok(f.file.clone()))
    }

    async fn set_upload_id(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<Gate<UploadIdSet>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, true, now_ms);
        let f = file_or_return!(entry, file_id);
        if !matches!(
            f.file.status,
            FileStatus::Registered | FileStatus::Completing
        ) {
            return Ok(Gate::Ok(UploadIdSet::FileNotOpen(f.file.clone())));
        }
        if let Some(existing) = &f.file.upload_id {
            return Ok(Gate::Ok(UploadIdSet::Existing(existing.clone())));
        }
        f.file.upload_id = Some(upload_id.to_owned());
        Ok(Gate::Ok(UploadIdSet::Stored))
    }

    async fn record_part(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        part: &PartRecord,
        now_ms: i64,
    ) -> Result<Gate<FileRecord>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, true, now_ms);
        let f = file_or_return!(entry, file_id);
        if f.file.status == FileStatus::Registered {
            f.parts.insert(part.part_number, part.clone());
        }
        Ok(Gate::Ok(f.file.clone()))
    }

    async fn list_parts(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<Vec<PartRecord>>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, false, now_ms);
        let f = file_or_return!(entry, file_id);
        Ok(Gate::Ok(f.parts.values().cloned().collect()))
    }

    async fn begin_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Gate<BeginComplete>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, false, now_ms);
        let status = entry.session.status;
        let f = file_or_return!(entry, file_id);
        match f.file.status {
            FileStatus::Completed => {
                return Ok(Gate::Ok(BeginComplete::AlreadyCompleted(f.file.clone())))
            }
            FileStatus::Aborted => return Ok(Gate::Ok(BeginComplete::Aborted)),
            _ => {}
        }
        if status != SessionStatus::Active {
            return Ok(Gate::NotActive(status));
        }
        if f.file.status == FileStatus::Completing {
            if let Some((_, until)) = &f.lease {
                if *until > now_ms {
                    return Ok(Gate::Ok(BeginComplete::InProgress));
                }
            }
        }
        f.file.status = FileStatus::Completing;
        f.lease = Some((token.to_owned(), now_ms.saturating_add(lease_ms)));
        Ok(Gate::Ok(BeginComplete::Acquired(
            f.file.clone(),
            f.parts.values().cloned().collect(),
        )))
    }

    async fn finish_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        file_url: &str,
        etag: &str,
        now_ms: i64,
    ) -> Result<Gate<Option<FileRecord>>, StoreError> {
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get_mut(&key(tenant, session_id)) else {
            return Ok(Gate::SessionNotFound);
        };
        let f = file_or_return!(entry, file_id);
        if f.file.status == FileStatus::Completed {
            return Ok(Gate::Ok(Some(f.file.clone())));
        }
        let holds = f.file.status == FileStatus::Completing
            && f.lease.as_ref().is_some_and(|(t, _)| t == token);
        if !holds {
            return Ok(Gate::Ok(None));
        }
        f.file.status = FileStatus::Completed;
        f.file.file_url = Some(file_url.to_owned());
        f.file.etag = Some(etag.to_owned());
        f.lease = None;
        let file = f.file.clone();
        let session = entry.session.clone();
        record(
            &mut inner.outboxes,
            &session,
            EventType::FileCompleted,
            Some(file.clone()),
            now_ms,
        );
        Ok(Gate::Ok(Some(file)))
    }

    async fn renew_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(f) = inner
            .sessions
            .get_mut(&key(tenant, session_id))
            .and_then(|e| e.files.get_mut(file_id))
        else {
            return Ok(false);
        };
        match &mut f.lease {
            Some((t, until)) if f.file.status == FileStatus::Completing && t == token => {
                *until = now_ms.saturating_add(lease_ms);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(f) = inner
            .sessions
            .get_mut(&key(tenant, session_id))
            .and_then(|e| e.files.get_mut(file_id))
        {
            if f.file.status == FileStatus::Completing
                && f.lease.as_ref().is_some_and(|(t, _)| t == token)
            {
                f.file.status = FileStatus::Registered;
                f.lease = None;
            }
        }
        Ok(())
    }

    async fn abort_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<FileAborted>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, true, now_ms);
        let Some(f) = entry.files.get(file_id) else {
            return Ok(match entry.cleanup.get(file_id) {
                Some(c) => Gate::Ok(FileAborted::Deleted {
                    cleanup: Some(c.clone()),
                }),
                None => Gate::FileNotFound,
            });
        };
        if completion_in_flight(f, now_ms) {
            return Ok(Gate::Ok(FileAborted::CompletionInProgress));
        }
        // The gate required an active session, and only a session abort marks files
        // aborted (the session with them), so the file is live here.
        let (before, seq) = (f.file.clone(), f.seq);
        entry.files.remove(file_id);
        entry.order.remove(&seq);
        let cleanup = abort_live(entry, &before);
        let session = entry.session.clone();
        record(
            &mut inner.outboxes,
            &session,
            EventType::FileDeleted,
            Some(crate::events::deleted_view(before)),
            now_ms,
        );
        Ok(Gate::Ok(FileAborted::Deleted { cleanup }))
    }

    async fn abort_session(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<Gate<SessionAborted>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, false, now_ms);
        match entry.session.status {
            SessionStatus::Finalized if !entry.cleanup.is_empty() => {
                return Ok(Gate::Ok(SessionAborted::CleanupFirst(entry.queued())));
            }
            SessionStatus::Finalized => {
                let session = entry.session.clone();
                inner.sessions.remove(&key(tenant, session_id));
                record(
                    &mut inner.outboxes,
                    &session,
                    EventType::SessionDeleted,
                    None,
                    now_ms,
                );
                return Ok(Gate::Ok(SessionAborted::Forgotten));
            }
            SessionStatus::Aborted => {}
            _ => {
                if entry
                    .files
                    .values()
                    .any(|f| completion_in_flight(f, now_ms))
                {
                    return Ok(Gate::Ok(SessionAborted::CompletionInProgress));
                }
                entry.session.status = SessionStatus::Aborted;
                for id in entry.order.values().cloned().collect::<Vec<_>>() {
                    let Some(f) = entry.files.get_mut(&id) else {
                        continue;
                    };
                    if f.file.status == FileStatus::Aborted {
                        continue;
                    }
                    let before = f.file.clone();
                    f.file.status = FileStatus::Aborted;
                    f.lease = None;
                    abort_live(entry, &before);
                }
                let (session, queued) = (entry.session.clone(), entry.queued());
                record(
                    &mut inner.outboxes,
                    &session,
                    EventType::SessionDeleted,
                    None,
                    now_ms,
                );
                return Ok(Gate::Ok(SessionAborted::Aborted(queued)));
            }
        }
        Ok(Gate::Ok(SessionAborted::Aborted(entry.queued())))
    }

    async fn cleanup_done(
        &self,
        tenant: &str,
        session_id: &str,
        file_ids: &[String],
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(entry) = inner.sessions.get_mut(&key(tenant, session_id)) {
            for id in file_ids {
                entry.cleanup.remove(id);
            }
        }
        Ok(())
    }

    async fn schedule_reap(
        &self,
        tenant: &str,
        session_id: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let due = inner
            .reap_index
            .entry(key(tenant, session_id))
            .or_insert(at_ms);
        *due = (*due).min(at_ms);
        Ok(())
    }

    async fn finalize(
        &self,
        tenant: &str,
        session_id: &str,
        checked: &[String],
        now_ms: i64,
    ) -> Result<Gate<Finalized>, StoreError> {
        let mut inner = self.lock();
        let entry = gate_or_return!(&mut inner, tenant, session_id, true, now_ms);
        let live = || entry.order.values().filter_map(|id| entry.files.get(id));
        let incomplete: Vec<String> = live()
            .filter(|f| {
                matches!(
                    f.file.status,
                    FileStatus::Registered | FileStatus::Completing
                )
            })
            .map(|f| f.file.id.clone())
            .collect();
        if !incomplete.is_empty() {
            return Ok(Gate::Ok(Finalized::Incomplete(incomplete)));
        }
        let unchecked: Vec<String> = live()
            .filter(|f| f.file.status == FileStatus::Completed && !checked.contains(&f.file.id))
            .map(|f| f.file.id.clone())
            .collect();
        if !unchecked.is_empty() {
            return Ok(Gate::Ok(Finalized::Unchecked(unchecked)));
        }
        entry.session.status = SessionStatus::Finalized;
        let (files, next_cursor) = entry.page(Page::FIRST);
        let session = entry.session.clone();
        record(
            &mut inner.outboxes,
            &session,
            EventType::SessionFinalized,
            None,
            now_ms,
        );
        Ok(Gate::Ok(Finalized::Done(SessionView {
            session,
            files,
            next_cursor,
        })))
    }

    async fn claim_expired(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut inner = self.lock();
        self.evict(&mut inner, now_ms);
        let mut due: Vec<((String, String), i64)> = inner
            .reap_index
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(k, at)| (k.clone(), *at))
            .collect();
        due.sort_by_key(|(_, at)| *at);
        due.truncate(limit);
        for (k, _) in &due {
            inner
                .reap_index
                .insert(k.clone(), now_ms.saturating_add(lease_ms));
        }
        Ok(due.into_iter().map(|(k, _)| k).collect())
    }

    async fn reap(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<Option<Reaped>, StoreError> {
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get_mut(&key(tenant, session_id)) else {
            return Ok(None);
        };
        let past = entry.session.is_past_expiry(now_ms);
        let first = entry.session.status == SessionStatus::Active && past;
        if first {
            entry.session.status = SessionStatus::Expired;
        }
        let mut open_uploads = Vec::new();
        let mut busy_until: Option<i64> = None;
        if past {
            for f in entry.order.values().filter_map(|id| entry.files.get(id)) {
                if completion_in_flight(f, now_ms) {
                    let until = f.lease.as_ref().map_or(now_ms, |(_, u)| *u);
                    busy_until = Some(busy_until.map_or(until, |b| b.min(until)));
                } else if matches!(
                    f.file.status,
                    FileStatus::Registered | FileStatus::Completing
                ) && f.file.upload_id.is_some()
                {
                    open_uploads.push(f.file.clone());
                }
            }
        }
        let cleanup = entry.queued();
        let session = entry.session.clone();
        if first {
            record(
                &mut inner.outboxes,
                &session,
                EventType::SessionExpired,
                None,
                now_ms,
            );
        }
        Ok(Some(Reaped {
            session,
            first_observation: first,
            open_uploads,
            cleanup,
            busy_until,
        }))
    }

    async fn reap_done(
        &self,
        tenant: &str,
        session_id: &str,
        claimed_until: i64,
        next_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let k = key(tenant, session_id);
        if inner.reap_index.get(&k) != Some(&claimed_until) {
            return Ok(());
        }
        match next_ms {
            Some(at) => inner.reap_index.insert(k, at),
            None => inner.reap_index.remove(&k),
        };
        Ok(())
    }

    async fn reserve_live(
        &self,
        tenant: &str,
        session_id: &str,
        expires_at_ms: i64,
        limit: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let live = inner.live.entry(tenant.to_owned()).or_default();
        live.retain(|_, until| *until > now_ms);
        if live.contains_key(session_id) {
            return Ok(true);
        }
        if live.len() as u64 >= limit {
            return Ok(false);
        }
        live.insert(session_id.to_owned(), expires_at_ms);
        Ok(true)
    }

    async fn release_live(&self, tenant: &str, session_id: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(live) = inner.live.get_mut(tenant) {
            live.remove(session_id);
            if live.is_empty() {
                inner.live.remove(tenant);
            }
        }
        Ok(())
    }

    async fn claim_event_sessions(
        &self,
        tenant: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut inner = self.lock();
        self.evict(&mut inner, now_ms);
        let Some(index) = inner.event_index.get_mut(tenant) else {
            return Ok(Vec::new());
        };
        let mut due: Vec<(String, i64)> = index
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(s, at)| (s.clone(), *at))
            .collect();
        due.sort_by_key(|(_, at)| *at);
        due.truncate(limit);
        for (s, _) in &due {
            index.insert(s.clone(), now_ms.saturating_add(lease_ms));
        }
        Ok(due.into_iter().map(|(s, _)| s).collect())
    }

    async fn event_session_done(
        &self,
        tenant: &str,
        session_id: &str,
        claimed_until: i64,
        next_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(index) = inner.event_index.get_mut(tenant) else {
            return Ok(());
        };
        if index.get(session_id) != Some(&claimed_until) {
            return Ok(());
        }
        match next_ms {
            Some(at) => {
                index.insert(session_id.to_owned(), at);
            }
            None => {
                index.remove(session_id);
            }
        }
        Ok(())
    }

    async fn claim_events(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<ClaimedEvents, StoreError> {
        let mut inner = self.lock();
        self.evict(&mut inner, now_ms);
        let k = key(tenant, session_id);
        let session_gone = !inner.sessions.contains_key(&k);
        let Some(ob) = inner.outboxes.get_mut(&k) else {
            return Ok(ClaimedEvents {
                drained: session_gone,
                ..ClaimedEvents::default()
            });
        };
        let lease_end = now_ms.saturating_add(lease_ms);
        let mut out = ClaimedEvents::default();
        for e in ob.events.values_mut() {
            let EventStatus::Pending(due) = e.status else {
                continue;
            };
            if due <= now_ms && out.events.len() < limit {
                e.status = EventStatus::Pending(lease_end);
                out.events.push(e.clone());
            }
        }
        for e in ob.events.values() {
            if let EventStatus::Pending(due) = e.status {
                out.pending += 1;
                out.next_due_ms = Some(out.next_due_ms.map_or(due, |d: i64| d.min(due)));
            }
        }
        out.drained = session_gone && out.pending == 0;
        Ok(out)
    }

    async fn event_attempted(
        &self,
        tenant: &str,
        session_id: &str,
        sequence: u64,
        delivery: &Delivery,
        outcome: Attempted,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(ob) = inner.outboxes.get_mut(&key(tenant, session_id)) else {
            return Ok(());
        };
        let Some(e) = ob.events.get_mut(&sequence) else {
            return Ok(());
        };
        if !matches!(e.status, EventStatus::Pending(_)) {
            return Ok(());
        }
        e.delivery = delivery.clone();
        match outcome {
            Attempted::Delivered => {
                ob.events.remove(&sequence);
            }
            Attempted::RetryAt(at) => e.status = EventStatus::Pending(at),
            Attempted::Dead => e.status = EventStatus::Failed(now_ms),
        }
        Ok(())
    }

    async fn list_events(
        &self,
        tenant: &str,
        failed: bool,
        after: Option<(&str, u64)>,
        limit: usize,
        _now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let inner = self.lock();
        // As on Redis: pending events are found through the outbox index (a session leaves
        // it once drained), dead letters through every outbox.
        let indexed = inner.event_index.get(tenant);
        let mut sessions: Vec<&String> = inner
            .outboxes
            .keys()
            .filter(|(t, s)| t == tenant && (failed || indexed.is_some_and(|i| i.contains_key(s))))
            .map(|(_, s)| s)
            .collect();
        sessions.sort();
        let mut out = Vec::new();
        for s in sessions {
            if after.is_some_and(|(a, _)| s.as_str() < a) {
                continue;
            }
            let Some(ob) = inner.outboxes.get(&key(tenant, s)) else {
                continue;
            };
            for e in ob.events.values() {
                if after.is_some_and(|(a, seq)| s == a && e.sequence <= seq) {
                    continue;
                }
                if matches!(e.status, EventStatus::Failed(_)) != failed {
                    continue;
                }
                if out.len() == limit {
                    return Ok(out);
                }
                out.push(e.clone());
            }
        }
        Ok(out)
    }

    async fn retry_event(
        &self,
        tenant: &str,
        session_id: &str,
        sequence: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let k = key(tenant, session_id);
        let Some(e) = inner
            .outboxes
            .get_mut(&k)
            .and_then(|ob| ob.events.get_mut(&sequence))
        else {
            return Ok(false);
        };
        if !matches!(e.status, EventStatus::Failed(_)) {
            return Ok(false);
        }
        e.status = EventStatus::Pending(now_ms);
        e.delivery.window_start_ms = now_ms;
        inner
            .event_index
            .entry(tenant.to_owned())
            .or_default()
            .insert(session_id.to_owned(), now_ms);
        Ok(true)
    }

    async fn upload_token_key(&self) -> Result<Vec<u8>, StoreError> {
        Ok(self.token_key.to_vec())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
