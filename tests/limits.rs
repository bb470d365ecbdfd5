//! Per-tenant limits and bounded waiting (`../shared/API.md` v1.1, "Limits every deployment
//! relies on"): metadata size, and completes waiting on a stalled completion.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt as _;
use reqwest::Method;
use serde_json::{json, Value};
use upgate_testkit::RedisServer;

/// Metadata of exactly `n` bytes as serialized JSON.
fn metadata_of(n: usize) -> Value {
    // {"k":"…"} is 8 bytes around the value.
    json!({ "k": "x".repeat(n - 8) })
}

async fn create(gw: &TestGateway, key: &str, metadata: Value) -> reqwest::Response {
    gw.req(Method::POST, "/v1/sessions", key)
        .json(&json!({ "metadata": metadata }))
        .send()
        .await
        .expect("send")
}

/// `max_metadata_bytes` (top level, default 16 KiB) with a tenant override: over it, 413
/// `payloadTooLarge` with `maxSizeBytes`; tenant A at its limit does not change tenant B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_metadata_is_bounded_per_tenant() {
    let mut cfg = config("");
    assert_eq!(cfg.tenants[1].max_metadata_bytes, 16 * 1024, "the default");
    cfg.tenants[0].max_metadata_bytes = 100;
    let gw = TestGateway::start(cfg, memory_store()).await;
    assert_eq!(create(&gw, KEY_A, metadata_of(100)).await.status(), 201);
    let p = problem(
        create(&gw, KEY_A, metadata_of(101)).await,
        413,
        "payloadTooLarge",
    )
    .await;
    assert_eq!(p["maxSizeBytes"], 100);
    assert_eq!(
        create(&gw, KEY_B, metadata_of(16 * 1024)).await.status(),
        201
    );
    let p = problem(
        create(&gw, KEY_B, metadata_of(16 * 1024 + 1)).await,
        413,
        "payloadTooLarge",
    )
    .await;
    assert_eq!(p["maxSizeBytes"], 16 * 1024);

    // The top-level setting applies to tenants without their own.
    let gw = TestGateway::start(config("max_metadata_bytes = 64\n"), memory_store()).await;
    assert_eq!(create(&gw, KEY_B, metadata_of(64)).await.status(), 201);
    problem(
        create(&gw, KEY_B, metadata_of(65)).await,
        413,
        "payloadTooLarge",
    )
    .await;
}

fn memory_store() -> Arc<dyn upgate::store::SessionStore> {
    Arc::new(upgate::store::memory::MemoryStore::new(
        Duration::from_secs(3600),
    ))
}

/// `EVALSHA` calls Redis has served so far (`INFO commandstats`).
async fn evalsha_calls(redis: &RedisServer) -> u64 {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// 200 concurrent completes of one file whose storage completion is stalled: the lease
/// holder waits on storage; up to 64 others wait a short while and the rest are refused at
/// once, all with 409 `requestInProgress` and `Retry-After`; none hangs, and the waiters'
/// polling of Redis stays bounded. Once storage answers, the holder and a retry get 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completes_waiting_on_a_stalled_completion_get_409_and_poll_boundedly() {
    let redis = RedisServer::start();
    let gw = Arc::new(TestGateway::start(config(""), redis_store(&redis.url()).await).await);
    let session = gw.session_id(KEY_A, json!({})).await;
    let f: Value = gw
        .register_json(
            KEY_A,
            &session,
            json!({"fileName": "s.bin", "sizeBytes": 1000}),
        )
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, vec![1; 1000])
            .await
            .status(),
        200
    );

    gw.counting.hold_completes.send_replace(true);
    let calls_before = evalsha_calls(&redis).await;
    let started = Instant::now();
    let mut pending: futures_util::stream::FuturesUnordered<_> = (0..200)
        .map(|_| {
            let gw = gw.clone();
            let (session, file) = (session.clone(), file.clone());
            tokio::spawn(async move {
                let res = gw.complete(KEY_A, &session, &file).await;
                let retry_after = res.headers().get("retry-after").is_some();
                let status = res.status().as_u16();
                let body: Value = res.json().await.expect("json");
                (status, retry_after, body)
            })
        })
        .collect();
    let mut refused = 0;
    while refused < 199 {
        let (status, retry_after, body) =
            tokio::time::timeout(Duration::from_secs(30), pending.next())
                .await
                .expect("a waiting complete hung")
                .expect("a result")
                .expect("task");
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("requestInProgress")),
            "{body}"
        );
        assert!(retry_after, "409 without Retry-After");
        refused += 1;
    }
    let window = started.elapsed();
    let calls = evalsha_calls(&redis).await - calls_before;
    println!("199 completes refused within {window:?}; {calls} EVALSHA calls meanwhile");
    // 64 waiters polling at most every 250 ms for 5 s, plus one call per complete.
    assert!(calls < 3_000, "{calls} Redis calls in {window:?}");
    assert_eq!(
        gw.state.uploads.waiting_files(),
        0,
        "waiter places given back"
    );

    gw.counting.hold_completes.send_replace(false);
    let (status, _, holder) = tokio::time::timeout(Duration::from_secs(30), pending.next())
        .await
        .expect("the holder finishes once storage answers")
        .expect("a result")
        .expect("task");
    assert_eq!(status, 200, "{holder}");
    let again = gw.complete(KEY_A, &session, &file).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["fileUrl"], holder["fileUrl"]);
}

