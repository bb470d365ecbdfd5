//! Completion: one caller per file assembles the object, under a lease it renews and a drop
//! guard gives back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::finalize::SNIFF_BYTES;
use super::{ms, open_gate, Uploads};
use crate::error::AppError;
use crate::model::{expected_part_len, now_ms, FileRecord, PartRecord};
use crate::storage::{PartBody, StorageError, StorageKind, MAX_REWRITE_BYTES};
use crate::store::{BeginComplete, SessionStore};

/// Longest pause between two looks at a file another caller is completing.
const COMPLETE_POLL_MAX: Duration = Duration::from_millis(250);
/// Completes of one file that may wait on this replica at once; more answer 409 at once.
/// With [`COMPLETE_POLL_MAX`] this bounds the store calls the waiters of one file make.
const MAX_WAITERS_PER_FILE: usize = 64;

/// The completes of this replica waiting on another caller's completion, per file.
#[derive(Debug, Default)]
pub struct Waiters(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl Waiters {
    /// A place among the waiters of `file_id`, or `None` when [`MAX_WAITERS_PER_FILE`]
    /// wait already. The place is given back when the guard drops (a cancelled request
    /// included); a file nobody waits on has no entry.
    fn join(self: &Arc<Self>, file_id: &str) -> Option<WaiterGuard> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(file_id.to_owned()).or_insert(0);
        if *n >= MAX_WAITERS_PER_FILE {
            return None;
        }
        *n += 1;
        Some(WaiterGuard {
            waiters: self.clone(),
            file_id: file_id.to_owned(),
        })
    }

    /// Files with waiters right now.
    pub fn files(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

struct WaiterGuard {
    waiters: Arc<Waiters>,
    file_id: String,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let mut map = self
            .waiters
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.file_id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.file_id);
            }
        }
    }
}

/// A held completion lease, owned by the completion's own task. While it lives, a task
/// renews it every `renew`; it stops when the lease is lost (taken over, file aborted).
/// Dropped without [`Lease::finished`] (the completion task panicked or was cancelled), it
/// gives the lease back in the background, so the file is completable again at once; at
/// runtime shutdown nothing can run any more, and the lease runs out by itself.
pub(super) struct Lease {
    store: Arc<dyn SessionStore>,
    ids: Arc<(String, String, String, String)>,
    renewer: tokio::task::JoinHandle<()>,
    armed: bool,
}

impl Lease {
    pub(super) fn hold(
        store: Arc<dyn SessionStore>,
        ids: (String, String, String, String),
        lease: Duration,
        renew: Duration,
    ) -> Lease {
        let ids = Arc::new(ids);
        let renewer = tokio::spawn({
            let store = store.clone();
            let ids = ids.clone();
            async move {
                let (tenant, session, file, token) = &*ids;
                loop {
                    tokio::time::sleep(renew).await;
                    match store
                        .renew_complete(tenant, session, file, token, ms(lease), now_ms())
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(file_id = %file, "completion lease lost while storage was completing");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(file_id = %file, error = %e, "renewing the completion lease failed; trying again")
                        }
                    }
                }
            }
        });
        Lease {
            store,
            ids,
            renewer,
            armed: true,
        }
    }

    /// Storage is done: stop renewing; the store call that follows settles the lease.
    pub(super) fn finished(mut self) {
        self.renewer.abort();
        self.armed = false;
    }

    /// Gives the lease back now (the completion failed; the next attempt may start at once).
    pub(super) async fn release(mut self) {
        self.renewer.abort();
        self.armed = false;
        let (tenant, session, file, token) = &*self.ids;
        if let Err(e) = self
            .store
            .release_complete(tenant, session, file, token)
            .await
        {
            tracing::warn!(error = %e, "releasing the completion lease failed; it runs out by itself");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let ids = self.ids.clone();
        rt.spawn(async move {
            let (tenant, session, file, token) = &*ids;
            match store.release_complete(tenant, session, file, token).await {
                Ok(()) => tracing::info!(file_id = %file, "completion cancelled: lease given back"),
                Err(e) => {
                    tracing::warn!(file_id = %file, error = %e, "giving back a cancelled completion's lease failed; it runs out by itself")
                }
            }
        });
    }
}

