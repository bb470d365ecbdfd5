//! Object storage: the [`ObjectStore`] trait with multipart semantics, and its two
//! implementations.
//!
//! * [`fs::FsStore`]: the embedded default, a directory on local disk.
//! * [`s3::S3Store`]: S3 or any S3-compatible server, through aws-sdk-s3 multipart uploads.
//!
//! The gateway never buffers a part whole: [`PartBody`] is a stream that the store consumes
//! chunk by chunk, so memory stays bounded by the chunk size times the number of parts in
//! flight and a slow storage write slows the client down (back-pressure).

pub mod attributes;
pub mod fs;
pub mod s3;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

use crate::model::PartRecord;

pub use attributes::{ObjectAttributes, ObjectSettings};

/// An infrastructure failure of storage, or a storage answer the caller must act on.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The multipart upload does not exist (completed, aborted or never created).
    #[error("no such upload")]
    NoSuchUpload,
    /// The client's request body failed or ended early (the client's fault, not storage's).
    #[error("request body: {0}")]
    Body(String),
    /// A checksum the client sent does not match the bytes.
    #[error("checksum mismatch")]
    BadDigest,
    /// Storage rejected the part list at completion (unknown part or wrong ETag).
    #[error("invalid part list: {0}")]
    InvalidPart(String),
    /// The operation is not available on this storage (presigned URLs on the filesystem).
    #[error("not supported by this storage")]
    NotSupported,
    /// Storage refused the request for a reason retrying cannot fix (the object key is too
    /// long, the entity too large): `field` is the client's input to blame.
    #[error("refused by storage ({field}): {reason}")]
    Refused {
        /// The request field to blame (`fileKey`, `body`).
        field: &'static str,
        /// Storage's reason (its error code).
        reason: String,
    },
    /// Anything else: unreachable, timed out, refused. Logged, answered with 503.
    #[error("storage: {0}")]
    Unavailable(String),
}

impl StorageError {
    /// Builds an [`StorageError::Unavailable`] from anything printable.
    pub fn unavailable(msg: impl std::fmt::Display) -> Self {
        StorageError::Unavailable(msg.to_string())
    }
}

/// The bytes of one part: a stream of chunks and the exact length it must total.
pub struct PartBody {
    /// The chunks; an `Err` means the client's body failed.
    pub stream: Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
    /// Exact length (the request's Content-Length, already checked against the part-size rule).
    pub len: u64,
    /// Where the part starts in the finished object, when the caller knows it (the gateway
    /// does: part `n` of a file starts at `(n - 1) × partSizeBytes`). Filesystem storage
    /// writes such a part straight into the object's file at that offset, so `complete`
    /// moves no bytes; S3 ignores it.
    pub offset: Option<u64>,
}

impl std::fmt::Debug for PartBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartBody")
            .field("len", &self.len)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// A checksum the client sent with a part, passed through to storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartChecksum {
    /// `Content-MD5`: base64 of the 16-byte MD5.
    ContentMd5(String),
    /// `x-amz-checksum-crc32`: base64.
    Crc32(String),
    /// `x-amz-checksum-crc32c`: base64.
    Crc32c(String),
    /// `x-amz-checksum-sha1`: base64.
    Sha1(String),
    /// `x-amz-checksum-sha256`: base64.
    Sha256(String),
}

/// What storage says about a completed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Unquoted ETag.
    pub etag: String,
    /// Size in bytes.
    pub size: u64,
}

/// Largest object [`ObjectStore::replace_attributes`] is asked to rewrite: S3's CopyObject
/// limit.
pub const MAX_REWRITE_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// Longest object key S3 accepts, in bytes.
pub const S3_MAX_KEY_BYTES: usize = 1024;
/// Longest file or directory name most filesystems accept, in bytes.
pub const FS_MAX_SEGMENT_BYTES: usize = 255;

/// Why `key` (a whole object key: prefixes, session id and fileKey) cannot be stored on this
/// kind of storage, or `None`. Checked at registration, so a key that passes is never
/// refused by storage later.
pub fn object_key_problem(kind: StorageKind, key: &str) -> Option<String> {
    match kind {
        StorageKind::S3 if key.len() > S3_MAX_KEY_BYTES => Some(format!(
            "with the storage prefix and session id the object key would be {} bytes; S3 allows {S3_MAX_KEY_BYTES}",
            key.len()
        )),
        StorageKind::Filesystem => key
            .split('/')
            .find(|segment| segment.len() > FS_MAX_SEGMENT_BYTES)
            .map(|segment| {
                format!(
                    "a path segment of {} bytes; filesystem storage allows {FS_MAX_SEGMENT_BYTES}",
                    segment.len()
                )
            }),
        _ => None,
    }
}

