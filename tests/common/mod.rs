//! Shared harness for the gateway's integration tests: real servers on port 0, real
//! backends (in-memory or a real redis-server; filesystem storage in a tempdir), and a
//! `reqwest` client.
#![allow(dead_code)]

pub mod binary;
pub mod strategies;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};
use upgate::config::Config;
use upgate::model::PartRecord;
use upgate::storage::{
    ObjectAttributes, ObjectInfo, ObjectStore, PartBody, PartChecksum, StorageError, StorageKind,
};
use upgate::store::SessionStore;

pub const KEY_A: &str = "key-tenant-a";
pub const KEY_B: &str = "key-tenant-b";

/// A test configuration: two tenants (`a`, `b`), generous limits, 1 s minimum TTL.
pub fn config_toml(extra: &str) -> String {
    format!(
        r#"
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        reaper_interval_seconds = 3600
        {extra}
        [[tenants]]
        id = "a"
        api_keys_sha256 = ["{a}"]
        max_files_per_session = 1000
        max_file_size_bytes = 1099511627776
        session_ttl_seconds = {{ default = 1800, min = 1, max = 86400 }}
        rate_limit = {{ requests_per_second = 100000, burst = 100000 }}
        max_concurrent_uploads = 1000

        [[tenants]]
        id = "b"
        api_keys_sha256 = ["{b}"]
        session_ttl_seconds = {{ default = 1800, min = 1, max = 86400 }}
        rate_limit = {{ requests_per_second = 100000, burst = 100000 }}
        "#,
        a = Config::hash_key(KEY_A),
        b = Config::hash_key(KEY_B),
    )
}

pub fn config(extra: &str) -> Config {
    Config::from_toml(&config_toml(extra), |_| None, false).unwrap_or_else(|e| panic!("{e}"))
}

/// Log lines captured from the gateway (one global subscriber per test binary).
pub fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        struct W;
        impl std::io::Write for W {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                logs()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_env_filter("info,upgate=debug")
            .with_writer(|| W)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        Mutex::new(Vec::new())
    })
}

