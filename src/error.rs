//! [`AppError`]: the one place that maps outcomes to HTTP.
//!
//! Every handler returns `Result<_, AppError>`; every layer rejection the gateway renders goes
//! through [`AppError::into_response`] too, so each `code` of the contract has exactly one
//! status and one shape. Responses are RFC 9457 problem documents
//! (`application/problem+json`). Infrastructure failures carry their detail only into the
//! log: the client sees `unavailable` or `internal` and the request id.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::model::SessionStatus;
use crate::storage::StorageError;
use crate::store::StoreError;

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON field name (or `body`, `partNumber`, a header name).
    pub field: String,
    /// What is wrong, for humans.
    pub message: String,
}

impl FieldError {
    /// Builds a field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400 `validationFailed`.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 400 `fileCountExceeded`.
    #[error("file count exceeded")]
    FileCountExceeded {
        /// Enforced limit.
        max_files: u32,
        /// Live files.
        file_count: u32,
    },
    /// 400 `partSizeMismatch`.
    #[error("part size mismatch")]
    PartSizeMismatch {
        /// The part.
        part_number: u32,
        /// What the part must weigh.
        expected: u64,
        /// What was sent.
        actual: u64,
    },
    /// 400 `partsMissing`.
    #[error("parts missing")]
    PartsMissing(Vec<u32>),
    /// 400 `checksumMismatch`: a Content-MD5 / x-amz-checksum did not match the bytes.
    #[error("checksum mismatch")]
    ChecksumMismatch,
    /// 400 `bodyIncomplete`: the part body ended early or failed.
    #[error("request body incomplete")]
    BodyIncomplete,
    /// 401 `unauthorized`: no credential (`WWW-Authenticate: Bearer`).
    #[error("unauthorized")]
    Unauthorized,
    /// 401 `unauthorized`: a credential that is not valid: an unknown API key, an upload
    /// token that is malformed, tampered or expired (`WWW-Authenticate: Bearer
    /// error="invalid_token"`, RFC 6750).
    #[error("invalid credential")]
    InvalidToken,
    /// 403 `insufficientScope`: an upload token on an endpoint it does not cover (creating
    /// sessions, minting tokens).
    #[error("insufficient scope")]
    InsufficientScope,
    /// 404 `sessionNotFound`.
    #[error("session not found")]
    SessionNotFound,
    /// 404 `fileNotFound`.
    #[error("file not found")]
    FileNotFound,
    /// 404 `eventNotFound`: no such (dead-lettered) webhook event.
    #[error("event not found")]
    EventNotFound,
    /// 404 `notFound`: no such route.
    #[error("no such route")]
    RouteNotFound,
    /// 405 `methodNotAllowed`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 `duplicateFileKey`.
    #[error("duplicate file key")]
    DuplicateFileKey(String),
    /// 409 `sessionNotActive`.
    #[error("session not active")]
    SessionNotActive(SessionStatus),
    /// 409 `fileNotActive`: parts sent to a completed or aborted file.
    #[error("file not active")]
    FileNotActive(&'static str),
    /// 409 `fileNotActive` for a file the store holds as `aborted`: only a session's
    /// `DELETE` leaves one (a deleted file is gone), so an upload token gets 404 instead
    /// ([`crate::auth::SessionGone`]). Storage losing an upload is `FileNotActive("aborted")`.
    #[error("file aborted")]
    FileAborted,
    /// 409 `filesIncomplete`: finalize before every file is completed.
    #[error("files incomplete")]
    FilesIncomplete(Vec<String>),
    /// 409 `requestInProgress`: another caller is completing this file (with `Retry-After`).
    #[error("completion in progress")]
    CompletionInProgress,
    /// 409 `requestInProgress`.
    #[error("request in progress")]
    RequestInProgress,
    /// 410 `sessionExpired`.
    #[error("session expired")]
    SessionExpired {
        /// The session.
        session_id: String,
        /// Its deadline (seconds).
        expires_at: i64,
        /// Now (seconds).
        now: i64,
    },
    /// 411 `lengthRequired`: a part without Content-Length.
    #[error("length required")]
    LengthRequired,
    /// 413 `fileTooLarge`.
    #[error("file too large")]
    FileTooLarge(u64),
    /// 413 `payloadTooLarge`.
    #[error("payload too large")]
    PayloadTooLarge(u64),
    /// 413 `payloadTooLarge`: `metadata` over `max_metadata_bytes` (serialized JSON).
    #[error("metadata too large")]
    MetadataTooLarge(u64),
    /// 415 `contentTypeNotAllowed`: the declared content type is outside the end-user
    /// token's `allowedContentTypes`.
    #[error("content type not allowed")]
    ContentTypeNotAllowed(Vec<String>),
    /// 415 `contentTypeMismatch`.
    #[error("content type mismatch")]
    ContentTypeMismatch {
        /// The file.
        file_id: String,
        /// What the client declared.
        declared: String,
        /// What the magic bytes say.
        detected: String,
    },
    /// 422 `idempotencyKeyReused`.
    #[error("idempotency key reused")]
    IdempotencyKeyReused,
    /// 429 `rateLimited`.
    #[error("rate limited")]
    RateLimited {
        /// Seconds until a retry can succeed.
        retry_after: u64,
    },
    /// 429 `tooManyConcurrentUploads`: the tenant's in-flight part uploads are at their cap.
    #[error("too many concurrent uploads")]
    TooManyConcurrentUploads,
    /// 429 `quotaExceeded`: the tenant holds `max_active_sessions` live sessions.
    #[error("active session quota exceeded")]
    QuotaExceeded(u64),
    /// 409 `offsetMismatch` (tus): a PATCH's `Upload-Offset` is not the upload's offset
    /// (the upload's offset is in the extension member and the `Upload-Offset` header).
    #[error("upload offset mismatch")]
    OffsetMismatch(u64),
    /// 412 `versionNotSupported` (tus): neither `Tus-Resumable: 1.0.0` nor an IETF draft
    /// interop version this gateway speaks.
    #[error("protocol version not supported")]
    VersionNotSupported,
    /// 413 `uploadLengthExceeded` (tus): bytes past the upload's length.
    #[error("upload length exceeded")]
    UploadLengthExceeded(u64),
    /// 415 `unsupportedMediaType` (tus): a PATCH body that is not
    /// `application/offset+octet-stream` (or `application/partial-upload`).
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 423 `uploadLocked` (tus): another PATCH holds the upload.
    #[error("upload locked")]
    UploadLocked,
    /// 403 `finalUpload` (tus concatenation): a final upload is made of its partial
    /// uploads and takes no PATCH.
    #[error("PATCH on a final upload")]
    FinalUpload,
    /// 460 `checksumMismatch` (tus checksum extension): the chunk's `Upload-Checksum` does
    /// not match its bytes; nothing of the chunk was kept.
    #[error("upload checksum mismatch")]
    UploadChecksumMismatch,
    /// 501 `notSupported`.
    #[error("not supported")]
    NotSupported,
    /// 503 `unavailable`: Redis or storage unreachable. The string is logged only.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 500 `internal`. The string is logged only.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Unavailable(e.to_string())
    }
}

