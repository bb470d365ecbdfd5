//! End-to-end byte path, unchanged over both object stores: S3 (a real S3 server over HTTP,
//! `s3s-fs` in-process, with the real aws-sdk-s3 client; sessions in a real redis-server) and
//! the embedded default (filesystem storage, in-memory sessions).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use upgate::storage::{ObjectAttributes, ObjectStore};
use upgate_testkit::s3::S3Server;
use upgate_testkit::RedisServer;

const MIB: usize = 1024 * 1024;
const S3_PREFIX: &str = "pfx";

/// The storage under test and what it needs kept alive.
#[allow(clippy::large_enum_variant)] // one per test
enum Storage {
    Fs,
    S3(S3Server, RedisServer),
}

impl Storage {
    fn fs() -> Self {
        Storage::Fs
    }

    fn s3() -> Self {
        Storage::S3(S3Server::start("uploads"), RedisServer::start())
    }

    /// A gateway replica over this storage (S3 replicas share the bucket and the Redis).
    async fn gateway(&self, cfg: upgate::config::Config, fs_root: &std::path::Path) -> TestGateway {
        match self {
            Storage::Fs => {
                let store = Arc::new(upgate::store::memory::MemoryStore::new(
                    Duration::from_secs(3600),
                ));
                let fs = upgate::storage::fs::FsStore::new(fs_root)
                    .await
                    .expect("fs");
                TestGateway::start_with(
                    cfg,
                    store,
                    CountingStorage::new(Arc::new(fs)),
                    fs_root.to_owned(),
                    None,
                )
                .await
            }
            Storage::S3(s3, redis) => {
                let mut cfg = cfg;
                cfg.redis = Some(upgate::config::RedisTarget::Single(redis.url()));
                let store = upgate::build_store(&cfg)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let s3store =
                    upgate::storage::s3::S3Store::from_client(s3.client(), s3.bucket(), S3_PREFIX);
                TestGateway::start_with(
                    cfg,
                    store,
                    CountingStorage::new(Arc::new(s3store)),
                    fs_root.to_owned(),
                    None,
                )
                .await
            }
        }
    }

    /// The object's bytes, read straight from the storage backend.
    async fn read(&self, gw: &TestGateway, file_url: &str) -> Vec<u8> {
        match self {
            Storage::Fs => {
                std::fs::read(file_url.strip_prefix("file://").expect("file url")).expect("object")
            }
            Storage::S3(s3, _) => {
                let rest = file_url.strip_prefix("s3://").expect("s3 url");
                let (bucket, key) = rest.split_once('/').expect("bucket/key");
                assert_eq!(bucket, s3.bucket());
                let out = s3
                    .client()
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .expect("GetObject");
                let bytes = out
                    .body
                    .collect()
                    .await
                    .expect("body")
                    .into_bytes()
                    .to_vec();
                let _ = gw;
                bytes
            }
        }
    }

    /// Multipart uploads still open in storage.
    async fn open_uploads(&self, fs_root: &std::path::Path) -> usize {
        match self {
            Storage::Fs => std::fs::read_dir(fs_root.join(".uploads"))
                .map(|d| d.count())
                .unwrap_or(0),
            Storage::S3(s3, _) => {
                let listed = s3
                    .client()
                    .list_multipart_uploads()
                    .bucket(s3.bucket())
                    .send()
                    .await
                    .expect("ListMultipartUploads");
                listed.uploads().len()
            }
        }
    }
}

macro_rules! on_every_storage {
    ($($name:ident),* $(,)?) => {
        mod fs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Storage::fs()).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Storage::s3()).await;
                }
            )*
        }
    };
}

on_every_storage!(
    a_64_mib_file_round_trips_byte_identical,
    presigned_parts_then_complete_via_gateway,
    finalize_enforces_declared_types,
    expired_sessions_are_reaped_once_by_two_replicas,
);

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

async fn register(
    gw: &TestGateway,
    session: &str,
    name: &str,
    size: usize,
    ct: Option<&str>,
) -> Value {
    let res = gw.register(KEY_A, session, json!({"fileName": name, "fileKey": format!("in/{name}"), "sizeBytes": size, "contentType": ct})).await;
    assert_eq!(res.status(), 201);
    res.json().await.expect("json")
}