/// Captured log lines (JSON objects) that mention `needle`.
pub fn log_lines_with(needle: &str) -> Vec<Value> {
    let buf = logs().lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An [`ObjectStore`] that forwards to a real one and counts completions.
pub struct CountingStorage {
    pub inner: Arc<dyn ObjectStore>,
    pub completes: AtomicUsize,
    pub aborts: AtomicUsize,
    /// While true, `complete_upload` waits (a storage completion that stalls).
    pub hold_completes: tokio::sync::watch::Sender<bool>,
    /// While true, `read_head` waits (finalize's content check stalls).
    pub hold_reads: tokio::sync::watch::Sender<bool>,
    pub reads: AtomicUsize,
}

impl CountingStorage {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(CountingStorage {
            inner,
            completes: AtomicUsize::new(0),
            aborts: AtomicUsize::new(0),
            hold_completes: tokio::sync::watch::channel(false).0,
            hold_reads: tokio::sync::watch::channel(false).0,
            reads: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl ObjectStore for CountingStorage {
    fn kind(&self) -> StorageKind {
        self.inner.kind()
    }
    fn object_key(&self, t: &str, s: &str, id: &str, f: &str) -> String {
        self.inner.object_key(t, s, id, f)
    }
    fn file_url(&self, key: &str) -> String {
        self.inner.file_url(key)
    }
    async fn create_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        self.inner.create_upload(key, attrs).await
    }
    async fn replace_attributes(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
    ) -> Result<String, StorageError> {
        self.inner.replace_attributes(key, attrs).await
    }
    async fn put_part(
        &self,
        key: &str,
        id: &str,
        n: u32,
        body: PartBody,
        c: Option<PartChecksum>,
    ) -> Result<String, StorageError> {
        self.inner.put_part(key, id, n, body, c).await
    }
    async fn list_parts(&self, key: &str, id: &str) -> Result<Vec<PartRecord>, StorageError> {
        self.inner.list_parts(key, id).await
    }
    async fn complete_upload(
        &self,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        let mut held = self.hold_completes.subscribe();
        let _ = held.wait_for(|held| !*held).await;
        self.inner.complete_upload(key, id, parts).await
    }
    async fn abort_upload(&self, key: &str, id: &str) -> Result<(), StorageError> {
        self.aborts.fetch_add(1, Ordering::SeqCst);
        self.inner.abort_upload(key, id).await
    }
    async fn head_object(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.inner.head_object(key).await
    }
    async fn read_head(&self, key: &str, n: usize) -> Result<Bytes, StorageError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let mut held = self.hold_reads.subscribe();
        let _ = held.wait_for(|held| !*held).await;
        self.inner.read_head(key, n).await
    }
    async fn read_range(&self, key: &str, start: u64, n: usize) -> Result<Bytes, StorageError> {
        self.inner.read_range(key, start, n).await
    }
    async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete_object(key).await
    }
    async fn presign_part(
        &self,
        key: &str,
        id: &str,
        n: u32,
        len: u64,
        d: Duration,
    ) -> Result<String, StorageError> {
        self.inner.presign_part(key, id, n, len, d).await
    }
    async fn copy_object(
        &self,
        from: &str,
        to: &str,
        attrs: &upgate::storage::ObjectAttributes,
        if_match: Option<&str>,
    ) -> Result<String, StorageError> {
        self.inner.copy_object(from, to, attrs, if_match).await
    }
    async fn presign_part_any_size(
        &self,
        key: &str,
        id: &str,
        n: u32,
        d: Duration,
    ) -> Result<String, StorageError> {
        self.inner.presign_part_any_size(key, id, n, d).await
    }
    async fn presign_post(
        &self,
        key: &str,
        attrs: &upgate::storage::ObjectAttributes,
        max_len: u64,
        d: Duration,
    ) -> Result<upgate::storage::PresignedPost, StorageError> {
        self.inner.presign_post(key, attrs, max_len, d).await
    }
    async fn ping(&self) -> Result<(), StorageError> {
        self.inner.ping().await
    }
}

/// An S3 store for `s3` whose every request goes through `proxy` (a fault proxy): one
/// attempt and short deadlines, so a refused or stalled storage fails within seconds.
pub fn s3_through(
    s3: &upgate_testkit::s3::S3Server,
    proxy: &upgate_testkit::fault::FaultProxy,
    prefix: &str,
) -> upgate::storage::s3::S3Store {
    let conf = s3
        .client_config()
        .endpoint_url(format!("http://{}", proxy.addr()))
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(1))
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_timeout(Duration::from_secs(2))
                .build(),
        )
        .build();
    upgate::storage::s3::S3Store::from_client(
        aws_sdk_s3::Client::from_conf(conf),
        s3.bucket(),
        prefix,
    )
    .with_timeouts(upgate::storage::s3::S3Timeouts {
        connect: Duration::from_secs(1),
        attempt: Duration::from_secs(2),
        operation: Duration::from_secs(2),
        complete: Duration::from_secs(3),
        part_base: Duration::from_secs(2),
        part_min_rate: 256 * 1024,
    })
}

/// A running gateway.
pub struct TestGateway {
    pub base: String,
    pub admin: String,
    pub client: reqwest::Client,
    pub state: upgate::api::AppState,
    pub storage_dir: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
    pub counting: Arc<CountingStorage>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), upgate::StartError>>>,
}

impl TestGateway {
    /// Starts a gateway over `store` with filesystem storage in a fresh tempdir.
    pub async fn start(config: Config, store: Arc<dyn SessionStore>) -> TestGateway {
        let _ = logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = upgate::storage::fs::FsStore::new(dir.path())
            .await
            .expect("fs store");
        let counting = CountingStorage::new(Arc::new(fs));
        let path = dir.path().to_owned();
        Self::start_with(config, store, counting, path, Some(dir)).await
    }