impl From<StorageError> for AppError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::BadDigest => AppError::ChecksumMismatch,
            StorageError::Body(_) => AppError::BodyIncomplete,
            StorageError::NotSupported => AppError::NotSupported,
            StorageError::Refused { field, reason } => AppError::Validation(vec![FieldError::new(
                field,
                format!("refused by storage: {reason}"),
            )]),
            StorageError::InvalidPart(m) => AppError::Validation(vec![FieldError::new("parts", m)]),
            StorageError::NoSuchUpload => AppError::FileNotActive("aborted"),
            StorageError::Unavailable(m) => AppError::Unavailable(m),
        }
    }
}

/// Seconds a client should wait before retrying after `unavailable`.
const UNAVAILABLE_RETRY_AFTER: u64 = 1;

impl AppError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use AppError::*;
        match self {
            Validation(_)
            | FileCountExceeded { .. }
            | PartSizeMismatch { .. }
            | PartsMissing(_)
            | ChecksumMismatch
            | BodyIncomplete => StatusCode::BAD_REQUEST,
            Unauthorized | InvalidToken => StatusCode::UNAUTHORIZED,
            InsufficientScope => StatusCode::FORBIDDEN,
            SessionNotFound | FileNotFound | EventNotFound | RouteNotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            DuplicateFileKey(_) | SessionNotActive(_) | FileNotActive(_) | FileAborted
            | FilesIncomplete(_) | RequestInProgress | CompletionInProgress => StatusCode::CONFLICT,
            SessionExpired { .. } => StatusCode::GONE,
            LengthRequired => StatusCode::LENGTH_REQUIRED,
            FileTooLarge(_) | PayloadTooLarge(_) | MetadataTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ContentTypeMismatch { .. } | ContentTypeNotAllowed(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            RateLimited { .. } | TooManyConcurrentUploads | QuotaExceeded(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            OffsetMismatch(_) => StatusCode::CONFLICT,
            VersionNotSupported => StatusCode::PRECONDITION_FAILED,
            UploadLengthExceeded(_) => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            UploadLocked => StatusCode::LOCKED,
            FinalUpload => StatusCode::FORBIDDEN,
            // tus's checksum extension: "460 Checksum Mismatch".
            UploadChecksumMismatch => StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
            NotSupported => StatusCode::NOT_IMPLEMENTED,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The contract's stable `code`.
    pub fn code(&self) -> &'static str {
        use AppError::*;
        match self {
            Validation(_) => "validationFailed",
            FileCountExceeded { .. } => "fileCountExceeded",
            PartSizeMismatch { .. } => "partSizeMismatch",
            PartsMissing(_) => "partsMissing",
            ChecksumMismatch => "checksumMismatch",
            BodyIncomplete => "bodyIncomplete",
            Unauthorized | InvalidToken => "unauthorized",
            InsufficientScope => "insufficientScope",
            SessionNotFound => "sessionNotFound",
            FileNotFound => "fileNotFound",
            EventNotFound => "eventNotFound",
            RouteNotFound => "notFound",
            MethodNotAllowed => "methodNotAllowed",
            DuplicateFileKey(_) => "duplicateFileKey",
            SessionNotActive(_) => "sessionNotActive",
            FileNotActive(_) | FileAborted => "fileNotActive",
            FilesIncomplete(_) => "filesIncomplete",
            RequestInProgress | CompletionInProgress => "requestInProgress",
            SessionExpired { .. } => "sessionExpired",
            LengthRequired => "lengthRequired",
            FileTooLarge(_) => "fileTooLarge",
            PayloadTooLarge(_) | MetadataTooLarge(_) => "payloadTooLarge",
            ContentTypeMismatch { .. } => "contentTypeMismatch",
            ContentTypeNotAllowed(_) => "contentTypeNotAllowed",
            IdempotencyKeyReused => "idempotencyKeyReused",
            RateLimited { .. } => "rateLimited",
            TooManyConcurrentUploads => "tooManyConcurrentUploads",
            QuotaExceeded(_) => "quotaExceeded",
            OffsetMismatch(_) => "offsetMismatch",
            VersionNotSupported => "versionNotSupported",
            UploadLengthExceeded(_) => "uploadLengthExceeded",
            UnsupportedMediaType => "unsupportedMediaType",
            UploadLocked => "uploadLocked",
            FinalUpload => "finalUpload",
            UploadChecksumMismatch => "checksumMismatch",
            NotSupported => "notSupported",
            Unavailable(_) => "unavailable",
            Internal(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        use AppError::*;
        match self {
            Validation(_) => "The request is invalid",
            FileCountExceeded { .. } => "The session holds its maximum number of files",
            PartSizeMismatch { .. } => "The part has the wrong size",
            PartsMissing(_) => "Parts are missing",
            ChecksumMismatch => "The part's checksum does not match its bytes",
            BodyIncomplete => "The request body ended early",
            Unauthorized => "Missing credential",
            InvalidToken => "Unknown API key, or an invalid or expired token",
            InsufficientScope => "This credential does not cover this endpoint",
            SessionNotFound => "Session not found",
            FileNotFound => "File not found",
            EventNotFound => "No such dead-lettered event",
            RouteNotFound => "Not found",
            MethodNotAllowed => "Method not allowed",
            DuplicateFileKey(_) => "The fileKey is already registered in this session",
            SessionNotActive(_) => "The session is not active",
            FileNotActive(_) | FileAborted => "The file no longer accepts parts",
            FilesIncomplete(_) => "Some files are not completed",
            RequestInProgress => "A request with this Idempotency-Key is still running",
            CompletionInProgress => "Another request is completing this file",
            SessionExpired { .. } => "The session has expired",
            LengthRequired => "Content-Length is required",
            FileTooLarge(_) => "The file is larger than allowed",
            PayloadTooLarge(_) => "The request body is larger than allowed",
            MetadataTooLarge(_) => "The metadata is larger than allowed",
            ContentTypeMismatch { .. } => "The content does not match its declared type",
            ContentTypeNotAllowed(_) => "This token does not allow the declared content type",
            IdempotencyKeyReused => "The Idempotency-Key was used for a different request",
            RateLimited { .. } => "Too many requests",
            TooManyConcurrentUploads => "Too many part uploads in flight",
            QuotaExceeded(_) => "Too many active sessions",
            OffsetMismatch(_) => "Upload-Offset is not the upload's offset",
            VersionNotSupported => "Protocol version not supported",
            UploadLengthExceeded(_) => "The bytes go past the upload's length",
            UnsupportedMediaType => "PATCH bodies are application/offset+octet-stream",
            UploadLocked => "Another request is writing to this upload",
            FinalUpload => "A final upload is made of its partial uploads and takes no bytes",
            UploadChecksumMismatch => "The chunk's Upload-Checksum does not match its bytes",
            NotSupported => "Not supported by this storage",
            Unavailable(_) => "A backing service is unavailable",
            Internal(_) => "Internal error",
        }
    }

    fn detail_and_extensions(&self) -> (String, Map<String, Value>) {
        use AppError::*;
        let mut ext = Map::new();
        let detail = match self {
            Validation(errors) => {
                ext.insert(
                    "errors".into(),
                    Value::Array(
                        errors
                            .iter()
                            .map(|e| json!({"field": e.field, "message": e.message}))
                            .collect(),
                    ),
                );
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
            FileCountExceeded {
                max_files,
                file_count,
            } => {
                ext.insert("maxFiles".into(), json!(max_files));
                ext.insert("fileCount".into(), json!(file_count));
                format!("the session already holds {file_count} of at most {max_files} files")
            }
            PartSizeMismatch {
                part_number,
                expected,
                actual,
            } => {
                ext.insert("partNumber".into(), json!(part_number));
                ext.insert("expectedSizeBytes".into(), json!(expected));
                format!("part {part_number} must be exactly {expected} bytes, got {actual}")
            }
            PartsMissing(missing) => {
                ext.insert("missingParts".into(), json!(missing));
                format!("{} part(s) not uploaded yet", missing.len())
            }
            DuplicateFileKey(key) => {
                ext.insert("fileKey".into(), json!(key));
                format!("fileKey {key:?} is already registered in this session")
            }
            SessionNotActive(status) => {
                // The contract names this extension member `status`, so for this one code
                // it carries the session's status (the HTTP status is the response's);
                // `sessionStatus` says the same under an unambiguous name.
                ext.insert("status".into(), json!(status.as_str()));
                ext.insert("sessionStatus".into(), json!(status.as_str()));
                format!("the session is {}", status.as_str())
            }
            FileAborted => {
                ext.insert("fileStatus".into(), json!("aborted"));
                "the file is aborted".to_owned()
            }
            FileNotActive(status) => {
                ext.insert("fileStatus".into(), json!(status));
                format!("the file is {status}")
            }
            FilesIncomplete(ids) => {
                ext.insert("incompleteFiles".into(), json!(ids));
                format!("{} file(s) are not completed", ids.len())
            }
            SessionExpired {
                session_id,
                expires_at,
                now,
            } => {
                ext.insert("sessionExpired".into(), json!(true));
                ext.insert("sessionId".into(), json!(session_id));
                ext.insert(
                    "expiresAt".into(),
                    json!(crate::model::rfc3339(*expires_at)),
                );
                ext.insert("now".into(), json!(crate::model::rfc3339(*now)));
                "create a new session, register the files again and resume their uploads".to_owned()
            }
            FileTooLarge(max) => {
                ext.insert("maxSizeBytes".into(), json!(max));
                format!("files may be at most {max} bytes")
            }
            PayloadTooLarge(max) => {
                ext.insert("maxSizeBytes".into(), json!(max));
                format!("request bodies may be at most {max} bytes")
            }
            MetadataTooLarge(max) => {
                ext.insert("maxSizeBytes".into(), json!(max));
                format!("metadata may be at most {max} bytes as JSON")
            }
            QuotaExceeded(limit) => {
                ext.insert("limit".into(), json!(limit));
                format!(
                    "at most {limit} sessions may be live at once; finalize or delete one, or wait for one to expire"
                )
            }
            ContentTypeNotAllowed(allowed) => {
                ext.insert("allowed".into(), json!(allowed));
                format!(
                    "files may declare only these content types: {}",
                    allowed.join(", ")
                )
            }
            ContentTypeMismatch {
                file_id,
                declared,
                detected,
            } => {
                ext.insert("fileId".into(), json!(file_id));
                ext.insert("declared".into(), json!(declared));
                ext.insert("detected".into(), json!(detected));
                format!("file {file_id} was declared {declared} but its content is {detected}")
            }
            RateLimited { retry_after } => format!("retry in {retry_after} s"),
            OffsetMismatch(offset) => {
                ext.insert("uploadOffset".into(), json!(offset));
                format!("the upload is at offset {offset}; HEAD it and resume from there")
            }
            UploadLengthExceeded(length) => {
                ext.insert("uploadLength".into(), json!(length));
                format!("the upload is {length} bytes long")
            }
            Unavailable(_) => "a backing service is unavailable; retry shortly".to_owned(),
            Internal(_) => {
                "an internal error occurred; the request id identifies it in the logs".to_owned()
            }
            other => other.title().to_owned(),
        };
        (detail, ext)
    }

    /// The problem document as JSON.
    pub fn problem(&self) -> Value {
        let status = self.status();
        let (detail, ext) = self.detail_and_extensions();
        let mut doc = Map::new();
        doc.insert(
            "type".into(),
            json!(format!("https://upgate.dev/problems/{}", self.code())),
        );
        doc.insert("title".into(), json!(self.title()));
        doc.insert("status".into(), json!(status.as_u16()));
        doc.insert("detail".into(), json!(detail));
        doc.insert("code".into(), json!(self.code()));
        doc.extend(ext);
        Value::Object(doc)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match &self {
            AppError::Unavailable(m) => {
                tracing::error!(code = "unavailable", error = %m, "backing service unavailable")
            }
            AppError::Internal(m) => {
                tracing::error!(code = "internal", error = %m, "internal error")
            }
            _ => tracing::debug!(code = self.code(), "request rejected"),
        }
        let status = self.status();
        let body = self.problem().to_string();
        let mut res = (status, body).into_response();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            AppError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AppError::InvalidToken => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            AppError::InsufficientScope => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                );
            }
            AppError::RateLimited { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after.max(&1)));
            }
            AppError::OffsetMismatch(offset) => {
                headers.insert("upload-offset", HeaderValue::from(*offset));
            }
            AppError::VersionNotSupported => {
                headers.insert("tus-version", HeaderValue::from_static("1.0.0"));
            }
            AppError::TooManyConcurrentUploads
            | AppError::Unavailable(_)
            | AppError::CompletionInProgress => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(UNAVAILABLE_RETRY_AFTER),
                );
            }
            _ => {}
        }
        res.extensions_mut().insert(ErrorCode(self.code()));
        if matches!(
            self,
            AppError::SessionNotActive(SessionStatus::Aborted) | AppError::FileAborted
        ) {
            res.extensions_mut().insert(crate::auth::SessionGone);
        }
        if !self.replayable() {
            res.extensions_mut()
                .insert(upgate_layers::idempotency::NotReplayable);
        }
        res
    }
}