/// A fileKey that filesystem storage could never store (a path segment over 255 bytes) is
/// refused at registration with 400 `validationFailed`, not later with a 503 on every part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_storage_would_refuse_are_refused_at_registration() {
    let gw = TestGateway::start(config(""), memory_store()).await;
    let session = gw.session_id(KEY_A, json!({})).await;
    let long = format!("dir/{}", "n".repeat(256));
    let res = gw
        .register(
            KEY_A,
            &session,
            json!({"fileName": "x", "fileKey": long, "sizeBytes": 1}),
        )
        .await;
    let p = problem(res, 400, "validationFailed").await;
    assert_eq!(p["errors"][0]["field"], "fileKey", "{p}");
    let ok = format!("dir/{}", "n".repeat(255));
    let res = gw
        .register(
            KEY_A,
            &session,
            json!({"fileName": "x", "fileKey": ok, "sizeBytes": 1}),
        )
        .await;
    assert_eq!(res.status(), 201);
}

/// Idempotency records keep only answers a retry would get again: a `fileCountExceeded`
/// (which a delete can change) is not replayed, a `validationFailed` is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dependent_rejections_are_not_replayed() {
    let gw = TestGateway::start(config(""), memory_store()).await;
    let session = gw.session_id(KEY_A, json!({"maxFiles": 1})).await;
    let first: Value = gw
        .register_json(KEY_A, &session, json!({"fileName": "a", "sizeBytes": 1}))
        .await;
    let path = format!("/v1/sessions/{session}/files");
    let with_key = |key: &'static str, body: Value| {
        gw.req(Method::POST, &path, KEY_A)
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let full = with_key("k-full", json!({"fileName": "b", "sizeBytes": 1}))
        .await
        .expect("send");
    problem(full, 400, "fileCountExceeded").await;
    let del = gw
        .req(
            Method::DELETE,
            &format!("{path}/{}", first["fileId"].as_str().expect("id")),
            KEY_A,
        )
        .send()
        .await
        .expect("send");
    assert_eq!(del.status(), 204);
    let retry = with_key("k-full", json!({"fileName": "b", "sizeBytes": 1}))
        .await
        .expect("send");
    assert_eq!(retry.status(), 201, "the retry ran again");
    assert!(retry.headers().get("idempotent-replayed").is_none());

    let bad = json!({"fileName": "", "sizeBytes": 1});
    let first_bad = with_key("k-bad", bad.clone()).await.expect("send");
    problem(first_bad, 400, "validationFailed").await;
    let again = with_key("k-bad", bad).await.expect("send");
    assert_eq!(again.status(), 400);
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
}

