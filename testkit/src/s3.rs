//! A real S3 endpoint in process: [`S3Server`] serves the S3 REST API over plain HTTP on a
//! free `127.0.0.1` port, backed by a temporary directory, so tests exercise the real
//! aws-sdk-s3 client (SigV4 headers and presigned query auth, XML, ranges, multipart) with
//! nothing running beforehand.
//!
//! The server is [`s3s`] with the [`s3s_fs`] filesystem backend, wrapped in a thin
//! compatibility layer ([`CompatFs`]) that makes the multipart calls behave like AWS S3 where
//! s3s-fs 0.14 does not:
//!
//! * an unknown upload id answers `NoSuchUpload` (404) on UploadPart, ListParts,
//!   CompleteMultipartUpload and AbortMultipartUpload (s3s-fs answers `AccessDenied`);
//! * ListParts returns each part's ETag, sorted by part number, and pages with `max-parts`
//!   (default and cap 1,000) / `part-number-marker`, `IsTruncated` and
//!   `NextPartNumberMarker` (s3s-fs returns every part unsorted, without ETags);
//! * CompleteMultipartUpload checks the part list first: ascending order
//!   (`InvalidPartOrder`), every part present with the given ETag (`InvalidPart`), every
//!   part but the last at least 5 MiB (`EntityTooSmall`, sent the way S3 reports a late
//!   completion failure: status 200, keep-alive whitespace, then an `<Error>` body), and a
//!   failed completion leaves the upload intact (s3s-fs ignores the ETags and drops the
//!   upload before checking);
//! * UploadPart verifies `Content-MD5` and `x-amz-checksum-{crc32,crc32c,sha1,sha256}`
//!   (`BadDigest`), which s3s-fs does not;
//! * ListMultipartUploads (not implemented by s3s-fs) lists the open uploads;
//! * server-side encryption (`x-amz-server-side-encryption`, its KMS key id) and the storage
//!   class given to CreateMultipartUpload, or to CopyObject with `REPLACE`, are remembered
//!   per object and reported by HeadObject, as S3 reports them (s3s-fs drops them). No
//!   object is encrypted and no class changes where bytes are kept: the server reports
//!   what it was asked for;
//! * CopyObject gives the copy a new ETag (the MD5 of its bytes), as S3 does for objects
//!   without KMS encryption (s3s-fs keeps the source's, multipart `<md5>-<n>` included).
//!
//! Each server runs on a dedicated thread with its own Tokio runtime, so it outlives the
//! runtime of any one `#[tokio::test]` and can be shared; it stops when dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};

/// Access key the server accepts.
pub const ACCESS_KEY: &str = "upgate-test-access-key";
/// Secret key the server accepts.
pub const SECRET_KEY: &str = "upgate-test-secret-key";
/// Region clients should sign for.
pub const REGION: &str = "us-east-1";

/// S3's minimum size of every part but the last, enforced at completion.
const MIN_PART: u64 = 5 * 1024 * 1024;

/// An S3 server on `http://127.0.0.1:<port>` with one bucket; stops when dropped.
pub struct S3Server {
    addr: SocketAddr,
    bucket: String,
    _dir: tempfile::TempDir,
    root: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("endpoint", &self.endpoint())
            .field("bucket", &self.bucket)
            .field("root", &self.root)
            .finish()
    }
}

impl S3Server {
    /// Starts a server with `bucket` already created. Callable from sync code and from inside
    /// a Tokio runtime alike (the server runs on its own thread and runtime).
    pub fn start(bucket: &str) -> Self {
        let dir = tempfile::tempdir().expect("s3 server tempdir");
        let root = dir.path().canonicalize().expect("canonicalize s3 root");
        std::fs::create_dir_all(root.join(bucket)).expect("create bucket directory");

        let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs root");
        let compat = CompatFs {
            inner: fs,
            root: root.clone(),
            uploads: Mutex::new(BTreeMap::new()),
            stored: Mutex::new(BTreeMap::new()),
        };
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(compat);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local_addr");

        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("s3-server-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("s3-server-worker")
                    .enable_all()
                    .build()
                    .expect("s3 server runtime");
                rt.block_on(serve(listener, service, rx));
            })
            .expect("spawn s3 server thread");

