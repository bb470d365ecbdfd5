//! The upload protocol at the seam between the session store and object storage
//! (`src/uploads/`, issue 11): each scenario runs against real backends (redis-server, the
//! in-process S3 server over HTTP with the real aws-sdk-s3 client, filesystem storage), with
//! the testkit's fault proxy between the gateway and storage where storage must fail.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use upgate::model::FileStatus;
use upgate::store::Gate;
use upgate::uploads::Timing;
use upgate_testkit::fault::{Fault, FaultProxy};
use upgate_testkit::s3::S3Server;
use upgate_testkit::RedisServer;

const S3_PREFIX: &str = "pfx";

fn fast_cleanup() -> Timing {
    Timing {
        cleanup_retry: Duration::from_millis(200),
        ..Timing::default()
    }
}

/// A gateway on real Redis and on S3 behind a fault proxy, with fast cleanup retries.
struct S3Rig {
    s3: S3Server,
    _redis: RedisServer,
    proxy: FaultProxy,
    gw: TestGateway,
}

async fn s3_rig(extra_config: &str) -> S3Rig {
    let s3 = S3Server::start("uploads");
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(s3.addr()).await;
    let storage = s3_through(&s3, &proxy, S3_PREFIX);
    let mut cfg = config(extra_config);
    cfg.redis = Some(upgate::config::RedisTarget::Single(redis.url()));
    let store = upgate::build_store(&cfg).await.expect("store");
    let gw = TestGateway::start_timed(
        cfg,
        store,
        CountingStorage::new(Arc::new(storage)),
        std::env::temp_dir(),
        None,
        fast_cleanup(),
    )
    .await;
    S3Rig {
        s3,
        _redis: redis,
        proxy,
        gw,
    }
}

/// A `complete` of `file` sent in a task: its status and body once it answers.
fn complete_in_background(
    gw: &Arc<TestGateway>,
    s: &str,
    file: &str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let (gw, s, file) = (gw.clone(), s.to_owned(), file.to_owned());
    tokio::spawn(async move {
        let res = gw.complete(KEY_A, &s, &file).await;
        let status = res.status().as_u16();
        (status, res.json::<Value>().await.expect("json"))
    })
}

/// The filesystem path of a completed file resource's `fileUrl`.
fn fs_path(file: &Value) -> String {
    file["fileUrl"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .unwrap_or_else(|| panic!("no file:// url in {file}"))
        .to_owned()
}

/// Waits until storage has been asked to complete an upload.
async fn storage_completing(gw: &TestGateway) {
    let started = Instant::now();
    while gw.counting.completes.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "storage never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn memory_gateway(timing: Timing) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = upgate::storage::fs::FsStore::new(dir.path())
        .await
        .expect("fs store");
    let path = dir.path().to_owned();
    TestGateway::start_timed(
        config(""),
        Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        )),
        CountingStorage::new(Arc::new(fs)),
        path,
        Some(dir),
        timing,
    )
    .await
}

async fn session(gw: &TestGateway, body: Value) -> String {
    gw.create_session(KEY_A, body).await["sessionId"]
        .as_str()
        .expect("sessionId")
        .to_owned()
}

/// Registers `name` with `bytes` as its one part and uploads it; returns the file id.
async fn uploaded(gw: &TestGateway, s: &str, name: &str, bytes: &[u8], ct: Option<&str>) -> String {
    let mut body = json!({"fileName": name, "sizeBytes": bytes.len()});
    if let Some(ct) = ct {
        body["contentType"] = json!(ct);
    }
    let f = gw.register_json(KEY_A, s, body).await;
    let id = f["fileId"]
        .as_str()
        .unwrap_or_else(|| panic!("{f}"))
        .to_owned();
    let res = gw.put_part(KEY_A, s, &id, 1, bytes.to_vec()).await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    id
}

