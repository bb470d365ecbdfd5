//! [`S3Store`]: S3 or any S3-compatible server, through aws-sdk-s3 multipart uploads.
//!
//! * Keys: `<prefix>/<tenant prefix><session id>/<file key>`; `fileUrl` is `s3://<bucket>/<key>`.
//! * Parts are streamed: the [`PartBody`] becomes an `http_body::Body` that hands the SDK one
//!   chunk at a time (bounded memory, back-pressure), sent with its exact `Content-Length`
//!   and `UNSIGNED-PAYLOAD` (a stream cannot be hashed before it is sent). Such a body cannot
//!   be replayed, so a part upload is attempted once; the SDK also refuses to rewind it.
//! * The SDK computes request checksums only where an operation requires one and validates
//!   response checksums likewise (`WhenRequired`): the default (`WhenSupported`) would switch
//!   part uploads to `aws-chunked` trailers, which several S3-compatible servers reject.
//!   Checksums the client sent are passed through as headers.
//! * Every call is bounded: connect 3 s, 30 s per attempt, 60 s per operation including
//!   retries; a part upload gets 30 s plus the time to move its bytes at 256 KiB/s (about
//!   7 minutes for a 100 MiB part), because it runs at the speed of the uploading client.
//!   A dead endpoint therefore answers [`StorageError::Unavailable`] instead of hanging.
//! * ETags are kept unquoted and quoted again when sent to S3.
//! * Errors: the SDK's full detail goes to the log, the returned [`StorageError`] carries a
//!   short message only (the error code or failure kind).

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, MetadataDirective, ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body::{Frame, SizeHint};

use super::attributes::{s3_metadata, Sse};
use super::{
    ObjectAttributes, ObjectInfo, ObjectStore, PartBody, PartChecksum, PresignedPost, StorageError,
    StorageKind,
};
use crate::model::PartRecord;

/// Timeouts of the S3 client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S3Timeouts {
    /// TCP/TLS connect.
    pub connect: Duration,
    /// One attempt of one call (ignored for part uploads, see `part_base`).
    pub attempt: Duration,
    /// One call including its retries.
    pub operation: Duration,
    /// CompleteMultipartUpload (it can take minutes for large objects).
    pub complete: Duration,
    /// A part upload gets this much ...
    pub part_base: Duration,
    /// ... plus the time to send its bytes at this rate (bytes per second).
    pub part_min_rate: u64,
}

impl Default for S3Timeouts {
    fn default() -> Self {
        S3Timeouts {
            connect: Duration::from_secs(3),
            attempt: Duration::from_secs(30),
            operation: Duration::from_secs(60),
            complete: Duration::from_secs(15 * 60),
            part_base: Duration::from_secs(30),
            part_min_rate: 256 * 1024,
        }
    }
}

impl S3Timeouts {
    /// The whole-call deadline for uploading a part of `len` bytes.
    pub fn part_deadline(&self, len: u64) -> Duration {
        self.part_base + Duration::from_secs(len / self.part_min_rate.max(1))
    }
}

/// Where and how to reach S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (empty: keys start at the bucket root).
    pub prefix: String,
    /// Endpoint URL of an S3-compatible server; `None` is AWS.
    pub endpoint: Option<String>,
    /// Signing region.
    pub region: String,
    /// Path-style addressing (`http://host/bucket/key`), needed by most S3-compatible servers.
    pub force_path_style: bool,
    /// Client timeouts.
    pub timeouts: S3Timeouts,
}

impl S3Settings {
    /// Settings for `bucket` with no prefix, AWS, `us-east-1`, virtual-hosted style.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Settings {
            bucket: bucket.into(),
            prefix: String::new(),
            endpoint: None,
            region: "us-east-1".to_owned(),
            force_path_style: false,
            timeouts: S3Timeouts::default(),
        }
    }

    /// Parses the `storage` setting `s3://bucket/optional/prefix` (other fields default).
    pub fn from_url(url: &str) -> Result<Self, StorageError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| StorageError::unavailable(format!("not an s3:// URL: {url}")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StorageError::unavailable(format!("no bucket in {url}")));
        }
        let mut settings = S3Settings::new(bucket);
        settings.prefix = normalize_prefix(prefix);
        Ok(settings)
    }
}