        S3Server {
            addr,
            bucket: bucket.to_owned(),
            _dir: dir,
            root,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pre-created bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Access key to sign with.
    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    /// Secret key to sign with.
    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// Region to sign for.
    pub fn region(&self) -> &'static str {
        REGION
    }

    /// The storage directory: `<root>/<bucket>/<key>` holds completed objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a completed object of the pre-created bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(&self.bucket).join(key)
    }

    /// The bytes of a completed object, `None` when it does not exist.
    pub fn read_object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.object_path(key)).ok()
    }

    /// Number of multipart uploads open on the server (any bucket), counted on disk.
    pub fn open_upload_count(&self) -> usize {
        std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        name.starts_with(".upload-") && name.ends_with(".json")
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// An aws-sdk-s3 client for this server: static credentials, path-style addressing,
    /// checksums only where an operation requires them (what S3-compatible servers expect),
    /// a 3 s connect and a 120 s operation timeout.
    pub fn client(&self) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(self.client_config().build())
    }

    /// The configuration [`S3Server::client`] uses, to adjust before building.
    pub fn client_config(&self) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.endpoint())
            .credentials_provider(Credentials::new(
                ACCESS_KEY,
                SECRET_KEY,
                None,
                None,
                "upgate-testkit",
            ))
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_timeout(Duration::from_secs(120))
                    .build(),
            )
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    listener: std::net::TcpListener,
    service: s3s::service::S3Service,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("s3 test server: cannot listen: {e}");
            return;
        }
    };
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let socket = tokio::select! {
            res = listener.accept() => match res {
                Ok((socket, _)) => socket,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = service.clone();
        let cors = hyper::service::service_fn(move |req| with_cors(service.clone(), req));
        let conn = http
            .serve_connection(TokioIo::new(socket), cors)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    // Dropping the runtime (when `serve` returns) cancels the connections still open.
}

/// The bucket's CORS, as a rule allowing every origin (`AllowedOrigins: *`, the methods a
/// browser upload uses, any header, `ETag` and `Location` exposed) would answer: s3s
/// answers preflights 501 and has no PutBucketCors, and browser tests need both. Requests
/// without `Origin` pass untouched.
async fn with_cors(
    service: s3s::service::S3Service,
    req: http::Request<hyper::body::Incoming>,
) -> Result<s3s::HttpResponse, s3s::HttpError> {
    use http::header::{self, HeaderValue};
    let origin = req.headers().get(header::ORIGIN).cloned();
    let Some(origin) = origin else {
        return hyper::service::Service::call(&service, req).await;
    };
    let preflight = req.method() == http::Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let asked_headers = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    let mut res = if preflight {
        let mut res = http::Response::new(s3s::Body::empty());
        *res.status_mut() = http::StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, PUT, POST, HEAD, DELETE"),
        );
        if let Some(asked) = asked_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        res
    } else {
        hyper::service::Service::call(&service, req).await?
    };
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("ETag, Location"),
    );
    Ok(res)
}

#[derive(Debug, Clone)]
struct OpenUpload {
    bucket: String,
    key: String,
    initiated: SystemTime,
    kept: Kept,
}

/// What S3 keeps of an object that s3s-fs does not: encryption, storage class, and the
/// ETag of a copy.
#[derive(Debug, Clone, Default, PartialEq)]
struct Kept {
    sse: Option<ServerSideEncryption>,
    kms_key_id: Option<String>,
    storage_class: Option<StorageClass>,
    /// S3 gives a copied object a new ETag (the MD5 of its bytes, for one without KMS);
    /// s3s-fs keeps the source's (a multipart `<md5>-<n>` stays one).
    etag: Option<String>,
}