async fn completed(gw: &TestGateway, s: &str, name: &str, bytes: &[u8]) -> (String, String) {
    let id = uploaded(gw, s, name, bytes, None).await;
    let res = gw.complete(KEY_A, s, &id).await;
    assert_eq!(res.status(), 200);
    let f: Value = res.json().await.expect("json");
    (id, f["fileUrl"].as_str().expect("fileUrl").to_owned())
}

async fn delete(gw: &TestGateway, path: &str) -> reqwest::Response {
    gw.req(Method::DELETE, path, KEY_A)
        .send()
        .await
        .expect("send")
}

fn s3_key(url: &str) -> String {
    url.splitn(4, '/')
        .nth(3)
        .expect("s3://bucket/key")
        .to_owned()
}

async fn s3_has(s3: &S3Server, key: &str) -> bool {
    s3.client()
        .head_object()
        .bucket(s3.bucket())
        .key(key)
        .send()
        .await
        .is_ok()
}

async fn s3_open_uploads(s3: &S3Server, prefix: &str) -> usize {
    let out = s3
        .client()
        .list_multipart_uploads()
        .bucket(s3.bucket())
        .prefix(prefix)
        .send()
        .await
        .expect("ListMultipartUploads");
    out.uploads().len()
}

/// Why, scenario 2: a completed file deleted while S3 is down used to answer 503, then 204
/// on the retry with the object left in the bucket for good. Now the `DELETE` answers 204
/// at once (the cleanup is queued with the state change), the reaper retries while S3 is
/// down, and once it is back nothing of the file (nor of a deleted session) is left in the
/// bucket, while a newer file under the same fileKey keeps its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_deleted_while_storage_is_down_is_removed_once_it_is_back() {
    let S3Rig {
        s3,
        proxy,
        gw,
        _redis,
    } = s3_rig("").await;

    let s = session(&gw, json!({})).await;
    let (file, url) = completed(&gw, &s, "a.bin", &[7; 1000]).await;
    let key = s3_key(&url);
    assert!(s3_has(&s3, &key).await);

    proxy.set(Fault::Refuse);
    let res = delete(&gw, &format!("/v1/sessions/{s}/files/{file}")).await;
    assert_eq!(res.status(), 204, "queued durably: {:?}", res.text().await);
    assert!(
        s3_has(&s3, &key).await,
        "storage was down: the object is still there"
    );
    // The key is free at once, and the newer file's object has a key of its own: the late
    // cleanup of the deleted file cannot touch it. (Storage is down: register only.)
    let newer = gw
        .register_json(KEY_A, &s, json!({"fileName": "a.bin", "sizeBytes": 10}))
        .await;
    let newer = newer["fileId"]
        .as_str()
        .expect("the key is free")
        .to_owned();
    // The reaper's retry while storage is still down changes nothing and loses nothing.
    tokio::time::sleep(Duration::from_millis(250)).await;
    gw.state.uploads.reap_pass().await.expect("reap pass");
    assert!(s3_has(&s3, &key).await);

    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(250)).await;
    gw.state.uploads.reap_pass().await.expect("reap pass");
    assert!(
        !s3_has(&s3, &key).await,
        "the reaper removed the deleted file's object"
    );
    assert_eq!(
        gw.put_part(KEY_A, &s, &newer, 1, vec![8; 10])
            .await
            .status(),
        200
    );
    let res = gw.complete(KEY_A, &s, &newer).await;
    assert_eq!(res.status(), 200);
    let newer_url = res.json::<Value>().await.expect("json")["fileUrl"]
        .as_str()
        .expect("fileUrl")
        .to_owned();
    assert_ne!(s3_key(&newer_url), key, "each file has its own object key");
    gw.state.uploads.reap_pass().await.expect("reap pass");
    assert!(s3_has(&s3, &s3_key(&newer_url)).await);

    // A whole session: an open upload and a completed object, deleted while S3 is down.
    let s2 = session(&gw, json!({})).await;
    let (_, url2) = completed(&gw, &s2, "done.bin", &[1; 100]).await;
    let _open = uploaded(&gw, &s2, "open.bin", &[2; 100], None).await;
    let prefix = format!("{S3_PREFIX}/a/{s2}/");
    assert_eq!(s3_open_uploads(&s3, &prefix).await, 1);
    proxy.set(Fault::Refuse);
    assert_eq!(
        delete(&gw, &format!("/v1/sessions/{s2}")).await.status(),
        204
    );
    assert_eq!(s3_open_uploads(&s3, &prefix).await, 1);
    assert!(s3_has(&s3, &s3_key(&url2)).await);
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(250)).await;
    gw.state.uploads.reap_pass().await.expect("reap pass");
    assert_eq!(
        s3_open_uploads(&s3, &prefix).await,
        0,
        "the upload was aborted"
    );
    assert!(
        !s3_has(&s3, &s3_key(&url2)).await,
        "a deleted (not finalized) session leaves no object"
    );
}

