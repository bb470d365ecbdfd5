//! The byte path: part upload, part listing, presigned parts, and completion.
//!
//! ## Why 5 MiB parts by default
//! S3 refuses parts under 5 MiB (except the last), so 5 MiB is the smallest part that works
//! everywhere. Smaller parts would mean more requests (each one a round trip to the gateway,
//! Redis and S3, and a row in the part index); larger parts mean longer requests, more bytes
//! re-sent after a dropped connection, and more memory in flight on slow links. 5 MiB keeps a
//! browser's retry cheap while a 5 TiB file still fits S3's 10,000-part limit once the part
//! size is raised per file (`model::part_size_for`). `MULTIPART_PART_SIZE_MB` moves the
//! trade-off (5..=100) for fast, reliable networks.
//!
//! ## MIME types are advisory until finalize
//! A part whose `Content-Type` header or leading magic bytes disagree with the file's declared
//! type is only logged at warn: clients often send `application/octet-stream` for every part,
//! and a part boundary can fall anywhere, so refusing a part would break honest uploads.
//! `finalize` checks the assembled object's first bytes and refuses with 415.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use futures_util::Stream;
use serde_json::{json, Value};

use super::{file_json, new_id, open_gate, ApiPath, AppState, JsonBody, Tenant};
use crate::error::AppError;
use crate::model::{expected_part_len, now_ms, FileRecord, FileStatus, PartRecord};
use crate::storage::{PartBody, PartChecksum, StorageError, StorageKind};
use crate::store::{BeginComplete, Gate, UploadIdSet};

/// How long one caller may hold a file's completion lease before another may take over (a
/// crashed replica must not block a file forever). It is shorter than the storage client's
/// complete timeout (15 min), and the lease is not renewed: a completion that takes longer
/// can be started a second time by another caller.
const COMPLETE_LEASE_MS: i64 = 10 * 60 * 1000;
/// How long a concurrent `complete` waits for the lease holder before answering 409
/// `requestInProgress` with `Retry-After` (the holder's storage call can take minutes; the
/// client retries instead of holding a request and polling Redis all that time).
const COMPLETE_WAIT: Duration = Duration::from_secs(5);
/// Longest pause between two looks at a file another caller is completing.
const COMPLETE_POLL_MAX: Duration = Duration::from_millis(250);
/// Completes of one file that may wait on this replica at once; more answer 409 at once.
/// With [`COMPLETE_POLL_MAX`] this bounds the Redis calls the waiters of one file make.
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
/// Validity of presigned part URLs.
const PRESIGN_TTL: Duration = Duration::from_secs(3600);

fn file_not_open(f: &FileRecord) -> AppError {
    AppError::FileNotActive(f.status.public_str())
}

/// The storage upload id of a file, creating the multipart upload on first use.
///
/// Uploads are created lazily (first part, presign or complete) rather than at
/// registration: registration stays one Redis script with no storage round trip, and a
/// rejected registration never leaves an orphan upload. Two first parts racing each create
/// one; the store keeps the first and the loser aborts its own.
async fn ensure_upload(
    state: &AppState,
    tenant: &str,
    file: &FileRecord,
) -> Result<String, AppError> {
    if let Some(id) = &file.upload_id {
        return Ok(id.clone());
    }
    let created = state
        .storage
        .create_upload(&file.object_key, file.content_type.as_deref())
        .await?;
    let now = now_ms();
    let stored = state
        .store
        .set_upload_id(tenant, &file.session_id, &file.id, &created, now)
        .await;
    // Abort the new upload whenever the store answered that it did not keep it (another id
    // won, the file or session is gone, expired or not active). A store error (a timeout,
    // say) leaves the outcome unknown: the store may have kept the id, and aborting it would
    // leave the file pointing at a dead upload forever. Left alone, an upload the store did
    // not keep is an orphan until the bucket's incomplete-upload lifecycle rule removes it
    // (deploy/OPERATIONS.md).
    let kept_or_unknown = matches!(stored, Ok(Gate::Ok(UploadIdSet::Stored)) | Err(_));
    if !kept_or_unknown {
        if let Err(e) = state.storage.abort_upload(&file.object_key, &created).await {
            tracing::warn!(error = %e, "aborting a surplus storage upload failed");
        }
    }
    match open_gate(stored?, tenant, now)? {
        UploadIdSet::Stored => Ok(created),
        UploadIdSet::Existing(id) => Ok(id),
        UploadIdSet::FileNotOpen(f) => Err(file_not_open(&f)),
    }
}

