//! Uploads by `@uppy/aws-s3` through Uppy Companion's S3 protocol (`../shared/API.md` v1.1,
//! "Uppy"): each is a file of the upload token's session, registered before its bytes go
//! straight to S3.
//!
//! Uppy sends no size before the bytes: a file is registered with its length unknown (as
//! a tus upload with a deferred length), under the session's part size.
//! - Multipart: parts are presigned without a signed length (Uppy asks for one URL per
//!   part number and nothing else). The length becomes known at completion from storage's
//!   own part list: every part but the last must be one part size, the last at most one,
//!   and the whole at most the tenant's largest file (or the session's end-user limit);
//!   only then is the length recorded and the file completed through the domain's
//!   completion, which checks the same rule again. The REST part, presign and complete
//!   routes refuse Uppy files (their parts bypass those routes' rules).
//! - Form upload (`s3/params`, for files under Uppy's multipart threshold): a presigned
//!   POST policy bounds the object's size (`content-length-range`) and fixes its key and
//!   attributes. The policy is for a staging key ([`staging_key`]), not the file's object:
//!   it can be sent again until it expires, and a completed file's object must not change.
//!   Once the staged object is there, the file is completed with its size and the object
//!   copied (in storage, under the completion's lease, only the version measured) to the
//!   file's key ([`Uploads::settle_posted`], run when the session or file is read, before
//!   finalize, and by the reaper). The file's `upload_id` is a marker, `form:<deadline
//!   ms>` ([`Uploads::post_marker`]): a deleted or expired form file's cleanup (queued by
//!   the store as for any upload) waits until no POST of the policy can still be arriving,
//!   then removes the staged object and the file's object.
//!
//! The files record their form (`tus_form`: [`MULTIPART`] or [`POST`]).

use std::time::Duration;

use super::parts::file_not_open;
use super::{ms, open_gate, Uploads};
use crate::error::AppError;
use crate::model::{now_ms, part_count, FileRecord, FileStatus, PartRecord};
use crate::storage::PresignedPost;
use crate::store::{BeginComplete, TailOp, TusAdvance, TusBegin, TusBegun, TusState};

/// The form a multipart Uppy upload's file records.
pub const MULTIPART: &str = "uppy";
/// The form a form-upload (POST policy) Uppy file records.
pub const POST: &str = "uppy-post";

/// The largest form upload: Uppy sends files up to 100 MiB as one form POST by default
/// (`shouldUseMultipart`), larger ones in parts. The bound keeps a settling's copy short
/// and a POST's transfer within `Timing::form_post_grace` of its policy's expiry.
pub const FORM_MAX_BYTES: u64 = 100 * 1024 * 1024;

/// The key a form upload's policy is signed for; the file's object is copied from it.
pub fn staging_key(object_key: &str) -> String {
    format!("{object_key}.post")
}

/// The deadline of a form upload's marker ([`Uploads::post_marker`]), when `upload_id`
/// is one.
pub fn post_deadline(upload_id: &str) -> Option<i64> {
    upload_id.strip_prefix("form:")?.parse().ok()
}

/// Form uploads this replica has signed and whose objects the reaper looks for: at most
/// [`MAX_PENDING_POSTS`] (the oldest make way), each until its policy has expired (plus
/// `Timing::form_post_grace` for a POST that started just before). A replica's restart
/// forgets them; reading the session (or the file, or finalizing) settles them as well.
#[derive(Debug, Default)]
pub struct PendingPosts(std::sync::Mutex<std::collections::BTreeMap<PostKey, PendingPost>>);

/// A [`PendingPosts`] entry's key: its deadline (ms), then its file's id.
type PostKey = (i64, String);

/// One signed form upload: awaiting its object until `settled`, then kept until its
/// policy has expired, when its staged object (sent again, say) is removed.
#[derive(Debug, Clone)]
pub struct PendingPost {
    tenant: String,
    session_id: String,
    file_id: String,
    object_key: String,
    settled: bool,
}