/// Why, scenario "the lease is released only on Err": a complete whose request is dropped
/// mid-storage-call (client gone, HTTP/2 reset) used to leave the file `completing` for the
/// whole lease while retries polled. Now the storage completion runs on by itself, under its
/// renewed lease, and lands: the next complete gets its result, and storage completed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_does_not_cut_its_completion() {
    let gw = memory_gateway(Timing::default()).await;
    let s = session(&gw, json!({})).await;
    let file = uploaded(&gw, &s, "c.bin", &[3; 10], None).await;
    gw.counting.hold_completes.send_replace(true);
    let uploads = gw.state.uploads.clone();
    let (s2, f2) = (s.clone(), file.clone());
    let task = tokio::spawn(async move { uploads.complete("a", &s2, &f2, &json!({})).await });
    let started = Instant::now();
    while gw.counting.completes.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "storage never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    assert!(task.await.is_err(), "the request was cancelled");
    let status = |gw: &TestGateway| {
        let (store, s, file) = (gw.state.store.clone(), s.clone(), file.clone());
        async move {
            match store
                .get_file("a", &s, &file, false, upgate::model::now_ms())
                .await
                .expect("get_file")
            {
                Gate::Ok(f) => f.status,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(status(&gw).await, FileStatus::Completing, "still held");
    gw.counting.hold_completes.send_replace(false);
    let landed = Instant::now();
    while status(&gw).await != FileStatus::Completed {
        assert!(
            landed.elapsed() < Duration::from_secs(5),
            "the completion did not land"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let res = gw.complete(KEY_A, &s, &file).await;
    assert_eq!(res.status(), 200);
    assert_eq!(gw.counting.completes.load(Ordering::SeqCst), 1);
}

/// Why, scenario "the lease is shorter than the storage call": a completion that takes
/// several lease periods keeps its lease (renewed), so nobody else starts a second storage
/// completion; concurrent completes get 409 and the retry after it lands gets its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_slower_than_its_lease_keeps_it_and_storage_completes_once() {
    let timing = Timing {
        complete_lease: Duration::from_millis(300),
        complete_renew: Duration::from_millis(100),
        complete_wait: Duration::from_millis(200),
        ..Timing::default()
    };
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = upgate::storage::fs::FsStore::new(dir.path())
        .await
        .expect("fs");
    let path = dir.path().to_owned();
    let gw = Arc::new(
        TestGateway::start_timed(
            config(""),
            redis_store(&redis.url()).await,
            CountingStorage::new(Arc::new(fs)),
            path,
            Some(dir),
            timing,
        )
        .await,
    );
    let s = session(&gw, json!({})).await;
    let file = uploaded(&gw, &s, "slow.bin", &[4; 10], None).await;
    gw.counting.hold_completes.send_replace(true);
    let first = complete_in_background(&gw, &s, &file);
    storage_completing(&gw).await;
    // Three lease periods: without renewal the lease would have run out twice over.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let res = gw.complete(KEY_A, &s, &file).await;
    assert!(res.headers().contains_key("retry-after"));
    problem(res, 409, "requestInProgress").await;
    assert_eq!(
        gw.counting.completes.load(Ordering::SeqCst),
        1,
        "one storage completion"
    );
    gw.counting.hold_completes.send_replace(false);
    let (status, body) = first.await.expect("task");
    assert_eq!(status, 200, "{body}");
    let res = gw.complete(KEY_A, &s, &file).await;
    assert_eq!(res.status(), 200);
    let again: Value = res.json().await.expect("json");
    assert_eq!(again["fileUrl"], body["fileUrl"]);
    assert_eq!(gw.counting.completes.load(Ordering::SeqCst), 1);
}

/// Why, scenario "the reaper and DELETE abort uploads whose completion is in flight": a
/// `DELETE` of the file or its session while storage is completing it answers 409 (and
/// changes nothing); once the completion landed, the `DELETE` removes the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_during_a_completion_is_refused_until_it_lands() {
    let gw = Arc::new(memory_gateway(Timing::default()).await);
    let s = session(&gw, json!({})).await;
    let file = uploaded(&gw, &s, "d.bin", &[5; 10], None).await;
    gw.counting.hold_completes.send_replace(true);
    let completing = complete_in_background(&gw, &s, &file);
    storage_completing(&gw).await;
    for path in [
        format!("/v1/sessions/{s}/files/{file}"),
        format!("/v1/sessions/{s}"),
    ] {
        let res = delete(&gw, &path).await;
        assert!(res.headers().contains_key("retry-after"), "{path}");
        problem(res, 409, "requestInProgress").await;
    }
    assert_eq!(
        gw.counting.aborts.load(Ordering::SeqCst),
        0,
        "nothing aborted"
    );
    gw.counting.hold_completes.send_replace(false);
    let (status, body) = completing.await.expect("task");
    assert_eq!(status, 200, "the completion landed: {body}");
    let path = fs_path(&body);
    assert!(std::path::Path::new(&path).exists());
    let res = delete(&gw, &format!("/v1/sessions/{s}/files/{file}")).await;
    assert_eq!(res.status(), 204);
    assert!(
        !std::path::Path::new(&path).exists(),
        "the object is deleted"
    );
}

/// The reaper leaves a completion in flight alone: the session expires while storage is
/// completing a file; the reaper's pass aborts nothing, and the completion lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_leaves_a_completion_in_flight_alone() {
    let redis = RedisServer::start();
    let gw = Arc::new(TestGateway::start(config(""), redis_store(&redis.url()).await).await);
    let s = session(&gw, json!({"ttlSeconds": 2})).await;
    let file = uploaded(&gw, &s, "r.bin", &[6; 10], None).await;
    gw.counting.hold_completes.send_replace(true);
    let completing = complete_in_background(&gw, &s, &file);
    storage_completing(&gw).await;
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    gw.state.uploads.reap_pass().await.expect("reap pass");
    assert_eq!(
        gw.counting.aborts.load(Ordering::SeqCst),
        0,
        "the reaper aborted an upload storage was completing"
    );
    gw.counting.hold_completes.send_replace(false);
    let (status, body) = completing.await.expect("task");
    assert_eq!(status, 200, "{body}");
    let path = fs_path(&body);
    assert!(std::path::Path::new(&path).exists());
}

/// Why, scenario "finalize checks magic bytes on a snapshot": a file registered and
/// completed while finalize is checking the others is not finalized unchecked. Here it is a
/// PDF declared as PNG, completed during the check: finalize answers 415 for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_never_passes_a_file_completed_during_its_check() {
    let redis = RedisServer::start();
    let gw = Arc::new(TestGateway::start(config(""), redis_store(&redis.url()).await).await);
    let s = session(&gw, json!({})).await;
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0";
    let first = uploaded(&gw, &s, "ok.png", png, Some("image/png")).await;
    assert_eq!(gw.complete(KEY_A, &s, &first).await.status(), 200);
    gw.counting.hold_reads.send_replace(true);
    let finalizing = tokio::spawn({
        let (gw, s) = (gw.clone(), s.clone());
        async move {
            let res = gw
                .req(Method::POST, &format!("/v1/sessions/{s}/finalize"), KEY_A)
                .send()
                .await
                .expect("send");
            (
                res.status().as_u16(),
                res.json::<Value>().await.expect("json"),
            )
        }
    });
    while gw.counting.reads.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let liar = uploaded(
        &gw,
        &s,
        "liar.png",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        Some("image/png"),
    )
    .await;
    assert_eq!(gw.complete(KEY_A, &s, &liar).await.status(), 200);
    gw.counting.hold_reads.send_replace(false);
    let (status, body) = finalizing.await.expect("task");
    assert_eq!(status, 415, "{body}");
    assert_eq!(body["code"], "contentTypeMismatch");
    assert_eq!(body["fileId"], json!(liar));
}