/// `/a//b/` → `a/b`.
fn normalize_prefix(prefix: &str) -> String {
    prefix
        .split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// S3 (or compatible) [`ObjectStore`].
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    timeouts: S3Timeouts,
    /// The credentials, for the policies of browser form uploads (the client keeps its own
    /// and no longer shows them).
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds the client from the standard AWS configuration chain (environment, profile,
    /// web identity, ECS/IMDS credentials) and `settings`.
    pub async fn new(settings: S3Settings) -> Result<Self, StorageError> {
        let sdk = Self::load_sdk_config(&settings.region).await;
        Self::with_sdk_config(&sdk, settings)
    }

    /// The standard AWS configuration chain's result for `region`: what
    /// [`S3Store::with_sdk_config`] needs; one can serve several stores (they then share
    /// one credential cache).
    pub async fn load_sdk_config(region: &str) -> aws_config::SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .load()
            .await
    }

    /// Builds the client from an already loaded AWS configuration (its credentials, HTTP
    /// client, ...) and `settings` (endpoint, region, addressing, timeouts, checksums).
    pub fn with_sdk_config(
        sdk: &aws_config::SdkConfig,
        settings: S3Settings,
    ) -> Result<Self, StorageError> {
        if settings.bucket.is_empty() {
            return Err(StorageError::unavailable("S3 bucket name is empty"));
        }
        let t = settings.timeouts;
        let mut conf = aws_sdk_s3::config::Builder::from(sdk)
            .region(Region::new(settings.region.clone()))
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(t.connect)
                    .operation_attempt_timeout(t.attempt)
                    .operation_timeout(t.operation)
                    .build(),
            );
        if let Some(endpoint) = &settings.endpoint {
            conf = conf.endpoint_url(endpoint);
        }
        Ok(S3Store {
            client: Client::from_conf(conf.build()),
            bucket: settings.bucket,
            prefix: normalize_prefix(&settings.prefix),
            timeouts: t,
            credentials: sdk.credentials_provider(),
        })
    }

    /// Wraps a ready client (tests). The client's own configuration applies as is, except
    /// that part uploads always get the single attempt and deadline described in the module
    /// docs (with [`S3Timeouts::default`]).
    pub fn from_client(client: Client, bucket: impl Into<String>, prefix: impl AsRef<str>) -> Self {
        S3Store {
            client,
            bucket: bucket.into(),
            prefix: normalize_prefix(prefix.as_ref()),
            timeouts: S3Timeouts::default(),
            credentials: None,
        }
    }

    /// The same store signing browser form uploads with `credentials` (a store made with
    /// [`S3Store::from_client`] has none until given them).
    pub fn with_credentials(
        mut self,
        credentials: impl aws_sdk_s3::config::ProvideCredentials + 'static,
    ) -> Self {
        self.credentials = Some(aws_sdk_s3::config::SharedCredentialsProvider::new(
            credentials,
        ));
        self
    }

    /// The same store with other deadlines for the calls that set their own (parts and
    /// completion; tests shorten them).
    pub fn with_timeouts(mut self, timeouts: S3Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The deadlines of a call S3 may take minutes over (completing or copying an object of
    /// thousands of parts): `complete` per attempt and in all.
    fn long_call(&self) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(self.timeouts.connect)
                .operation_attempt_timeout(self.timeouts.complete)
                .operation_timeout(self.timeouts.complete)
                .build(),
        )
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix (no leading or trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Bytes of a key kept as they are in `x-amz-copy-source` (which is percent-encoded).
const COPY_SOURCE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Sets an object's attributes on a CreateMultipartUpload or CopyObject request: two builder
/// types with the same setters.
macro_rules! with_attributes {
    ($request:expr, $attrs:expr) => {{
        let attrs: &ObjectAttributes = $attrs;
        let (sse, kms_key) = sse_headers(attrs.sse.as_ref());
        $request
            .set_content_type(attrs.content_type.clone())
            .set_content_disposition(attrs.content_disposition.clone())
            .set_metadata(user_metadata(attrs))
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms_key)
            .set_storage_class(attrs.storage_class.as_deref().map(StorageClass::from))
    }};
}

/// `x-amz-server-side-encryption` and `x-amz-server-side-encryption-aws-kms-key-id`.
fn sse_headers(sse: Option<&Sse>) -> (Option<ServerSideEncryption>, Option<String>) {
    match sse {
        None => (None, None),
        Some(Sse::Aes256) => (Some(ServerSideEncryption::Aes256), None),
        Some(Sse::Kms { key_id }) => (Some(ServerSideEncryption::AwsKms), key_id.clone()),
    }
}

fn user_metadata(attrs: &ObjectAttributes) -> Option<std::collections::HashMap<String, String>> {
    (!attrs.metadata.is_empty()).then(|| s3_metadata(&attrs.metadata).into_iter().collect())
}

fn unquote(etag: &str) -> String {
    etag.trim().trim_matches('"').to_owned()
}

fn quote(etag: &str) -> String {
    format!("\"{}\"", etag.trim().trim_matches('"'))
}

fn part_number_i32(n: u32) -> Result<i32, StorageError> {
    i32::try_from(n).map_err(|_| StorageError::InvalidPart(format!("part number {n} out of range")))
}

/// What an SDK failure means for the caller. `body_failure` is set when the client's body
/// failed (then the SDK error is only its consequence).
fn classify<E, R>(
    op: &'static str,
    err: &SdkError<E, R>,
    body_failure: Option<String>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + HasStatus,
{
    if let Some(msg) = body_failure {
        tracing::debug!(op, error = %DisplayErrorContext(err), "S3 call ended by the request body");
        return StorageError::Body(msg);
    }
    // An error inside a 200 (CompleteMultipartUpload) that the SDK could not parse still
    // carries its code in the raw body.
    let code = err
        .code()
        .map(str::to_owned)
        .or_else(|| err.raw_response().and_then(HasStatus::error_code));
    let mapped = match code.as_deref() {
        Some(c) => from_code(op, c),
        None => StorageError::Unavailable(format!(
            "S3 {op}: {}",
            match err {
                SdkError::TimeoutError(_) => "timed out",
                SdkError::DispatchFailure(_) => "unreachable",
                SdkError::ResponseError(_) => "bad response",
                SdkError::ConstructionFailure(_) => "request not built",
                _ => "failed",
            }
        )),
    };
    if matches!(mapped, StorageError::Unavailable(_)) {
        tracing::warn!(op, error = %DisplayErrorContext(err), "S3 call failed");
    } else {
        tracing::debug!(op, error = %DisplayErrorContext(err), "S3 call refused");
    }
    mapped
}

/// What an S3 error code means for the gateway.
fn from_code(op: &'static str, code: &str) -> StorageError {
    match code {
        "NoSuchUpload" => StorageError::NoSuchUpload,
        "BadDigest" | "InvalidDigest" | "XAmzContentChecksumMismatch" => StorageError::BadDigest,
        c @ ("InvalidPart" | "InvalidPartOrder" | "EntityTooSmall") => {
            StorageError::InvalidPart(c.to_owned())
        }
        // Errors a retry cannot fix: a 4xx for the client, not a 503 it retries forever.
        c @ ("KeyTooLongError" | "KeyTooLong") => StorageError::Refused {
            field: "fileKey",
            reason: c.to_owned(),
        },
        // A conditional copy's source changed.
        c @ "PreconditionFailed" => StorageError::Refused {
            field: "ifMatch",
            reason: c.to_owned(),
        },
        c @ ("EntityTooLarge" | "MaxMessageLengthExceeded") => StorageError::Refused {
            field: "body",
            reason: c.to_owned(),
        },
        // S3 gave up waiting for a part's body, which the client streams: it sent too slowly.
        // Other calls' bodies come from the gateway: a retryable storage failure.
        "RequestTimeout" if op == "UploadPart" => {
            StorageError::Body("storage timed out waiting for the request body".into())
        }
        c => StorageError::Unavailable(format!("S3 {op}: {c}")),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A [`PartBody`] as an `http_body::Body`: yields the client's chunks as they arrive (so
/// memory stays at one chunk and a slow S3 slows the client), enforces the exact length,
/// and records why the client's body failed so the error can be reported as
/// [`StorageError::Body`] rather than as a storage failure.
struct PartStreamBody {
    // The Mutex only makes the body `Sync` (the SDK requires it); it is never contended:
    // polling goes through `Mutex::get_mut`.
    stream: Mutex<ChunkStream>,
    remaining: u64,
    failure: Arc<Mutex<Option<String>>>,
    done: bool,
}

impl PartStreamBody {
    fn fail(&mut self, msg: String) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.done = true;
        let err = std::io::Error::other(msg.clone());
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(msg);
        Poll::Ready(Some(Err(err)))
    }
}

impl http_body::Body for PartStreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.remaining == 0 {
            this.done = true;
            return Poll::Ready(None);
        }
        let stream = this
            .stream
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        match stream.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                let len = chunk.len() as u64;
                if len > this.remaining {
                    return this.fail("request body is longer than its Content-Length".to_owned());
                }
                this.remaining -= len;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => this.fail(format!("request body failed: {e}")),
            Poll::Ready(None) => {
                let short = this.remaining;
                this.fail(format!("request body ended {short} bytes short"))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn kind(&self) -> StorageKind {
        StorageKind::S3
    }

    fn object_key(
        &self,
        tenant_prefix: &str,
        session_id: &str,
        file_id: &str,
        file_key: &str,
    ) -> String {
        let tenant_prefix = tenant_prefix.trim_start_matches('/');
        let mut key = String::with_capacity(
            self.prefix.len()
                + 1
                + tenant_prefix.len()
                + session_id.len()
                + 1
                + file_id.len()
                + 1
                + file_key.len(),
        );
        if !self.prefix.is_empty() {
            key.push_str(&self.prefix);
            key.push('/');
        }
        key.push_str(tenant_prefix);
        key.push_str(session_id);
        key.push('/');
        key.push_str(file_id);
        key.push('/');
        key.push_str(file_key);
        key
    }

    fn file_url(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    #[tracing::instrument(level = "debug", skip(self, attrs), fields(bucket = %self.bucket))]
    async fn create_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        let request = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key);
        let out = with_attributes!(request, attrs)
            .send()
            .await
            .map_err(|e| classify("CreateMultipartUpload", &e, None))?;
        out.upload_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| StorageError::unavailable("S3 CreateMultipartUpload: no upload id"))
    }

    #[tracing::instrument(level = "debug", skip(self, attrs), fields(bucket = %self.bucket))]
    async fn replace_attributes(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        // CopyObject onto itself with REPLACE: S3 rewrites the object server-side (the bytes
        // never pass through the gateway).
        self.copy_object(key, key, attrs, None).await
    }

    #[tracing::instrument(level = "debug", skip(self, attrs), fields(bucket = %self.bucket))]
    async fn copy_object(
        &self,
        from: &str,
        to: &str,
        attrs: &ObjectAttributes,
        if_match: Option<&str>,
    ) -> Result<String, StorageError> {
        // REPLACE: the encryption and storage class are not copied, so all the attributes
        // are sent again.
        let source = format!(
            "{}/{}",
            self.bucket,
            percent_encoding::utf8_percent_encode(from, COPY_SOURCE)
        );
        let request = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(source)
            .set_copy_source_if_match(if_match.map(|e| format!("\"{}\"", e.trim_matches('"'))))
            .metadata_directive(MetadataDirective::Replace);
        let out = with_attributes!(request, attrs)
            .customize()
            .config_override(self.long_call())
            .send()
            .await
            .map_err(|e| classify("CopyObject", &e, None))?;
        out.copy_object_result
            .and_then(|r| r.e_tag)
            .map(|e| unquote(&e))
            .ok_or_else(|| StorageError::unavailable("S3 CopyObject: no ETag"))
    }

    #[tracing::instrument(level = "debug", skip(self, body, checksum), fields(bucket = %self.bucket, len = body.len))]
    async fn put_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: PartBody,
        checksum: Option<PartChecksum>,
    ) -> Result<String, StorageError> {
        let part = part_number_i32(part_number)?;
        let len = body.len;
        let content_length = i64::try_from(len)
            .map_err(|_| StorageError::Body("part length out of range".to_owned()))?;
        let failure = Arc::new(Mutex::new(None));
        let http_body = PartStreamBody {
            stream: Mutex::new(body.stream),
            remaining: len,
            failure: failure.clone(),
            done: false,
        };
        let mut req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part)
            .content_length(content_length)
            .body(ByteStream::from_body_1_x(http_body));
        req = match checksum {
            None => req,
            Some(PartChecksum::ContentMd5(v)) => req.content_md5(v),
            Some(PartChecksum::Crc32(v)) => req.checksum_crc32(v),
            Some(PartChecksum::Crc32c(v)) => req.checksum_crc32_c(v),
            Some(PartChecksum::Sha1(v)) => req.checksum_sha1(v),
            Some(PartChecksum::Sha256(v)) => req.checksum_sha256(v),
        };
        let deadline = self.timeouts.part_deadline(len);
        let result = req
            .customize()
            .disable_payload_signing()
            .config_override(
                aws_sdk_s3::config::Builder::default()
                    // A streamed body cannot be replayed: one attempt.
                    .retry_config(RetryConfig::standard().with_max_attempts(1))
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(self.timeouts.connect)
                            .operation_attempt_timeout(deadline)
                            .operation_timeout(deadline)
                            .build(),
                    ),
            )
            .send()
            .await;
        let body_failure = failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match result {
            Ok(out) => match out.e_tag() {
                Some(etag) if !etag.trim().trim_matches('"').is_empty() => Ok(unquote(etag)),
                _ => Err(StorageError::unavailable("S3 UploadPart: no ETag")),
            },
            Err(e) => Err(classify("UploadPart", &e, body_failure)),
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<PartRecord>, StorageError> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        // 10,000 parts at 1,000 a page is 10 pages; the cap only guards against a server
        // that keeps answering "truncated".
        for _page in 0..64 {
            let out = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| classify("ListParts", &e, None))?;
            for p in out.parts() {
                let (Some(number), Some(etag)) = (p.part_number(), p.e_tag()) else {
                    return Err(StorageError::unavailable(
                        "S3 ListParts: part without number or ETag",
                    ));
                };
                let part_number = u32::try_from(number)
                    .map_err(|_| StorageError::unavailable("S3 ListParts: negative part number"))?;
                parts.push(PartRecord {
                    part_number,
                    etag: unquote(etag),
                    size_bytes: p.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                });
            }
            if out.is_truncated() != Some(true) {
                parts.sort_by_key(|p| p.part_number);
                parts.dedup_by_key(|p| p.part_number);
                return Ok(parts);
            }
            match out.next_part_number_marker() {
                Some(next) if marker.as_deref() != Some(next) && !next.is_empty() => {
                    marker = Some(next.to_owned())
                }
                _ => {
                    return Err(StorageError::unavailable(
                        "S3 ListParts: pagination did not advance",
                    ))
                }
            }
        }
        Err(StorageError::unavailable("S3 ListParts: too many pages"))
    }

    #[tracing::instrument(level = "debug", skip(self, parts), fields(bucket = %self.bucket, parts = parts.len()))]
    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError> {
        if parts.is_empty() {
            return Err(StorageError::InvalidPart("no parts".to_owned()));
        }
        let completed = parts
            .iter()
            .map(|(n, etag)| {
                Ok(CompletedPart::builder()
                    .part_number(part_number_i32(*n)?)
                    .e_tag(quote(etag))
                    .build())
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        // An error inside a 200 answer is parsed by the SDK into an error here. S3 documents
        // that completing a large upload can take minutes (it answers 200 early and keeps
        // the connection alive with whitespace), so this call gets its own long deadline.
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .customize()
            .config_override(self.long_call())
            .send()
            .await
            .map_err(|e| classify("CompleteMultipartUpload", &e, None))?;
        match out.e_tag() {
            Some(etag) if !unquote(etag).is_empty() => Ok(unquote(etag)),
            _ => match self.head_object(key).await? {
                Some(info) => Ok(info.etag),
                None => Err(StorageError::unavailable(
                    "S3 CompleteMultipartUpload: no ETag",
                )),
            },
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match classify("AbortMultipartUpload", &e, None) {
                StorageError::NoSuchUpload => Ok(()),
                other => Err(other),
            },
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn head_object(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectInfo {
                etag: out.e_tag().map(unquote).unwrap_or_default(),
                size: out
                    .content_length()
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(classify("HeadObject", &e, None)),
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn read_range(&self, key: &str, start: u64, n: usize) -> Result<Bytes, StorageError> {
        if n == 0 {
            return Ok(Bytes::new());
        }
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={start}-{}", start + n as u64 - 1))
            .send()
            .await
        {
            Ok(out) => out,
            // A range from the object's end on (an empty object's head too) is
            // unsatisfiable: there is nothing there.
            Err(e) if e.code() == Some("InvalidRange") || http_status(&e) == Some(416) => {
                return Ok(Bytes::new())
            }
            Err(e) if is_not_found(&e) => {
                return Err(StorageError::unavailable("S3 GetObject: object not found"))
            }
            Err(e) => return Err(classify("GetObject", &e, None)),
        };
        // A server that ignored the range sends the object from its start: right for a
        // head (read at most `n` bytes), wrong from anywhere else.
        if start > 0 && out.content_range().is_none() {
            return Err(StorageError::unavailable(
                "S3 GetObject: the server ignored the range",
            ));
        }
        let mut body = out.body;
        let mut buf = BytesMut::with_capacity(n.min(64 * 1024));
        let read = async {
            while buf.len() < n {
                match body.try_next().await {
                    Ok(Some(chunk)) => {
                        let take = chunk.len().min(n - buf.len());
                        buf.extend_from_slice(&chunk[..take]);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %DisplayErrorContext(&e), "S3 GetObject body failed");
                        return Err(StorageError::unavailable("S3 GetObject: body failed"));
                    }
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.timeouts.attempt, read)
            .await
            .map_err(|_| StorageError::unavailable("S3 GetObject: body timed out"))??;
        Ok(buf.freeze())
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(classify("DeleteObject", &e, None)),
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        content_length: u64,
        expires_in: Duration,
    ) -> Result<String, StorageError> {
        let content_length = i64::try_from(content_length)
            .map_err(|_| StorageError::unavailable("presign: part length out of range"))?;
        let config = PresigningConfig::expires_in(expires_in)
            .map_err(|e| StorageError::unavailable(format!("presign: {e}")))?;
        let presigned = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number_i32(part_number)?)
            .content_length(content_length)
            .presigned(config)
            .await
            .map_err(|e| classify("presign UploadPart", &e, None))?;
        Ok(presigned.uri().to_owned())
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn presign_part_any_size(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        expires_in: Duration,
    ) -> Result<String, StorageError> {
        let config = PresigningConfig::expires_in(expires_in)
            .map_err(|e| StorageError::unavailable(format!("presign: {e}")))?;
        let presigned = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number_i32(part_number)?)
            .presigned(config)
            .await
            .map_err(|e| classify("presign UploadPart", &e, None))?;
        Ok(presigned.uri().to_owned())
    }

    #[tracing::instrument(level = "debug", skip(self, attrs), fields(bucket = %self.bucket))]
    async fn presign_post(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        max_len: u64,
        expires_in: Duration,
    ) -> Result<PresignedPost, StorageError> {
        use aws_sdk_s3::config::ProvideCredentials as _;
        let conf = self.client.config();
        let provider = self
            .credentials
            .as_ref()
            .ok_or_else(|| StorageError::unavailable("presign POST: no S3 credentials"))?;
        let creds = provider
            .provide_credentials()
            .await
            .map_err(|e| StorageError::unavailable(format!("presign POST: credentials: {e}")))?;
        let region = conf
            .region()
            .map(|r| r.as_ref().to_owned())
            .unwrap_or_else(|| "us-east-1".to_owned());
        // The bucket's URL is the one the SDK addresses (endpoint, path or virtual-hosted
        // style): a presigned GetObject's, without its key and query.
        let probe = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(
                PresigningConfig::expires_in(expires_in)
                    .map_err(|e| StorageError::unavailable(format!("presign: {e}")))?,
            )
            .await
            .map_err(|e| classify("presign GetObject", &e, None))?;
        let url = bucket_url(probe.uri(), key)?;
        let now = time::OffsetDateTime::now_utc();
        let fields = post_policy_fields(
            &PostPolicyInput {
                bucket: &self.bucket,
                key,
                attrs,
                max_len,
                access_key: creds.access_key_id(),
                secret: creds.secret_access_key(),
                session_token: creds.session_token(),
                region: &region,
            },
            now,
            now + expires_in,
        )?;
        Ok(PresignedPost { url, fields })
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn ping(&self) -> Result<(), StorageError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("HeadBucket", &e, None))
    }
}

/// The bucket's URL (ending in `/`) of `uri`, a presigned request for `key`: `uri` without
/// its query and the key's path segments.
fn bucket_url(uri: &str, key: &str) -> Result<String, StorageError> {
    let path = uri.split('?').next().unwrap_or(uri);
    let segments = key.split('/').count();
    let mut end = path.len();
    for _ in 0..segments {
        end = path[..end]
            .rfind('/')
            .ok_or_else(|| StorageError::unavailable("presign POST: unexpected URL shape"))?;
    }
    Ok(format!("{}/", &path[..end]))
}

/// What a POST policy is signed for.
struct PostPolicyInput<'a> {
    bucket: &'a str,
    key: &'a str,
    attrs: &'a ObjectAttributes,
    max_len: u64,
    access_key: &'a str,
    secret: &'a str,
    session_token: Option<&'a str>,
    region: &'a str,
}

/// The form fields of an S3 browser upload (`POST` with a SigV4-signed policy): every field
/// the object gets is an exact-match condition, and its size is bounded by
/// `content-length-range`, so the form cannot be changed into another upload.
fn post_policy_fields(
    p: &PostPolicyInput<'_>,
    now: time::OffsetDateTime,
    expires: time::OffsetDateTime,
) -> Result<Vec<(String, String)>, StorageError> {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    type HmacSha256 = hmac::Hmac<sha2::Sha256>;
    let fmt = |f: &[time::format_description::FormatItem<'_>], t: time::OffsetDateTime| {
        t.format(f)
            .map_err(|e| StorageError::unavailable(format!("presign POST: {e}")))
    };
    let date = fmt(time::macros::format_description!("[year][month][day]"), now)?;
    let stamp = fmt(
        time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
        now,
    )?;
    let expiration = fmt(
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].000Z"),
        expires,
    )?;
    let credential = format!("{}/{date}/{}/s3/aws4_request", p.access_key, p.region);
    let mut fields: Vec<(String, String)> = vec![("key".into(), p.key.into())];
    if let Some(ct) = &p.attrs.content_type {
        fields.push(("Content-Type".into(), ct.clone()));
    }
    if let Some(cd) = &p.attrs.content_disposition {
        fields.push(("Content-Disposition".into(), cd.clone()));
    }
    for (k, v) in s3_metadata(&p.attrs.metadata) {
        fields.push((format!("x-amz-meta-{k}"), v));
    }
    match &p.attrs.sse {
        Some(Sse::Aes256) => {
            fields.push(("x-amz-server-side-encryption".into(), "AES256".into()));
        }
        Some(Sse::Kms { key_id }) => {
            fields.push(("x-amz-server-side-encryption".into(), "aws:kms".into()));
            if let Some(id) = key_id {
                fields.push((
                    "x-amz-server-side-encryption-aws-kms-key-id".into(),
                    id.clone(),
                ));
            }
        }
        None => {}
    }
    if let Some(class) = &p.attrs.storage_class {
        fields.push(("x-amz-storage-class".into(), class.clone()));
    }
    fields.push(("success_action_status".into(), "201".into()));
    fields.push(("x-amz-algorithm".into(), "AWS4-HMAC-SHA256".into()));
    fields.push(("x-amz-credential".into(), credential));
    fields.push(("x-amz-date".into(), stamp));
    if let Some(token) = p.session_token {
        fields.push(("x-amz-security-token".into(), token.into()));
    }
    let mut conditions: Vec<serde_json::Value> = vec![serde_json::json!({"bucket": p.bucket})];
    for (k, v) in &fields {
        conditions.push(serde_json::json!({ k.as_str(): v }));
    }
    conditions.push(serde_json::json!(["content-length-range", 0, p.max_len]));
    let policy = serde_json::json!({"expiration": expiration, "conditions": conditions});
    let policy = base64::engine::general_purpose::STANDARD.encode(policy.to_string());
    let mac = |key: &[u8], data: &[u8]| -> Result<Vec<u8>, StorageError> {
        let mut m = HmacSha256::new_from_slice(key)
            .map_err(|e| StorageError::unavailable(format!("presign POST: {e}")))?;
        m.update(data);
        Ok(m.finalize().into_bytes().to_vec())
    };
    let k = mac(format!("AWS4{}", p.secret).as_bytes(), date.as_bytes())?;
    let k = mac(&k, p.region.as_bytes())?;
    let k = mac(&k, b"s3")?;
    let k = mac(&k, b"aws4_request")?;
    let signature = hex::encode(mac(&k, policy.as_bytes())?);
    fields.push(("policy".into(), policy));
    fields.push(("x-amz-signature".into(), signature));
    Ok(fields)
}

fn http_status<E, R>(err: &SdkError<E, R>) -> Option<u16>
where
    R: HasStatus,
{
    err.raw_response().map(HasStatus::status_u16)
}

fn is_not_found<E, R>(err: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
    R: HasStatus,
{
    matches!(err.code(), Some("NoSuchKey" | "NotFound")) || http_status(err) == Some(404)
}

/// What the error mapping reads from a raw SDK response.
trait HasStatus {
    fn status_u16(&self) -> u16;
    /// The `<Code>` of an `<Error>` document in the body, if the body is buffered.
    fn error_code(&self) -> Option<String>;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_u16(&self) -> u16 {
        self.status().as_u16()
    }

    fn error_code(&self) -> Option<String> {
        let body = std::str::from_utf8(self.body().bytes()?).ok()?;
        let rest = &body[body.find("<Error>")?..];
        let code = &rest[rest.find("<Code>")? + "<Code>".len()..];
        let code = code[..code.find("</Code>")?].trim();
        (!code.is_empty()
            && code.len() <= 64
            && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'))
        .then(|| code.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(prefix: &str) -> S3Store {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .build();
        S3Store::from_client(Client::from_conf(conf), "bkt", prefix)
    }

    #[test]
    fn errors_a_retry_cannot_fix_are_not_unavailable() {
        assert!(matches!(
            from_code("op", "NoSuchUpload"),
            StorageError::NoSuchUpload
        ));
        assert!(matches!(
            from_code("op", "KeyTooLongError"),
            StorageError::Refused {
                field: "fileKey",
                ..
            }
        ));
        assert!(matches!(
            from_code("op", "EntityTooLarge"),
            StorageError::Refused { field: "body", .. }
        ));
        assert!(matches!(
            from_code("UploadPart", "RequestTimeout"),
            StorageError::Body(_)
        ));
        assert!(matches!(
            from_code("op", "InvalidPart"),
            StorageError::InvalidPart(_)
        ));
        assert!(matches!(
            from_code("CompleteMultipartUpload", "RequestTimeout"),
            StorageError::Unavailable(_)
        ));
        // Storage's own trouble stays retryable.
        for code in ["InternalError", "SlowDown", "ServiceUnavailable"] {
            assert!(
                matches!(from_code("op", code), StorageError::Unavailable(_)),
                "{code}"
            );
        }
    }

    #[test]
    fn object_keys_have_no_stray_slashes() {
        assert_eq!(
            store("").object_key("acme/", "s1", "f1", "a/b.png"),
            "acme/s1/f1/a/b.png"
        );
        assert_eq!(
            store("up").object_key("acme/", "s1", "f1", "f"),
            "up/acme/s1/f1/f"
        );
        assert_eq!(
            store("/up/x/").object_key("acme/", "s1", "f1", "f"),
            "up/x/acme/s1/f1/f"
        );
        assert_eq!(store("up").object_key("", "s1", "f1", "f"), "up/s1/f1/f");
        assert_eq!(store("").file_url("acme/s1/f"), "s3://bkt/acme/s1/f");
    }

    #[test]
    fn settings_from_url() {
        let s = S3Settings::from_url("s3://bucket/some/prefix/").expect("parse");
        assert_eq!(
            (s.bucket.as_str(), s.prefix.as_str()),
            ("bucket", "some/prefix")
        );
        let s = S3Settings::from_url("s3://bucket").expect("parse");
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("bucket", ""));
        assert!(S3Settings::from_url("s3:///x").is_err());
        assert!(S3Settings::from_url("file://x").is_err());
    }

    #[test]
    fn etags_are_unquoted_and_requoted() {
        assert_eq!(unquote("\"abc\""), "abc");
        assert_eq!(unquote("abc"), "abc");
        assert_eq!(quote("abc"), "\"abc\"");
        assert_eq!(quote("\"abc\""), "\"abc\"");
    }

    #[test]
    fn part_deadline_scales_with_size() {
        let t = S3Timeouts::default();
        assert_eq!(t.part_deadline(0), Duration::from_secs(30));
        assert_eq!(t.part_deadline(100 * 1024 * 1024), Duration::from_secs(430));
    }
}
