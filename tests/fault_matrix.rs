//! The fault matrix of issue 11: for each step of register, part, complete, delete (file and
//! session), finalize and reap, Redis or S3 fails at that step: refused, stalled past the
//! timeout, or cut mid-stream, through the testkit's fault proxy. Every client answer is a
//! success or a retryable 503 with `Retry-After`; once the fault is gone, the step's retry
//! succeeds, and after a reaper pass storage and the store agree:
//! - no object exists that the store does not show as completed,
//! - no multipart upload is open for a deleted, expired or aborted file,
//! - no completed file lacks its object.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use upgate::model::{FileStatus, SessionStatus};
use upgate::store::{Gate, Page};
use upgate::uploads::Timing;
use upgate_testkit::fault::{Fault, FaultProxy};
use upgate_testkit::s3::S3Server;
use upgate_testkit::RedisServer;

const S3_PREFIX: &str = "pfx";

/// The tests of this file run one at a time: each checks timings of faults (a stall past
/// the timeout, leases running out) that two others on the same two cores would stretch.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Redis,
    S3,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Register,
    Part,
    Complete,
    DeleteFile,
    DeleteSession,
    Finalize,
    Reap,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Refuse,
    Stall,
    Cut,
}

struct Rig {
    s3: S3Server,
    _redis: RedisServer,
    redis_proxy: FaultProxy,
    s3_proxy: FaultProxy,
    gw: TestGateway,
}

impl Rig {
    async fn start() -> Rig {
        let s3 = S3Server::start("uploads");
        let redis = RedisServer::start();
        let redis_proxy =
            FaultProxy::start(format!("127.0.0.1:{}", redis.port()).parse().expect("addr")).await;
        let s3_proxy = FaultProxy::start(s3.addr()).await;
        let storage = s3_through(&s3, &s3_proxy, S3_PREFIX);
        let mut cfg = config("redis_timeout_ms = 500\n");
        cfg.redis = Some(upgate::config::RedisTarget::Single(format!(
            "redis://{}",
            redis_proxy.addr()
        )));
        let store = upgate::build_store(&cfg).await.expect("store");
        let gw = TestGateway::start_timed(
            cfg,
            store,
            CountingStorage::new(Arc::new(storage)),
            std::env::temp_dir(),
            None,
            Timing {
                cleanup_retry: Duration::from_millis(100),
                complete_lease: Duration::from_secs(3),
                complete_renew: Duration::from_secs(1),
                ..Timing::default()
            },
        )
        .await;
        Rig {
            s3,
            _redis: redis,
            redis_proxy,
            s3_proxy,
            gw,
        }
    }

    fn fault(&self, target: Target, kind: Kind, step: Step) {
        let fault = match (kind, target, step) {
            (Kind::Refuse, ..) => Fault::Refuse,
            (Kind::Stall, ..) => Fault::Stall,
            (Kind::Cut, Target::Redis, _) => Fault::CutResponseAfter(3),
            (Kind::Cut, Target::S3, Step::Part) => Fault::CutRequestAfter(600),
            (Kind::Cut, Target::S3, _) => Fault::CutResponseAfter(20),
        };
        match target {
            Target::Redis => self.redis_proxy.set(fault),
            Target::S3 => self.s3_proxy.set(fault),
        }
    }

