//! The embedded object store: a directory on local disk with S3's multipart semantics.
//!
//! Layout under the root:
//! * `<key>`: completed objects, at their object key;
//! * `.meta/<key>`: a completed object's ETag;
//! * `.uploads/<upload id>/key`: the object key of an open upload;
//! * `.uploads/<upload id>/<n>`: a symlink to `blob-<etag>-<nonce>`, the bytes of part `n`.
//!
//! Every replacement is a write to a fresh name followed by `rename(2)`, which is atomic, so
//! a part being re-sent while another request lists parts or completes never shows a torn
//! part, and concurrent writers of one part leave exactly one winner. ETags follow S3: the
//! hex MD5 of a part, and for an object the MD5 of the parts' binary MD5s plus `-<count>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    ObjectAttributes, ObjectInfo, ObjectStore, PartBody, PartChecksum, StorageError, StorageKind,
};
use crate::model::PartRecord;

/// Local-filesystem [`ObjectStore`].
///
/// ```
/// # tokio_test_block_on(async {
/// let dir = std::env::temp_dir().join(format!("upgate-doc-{}", std::process::id()));
/// let store = upgate::storage::fs::FsStore::new(&dir).await.expect("root");
/// # let _ = store; });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f) }
/// ```
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

fn io_err(context: &str, e: std::io::Error) -> StorageError {
    StorageError::unavailable(format!("{context}: {e}"))
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl FsStore {
    /// Opens (creating if needed) a store rooted at `root`; the path is made absolute so
    /// `fileUrl`s are absolute.
    pub async fn new(root: impl AsRef<Path>) -> Result<Self, StorageError> {
        let root = root.as_ref();
        tokio::fs::create_dir_all(root.join(".uploads"))
            .await
            .map_err(|e| io_err("create storage root", e))?;
        let root = tokio::fs::canonicalize(root)
            .await
            .map_err(|e| io_err("resolve storage root", e))?;
        Ok(FsStore { root })
    }

    /// The absolute root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.root.join(".meta").join(key)
    }

    fn upload_dir(&self, upload_id: &str) -> Result<PathBuf, StorageError> {
        // Upload ids are ours (simple UUIDs); refuse anything else rather than touch a path.
        if upload_id.is_empty() || !upload_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(StorageError::NoSuchUpload);
        }
        Ok(self.root.join(".uploads").join(upload_id))
    }

    async fn open_upload(&self, key: &str, upload_id: &str) -> Result<PathBuf, StorageError> {
        let dir = self.upload_dir(upload_id)?;
        match tokio::fs::read_to_string(dir.join("key")).await {
            Ok(k) if k == key => Ok(dir),
            Ok(_) => Err(StorageError::NoSuchUpload),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NoSuchUpload),
            Err(e) => Err(io_err("read upload", e)),
        }
    }

    /// Parts of an upload directory: (number, etag, blob path), sorted.
    async fn parts_in(dir: &Path) -> Result<Vec<(u32, String, PathBuf)>, StorageError> {
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NoSuchUpload)
            }
            Err(e) => return Err(io_err("list upload", e)),
        };
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| io_err("list upload", e))?
        {
            let name = entry.file_name();
            let Some(number) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let target = match tokio::fs::read_link(entry.path()).await {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read part", e)),
            };
            let Some(etag) = target
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("blob-"))
                .and_then(|n| n.split('-').next())
            else {
                continue;
            };
            out.push((number, etag.to_owned(), dir.join(&target)));
        }
        out.sort_by_key(|(n, _, _)| *n);
        Ok(out)
    }
}

fn verify_checksum(
    checksum: Option<&PartChecksum>,
    md5: &[u8],
    sha256: &[u8],
) -> Result<(), StorageError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    match checksum {
        Some(PartChecksum::ContentMd5(v)) if b64.encode(md5) != *v => Err(StorageError::BadDigest),
        Some(PartChecksum::Sha256(v)) if b64.encode(sha256) != *v => Err(StorageError::BadDigest),
        // CRC32, CRC32C and SHA-1 are passed to S3, which verifies them; this store checks
        // the two digests it computes anyway.
        _ => Ok(()),
    }
}

#[async_trait]
impl ObjectStore for FsStore {
    fn kind(&self) -> StorageKind {
        StorageKind::Filesystem
    }

    fn object_key(
        &self,
        tenant_prefix: &str,
        session_id: &str,
        file_id: &str,
        file_key: &str,
    ) -> String {
        format!("{tenant_prefix}{session_id}/{file_id}/{file_key}")
    }

    fn file_url(&self, key: &str) -> String {
        format!("file://{}", self.object_path(key).display())
    }