/// Why a file's `metadata` cannot go with its object on this kind of storage, or `None`:
/// S3 takes at most [`attributes::S3_MAX_METADATA_BYTES`] of user metadata, no empty key,
/// and no two keys equal but for case. Checked at registration, like
/// [`object_key_problem`].
pub fn metadata_problem(
    kind: StorageKind,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    if kind == StorageKind::Filesystem {
        return None;
    }
    // S3 compares metadata keys without case and needs a name after `x-amz-meta-`.
    if metadata.contains_key("") {
        return Some("an empty key cannot be stored as S3 user metadata".into());
    }
    let mut lower = std::collections::HashSet::new();
    if let Some(k) = metadata
        .keys()
        .find(|k| !lower.insert(k.to_ascii_lowercase()))
    {
        return Some(format!(
            "key {k:?} differs from another only in case; S3 keeps one of them"
        ));
    }
    let len = attributes::s3_metadata_len(metadata);
    (len > attributes::S3_MAX_METADATA_BYTES).then(|| {
        format!(
            "stored as S3 user metadata it would be {len} bytes; S3 allows {}",
            attributes::S3_MAX_METADATA_BYTES
        )
    })
}

/// Which implementation this is (drives `fileUrl` and feature support).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// Local filesystem.
    Filesystem,
    /// S3 or compatible.
    S3,
}

/// Object storage with multipart uploads. Keys are full object keys (already carrying the
/// configured prefix, the tenant prefix and the session id); implementations add nothing.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Which implementation this is.
    fn kind(&self) -> StorageKind;

    /// The full object key for a file:
    /// `<storage prefix>/<tenant prefix><session id>/<file id>/<file key>` (the storage
    /// prefix is the path of `s3://bucket/prefix` or empty). The file id makes every file's
    /// key its own: a deleted file's late cleanup can never touch a newer file registered
    /// under the same fileKey, and on the filesystem fileKeys `a` and `a/b` never collide.
    fn object_key(
        &self,
        tenant_prefix: &str,
        session_id: &str,
        file_id: &str,
        file_key: &str,
    ) -> String;

    /// `s3://<bucket>/<key>` or `file://<absolute path>`.
    fn file_url(&self, key: &str) -> String;

    /// Starts a multipart upload of an object that will carry `attrs`; returns its id.
    async fn create_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError>;

    /// Gives a completed object `attrs` in place of the ones it was created with (the
    /// Content-Type detected after completion); returns the object's new unquoted ETag.
    /// [`StorageError::NotSupported`] where storage keeps no attributes. S3 rewrites the
    /// object with CopyObject, which stops at 5 GiB ([`MAX_REWRITE_BYTES`]): callers do
    /// not ask for larger objects.
    async fn replace_attributes(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError>;

    /// Copies the completed object `from` to `to` (which then carries `attrs`) inside
    /// storage; returns the copy's unquoted ETag. With `if_match`, only while `from`'s ETag
    /// is that one (else [`StorageError::Refused`] with reason `PreconditionFailed`, and
    /// nothing is copied). Up to [`MAX_REWRITE_BYTES`], as
    /// [`ObjectStore::replace_attributes`]. [`StorageError::NotSupported`] where storage has
    /// no server-side copy.
    async fn copy_object(
        &self,
        from: &str,
        to: &str,
        attrs: &ObjectAttributes,
        if_match: Option<&str>,
    ) -> Result<String, StorageError>;

    /// Uploads (or replaces) one part by streaming `body`; returns the part's unquoted ETag.
    async fn put_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: PartBody,
        checksum: Option<PartChecksum>,
    ) -> Result<String, StorageError>;

    /// The parts storage holds for an upload (all pages), sorted by part number.
    async fn list_parts(&self, key: &str, upload_id: &str)
        -> Result<Vec<PartRecord>, StorageError>;

    /// Assembles the object from `parts` (part number, unquoted ETag), in order; returns the
    /// object's unquoted ETag. [`StorageError::NoSuchUpload`] when the upload is gone (the
    /// caller then checks whether the object already exists).
    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError>;

    /// Aborts an upload; an upload that no longer exists is not an error.
    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StorageError>;

    /// Size and ETag of a completed object, `None` when it does not exist.
    async fn head_object(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError>;

    /// Up to the first `n` bytes of a completed object (for magic-byte checks).
    async fn read_head(&self, key: &str, n: usize) -> Result<Bytes, StorageError> {
        self.read_range(key, 0, n).await
    }

    /// Up to `n` bytes of a completed object from byte `start` (fewer only at its end): a
    /// tus concatenation reads its partial uploads one part at a time.
    async fn read_range(&self, key: &str, start: u64, n: usize) -> Result<Bytes, StorageError>;

    /// Deletes a completed object; a missing object is not an error.
    async fn delete_object(&self, key: &str) -> Result<(), StorageError>;

    /// A presigned `PUT` URL for one part of exactly `content_length` bytes (the length is
    /// signed: storage refuses a body of any other size), valid for `expires_in`.
    /// [`StorageError::NotSupported`] where storage cannot presign.
    async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        content_length: u64,
        expires_in: Duration,
    ) -> Result<String, StorageError>;

    /// A presigned `PUT` URL for one part whose length is not signed (a client that sends
    /// no size before its parts, `@uppy/aws-s3`'s): completion checks the parts' sizes
    /// instead. [`StorageError::NotSupported`] where storage cannot presign.
    async fn presign_part_any_size(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        expires_in: Duration,
    ) -> Result<String, StorageError>;

    /// A presigned browser form upload (S3 `POST` with a policy) of `key`, carrying `attrs`,
    /// of at most `max_len` bytes, valid for `expires_in`. [`StorageError::NotSupported`]
    /// where storage has no such upload.
    async fn presign_post(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        max_len: u64,
        expires_in: Duration,
    ) -> Result<PresignedPost, StorageError>;

    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StorageError>;
}

