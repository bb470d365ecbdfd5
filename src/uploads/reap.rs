//! The reaper's pass: for every session the store's index says is due, abort the open
//! uploads of an expired session, do the storage cleanups deleted files queued, and tell
//! the index when to look again.

use tracing::Instrument;

use super::{log_expiration, ms, Uploads};
use crate::model::now_ms;
use crate::store::{Cleanup, StoreError};

/// Lease on a claimed session: long enough to clean a session's files.
const CLAIM_LEASE_MS: i64 = 60_000;
/// Sessions claimed per store call.
const BATCH: usize = 100;

impl Uploads {
    /// One pass: claims and reaps due sessions until none are left; returns how many
    /// expired sessions it finished (nothing left in storage, out of the index).
    pub async fn reap_pass(&self) -> Result<usize, StoreError> {
        // Form uploads this replica signed whose objects landed become completed files
        // (`super::uppy`): within one reaper interval of landing.
        self.settle_pending_posts().await;
        let mut reaped = 0;
        // Claims take what was due when the pass started: a session this pass reschedules
        // (a cleanup storage refused, retried after `cleanup_retry`) waits for the next pass
        // instead of keeping this one busy for as long as storage is down.
        let started = now_ms();
        let claimed_until = started.saturating_add(CLAIM_LEASE_MS);
        loop {
            if now_ms().saturating_sub(started) > CLAIM_LEASE_MS / 2 {
                return Ok(reaped);
            }
            let due = self
                .store
                .claim_expired(started, CLAIM_LEASE_MS, BATCH)
                .await?;
            let now = now_ms();
            if due.is_empty() {
                return Ok(reaped);
            }
            for (tenant, session_id) in due {
                // Past half the claims' lease, stop: a session claimed now would be claimable
                // by another replica while this one still works on it. Claimed sessions not
                // reached become due again when their lease runs out.
                if now_ms().saturating_sub(started) > CLAIM_LEASE_MS / 2 {
                    return Ok(reaped);
                }
                // `instrument`, not `span.enter()`: an entered guard held across `.await`
                // would be attached to whichever task the worker thread runs next.
                let span = tracing::info_span!("reap", tenant = %tenant, session_id = %session_id);
                // One session's failure (corrupt data, a timeout) does not end the pass: the
                // session is due again when its claim runs out.
                match self
                    .reap_session(&tenant, &session_id, now, claimed_until)
                    .instrument(span.clone())
                    .await
                {
                    Ok(true) => reaped += 1,
                    Ok(false) => {}
                    Err(e) => {
                        span.in_scope(|| {
                            tracing::warn!(error = %e, "reaping a session failed; it is tried again later");
                        });
                        // Back off like a refused cleanup; if even this fails, the claim runs
                        // out and the session is due again then.
                        let next = now_ms().saturating_add(ms(self.timing.cleanup_retry));
                        let _ = self
                            .store
                            .reap_done(&tenant, &session_id, claimed_until, Some(next))
                            .await;
                    }
                }
            }
        }
    }

    /// Reaps one claimed session; true when it is finished with.
    async fn reap_session(
        &self,
        tenant: &str,
        session_id: &str,
        now: i64,
        claimed_until: i64,
    ) -> Result<bool, StoreError> {
        let reaped = self.store.reap(tenant, session_id, now).await?;
        self.wake(tenant, session_id);
        let Some(r) = reaped else {
            // Gone (retention passed, or an index entry written before a session that was
            // never created).
            self.store
                .reap_done(tenant, session_id, claimed_until, None)
                .await?;
            return Ok(false);
        };
        if r.first_observation {
            log_expiration(&r.session, tenant, now, "reaper");
            self.metrics.sessions_expired.inc();
        }
        let open: Vec<Cleanup> = r.open_uploads.iter().map(Cleanup::from).collect();
        let aborted = self.clean(tenant, &open).await;
        self.metrics.uploads_reaped.inc_by(aborted.len() as u64);
        let cleaned = self.clean(tenant, &r.cleanup).await;
        self.store
            .cleanup_done(tenant, session_id, &cleaned)
            .await?;
        let left = r.open_uploads.len() - aborted.len() + r.cleanup.len() - cleaned.len();
        let expired = r.session.is_past_expiry(now);
        let next = if left > 0 {
            Some(now.saturating_add(ms(self.timing.cleanup_retry)))
        } else if let Some(until) = r.busy_until {
            // A completion in flight: look again when its lease can have run out.
            Some(until.max(now.saturating_add(1)))
        } else if expired {
            None
        } else {
            // Only queued cleanups brought it here early: back to its expiry.
            Some(r.session.expires_at.saturating_mul(1000))
        };
        self.store
            .reap_done(tenant, session_id, claimed_until, next)
            .await?;
        if next.is_none() {
            self.metrics.sessions_reaped.inc();
            return Ok(true);
        }
        Ok(false)
    }
}
