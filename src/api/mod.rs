//! The HTTP API of `../shared/API.md`: routes, JSON views and the handlers' shared state.

mod files;
mod parts;
mod sessions;
pub(crate) mod tus;
mod uppy;
mod webhooks;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::Value;

use crate::config::{Config, TenantConfig};
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::model::{FileRecord, SessionRecord};
use crate::storage::Storages;
use crate::store::SessionStore;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// Session state.
    pub store: Arc<dyn SessionStore>,
    /// Bytes: the gateway's storage and the tenants' own.
    pub storages: Arc<Storages>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The upload protocol (every multi-step exchange between `store` and `storage`).
    pub uploads: Arc<crate::uploads::Uploads>,
    /// The keys upload tokens are signed with.
    pub tokens: Arc<crate::tokens::UploadTokens>,
}

/// The authenticated tenant, put in the request extensions by [`crate::auth`].
#[derive(Debug, Clone)]
pub struct Tenant(pub Arc<TenantConfig>);

/// Route templates, the values of the metrics' `route` label ([`crate::metrics::route_label`]).
pub(crate) mod path {
    pub(crate) const SESSIONS: &str = "/v1/sessions";
    pub(crate) const SESSION: &str = "/v1/sessions/{session_id}";
    pub(crate) const FINALIZE: &str = "/v1/sessions/{session_id}/finalize";
    pub(crate) const FILES: &str = "/v1/sessions/{session_id}/files";
    pub(crate) const FILE: &str = "/v1/sessions/{session_id}/files/{file_id}";
    pub(crate) const PARTS: &str = "/v1/sessions/{session_id}/files/{file_id}/parts";
    pub(crate) const PART: &str = "/v1/sessions/{session_id}/files/{file_id}/parts/{part_number}";
    pub(crate) const PRESIGN: &str = "/v1/sessions/{session_id}/files/{file_id}/presigned-parts";
    pub(crate) const COMPLETE: &str = "/v1/sessions/{session_id}/files/{file_id}/complete";
    pub(crate) const UPLOAD_TOKENS: &str = "/v1/sessions/{session_id}/upload-tokens";
    pub(crate) const EVENTS: &str = "/v1/webhooks/events";
    pub(crate) const EVENT_RETRY: &str = "/v1/webhooks/events/{event_id}/retry";
    pub(crate) const TUS: &str = "/v1/tus";
    pub(crate) const TUS_UPLOAD: &str = "/v1/tus/{upload_id}";
    /// The prefix of the Uppy (Companion S3) routes: `/v1/uppy/{upload_token}/s3/...`.
    pub(crate) const UPPY: &str = "/v1/uppy/";
    pub(crate) const UPPY_CREATE: &str = "/v1/uppy/{upload_token}/s3/multipart";
    pub(crate) const UPPY_UPLOAD: &str = "/v1/uppy/{upload_token}/s3/multipart/{file_id}";
    pub(crate) const UPPY_PART: &str =
        "/v1/uppy/{upload_token}/s3/multipart/{file_id}/{part_number}";
    pub(crate) const UPPY_BATCH: &str = "/v1/uppy/{upload_token}/s3/multipart/{file_id}/batch";
    pub(crate) const UPPY_COMPLETE: &str =
        "/v1/uppy/{upload_token}/s3/multipart/{file_id}/complete";
    pub(crate) const UPPY_PARAMS: &str = "/v1/uppy/{upload_token}/s3/params";
}

/// The session a request's path names: `/v1/sessions/{id}...`, or a tus upload's
/// (`/v1/tus/{sessionId}.{fileId}`), raw (not percent-decoded).
pub(crate) fn session_in_path(path: &str) -> Option<&str> {
    if let Some(rest) = path.strip_prefix("/v1/sessions/") {
        return rest.split('/').next().filter(|s| !s.is_empty());
    }
    let upload = path.strip_prefix("/v1/tus/")?;
    tus::split_upload_id(upload).map(|r| r.session)
}

/// Every route template of [`routes`].
pub const ROUTES: [&str; 20] = [
    path::SESSIONS,
    path::SESSION,
    path::FINALIZE,
    path::FILES,
    path::FILE,
    path::PARTS,
    path::PART,
    path::PRESIGN,
    path::COMPLETE,
    path::UPLOAD_TOKENS,
    path::EVENTS,
    path::EVENT_RETRY,
    path::TUS,
    path::TUS_UPLOAD,
    path::UPPY_CREATE,
    path::UPPY_UPLOAD,
    path::UPPY_PART,
    path::UPPY_BATCH,
    path::UPPY_COMPLETE,
    path::UPPY_PARAMS,
];

/// The `/v1` routes (without middleware; see [`crate::stack`]).
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route(path::SESSIONS, post(sessions::create))
        .route(path::SESSION, get(sessions::get).delete(sessions::abort))
        .route(path::FINALIZE, post(sessions::finalize))
        .route(path::UPLOAD_TOKENS, post(sessions::mint_token))
        .route(path::FILES, post(files::register).get(files::list))
        .route(path::FILE, get(files::get).delete(files::abort))
        .route(path::PARTS, get(parts::list))
        .route(path::PART, put(parts::upload))
        .route(path::PRESIGN, post(parts::presign))
        .route(path::COMPLETE, post(parts::complete))
        .route(path::EVENTS, get(webhooks::list))
        .route(path::EVENT_RETRY, post(webhooks::retry))
        .route(path::TUS, post(tus::create).options(tus::options))
        .route(
            path::TUS_UPLOAD,
            axum::routing::head(tus::head)
                .patch(tus::patch)
                .delete(tus::delete)
                .post(tus::overridden)
                .options(tus::options),
        )
        .route(path::UPPY_CREATE, post(uppy::create))
        .route(path::UPPY_UPLOAD, get(uppy::list_parts).delete(uppy::abort))
        .route(path::UPPY_PART, get(uppy::sign_part))
        .route(path::UPPY_BATCH, get(uppy::sign_batch))
        .route(path::UPPY_COMPLETE, post(uppy::complete))
        .route(path::UPPY_PARAMS, get(uppy::params))
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .fallback(|| async { AppError::RouteNotFound })
        .with_state(state)
}