fn checksum(headers: &HeaderMap) -> Option<PartChecksum> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(v) = get("content-md5") {
        return Some(PartChecksum::ContentMd5(v));
    }
    if let Some(v) = get("x-amz-checksum-crc32") {
        return Some(PartChecksum::Crc32(v));
    }
    if let Some(v) = get("x-amz-checksum-crc32c") {
        return Some(PartChecksum::Crc32c(v));
    }
    if let Some(v) = get("x-amz-checksum-sha1") {
        return Some(PartChecksum::Sha1(v));
    }
    get("x-amz-checksum-sha256").map(PartChecksum::Sha256)
}

/// Warns (once per part) when the first bytes of part 1 contradict the declared type.
struct Sniff {
    declared: String,
    file_id: String,
}

impl Sniff {
    fn check(self, chunk: &[u8]) {
        if let Some(kind) = infer::get(chunk) {
            let detected = kind.mime_type();
            if !detected.eq_ignore_ascii_case(self.declared.split(';').next().unwrap_or("").trim())
            {
                tracing::warn!(
                    file_id = %self.file_id,
                    declared = %self.declared,
                    detected,
                    "part content's magic bytes differ from the declared content type (advisory until finalize)"
                );
            }
        }
    }
}

/// The request body as a stream that fails when the client sends nothing for `idle`
/// (slow-client protection), counting bytes as they pass.
///
/// One timer per part, not one per chunk: a chunk only records when it arrived, and the
/// timer is re-armed (to the last chunk's time plus `idle`) only when it fires while chunks
/// are still coming. A `tokio::time::timeout` per chunk inserted and removed a timer-wheel
/// entry for every chunk (a 5 MiB part arrives in well over a hundred; benches/README.md).
struct BodyStream {
    data: axum::body::BodyDataStream,
    idle: Duration,
    last_chunk: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    sniff: Option<Sniff>,
    metrics: Arc<crate::metrics::Metrics>,
    done: bool,
}

impl BodyStream {
    fn new(
        body: Body,
        idle: Duration,
        sniff: Option<Sniff>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let now = tokio::time::Instant::now();
        BodyStream {
            data: body.into_data_stream(),
            idle,
            last_chunk: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            sniff,
            metrics,
            done: false,
        }
    }
}