    /// The attributes are not kept: filesystem storage has no place for them (README).
    async fn create_upload(
        &self,
        key: &str,
        _attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        let id = nonce();
        let dir = self.upload_dir(&id)?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io_err("create upload", e))?;
        tokio::fs::write(dir.join("key"), key)
            .await
            .map_err(|e| io_err("create upload", e))?;
        Ok(id)
    }

    async fn replace_attributes(
        &self,
        _key: &str,
        _attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        Err(StorageError::NotSupported)
    }

    async fn put_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        mut body: PartBody,
        checksum: Option<PartChecksum>,
    ) -> Result<String, StorageError> {
        let dir = self.open_upload(key, upload_id).await?;
        let tmp = dir.join(format!("tmp-{}", nonce()));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err("create part", e))?;
        let mut md5 = Md5::new();
        let mut sha = sha2::Sha256::new();
        let mut written: u64 = 0;
        let result: Result<(), StorageError> = async {
            while let Some(chunk) = body.stream.next().await {
                let chunk = chunk.map_err(|e| StorageError::Body(e.to_string()))?;
                written += chunk.len() as u64;
                if written > body.len {
                    return Err(StorageError::Body("more bytes than Content-Length".into()));
                }
                md5.update(&chunk);
                sha.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| io_err("write part", e))?;
            }
            if written != body.len {
                return Err(StorageError::Body(format!(
                    "body ended after {written} of {} bytes",
                    body.len
                )));
            }
            file.flush().await.map_err(|e| io_err("write part", e))?;
            Ok(())
        }
        .await;
        drop(file);
        let md5 = md5.finalize();
        let finish = async {
            result?;
            verify_checksum(checksum.as_ref(), &md5, &sha.finalize())?;
            let etag = hex::encode(md5);
            let blob = format!("blob-{etag}-{}", nonce());
            tokio::fs::rename(&tmp, dir.join(&blob))
                .await
                .map_err(|e| io_err("store part", e))?;
            let link_tmp = dir.join(format!("link-{}", nonce()));
            tokio::fs::symlink(&blob, &link_tmp)
                .await
                .map_err(|e| io_err("store part", e))?;
            let link = dir.join(part_number.to_string());
            let previous = tokio::fs::read_link(&link).await.ok();
            tokio::fs::rename(&link_tmp, &link)
                .await
                .map_err(|e| io_err("store part", e))?;
            if let Some(prev) = previous {
                // The replaced part's bytes; a concurrent reader that resolved the old link
                // before the rename may still have it open, which unlink allows.
                let _ = tokio::fs::remove_file(dir.join(prev)).await;
            }
            Ok(etag)
        }
        .await;
        if finish.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        finish
    }

    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<PartRecord>, StorageError> {
        let dir = self.open_upload(key, upload_id).await?;
        let mut out = Vec::new();
        for (number, etag, blob) in Self::parts_in(&dir).await? {
            let size = match tokio::fs::metadata(&blob).await {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat part", e)),
            };
            out.push(PartRecord {
                part_number: number,
                etag,
                size_bytes: size,
            });
        }
        Ok(out)
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError> {
        let dir = self.open_upload(key, upload_id).await?;
        let stored = Self::parts_in(&dir).await?;
        let mut blobs = Vec::with_capacity(parts.len());
        let mut last = 0u32;
        for (number, etag) in parts {
            if *number <= last {
                return Err(StorageError::InvalidPart(
                    "parts must be in ascending order".into(),
                ));
            }
            last = *number;
            let etag = etag.trim_matches('"');
            let Some((_, _, blob)) = stored.iter().find(|(n, e, _)| n == number && e == etag)
            else {
                return Err(StorageError::InvalidPart(format!(
                    "part {number} with that ETag is not uploaded"
                )));
            };
            blobs.push((blob.clone(), etag.to_owned()));
        }
        let target = self.object_path(key);
        let parent = target
            .parent()
            .ok_or_else(|| StorageError::unavailable("object key has no parent"))?;
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io_err("create object dir", e))?;
        let tmp = dir.join(format!("assembled-{}", nonce()));
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err("assemble object", e))?;
        let mut md5s = Md5::new();
        for (blob, etag) in &blobs {
            let mut src = tokio::fs::File::open(blob)
                .await
                .map_err(|e| io_err("read part", e))?;
            tokio::io::copy(&mut src, &mut out)
                .await
                .map_err(|e| io_err("assemble object", e))?;
            md5s.update(
                hex::decode(etag).map_err(|e| io_err("part etag", std::io::Error::other(e)))?,
            );
        }
        out.sync_all()
            .await
            .map_err(|e| io_err("assemble object", e))?;
        drop(out);
        let etag = format!("{}-{}", hex::encode(md5s.finalize()), blobs.len());
        let meta = self.meta_path(key);
        if let Some(p) = meta.parent() {
            tokio::fs::create_dir_all(p)
                .await
                .map_err(|e| io_err("write meta", e))?;
        }
        let meta_tmp = meta.with_extension(format!("tmp-{}", nonce()));
        tokio::fs::write(&meta_tmp, &etag)
            .await
            .map_err(|e| io_err("write meta", e))?;
        tokio::fs::rename(&meta_tmp, &meta)
            .await
            .map_err(|e| io_err("write meta", e))?;
        tokio::fs::rename(&tmp, &target)
            .await
            .map_err(|e| io_err("publish object", e))?;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        Ok(etag)
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        match self.open_upload(key, upload_id).await {
            Ok(dir) => match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("abort upload", e)),
            },
            Err(StorageError::NoSuchUpload) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn head_object(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let meta = match tokio::fs::metadata(self.object_path(key)).await {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("stat object", e)),
        };
        let etag = tokio::fs::read_to_string(self.meta_path(key))
            .await
            .unwrap_or_default();
        Ok(Some(ObjectInfo {
            etag,
            size: meta.len(),
        }))
    }

    async fn read_head(&self, key: &str, n: usize) -> Result<Bytes, StorageError> {
        let file = tokio::fs::File::open(self.object_path(key))
            .await
            .map_err(|e| io_err("open object", e))?;
        let mut buf = Vec::with_capacity(n);
        file.take(n as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| io_err("read object", e))?;
        Ok(Bytes::from(buf))
    }

    async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        for path in [self.object_path(key), self.meta_path(key)] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete object", e)),
            }
        }
        Ok(())
    }

    async fn presign_part(
        &self,
        _key: &str,
        _upload_id: &str,
        _part_number: u32,
        _content_length: u64,
        _expires_in: Duration,
    ) -> Result<String, StorageError> {
        Err(StorageError::NotSupported)
    }

    async fn ping(&self) -> Result<(), StorageError> {
        tokio::fs::metadata(self.root.join(".uploads"))
            .await
            .map(|_| ())
            .map_err(|e| io_err("storage root", e))
    }
}
