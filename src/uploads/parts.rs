//! Opening a file's storage upload, uploading parts through the gateway, presigning them.

use std::time::Duration;

use super::{open_gate, Uploads};
use crate::error::AppError;
use crate::model::{expected_part_len, now_ms, FileRecord, FileStatus, PartRecord};
use crate::storage::{ObjectAttributes, PartBody, PartChecksum, StorageKind};
use crate::store::{Gate, UploadIdSet};

/// Validity of presigned part URLs.
pub const PRESIGN_TTL: Duration = Duration::from_secs(3600);

/// A part upload as the handler read it from the request.
#[derive(Debug)]
pub struct PartRequest<'a> {
    /// The part number as sent (validated against the file here).
    pub part_number: &'a str,
    /// The body's length (`Content-Length`), or the error that reading it gave: reported
    /// only once the file and part number are known to be right.
    pub length: Result<u64, AppError>,
    /// The request's `Content-Type`, if any (advisory: a mismatch is logged).
    pub content_type: Option<&'a str>,
    /// A checksum header to hand to storage.
    pub checksum: Option<PartChecksum>,
}

/// Presigned part URLs.
#[derive(Debug)]
pub struct Presigned {
    /// `(part number, URL)`, in the order asked for.
    pub parts: Vec<(u32, String)>,
    /// When the URLs stop working (Unix seconds).
    pub expires_at: i64,
}

pub(super) fn file_not_open(f: &FileRecord) -> AppError {
    match f.status {
        FileStatus::Aborted => AppError::FileAborted,
        status => AppError::FileNotActive(status.public_str()),
    }
}

impl Uploads {
    /// The storage upload id of a file, creating the multipart upload on first use.
    ///
    /// Uploads are created lazily (first part, presign or complete) rather than at
    /// registration: registration stays one store call with no storage round trip, and a
    /// rejected registration never leaves an orphan upload. Two first parts racing each
    /// create one; the store keeps the first and the loser aborts its own.
    pub async fn open_upload(&self, tenant: &str, file: &FileRecord) -> Result<String, AppError> {
        if let Some(id) = &file.upload_id {
            return Ok(id.clone());
        }
        let attrs = self.attributes(tenant, file, file.content_type.as_deref());
        let created = self
            .storage(tenant)
            .create_upload(&file.object_key, &attrs)
            .await?;
        let now = now_ms();
        let stored = self
            .store
            .set_upload_id(tenant, &file.session_id, &file.id, &created, now)
            .await;
        // Abort the new upload whenever the store answered that it did not keep it (another
        // id won, the file or session is gone, expired or not active). A store error (a
        // timeout, say) leaves the outcome unknown: the store may have kept the id, and
        // aborting it would leave the file pointing at a dead upload forever. Left alone, an
        // upload the store did not keep is an orphan until the bucket's incomplete-upload
        // lifecycle rule removes it (deploy/OPERATIONS.md).
        let kept_or_unknown = matches!(stored, Ok(Gate::Ok(UploadIdSet::Stored)) | Err(_));
        if !kept_or_unknown {
            if let Err(e) = self
                .storage(tenant)
                .abort_upload(&file.object_key, &created)
                .await
            {
                tracing::warn!(error = %e, "aborting a surplus storage upload failed");
            }
        }
        match open_gate(stored?, tenant, now)? {
            UploadIdSet::Stored => Ok(created),
            UploadIdSet::Existing(id) => Ok(id),
            UploadIdSet::FileNotOpen(f) => Err(file_not_open(&f)),
        }
    }

    /// What `file`'s object carries (`../shared/API.md` v1.1, "Deployments"): the type
    /// (`content_type`: declared, or detected after completion), the tenant's
    /// Content-Disposition for the file's name, the file's metadata, the tenant's
    /// encryption and storage class.
    pub(super) fn attributes(
        &self,
        tenant: &str,
        file: &FileRecord,
        content_type: Option<&str>,
    ) -> ObjectAttributes {
        ObjectAttributes::new(
            &self.tenant_storage(tenant).objects,
            &file.file_name,
            content_type,
            &file.metadata,
        )
    }

