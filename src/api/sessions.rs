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
    user: Option<Extension<crate::auth::User>>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let user = user.map(|Extension(u)| u.0);
    // An end user's token limits apply under the tenant's own.
    let limited = user.as_ref().and_then(|u| u.limits.under(&tenant.0));
    let t = limited.as_ref().unwrap_or(&tenant.0);
    let req = crate::validate::create_session(&body, t)?;
    // The token is minted after the session is stored: the keys must be there first.
    ensure_token_keys(&state).await?;
    let session = open(&state, &tenant, user.as_ref(), req).await?;
    let location = format!("/v1/sessions/{}", session.id);
    let mut view = session_json(&session);
    view.upload_token = Some(mint(
        &state,
        &session.tenant,
        &session.id,
        session.expires_at,
    )?);
    view.upload_token_expires_at = Some(crate::model::rfc3339(session.expires_at));
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// Creates a session for `tenant` (an end user's when `user`): counted in the tenant's
/// (and the user's) live-session quota, stored, announced to the webhook worker.
pub(super) async fn open(
    state: &AppState,
    tenant: &Tenant,
    user: Option<&std::sync::Arc<crate::jwt::EndUser>>,
    req: crate::validate::CreateSession,
) -> Result<SessionRecord, AppError> {
    let limited = user.and_then(|u| u.limits.under(&tenant.0));
    let t = limited.as_ref().unwrap_or(&tenant.0);
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
        owner: user.map(|u| u.sub.clone()),
        // Kept with the session so that every credential meets them (an upload token
        // minted for it included).
        max_file_size_bytes: user
            .and_then(|u| u.limits.max_file_size_bytes)
            .map(|n| n.min(tenant.0.max_file_size_bytes)),
        allowed_content_types: user
            .and_then(|u| u.limits.allowed_content_types.as_ref())
            .map(|list| list.iter().map(|t| t.to_ascii_lowercase()).collect()),
        outbox_keep_ms: (!tenant.0.webhooks.is_empty()).then(|| {
            i64::try_from(state.config.webhook_retry.outbox_keep().as_millis()).unwrap_or(i64::MAX)
        }),
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
    // The user's own `maxSessions`, counted the same way under the user's scope.
    // Every session a user creates counts there, so a token with `maxSessions` sees the
    // sessions the user's earlier tokens created.
    let user_scope = user.map(|u| {
        (
            crate::uploads::user_live_scope(&t.id, &u.key),
            u.limits.max_sessions.unwrap_or(u64::MAX),
        )
    });
    if let Some((scope, limit)) = &user_scope {
        let counted = state
            .store
            .reserve_live(
                scope,
                &session.id,
                session.expires_at.saturating_mul(1000),
                *limit,
                now.saturating_mul(1000),
            )
            .await;
        if !matches!(counted, Ok(true)) {
            // An error may come after Redis counted it: give that place back too.
            let scope = counted.is_err().then_some(scope.as_str());
            release_quota(state, &t.id, &session.id, scope).await;
            return Err(match counted {
                Ok(_) => AppError::QuotaExceeded(*limit),
                Err(e) => e.into(),
            });
        }
    }
    if let Err(e) = state.store.create_session(&session).await {
        let scope = user_scope.as_ref().map(|(scope, _)| scope.as_str());
        release_quota(state, &t.id, &session.id, scope).await;
        return Err(e.into());
    }
    state.uploads.wake(&t.id, &session.id);
    state.metrics.sessions_created.inc();
    Ok(session)
}

/// Gives back the quota places a session that was not created took (the tenant's, and the
/// user's under `user_scope`). A failure is logged: the place ends at the session's expiry.
async fn release_quota(state: &AppState, tenant: &str, session_id: &str, user_scope: Option<&str>) {
    for scope in std::iter::once(tenant).chain(user_scope) {
        if let Err(release) = state.store.release_live(scope, session_id).await {
            tracing::warn!(error = %release, "releasing the quota of a session not created failed; it ends at the session's expiry");
        }
    }
}