/// `max_active_sessions` (API.md v1.1): over it, 429 `quotaExceeded` with `limit`; a
/// deleted, a finalized and an expired session each free their place; another tenant's
/// count is its own. Real Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_sessions_are_bounded_per_tenant() {
    let redis = RedisServer::start();
    let mut cfg = config("");
    cfg.tenants[0].max_active_sessions = 3;
    let gw = TestGateway::start(cfg, redis_store(&redis.url()).await).await;
    let id = |v: Value| v["sessionId"].as_str().expect("sessionId").to_owned();
    // Short enough to wait for, long enough that the steps before the wait (slow on a
    // loaded machine) do not outlast it.
    let short_ttl = Duration::from_secs(4);
    let short_created = tokio::time::Instant::now();
    let short = id(gw
        .create_session(KEY_A, json!({"ttlSeconds": short_ttl.as_secs()}))
        .await);
    let deleted = id(gw.create_session(KEY_A, json!({})).await);
    let finalized = id(gw.create_session(KEY_A, json!({})).await);
    let p = problem(create(&gw, KEY_A, json!({})).await, 429, "quotaExceeded").await;
    assert_eq!(p["limit"], 3);
    assert_eq!(
        create(&gw, KEY_B, json!({})).await.status(),
        201,
        "tenant b counts apart"
    );

    let res = gw
        .req(Method::DELETE, &format!("/v1/sessions/{deleted}"), KEY_A)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 204);
    assert_eq!(
        create(&gw, KEY_A, json!({})).await.status(),
        201,
        "freed by DELETE"
    );
    problem(create(&gw, KEY_A, json!({})).await, 429, "quotaExceeded").await;

    let res = gw
        .req(
            Method::POST,
            &format!("/v1/sessions/{finalized}/finalize"),
            KEY_A,
        )
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(
        create(&gw, KEY_A, json!({})).await.status(),
        201,
        "freed by finalize"
    );
    problem(create(&gw, KEY_A, json!({})).await, 429, "quotaExceeded").await;

    // `expiresAt` is whole seconds: past it, whichever way it was rounded.
    tokio::time::sleep_until(short_created + short_ttl + Duration::from_millis(1_100)).await;
    let _ = short;
    assert_eq!(
        create(&gw, KEY_A, json!({})).await.status(),
        201,
        "freed by expiry"
    );
    problem(create(&gw, KEY_A, json!({})).await, 429, "quotaExceeded").await;
}