#[derive(Debug, Clone)]
struct StoredPart {
    number: i32,
    etag: String,
    size: u64,
    modified: SystemTime,
}

/// s3s-fs with AWS S3's multipart behaviour (see the module docs).
#[derive(Debug)]
pub struct CompatFs {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    uploads: Mutex<BTreeMap<String, OpenUpload>>,
    /// (bucket, key) → what S3 would report for the object.
    stored: Mutex<BTreeMap<(String, String), Kept>>,
}

impl CompatFs {
    fn upload_uuid(upload_id: &str) -> Option<uuid::Uuid> {
        uuid::Uuid::parse_str(upload_id).ok()
    }

    fn upload_exists(&self, upload_id: &str) -> bool {
        Self::upload_uuid(upload_id)
            .is_some_and(|u| self.root.join(format!(".upload-{u}.json")).exists())
    }

    fn require_upload(&self, upload_id: &str) -> S3Result<uuid::Uuid> {
        match Self::upload_uuid(upload_id) {
            Some(u) if self.upload_exists(upload_id) => Ok(u),
            _ => Err(s3_error!(
                NoSuchUpload,
                "The specified multipart upload does not exist."
            )),
        }
    }

    fn forget(&self, upload_id: &str) -> Option<OpenUpload> {
        self.uploads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(upload_id)
    }

    fn keep(&self, bucket: String, key: String, kept: Kept) {
        let mut stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        if kept == Kept::default() {
            stored.remove(&(bucket, key));
        } else {
            stored.insert((bucket, key), kept);
        }
    }

    /// The parts on disk of an upload, sorted, with their MD5 ETags.
    async fn stored_parts(&self, upload: uuid::Uuid) -> S3Result<Vec<StoredPart>> {
        let prefix = format!(".upload_id-{upload}.part-");
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.root)
            .await
            .map_err(|e| s3_error!(e, InternalError))?;
        while let Some(entry) = dir
            .next_entry()
            .await
            .map_err(|e| s3_error!(e, InternalError))?
        {
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let data = match tokio::fs::read(entry.path()).await {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(s3_error!(e, InternalError)),
            };
            let modified = entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            out.push(StoredPart {
                number,
                etag: hex::encode(Md5::digest(&data)),
                size: data.len() as u64,
                modified,
            });
        }
        out.sort_by_key(|p| p.number);
        Ok(out)
    }
}