/// A JSON request body, read up to `max_json_body_bytes` and parsed into a `Value`; the
/// handlers validate it field by field so every problem is reported at once.
pub(crate) struct JsonBody(pub(crate) Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_json_body_bytes;
        let body = req.into_body();
        let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
            // to_bytes reports an over-limit body as a length-limit error; anything else is a
            // broken body.
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit")
            {
                AppError::PayloadTooLarge(limit as u64)
            } else {
                AppError::BodyIncomplete
            }
        })?;
        crate::validate::parse_json(&bytes).map(JsonBody)
    }
}

/// `axum::extract::Path` whose rejection (a segment that is not valid UTF-8 once
/// percent-decoded, say) is the contract's problem document (400 `validationFailed`), not
/// axum's plain text.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(_) => Err(AppError::Validation(vec![crate::error::FieldError::new(
                "path",
                "a path segment is not valid (percent-decoded UTF-8 expected)",
            )])),
        }
    }
}

pub(crate) use crate::uploads::open_gate;

/// The session resource, serialized straight from the record (no intermediate `Value`).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionView<'a> {
    session_id: &'a str,
    status: &'static str,
    part_size_bytes: u64,
    max_files: Option<u32>,
    file_count: u32,
    created_at: String,
    expires_at: String,
    metadata: &'a Value,
    /// The end user (JWT `sub`) owning the session; `null` for the API key's sessions.
    owner: Option<&'a str>,
    /// Present on `GET /v1/sessions/{id}` and finalize: the first page of the files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) files: Option<Vec<FileView<'a>>>,
    /// With `files`: the cursor of their next page (`null` when `files` is all of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) files_next_cursor: Option<Option<String>>,
    /// Only in the answer to `POST /v1/sessions`: an upload token for the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upload_token: Option<String>,
    /// With `upload_token`: when it stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upload_token_expires_at: Option<String>,
}

/// `res` marked [`crate::auth::SessionGone`] when `deleted` (its session was deleted): an
/// upload token then gets 404 instead.
pub(crate) fn gone_if(
    mut res: axum::response::Response,
    deleted: bool,
) -> axum::response::Response {
    if deleted {
        res.extensions_mut().insert(crate::auth::SessionGone);
    }
    res
}

/// The session resource with its first page of files (`GET` and finalize).
pub(crate) fn session_with_files(view: &crate::store::SessionView) -> SessionView<'_> {
    let mut v = session_json(&view.session);
    v.files = Some(view.files.iter().map(file_json).collect());
    v.files_next_cursor = Some(view.next_cursor.map(|c| c.to_string()));
    v
}

/// A page of `GET /v1/sessions/{id}/files`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FilesPageView<'a> {
    files: Vec<FileView<'a>>,
    next_cursor: Option<String>,
}

/// The page view of a session view's files.
pub(crate) fn files_page_json(view: &crate::store::SessionView) -> FilesPageView<'_> {
    FilesPageView {
        files: view.files.iter().map(file_json).collect(),
        next_cursor: view.next_cursor.map(|c| c.to_string()),
    }
}

/// The session resource (without `files`).
pub(crate) fn session_json(s: &SessionRecord) -> SessionView<'_> {
    SessionView {
        session_id: &s.id,
        status: s.status.as_str(),
        part_size_bytes: s.part_size_bytes,
        max_files: s.max_files,
        file_count: s.file_count,
        created_at: crate::model::rfc3339(s.created_at),
        expires_at: crate::model::rfc3339(s.expires_at),
        metadata: &s.metadata,
        owner: s.owner.as_deref(),
        files: None,
        files_next_cursor: None,
        upload_token: None,
        upload_token_expires_at: None,
    }
}

/// The file resource, serialized straight from the record.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileView<'a> {
    file_id: &'a str,
    file_key: &'a str,
    file_name: &'a str,
    size_bytes: u64,
    content_type: Option<&'a str>,
    status: &'static str,
    part_size_bytes: u64,
    part_count: u32,
    created_at: String,
    /// Only once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    file_url: Option<Option<&'a str>>,
    /// Only once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<Option<&'a str>>,
    metadata: &'a std::collections::BTreeMap<String, String>,
}

/// The file resource (`fileUrl` and `etag` only once completed).
pub(crate) fn file_json(f: &FileRecord) -> FileView<'_> {
    let completed = f.status == crate::model::FileStatus::Completed;
    FileView {
        file_id: &f.id,
        file_key: &f.file_key,
        file_name: &f.file_name,
        size_bytes: f.size_bytes,
        content_type: f.content_type.as_deref(),
        status: f.status.public_str(),
        part_size_bytes: f.part_size_bytes,
        part_count: f.part_count,
        created_at: crate::model::rfc3339(f.created_at),
        file_url: completed.then_some(f.file_url.as_deref()),
        etag: completed.then_some(f.etag.as_deref()),
        metadata: &f.metadata,
    }
}

/// A fresh unguessable id (UUID v4: 122 random bits).
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