async fn a_64_mib_file_round_trips_byte_identical(storage: Storage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Arc::new(storage.gateway(config(""), dir.path()).await);
    let s = gw.create_session(KEY_A, json!({})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let size = 64 * MIB;
    let data: Arc<Vec<u8>> = Arc::new(
        (0..size)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 13)) as u8)
            .collect(),
    );
    let f = register(
        &gw,
        &session,
        "video.bin",
        size,
        Some("application/octet-stream"),
    )
    .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(f["partSizeBytes"], 5 * MIB);
    let parts = f["partCount"].as_u64().expect("count") as usize;
    assert_eq!(parts, 13);
    // Four parts in flight at a time, as a browser would.
    let mut handles = Vec::new();
    for n in 1..=parts {
        let (gw, data, session, file) = (gw.clone(), data.clone(), session.clone(), file.clone());
        handles.push(tokio::spawn(async move {
            let start = (n - 1) * 5 * MIB;
            let end = (start + 5 * MIB).min(data.len());
            gw.put_part(KEY_A, &session, &file, n as u32, data[start..end].to_vec())
                .await
                .status()
                .as_u16()
        }));
        if handles.len() == 4 {
            assert_eq!(handles.remove(0).await.expect("task"), 200);
        }
    }
    for h in handles {
        assert_eq!(h.await.expect("task"), 200);
    }
    let done = gw.complete(KEY_A, &session, &file).await;
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.expect("json");
    let url = done["fileUrl"].as_str().expect("url").to_owned();
    match &storage {
        Storage::Fs => assert!(
            url.ends_with(&format!("/a/{session}/{file}/in/video.bin"))
                && url.starts_with("file:///"),
            "{url}"
        ),
        Storage::S3(s3, _) => assert_eq!(
            url,
            format!(
                "s3://{}/{S3_PREFIX}/a/{session}/{file}/in/video.bin",
                s3.bucket()
            )
        ),
    }
    let stored = storage.read(&gw, &url).await;
    assert_eq!(stored.len(), size);
    assert_eq!(sha(&stored), sha(&data), "byte-identical");
    assert!(
        done["etag"].as_str().is_some_and(|e| e.ends_with("-13")),
        "multipart ETag: {done}"
    );
    assert_eq!(storage.open_uploads(dir.path()).await, 0);
}