/// The upload token keys are loaded (asked of the store when none are, and again every
/// [`crate::tokens::RELOAD_AFTER`], so a replica picks up a key the store replaced).
async fn ensure_token_keys(state: &AppState) -> Result<(), AppError> {
    if state.tokens.ready() && !state.tokens.needs_reload(crate::tokens::RELOAD_AFTER) {
        return Ok(());
    }
    match state.tokens.reload(&*state.store).await {
        Ok(()) => Ok(()),
        // Loaded before: keep signing with that key rather than fail the request.
        Err(e) if state.tokens.ready() => {
            tracing::warn!(error = %e, "reloading the upload token key failed; the loaded one is kept");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn mint(
    state: &AppState,
    tenant: &str,
    session_id: &str,
    expires_at: i64,
) -> Result<String, AppError> {
    state
        .tokens
        .mint(tenant, session_id, expires_at)
        .ok_or_else(|| AppError::Internal("an upload token could not be minted".into()))
}

/// The session's record through the store's gate (404 unknown, 410 expired); one page of
/// one file is read with it.
async fn session_record(
    state: &AppState,
    tenant: &str,
    session_id: &str,
) -> Result<SessionRecord, AppError> {
    let now = now_ms();
    let page = Page {
        after: None,
        limit: 1,
    };
    let view = open_gate(
        state
            .store
            .get_session(tenant, session_id, page, now)
            .await?,
        tenant,
        now,
    )?;
    Ok(view.session)
}

/// `POST /v1/sessions/{id}/upload-tokens`: another upload token for the session, valid for
/// `ttlSeconds` (default: the session's remaining lifetime), never past `expiresAt`.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn mint_token(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let ttl = crate::validate::token_ttl(&body)?;
    ensure_token_keys(&state).await?;
    let now = now_ms();
    let session = session_record(&state, &tenant.0.id, &session_id).await?;
    if session.status == SessionStatus::Aborted {
        return Err(AppError::SessionNotActive(SessionStatus::Aborted));
    }
    // Rounded up to the second: a token of `ttlSeconds` works for at least that long.
    let expires_at = match ttl {
        Some(ttl) => now
            .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX).saturating_mul(1000))
            .saturating_add(999)
            .div_euclid(1000)
            .min(session.expires_at),
        None => session.expires_at,
    };
    let token = mint(&state, &tenant.0.id, &session_id, expires_at)?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "uploadToken": token,
            "uploadTokenExpiresAt": crate::model::rfc3339(expires_at),
        })),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(session_id): ApiPath<String>,
) -> Result<Response, AppError> {
    let read = || async {
        let now = now_ms();
        open_gate(
            state
                .store
                .get_session(&tenant.0.id, &session_id, Page::FIRST, now)
                .await?,
            &tenant.0.id,
            now,
        )
    };
    let mut view = read().await?;
    // Form uploads whose objects landed are completed now (`crate::uploads::uppy`).
    if state.uploads.settle_posted(&tenant.0.id, &view.files).await {
        view = read().await?;
    }
    Ok(super::gone_if(
        Json(session_with_files(&view)).into_response(),
        view.session.status == SessionStatus::Aborted,
    ))
}

#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id = %session_id))]
pub(super) async fn abort(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<crate::auth::SessionScope>>,
    user: Option<Extension<crate::auth::User>>,
    ApiPath(session_id): ApiPath<String>,
) -> Result<StatusCode, AppError> {
    if scope.is_some() || user.is_some() {
        // A token's or end user's repeated DELETE: 404 once the session is deleted (the
        // API key's repeat is 204). One more store read, on this rare request only.
        let session = session_record(&state, &tenant.0.id, &session_id).await?;
        if session.status == SessionStatus::Aborted {
            return Err(AppError::SessionNotFound);
        }
    }
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