/// Why, scenario "fileKeys `a` and `a/b` in one session collide on filesystem storage": both
/// register, upload, complete and read back, each from an object of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_keys_that_nest_do_not_collide_on_the_filesystem() {
    let gw = memory_gateway(Timing::default()).await;
    let s = session(&gw, json!({})).await;
    let mut urls = Vec::new();
    for (key, bytes) in [("a", &b"outer"[..]), ("a/b", &b"inner"[..])] {
        let f = gw
            .register_json(
                KEY_A,
                &s,
                json!({"fileName": "x.bin", "fileKey": key, "sizeBytes": bytes.len()}),
            )
            .await;
        let id = f["fileId"]
            .as_str()
            .unwrap_or_else(|| panic!("{f}"))
            .to_owned();
        assert_eq!(
            gw.put_part(KEY_A, &s, &id, 1, bytes.to_vec())
                .await
                .status(),
            200
        );
        let res = gw.complete(KEY_A, &s, &id).await;
        assert_eq!(res.status(), 200, "{key}");
        let done: Value = res.json().await.expect("json");
        urls.push(done["fileUrl"].as_str().expect("fileUrl").to_owned());
    }
    let (outer, inner) = (urls[0].clone(), urls[1].clone());
    let read =
        |url: &str| std::fs::read(url.strip_prefix("file://").expect("file url")).expect("object");
    assert_eq!(read(&outer), b"outer");
    assert_eq!(read(&inner), b"inner");
    let res = gw
        .req(Method::POST, &format!("/v1/sessions/{s}/finalize"), KEY_A)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
}

