//! tus 1.0 and IETF resumable uploads: a PATCH stream turned into the file's parts.
//!
//! A tus upload is a file of a session. Its part size is the file's (`partSizeBytes`);
//! a PATCH's bytes fill the part the upload's offset is in, and each whole part goes to
//! object storage as the REST API's parts do, so `complete`, the reaper and every other
//! rule of this module apply unchanged. Chunks of any size work, also below S3's 5 MiB
//! part minimum:
//!
//! * **The tail.** The bytes past the last whole part (fewer than one part) are kept in
//!   the session store with the offset, in the same atomic step ([`SessionStore::tus_advance`]).
//!   When the part they start is whole, they are read once, joined with the new bytes and
//!   stored as that part. A client that disconnects mid-chunk resumes from what arrived;
//!   the offset never goes back. Cost per 5 MiB part at 1 MiB chunks: one part upload to
//!   storage, four APPENDs (1 MiB each) and one GET of 4 MiB from the store; no extra
//!   storage objects (tusd's S3 store writes and reads a `.part` object per short chunk).
//!   Redis holds at most one part's bytes less one per upload in progress.
//! * **Memory.** A PATCH holds at most one part: the bytes of the part being filled.
//! * **One writer.** A PATCH takes the upload's lock in the store, only at the offset it
//!   sent, renewed while it streams; a second PATCH (any replica) gets 423, one at the
//!   wrong offset 409.
//! * **Checksums** (`Upload-Checksum`): a chunk's parts are stored but recorded only once
//!   the whole chunk's digest matches; on a mismatch nothing of it is kept (460).
//! * **Completion.** When the offset reaches the length, the file is completed through
//!   [`Uploads::complete`]; an upload with its own session (created without a `sessionId`)
//!   also has that session finalized ([`Uploads::finalize`], magic bytes checked).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use md5::Digest as _;

use super::{open_gate, Uploads};
use crate::error::AppError;
use crate::model::{now_ms, part_count, FileRecord, FileStatus, PartRecord, MAX_PARTS};
use crate::storage::PartBody;
use crate::store::{TailOp, TusAdvance, TusAdvanced, TusBegin, TusBegun, TusState};

/// How long a PATCH's lock lasts without renewal: how long a crashed replica's PATCH
/// blocks the upload (the client's retry then gets 423 until it ends).
pub const LOCK_LEASE: Duration = Duration::from_secs(15);
/// How often a streaming PATCH renews its lock (a third of the lease).
const LOCK_RENEW: Duration = Duration::from_secs(5);

/// An `Upload-Checksum` (tus checksum extension): the algorithm and the expected digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// `sha1 <base64>`.
    Sha1(Vec<u8>),
    /// `sha256 <base64>`.
    Sha256(Vec<u8>),
    /// `md5 <base64>`.
    Md5(Vec<u8>),
}

enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Md5(md5::Md5),
}

impl Hasher {
    fn new(c: &Checksum) -> Self {
        match c {
            Checksum::Sha1(_) => Hasher::Sha1(sha1::Sha1::new()),
            Checksum::Sha256(_) => Hasher::Sha256(sha2::Sha256::new()),
            Checksum::Md5(_) => Hasher::Md5(md5::Md5::new()),
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(b),
            Hasher::Sha256(h) => h.update(b),
            Hasher::Md5(h) => h.update(b),
        }
    }

    fn matches(self, c: &Checksum) -> bool {
        let (got, want): (Vec<u8>, &[u8]) = match (self, c) {
            (Hasher::Sha1(h), Checksum::Sha1(w)) => (h.finalize().to_vec(), w),
            (Hasher::Sha256(h), Checksum::Sha256(w)) => (h.finalize().to_vec(), w),
            (Hasher::Md5(h), Checksum::Md5(w)) => (h.finalize().to_vec(), w),
            _ => return false,
        };
        got == want
    }
}

/// A tus upload's kind (the concatenation extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An upload of its own.
    Plain,
    /// `Upload-Concat: partial`: never finalized; deleted once a final upload is made of it.
    Partial,
    /// `Upload-Concat: final;...`: made of partial uploads when it is created.
    Final,
}

