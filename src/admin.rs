//! The admin listener: `/healthz`, `/readyz`, `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::api::AppState;

/// How long `/readyz` waits for Redis and each storage (they are asked at once).
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
    let pings = state.storages.distinct().iter().map(|(label, storage)| async move {
        let result = tokio::time::timeout(READY_TIMEOUT, storage.ping()).await;
        if !matches!(result, Ok(Ok(()))) {
            tracing::warn!(storage = %label, result = ?result.map(|r| r.map_err(|e| e.to_string())), "readyz: storage not reachable");
            return false;
        }
        true
    });
    let (store, storages) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, state.store.ping()),
        futures_util::future::join_all(pings)
    );
    let store_ok = matches!(store, Ok(Ok(())));
    let storage_ok = storages.iter().all(|ok| *ok);
    if !store_ok {
        tracing::warn!(result = ?store.map(|r| r.map_err(|e| e.to_string())), "readyz: session store not reachable");
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