    fn heal(&self) {
        self.redis_proxy.set(Fault::Pass);
        self.s3_proxy.set(Fault::Pass);
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (u16, bool, Value) {
        let mut req = self.gw.req(method, path, KEY_A);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("send");
        let status = res.status().as_u16();
        let retry_after = res.headers().contains_key("retry-after");
        let body = res.json::<Value>().await.unwrap_or(Value::Null);
        (status, retry_after, body)
    }

    async fn put(&self, s: &str, f: &str, bytes: Vec<u8>) -> (u16, bool, Value) {
        let res = self.gw.put_part(KEY_A, s, f, 1, bytes).await;
        let status = res.status().as_u16();
        let retry_after = res.headers().contains_key("retry-after");
        (
            status,
            retry_after,
            res.json::<Value>().await.unwrap_or(Value::Null),
        )
    }
}

const SIZE: usize = 1000;

/// The state a step starts from: a session, and for the later steps a file at the stage
/// the step needs.
struct Case {
    session: String,
    file: Option<String>,
}

async fn prepare(rig: &Rig, step: Step) -> Case {
    let ttl = if step == Step::Reap { 3 } else { 1800 };
    let created = std::time::Instant::now();
    let (status, _, s) = rig
        .send(
            Method::POST,
            "/v1/sessions",
            Some(json!({"ttlSeconds": ttl})),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    let session = s["sessionId"].as_str().expect("id").to_owned();
    if step == Step::Register {
        return Case {
            session,
            file: None,
        };
    }
    let (status, _, f) = rig
        .send(
            Method::POST,
            &format!("/v1/sessions/{session}/files"),
            Some(json!({"fileName": "f.bin", "sizeBytes": SIZE, "contentType": "application/octet-stream"})),
        )
        .await;
    assert_eq!(status, 201, "{f}");
    let file = f["fileId"].as_str().expect("id").to_owned();
    if step != Step::Part {
        assert_eq!(rig.put(&session, &file, vec![9; SIZE]).await.0, 200);
    }
    if matches!(step, Step::DeleteFile | Step::Finalize) {
        assert_eq!(rig.gw.complete(KEY_A, &session, &file).await.status(), 200);
    }
    if step == Step::DeleteSession {
        // One completed file and one open upload.
        assert_eq!(rig.gw.complete(KEY_A, &session, &file).await.status(), 200);
        let (_, _, g) = rig
            .send(
                Method::POST,
                &format!("/v1/sessions/{session}/files"),
                Some(json!({"fileName": "open.bin", "sizeBytes": SIZE})),
            )
            .await;
        let open = g["fileId"].as_str().expect("id").to_owned();
        assert_eq!(rig.put(&session, &open, vec![8; SIZE]).await.0, 200);
    }
    if step == Step::Reap {
        let expiry = created + Duration::from_millis(3_100);
        assert!(
            std::time::Instant::now() < expiry,
            "preparing took longer than the TTL"
        );
        tokio::time::sleep_until(expiry.into()).await;
    }
    Case {
        session,
        file: Some(file),
    }
}

/// Runs the step once; `Ok` on success, `Err(retryable)` otherwise.
async fn run_step(rig: &Rig, step: Step, case: &Case, attempt: usize) -> Result<(), bool> {
    let s = &case.session;
    let f = case.file.as_deref().unwrap_or("");
    let (status, retry_after, body) = match step {
        Step::Register => {
            rig.send(
                Method::POST,
                &format!("/v1/sessions/{s}/files"),
                Some(json!({"fileName": "r.bin", "sizeBytes": SIZE})),
            )
            .await
        }
        Step::Part => rig.put(s, f, vec![7; SIZE]).await,
        Step::Complete => {
            rig.send(
                Method::POST,
                &format!("/v1/sessions/{s}/files/{f}/complete"),
                Some(json!({})),
            )
            .await
        }
        Step::DeleteFile => {
            rig.send(Method::DELETE, &format!("/v1/sessions/{s}/files/{f}"), None)
                .await
        }
        Step::DeleteSession => {
            rig.send(Method::DELETE, &format!("/v1/sessions/{s}"), None)
                .await
        }
        Step::Finalize => {
            rig.send(Method::POST, &format!("/v1/sessions/{s}/finalize"), None)
                .await
        }
        Step::Reap => {
            return rig
                .gw
                .state
                .uploads
                .reap_pass()
                .await
                .map(drop)
                .map_err(|_| true);
        }
    };
    let done = match (step, status) {
        (_, 200..=299) => true,
        // A registration whose reply was lost ran: its retry finds the key taken.
        (Step::Register, 409) if attempt > 0 && body["code"] == "duplicateFileKey" => true,
        // A finalize whose reply was lost ran.
        (Step::Finalize, 409) if attempt > 0 && body["sessionStatus"] == "finalized" => true,
        _ => false,
    };
    if done {
        return Ok(());
    }
    assert!(
        status == 503 && retry_after,
        "{step:?}: not a retryable answer: {status} {body}"
    );
    Err(true)
}

/// Storage and the store agree about the case's session.
async fn check(rig: &Rig, label: &str, case: &Case) {
    let now = upgate::model::now_ms();
    let view = match rig
        .gw
        .state
        .store
        .get_session("a", &case.session, Page::FIRST, now)
        .await
        .expect("store")
    {
        Gate::Ok(v) => Some(v),
        Gate::Expired(info) => {
            // Read the files through reap (no gate).
            let r = rig
                .gw
                .state
                .store
                .reap("a", &case.session, now)
                .await
                .expect("reap");
            let _ = info;
            r.map(|r| upgate::store::SessionView {
                session: r.session,
                files: Vec::new(),
                next_cursor: None,
            })
        }
        other => panic!("{label}: {other:?}"),
    };
    let view = view.expect("session");
    let expired = view.session.status == SessionStatus::Expired;
    let files: HashMap<String, (FileStatus, bool)> = view
        .files
        .iter()
        .map(|f| {
            (
                f.object_key.clone(),
                (f.status, view.session.status == SessionStatus::Active),
            )
        })
        .collect();
    let prefix = format!("{S3_PREFIX}/a/{}/", case.session);
    let client = rig.s3.client();
    let objects = client
        .list_objects_v2()
        .bucket(rig.s3.bucket())
        .prefix(&prefix)
        .send()
        .await
        .expect("ListObjectsV2");
    let object_keys: Vec<String> = objects
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    for key in &object_keys {
        let status = files.get(key).map(|(s, _)| *s);
        assert!(
            expired || status == Some(FileStatus::Completed),
            "{label}: object {key} but the store says {status:?}"
        );
    }
    let uploads = client
        .list_multipart_uploads()
        .bucket(rig.s3.bucket())
        .prefix(&prefix)
        .send()
        .await
        .expect("ListMultipartUploads");
    for u in uploads.uploads() {
        let key = u.key().unwrap_or_default();
        let live = files.get(key).is_some_and(|(s, active)| {
            *active && matches!(s, FileStatus::Registered | FileStatus::Completing)
        });
        assert!(
            live && !expired,
            "{label}: upload open for {key} ({:?})",
            files.get(key)
        );
    }
    for (key, (status, _)) in &files {
        if *status == FileStatus::Completed && view.session.status != SessionStatus::Aborted {
            assert!(
                object_keys.contains(key),
                "{label}: completed file {key} has no object"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_survives_every_fault() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let steps = [
        Step::Register,
        Step::Part,
        Step::Complete,
        Step::DeleteFile,
        Step::DeleteSession,
        Step::Finalize,
        Step::Reap,
    ];
    let mut cases = 0;
    let mut faulted = 0;
    for target in [Target::Redis, Target::S3] {
        for step in steps {
            for kind in [Kind::Refuse, Kind::Stall, Kind::Cut] {
                let label = format!("{target:?}/{step:?}/{kind:?}");
                if std::env::var("MATRIX_ONLY").is_ok_and(|only| !label.contains(&only)) {
                    continue;
                }
                let case = prepare(&rig, step).await;
                rig.fault(target, kind, step);
                let first = match tokio::time::timeout(
                    Duration::from_secs(15),
                    run_step(&rig, step, &case, 0),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => {
                        let buf = logs().lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let text = String::from_utf8_lossy(&buf);
                        let tail: Vec<&str> = text.lines().rev().take(30).collect();
                        panic!(
                            "{label}: hung; last logs:\n{}",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        );
                    }
                };
                rig.heal();
                let first_failed = first.is_err();
                // Registration never touches storage; a DELETE with storage down queues the
                // cleanup and answers 204; the reaper reschedules what storage refused.
                let reaches_client = target == Target::Redis
                    || matches!(step, Step::Part | Step::Complete | Step::Finalize);
                assert_eq!(first_failed, reaches_client, "{label}: {first:?}");
                if first_failed {
                    faulted += 1;
                }
                let mut attempt = 1;
                let mut outcome = first;
                while outcome.is_err() {
                    assert!(attempt < 20, "{label}: the retry never succeeded");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    outcome = run_step(&rig, step, &case, attempt).await;
                    attempt += 1;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
                let mut passes = 0;
                while rig.gw.state.uploads.reap_pass().await.is_err() {
                    passes += 1;
                    assert!(passes < 20, "{label}: the reaper never recovered");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                eprintln!(
                    "  first answer faulted: {}, attempts: {attempt}",
                    first_failed
                );
                check(&rig, &label, &case).await;
                cases += 1;
            }
        }
    }
    println!("{cases} cases, {faulted} saw the fault as a retryable error");
    if std::env::var("MATRIX_ONLY").is_err() {
        assert_eq!(cases, 42);
    }
    assert!(
        faulted >= 30,
        "most faults must reach the client: {faulted}"
    );
}

/// A tus request on `url` with tenant `a`'s key.
fn tus_req(rig: &Rig, method: Method, url: &str) -> reqwest::RequestBuilder {
    rig.gw
        .client
        .request(method, url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "1.0.0")
}

/// A new tus upload of `data`'s length with its first MiB sent; its URL.
async fn tus_started(rig: &Rig, label: &str, data: &[u8]) -> String {
    let res = tus_req(rig, Method::POST, &rig.gw.url("/v1/tus"))
        .header("upload-length", data.len().to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(res.status(), 201, "{label}");
    let url = rig
        .gw
        .url(res.headers()["location"].to_str().expect("location"));
    let res = tus_req(rig, Method::PATCH, &url)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(data[..1024 * 1024].to_vec())
        .send()
        .await
        .expect("first chunk");
    assert_eq!(res.status(), 204, "{label}");
    url
}

/// The upload's offset once HEAD answers again after a fault (the last logs if it never
/// does).
async fn tus_offset(rig: &Rig, url: &str, label: &str) -> usize {
    let mut last = 0;
    for _ in 0..100 {
        let res = tus_req(rig, Method::HEAD, url).send().await.expect("head");
        last = res.status().as_u16();
        if last == 200 {
            return res.headers()["upload-offset"]
                .to_str()
                .ok()
                .and_then(|o| o.parse().ok())
                .expect("an offset");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let buf = logs().lock().unwrap_or_else(|e| e.into_inner()).clone();
    let text = String::from_utf8_lossy(&buf);
    let tail: Vec<&str> = text.lines().rev().take(12).collect();
    panic!(
        "{label}: HEAD never answered 200 ({last}); last logs:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Resumes the upload from `offset` in `chunk`-sized PATCHes (retrying 423 while a lock
/// the fault left runs out), then checks the file is completed and its object is `data`.
async fn tus_resume_and_check(
    rig: &Rig,
    url: &str,
    label: &str,
    mut offset: usize,
    data: &[u8],
    chunk: usize,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while offset < data.len() {
        let end = (offset + chunk).min(data.len());
        let res = tus_req(rig, Method::PATCH, url)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .body(data[offset..end].to_vec())
            .send()
            .await;
        // An answer before the body was read (423 while a lock runs out) can reach the
        // client as a broken pipe: a tus client retries it, as this does.
        let res = match res {
            Ok(res) => res,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("{label}: resume: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => panic!("{label}: resume: {e}"),
        };
        match res.status().as_u16() {
            204 => offset = end,
            423 if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            s => panic!("{label}: {s} {:?}", res.text().await),
        }
    }
    let res = tus_req(rig, Method::HEAD, url).send().await.expect("head");
    let id = |name: &str| res.headers()[name].to_str().expect("an id").to_owned();
    let (s, f) = (id("upgate-session-id"), id("upgate-file-id"));
    let file = rig
        .gw
        .get_json(KEY_A, &format!("/v1/sessions/{s}/files/{f}"))
        .await;
    assert_eq!(file["status"], "completed", "{label}: {file}");
    assert_eq!(
        sha256_hex(&s3_object(&rig.s3, &file)),
        sha256_hex(data),
        "{label}"
    );
}

/// A tus PATCH of 6 MiB that crosses a part boundary (the tail in Redis joins the new bytes
/// into a part uploaded to S3), with Redis or S3 refused, stalled or cut: the answer is a
/// retryable 503; once the fault is gone HEAD answers an offset between the one before
/// and the chunk's end (it never goes back), the client resumes from it (retrying 423 while
/// a lock the fault left runs out) and the object is byte-identical, with nothing left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tus_patches_survive_every_fault() {
    let _serial = SERIAL.lock().await;
    const MIB: usize = 1024 * 1024;
    let rig = Rig::start().await;
    let data: Vec<u8> = (0..12 * MIB + 3)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    let tus = |method: Method, url: &str| tus_req(&rig, method, url);
    let patch = |url: String, offset: usize, end: usize| {
        tus(Method::PATCH, &url)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .body(data[offset..end].to_vec())
            .send()
    };
    for target in [Target::Redis, Target::S3] {
        for kind in [Kind::Refuse, Kind::Stall, Kind::Cut] {
            let label = format!("tus {target:?}/{kind:?}");
            let url = tus_started(&rig, &label, &data).await;

            rig.fault(target, kind, Step::Part);
            let faulted =
                tokio::time::timeout(Duration::from_secs(15), patch(url.clone(), MIB, 7 * MIB))
                    .await
                    .unwrap_or_else(|_| panic!("{label}: hung"));
            rig.heal();
            // The fault reaches the client: a retryable 503 (or the connection cut by a
            // client-side error), never a success that lost bytes.
            if let Ok(res) = faulted {
                let status = res.status().as_u16();
                assert!(
                    status == 503 && res.headers().contains_key("retry-after"),
                    "{label}: {status} {:?}",
                    res.text().await
                );
            }
            let offset = tus_offset(&rig, &url, &label).await;
            assert!(
                (MIB..=7 * MIB).contains(&offset),
                "{label}: the offset is {offset}"
            );
            tus_resume_and_check(&rig, &url, &label, offset, &data, 3 * MIB).await;
        }
    }
    assert_eq!(rig.s3.open_upload_count(), 0, "every upload was completed");
}

/// Redis fails in the middle of a tus PATCH, after its lock was taken: the next part is
/// stored in S3 and then recording it fails (refused, stalled, or the answer cut after the
/// script ran). The client gets a retryable 503; HEAD answers the offset before the PATCH,
/// or its end when the script ran; resuming from it (the part sent again replaces the
/// stored one) gives a byte-identical object.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_fault_mid_patch_after_a_part_is_stored() {
    let _serial = SERIAL.lock().await;
    const MIB: usize = 1024 * 1024;
    let rig = Rig::start().await;
    let data: Vec<u8> = (0..12 * MIB + 3)
        .map(|i| (i % 253) as u8 ^ (i >> 15) as u8)
        .collect();
    let tus = |method: Method, url: &str| tus_req(&rig, method, url);
    for kind in [Kind::Refuse, Kind::Stall, Kind::Cut] {
        let label = format!("mid-PATCH Redis/{kind:?}");
        let url = tus_started(&rig, &label, &data).await;
        // 1 MiB to 7 MiB in two pieces: the fault comes between them, before the part
        // boundary at 5 MiB.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|item| (item, rx))
        }));
        let req = tus(Method::PATCH, &url)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", MIB.to_string())
            .header("content-length", (6 * MIB).to_string())
            .body(body)
            .send();
        let sent = tokio::spawn(req);
        tx.send(Ok(data[MIB..3 * MIB].to_vec()))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.fault(Target::Redis, kind, Step::Part);
        tx.send(Ok(data[3 * MIB..7 * MIB].to_vec()))
            .await
            .expect("send");
        drop(tx);
        let res = tokio::time::timeout(Duration::from_secs(15), sent)
            .await
            .unwrap_or_else(|_| panic!("{label}: hung"))
            .expect("join")
            .expect("answer");
        rig.heal();
        assert_eq!(res.status(), 503, "{label}: {:?}", res.text().await);
        let offset = tus_offset(&rig, &url, &label).await;
        assert!(
            offset == MIB || offset == 7 * MIB,
            "{label}: the offset is {offset}"
        );
        tus_resume_and_check(&rig, &url, &label, offset, &data, 4 * MIB).await;
    }
    assert_eq!(rig.s3.open_upload_count(), 0, "every upload was completed");
}
