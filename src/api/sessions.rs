//! Session endpoints: create, get, abort, finalize.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::{self, StreamExt};

use super::{file_json, new_id, open_gate, session_json, ApiPath, AppState, JsonBody, Tenant};
use crate::error::AppError;
use crate::model::{now_ms, FileRecord, SessionRecord, SessionStatus};
use crate::store::Finalized;

/// Bytes read from each object at finalize for the magic-byte check.
const SNIFF_BYTES: usize = 8192;

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id))]
pub(super) async fn create(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let t = &tenant.0;
    let req = crate::validate::create_session(&body, t)?;
    let now = now_ms() / 1000;
    let ttl = i64::try_from(req.ttl_seconds).unwrap_or(i64::MAX);
    let session = SessionRecord {
        id: new_id(),
        tenant: t.id.clone(),
        status: SessionStatus::Active,
        part_size_bytes: state.config.part_size_bytes(),
        max_files: req.max_files,
        file_limit: req
            .max_files
            .unwrap_or(t.max_files_per_session)
            .min(t.max_files_per_session),
        file_count: 0,
        created_at: now,
        expires_at: now.saturating_add(ttl),
        metadata: req.metadata,
    };
    tracing::Span::current().record("session_id", session.id.as_str());
    state.store.create_session(&session).await?;
    state.metrics.sessions_created.inc();
    let location = format!("/v1/sessions/{}", session.id);
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(session_json(&session)),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
) -> Result<Response, AppError> {
    let now = now_ms();
    let view = open_gate(
        state
            .store
            .get_session(&tenant.0.id, &session_id, now)
            .await?,
        &tenant.0.id,
        now,
    )?;
    let mut v = session_json(&view.session);
    v.files = Some(view.files.iter().map(file_json).collect());
    Ok(Json(v).into_response())
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn abort(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
) -> Result<StatusCode, AppError> {
    let now = now_ms();
    let open = open_gate(
        state
            .store
            .abort_session(&tenant.0.id, &session_id, now)
            .await?,
        &tenant.0.id,
        now,
    )?;
    abort_uploads(&state, &open).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Aborts storage uploads, a few at a time. Failures are logged, not returned: the session is
/// already aborted in the store and the reaper retries whatever is left once it expires.
pub(crate) async fn abort_uploads(state: &AppState, files: &[FileRecord]) -> usize {
    let jobs: Vec<(String, String, String)> = files
        .iter()
        .filter_map(|f| {
            f.upload_id
                .clone()
                .map(|u| (f.id.clone(), f.object_key.clone(), u))
        })
        .collect();
    let storage = state.storage.clone();
    stream::iter(jobs)
        .map(move |(file_id, key, upload_id)| {
            let storage = storage.clone();
            async move {
                match storage.abort_upload(&key, &upload_id).await {
                    Ok(()) => 1,
                    Err(e) => {
                        tracing::warn!(file_id = %file_id, error = %e, "aborting a storage upload failed; it stays open in storage (the reaper does not retry aborted sessions)");
                        0
                    }
                }
            }
        })
        .buffer_unordered(8)
        .fold(0usize, |n, ok| async move { n + ok })
        .await
}

/// True when the magic bytes' type is compatible with what the client declared.
fn compatible(declared: &str, detected: &str) -> bool {
    let essence = |s: &str| {
        s.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    let (declared, detected) = (essence(declared), essence(detected));
    if declared == detected || declared == "application/octet-stream" {
        return true;
    }
    let alias = |s: &str| -> String {
        match s {
            "image/jpg" | "image/pjpeg" => "image/jpeg".into(),
            "audio/mp3" => "audio/mpeg".into(),
            "application/x-zip-compressed" => "application/zip".into(),
            "image/x-png" => "image/png".into(),
            other => other.into(),
        }
    };
    let (declared, detected) = (alias(&declared), alias(&detected));
    if declared == detected {
        return true;
    }
    // Office documents and archives built on ZIP: a docx declared as application/zip (or the
    // other way round) is honest.
    let zip_family = |s: &str| {
        s == "application/zip"
            || s.starts_with("application/vnd.openxmlformats")
            || s == "application/epub+zip"
            || s == "application/java-archive"
    };
    zip_family(&declared) && zip_family(&detected)
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn finalize(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
) -> Result<Response, AppError> {
    let t = &tenant.0.id;
    let now = now_ms();
    let view = open_gate(state.store.get_session(t, &session_id, now).await?, t, now)?;
    if view.session.status != SessionStatus::Active {
        return Err(AppError::SessionNotActive(view.session.status));
    }
    let incomplete: Vec<String> = view
        .files
        .iter()
        .filter(|f| {
            matches!(
                f.status,
                crate::model::FileStatus::Registered | crate::model::FileStatus::Completing
            )
        })
        .map(|f| f.id.clone())
        .collect();
    if !incomplete.is_empty() {
        return Err(AppError::FilesIncomplete(incomplete));
    }
    // (file id, object key, declared type) of every completed, non-empty, typed file.
    let to_check: Vec<(String, String, String)> = view
        .files
        .iter()
        .filter(|f| f.status == crate::model::FileStatus::Completed && f.size_bytes > 0)
        .filter_map(|f| {
            f.content_type
                .clone()
                .map(|ct| (f.id.clone(), f.object_key.clone(), ct))
        })
        .collect();
    // MIME types are advisory while uploading (a warning per mismatching part); this is the
    // one place that enforces them, on the first bytes of every assembled object.
    let storage = state.storage.clone();
    let checks = stream::iter(to_check)
        .map(move |(file_id, key, declared)| {
            let storage = storage.clone();
            async move {
                let head = storage.read_head(&key, SNIFF_BYTES).await?;
                match infer::get(&head) {
                    Some(kind) if !compatible(&declared, kind.mime_type()) => {
                        Ok::<_, AppError>(Some(AppError::ContentTypeMismatch {
                            file_id,
                            declared,
                            detected: kind.mime_type().to_owned(),
                        }))
                    }
                    _ => Ok(None),
                }
            }
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    for check in checks {
        if let Some(mismatch) = check? {
            tracing::warn!(code = "contentTypeMismatch", error = ?mismatch, "finalize refused: content contradicts its declared type");
            return Err(mismatch);
        }
    }
    match open_gate(state.store.finalize(t, &session_id, now).await?, t, now)? {
        Finalized::Done(view) => {
            state.metrics.sessions_finalized.inc();
            let mut v = session_json(&view.session);
            v.files = Some(view.files.iter().map(file_json).collect());
            Ok(Json(v).into_response())
        }
        Finalized::Incomplete(ids) => Err(AppError::FilesIncomplete(ids)),
    }
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn type_compatibility() {
        assert!(compatible("image/png", "image/png"));
        assert!(compatible("IMAGE/PNG; q=1", "image/png"));
        assert!(compatible("image/jpg", "image/jpeg"));
        assert!(compatible("application/octet-stream", "image/png"));
        assert!(compatible(
            "application/zip",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        ));
        assert!(!compatible("application/pdf", "image/png"));
        assert!(!compatible("image/png", "application/pdf"));
    }
}