/// Tenant a at every one of its quotas at once (live sessions, files per session, metadata,
/// part uploads in flight, request rate) gets each quota's refusal; tenant b, on the same
/// gateway and Redis, meanwhile does a whole upload with its own limits untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_every_quota_leaves_the_other_tenant_whole() {
    let redis = RedisServer::start();
    let mut cfg = config("");
    {
        let a = &mut cfg.tenants[0];
        a.max_active_sessions = 2;
        a.max_files_per_session = 1;
        a.max_metadata_bytes = 64;
        a.max_concurrent_uploads = 1;
        a.rate_limit.requests_per_second = 1;
        a.rate_limit.burst = 12;
    }
    let gw = TestGateway::start(cfg, redis_store(&redis.url()).await).await;
    let id = |v: &Value, k: &str| v[k].as_str().unwrap_or_else(|| panic!("{v}")).to_owned();

    // Sessions and files: at the limits.
    let s1 = id(&gw.create_session(KEY_A, json!({})).await, "sessionId");
    id(&gw.create_session(KEY_A, json!({})).await, "sessionId");
    problem(create(&gw, KEY_A, json!({})).await, 429, "quotaExceeded").await;
    problem(
        create(&gw, KEY_A, metadata_of(65)).await,
        413,
        "payloadTooLarge",
    )
    .await;
    let f = gw
        .register_json(KEY_A, &s1, json!({"fileName": "a.bin", "sizeBytes": 8}))
        .await;
    let file = id(&f, "fileId");
    problem(
        gw.register(KEY_A, &s1, json!({"fileName": "b.bin", "sizeBytes": 8}))
            .await,
        400,
        "fileCountExceeded",
    )
    .await;
    // One part upload in flight (its body trickles): a second one is refused.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    let slow = {
        let req = gw
            .req(
                Method::PUT,
                &format!("/v1/sessions/{s1}/files/{file}/parts/1"),
                KEY_A,
            )
            .header("content-length", "8")
            .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)));
        tokio::spawn(async move { req.send().await.expect("send").status().as_u16() })
    };
    tx.send(Ok(bytes::Bytes::from_static(b"1234")))
        .await
        .expect("chunk");
    tokio::time::sleep(Duration::from_millis(200)).await;
    problem(
        gw.put_part(KEY_A, &s1, &file, 1, b"12345678".to_vec())
            .await,
        429,
        "tooManyConcurrentUploads",
    )
    .await;
    // Rate: the burst of 12 is spent within these requests.
    let mut limited = false;
    for _ in 0..20 {
        let res = gw
            .req(Method::GET, &format!("/v1/sessions/{s1}"), KEY_A)
            .send()
            .await
            .expect("send");
        if res.status() == 429 {
            assert_eq!(
                problem(res, 429, "rateLimited").await["code"],
                "rateLimited"
            );
            limited = true;
            break;
        }
    }
    assert!(limited, "tenant a was never rate limited");

    // Tenant b: a whole upload, with its default limits.
    let s = id(
        &gw.create_session(KEY_B, json!({"metadata": metadata_of(16 * 1024)}))
            .await,
        "sessionId",
    );
    let mut files = Vec::new();
    for name in ["x.bin", "y.bin"] {
        let f = gw
            .register_json(KEY_B, &s, json!({"fileName": name, "sizeBytes": 8}))
            .await;
        files.push(id(&f, "fileId"));
    }
    for f in &files {
        assert_eq!(
            gw.put_part(KEY_B, &s, f, 1, b"abcdefgh".to_vec())
                .await
                .status(),
            200
        );
        assert_eq!(gw.complete(KEY_B, &s, f).await.status(), 200);
    }
    let res = gw
        .req(Method::POST, &format!("/v1/sessions/{s}/finalize"), KEY_B)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);

    // Tenant a's slow upload still finishes.
    tx.send(Ok(bytes::Bytes::from_static(b"5678")))
        .await
        .expect("chunk");
    drop(tx);
    assert_eq!(slow.await.expect("task"), 200);
}

/// A stream over an mpsc receiver (the body of a part that trickles in).
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `MEMORY USAGE` summed over every Redis key of `session`, and how many keys there are.
async fn session_memory(redis: &RedisServer, session: &str) -> (u64, usize) {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0_u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{session}}}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut bytes = 0;
    for key in &keys {
        let used: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .query_async(&mut con)
            .await
            .expect("MEMORY USAGE");
        bytes += used.unwrap_or(0);
    }
    (bytes, keys.len())
}

