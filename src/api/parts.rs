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

use super::{file_json, ApiPath, AppState, JsonBody, Tenant};
use crate::error::AppError;
use crate::storage::{PartBody, PartChecksum};
use crate::uploads::parts::PartRequest;

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
pub(super) struct Sniff {
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
pub(super) struct BodyStream {
    data: axum::body::BodyDataStream,
    idle: Duration,
    last_chunk: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    sniff: Option<Sniff>,
    metrics: Arc<crate::metrics::Metrics>,
    done: bool,
}

impl BodyStream {
    pub(super) fn new(
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
                this.metrics.bytes_received.inc_by(chunk.len() as u64);
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

/// The request's `Content-Length`: a request with neither it nor `Transfer-Encoding` has no
/// body (RFC 9112 6.3), an empty part; a chunked body of unknown length is refused, since
/// the part-size rule must be checked before the first byte is stored.
fn content_length(headers: &HeaderMap) -> Result<u64, AppError> {
    match headers.get(header::CONTENT_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                AppError::Validation(vec![crate::error::FieldError::new(
                    "Content-Length",
                    "must be a whole number",
                )])
            }),
        None if !headers.contains_key(header::TRANSFER_ENCODING) => Ok(0),
        None => Err(AppError::LengthRequired),
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
    let req = PartRequest {
        part_number: &part,
        length: content_length(&headers),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        checksum: checksum(&headers),
    };
    let idle = state.config.part_idle_timeout;
    let metrics = state.metrics.clone();
    let sniff_file = file_id.clone();
    let record = state
        .uploads
        .upload_part(&tenant.0.id, &session_id, &file_id, req, |len, declared| {
            let sniff = declared.map(|declared| Sniff {
                declared,
                file_id: sniff_file,
            });
            PartBody {
                stream: Box::pin(BodyStream::new(body, idle, sniff, metrics)),
                len,
                offset: None,
            }
        })
        .await?;
    let quoted = HeaderValue::from_str(&format!("\"{}\"", record.etag))
        .map_err(|e| AppError::Internal(format!("etag header: {e}")))?;
    Ok((
        [(header::ETAG, quoted)],
        Json(json!({"partNumber": record.part_number, "etag": record.etag, "sizeBytes": record.size_bytes})),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<crate::auth::SessionScope>>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, AppError> {
    if scope.is_some() {
        // An upload token on a deleted session gets 404; the part list answers for any
        // file, so the file's status is read first (only for tokens).
        let now = crate::model::now_ms();
        let gate = state
            .store
            .get_file(&tenant.0.id, &session_id, &file_id, false, now)
            .await?;
        let file = super::open_gate(gate, &tenant.0.id, now)?;
        if file.status == crate::model::FileStatus::Aborted {
            return Err(AppError::SessionNotFound);
        }
    }
    let parts = state
        .uploads
        .list_parts(&tenant.0.id, &session_id, &file_id)
        .await?;
    Ok(Json(json!({ "parts": parts })))
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn presign(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let presigned = state
        .uploads
        .presign(&tenant.0.id, &session_id, &file_id, &body)
        .await?;
    let parts: Vec<Value> = presigned
        .parts
        .iter()
        .map(|(n, url)| json!({"partNumber": n, "url": url, "method": "PUT"}))
        .collect();
    let mut res = Json(json!({
        "parts": parts,
        "expiresAt": crate::model::rfc3339(presigned.expires_at),
    }))
    .into_response();
    // The URLs expire long before an idempotency record would: a retry gets fresh ones.
    res.extensions_mut()
        .insert(upgate_layers::idempotency::NotReplayable);
    Ok(res)
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn complete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let file = state
        .uploads
        .complete(&tenant.0.id, &session_id, &file_id, &body)
        .await?;
    Ok(Json(file_json(&file)).into_response())
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