/// What a tus upload is: whether its session is its own (created for it, deleted and
/// finalized with it) and its kind. Its upload id says so and its file records it
/// (`tus_form`); a request whose id says otherwise than the file is refused as not found,
/// so an id cannot turn a file into another kind of upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Form {
    /// The session is the upload's own.
    pub own: bool,
    /// Its kind.
    pub kind: Kind,
}

impl Form {
    /// The upload id's marker between the session and file ids: `_` (own session) or `.`
    /// (named session), then `p~` (partial), `c~` (final) or nothing.
    pub fn marker(self) -> &'static str {
        match (self.own, self.kind) {
            (true, Kind::Plain) => "_",
            (false, Kind::Plain) => ".",
            (true, Kind::Partial) => "_p~",
            (false, Kind::Partial) => ".p~",
            (true, Kind::Final) => "_c~",
            (false, Kind::Final) => ".c~",
        }
    }

    /// The form a marker names.
    pub fn from_marker(marker: &str) -> Option<Form> {
        let (own, kind) = match marker {
            "_" => (true, Kind::Plain),
            "." => (false, Kind::Plain),
            "_p~" => (true, Kind::Partial),
            ".p~" => (false, Kind::Partial),
            "_c~" => (true, Kind::Final),
            ".c~" => (false, Kind::Final),
            _ => return None,
        };
        Some(Form { own, kind })
    }

    /// The form `file` records; a file registered through the REST API is a plain upload
    /// of a named session.
    pub fn of(file: &FileRecord) -> Form {
        file.tus_form
            .as_deref()
            .and_then(|f| f.split(' ').next())
            .and_then(Form::from_marker)
            .unwrap_or(Form {
                own: false,
                kind: Kind::Plain,
            })
    }

    /// What a new upload's file records: the marker, and a final upload's partial upload ids.
    pub fn record(self, partial_ids: &[&str]) -> String {
        std::iter::once(self.marker())
            .chain(partial_ids.iter().copied())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The upload's own session is finalized when its last byte arrives (a partial
    /// upload's never is: it is made into a final upload).
    pub fn finalizes(self) -> bool {
        self.own && self.kind != Kind::Partial
    }
}

/// The ids of the partial uploads a final upload's file records, in order.
pub fn partial_ids(file: &FileRecord) -> Vec<&str> {
    file.tus_form
        .as_deref()
        .map(|f| f.split(' ').skip(1).filter(|id| !id.is_empty()).collect())
        .unwrap_or_default()
}

/// The file's form, when it is the one `expected` (`None`: any) names (404 otherwise). An
/// Uppy upload ([`super::uppy`]) is no tus upload: 404 whatever the id says.
fn checked_form(expected: Option<Form>, file: &FileRecord) -> Result<Form, AppError> {
    if super::uppy::is_uppy(file) {
        return Err(AppError::FileNotFound);
    }
    let stored = Form::of(file);
    match expected {
        Some(f) if f != stored => Err(AppError::FileNotFound),
        _ => Ok(stored),
    }
}

/// The form of a file a PATCH writes, as [`checked_form`]; a client's PATCH (`expected`
/// given) on a final upload is refused (403).
fn patch_form(expected: Option<Form>, file: &FileRecord) -> Result<Form, AppError> {
    let form = checked_form(expected, file)?;
    if form.kind == Kind::Final && expected.is_some() {
        return Err(AppError::FinalUpload);
    }
    Ok(form)
}

/// One PATCH (or the body of a creation-with-upload POST) as the handler read it.
#[derive(Debug, Clone)]
pub struct Patch {
    /// `Upload-Offset`.
    pub offset: u64,
    /// `Upload-Length` sent with this request (a deferred upload declaring its length).
    pub length: Option<u64>,
    /// IETF `Upload-Complete`: `Some(true)` when this request's bytes end the upload.
    pub complete: Option<bool>,
    /// `Upload-Checksum`.
    pub checksum: Option<Checksum>,
    /// The largest upload the tenant (and the session) takes.
    pub max_size: u64,
    /// The form the request's upload id names (checked against the file's; a final upload
    /// takes no PATCH), `None` for the gateway's own concatenation.
    pub form: Option<Form>,
}