/// A presigned form upload: the form's target and the fields to send before the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresignedPost {
    /// The bucket's URL, ending in `/`.
    pub url: String,
    /// The form fields, in order (the file comes after them).
    pub fields: Vec<(String, String)>,
}

/// Where one tenant's objects go, and what they carry.
#[derive(Clone)]
pub struct TenantStorage {
    /// The tenant's own storage, or the gateway's.
    pub store: Arc<dyn ObjectStore>,
    /// The tenant's `content_disposition`, `sse` and `storage_class`.
    pub objects: ObjectSettings,
}

impl std::fmt::Debug for TenantStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantStorage")
            .field("kind", &self.store.kind())
            .field("objects", &self.objects)
            .finish()
    }
}

/// Every storage the gateway writes to: its own (`storage`) and the tenants' own
/// (`[[tenants]] storage`), each tenant mapped to one. A tenant id the configuration does
/// not name (a session left by a tenant since removed) maps to the gateway's storage.
pub struct Storages {
    default: TenantStorage,
    tenants: HashMap<String, TenantStorage>,
    distinct: Vec<(String, Arc<dyn ObjectStore>)>,
}

impl std::fmt::Debug for Storages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storages")
            .field(
                "distinct",
                &self.distinct.iter().map(|(l, _)| l).collect::<Vec<_>>(),
            )
            .field("tenants", &self.tenants.len())
            .finish()
    }
}

impl Storages {
    /// The gateway's storage, named `label` (its URL) in readiness logs; every tenant on it
    /// with default object settings until [`Storages::tenant`] says otherwise.
    pub fn new(label: impl Into<String>, store: Arc<dyn ObjectStore>) -> Self {
        Storages {
            default: TenantStorage {
                store: store.clone(),
                objects: ObjectSettings::default(),
            },
            tenants: HashMap::new(),
            distinct: vec![(label.into(), store)],
        }
    }

    /// Maps `tenant` to its own storage (`Some((label, store))`: a store already added is
    /// recognised by its label and shared) or to the gateway's (`None`), with `objects`.
    pub fn tenant(
        mut self,
        tenant: &str,
        own: Option<(String, Arc<dyn ObjectStore>)>,
        objects: ObjectSettings,
    ) -> Self {
        let store = match own {
            None => self.default.store.clone(),
            Some((label, store)) => match self.distinct.iter().find(|(l, _)| *l == label) {
                Some((_, existing)) => existing.clone(),
                None => {
                    self.distinct.push((label, store.clone()));
                    store
                }
            },
        };
        self.tenants
            .insert(tenant.to_owned(), TenantStorage { store, objects });
        self
    }

