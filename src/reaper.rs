//! The reaper: aborts the storage uploads of expired sessions and retries the storage
//! cleanups of deleted files and sessions (the protocol is [`crate::uploads::reap`]).
//!
//! Every replica runs one. Each pass claims due sessions from the store's expiry index with a
//! lease (an atomic re-scoring in the index), so two replicas do not reap the same session at
//! once (except when a `DELETE` moves a claimed session's entry earlier); a replica that dies
//! mid-reap leaves the lease to run out and another one finishes the job. Every storage step
//! (abort, delete) is idempotent, so a session reaped twice costs two calls, nothing else.
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

/// One pass (see [`crate::uploads::Uploads::reap_pass`]); returns how many expired sessions
/// it finished.
pub async fn pass(state: &AppState) -> Result<usize, crate::store::StoreError> {
    state.uploads.reap_pass().await
}