async fn presigned_parts_then_complete_via_gateway(storage: Storage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = storage.gateway(config(""), dir.path()).await;
    let s = gw.create_session(KEY_A, json!({})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let size = 12 * MIB + 5;
    let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let f = register(&gw, &session, "direct.bin", size, None).await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    let res = gw
        .req(
            Method::POST,
            &format!("/v1/sessions/{session}/files/{file}/presigned-parts"),
            KEY_A,
        )
        .json(&json!({"partNumbers": [1, 2, 3]}))
        .send()
        .await
        .expect("send");
    if let Storage::Fs = storage {
        problem(res, 501, "notSupported").await;
        return;
    }
    assert_eq!(res.status(), 200);
    let presigned: Value = res.json().await.expect("json");
    assert!(presigned["expiresAt"].is_string());
    // A plain HTTP client, no AWS SDK: PUT the bytes to the URLs, keep the ETags.
    let plain = reqwest::Client::new();
    let mut parts = Vec::new();
    for p in presigned["parts"].as_array().expect("parts") {
        assert_eq!(p["method"], "PUT");
        let n = p["partNumber"].as_u64().expect("n") as usize;
        let start = (n - 1) * 5 * MIB;
        let end = (start + 5 * MIB).min(size);
        let put = plain
            .put(p["url"].as_str().expect("url"))
            .body(data[start..end].to_vec())
            .send()
            .await
            .expect("PUT");
        assert_eq!(put.status(), 200, "presigned PUT");
        let etag = put
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .expect("ETag header")
            .to_owned();
        parts.push(json!({"partNumber": n, "etag": etag}));
    }
    let done = gw
        .req(
            Method::POST,
            &format!("/v1/sessions/{session}/files/{file}/complete"),
            KEY_A,
        )
        .json(&json!({"parts": parts}))
        .send()
        .await
        .expect("send");
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.expect("json");
    let stored = storage
        .read(&gw, done["fileUrl"].as_str().expect("url"))
        .await;
    assert_eq!(sha(&stored), sha(&data));
}

const PNG: &[u8] = &[
    0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0x0D, b'I', b'H', b'D', b'R', 0, 0, 0,
    1,
];

async fn finalize_enforces_declared_types(storage: Storage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = storage.gateway(config(""), dir.path()).await;
    for (declared, expect) in [("application/pdf", 415u16), ("image/png", 200)] {
        let s = gw.create_session(KEY_A, json!({})).await;
        let session = s["sessionId"].as_str().expect("id").to_owned();
        let f = register(&gw, &session, "pic.png", PNG.len(), Some(declared)).await;
        let file = f["fileId"].as_str().expect("id").to_owned();
        assert_eq!(
            gw.put_part(KEY_A, &session, &file, 1, PNG.to_vec())
                .await
                .status(),
            200
        );
        assert_eq!(gw.complete(KEY_A, &session, &file).await.status(), 200);
        let res = gw
            .req(
                Method::POST,
                &format!("/v1/sessions/{session}/finalize"),
                KEY_A,
            )
            .send()
            .await
            .expect("send");
        if expect == 415 {
            let p = problem(res, 415, "contentTypeMismatch").await;
            assert_eq!(
                (p["declared"].as_str(), p["detected"].as_str()),
                (Some("application/pdf"), Some("image/png"))
            );
        } else {
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.expect("json");
            assert_eq!(v["status"], "finalized");
            // Later mutations: 409 sessionNotActive.
            let again = gw
                .register(KEY_A, &session, json!({"fileName": "late", "sizeBytes": 1}))
                .await;
            problem(again, 409, "sessionNotActive").await;
        }
    }
}

async fn expired_sessions_are_reaped_once_by_two_replicas(storage: Storage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config("");
    cfg.reaper_interval = Duration::from_secs(1);
    let a = storage.gateway(cfg.clone(), dir.path()).await;
    // The embedded default is one replica by definition (in-memory sessions).
    let b = match storage {
        Storage::S3(..) => Some(storage.gateway(cfg, dir.path()).await),
        Storage::Fs => None,
    };
    let s = a.create_session(KEY_A, json!({"ttlSeconds": 6})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let f = register(&a, &session, "half.bin", 10 * MIB, None).await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        a.put_part(KEY_A, &session, &file, 1, vec![7; 5 * MIB])
            .await
            .status(),
        200
    );
    assert_eq!(storage.open_uploads(dir.path()).await, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while storage.open_uploads(dir.path()).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the reaper aborted the half-uploaded file"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let replicas: Vec<&TestGateway> = std::iter::once(&a).chain(b.as_ref()).collect();
    let reaped: u64 = replicas
        .iter()
        .map(|r| r.state.metrics.sessions_reaped.get())
        .sum();
    let aborts: usize = replicas
        .iter()
        .map(|r| r.counting.aborts.load(Ordering::SeqCst))
        .sum();
    assert_eq!((reaped, aborts), (1, 1), "reaped once");
    problem(
        a.req(Method::GET, &format!("/v1/sessions/{session}"), KEY_A)
            .send()
            .await
            .expect("send"),
        410,
        "sessionExpired",
    )
    .await;
}

/// The S3 store on its own: an unreachable endpoint fails fast with `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_s3_is_unavailable_not_a_hang() {
    let port = upgate_testkit::free_port();
    let mut settings = upgate::storage::s3::S3Settings::new("nowhere");
    settings.endpoint = Some(format!("http://127.0.0.1:{port}"));
    settings.force_path_style = true;
    std::env::set_var("AWS_ACCESS_KEY_ID", "x");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "y");
    let store = upgate::storage::s3::S3Store::new(settings)
        .await
        .expect("store");
    let started = Instant::now();
    let r = store.create_upload("k", &ObjectAttributes::default()).await;
    assert!(
        matches!(r, Err(upgate::storage::StorageError::Unavailable(_))),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Issue scenario: a file registered with `sizeBytes: 1` whose presigned URL is sent 6 MiB.
/// The URL signs the exact length, so storage refuses other sizes; a part that reached
/// storage some other way (here: put straight into the upload, as an older unsigned URL
/// would have) is refused at `complete` with 400 `partSizeMismatch`, with and without a
/// client part list; the right-sized part completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presigned_parts_are_held_to_the_size_rule() {
    let storage = Storage::s3();
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = storage.gateway(config(""), dir.path()).await;
    let s = gw.create_session(KEY_A, json!({})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let f = register(&gw, &session, "one.txt", 1, None).await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    let fp = format!("/v1/sessions/{session}/files/{file}");
    let presigned: Value = gw
        .req(Method::POST, &format!("{fp}/presigned-parts"), KEY_A)
        .json(&json!({"partNumbers": [1]}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let url = presigned["parts"][0]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let plain = reqwest::Client::new();
    // Refused by storage: a 403, or the connection closed while the body is still sent.
    if let Ok(res) = plain.put(&url).body(vec![b'x'; 6 * MIB]).send().await {
        assert_eq!(res.status(), 403);
    }

    // A 6 MiB part that reached the upload anyway.
    let record = match gw
        .state
        .store
        .get_file("a", &session, &file, true, upgate::model::now_ms())
        .await
        .expect("get_file")
    {
        upgate::store::Gate::Ok(f) => f,
        _ => panic!("file not open"),
    };
    let upload_id = record.upload_id.clone().expect("presign opened the upload");
    let big = upgate::storage::PartBody {
        stream: Box::pin(futures_util::stream::iter([Ok::<_, std::io::Error>(
            bytes::Bytes::from(vec![b'x'; 6 * MIB]),
        )])),
        len: (6 * MIB) as u64,
        offset: Some(0),
    };
    let etag = gw
        .state
        .storages
        .for_tenant("a")
        .store
        .put_part(&record.object_key, &upload_id, 1, big, None)
        .await
        .expect("put the oversized part");
    for body in [
        json!({"parts": [{"partNumber": 1, "etag": etag}]}),
        json!({}),
    ] {
        let res = gw
            .req(Method::POST, &format!("{fp}/complete"), KEY_A)
            .json(&body)
            .send()
            .await
            .expect("send");
        let p = problem(res, 400, "partSizeMismatch").await;
        assert_eq!(
            (p["partNumber"].clone(), p["expectedSizeBytes"].clone()),
            (json!(1), json!(1))
        );
    }

    // The right size through the same URL replaces it and completes.
    let res = plain.put(&url).body(vec![b'y']).send().await.expect("PUT");
    assert_eq!(res.status(), 200);
    let etag = res.headers()["etag"].to_str().expect("etag").to_owned();
    let done = gw
        .req(Method::POST, &format!("{fp}/complete"), KEY_A)
        .json(&json!({"parts": [{"partNumber": 1, "etag": etag}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.expect("json");
    let stored = storage
        .read(&gw, done["fileUrl"].as_str().expect("url"))
        .await;
    assert_eq!(stored, b"y");
}

/// Presigned URLs expire within the hour: a presign answer is not kept as an idempotency
/// record, so a retry with the same key gets fresh URLs instead of a day-old replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presign_answers_are_not_replayed() {
    let storage = Storage::s3();
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = storage.gateway(config(""), dir.path()).await;
    let s = gw.create_session(KEY_A, json!({})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let f = register(&gw, &session, "p.bin", 10, None).await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    for _ in 0..2 {
        let res = gw
            .req(
                Method::POST,
                &format!("/v1/sessions/{session}/files/{file}/presigned-parts"),
                KEY_A,
            )
            .header("idempotency-key", "presign-1")
            .json(&json!({"partNumbers": [1]}))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
}
