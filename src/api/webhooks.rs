//! Webhook event endpoints (API key only: the authenticator's allow-lists keep upload
//! tokens and end-user JWTs to session routes): the pending and dead-lettered events, and
//! delivering a dead-lettered one again.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::{ApiPath, AppState, Tenant};
use crate::error::{AppError, FieldError};
use crate::events::{event_id, parse_event_id, EventStatus, StoredEvent};
use crate::model::{now_ms, rfc3339_ms};

/// The largest page of `GET /v1/webhooks/events`.
const EVENTS_PAGE_MAX: usize = 100;

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct EventView<'a> {
    event_id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: &'a str,
    status: &'static str,
    attempts: u32,
    last_attempt_at: Option<String>,
    last_status_code: Option<u16>,
    next_attempt_at: Option<String>,
}

fn view(e: &StoredEvent) -> EventView<'_> {
    let (status, next) = match e.status {
        EventStatus::Pending(due) => ("pending", Some(rfc3339_ms(due))),
        EventStatus::Failed(_) => ("failed", None),
    };
    EventView {
        event_id: e.id(),
        kind: e.kind.as_str(),
        session_id: &e.session.id,
        status,
        attempts: e.delivery.attempts,
        last_attempt_at: e.delivery.last_attempt_ms.map(rfc3339_ms),
        last_status_code: e.delivery.last_status,
        next_attempt_at: next,
    }
}

/// `status`, `limit` and `cursor` of the listing.
struct Query {
    failed: bool,
    limit: usize,
    after: Option<(String, u64)>,
}

fn query(q: Option<&str>) -> Result<Query, AppError> {
    let (mut failed, mut limit, mut after) = (false, 50, None);
    let mut errors = Vec::new();
    for (name, value) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match &*name {
            "status" => match &*value {
                "pending" => failed = false,
                "failed" => failed = true,
                _ => errors.push(FieldError::new("status", "must be pending or failed")),
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=EVENTS_PAGE_MAX).contains(&n) => limit = n,
                _ => errors.push(FieldError::new(
                    "limit",
                    format!("must be an integer between 1 and {EVENTS_PAGE_MAX}"),
                )),
            },
            "cursor" if value.is_empty() => {}
            "cursor" => match parse_event_id(&value) {
                Some((s, seq)) => after = Some((s.to_owned(), seq)),
                None => errors.push(FieldError::new(
                    "cursor",
                    "must be a nextCursor returned by this API",
                )),
            },
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(Query {
            failed,
            limit,
            after,
        })
    } else {
        Err(AppError::Validation(errors))
    }
}

/// `GET /v1/webhooks/events?status=pending|failed&limit=&cursor=`.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id))]
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    uri: axum::http::Uri,
) -> Result<Response, AppError> {
    let Query {
        failed,
        limit,
        after,
    } = query(uri.query())?;
    // One more than the page tells whether another page follows.
    let events = state
        .store
        .list_events(
            &tenant.0.id,
            failed,
            after.as_ref().map(|(s, n)| (s.as_str(), *n)),
            limit + 1,
            now_ms(),
        )
        .await?;
    let next = (events.len() > limit)
        .then(|| {
            events
                .get(limit - 1)
                .map(|e| event_id(&e.session.id, e.sequence))
        })
        .flatten();
    let page: Vec<EventView<'_>> = events.iter().take(limit).map(view).collect();
    Ok(Json(serde_json::json!({ "events": page, "nextCursor": next })).into_response())
}

/// `POST /v1/webhooks/events/{eventId}/retry`: 202, the dead-lettered event is pending
/// again with a new retry window.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, event_id = %id))]
pub(super) async fn retry(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, AppError> {
    let (session_id, seq) = parse_event_id(&id).ok_or(AppError::EventNotFound)?;
    let now = now_ms();
    if !state
        .store
        .retry_event(&tenant.0.id, session_id, seq, now)
        .await?
    {
        return Err(AppError::EventNotFound);
    }
    state.uploads.wake(&tenant.0.id, session_id);
    tracing::info!("dead-lettered event queued again");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "eventId": id, "status": "pending" })),
    )
        .into_response())
}