    /// The storage (already added under `label`) to share instead of building another.
    pub fn find(&self, label: &str) -> Option<Arc<dyn ObjectStore>> {
        self.distinct
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| s.clone())
    }

    /// Where `tenant`'s objects go.
    pub fn for_tenant(&self, tenant: &str) -> &TenantStorage {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// Each distinct storage once, with its label (readiness checks every one).
    pub fn distinct(&self) -> &[(String, Arc<dyn ObjectStore>)] {
        &self.distinct
    }
}

/// Any [`ObjectStore`], with each call's latency recorded in
/// `upgate_backend_call_duration_seconds{backend="storage",op=...}`.
pub struct Timed(pub Arc<dyn ObjectStore>);

async fn timed<T>(op: &'static str, fut: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = fut.await;
    crate::metrics::observe_backend("storage", op, started.elapsed());
    out
}

#[async_trait]
impl ObjectStore for Timed {
    fn kind(&self) -> StorageKind {
        self.0.kind()
    }
    fn object_key(
        &self,
        tenant_prefix: &str,
        session_id: &str,
        file_id: &str,
        file_key: &str,
    ) -> String {
        self.0
            .object_key(tenant_prefix, session_id, file_id, file_key)
    }
    fn file_url(&self, key: &str) -> String {
        self.0.file_url(key)
    }
    async fn create_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        timed("create_upload", self.0.create_upload(key, attrs)).await
    }
    async fn replace_attributes(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        timed("replace_attributes", self.0.replace_attributes(key, attrs)).await
    }
    async fn put_part(
        &self,
        key: &str,
        upload_id: &str,
        n: u32,
        body: PartBody,
        c: Option<PartChecksum>,
    ) -> Result<String, StorageError> {
        timed("put_part", self.0.put_part(key, upload_id, n, body, c)).await
    }
    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<PartRecord>, StorageError> {
        timed("list_parts", self.0.list_parts(key, upload_id)).await
    }
    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError> {
        timed(
            "complete_upload",
            self.0.complete_upload(key, upload_id, parts),
        )
        .await
    }
    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        timed("abort_upload", self.0.abort_upload(key, upload_id)).await
    }
    async fn head_object(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        timed("head_object", self.0.head_object(key)).await
    }
    async fn read_head(&self, key: &str, n: usize) -> Result<Bytes, StorageError> {
        timed("read_head", self.0.read_head(key, n)).await
    }
    async fn read_range(&self, key: &str, start: u64, n: usize) -> Result<Bytes, StorageError> {
        timed("read_range", self.0.read_range(key, start, n)).await
    }
    async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        timed("delete_object", self.0.delete_object(key)).await
    }
    async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        n: u32,
        content_length: u64,
        expires_in: Duration,
    ) -> Result<String, StorageError> {
        timed(
            "presign_part",
            self.0
                .presign_part(key, upload_id, n, content_length, expires_in),
        )
        .await
    }
    async fn copy_object(
        &self,
        from: &str,
        to: &str,
        attrs: &ObjectAttributes,
        if_match: Option<&str>,
    ) -> Result<String, StorageError> {
        timed("copy_object", self.0.copy_object(from, to, attrs, if_match)).await
    }
    async fn presign_part_any_size(
        &self,
        key: &str,
        upload_id: &str,
        n: u32,
        expires_in: Duration,
    ) -> Result<String, StorageError> {
        timed(
            "presign_part",
            self.0.presign_part_any_size(key, upload_id, n, expires_in),
        )
        .await
    }
    async fn presign_post(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        max_len: u64,
        expires_in: Duration,
    ) -> Result<PresignedPost, StorageError> {
        timed(
            "presign_post",
            self.0.presign_post(key, attrs, max_len, expires_in),
        )
        .await
    }
    async fn ping(&self) -> Result<(), StorageError> {
        timed("ping", self.0.ping()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_are_checked_against_each_storage_limit() {
        let at_limit = "k".repeat(S3_MAX_KEY_BYTES);
        assert_eq!(object_key_problem(StorageKind::S3, &at_limit), None);
        assert!(object_key_problem(StorageKind::S3, &format!("{at_limit}k")).is_some());
        // S3 keys have no segment limit; filesystem paths have no total limit here.
        let segment = "s".repeat(FS_MAX_SEGMENT_BYTES + 1);
        assert_eq!(
            object_key_problem(StorageKind::S3, &format!("a/{segment}")),
            None
        );
        assert!(object_key_problem(StorageKind::Filesystem, &format!("a/{segment}/b")).is_some());
        let ok = "s".repeat(FS_MAX_SEGMENT_BYTES);
        assert_eq!(
            object_key_problem(StorageKind::Filesystem, &format!("a/{ok}/{ok}")),
            None
        );
    }
}