/// Bound of [`PendingPosts`] (per replica): the oldest make way. A form upload no longer
/// held here is still settled when its session is read, and its staged object is removed
/// with the file's cleanup; only a staged object sent again after completion can then
/// stay in storage (see the README).
pub const MAX_PENDING_POSTS: usize = 10_000;

impl PendingPosts {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<PostKey, PendingPost>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, until_ms: i64, post: PendingPost) {
        let mut map = self.lock();
        while map.len() >= MAX_PENDING_POSTS {
            if map.pop_first().is_none() {
                break;
            }
        }
        map.insert((until_ms, post.file_id.clone()), post);
    }

    /// How many are pending.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// How many still await their objects.
    pub fn awaiting(&self) -> usize {
        self.lock().values().filter(|p| !p.settled).count()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// How long declaring a length may hold the file's lock.
const DECLARE_LEASE_MS: i64 = 10_000;

/// Whether `file` is an Uppy upload of form `form`.
pub fn is_form(file: &FileRecord, form: &str) -> bool {
    file.tus_form.as_deref() == Some(form)
}

/// Whether `file` is an Uppy upload (of either form).
pub fn is_uppy(file: &FileRecord) -> bool {
    is_form(file, MULTIPART) || is_form(file, POST)
}

/// The sizes `parts` (the client's list: number, ETag) have in storage's `stored` list,
/// checked against the part-size rule for a file of unknown length: every part but the
/// last exactly `part_size`, the last at most `part_size`, numbered 1..=n in order. The
/// file's length is their sum.
pub fn length_of_parts(
    parts: &[(u32, String)],
    stored: &[PartRecord],
    part_size: u64,
) -> Result<u64, AppError> {
    if parts.is_empty() {
        return Err(AppError::PartsMissing(vec![1]));
    }
    let mut total: u64 = 0;
    let mut missing = Vec::new();
    for (i, (n, etag)) in parts.iter().enumerate() {
        let expected_number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if *n != expected_number {
            missing.push(expected_number);
            continue;
        }
        let want = etag.trim_matches('"');
        let Some(p) = stored
            .iter()
            .find(|p| p.part_number == *n && p.etag.trim_matches('"') == want)
        else {
            missing.push(*n);
            continue;
        };
        let last = i + 1 == parts.len();
        if (!last && p.size_bytes != part_size) || (last && p.size_bytes > part_size) {
            return Err(AppError::PartSizeMismatch {
                part_number: *n,
                expected: part_size,
                actual: p.size_bytes,
            });
        }
        total = total.saturating_add(p.size_bytes);
    }
    if !missing.is_empty() {
        return Err(AppError::PartsMissing(missing));
    }
    Ok(total)
}

impl Uploads {
    /// The `upload_id` a form-upload file carries, `form:<deadline ms>`: after the
    /// deadline no POST of its policy (signed now, at `signed_at_ms`) can still be
    /// arriving.
    pub fn post_marker(&self, signed_at_ms: i64) -> String {
        format!("form:{}", self.post_deadline_of(signed_at_ms))
    }

    /// When no POST of a form policy signed at `signed_at_ms` can still be arriving.
    fn post_deadline_of(&self, signed_at_ms: i64) -> i64 {
        let window = self.timing.form_post_ttl + self.timing.form_post_grace;
        signed_at_ms.saturating_add(ms(window))
    }

    /// How long a form upload's policy is valid.
    pub fn form_post_ttl(&self) -> Duration {
        self.timing.form_post_ttl
    }

    /// The largest file `session_id` takes: `max_size` (the tenant's), or less when the
    /// end-user token that created the session set a limit (which registration cannot
    /// check for a file of unknown length).
    async fn session_max(
        &self,
        tenant: &str,
        session_id: &str,
        max_size: u64,
    ) -> Result<u64, AppError> {
        let now = now_ms();
        let page = crate::store::Page {
            after: None,
            limit: 1,
        };
        let gate = self
            .store
            .get_session(tenant, session_id, page, now)
            .await?;
        let view = open_gate(gate, tenant, now)?;
        Ok(view
            .session
            .max_file_size_bytes
            .map_or(max_size, |m| m.min(max_size)))
    }

    /// Whether `tenant`'s storage takes Uppy's direct uploads (S3 only: presigned parts and
    /// forms); checked before a file is registered for them.
    pub fn uppy_supported(&self, tenant: &str) -> Result<(), AppError> {
        if self.storage(tenant).kind() == crate::storage::StorageKind::S3 {
            Ok(())
        } else {
            Err(AppError::NotSupported)
        }
    }

    /// The file and its tus state (length known or not), for an Uppy request on a file of
    /// `form` (another file of the session, Uppy's or not, is not found).
    async fn uppy_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        form: &str,
    ) -> Result<(FileRecord, TusState), AppError> {
        let now = now_ms();
        let gate = self
            .store
            .tus_file(tenant, session_id, file_id, now)
            .await?;
        let (file, state) = open_gate(gate, tenant, now)?;
        if !is_form(&file, form) {
            return Err(AppError::FileNotFound);
        }
        Ok((file, state))
    }

    /// Presigned URLs for parts `numbers` of a multipart Uppy file: each part's exact
    /// length when the file's length is known, else any length, for part numbers up to
    /// what `max_size` allows. The numbers are checked before storage is called.
    pub async fn uppy_sign(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        numbers: &[u32],
        max_size: u64,
    ) -> Result<Vec<(u32, String)>, AppError> {
        let (file, state) = self
            .uppy_file(tenant, session_id, file_id, MULTIPART)
            .await?;
        if file.status != FileStatus::Registered {
            return Err(file_not_open(&file));
        }
        // Each number's signed length: `None` signs any length.
        let max_parts = part_count(max_size, file.part_size_bytes)
            .min(u32::try_from(crate::model::MAX_PARTS).unwrap_or(u32::MAX));
        let mut lens = Vec::with_capacity(numbers.len());
        for &n in numbers {
            if state.deferred {
                if n == 0 || n > max_parts {
                    return Err(part_out_of_range(max_parts));
                }
                lens.push((n, None));
            } else {
                let len = crate::model::expected_part_len(file.size_bytes, file.part_size_bytes, n)
                    .ok_or_else(|| part_out_of_range(file.part_count))?;
                lens.push((n, Some(len)));
            }
        }
        // The storage upload is created with the first part's URL, as for a REST file
        // (`Uploads::open_upload`): creation is one store call, and Uppy's `uploadId` is
        // the file's id, not storage's.
        let upload_id = self.open_upload(tenant, &file).await?;
        let storage = self.storage(tenant);
        let ttl = super::parts::PRESIGN_TTL;
        let mut urls = Vec::with_capacity(lens.len());
        for (n, len) in lens {
            let url = match len {
                None => {
                    storage
                        .presign_part_any_size(&file.object_key, &upload_id, n, ttl)
                        .await?
                }
                Some(len) => {
                    storage
                        .presign_part(&file.object_key, &upload_id, n, len, ttl)
                        .await?
                }
            };
            urls.push((n, url));
        }
        Ok(urls)
    }

    /// Deletes an Uppy file (Companion's abort); any other file of the session is not
    /// found here.
    pub async fn uppy_abort(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<(), AppError> {
        let file = self.file(tenant, session_id, file_id).await?;
        if !is_uppy(&file) {
            return Err(AppError::FileNotFound);
        }
        self.delete_file(tenant, session_id, file_id).await
    }

    /// The parts storage holds for a multipart Uppy file (they bypass the gateway).
    pub async fn uppy_parts(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<Vec<PartRecord>, AppError> {
        let (file, _) = self
            .uppy_file(tenant, session_id, file_id, MULTIPART)
            .await?;
        match (&file.status, &file.upload_id) {
            (FileStatus::Registered | FileStatus::Completing, Some(id)) => {
                match self.storage(tenant).list_parts(&file.object_key, id).await {
                    Ok(parts) => Ok(parts),
                    Err(crate::storage::StorageError::NoSuchUpload) => Ok(Vec::new()),
                    Err(e) => Err(e.into()),
                }
            }
            (FileStatus::Aborted, _) => Err(AppError::FileAborted),
            _ => Ok(Vec::new()),
        }
    }

    /// Completes a multipart Uppy file from the client's part list: its length is learnt
    /// from storage's part list when unknown (see the module docs), then the file is
    /// completed as any other.
    pub async fn uppy_complete(
        self: &std::sync::Arc<Self>,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        parts: &[(u32, String)],
        max_size: u64,
    ) -> Result<FileRecord, AppError> {
        let (file, state) = self
            .uppy_file(tenant, session_id, file_id, MULTIPART)
            .await?;
        if state.deferred && file.status == FileStatus::Registered {
            // No part was ever signed: nothing is in storage.
            let upload_id = file
                .upload_id
                .clone()
                .ok_or_else(|| AppError::PartsMissing(vec![1]))?;
            let stored = match self
                .storage(tenant)
                .list_parts(&file.object_key, &upload_id)
                .await
            {
                Ok(p) => p,
                Err(crate::storage::StorageError::NoSuchUpload) => {
                    return Err(AppError::FileNotActive("aborted"))
                }
                Err(e) => return Err(e.into()),
            };
            let length = length_of_parts(parts, &stored, file.part_size_bytes)?;
            let max_size = self.session_max(tenant, session_id, max_size).await?;
            if length > max_size {
                return Err(AppError::FileTooLarge(max_size));
            }
            self.declare_length(tenant, session_id, file_id, length)
                .await?;
        }
        let body = serde_json::json!({
            "parts": parts
                .iter()
                .map(|(n, etag)| serde_json::json!({"partNumber": n, "etag": etag.trim_matches('"')}))
                .collect::<Vec<_>>(),
        });
        self.complete_checked(tenant, session_id, file_id, &body, true)
            .await
    }

    /// Records the length of a file registered with its length unknown, under the file's
    /// tus lock (so a concurrent declaration or tus request cannot interleave). A file
    /// whose length is already this one is left as it is; another length is refused.
    pub async fn declare_length(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        length: u64,
    ) -> Result<(), AppError> {
        let token = crate::api::new_id();
        let now = now_ms();
        let begin = TusBegin {
            token: &token,
            lease_ms: DECLARE_LEASE_MS,
            offset: 0,
        };
        let gate = self
            .store
            .tus_begin(tenant, session_id, file_id, &begin, now)
            .await?;
        let (file, state) = match open_gate(gate, tenant, now)? {
            TusBegun::Held(f, s) => (f, s),
            TusBegun::Locked => return Err(AppError::CompletionInProgress),
            TusBegun::OffsetMismatch(_) => {
                return Err(AppError::Internal("an Uppy file has tus bytes".into()))
            }
            // Completing or completed: the completion's own answer stands.
            TusBegun::NotOpen(_) => return Ok(()),
        };
        // A form upload's policy can be sent again with another size until it expires:
        // its length is whatever the staged object has when it is settled.
        let redeclare = is_form(&file, POST) && file.size_bytes != length;
        let result = if !state.deferred && !redeclare {
            if file.size_bytes == length {
                Ok(())
            } else {
                Err(AppError::PartSizeMismatch {
                    part_number: file.part_count,
                    expected: file.size_bytes,
                    actual: length,
                })
            }
        } else {
            let advance = TusAdvance {
                token: &token,
                lease_ms: DECLARE_LEASE_MS,
                from: 0,
                to: 0,
                tail_len: 0,
                parts: &[],
                tail: TailOp::Keep,
                length: Some((length, part_count(length, file.part_size_bytes))),
            };
            let now = now_ms();
            let gate = self
                .store
                .tus_advance(tenant, session_id, file_id, &advance, now)
                .await;
            match gate {
                Ok(g) => match open_gate(g, tenant, now) {
                    Ok(crate::store::TusAdvanced::Done) => Ok(()),
                    Ok(other) => Err(AppError::Internal(format!(
                        "declaring an Uppy file's length: {other:?}"
                    ))),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.into()),
            }
        };
        if let Err(e) = self
            .store
            .tus_release(tenant, session_id, file_id, &token)
            .await
        {
            tracing::warn!(error = %e, "releasing an Uppy file's lock failed (it runs out by itself)");
        }
        result
    }

    /// The presigned form upload of a newly registered form-upload Uppy file (its
    /// `upload_id` the [`Uploads::post_marker`] of its registration), bounded to `max_len`
    /// bytes, the session's own limit and [`FORM_MAX_BYTES`].
    pub async fn uppy_post(
        &self,
        tenant: &str,
        file: &FileRecord,
        max_len: u64,
    ) -> Result<PresignedPost, AppError> {
        let attrs = self.attributes(tenant, file, file.content_type.as_deref());
        let max_len = self
            .session_max(tenant, &file.session_id, max_len)
            .await?
            .min(FORM_MAX_BYTES);
        let post = self
            .storage(tenant)
            .presign_post(
                &staging_key(&file.object_key),
                &attrs,
                max_len,
                self.timing.form_post_ttl,
            )
            .await?;
        let until = file
            .upload_id
            .as_deref()
            .and_then(post_deadline)
            .unwrap_or_else(|| self.post_deadline_of(now_ms()));
        self.pending_posts.add(
            until,
            PendingPost {
                tenant: tenant.to_owned(),
                session_id: file.session_id.clone(),
                file_id: file.id.clone(),
                object_key: file.object_key.clone(),
                settled: false,
            },
        );
        Ok(post)
    }

    /// The form uploads signed here and still awaited ([`PendingPosts`]).
    pub fn pending_posts(&self) -> &PendingPosts {
        &self.pending_posts
    }

    /// Settles the pending form uploads whose objects landed (the reaper's pass); a file
    /// no longer `registered` (completed, deleted, its session gone) is no longer looked
    /// for. Past its policy's deadline an entry goes: a file still `registered` is settled
    /// one last time, and the staged object is removed once the file is completed or gone
    /// (a still unsettled one stays for the next read, the file's cleanup removes it).
    pub async fn settle_pending_posts(&self) -> usize {
        let now = now_ms();
        let due: Vec<(PostKey, PendingPost, bool)> = {
            let mut map = self.pending_posts.lock();
            let live = map.split_off(&(now, String::new()));
            let expired = std::mem::replace(&mut *map, live);
            let mut due: Vec<(PostKey, PendingPost, bool)> =
                expired.into_iter().map(|(k, v)| (k, v, true)).collect();
            due.extend(
                map.iter()
                    .filter(|(_, v)| !v.settled)
                    .map(|(k, v)| (k.clone(), v.clone(), false)),
            );
            due
        };
        let mut settled = 0;
        for (key, p, expired) in due {
            let now = now_ms();
            let file = match self
                .store
                .get_file(&p.tenant, &p.session_id, &p.file_id, true, now)
                .await
            {
                Ok(crate::store::Gate::Ok(f)) => Some(f),
                Ok(_) => None,
                Err(e) => {
                    // An expired entry is gone from the list even so: the next read
                    // settles its file, the file's cleanup removes the staged object.
                    tracing::debug!(error = %e, "looking at a pending form upload failed; next pass");
                    continue;
                }
            };
            let done = match file {
                // `completing`: a settling in flight, or one cut short (a cancelled read, a
                // lost store reply) whose lease runs out; `begin_complete` then takes over.
                Some(f) if in_flight(&f) && !p.settled => {
                    match self.settle_one(&p.tenant, &f).await {
                        Ok(true) => {
                            settled += 1;
                            true
                        }
                        Ok(false) => false,
                        Err(e) => {
                            tracing::debug!(file_id = %f.id, error = %e, "settling a form upload failed; next pass");
                            false
                        }
                    }
                }
                Some(f) if in_flight(&f) => false,
                _ => true,
            };
            if expired {
                if done {
                    if let Err(e) = self
                        .storage(&p.tenant)
                        .delete_object(&staging_key(&p.object_key))
                        .await
                    {
                        tracing::debug!(file_id = %p.file_id, error = %e, "removing a staged form upload failed; its file's cleanup removes it");
                    }
                }
            } else if done {
                if let Some(entry) = self.pending_posts.lock().get_mut(&key) {
                    entry.settled = true;
                }
            }
        }
        settled
    }

    /// Completes the form-upload Uppy files among `files` whose objects have landed, with
    /// their objects' sizes; true when one was. Best effort: a file that cannot be looked
    /// at now is tried at the next read.
    pub async fn settle_posted(&self, tenant: &str, files: &[FileRecord]) -> bool {
        let mut settled = false;
        for file in files.iter().filter(|f| is_form(f, POST) && in_flight(f)) {
            match self.settle_one(tenant, file).await {
                Ok(done) => settled |= done,
                Err(e) => {
                    tracing::warn!(file_id = %file.id, error = %e, "settling a form upload failed; the next read tries again");
                }
            }
        }
        settled
    }

    /// Completes one form-upload file if its staged object is there: its length
    /// declared (again, if the policy was sent again since), the completion's lease taken
    /// (and renewed while storage copies), the staged object copied to the file's key only
    /// while it is the version whose size was declared, the completion recorded, then the
    /// staged object removed.
    async fn settle_one(&self, tenant: &str, file: &FileRecord) -> Result<bool, AppError> {
        let storage = self.storage(tenant);
        let staged = staging_key(&file.object_key);
        let Some(info) = storage.head_object(&staged).await? else {
            return Ok(false);
        };
        let sid = &file.session_id;
        let mut attempts = 0;
        let (token, lease) = loop {
            attempts += 1;
            match self.declare_length(tenant, sid, &file.id, info.size).await {
                Ok(()) => {}
                // Another settling holds the file: its result stands.
                Err(AppError::CompletionInProgress) => return Ok(false),
                Err(e) => return Err(e),
            }
            let token = crate::api::new_id();
            let now = now_ms();
            let gate = self
                .store
                .begin_complete(
                    tenant,
                    sid,
                    &file.id,
                    &token,
                    ms(self.timing.complete_lease),
                    now,
                )
                .await?;
            let held = match open_gate(gate, tenant, now)? {
                BeginComplete::Acquired(f, _) => f,
                BeginComplete::AlreadyCompleted(_) => return Ok(true),
                BeginComplete::Aborted | BeginComplete::InProgress => return Ok(false),
            };
            let lease = super::complete::Lease::hold(
                self.store.clone(),
                (
                    tenant.to_owned(),
                    sid.clone(),
                    file.id.clone(),
                    token.clone(),
                ),
                self.timing.complete_lease,
                self.timing.complete_renew,
            );
            if held.size_bytes == info.size {
                break (token, lease);
            }
            // Another length: taken over from a settling cut short (the length could not be
            // declared while it held the file), or declared from another version. Given
            // back, the length is declared again, once.
            lease.release().await;
            if attempts == 2 {
                return Ok(false);
            }
        };
        let attrs = self.attributes(tenant, file, file.content_type.as_deref());
        let etag = match storage
            .copy_object(&staged, &file.object_key, &attrs, Some(&info.etag))
            .await
        {
            Ok(etag) => etag,
            // Sent again between the look and the copy: the next settling looks again.
            Err(crate::storage::StorageError::Refused { reason, .. })
                if reason == "PreconditionFailed" =>
            {
                lease.release().await;
                return Ok(false);
            }
            // The copy may still land (a timeout, a cut connection): the lease is not given
            // back but left to run out, so no other settling copies meanwhile.
            Err(e @ crate::storage::StorageError::Unavailable(_)) => {
                lease.finished();
                return Err(e.into());
            }
            Err(e) => {
                lease.release().await;
                return Err(e.into());
            }
        };
        lease.finished();
        let url = storage.file_url(&file.object_key);
        let gate = self
            .store
            .finish_complete(tenant, sid, &file.id, &token, &url, &etag, now_ms())
            .await?;
        self.wake(tenant, sid);
        let done = matches!(gate, crate::store::Gate::Ok(Some(_)));
        if done {
            self.metrics.files_completed.inc();
            tracing::info!(file_id = %file.id, file_url = %url, size_bytes = info.size, "form upload landed: file completed");
            if let Err(e) = storage.delete_object(&staged).await {
                tracing::warn!(file_id = %file.id, error = %e, "removing a settled form upload's staged object failed; its deadline or cleanup removes it");
            }
        }
        Ok(done)
    }
}

/// Whether a form-upload file is not settled yet: `registered`, or `completing` (a
/// settling holds it, or held it and was cut short: its lease runs out, then the next
/// settling takes over).
fn in_flight(file: &FileRecord) -> bool {
    matches!(file.status, FileStatus::Registered | FileStatus::Completing)
}

fn part_out_of_range(max: u32) -> AppError {
    AppError::Validation(vec![crate::error::FieldError::new(
        "partNumber",
        format!("must be between 1 and {max}"),
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 5;

    fn stored(sizes: &[u64]) -> Vec<PartRecord> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, s)| PartRecord {
                part_number: i as u32 + 1,
                etag: format!("e{}", i + 1),
                size_bytes: *s,
            })
            .collect()
    }

    fn listed(n: u32) -> Vec<(u32, String)> {
        (1..=n).map(|i| (i, format!("\"e{i}\""))).collect()
    }

    #[test]
    fn a_form_marker_names_its_deadline_and_nothing_else_is_one() {
        assert_eq!(post_deadline("form:1700000000123"), Some(1_700_000_000_123));
        assert_eq!(post_deadline("form:"), None);
        assert_eq!(post_deadline("form:12x"), None);
        // A storage upload id (S3's are long opaque strings) is not a marker.
        assert_eq!(post_deadline("2~abcDEF_ghi"), None);
        assert_eq!(post_deadline("forms:1"), None);
        assert_eq!(staging_key("pfx/a/uppy-1"), "pfx/a/uppy-1.post");
    }

    #[test]
    fn the_length_is_the_sum_of_parts_that_follow_the_rule() {
        assert_eq!(
            length_of_parts(&listed(3), &stored(&[5, 5, 2]), P).ok(),
            Some(12)
        );
        assert_eq!(length_of_parts(&listed(1), &stored(&[3]), P).ok(), Some(3));
        assert_eq!(
            length_of_parts(&listed(2), &stored(&[5, 5]), P).ok(),
            Some(10)
        );
    }

    #[test]
    fn parts_of_other_sizes_missing_or_out_of_order_are_refused() {
        assert!(matches!(
            length_of_parts(&listed(3), &stored(&[5, 4, 2]), P),
            Err(AppError::PartSizeMismatch { part_number: 2, .. })
        ));
        assert!(matches!(
            length_of_parts(&listed(2), &stored(&[5, 6]), P),
            Err(AppError::PartSizeMismatch { part_number: 2, .. })
        ));
        assert!(matches!(
            length_of_parts(&listed(3), &stored(&[5, 5]), P),
            Err(AppError::PartsMissing(m)) if m == vec![3]
        ));
        let wrong_etag = vec![(1, "x".to_owned())];
        assert!(matches!(
            length_of_parts(&wrong_etag, &stored(&[5]), P),
            Err(AppError::PartsMissing(m)) if m == vec![1]
        ));
        let skipped = vec![(1, "e1".to_owned()), (3, "e3".to_owned())];
        assert!(matches!(
            length_of_parts(&skipped, &stored(&[5, 5, 1]), P),
            Err(AppError::PartsMissing(_))
        ));
        assert!(matches!(
            length_of_parts(&[], &stored(&[5]), P),
            Err(AppError::PartsMissing(_))
        ));
    }
}