    /// Starts a gateway over given backends; `dir` is the storage root, kept alive by `keep`.
    pub async fn start_with(
        config: Config,
        store: Arc<dyn SessionStore>,
        counting: Arc<CountingStorage>,
        dir: std::path::PathBuf,
        keep: Option<tempfile::TempDir>,
    ) -> TestGateway {
        let gw = upgate::Gateway::with_backends(config, store, counting.clone());
        Self::serve(gw, counting, dir, keep).await
    }

    /// As [`TestGateway::start_with`], with the upload protocol on `timing`'s clocks.
    pub async fn start_timed(
        config: Config,
        store: Arc<dyn SessionStore>,
        counting: Arc<CountingStorage>,
        dir: std::path::PathBuf,
        keep: Option<tempfile::TempDir>,
        timing: upgate::uploads::Timing,
    ) -> TestGateway {
        let gw =
            upgate::Gateway::with_backends(config, store, counting.clone()).with_timing(timing);
        Self::serve(gw, counting, dir, keep).await
    }

    /// Serves a gateway the test assembled itself (storage under `dir`).
    pub async fn from_gateway(gw: upgate::Gateway, dir: tempfile::TempDir) -> TestGateway {
        let counting = CountingStorage::new(gw.state().storages.distinct()[0].1.clone());
        let path = dir.path().to_owned();
        Self::serve(gw, counting, path, Some(dir)).await
    }