/// 10,000 register/delete cycles in one session (every tenth file with a part uploaded, so
/// its storage upload is aborted by the delete): GET session lists only the live files, and
/// the session's Redis memory (`MEMORY USAGE` over its keys) and key count are what they
/// were after the first 100 cycles: a deleted file costs nothing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_delete_cycles_leave_nothing_behind() {
    const CYCLES: usize = 10_000;
    const WORKERS: usize = 8;
    let redis = RedisServer::start();
    let gw = Arc::new(TestGateway::start(config(""), redis_store(&redis.url()).await).await);
    let session = gw.session_id(KEY_A, json!({})).await;
    let mut live = Vec::new();
    for name in ["keep-1", "keep-2", "keep-3"] {
        live.push(gw.register_id(KEY_A, &session, name, 10).await);
    }
    let cycle = |worker: usize, from: usize, to: usize| {
        let (gw, session) = (gw.clone(), session.clone());
        async move {
            for i in (from..to).filter(|i| i % WORKERS == worker) {
                let id = gw
                    .register_id(KEY_A, &session, &format!("cycle-{i}.bin"), 4)
                    .await;
                if i % 10 == 0 {
                    let res = gw.put_part(KEY_A, &session, &id, 1, vec![7; 4]).await;
                    assert_eq!(res.status(), 200);
                }
                let res = gw
                    .req(
                        Method::DELETE,
                        &format!("/v1/sessions/{session}/files/{id}"),
                        KEY_A,
                    )
                    .send()
                    .await
                    .expect("send");
                assert_eq!(res.status(), 204, "cycle {i}");
            }
        }
    };
    futures_util::future::join_all((0..WORKERS).map(|w| cycle(w, 0, 100))).await;
    let (after_100, keys_100) = session_memory(&redis, &session).await;
    futures_util::future::join_all((0..WORKERS).map(|w| cycle(w, 100, CYCLES))).await;
    let (after_all, keys_all) = session_memory(&redis, &session).await;

    let v = gw.get_json(KEY_A, &format!("/v1/sessions/{session}")).await;
    let listed: Vec<&str> = v["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["fileId"].as_str().expect("fileId"))
        .collect();
    assert_eq!(listed, live, "only the live files, in registration order");
    assert_eq!(v["fileCount"], 3);
    assert_eq!(v["filesNextCursor"], Value::Null);
    // The session hash, the fileKey index, the order set and three files' hashes.
    assert_eq!(
        keys_all, keys_100,
        "no key left behind by the deleted files"
    );
    assert_eq!(keys_all, 6);
    eprintln!("session memory: {after_100} B after 100 cycles, {after_all} B after {CYCLES}");
    assert!(
        after_all <= after_100 + 256,
        "session memory grew from {after_100} to {after_all} bytes"
    );
    // Nothing of the deleted files' uploads is left in storage either.
    let leftovers = walkdir_count(&gw.storage_dir);
    assert_eq!(leftovers, 0, "storage holds nothing of the deleted files");
}

/// Regular files under `dir`.
fn walkdir_count(dir: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                n += 1;
            }
        }
    }
    n
}

/// `GET /v1/sessions/{id}/files?limit=&cursor=` pages through the files in registration
/// order; `GET /v1/sessions/{id}` carries `filesNextCursor`; bad parameters are 400
/// `validationFailed` naming each field; another tenant's session is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_paged_over_http() {
    let gw = TestGateway::start(config(""), memory_store()).await;
    let session = gw.session_id(KEY_A, json!({})).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(gw.register_id(KEY_A, &session, &format!("f{i}"), 1).await);
    }
    let get = |path: String, key: &'static str| {
        let req = gw.req(Method::GET, &path, key);
        async move { req.send().await.expect("send") }
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=2&cursor={c}"),
            None => "?limit=2".to_owned(),
        };
        let res = get(format!("/v1/sessions/{session}/files{q}"), KEY_A).await;
        assert_eq!(res.status(), 200);
        let page: Value = res.json().await.expect("json");
        pages += 1;
        for f in page["files"].as_array().expect("files") {
            seen.push(f["fileId"].as_str().expect("fileId").to_owned());
        }
        match &page["nextCursor"] {
            Value::Null => break,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("nextCursor {other:?}"),
        }
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);
    let whole = gw.get_json(KEY_A, &format!("/v1/sessions/{session}")).await;
    assert_eq!(whole["files"].as_array().map(Vec::len), Some(5));
    assert_eq!(whole["filesNextCursor"], Value::Null);

    let p = problem(
        get(
            format!("/v1/sessions/{session}/files?limit=0&cursor=x"),
            KEY_A,
        )
        .await,
        400,
        "validationFailed",
    )
    .await;
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["field"].as_str().expect("field"))
        .collect();
    assert_eq!(fields, vec!["limit", "cursor"]);
    problem(
        get(format!("/v1/sessions/{session}/files?limit=1001"), KEY_A).await,
        400,
        "validationFailed",
    )
    .await;
    problem(
        get(format!("/v1/sessions/{session}/files"), KEY_B).await,
        404,
        "sessionNotFound",
    )
    .await;
}