/// Why, scenario "the edge timeout can cut `abort_uploads` halfway through a large
/// session": a session `DELETE` whose storage calls outlast the request timeout (S3 stalls)
/// is cut by the edge with 503; the cleanups stay queued, and once S3 answers again one
/// reaper pass leaves nothing of the session in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_delete_cut_by_the_request_timeout_is_finished_by_the_reaper() {
    let S3Rig {
        s3,
        proxy,
        gw,
        _redis,
    } = s3_rig("request_timeout_seconds = 1\n").await;
    let s = session(&gw, json!({})).await;
    for i in 0..12 {
        let name = format!("f{i}.bin");
        if i % 2 == 0 {
            completed(&gw, &s, &name, &[i as u8; 100]).await;
        } else {
            uploaded(&gw, &s, &name, &[i as u8; 100], None).await;
        }
    }
    let prefix = format!("{S3_PREFIX}/a/{s}/");
    assert_eq!(s3_open_uploads(&s3, &prefix).await, 6);
    proxy.set(Fault::Stall);
    let res = delete(&gw, &format!("/v1/sessions/{s}")).await;
    assert_eq!(res.status(), 503, "cut by the 1 s request timeout");
    assert!(res.headers().contains_key("retry-after"));
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(250)).await;
    gw.state.uploads.reap_pass().await.expect("reap pass");
    assert_eq!(
        s3_open_uploads(&s3, &prefix).await,
        0,
        "every upload aborted"
    );
    let objects = s3
        .client()
        .list_objects_v2()
        .bucket(s3.bucket())
        .prefix(&prefix)
        .send()
        .await
        .expect("ListObjectsV2");
    assert_eq!(objects.key_count(), Some(0), "every object deleted");
}