/// What a PATCH achieved.
#[derive(Debug, Clone)]
pub struct Patched {
    /// The upload's offset now.
    pub offset: u64,
    /// The file (completed once the last byte arrived).
    pub file: FileRecord,
    /// The upload's length, once known.
    pub length: Option<u64>,
}

/// The upload as HEAD answers it.
#[derive(Debug, Clone)]
pub struct Head {
    /// The file.
    pub file: FileRecord,
    /// Offset, deferred length.
    pub state: TusState,
    /// The session's `expiresAt` (seconds).
    pub expires_at: i64,
}

impl Head {
    /// The offset clients see: a completed file's whole length.
    pub fn offset(&self) -> u64 {
        if self.file.status == FileStatus::Completed {
            self.file.size_bytes
        } else {
            self.state.offset
        }
    }
}

/// A partial upload a tus concatenation is made of.
#[derive(Debug, Clone)]
pub struct PartialUpload {
    /// Its file (completed).
    pub file: FileRecord,
    /// It has a session of its own, deleted with it.
    pub own_session: bool,
}

/// How many bytes a concatenation reads from a partial upload's object at once: with the
/// part being filled, a concatenation holds at most one part and one read.
const CONCAT_READ: u64 = 4 * 1024 * 1024;

/// Gives the PATCH lock back when the PATCH ends, however it ends.
struct LockGuard {
    uploads: Arc<Uploads>,
    ids: Option<(String, String, String)>,
    token: String,
}

