//! Deleting files and sessions: the store queues the storage cleanup in the same atomic step
//! as the state change; the caller does it at once, and whatever storage did not confirm is
//! retried by the reaper until it is done.

use futures_util::stream::{self, StreamExt};

use super::{ms, open_gate, Uploads};
use crate::error::AppError;
use crate::model::now_ms;
use crate::store::{Cleanup, FileAborted, SessionAborted};

/// Storage calls one cleanup runs at once.
const CLEANUP_CONCURRENCY: usize = 8;

impl Uploads {
    /// `DELETE` of a file: aborted in the store (its count slot freed), then its upload
    /// aborted and any object deleted in storage. `Ok` once storage confirmed it or the
    /// cleanup is queued durably; a file whose completion is in flight is refused (409).
    pub async fn delete_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<(), AppError> {
        let now = now_ms();
        let outcome = self
            .store
            .abort_file(tenant, session_id, file_id, now)
            .await?;
        self.wake(tenant, session_id);
        match open_gate(outcome, tenant, now)? {
            FileAborted::CompletionInProgress => Err(AppError::CompletionInProgress),
            FileAborted::Deleted { cleanup: None } => Ok(()),
            FileAborted::Deleted {
                cleanup: Some(queued),
            } => self.clean_now(tenant, session_id, &[queued]).await,
        }
    }

    /// `DELETE` of a session: a finalized one is forgotten (its objects were handed to the
    /// application); any other is aborted and everything it stored is removed (open uploads
    /// aborted, completed files' objects deleted), as for [`Uploads::delete_file`].
    ///
    /// A finalized session with files deleted before finalize whose storage cleanup is still
    /// queued is cleaned first, then forgotten; if storage cannot confirm the cleanup yet,
    /// 503 (the queue stays, the reaper keeps at it, and the retry forgets the session).
    pub async fn delete_session(&self, tenant: &str, session_id: &str) -> Result<(), AppError> {
        // The owner, for the user's quota count: read before the session is forgotten.
        let owner = self
            .store
            .session_owner(tenant, session_id)
            .await?
            .flatten();
        let owner = owner.as_deref();
        for _ in 0..2 {
            let now = now_ms();
            let outcome = self.store.abort_session(tenant, session_id, now).await?;
            self.wake(tenant, session_id);
            match open_gate(outcome, tenant, now)? {
                SessionAborted::CompletionInProgress => return Err(AppError::CompletionInProgress),
                SessionAborted::Forgotten => {
                    tracing::info!("finalized session forgotten; its objects stay");
                    // Finalize released it already; again in case that release was lost.
                    self.release_live(tenant, session_id, owner).await;
                    return Ok(());
                }
                SessionAborted::Aborted(queued) => {
                    self.release_live(tenant, session_id, owner).await;
                    return self.clean_now(tenant, session_id, &queued).await;
                }
                SessionAborted::CleanupFirst(queued) => {
                    self.clean_now(tenant, session_id, &queued).await?;
                }
            }
        }
        Err(AppError::Unavailable(
            "storage has not confirmed the cleanup of files deleted before finalize".into(),
        ))
    }

    /// Does the `queued` cleanups in storage and reports what storage confirmed. The reaper is asked to
    /// look at the session after `cleanup_retry` before storage is called, so a cleanup this
    /// request does not finish (storage refuses, the request is cut by its timeout, the
    /// replica dies) is retried then, not only at the session's expiry. The queue entries
    /// themselves are already durable.
    async fn clean_now(
        &self,
        tenant: &str,
        session_id: &str,
        queued: &[Cleanup],
    ) -> Result<(), AppError> {
        if queued.is_empty() {
            return Ok(());
        }
        let at = now_ms().saturating_add(ms(self.timing.cleanup_retry));
        self.store.schedule_reap(tenant, session_id, at).await?;
        let done = self.clean(tenant, queued).await;
        self.store.cleanup_done(tenant, session_id, &done).await?;
        if done.len() < queued.len() {
            tracing::warn!(
                left = queued.len() - done.len(),
                "storage cleanup incomplete; queued for the reaper"
            );
        }
        Ok(())
    }

    /// The session no longer counts against the tenant's `max_active_sessions`. A failure
    /// is logged, not returned: the count ends at the session's expiry anyway.
    /// An end user's session (`owner`) also stops counting against the user's
    /// `maxSessions`.
    pub(super) async fn release_live(&self, tenant: &str, session_id: &str, owner: Option<&str>) {
        let user_scope =
            owner.map(|sub| super::user_live_scope(tenant, &crate::jwt::user_key(sub)));
        for scope in std::iter::once(tenant).chain(user_scope.as_deref()) {
            if let Err(e) = self.store.release_live(scope, session_id).await {
                tracing::warn!(error = %e, "releasing a session's quota count failed; it ends at the session's expiry");
            }
        }
    }

    /// Aborts each file's storage upload and deletes its object (a few at a time); returns
    /// the ids of the files storage confirmed clean. Both calls are idempotent, so a file
    /// cleaned twice (a retry after a lost confirmation) costs two calls, nothing else.
    pub(super) async fn clean(&self, tenant: &str, files: &[Cleanup]) -> Vec<String> {
        let storage = self.storage(tenant).clone();
        stream::iter(files.to_vec())
            .map(move |f| {
                let storage = storage.clone();
                async move {
                    if let Some(deadline) = f.upload_id.as_deref().and_then(super::uppy::post_deadline) {
                        // A form upload (`super::uppy`): until its policy's deadline a POST
                        // can still land, so the cleanup waits (the reaper comes back), then
                        // removes the staged object as well.
                        if now_ms() < deadline {
                            return None;
                        }
                        let staged = super::uppy::staging_key(&f.object_key);
                        if let Err(e) = storage.delete_object(&staged).await {
                            tracing::warn!(file_id = %f.file_id, error = %e, "deleting a staged form upload failed; retried later");
                            return None;
                        }
                    } else if let Some(upload_id) = &f.upload_id {
                        if let Err(e) = storage.abort_upload(&f.object_key, upload_id).await {
                            tracing::warn!(file_id = %f.file_id, error = %e, "aborting a storage upload failed; retried later");
                            return None;
                        }
                    }
                    if let Err(e) = storage.delete_object(&f.object_key).await {
                        tracing::warn!(file_id = %f.file_id, error = %e, "deleting an object failed; retried later");
                        return None;
                    }
                    Some(f.file_id)
                }
            })
            .buffer_unordered(CLEANUP_CONCURRENCY)
            .filter_map(|done| async move { done })
            .collect()
            .await
    }
}