/// Why the storage side of a completion failed, and whether storage may still complete it.
struct Failure {
    error: AppError,
    /// The `CompleteMultipartUpload` request may have reached storage (a timeout, a cut
    /// connection, a 5xx): the object may still appear.
    maybe_applied: bool,
}

impl From<AppError> for Failure {
    fn from(error: AppError) -> Self {
        Failure {
            error,
            maybe_applied: false,
        }
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        AppError::from(e).into()
    }
}

impl Uploads {
    /// Completes a file (`body` is the request's JSON: an optional client part list).
    ///
    /// Idempotent: a completed file is answered with its stored result. Concurrent callers:
    /// one takes the lease and completes in storage; the others wait up to
    /// [`super::Timing::complete_wait`] for its result, then get 409 `requestInProgress`.
    ///
    /// An Uppy file (`super::uppy`) is not completed here: its bytes bypass the REST
    /// routes' rules, and [`Uploads::uppy_complete`] checks them first (404 here, as for
    /// its parts and presigns).
    pub async fn complete(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        body: &serde_json::Value,
    ) -> Result<FileRecord, AppError> {
        self.complete_checked(tenant, session_id, file_id, body, false)
            .await
    }

    /// [`Uploads::complete`]; `uppy` when the caller has checked an Uppy file's parts.
    pub(super) async fn complete_checked(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        body: &serde_json::Value,
        uppy: bool,
    ) -> Result<FileRecord, AppError> {
        let token = crate::api::new_id();
        let deadline = tokio::time::Instant::now() + self.timing.complete_wait;
        let mut backoff = Duration::from_millis(5);
        let mut waiting: Option<WaiterGuard> = None;
        let mut waited = false;
        loop {
            let now = now_ms();
            let gate = self
                .store
                .begin_complete(
                    tenant,
                    session_id,
                    file_id,
                    &token,
                    ms(self.timing.complete_lease),
                    now,
                )
                .await?;
            match open_gate(gate, tenant, now)? {
                BeginComplete::AlreadyCompleted(f) if !uppy && super::uppy::is_uppy(&f) => {
                    return Err(AppError::FileNotFound);
                }
                BeginComplete::Acquired(f, _) if !uppy && super::uppy::is_uppy(&f) => {
                    if let Err(e) = self
                        .store
                        .release_complete(tenant, session_id, file_id, &token)
                        .await
                    {
                        tracing::warn!(error = %e, "giving back the lease on an Uppy file failed; it runs out by itself");
                    }
                    return Err(AppError::FileNotFound);
                }
                BeginComplete::AlreadyCompleted(f) => {
                    if !waited {
                        // Nothing was waited for: a repeated complete, not a concurrent one.
                        tracing::warn!(file_url = ?f.file_url, "file already completed: answering the idempotent re-completion with the stored result");
                    }
                    return Ok(f);
                }
                BeginComplete::Aborted => return Err(AppError::FileAborted),
                BeginComplete::InProgress => {
                    waited = true;
                    if waiting.is_none() {
                        waiting = Some(
                            self.waiters
                                .join(file_id)
                                .ok_or(AppError::CompletionInProgress)?,
                        );
                    }
                    if tokio::time::Instant::now() + backoff > deadline {
                        return Err(AppError::CompletionInProgress);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(COMPLETE_POLL_MAX);
                }
                BeginComplete::Acquired(file, recorded) => {
                    // The holder is no longer a waiter: its place goes to another caller.
                    waiting = None;
                    // The storage side runs in a task of its own, which the request awaits:
                    // a cancelled request (client gone, HTTP/2 reset) does not cut a storage
                    // completion halfway, so the lease is never given back while storage
                    // may still be assembling the object.
                    let this = Arc::clone(self);
                    let ids = (
                        tenant.to_owned(),
                        session_id.to_owned(),
                        file_id.to_owned(),
                        token.clone(),
                    );
                    let body = body.clone();
                    let task = tokio::spawn(
                        async move { this.complete_held(ids, file, recorded, &body).await }
                            .instrument(tracing::Span::current()),
                    );
                    let finished = task
                        .await
                        .map_err(|e| AppError::Internal(format!("completion task: {e}")))??;
                    match open_gate(finished, tenant, now)? {
                        Some(f) => return Ok(f),
                        // Our lease ran out and someone else took over: their result stands.
                        None => continue,
                    }
                }
            }
        }
    }

    /// The lease holder's part: assemble in storage, then record the completion.
    async fn complete_held(
        &self,
        ids: (String, String, String, String),
        file: FileRecord,
        recorded: Vec<PartRecord>,
        body: &serde_json::Value,
    ) -> Result<crate::store::Gate<Option<FileRecord>>, AppError> {
        let (tenant, session_id, file_id, token) = ids.clone();
        let lease = Lease::hold(
            self.store.clone(),
            ids,
            self.timing.complete_lease,
            self.timing.complete_renew,
        );
        let result = match crate::validate::complete_parts(body, file.part_count) {
            Ok(client) => {
                self.complete_in_storage(&tenant, &file, recorded, client)
                    .await
            }
            Err(e) => Err(e.into()),
        };
        let etag = match result {
            Ok(etag) => etag,
            Err(Failure {
                error,
                maybe_applied: false,
            }) => {
                lease.release().await;
                return Err(error);
            }
            Err(Failure {
                error,
                maybe_applied: true,
            }) => {
                // Storage may still finish assembling (a timeout, a cut connection): the
                // lease runs out by itself instead of being given back, so no `DELETE` or
                // reaper acts on the file before that; a retry then finds the object.
                lease.finished();
                return Err(error);
            }
        };
        let etag = self.give_detected_type(&tenant, &file, etag).await;
        lease.finished();
        let url = self.storage(&tenant).file_url(&file.object_key);
        // A failure here leaves the file `completing` until the lease runs out; the object
        // is whole, and the next complete finds it (`complete_in_storage`).
        let finished = self
            .store
            .finish_complete(
                &tenant,
                &session_id,
                &file_id,
                &token,
                &url,
                &etag,
                crate::model::now_ms(),
            )
            .await?;
        self.wake(&tenant, &session_id);
        if matches!(finished, crate::store::Gate::Ok(Some(_))) {
            self.metrics.files_completed.inc();
            tracing::info!(file_url = %url, "file completed");
        }
        Ok(finished)
    }

    /// A completed file whose type was not declared gets the one its first bytes show
    /// (`../shared/API.md` v1.1: declared, else detected, else `application/octet-stream`).
    /// S3 takes attributes only when an object is written, so this rewrites the object's
    /// attributes in place (one server-side CopyObject; no bytes pass through the gateway),
    /// for objects up to CopyObject's 5 GiB; larger ones keep S3's
    /// `application/octet-stream`. Returns the object's ETag, which the copy changes.
    ///
    /// Best effort: the object is whole either way, so a failure is logged and the
    /// completion stands.
    async fn give_detected_type(&self, tenant: &str, file: &FileRecord, etag: String) -> String {
        let storage = self.storage(tenant);
        if file.content_type.is_some()
            || file.size_bytes == 0
            || file.size_bytes > MAX_REWRITE_BYTES
            || storage.kind() != StorageKind::S3
        {
            return etag;
        }
        let head = match storage.read_head(&file.object_key, SNIFF_BYTES).await {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(error = %e, "reading the object's first bytes failed; its type stays application/octet-stream");
                return etag;
            }
        };
        let Some(detected) = infer::get(&head) else {
            return etag;
        };
        let attrs = self.attributes(tenant, file, Some(detected.mime_type()));
        match storage.replace_attributes(&file.object_key, &attrs).await {
            Ok(new_etag) => {
                tracing::debug!(
                    content_type = detected.mime_type(),
                    "object given its detected type"
                );
                new_etag
            }
            Err(e) => {
                tracing::warn!(error = %e, content_type = detected.mime_type(), "giving the object its detected type failed; it stays application/octet-stream");
                // The copy may have happened with its answer lost: the ETag is storage's.
                match storage.head_object(&file.object_key).await {
                    Ok(Some(info)) => info.etag,
                    _ => etag,
                }
            }
        }
    }