impl LockGuard {
    /// Gives the lock back now (a failure leaves it to end with its lease).
    async fn release(mut self) {
        if let Some((tenant, session_id, file_id)) = self.ids.take() {
            if let Err(e) = self
                .uploads
                .store
                .tus_release(&tenant, &session_id, &file_id, &self.token)
                .await
            {
                tracing::warn!(error = %e, "releasing a tus lock failed; it ends with its lease");
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some((tenant, session_id, file_id)) = self.ids.take() {
            let store = self.uploads.store.clone();
            let token = std::mem::take(&mut self.token);
            tokio::spawn(async move {
                if let Err(e) = store
                    .tus_release(&tenant, &session_id, &file_id, &token)
                    .await
                {
                    tracing::warn!(error = %e, "releasing a tus lock failed; it ends with its lease");
                }
            });
        }
    }
}

/// The bytes of one PATCH not yet recorded, and where they go.
struct Pending {
    /// The part size.
    part_size: u64,
    /// The offset in the store.
    offset: u64,
    /// The tail's length in the store.
    tail_len: u64,
    /// The stored tail went into a staged part.
    tail_used: bool,
    /// Parts stored in object storage, not recorded yet.
    staged: Vec<PartRecord>,
    /// New bytes in `staged`.
    staged_new: u64,
    /// New bytes of the part being filled.
    buf: BytesMut,
}

impl Pending {
    /// The stored tail bytes that start the part being filled.
    fn prefix(&self) -> u64 {
        if self.tail_used {
            0
        } else {
            self.tail_len
        }
    }

    /// The offset once everything pending is kept.
    fn end(&self) -> u64 {
        self.offset + self.staged_new + self.buf.len() as u64
    }

    /// Where the part being filled starts in the object.
    fn part_start(&self) -> u64 {
        self.offset - self.tail_len + self.staged.len() as u64 * self.part_size
    }
}

impl Uploads {
    /// The upload's state (HEAD). Gate: exists, not expired, file exists.
    pub async fn tus_head(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        form: Form,
    ) -> Result<Head, AppError> {
        let now = now_ms();
        let (file, state) = open_gate(
            self.store
                .tus_file(tenant, session_id, file_id, now)
                .await?,
            tenant,
            now,
        )?;
        if file.status == FileStatus::Aborted {
            return Err(AppError::FileNotFound);
        }
        checked_form(Some(form), &file)?;
        let (expires_at, _) = self
            .store
            .session_deadline(tenant, session_id)
            .await?
            .ok_or(AppError::SessionNotFound)?;
        Ok(Head {
            file,
            state,
            expires_at,
        })
    }

    /// Appends a PATCH body at `req.offset`; see the module's documentation. Run it in a
    /// task of its own: a client that goes away mid-chunk ends the body, and the bytes that
    /// arrived are still kept.
    pub async fn tus_patch<S>(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: Patch,
        body: S,
    ) -> Result<Patched, AppError>
    where
        S: Stream<Item = Result<Bytes, AppError>> + Unpin + Send,
    {
        let token = crate::api::new_id();
        let now = now_ms();
        let begun = self
            .store
            .tus_begin(
                tenant,
                session_id,
                file_id,
                &TusBegin {
                    token: &token,
                    lease_ms: super::ms(LOCK_LEASE),
                    offset: req.offset,
                },
                now,
            )
            .await?;
        let begun = match open_gate(begun, tenant, now) {
            Err(e @ AppError::SessionNotActive(_)) => {
                return Err(self
                    .inactive_upload(tenant, session_id, file_id, req.form, e)
                    .await)
            }
            other => other?,
        };
        let (mut file, state) = match begun {
            TusBegun::Held(file, state) => (file, state),
            TusBegun::Locked => return Err(AppError::UploadLocked),
            TusBegun::OffsetMismatch(offset) => return Err(AppError::OffsetMismatch(offset)),
            TusBegun::NotOpen(f) => {
                patch_form(req.form, &f)?;
                return self.patch_closed(f, &req);
            }
        };
        let lock = LockGuard {
            uploads: self.clone(),
            ids: Some((tenant.to_owned(), session_id.to_owned(), file_id.to_owned())),
            token: token.clone(),
        };
        // Everything done under the lock: given back before the answer, so the client's
        // next PATCH finds the upload free (the guard gives it back if this is cancelled).
        let result: Result<Patched, AppError> = async {
            let form = patch_form(req.form, &file)?;
            let p = file.part_size_bytes;
            let mut length = (!state.deferred).then_some(file.size_bytes);
            let mut new_length = None;
            if let Some(l) = req.length {
                match length {
                    Some(known) if known != l => {
                        return Err(AppError::Validation(vec![crate::error::FieldError::new(
                            "Upload-Length",
                            format!("the upload's length is {known}"),
                        )]))
                    }
                    Some(_) => {}
                    None => {
                        self.check_length(l, state.offset, p, req.max_size)?;
                        length = Some(l);
                        new_length = Some(l);
                    }
                }
            }
            let mut pending = Pending {
                part_size: p,
                offset: state.offset,
                tail_len: if length == Some(state.offset) {
                    0
                } else {
                    state.offset % p
                },
                tail_used: false,
                staged: Vec::new(),
                staged_new: 0,
                buf: BytesMut::new(),
            };
            let limit = length.unwrap_or(req.max_size.min(MAX_PARTS.saturating_mul(p)));
            let mut hasher = req.checksum.as_ref().map(Hasher::new);
            let mut upload_id: Option<String> = None;
            let mut renew =
                tokio::time::interval_at(tokio::time::Instant::now() + LOCK_RENEW, LOCK_RENEW);
            let mut body = body;
            let mut failure: Option<AppError> = None;
            loop {
                let chunk = tokio::select! {
                    chunk = body.next() => chunk,
                    _ = renew.tick() => {
                        self.renew_lock(tenant, session_id, file_id, &token, pending.offset).await?;
                        continue;
                    }
                };
                let bytes = match chunk {
                    None => break,
                    Some(Err(e)) => {
                        failure = Some(e);
                        break;
                    }
                    Some(Ok(b)) => b,
                };
                if pending.end() + bytes.len() as u64 > limit {
                    failure = Some(match length {
                        Some(l) => AppError::UploadLengthExceeded(l),
                        None => AppError::FileTooLarge(limit),
                    });
                    break;
                }
                if let Some(h) = &mut hasher {
                    h.update(&bytes);
                }
                let mut rest = bytes;
                while !rest.is_empty() {
                    let room = (p - pending.prefix()) as usize - pending.buf.len();
                    let take = room.min(rest.len());
                    pending.buf.extend_from_slice(&rest.split_to(take));
                    if pending.prefix() + pending.buf.len() as u64 == p {
                        self.store_part(tenant, &file, &mut pending, &mut upload_id)
                            .await?;
                        if hasher.is_none() {
                            self.flush(tenant, &file, &token, &mut pending, None)
                                .await?;
                        }
                    }
                }
            }
            let checksum_failed = match (hasher, &req.checksum) {
                (Some(h), Some(c)) => failure.is_none() && !h.matches(c),
                _ => false,
            };
            if checksum_failed {
                return Err(AppError::UploadChecksumMismatch);
            }
            if failure.is_some() && req.checksum.is_some() {
                // A checksummed chunk is kept whole or not at all.
                return Err(failure.unwrap_or(AppError::BodyIncomplete));
            }
            if failure.is_none() && req.complete == Some(true) {
                let end = pending.end();
                match length {
                    Some(l) if l != end => {
                        return Err(AppError::Validation(vec![crate::error::FieldError::new(
                            "Upload-Complete",
                            format!("the upload's length is {l}, the request ends at {end}"),
                        )]))
                    }
                    Some(_) => {}
                    None => {
                        self.check_length(end, state.offset, p, req.max_size)?;
                        length = Some(end);
                        new_length = Some(end);
                    }
                }
            }
            // The last part, once the last byte is here (a zero-byte upload's empty part too).
            let whole = length.is_some_and(|l| pending.end() == l);
            if whole && (pending.prefix() > 0 || !pending.buf.is_empty() || length == Some(0)) {
                self.store_part(tenant, &file, &mut pending, &mut upload_id)
                    .await?;
            }
            if pending.end() > pending.offset || !pending.staged.is_empty() || new_length.is_some()
            {
                let len_update = new_length.map(|l| (l, part_count(l, p)));
                self.flush(tenant, &file, &token, &mut pending, len_update)
                    .await?;
                if let Some(l) = new_length {
                    file.size_bytes = l;
                    file.part_count = part_count(l, p);
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
            if length == Some(pending.offset) {
                file = self
                    .complete(tenant, session_id, file_id, &serde_json::json!({}))
                    .await?;
                if form.finalizes() {
                    self.finalize(tenant, session_id).await?;
                }
            }
            Ok(Patched {
                offset: pending.offset,
                file,
                length,
            })
        }
        .await;
        lock.release().await;
        result
    }

    /// Termination (`DELETE`): the upload's own session, or its file in a named session,
    /// deleted with its bytes in storage.
    pub async fn tus_terminate(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        form: Form,
    ) -> Result<(), AppError> {
        self.tus_head(tenant, session_id, file_id, form).await?;
        if form.own {
            self.delete_session(tenant, session_id).await
        } else {
            self.delete_file(tenant, session_id, file_id).await
        }
    }

    /// tus concatenation: the final upload `file_id`, registered with the partial uploads'
    /// total length, gets their objects' bytes in order, read [`CONCAT_READ`] bytes at a time
    /// and kept through the PATCH path (so it is completed, and its own session finalized,
    /// as a PATCHed upload is); the partial uploads are deleted once that succeeded. A
    /// concatenation that fails before the final upload is completed deletes it (if the
    /// store lets it); one cut by a crash leaves it incomplete. Either way the partial
    /// uploads stay as they were and the client can create the final upload again.
    pub async fn tus_concat(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        form: Form,
        partials: &[PartialUpload],
        max_size: u64,
    ) -> Result<Patched, AppError> {
        let result = self
            .concat_into(tenant, session_id, file_id, partials, max_size)
            .await;
        if let Err(e) = &result {
            // A final upload that completed stays (its session's finalize is what failed:
            // an own session is then reaped when it expires); one that did not is deleted.
            let completed = matches!(
                self.tus_head(tenant, session_id, file_id, form).await,
                Ok(h) if h.file.status == FileStatus::Completed
            );
            tracing::warn!(error = %e, completed, "a concatenation failed");
            if !completed {
                if let Err(e) = self.tus_terminate(tenant, session_id, file_id, form).await {
                    tracing::warn!(error = %e, "deleting a failed final upload failed");
                }
            }
            return result;
        }
        for p in partials {
            let deleted = if p.own_session {
                self.delete_session(tenant, &p.file.session_id).await
            } else {
                self.delete_file(tenant, &p.file.session_id, &p.file.id)
                    .await
            };
            if let Err(e) = deleted {
                // The final upload stands. A partial upload's own session expires and the
                // reaper removes it; one in a named session stays until deleted.
                tracing::warn!(
                    error = %e,
                    partial_session = %p.file.session_id,
                    partial_file = %p.file.id,
                    "deleting a concatenated partial upload failed"
                );
            }
        }
        result
    }

    async fn concat_into(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        partials: &[PartialUpload],
        max_size: u64,
    ) -> Result<Patched, AppError> {
        let req = Patch {
            offset: 0,
            length: None,
            complete: None,
            checksum: None,
            max_size,
            form: None,
        };
        let storage = self.storage(tenant).clone();
        let sources: Arc<[(String, u64)]> = partials
            .iter()
            .map(|p| (p.file.object_key.clone(), p.file.size_bytes))
            .collect();
        let total: u64 = sources.iter().map(|(_, size)| size).sum();
        let body = futures_util::stream::try_unfold((0usize, 0u64), move |(mut i, mut at)| {
            let (storage, sources) = (storage.clone(), sources.clone());
            async move {
                while let Some((key, size)) = sources.get(i) {
                    if at < *size {
                        let n = (*size - at).min(CONCAT_READ);
                        let bytes = storage.read_range(key, at, n as usize).await?;
                        if bytes.is_empty() {
                            return Err(AppError::Unavailable(format!(
                                "partial upload object {key} ends at {at} of its {size} bytes"
                            )));
                        }
                        let next = at + bytes.len() as u64;
                        return Ok(Some((bytes, (i, next))));
                    }
                    i += 1;
                    at = 0;
                }
                Ok(None)
            }
        });
        let patched = self
            .tus_patch(tenant, session_id, file_id, req, Box::pin(body))
            .await?;
        if patched.offset != total || patched.file.status != FileStatus::Completed {
            return Err(AppError::Unavailable(format!(
                "concatenation kept {} of {total} bytes",
                patched.offset
            )));
        }
        Ok(patched)
    }

    /// What a PATCH on an upload of a session that takes no more bytes (finalized,
    /// deleted) answers: `inactive`, unless the upload id names another form than the
    /// file's (404) or a final upload (403). Read only on this error path.
    async fn inactive_upload(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        form: Option<Form>,
        inactive: AppError,
    ) -> AppError {
        let Some(form) = form else {
            return inactive;
        };
        let now = now_ms();
        let found = match self.store.tus_file(tenant, session_id, file_id, now).await {
            Ok(gate) => open_gate(gate, tenant, now),
            Err(_) => return inactive,
        };
        match found {
            Ok((file, _)) => match patch_form(Some(form), &file) {
                Err(e) => e,
                Ok(_) => inactive,
            },
            Err(_) => inactive,
        }
    }

    /// A PATCH on an upload that takes no more bytes: a completed upload answers its
    /// length to a request at its end with no body (a retried last PATCH), 409 otherwise.
    fn patch_closed(&self, f: FileRecord, req: &Patch) -> Result<Patched, AppError> {
        match f.status {
            FileStatus::Completed if req.offset == f.size_bytes => Ok(Patched {
                offset: f.size_bytes,
                length: Some(f.size_bytes),
                file: f,
            }),
            FileStatus::Completed => Err(AppError::OffsetMismatch(f.size_bytes)),
            FileStatus::Completing => Err(AppError::UploadLocked),
            _ => Err(AppError::FileNotFound),
        }
    }

    /// A deferred length must reach the offset, fit the tenant's limit and the file's
    /// 10,000 parts of its part size.
    fn check_length(&self, l: u64, offset: u64, p: u64, max: u64) -> Result<(), AppError> {
        if l < offset {
            return Err(AppError::Validation(vec![crate::error::FieldError::new(
                "Upload-Length",
                format!("below the upload's offset {offset}"),
            )]));
        }
        let cap = max.min(MAX_PARTS.saturating_mul(p));
        if l > cap {
            return Err(AppError::FileTooLarge(cap));
        }
        Ok(())
    }

    async fn renew_lock(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        offset: u64,
    ) -> Result<(), AppError> {
        let now = now_ms();
        let renewed = self
            .store
            .tus_begin(
                tenant,
                session_id,
                file_id,
                &TusBegin {
                    token,
                    lease_ms: super::ms(LOCK_LEASE),
                    offset,
                },
                now,
            )
            .await?;
        match open_gate(renewed, tenant, now)? {
            TusBegun::Held(..) => Ok(()),
            _ => Err(AppError::UploadLocked),
        }
    }

    /// Stores the part being filled (the stored tail, if it starts it, and the new bytes).
    async fn store_part(
        &self,
        tenant: &str,
        file: &FileRecord,
        pending: &mut Pending,
        upload_id: &mut Option<String>,
    ) -> Result<(), AppError> {
        let prefix = pending.prefix();
        let data: Bytes = if prefix > 0 {
            let tail = self
                .store
                .tus_tail(tenant, &file.session_id, &file.id)
                .await?;
            if tail.len() as u64 != prefix {
                return Err(AppError::UploadLocked);
            }
            let mut joined = BytesMut::with_capacity(tail.len() + pending.buf.len());
            joined.extend_from_slice(&tail);
            joined.extend_from_slice(&pending.buf);
            joined.freeze()
        } else {
            pending.buf.split().freeze()
        };
        let new_bytes = data.len() as u64 - prefix;
        pending.buf.clear();
        let start = pending.part_start();
        let part_number = u32::try_from(start / pending.part_size + 1)
            .map_err(|_| AppError::Internal("part number out of range".into()))?;
        let id = match upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self.open_upload(tenant, file).await?;
                *upload_id = Some(id.clone());
                id
            }
        };
        let len = data.len() as u64;
        let body = PartBody {
            stream: Box::pin(futures_util::stream::once(async move { Ok(data) })),
            len,
            offset: Some(start),
        };
        let etag = self
            .storage(tenant)
            .put_part(&file.object_key, &id, part_number, body, None)
            .await?;
        self.metrics.bytes_stored.inc_by(len);
        pending.staged.push(PartRecord {
            part_number,
            etag,
            size_bytes: len,
        });
        pending.staged_new += new_bytes;
        pending.tail_used = pending.tail_used || prefix > 0;
        Ok(())
    }

    /// Records everything pending: the staged parts, the rest of the bytes as the tail,
    /// the new offset (and a length that became known).
    async fn flush(
        &self,
        tenant: &str,
        file: &FileRecord,
        token: &str,
        pending: &mut Pending,
        length: Option<(u64, u32)>,
    ) -> Result<(), AppError> {
        let to = pending.end();
        let tail = if pending.staged.is_empty() {
            TailOp::Append(&pending.buf)
        } else {
            TailOp::Set(&pending.buf)
        };
        let now = now_ms();
        let advanced = self
            .store
            .tus_advance(
                tenant,
                &file.session_id,
                &file.id,
                &TusAdvance {
                    token,
                    lease_ms: super::ms(LOCK_LEASE),
                    from: pending.offset,
                    to,
                    tail_len: pending.tail_len,
                    parts: &pending.staged,
                    tail,
                    length,
                },
                now,
            )
            .await?;
        match open_gate(advanced, tenant, now)? {
            TusAdvanced::Done => {}
            TusAdvanced::Lost => return Err(AppError::UploadLocked),
            TusAdvanced::NotOpen(f) => {
                return Err(super::parts::file_not_open(&f));
            }
        }
        pending.tail_len = if pending.staged.is_empty() {
            pending.tail_len + pending.buf.len() as u64
        } else {
            pending.buf.len() as u64
        };
        pending.offset = to;
        pending.staged.clear();
        pending.staged_new = 0;
        pending.tail_used = false;
        pending.buf.clear();
        Ok(())
    }
}
