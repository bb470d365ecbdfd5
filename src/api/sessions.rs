//! Session endpoints: create, get, abort, finalize.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::{
    new_id, open_gate, session_json, session_with_files, ApiPath, AppState, JsonBody, Tenant,
};
use crate::error::AppError;
use crate::model::{now_ms, SessionRecord, SessionStatus};
use crate::store::Page;

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
    // The quota counts the session first: a create cut after this step leaves a count that
    // ends at the session's expiry. A create that fails is released again; if it failed
    // only in the reply (a timeout after Redis applied it), that session goes uncounted
    // until its expiry: the quota can be exceeded by such timeouts, never leak a place.
    let counted = state
        .store
        .reserve_live(
            &t.id,
            &session.id,
            session.expires_at.saturating_mul(1000),
            t.max_active_sessions,
            now.saturating_mul(1000),
        )
        .await?;
    if !counted {
        return Err(AppError::QuotaExceeded(t.max_active_sessions));
    }
    if let Err(e) = state.store.create_session(&session).await {
        if let Err(release) = state.store.release_live(&t.id, &session.id).await {
            tracing::warn!(error = %release, "releasing the quota of a session not created failed; it ends at the session's expiry");
        }
        return Err(e.into());
    }
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
            .get_session(&tenant.0.id, &session_id, Page::FIRST, now)
            .await?,
        &tenant.0.id,
        now,
    )?;
    Ok(Json(session_with_files(&view)).into_response())
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn abort(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
) -> Result<StatusCode, AppError> {
    state
        .uploads
        .delete_session(&tenant.0.id, &session_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn finalize(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
) -> Result<Response, AppError> {
    let view = state.uploads.finalize(&tenant.0.id, &session_id).await?;
    Ok(Json(session_with_files(&view)).into_response())
}
