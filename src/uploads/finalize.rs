//! Finalize: every live file completed, every completed file's content checked against its
//! declared type, then the session is handed over, in that order and atomically with the
//! check's result.

use futures_util::stream::{self, StreamExt};

use super::{open_gate, Uploads};
use crate::error::AppError;
use crate::model::{now_ms, FileStatus, SessionStatus};
use crate::store::{Finalized, Page, SessionView, FILES_PAGE_MAX};

/// Bytes read from each object at finalize for the magic-byte check.
pub(super) const SNIFF_BYTES: usize = 8192;
/// Objects sniffed at once.
const SNIFF_CONCURRENCY: usize = 8;
/// Times finalize looks again when files were completed while it was checking. Each round
/// is only needed if a client completes files concurrently with its own finalize.
const ROUNDS: usize = 3;

impl Uploads {
    /// Finalizes a session. The store refuses (and finalize checks again) when a file was
    /// completed after the content check looked, so no file is ever finalized unchecked.
    pub async fn finalize(&self, tenant: &str, session_id: &str) -> Result<SessionView, AppError> {
        for _ in 0..ROUNDS {
            let now = now_ms();
            let view = self.whole_session(tenant, session_id, now).await?;
            if view.session.status != SessionStatus::Active {
                if view.session.status == SessionStatus::Finalized {
                    // A repeated finalize: make sure the quota count went (idempotent).
                    self.release_live(tenant, session_id, view.session.owner.as_deref())
                        .await;
                }
                return Err(AppError::SessionNotActive(view.session.status));
            }
            // Form uploads whose objects landed are completed first (`super::uppy`).
            if self.settle_posted(tenant, &view.files).await {
                continue;
            }
            let incomplete: Vec<String> = view
                .files
                .iter()
                .filter(|f| matches!(f.status, FileStatus::Registered | FileStatus::Completing))
                .map(|f| f.id.clone())
                .collect();
            if !incomplete.is_empty() {
                return Err(AppError::FilesIncomplete(incomplete));
            }
            let checked = self.check_contents(tenant, &view).await?;
            let now = now_ms();
            let outcome = self
                .store
                .finalize(tenant, session_id, &checked, now)
                .await?;
            self.wake(tenant, session_id);
            match open_gate(outcome, tenant, now)? {
                Finalized::Done(view) => {
                    self.metrics.sessions_finalized.inc();
                    self.release_live(tenant, session_id, view.session.owner.as_deref())
                        .await;
                    return Ok(view);
                }
                Finalized::Incomplete(ids) => return Err(AppError::FilesIncomplete(ids)),
                Finalized::Unchecked(ids) => {
                    tracing::info!(
                        files = ids.len(),
                        "files completed during finalize; checking again"
                    );
                }
            }
        }
        Err(AppError::CompletionInProgress)
    }

    /// The session with every file, page by page (the store's `finalize` checks again,
    /// atomically, what changed between the pages).
    async fn whole_session(
        &self,
        tenant: &str,
        session_id: &str,
        now: i64,
    ) -> Result<SessionView, AppError> {
        let mut view = open_gate(
            self.store
                .get_session(tenant, session_id, Page::FIRST, now)
                .await?,
            tenant,
            now,
        )?;
        while let Some(after) = view.next_cursor {
            let page = Page {
                after: Some(after),
                limit: FILES_PAGE_MAX,
            };
            let next = open_gate(
                self.store
                    .get_session(tenant, session_id, page, now)
                    .await?,
                tenant,
                now,
            )?;
            view.files.extend(next.files);
            view.next_cursor = next.next_cursor;
        }
        Ok(view)
    }

    /// Checks the first bytes of every completed, non-empty, typed file against its
    /// declared type; returns the ids of every completed file (all of them passed).
    ///
    /// MIME types are advisory while uploading (a warning per mismatching part); this is the
    /// one place that enforces them.
    async fn check_contents(
        &self,
        tenant: &str,
        view: &SessionView,
    ) -> Result<Vec<String>, AppError> {
        let completed: Vec<_> = view
            .files
            .iter()
            .filter(|f| f.status == FileStatus::Completed)
            .collect();
        let to_check: Vec<(String, String, String)> = completed
            .iter()
            .filter(|f| f.size_bytes > 0)
            .filter_map(|f| {
                f.content_type
                    .clone()
                    .map(|ct| (f.id.clone(), f.object_key.clone(), ct))
            })
            .collect();
        let storage = self.storage(tenant).clone();
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
            .buffered(SNIFF_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for check in checks {
            if let Some(mismatch) = check? {
                tracing::warn!(code = "contentTypeMismatch", error = ?mismatch, "finalize refused: content contradicts its declared type");
                return Err(mismatch);
            }
        }
        Ok(completed.iter().map(|f| f.id.clone()).collect())
    }
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