    /// The storage side of completion, run by the one caller holding the lease.
    async fn complete_in_storage(
        &self,
        tenant: &str,
        file: &FileRecord,
        recorded: Vec<PartRecord>,
        client: Option<Vec<crate::validate::ClientPart>>,
    ) -> Result<String, Failure> {
        if file.upload_id.is_none() && file.size_bytes > 0 {
            // Not one byte was sent: no storage upload to create just to refuse it.
            return Err(AppError::PartsMissing((1..=file.part_count).collect()).into());
        }
        let upload_id = self.open_upload(tenant, file).await?;
        let mut recorded = recorded;
        // A zero-byte file has one empty part; create it if the client did not bother.
        if file.size_bytes == 0 && client.is_none() && recorded.is_empty() {
            let body = PartBody {
                stream: Box::pin(futures_util::stream::empty()),
                len: 0,
                offset: Some(0),
            };
            let etag = self
                .storage(tenant)
                .put_part(&file.object_key, &upload_id, 1, body, None)
                .await?;
            recorded.push(PartRecord {
                part_number: 1,
                etag,
                size_bytes: 0,
            });
        }
        let parts = self
            .parts_to_complete(tenant, file, &upload_id, client, recorded)
            .await?;
        match self
            .storage(tenant)
            .complete_upload(&file.object_key, &upload_id, &parts)
            .await
        {
            Ok(etag) => Ok(etag),
            // Storage already completed this upload (an earlier holder stopped before
            // recording it): the object there stands if it is this file's, by its size.
            Err(StorageError::NoSuchUpload) => {
                match self.storage(tenant).head_object(&file.object_key).await? {
                    Some(info) if info.size == file.size_bytes => Ok(info.etag),
                    Some(info) => {
                        tracing::warn!(
                            object_size = info.size,
                            size_bytes = file.size_bytes,
                            "the upload is gone and the object at the key is not this file's"
                        );
                        Err(AppError::FileNotActive("aborted").into())
                    }
                    None => Err(AppError::FileNotActive("aborted").into()),
                }
            }
            // Unreachable, timed out, cut: storage may have received the request and still
            // be assembling.
            Err(e @ StorageError::Unavailable(_)) => Err(Failure {
                error: e.into(),
                maybe_applied: true,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The parts to complete with, checked against the part-size rule.
    ///
    /// Which parts: the client's list (presigned uploads), or the parts the gateway
    /// recorded, topped up from storage's part list (parts PUT through presigned URLs
    /// bypass the gateway).
    ///
    /// Their sizes: every part must have the length the part-size rule gives it, which also
    /// makes them add up to `sizeBytes` (`../shared/API.md` v1.1), so a presigned or
    /// client-listed part of another size is refused with 400 `partSizeMismatch` before
    /// storage assembles anything. A size comes from the recorded part when its ETag
    /// matches (checked when it was PUT through the gateway), else from storage's part
    /// list; storage is listed at most once, and only when some part did not come through
    /// the gateway. If the upload is gone from storage, unknown sizes are left to
    /// `complete_upload`, which then finds the object or reports the upload aborted.
    async fn parts_to_complete(
        &self,
        tenant: &str,
        file: &FileRecord,
        upload_id: &str,
        client: Option<Vec<crate::validate::ClientPart>>,
        recorded: Vec<PartRecord>,
    ) -> Result<Vec<(u32, String)>, AppError> {
        let same_etag = |a: &str, b: &str| a.trim_matches('"') == b.trim_matches('"');
        let mut known: BTreeMap<u32, PartRecord> =
            recorded.into_iter().map(|p| (p.part_number, p)).collect();
        let needs_listing = match &client {
            Some(list) => list.iter().any(|c| {
                known
                    .get(&c.part_number)
                    .is_none_or(|k| !same_etag(&k.etag, &c.etag))
            }),
            None => known.len() < file.part_count as usize,
        };
        let mut listed = BTreeMap::new();
        let mut upload_gone = false;
        if needs_listing {
            match self
                .storage(tenant)
                .list_parts(&file.object_key, upload_id)
                .await
            {
                Ok(parts) => listed = parts.into_iter().map(|p| (p.part_number, p)).collect(),
                Err(StorageError::NoSuchUpload) => upload_gone = true,
                Err(e) => return Err(e.into()),
            }
        }
        // (number, ETag, size when known)
        let chosen: Vec<(u32, String, Option<u64>)> = match client {
            Some(list) => list
                .into_iter()
                .map(|c| {
                    let size = known
                        .get(&c.part_number)
                        .filter(|k| same_etag(&k.etag, &c.etag))
                        .or_else(|| listed.get(&c.part_number))
                        .map(|p| p.size_bytes);
                    (c.part_number, c.etag, size)
                })
                .collect(),
            None => {
                for (n, p) in listed {
                    known.entry(n).or_insert(p);
                }
                // Parts past the file's last (none can be uploaded or presigned) never join.
                known
                    .into_values()
                    .filter(|p| p.part_number <= file.part_count)
                    .map(|p| (p.part_number, p.etag, Some(p.size_bytes)))
                    .collect()
            }
        };
        let present: std::collections::BTreeSet<u32> = chosen.iter().map(|(n, _, _)| *n).collect();
        let mut missing: Vec<u32> = (1..=file.part_count)
            .filter(|n| !present.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(AppError::PartsMissing(missing));
        }
        for (n, _, size) in &chosen {
            let expected = expected_part_len(file.size_bytes, file.part_size_bytes, *n)
                .ok_or_else(|| AppError::Internal(format!("part {n} out of range")))?;
            match size {
                None if upload_gone => {}
                None => missing.push(*n),
                Some(actual) if *actual != expected => {
                    return Err(AppError::PartSizeMismatch {
                        part_number: *n,
                        expected,
                        actual: *actual,
                    })
                }
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            return Err(AppError::PartsMissing(missing));
        }
        Ok(chosen.into_iter().map(|(n, etag, _)| (n, etag)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FileStatus, SessionRecord, SessionStatus};
    use crate::store::{memory::MemoryStore, Gate, Registered};

    /// A lease dropped without `finished` (its task cancelled, a panic) is given back at
    /// once; one that `finished` is not; and the renewer keeps a held lease alive.
    #[tokio::test]
    async fn the_drop_guard_gives_back_what_a_cancelled_holder_held() {
        let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new(Duration::from_secs(60)));
        let now = now_ms();
        let session = SessionRecord {
            id: "s".into(),
            tenant: "t".into(),
            status: SessionStatus::Active,
            part_size_bytes: 5 << 20,
            max_files: None,
            file_limit: 10,
            file_count: 0,
            created_at: now / 1000,
            expires_at: now / 1000 + 3600,
            metadata: serde_json::Value::Null,
            owner: None,
            max_file_size_bytes: None,
            allowed_content_types: None,
            outbox_keep_ms: None,
        };
        store.create_session(&session).await.expect("create");
        let file = |id: &str| FileRecord {
            id: id.into(),
            session_id: "s".into(),
            file_key: id.into(),
            file_name: id.into(),
            size_bytes: 1,
            content_type: None,
            status: FileStatus::Registered,
            part_size_bytes: 5 << 20,
            part_count: 1,
            created_at: now / 1000,
            object_key: id.into(),
            upload_id: None,
            file_url: None,
            etag: None,
            metadata: Default::default(),
            tus_form: None,
        };
        let status = |id: &'static str| {
            let store = store.clone();
            async move {
                match store
                    .get_file("t", "s", id, false, now_ms())
                    .await
                    .expect("get")
                {
                    Gate::Ok(f) => f.status,
                    other => panic!("{other:?}"),
                }
            }
        };
        for id in ["dropped", "finished", "renewed"] {
            assert!(matches!(
                store
                    .register_file("t", &file(id), now)
                    .await
                    .expect("register"),
                Gate::Ok(Registered::Created(_))
            ));
            assert!(matches!(
                store
                    .begin_complete("t", "s", id, id, 300, now_ms())
                    .await
                    .expect("begin"),
                Gate::Ok(BeginComplete::Acquired(..))
            ));
        }
        let ids = |id: &str| ("t".to_owned(), "s".to_owned(), id.to_owned(), id.to_owned());
        let lease = |id: &str| {
            Lease::hold(
                store.clone(),
                ids(id),
                Duration::from_millis(300),
                Duration::from_millis(100),
            )
        };
        drop(lease("dropped"));
        lease("finished").finished();
        let renewed = lease("renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            status("dropped").await,
            FileStatus::Registered,
            "given back"
        );
        assert_eq!(
            status("finished").await,
            FileStatus::Completing,
            "left alone"
        );
        // Well past the 300 ms lease: only the renewed one is still held.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            store
                .begin_complete("t", "s", "renewed", "other", 300, now_ms())
                .await
                .expect("begin"),
            Gate::Ok(BeginComplete::InProgress)
        );
        assert!(matches!(
            store
                .begin_complete("t", "s", "finished", "other", 300, now_ms())
                .await
                .expect("begin"),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        drop(renewed);
    }
}
