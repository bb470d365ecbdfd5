//! The admin listener: `/healthz`, `/readyz`, `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::api::AppState;

/// How long `/readyz` waits for Redis and storage.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Metrics of components outside [`crate::metrics::Metrics`] (the layers' counters), read
/// on each scrape.
pub type ExtraMetrics = std::sync::Arc<prometheus_client::registry::Registry>;

/// The admin routes.
pub fn routes(state: AppState, extra: ExtraMetrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(move |State(state): State<AppState>| {
                let extra = extra.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                        state.metrics.render(&extra),
                    )
                }
            }),
        )
        .with_state(state)
}

async fn ready(State(state): State<AppState>) -> Response {
    let store = tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await;
    let storage = tokio::time::timeout(READY_TIMEOUT, state.storage.ping()).await;
    let store_ok = matches!(store, Ok(Ok(())));
    let storage_ok = matches!(storage, Ok(Ok(())));
    if !store_ok {
        tracing::warn!(result = ?store.map(|r| r.map_err(|e| e.to_string())), "readyz: session store not reachable");
    }
    if !storage_ok {
        tracing::warn!(result = ?storage.map(|r| r.map_err(|e| e.to_string())), "readyz: storage not reachable");
    }
    let status = if store_ok && storage_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        Json(json!({"sessionStore": word(store_ok), "storage": word(storage_ok)})),
    )
        .into_response()
}