    /// Uploads one part through the gateway: the file must be `registered`, the part number
    /// in range and the length the one the part-size rule gives it, all before the first
    /// byte is stored. `body` turns the request body into a [`PartBody`] of that length; it
    /// gets the declared content type to sniff part 1 against (advisory).
    pub async fn upload_part<F>(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: PartRequest<'_>,
        body: F,
    ) -> Result<PartRecord, AppError>
    where
        F: FnOnce(u64, Option<String>) -> PartBody,
    {
        let file = self.active_file(tenant, session_id, file_id).await?;
        if file.status != FileStatus::Registered {
            return Err(file_not_open(&file));
        }
        let part_number = crate::validate::part_number(req.part_number, file.part_count)?;
        let expected =
            expected_part_len(file.size_bytes, file.part_size_bytes, part_number).unwrap_or(0);
        let len = req.length?;
        if len != expected {
            return Err(AppError::PartSizeMismatch {
                part_number,
                expected,
                actual: len,
            });
        }
        if let (Some(declared), Some(sent)) = (&file.content_type, req.content_type) {
            let sent_essence = sent.split(';').next().unwrap_or("").trim();
            let declared_essence = declared.split(';').next().unwrap_or("").trim();
            if !sent_essence.eq_ignore_ascii_case(declared_essence)
                && !sent_essence.eq_ignore_ascii_case("application/octet-stream")
            {
                tracing::warn!(declared = %declared, sent = %sent, "part Content-Type differs from the declared content type (advisory until finalize)");
            }
        }
        let upload_id = self.open_upload(tenant, &file).await?;
        let sniff = if part_number == 1 {
            file.content_type.clone()
        } else {
            None
        };
        let mut body = body(len, sniff);
        body.offset = Some(u64::from(part_number.saturating_sub(1)) * file.part_size_bytes);
        let etag = self
            .storage(tenant)
            .put_part(
                &file.object_key,
                &upload_id,
                part_number,
                body,
                req.checksum,
            )
            .await?;
        self.metrics.bytes_stored.inc_by(len);
        let record = PartRecord {
            part_number,
            etag,
            size_bytes: len,
        };
        let now = now_ms();
        let after = open_gate(
            self.store
                .record_part(tenant, session_id, file_id, &record, now)
                .await?,
            tenant,
            now,
        )?;
        if after.status != FileStatus::Registered {
            return Err(file_not_open(&after));
        }
        Ok(record)
    }

    /// A file of an active session (gate: exists, not expired, active, file exists).
    pub(super) async fn file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<FileRecord, AppError> {
        let now = now_ms();
        open_gate(
            self.store
                .get_file(tenant, session_id, file_id, true, now)
                .await?,
            tenant,
            now,
        )
    }

    /// [`Uploads::file`], for the REST part routes.
    async fn active_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<FileRecord, AppError> {
        let file = self.file(tenant, session_id, file_id).await?;
        // An Uppy file's parts go straight to storage through the Companion routes, which
        // check them at completion: these routes do not touch it.
        if super::uppy::is_uppy(&file) {
            return Err(AppError::FileNotFound);
        }
        Ok(file)
    }

    /// The parts recorded for a file (for resuming).
    pub async fn list_parts(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<Vec<PartRecord>, AppError> {
        let now = now_ms();
        open_gate(
            self.store
                .list_parts(tenant, session_id, file_id, now)
                .await?,
            tenant,
            now,
        )
    }

    /// Presigned URLs for the asked parts of a `registered` file (S3 storage only). Each URL
    /// signs the part's exact length, so storage refuses any other size.
    pub async fn presign(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        body: &serde_json::Value,
    ) -> Result<Presigned, AppError> {
        let file = self.active_file(tenant, session_id, file_id).await?;
        if self.storage(tenant).kind() != StorageKind::S3 {
            return Err(AppError::NotSupported);
        }
        if file.status != FileStatus::Registered {
            return Err(file_not_open(&file));
        }
        let numbers = crate::validate::presign_numbers(body, file.part_count)?;
        let upload_id = self.open_upload(tenant, &file).await?;
        let mut parts = Vec::with_capacity(numbers.len());
        for n in numbers {
            let len =
                expected_part_len(file.size_bytes, file.part_size_bytes, n).ok_or_else(|| {
                    AppError::Internal(format!("part {n} out of range after validation"))
                })?;
            let url = self
                .storage(tenant)
                .presign_part(&file.object_key, &upload_id, n, len, PRESIGN_TTL)
                .await?;
            parts.push((n, url));
        }
        Ok(Presigned {
            parts,
            expires_at: now_ms() / 1000 + PRESIGN_TTL.as_secs() as i64,
        })
    }
}