impl Stream for BodyStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.data).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.last_chunk = tokio::time::Instant::now();
                if let Some(s) = this.sniff.take() {
                    s.check(&chunk);
                }
                this.metrics.bytes_received.add(chunk.len() as u64);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let deadline = this.last_chunk + this.idle;
                if deadline <= tokio::time::Instant::now() {
                    this.done = true;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "part body idle too long",
                    ))));
                }
                this.timer.as_mut().reset(deadline);
            },
        }
    }
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id, part_number = %part))]
pub(super) async fn upload(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id, part)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let t = &tenant.0.id;
    let now = now_ms();
    let file = open_gate(
        state
            .store
            .get_file(t, &session_id, &file_id, true, now)
            .await?,
        t,
        now,
    )?;
    if file.status != FileStatus::Registered {
        return Err(file_not_open(&file));
    }
    let part_number = crate::validate::part_number(&part, file.part_count)?;
    let expected =
        expected_part_len(file.size_bytes, file.part_size_bytes, part_number).unwrap_or(0);
    let len = match headers.get(header::CONTENT_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                AppError::Validation(vec![crate::error::FieldError::new(
                    "Content-Length",
                    "must be a whole number",
                )])
            })?,
        // A request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112
        // 6.3): an empty part. A chunked body of unknown length is refused: the part-size
        // rule must be checked before the first byte is stored.
        None if !headers.contains_key(header::TRANSFER_ENCODING) => 0,
        None => return Err(AppError::LengthRequired),
    };
    if len != expected {
        return Err(AppError::PartSizeMismatch {
            part_number,
            expected,
            actual: len,
        });
    }
    if let (Some(declared), Some(sent)) = (
        &file.content_type,
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    ) {
        let sent_essence = sent.split(';').next().unwrap_or("").trim();
        let declared_essence = declared.split(';').next().unwrap_or("").trim();
        if !sent_essence.eq_ignore_ascii_case(declared_essence)
            && !sent_essence.eq_ignore_ascii_case("application/octet-stream")
        {
            tracing::warn!(declared = %declared, sent = %sent, "part Content-Type differs from the declared content type (advisory until finalize)");
        }
    }
    let upload_id = ensure_upload(&state, t, &file).await?;
    let sniff = match (&file.content_type, part_number) {
        (Some(declared), 1) => Some(Sniff {
            declared: declared.clone(),
            file_id: file.id.clone(),
        }),
        _ => None,
    };
    let stream = BodyStream::new(
        body,
        state.config.part_idle_timeout,
        sniff,
        state.metrics.clone(),
    );
    let part_body = PartBody {
        stream: Box::pin(stream),
        len,
    };
    let etag = state
        .storage
        .put_part(
            &file.object_key,
            &upload_id,
            part_number,
            part_body,
            checksum(&headers),
        )
        .await?;
    state.metrics.bytes_stored.add(len);
    let record = PartRecord {
        part_number,
        etag: etag.clone(),
        size_bytes: len,
    };
    let now = now_ms();
    let after = open_gate(
        state
            .store
            .record_part(t, &session_id, &file_id, &record, now)
            .await?,
        t,
        now,
    )?;
    if after.status != FileStatus::Registered {
        return Err(file_not_open(&after));
    }
    let quoted = HeaderValue::from_str(&format!("\"{etag}\""))
        .map_err(|e| AppError::Internal(format!("etag header: {e}")))?;
    Ok((
        [(header::ETAG, quoted)],
        Json(json!({"partNumber": part_number, "etag": etag, "sizeBytes": len})),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, AppError> {
    let t = &tenant.0.id;
    let now = now_ms();
    let parts = open_gate(
        state
            .store
            .list_parts(t, &session_id, &file_id, now)
            .await?,
        t,
        now,
    )?;
    Ok(Json(json!({ "parts": parts })))
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn presign(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let t = &tenant.0.id;
    let now = now_ms();
    let file = open_gate(
        state
            .store
            .get_file(t, &session_id, &file_id, true, now)
            .await?,
        t,
        now,
    )?;
    if state.storage.kind() != StorageKind::S3 {
        return Err(AppError::NotSupported);
    }
    if file.status != FileStatus::Registered {
        return Err(file_not_open(&file));
    }
    let numbers = crate::validate::presign_numbers(&body, file.part_count)?;
    let upload_id = ensure_upload(&state, t, &file).await?;
    let mut parts = Vec::with_capacity(numbers.len());
    for n in numbers {
        // The URL signs the part's exact length: storage refuses any other size.
        let len = expected_part_len(file.size_bytes, file.part_size_bytes, n)
            .ok_or_else(|| AppError::Internal(format!("part {n} out of range after validation")))?;
        let url = state
            .storage
            .presign_part(&file.object_key, &upload_id, n, len, PRESIGN_TTL)
            .await?;
        parts.push(json!({"partNumber": n, "url": url, "method": "PUT"}));
    }
    let expires_at = now / 1000 + PRESIGN_TTL.as_secs() as i64;
    let mut res = Json(json!({"parts": parts, "expiresAt": crate::model::rfc3339(expires_at)}))
        .into_response();
    // The URLs expire long before an idempotency record would: a retry gets fresh ones.
    res.extensions_mut()
        .insert(upgate_layers::idempotency::NotReplayable);
    Ok(res)
}

/// The parts to complete with, checked against the part-size rule.
///
/// Which parts: the client's list (presigned uploads), or the parts the gateway recorded,
/// topped up from storage's part list (parts PUT through presigned URLs bypass the gateway).
///
/// Their sizes: every part must have the length the part-size rule gives it, which also
/// makes them add up to `sizeBytes` (`../shared/API.md` v1.1), so a presigned or
/// client-listed part of another size is refused with 400 `partSizeMismatch` before storage
/// assembles anything. A size comes from the recorded part when its ETag matches (checked
/// when it was PUT through the gateway), else from storage's part list; storage is listed
/// at most once, and only when some part did not come through the gateway. If the upload is
/// gone from storage, unknown sizes are left to `complete_upload`, which then finds the
/// object or reports the upload aborted.
async fn parts_to_complete(
    state: &AppState,
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
        match state.storage.list_parts(&file.object_key, upload_id).await {
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
            // Parts past the file's last (none can be uploaded or presigned) never join in.
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

/// The storage side of completion, run by the one caller holding the lease.
async fn complete_in_storage(
    state: &AppState,
    tenant: &str,
    file: &FileRecord,
    recorded: Vec<PartRecord>,
    client: Option<Vec<crate::validate::ClientPart>>,
) -> Result<String, AppError> {
    if file.upload_id.is_none() && file.size_bytes > 0 {
        // Not one byte was sent: no storage upload to create just to refuse it.
        return Err(AppError::PartsMissing((1..=file.part_count).collect()));
    }
    let upload_id = ensure_upload(state, tenant, file).await?;
    let mut recorded = recorded;
    // A zero-byte file has one empty part; create it if the client did not bother.
    if file.size_bytes == 0 && client.is_none() && recorded.is_empty() {
        let body = PartBody {
            stream: Box::pin(futures_util::stream::empty()),
            len: 0,
        };
        let etag = state
            .storage
            .put_part(&file.object_key, &upload_id, 1, body, None)
            .await?;
        recorded.push(PartRecord {
            part_number: 1,
            etag,
            size_bytes: 0,
        });
    }
    let parts = parts_to_complete(state, file, &upload_id, client, recorded).await?;
    match state
        .storage
        .complete_upload(&file.object_key, &upload_id, &parts)
        .await
    {
        Ok(etag) => Ok(etag),
        // Storage already completed this upload (an earlier holder crashed before recording
        // it): the object is there, so the completion stands.
        Err(StorageError::NoSuchUpload) => match state.storage.head_object(&file.object_key).await?
        {
            Some(info) => Ok(info.etag),
            None => Err(AppError::FileNotActive("aborted")),
        },
        Err(e) => Err(e.into()),
    }
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn complete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let t = &tenant.0.id;
    let token = new_id();
    let deadline = tokio::time::Instant::now() + COMPLETE_WAIT;
    let mut backoff = Duration::from_millis(5);
    let mut waiting: Option<WaiterGuard> = None;
    let mut waited = false;
    loop {
        let now = now_ms();
        let gate = state
            .store
            .begin_complete(t, &session_id, &file_id, &token, COMPLETE_LEASE_MS, now)
            .await?;
        match open_gate(gate, t, now)? {
            BeginComplete::AlreadyCompleted(f) => {
                if !waited {
                    // Nothing was waited for: this is a repeated complete, not a concurrent one.
                    tracing::warn!(file_url = ?f.file_url, "file already completed: answering the idempotent re-completion with the stored result");
                }
                return Ok(Json(file_json(&f)).into_response());
            }
            BeginComplete::Aborted => return Err(AppError::FileNotActive("aborted")),
            BeginComplete::InProgress => {
                waited = true;
                if waiting.is_none() {
                    waiting = Some(
                        state
                            .completion_waiters
                            .join(&file_id)
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
                let parsed = crate::validate::complete_parts(&body, file.part_count);
                let result = match parsed {
                    Ok(client) => complete_in_storage(&state, t, &file, recorded, client).await,
                    Err(e) => Err(e),
                };
                let etag = match result {
                    Ok(etag) => etag,
                    Err(e) => {
                        // Give the lease back so the next attempt (or a waiter) can try again.
                        if let Err(release) = state
                            .store
                            .release_complete(t, &session_id, &file_id, &token)
                            .await
                        {
                            tracing::warn!(error = %release, "releasing the completion lease failed; it expires by itself");
                        }
                        return Err(e);
                    }
                };
                let url = state.storage.file_url(&file.object_key);
                let finished = state
                    .store
                    .finish_complete(t, &session_id, &file_id, &token, &url, &etag)
                    .await?;
                match open_gate(finished, t, now)? {
                    Some(f) => {
                        state.metrics.files_completed.inc();
                        tracing::info!(file_url = %url, "file completed");
                        return Ok(Json(file_json(&f)).into_response());
                    }
                    // Our lease ran out and someone else took over: their result stands.
                    None => continue,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(10);

    /// A body that yields `chunks` one-byte chunks, each after `gap`, then stays silent for
    /// `silence` before ending.
    fn slow_body(chunks: usize, gap: Duration, silence: Duration) -> Body {
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            if i < chunks {
                tokio::time::sleep(gap).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), i + 1))
            } else {
                tokio::time::sleep(silence).await;
                None
            }
        });
        Body::from_stream(stream)
    }

    async fn drain(body: Body) -> (usize, Option<std::io::Error>, Duration) {
        let started = tokio::time::Instant::now();
        let mut s = BodyStream::new(body, IDLE, None, Arc::default());
        let mut chunks = 0;
        while let Some(item) = futures_util::StreamExt::next(&mut s).await {
            match item {
                Ok(_) => chunks += 1,
                Err(e) => {
                    // A failed body stays ended.
                    assert!(futures_util::StreamExt::next(&mut s).await.is_none());
                    return (chunks, Some(e), started.elapsed());
                }
            }
        }
        (chunks, None, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_sending_is_never_cut_off_however_long_it_takes() {
        // 12 gaps of 0.9 x idle: the part takes 10.8 idle periods, and the one timer fires
        // and is re-armed many times on the way.
        let (chunks, err, took) = drain(slow_body(12, IDLE * 9 / 10, Duration::ZERO)).await;
        assert_eq!(chunks, 12);
        assert!(err.is_none(), "unexpected error: {err:?}");
        assert!(took >= IDLE * 10, "took {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_exactly_one_idle_period_after_its_last_chunk() {
        // Chunks at 0.5, 1.0 and 1.5 idle periods, then silence: the error comes at 2.5.
        let (chunks, err, took) = drain(slow_body(3, IDLE / 2, IDLE * 5)).await;
        assert_eq!(chunks, 3);
        let err = err.expect("the stalled body must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let expected = IDLE * 5 / 2;
        assert!(
            took >= expected && took <= expected + Duration::from_millis(5),
            "failed after {took:?}, expected {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_starts_fails_after_one_idle_period() {
        let (chunks, err, took) = drain(slow_body(0, Duration::ZERO, IDLE * 3)).await;
        assert_eq!(chunks, 0);
        assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::TimedOut));
        assert!(
            took >= IDLE && took <= IDLE + Duration::from_millis(5),
            "took {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_counted_and_a_complete_body_ends_cleanly() {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let body = Body::from(Bytes::from_static(b"hello world"));
        let mut s = BodyStream::new(body, IDLE, None, metrics.clone());
        let mut got = Vec::new();
        while let Some(item) = futures_util::StreamExt::next(&mut s).await {
            got.extend_from_slice(&item.expect("chunk"));
        }
        assert_eq!(got, b"hello world");
        assert!(futures_util::StreamExt::next(&mut s).await.is_none());
        assert_eq!(metrics.bytes_received.get(), 11);
    }
}
