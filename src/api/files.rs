//! File endpoints: register, get, abort.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::{file_json, files_page_json, new_id, open_gate, ApiPath, AppState, JsonBody, Tenant};
use crate::error::{AppError, FieldError};
use crate::model::{now_ms, part_count, part_size_for, FileRecord, FileStatus};
use crate::store::Registered;

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id))]
pub(super) async fn register(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    user: Option<Extension<crate::auth::User>>,
    ApiPath(session_id): ApiPath<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    // An end user's token limits apply under the tenant's own.
    let limits = user.as_ref().map(|Extension(u)| &u.0.limits);
    let limited = limits.and_then(|l| l.under(&tenant.0));
    let t = limited.as_ref().unwrap_or(&tenant.0);
    let req = crate::validate::register_file(&body, t)?;
    if let Some(l) = limits.filter(|l| !l.allows_content_type(req.content_type.as_deref())) {
        return Err(AppError::ContentTypeNotAllowed(
            l.allowed_content_types.clone().unwrap_or_default(),
        ));
    }
    let file = new_file(&state, t, &session_id, req)?;
    tracing::Span::current().record("file_id", file.id.as_str());
    let now = now_ms();
    let gate = state.store.register_file(&t.id, &file, now).await?;
    state.uploads.wake(&t.id, &file.session_id);
    match registered(open_gate(gate, &t.id, now), &file.file_key) {
        Ok(f) => {
            state.metrics.registration("created");
            let location = format!("/v1/sessions/{session_id}/files/{}", f.id);
            Ok((
                StatusCode::CREATED,
                [(axum::http::header::LOCATION, location)],
                Json(file_json(&f)),
            )
                .into_response())
        }
        Err(e) => {
            state.metrics.registration(e.code());
            Err(e)
        }
    }
}

/// The record of a new file of `session_id` as `req` describes it, its object key and
/// metadata checked against the tenant's storage.
pub(super) fn new_file(
    state: &AppState,
    t: &crate::config::TenantConfig,
    session_id: &str,
    req: crate::validate::RegisterFile,
) -> Result<FileRecord, AppError> {
    let now = now_ms();
    // Computed from this replica's configured part size, which is the session's unless the
    // session was created under another `part_size_mb` (a rolling deploy): the store checks
    // it against the session's in the same atomic step and uses the session's.
    let session_part_size = state.config.part_size_bytes();
    let part_size = part_size_for(session_part_size, req.size_bytes);
    let id = new_id();
    let storage = &state.storages.for_tenant(&t.id).store;
    let file = FileRecord {
        object_key: storage.object_key(&t.storage_prefix, session_id, &id, &req.file_key),
        id,
        session_id: session_id.to_owned(),
        file_key: req.file_key,
        file_name: req.file_name,
        size_bytes: req.size_bytes,
        content_type: req.content_type,
        status: FileStatus::Registered,
        part_size_bytes: part_size,
        part_count: part_count(req.size_bytes, part_size),
        created_at: now / 1000,
        upload_id: None,
        file_url: None,
        etag: None,
        metadata: req.metadata,
        tus_form: None,
    };
    if let Some(why) = crate::storage::object_key_problem(storage.kind(), &file.object_key) {
        return Err(AppError::Validation(vec![FieldError::new("fileKey", why)]));
    }
    if let Some(why) = crate::storage::metadata_problem(storage.kind(), &file.metadata) {
        return Err(AppError::Validation(vec![FieldError::new("metadata", why)]));
    }
    Ok(file)
}

/// A store registration's outcome as the file or the contract's error.
pub(super) fn registered(
    outcome: Result<Registered, AppError>,
    file_key: &str,
) -> Result<FileRecord, AppError> {
    match outcome {
        Ok(Registered::Created(f)) => Ok(f),
        Ok(Registered::DuplicateKey) => Err(AppError::DuplicateFileKey(file_key.to_owned())),
        Ok(Registered::TooLarge(max)) => Err(AppError::FileTooLarge(max)),
        Ok(Registered::ContentTypeNotAllowed(allowed)) => {
            Err(AppError::ContentTypeNotAllowed(allowed))
        }
        Ok(Registered::CountExceeded {
            file_limit,
            file_count,
        }) => Err(AppError::FileCountExceeded {
            max_files: file_limit,
            file_count,
        }),
        Err(e) => Err(e),
    }
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
) -> Result<Response, AppError> {
    let read = || async {
        let now = now_ms();
        open_gate(
            state
                .store
                .get_file(&tenant.0.id, &session_id, &file_id, false, now)
                .await?,
            &tenant.0.id,
            now,
        )
    };
    let mut f = read().await?;
    // A form upload whose object landed is completed now (`crate::uploads::uppy`).
    if state
        .uploads
        .settle_posted(&tenant.0.id, std::slice::from_ref(&f))
        .await
    {
        f = read().await?;
    }
    // Only a deleted session leaves an aborted file to find.
    Ok(super::gone_if(
        Json(file_json(&f)).into_response(),
        f.status == FileStatus::Aborted,
    ))
}

/// `GET /v1/sessions/{id}/files?limit=&cursor=`: one page of the session's files.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Response, AppError> {
    let page = crate::validate::files_page(uri.query())?;
    let read = || async {
        let now = now_ms();
        open_gate(
            state
                .store
                .get_session(&tenant.0.id, &session_id, page, now)
                .await?,
            &tenant.0.id,
            now,
        )
    };
    let mut view = read().await?;
    if state.uploads.settle_posted(&tenant.0.id, &view.files).await {
        view = read().await?;
    }
    Ok(super::gone_if(
        Json(files_page_json(&view)).into_response(),
        view.session.status == crate::model::SessionStatus::Aborted,
    ))
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id, file_id = %file_id))]
pub(super) async fn abort(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath((session_id, file_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, AppError> {
    state
        .uploads
        .delete_file(&tenant.0.id, &session_id, &file_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