impl AppError {
    /// True when a retry of the same request would get the same answer, so an
    /// `Idempotency-Key` replay may return it: malformed or oversized input, unknown or
    /// expired resources. Answers that depend on state a later request can change (a slot
    /// or a key freed by a delete, parts uploaded since, a completion that finished) are
    /// not stored, and a retry with the same key runs again.
    fn replayable(&self) -> bool {
        use AppError::*;
        matches!(
            self,
            Validation(_)
                | FileTooLarge(_)
                | PayloadTooLarge(_)
                | MetadataTooLarge(_)
                | Unauthorized
                | InvalidToken
                | InsufficientScope
                | SessionNotFound
                | FileNotFound
                | SessionExpired { .. }
                | NotSupported
        )
    }
}

/// The `code` of an error response, left in the response extensions for metrics.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_never_reach_the_body() {
        let e = AppError::Unavailable("redis: connection refused at 10.0.0.7:6379".into());
        let body = e.problem().to_string();
        assert!(!body.contains("10.0.0.7"), "{body}");
        assert!(body.contains("\"code\":\"unavailable\""));
    }

    #[test]
    fn expired_problem_carries_contract_members() {
        let e = AppError::SessionExpired {
            session_id: "s".into(),
            expires_at: 0,
            now: 60,
        };
        let v = e.problem();
        assert_eq!(v["sessionExpired"], json!(true));
        assert_eq!(v["status"], json!(410));
        assert_eq!(v["expiresAt"], json!("1970-01-01T00:00:00Z"));
        assert_eq!(v["now"], json!("1970-01-01T00:01:00Z"));
    }
}