    async fn serve(
        gw: upgate::Gateway,
        counting: Arc<CountingStorage>,
        dir: std::path::PathBuf,
        keep: Option<tempfile::TempDir>,
    ) -> TestGateway {
        let _ = logs();
        let state = gw.state().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let admin_base = format!("http://{}", admin.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gw.serve(listener, Some(admin), async move {
            let _ = rx.await;
        }));
        TestGateway {
            base,
            admin: admin_base,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            state,
            storage_dir: dir,
            _dir: keep,
            counting,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn req(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(key)
    }

    pub async fn create_session(&self, key: &str, body: Value) -> Value {
        let res = self
            .req(reqwest::Method::POST, "/v1/sessions", key)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 201, "create session");
        res.json().await.expect("json")
    }

    /// `create_session`'s `sessionId`.
    pub async fn session_id(&self, key: &str, body: Value) -> String {
        let v = self.create_session(key, body).await;
        v["sessionId"].as_str().expect("sessionId").to_owned()
    }

    pub async fn register(&self, key: &str, session: &str, body: Value) -> reqwest::Response {
        self.req(
            reqwest::Method::POST,
            &format!("/v1/sessions/{session}/files"),
            key,
        )
        .json(&body)
        .send()
        .await
        .expect("send")
    }

    /// `register`, its body read as JSON (whatever the status: callers assert on it).
    pub async fn register_json(&self, key: &str, session: &str, body: Value) -> Value {
        self.register(key, session, body)
            .await
            .json()
            .await
            .expect("json")
    }

    /// Registers `name` of `size` bytes and returns its `fileId` (201 expected).
    pub async fn register_id(&self, key: &str, session: &str, name: &str, size: u64) -> String {
        let f = self
            .register_json(
                key,
                session,
                serde_json::json!({"fileName": name, "sizeBytes": size}),
            )
            .await;
        f["fileId"]
            .as_str()
            .unwrap_or_else(|| panic!("register {name}: {f}"))
            .to_owned()
    }

    /// `POST .../finalize`.
    pub async fn finalize(&self, key: &str, session: &str) -> reqwest::Response {
        self.req(
            reqwest::Method::POST,
            &format!("/v1/sessions/{session}/finalize"),
            key,
        )
        .send()
        .await
        .expect("send")
    }

    /// The admin listener's `/readyz` status.
    pub async fn readyz(&self) -> u16 {
        self.client
            .get(format!("{}/readyz", self.admin))
            .send()
            .await
            .expect("readyz")
            .status()
            .as_u16()
    }

    /// `GET path`, its body read as JSON (whatever the status).
    pub async fn get_json(&self, key: &str, path: &str) -> Value {
        self.req(reqwest::Method::GET, path, key)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json")
    }

    pub async fn put_part(
        &self,
        key: &str,
        session: &str,
        file: &str,
        n: u32,
        bytes: Vec<u8>,
    ) -> reqwest::Response {
        self.req(
            reqwest::Method::PUT,
            &format!("/v1/sessions/{session}/files/{file}/parts/{n}"),
            key,
        )
        .body(bytes)
        .send()
        .await
        .expect("send")
    }

    pub async fn complete(&self, key: &str, session: &str, file: &str) -> reqwest::Response {
        self.req(
            reqwest::Method::POST,
            &format!("/v1/sessions/{session}/files/{file}/complete"),
            key,
        )
        .json(&json!({}))
        .send()
        .await
        .expect("send")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Asserts a problem document: status, content type and code; returns the body.
pub async fn problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status for {code}");
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/problem+json", "content type for {code}");
    let v: Value = res.json().await.expect("problem json");
    assert_eq!(v["code"], json!(code), "code in {v}");
    if code != "sessionNotActive" {
        // sessionNotActive's contract extension member `status` is the session's status.
        assert_eq!(v["status"], json!(status));
    }
    v
}

/// A Redis session store on the single server at `url`, built the way the gateway builds it.
pub async fn redis_store(url: &str) -> Arc<dyn SessionStore> {
    let mut cfg = config("");
    cfg.redis = Some(upgate::config::RedisTarget::Single(url.to_owned()));
    upgate::build_store(&cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A gateway on `redis` and the S3 server `s3` (objects under `pfx/`).
pub async fn s3_redis_gateway(
    s3: &upgate_testkit::s3::S3Server,
    redis: &upgate_testkit::RedisServer,
) -> TestGateway {
    s3_redis_gateway_with(s3, redis, config("")).await
}

/// [`s3_redis_gateway`] with the configuration `cfg` (its Redis set here).
pub async fn s3_redis_gateway_with(
    s3: &upgate_testkit::s3::S3Server,
    redis: &upgate_testkit::RedisServer,
    cfg: Config,
) -> TestGateway {
    s3_redis_gateway_timed(s3, redis, cfg, upgate::uploads::Timing::default()).await
}

/// As [`s3_redis_gateway_with`], with the upload protocol on `timing`'s clocks.
pub async fn s3_redis_gateway_timed(
    s3: &upgate_testkit::s3::S3Server,
    redis: &upgate_testkit::RedisServer,
    mut cfg: Config,
    timing: upgate::uploads::Timing,
) -> TestGateway {
    let storage = upgate::storage::s3::S3Store::from_client(s3.client(), s3.bucket(), "pfx")
        .with_credentials(aws_sdk_s3::config::Credentials::new(
            s3.access_key(),
            s3.secret_key(),
            None,
            None,
            "test",
        ));
    cfg.redis = Some(upgate::config::RedisTarget::Single(redis.url()));
    let store = upgate::build_store(&cfg).await.expect("store");
    TestGateway::start_timed(
        cfg,
        store,
        CountingStorage::new(Arc::new(storage)),
        std::env::temp_dir(),
        None,
        timing,
    )
    .await
}

/// A gateway on the memory store and filesystem storage in a tempdir.
pub async fn memory_fs_gateway() -> TestGateway {
    TestGateway::start(
        config(""),
        Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        )),
    )
    .await
}

/// The object of a completed file on filesystem storage (its `fileUrl`).
pub fn fs_object(file: &Value) -> Vec<u8> {
    let url = file["fileUrl"].as_str().expect("fileUrl");
    std::fs::read(url.strip_prefix("file://").expect("file url")).expect("object")
}

/// The object of a completed file on the S3 server `s3` (its `fileUrl`).
pub fn s3_object(s3: &upgate_testkit::s3::S3Server, file: &Value) -> Vec<u8> {
    let url = file["fileUrl"].as_str().expect("fileUrl");
    let key = url
        .strip_prefix(&format!("s3://{}/", s3.bucket()))
        .expect("s3 url");
    s3.read_object(key).expect("object")
}

/// Hex SHA-256.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}
