//! The reaper: aborts the storage uploads of expired sessions.
//!
//! Every replica runs one. Each pass claims due sessions from the store's expiry index with a
//! lease (an atomic re-scoring in the index), so two replicas never reap the same session at
//! once; a replica that dies mid-reap leaves the lease to run out and another one finishes
//! the job. Aborting is idempotent, so a retried session costs nothing.
//!
//! ## Cleanup timing and the client's TTL buffer
//! A session's uploads are aborted within `reaper_interval_seconds` after `expiresAt`, and
//! from `expiresAt` on every request answers 410. Clients should therefore not start a part
//! they cannot finish before `expiresAt`: keep a buffer of at least one part's upload time
//! plus the reaper interval (the README suggests 2 minutes), and on 410 create a new session,
//! register the files again and resume. The session's state stays readable (as 410) for
//! `session_retention_seconds` after expiry, then the store forgets it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::model::now_ms;

/// Lease on a claimed session: long enough to abort a session's uploads.
const CLAIM_LEASE_MS: i64 = 60_000;
/// Sessions claimed per store call.
const BATCH: usize = 100;

/// Runs passes every `interval` until `stop` is cancelled.
pub async fn run(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match pass(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "reaper pass done"),
            Err(e) => tracing::warn!(error = %e, "reaper pass failed; retrying next interval"),
        }
    }
    tracing::debug!("reaper stopped");
}

/// One pass: claims and reaps due sessions until none are left; returns how many it reaped.
pub async fn pass(state: &AppState) -> Result<usize, crate::store::StoreError> {
    let mut reaped = 0;
    loop {
        let now = now_ms();
        let due = state
            .store
            .claim_expired(now, CLAIM_LEASE_MS, BATCH)
            .await?;
        if due.is_empty() {
            return Ok(reaped);
        }
        for (tenant, session_id) in due {
            let span = tracing::info_span!("reap", tenant = %tenant, session_id = %session_id);
            let _enter = span.enter();
            let Some(r) = state.store.reap(&tenant, &session_id, now).await? else {
                state.store.reap_done(&tenant, &session_id).await?;
                continue;
            };
            if r.first_observation {
                crate::api::log_expiration(&r.session, &tenant, now, "reaper");
                state.metrics.sessions_expired.inc();
            }
            let aborted = crate::api::abort_uploads(state, &r.open_uploads).await;
            state.metrics.uploads_reaped.add(aborted as u64);
            if aborted == r.open_uploads.len() {
                state.store.reap_done(&tenant, &session_id).await?;
                state.metrics.sessions_reaped.inc();
                reaped += 1;
            }
            // Otherwise the claim's lease runs out and a later pass retries.
        }
    }
}