#[async_trait::async_trait]
impl S3 for CompatFs {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.inner.get_bucket_location(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.inner.put_object(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.inner.get_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let at = (req.input.bucket.clone(), req.input.key.clone());
        let mut resp = self.inner.head_object(req).await?;
        let kept = self
            .stored
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&at)
            .cloned()
            .unwrap_or_default();
        resp.output.server_side_encryption = kept.sse;
        resp.output.ssekms_key_id = kept.kms_key_id;
        resp.output.storage_class = kept.storage_class;
        if let Some(etag) = kept.etag {
            resp.output.e_tag = Some(ETag::Strong(etag));
        }
        Ok(resp)
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let at = (req.input.bucket.clone(), req.input.key.clone());
        let resp = self.inner.delete_object(req).await?;
        self.stored
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&at);
        Ok(resp)
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.inner.delete_objects(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.inner.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.inner.list_objects_v2(req).await
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        // S3 does not carry encryption or storage class over: a copy has what it asks for.
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let mut kept = Kept {
            sse: req.input.server_side_encryption.clone(),
            kms_key_id: req.input.ssekms_key_id.clone(),
            storage_class: req.input.storage_class.clone(),
            etag: None,
        };
        let mut resp = self.inner.copy_object(req).await?;
        let bytes = tokio::fs::read(self.root.join(&bucket).join(&key))
            .await
            .map_err(|e| s3_error!(e, InternalError))?;
        let etag = hex::encode(Md5::digest(&bytes));
        if let Some(result) = resp.output.copy_object_result.as_mut() {
            result.e_tag = Some(ETag::Strong(etag.clone()));
        }
        kept.etag = Some(etag);
        self.keep(bucket, key, kept);
        Ok(resp)
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let bucket = req.input.bucket.clone();
        let key = req.input.key.clone();
        if !self.root.join(&bucket).is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        let kept = Kept {
            sse: req.input.server_side_encryption.clone(),
            kms_key_id: req.input.ssekms_key_id.clone(),
            storage_class: req.input.storage_class.clone(),
            etag: None,
        };
        let resp = self.inner.create_multipart_upload(req).await?;
        if let Some(id) = &resp.output.upload_id {
            self.uploads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    id.clone(),
                    OpenUpload {
                        bucket,
                        key,
                        initiated: SystemTime::now(),
                        kept,
                    },
                );
        }
        Ok(resp)
    }

    async fn upload_part(
        &self,
        mut req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.require_upload(&req.input.upload_id)?;
        let input = &req.input;
        let wants_check = input.content_md5.is_some()
            || input.checksum_crc32.is_some()
            || input.checksum_crc32c.is_some()
            || input.checksum_sha1.is_some()
            || input.checksum_sha256.is_some();
        if wants_check {
            // Verifying before storing needs the whole part; test parts are small.
            let mut body = req
                .input
                .body
                .take()
                .ok_or_else(|| s3_error!(IncompleteBody))?;
            let mut data = Vec::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "{e}"))?;
                data.extend_from_slice(&chunk);
            }
            let input = &req.input;
            if let Some(md5) = &input.content_md5 {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(md5)
                    .map_err(|_| s3_error!(InvalidDigest))?;
                if decoded.len() != 16 {
                    return Err(s3_error!(InvalidDigest));
                }
                if decoded[..] != Md5::digest(&data)[..] {
                    return Err(s3_error!(
                        BadDigest,
                        "The Content-MD5 you specified did not match what we received."
                    ));
                }
            }
            let mut hasher = s3s::checksum::ChecksumHasher::default();
            if input.checksum_crc32.is_some() {
                hasher.crc32 = Some(s3s::crypto::Checksum::new());
            }
            if input.checksum_crc32c.is_some() {
                hasher.crc32c = Some(s3s::crypto::Checksum::new());
            }
            if input.checksum_sha1.is_some() {
                hasher.sha1 = Some(s3s::crypto::Checksum::new());
            }
            if input.checksum_sha256.is_some() {
                hasher.sha256 = Some(s3s::crypto::Checksum::new());
            }
            hasher.update(&data);
            let got = hasher.finalize();
            let pairs = [
                (&input.checksum_crc32, &got.checksum_crc32),
                (&input.checksum_crc32c, &got.checksum_crc32c),
                (&input.checksum_sha1, &got.checksum_sha1),
                (&input.checksum_sha256, &got.checksum_sha256),
            ];
            if pairs
                .iter()
                .any(|(want, got)| want.is_some() && want != got)
            {
                return Err(s3_error!(
                    BadDigest,
                    "The checksum you specified did not match what we received."
                ));
            }
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(data))];
            req.input.body = Some(StreamingBlob::wrap(futures_util::stream::iter(chunks)));
        }
        self.inner.upload_part(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        let upload = self.require_upload(&input.upload_id)?;
        let marker = input.part_number_marker.unwrap_or(0);
        let max = usize::try_from(input.max_parts.unwrap_or(1000).clamp(1, 1000)).unwrap_or(1000);
        let after: Vec<StoredPart> = self
            .stored_parts(upload)
            .await?
            .into_iter()
            .filter(|p| p.number > marker)
            .collect();
        let truncated = after.len() > max;
        let page: Vec<StoredPart> = after.into_iter().take(max).collect();
        let next = page.last().map(|p| p.number);
        let parts = page
            .into_iter()
            .map(|p| Part {
                part_number: Some(p.number),
                e_tag: Some(ETag::Strong(p.etag)),
                size: i64::try_from(p.size).ok(),
                last_modified: Some(Timestamp::from(p.modified)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            parts: Some(parts),
            is_truncated: Some(truncated),
            max_parts: i32::try_from(max).ok(),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: next,
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let upload_id = req.input.upload_id.clone();
        let upload = self.require_upload(&upload_id)?;
        let requested: Vec<CompletedPart> = req
            .input
            .multipart_upload
            .as_ref()
            .and_then(|m| m.parts.clone())
            .unwrap_or_default();
        if requested.is_empty() {
            return Err(s3_error!(
                MalformedXML,
                "You must specify at least one part"
            ));
        }
        let stored = self.stored_parts(upload).await?;
        let mut last = 0;
        for (i, part) in requested.iter().enumerate() {
            let number = part
                .part_number
                .ok_or_else(|| s3_error!(InvalidPart, "missing part number"))?;
            if number <= last {
                return Err(s3_error!(
                    InvalidPartOrder,
                    "The list of parts was not in ascending order."
                ));
            }
            last = number;
            let etag = part
                .e_tag
                .as_ref()
                .map(|e| e.value().trim_matches('"').to_owned());
            let Some(found) = stored.iter().find(|p| p.number == number) else {
                return Err(s3_error!(InvalidPart, "part {number} was not uploaded"));
            };
            if etag.as_deref() != Some(found.etag.as_str()) {
                return Err(s3_error!(InvalidPart, "part {number}: ETag does not match"));
            }
            if i + 1 < requested.len() && found.size < MIN_PART {
                // Answered the way S3 answers a completion that fails late: 200, keep-alive
                // whitespace, then an <Error> document in the body.
                return Ok(S3Response::new(CompleteMultipartUploadOutput {
                    future: Some(Box::pin(async move {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        Err(s3_error!(
                            EntityTooSmall,
                            "part {number} is smaller than 5 MiB"
                        ))
                    })),
                    ..Default::default()
                }));
            }
            if usize::try_from(number).ok() != Some(i + 1) {
                // s3s-fs assembles only parts 1..=n; AWS allows gaps.
                return Err(s3_error!(
                    NotImplemented,
                    "the test server needs part numbers 1..=n without gaps"
                ));
            }
        }
        let resp = self.inner.complete_multipart_upload(req).await?;
        // s3s-fs leaves parts that were uploaded but not listed; S3 discards them.
        for p in stored.iter().filter(|p| p.number > last) {
            let _ = tokio::fs::remove_file(
                self.root
                    .join(format!(".upload_id-{upload}.part-{}", p.number)),
            )
            .await;
        }
        if let Some(done) = self.forget(&upload_id) {
            self.keep(done.bucket, done.key, done.kept);
        }
        Ok(resp)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let upload_id = req.input.upload_id.clone();
        self.require_upload(&upload_id)?;
        let resp = self.inner.abort_multipart_upload(req).await?;
        self.forget(&upload_id);
        Ok(resp)
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let open: Vec<(String, OpenUpload)> = self
            .uploads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, u)| u.bucket == input.bucket && u.key.starts_with(&prefix))
            .map(|(id, u)| (id.clone(), u.clone()))
            .collect();
        let mut uploads: Vec<MultipartUpload> = open
            .into_iter()
            .filter(|(id, _)| self.upload_exists(id))
            .map(|(id, u)| MultipartUpload {
                key: Some(u.key),
                upload_id: Some(id),
                initiated: Some(Timestamp::from(u.initiated)),
                ..Default::default()
            })
            .collect();
        uploads.sort_by(|a, b| (&a.key, &a.upload_id).cmp(&(&b.key, &b.upload_id)));
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            uploads: Some(uploads),
            is_truncated: Some(false),
            ..Default::default()
        }))
    }
}
