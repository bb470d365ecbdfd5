//! End-to-end tests of the HTTP contract (`../shared/API.md`) against real servers on port 0,
//! run unchanged against every session store: in-memory, a real redis-server, and a real
//! 3-master Redis Cluster, each Redis also over TLS (`rediss://`, certificates generated per
//! test, verified against their CA through `redis_ca_file`).

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use upgate::store::SessionStore;

/// A session store per backend. Redis tests each start their own redis-server (or cluster).
enum Backend {
    Memory,
    Redis(upgate_testkit::RedisServer),
    Cluster(upgate_testkit::RedisCluster),
    TlsRedis(upgate_testkit::tls::TlsRedis),
    TlsCluster(upgate_testkit::tls::TlsRedisCluster),
}

impl Backend {
    fn memory() -> Self {
        Backend::Memory
    }

    fn redis() -> Self {
        Backend::Redis(upgate_testkit::RedisServer::start())
    }

    fn cluster() -> Self {
        Backend::Cluster(upgate_testkit::RedisCluster::start(3))
    }

    fn tls_redis() -> Self {
        Backend::TlsRedis(upgate_testkit::tls::TlsRedis::start())
    }

    fn tls_cluster() -> Self {
        Backend::TlsCluster(upgate_testkit::tls::TlsRedisCluster::start(3))
    }

    async fn store(&self) -> Arc<dyn SessionStore> {
        let over_tls = |target, ca: &std::path::Path| {
            let mut cfg = config("");
            cfg.redis = Some(target);
            cfg.redis_ca = Some(std::fs::read(ca).expect("ca.pem"));
            // The scenarios run in parallel on shared cores, each TLS cluster with three
            // servers of its own: the 2 s default command timeout was once reached there under
            // 200 concurrent registrations (a 503). The scenarios check atomicity, not latency.
            cfg.redis_timeout = Duration::from_secs(10);
            cfg
        };
        match self {
            Backend::TlsRedis(server) => {
                let cfg = over_tls(
                    upgate::config::RedisTarget::Single(server.url(None)),
                    &server.certs.ca_file(),
                );
                upgate::build_store(&cfg)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
            Backend::TlsCluster(cluster) => {
                let cfg = over_tls(
                    upgate::config::RedisTarget::Cluster(cluster.urls()),
                    &cluster.certs.ca_file(),
                );
                upgate::build_store(&cfg)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
            Backend::Memory => Arc::new(upgate::store::memory::MemoryStore::new(
                Duration::from_secs(3600),
            )),
            Backend::Redis(server) => redis_store(&server.url()).await,
            Backend::Cluster(cluster) => {
                let mut cfg = config("");
                cfg.redis = Some(upgate::config::RedisTarget::Cluster(cluster.urls()));
                upgate::build_store(&cfg)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
        }
    }
}

async fn gateway(backend: &Backend) -> TestGateway {
    TestGateway::start(config(""), backend.store().await).await
}

/// Runs each scenario against both stores.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::memory()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::redis()).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::cluster()).await;
                }
            )*
        }
        mod redis_tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::tls_redis()).await;
                }
            )*
        }
        mod redis_cluster_tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::tls_cluster()).await;
                }
            )*
        }
    };
}

on_every_store!(
    happy_path_create_register_upload_complete_finalize,
    concurrent_registrations_respect_max_files,
    concurrent_registrations_of_one_key_admit_exactly_one,
    concurrent_completes_complete_storage_once,
    expired_session_answers_410_everywhere_and_logs_once,
    other_tenants_sessions_are_404_on_every_endpoint,
    error_table_rows,
    aborting_a_file_frees_its_key_and_slot,
    file_metadata_is_kept_and_bounded,
    deleting_a_session_aborts_uploads_and_is_repeatable,
    finalize_checks_magic_bytes,
    resume_lists_uploaded_parts,
    zero_byte_file_completes_without_parts,
);

async fn zero_byte_file_completes_without_parts(backend: Backend) {
    let gw = gateway(&backend).await;
    let session = sid(&gw.create_session(KEY_A, json!({})).await);
    let f: Value = gw
        .register_json(
            KEY_A,
            &session,
            json!({"fileName": "empty.txt", "sizeBytes": 0}),
        )
        .await;
    assert_eq!(f["partCount"], 1);
    let file = f["fileId"].as_str().expect("id").to_owned();
    let done = gw.complete(KEY_A, &session, &file).await;
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.expect("json");
    let path = done["fileUrl"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .expect("url")
        .to_owned();
    assert_eq!(std::fs::read(path).expect("object").len(), 0);
    // An explicit empty part works too.
    let f: Value = gw
        .register_json(
            KEY_A,
            &session,
            json!({"fileName": "empty2.txt", "sizeBytes": 0}),
        )
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, Vec::new())
            .await
            .status(),
        200
    );
    assert_eq!(gw.complete(KEY_A, &session, &file).await.status(), 200);
}

/// `n` registrations sent at once (request `i` has body `body(i)`): (status, JSON body) each.
async fn register_concurrently(
    gw: &Arc<TestGateway>,
    session: &str,
    n: usize,
    body: impl Fn(usize) -> Value,
) -> Vec<(u16, Value)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (gw, session, body) = (gw.clone(), session.to_owned(), body(i));
            tokio::spawn(async move {
                let res = gw.register(KEY_A, &session, body).await;
                let status = res.status().as_u16();
                (status, res.json::<Value>().await.expect("json"))
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Sleeps until the RFC 3339 instant `at` (a session's `expiresAt`) is in the past.
async fn sleep_past(at: &Value) {
    let at = time::OffsetDateTime::parse(
        at.as_str().expect("expiresAt"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339 expiresAt");
    let left = at - time::OffsetDateTime::now_utc();
    let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
    tokio::time::sleep(left + Duration::from_millis(150)).await;
}

fn sid(v: &Value) -> String {
    v["sessionId"].as_str().expect("sessionId").to_owned()
}

async fn happy_path_create_register_upload_complete_finalize(backend: Backend) {
    let gw = gateway(&backend).await;
    let s = gw
        .create_session(KEY_A, json!({"maxFiles": 3, "metadata": {"order": 7}}))
        .await;
    assert_eq!(s["status"], "active");
    assert_eq!(s["partSizeBytes"], 5 * 1024 * 1024);
    assert_eq!(s["maxFiles"], 3);
    assert_eq!(s["fileCount"], 0);
    assert_eq!(s["metadata"], json!({"order": 7}));
    assert!(s["expiresAt"].as_str().expect("expiresAt").ends_with('Z'));
    let session = sid(&s);

    // 6 MiB + 3 bytes: two parts, 5 MiB and the remainder.
    let size = 6 * 1024 * 1024 + 3;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let res = gw
        .register(KEY_A, &session, json!({"fileName": "a.bin", "fileKey": "dir/a.bin", "sizeBytes": size, "contentType": "application/octet-stream"}))
        .await;
    assert_eq!(res.status(), 201);
    let f: Value = res.json().await.expect("json");
    assert_eq!(f["status"], "registered");
    assert_eq!(f["partCount"], 2);
    assert_eq!(f["fileKey"], "dir/a.bin");
    assert!(f.get("fileUrl").is_none(), "no fileUrl before completion");
    let file = f["fileId"].as_str().expect("fileId").to_owned();

    let p1 = gw
        .put_part(KEY_A, &session, &file, 1, data[..5 * 1024 * 1024].to_vec())
        .await;
    assert_eq!(p1.status(), 200);
    assert!(p1.headers().get("etag").is_some());
    let p1: Value = p1.json().await.expect("json");
    assert_eq!(p1["partNumber"], 1);
    assert_eq!(p1["sizeBytes"], 5 * 1024 * 1024);
    let p2 = gw
        .put_part(KEY_A, &session, &file, 2, data[5 * 1024 * 1024..].to_vec())
        .await;
    assert_eq!(p2.status(), 200);

    let parts: Value = gw
        .req(
            Method::GET,
            &format!("/v1/sessions/{session}/files/{file}/parts"),
            KEY_A,
        )
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(parts["parts"].as_array().map(Vec::len), Some(2));

    let done = gw.complete(KEY_A, &session, &file).await;
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.expect("json");
    assert_eq!(done["status"], "completed");
    let url = done["fileUrl"].as_str().expect("fileUrl");
    let path = url.strip_prefix("file://").expect("file url");
    assert!(
        path.ends_with(&format!("a/{session}/{file}/dir/a.bin")),
        "{path}"
    );
    assert_eq!(std::fs::read(path).expect("object"), data);

    let fin = gw
        .req(
            Method::POST,
            &format!("/v1/sessions/{session}/finalize"),
            KEY_A,
        )
        .send()
        .await
        .expect("send");
    assert_eq!(fin.status(), 200);
    let fin: Value = fin.json().await.expect("json");
    assert_eq!(fin["status"], "finalized");
    assert_eq!(fin["files"][0]["status"], "completed");

    let again = gw
        .register(KEY_A, &session, json!({"fileName": "late", "sizeBytes": 1}))
        .await;
    let p = problem(again, 409, "sessionNotActive").await;
    assert_eq!(p["status"], "finalized");
    gw.stop().await;
}

async fn concurrent_registrations_respect_max_files(backend: Backend) {
    let gw = Arc::new(gateway(&backend).await);
    let session = sid(&gw.create_session(KEY_A, json!({"maxFiles": 50})).await);
    let results = register_concurrently(
        &gw,
        &session,
        300,
        |i| json!({"fileName": format!("f{i}"), "sizeBytes": 1}),
    )
    .await;
    let mut created = 0;
    let mut exceeded = 0;
    for (status, body) in results {
        match status {
            201 => created += 1,
            400 => {
                assert_eq!(body["code"], "fileCountExceeded");
                assert_eq!(body["maxFiles"], 50);
                assert_eq!(body["fileCount"], 50);
                exceeded += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created, exceeded), (50, 250));
    let view: Value = gw
        .req(Method::GET, &format!("/v1/sessions/{session}"), KEY_A)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(view["files"].as_array().map(Vec::len), Some(50));
    assert_eq!(view["fileCount"], 50);
    let keys: HashSet<&str> = view["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["fileKey"].as_str())
        .collect();
    assert_eq!(keys.len(), 50, "no duplicate or lost registration");
}

async fn concurrent_registrations_of_one_key_admit_exactly_one(backend: Backend) {
    let gw = Arc::new(gateway(&backend).await);
    let session = sid(&gw.create_session(KEY_A, json!({})).await);
    let results = register_concurrently(
        &gw,
        &session,
        200,
        |_| json!({"fileName": "same.txt", "sizeBytes": 4}),
    )
    .await;
    let mut created = 0;
    let mut dup = 0;
    for (status, body) in results {
        match status {
            201 => created += 1,
            409 => {
                assert_eq!(body["code"], "duplicateFileKey");
                assert_eq!(body["fileKey"], "same.txt");
                dup += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created, dup), (1, 199));
}

async fn concurrent_completes_complete_storage_once(backend: Backend) {
    let gw = Arc::new(gateway(&backend).await);
    let session = sid(&gw.create_session(KEY_A, json!({})).await);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let f: Value = gw
        .register_json(
            KEY_A,
            &session,
            json!({"fileName": "c.bin", "sizeBytes": data.len()}),
        )
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, data.clone())
            .await
            .status(),
        200
    );
    let before = gw.counting.completes.load(Ordering::SeqCst);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let gw = gw.clone();
            let (session, file) = (session.clone(), file.clone());
            tokio::spawn(async move {
                let res = gw.complete(KEY_A, &session, &file).await;
                let status = res.status().as_u16();
                (status, res.json::<Value>().await.expect("json"))
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    let urls: HashSet<String> = bodies
        .iter()
        .map(|b| b["fileUrl"].as_str().expect("url").to_owned())
        .collect();
    assert_eq!(urls.len(), 1, "one fileUrl for everyone");
    assert!(bodies.iter().all(|b| *b == bodies[0]), "identical bodies");
    assert_eq!(
        gw.counting.completes.load(Ordering::SeqCst) - before,
        1,
        "storage completed once"
    );
    let path = urls
        .iter()
        .next()
        .and_then(|u| u.strip_prefix("file://"))
        .expect("file url")
        .to_owned();
    assert_eq!(std::fs::read(path).expect("object"), data);
    // And a later, sequential re-completion is the same 200 (logged at warn).
    let again: Value = gw
        .complete(KEY_A, &session, &file)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(again, bodies[0]);
    let warns = log_lines_with("idempotent re-completion");
    assert!(
        warns
            .iter()
            .any(|l| l["level"] == "WARN" && l.to_string().contains(&file)),
        "re-completion warn logged"
    );
}

async fn expired_session_answers_410_everywhere_and_logs_once(backend: Backend) {
    let gw = gateway(&backend).await;
    // A TTL long enough that the registration below lands before the deadline even on a
    // loaded 2-core CI machine (a 1 s TTL once expired before the first cluster call returned).
    let created = gw.create_session(KEY_A, json!({"ttlSeconds": 3})).await;
    let session = sid(&created);
    let res = gw
        .register(KEY_A, &session, json!({"fileName": "x", "sizeBytes": 3}))
        .await;
    let status = res.status();
    let f: Value = res.json().await.expect("json");
    assert_eq!(status, 201, "registration before the deadline: {f}");
    let file = f["fileId"].as_str().expect("id").to_owned();
    // Wait for the deadline to pass (the store compares against the wall clock).
    sleep_past(&created["expiresAt"]).await;

    let mut responses = vec![
        gw.register(KEY_A, &session, json!({"fileName": "y", "sizeBytes": 3}))
            .await,
        gw.put_part(KEY_A, &session, &file, 1, b"abc".to_vec())
            .await,
        gw.complete(KEY_A, &session, &file).await,
        gw.req(Method::GET, &format!("/v1/sessions/{session}"), KEY_A)
            .send()
            .await
            .expect("send"),
    ];
    for res in responses.drain(..) {
        let p = problem(res, 410, "sessionExpired").await;
        assert_eq!(p["sessionExpired"], true);
        assert_eq!(p["sessionId"], json!(session));
        assert!(p["expiresAt"].is_string() && p["now"].is_string(), "{p}");
        assert!(p["now"].as_str() >= p["expiresAt"].as_str());
    }
    // The first 410 records the expiry in the store in the background; wait for its event.
    let expiration_events = || -> Vec<Value> {
        log_lines_with(&session)
            .into_iter()
            .filter(|l| l["event"] == "session_expired")
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while expiration_events().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // More requests after the first observation log nothing more.
    gw.req(Method::GET, &format!("/v1/sessions/{session}"), KEY_A)
        .send()
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = expiration_events();
    assert_eq!(events.len(), 1, "exactly one expiration event: {events:?}");
    let e = &events[0];
    assert_eq!(e["tenant"], "a");
    assert_eq!(e["files_registered"], 1);
    assert!(e["seconds_since_expiry"].as_i64().is_some_and(|s| s >= 0));
    assert!(e["seconds_since_creation"].as_i64().is_some_and(|s| s >= 1));
}

async fn other_tenants_sessions_are_404_on_every_endpoint(backend: Backend) {
    let gw = gateway(&backend).await;
    let session = sid(&gw.create_session(KEY_A, json!({})).await);
    let f: Value = gw
        .register_json(KEY_A, &session, json!({"fileName": "x", "sizeBytes": 3}))
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    let s = format!("/v1/sessions/{session}");
    let fp = format!("{s}/files/{file}");
    let cases: Vec<(Method, String, Option<Value>, &str)> = vec![
        (Method::GET, s.clone(), None, "sessionNotFound"),
        (Method::DELETE, s.clone(), None, "sessionNotFound"),
        (
            Method::POST,
            format!("{s}/files"),
            Some(json!({"fileName": "y", "sizeBytes": 1})),
            "sessionNotFound",
        ),
        (
            Method::POST,
            format!("{s}/finalize"),
            None,
            "sessionNotFound",
        ),
        (Method::GET, fp.clone(), None, "sessionNotFound"),
        (Method::DELETE, fp.clone(), None, "sessionNotFound"),
        (Method::GET, format!("{fp}/parts"), None, "sessionNotFound"),
        (
            Method::PUT,
            format!("{fp}/parts/1"),
            None,
            "sessionNotFound",
        ),
        (
            Method::POST,
            format!("{fp}/presigned-parts"),
            Some(json!({"partNumbers": [1]})),
            "sessionNotFound",
        ),
        (
            Method::POST,
            format!("{fp}/complete"),
            Some(json!({})),
            "sessionNotFound",
        ),
    ];
    for (method, path, body, code) in cases {
        let mut rb = gw.req(method.clone(), &path, KEY_B);
        rb = match (&body, method == Method::PUT) {
            (_, true) => rb.body(b"abc".to_vec()),
            (Some(b), _) => rb.json(b),
            _ => rb,
        };
        let res = rb.send().await.expect("send");
        problem(res, 404, code).await;
    }
    // The session is untouched for its owner.
    let res = gw.req(Method::GET, &s, KEY_A).send().await.expect("send");
    assert_eq!(res.status(), 200);
}

async fn error_table_rows(backend: Backend) {
    let gw = gateway(&backend).await;
    // 401 without and with an unknown key.
    let res = gw
        .client
        .get(gw.url("/v1/sessions/x"))
        .send()
        .await
        .expect("send");
    assert_eq!(
        res.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    assert!(res.headers().get("x-request-id").is_some());
    problem(res, 401, "unauthorized").await;
    problem(
        gw.req(Method::GET, "/v1/sessions/x", "nope")
            .send()
            .await
            .expect("send"),
        401,
        "unauthorized",
    )
    .await;
    // X-Request-Id echoes the client's.
    let res = gw
        .req(Method::GET, "/v1/sessions/x", KEY_A)
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("send");
    assert_eq!(
        res.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("abc-123")
    );
    problem(res, 404, "sessionNotFound").await;

    // 400 validationFailed: malformed JSON, bad fields, bad fileKeys.
    let res = gw
        .req(Method::POST, "/v1/sessions", KEY_A)
        .body("{nope")
        .send()
        .await
        .expect("send");
    let p = problem(res, 400, "validationFailed").await;
    assert!(p["errors"].as_array().is_some_and(|e| !e.is_empty()));
    let res = gw
        .req(Method::POST, "/v1/sessions", KEY_A)
        .json(&json!({"maxFiles": 0, "ttlSeconds": 0}))
        .send()
        .await
        .expect("send");
    let p = problem(res, 400, "validationFailed").await;
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, ["maxFiles", "ttlSeconds"]);
    let session = sid(&gw.create_session(KEY_A, json!({"maxFiles": 1})).await);
    for bad in ["", "/abs", "a/../b", "ctl\u{7}", &"k".repeat(1025)] {
        let res = gw
            .register(
                KEY_A,
                &session,
                json!({"fileName": "n", "fileKey": bad, "sizeBytes": 1}),
            )
            .await;
        let p = problem(res, 400, "validationFailed").await;
        assert_eq!(p["errors"][0]["field"], "fileKey", "{bad:?}");
    }
    // 413 fileTooLarge and payloadTooLarge.
    let res = gw
        .register(
            KEY_A,
            &session,
            json!({"fileName": "big", "sizeBytes": 1u64 << 41}),
        )
        .await;
    let p = problem(res, 413, "fileTooLarge").await;
    assert_eq!(p["maxSizeBytes"], 1099511627776u64);
    let huge = json!({"fileName": "x".repeat(70_000), "sizeBytes": 1});
    problem(
        gw.register(KEY_A, &session, huge).await,
        413,
        "payloadTooLarge",
    )
    .await;

    // fileCountExceeded with maxFiles=1.
    let f: Value = gw
        .register_json(KEY_A, &session, json!({"fileName": "one", "sizeBytes": 10}))
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    let p = problem(
        gw.register(KEY_A, &session, json!({"fileName": "two", "sizeBytes": 1}))
            .await,
        400,
        "fileCountExceeded",
    )
    .await;
    assert_eq!(
        (p["maxFiles"].clone(), p["fileCount"].clone()),
        (json!(1), json!(1))
    );

    // partSizeMismatch, lengthRequired-free path, bad part number.
    let p = problem(
        gw.put_part(KEY_A, &session, &file, 1, vec![0; 9]).await,
        400,
        "partSizeMismatch",
    )
    .await;
    assert_eq!(p["expectedSizeBytes"], 10);
    problem(
        gw.put_part(KEY_A, &session, &file, 2, vec![0; 10]).await,
        400,
        "validationFailed",
    )
    .await;
    problem(
        gw.put_part(KEY_A, &session, "nofile", 1, vec![0; 10]).await,
        404,
        "fileNotFound",
    )
    .await;
    // A chunked part (no Content-Length) cannot be checked against the part-size rule: 411.
    let chunks =
        futures_util::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from(vec![
            0u8;
            10
        ]))]);
    let res = gw
        .req(
            Method::PUT,
            &format!("/v1/sessions/{session}/files/{file}/parts/1"),
            KEY_A,
        )
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("send");
    problem(res, 411, "lengthRequired").await;

    // partsMissing.
    let p = problem(
        gw.complete(KEY_A, &session, &file).await,
        400,
        "partsMissing",
    )
    .await;
    assert_eq!(p["missingParts"], json!([1]));

    // notSupported: presigned parts on filesystem storage.
    let res = gw
        .req(
            Method::POST,
            &format!("/v1/sessions/{session}/files/{file}/presigned-parts"),
            KEY_A,
        )
        .json(&json!({"partNumbers": [1]}))
        .send()
        .await
        .expect("send");
    problem(res, 501, "notSupported").await;

    // sessionNotActive after DELETE.
    let res = gw
        .req(Method::DELETE, &format!("/v1/sessions/{session}"), KEY_A)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 204);
    let p = problem(
        gw.put_part(KEY_A, &session, &file, 1, vec![0; 10]).await,
        409,
        "sessionNotActive",
    )
    .await;
    assert_eq!(p["status"], "aborted");
    problem(
        gw.register(KEY_A, &session, json!({"fileName": "z", "sizeBytes": 1}))
            .await,
        409,
        "sessionNotActive",
    )
    .await;
}

/// A file's `metadata` (`{string: string}`) is stored as sent and shown on the file
/// resource; anything else is 400 `validationFailed` on `metadata`, more than
/// `max_metadata_bytes` (16 KiB by default) is 413 `payloadTooLarge`.
async fn file_metadata_is_kept_and_bounded(backend: Backend) {
    let gw = gateway(&backend).await;
    let session = gw.session_id(KEY_A, json!({})).await;
    let metadata = json!({"camera": "X100 \"mk2\"", "tags": "a,b", "empty": ""});
    let res = gw
        .register(
            KEY_A,
            &session,
            json!({"fileName": "m.jpg", "sizeBytes": 1, "metadata": metadata}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.expect("json");
    assert_eq!(created["metadata"], metadata);
    let file = created["fileId"].as_str().expect("fileId");
    let got = gw
        .get_json(KEY_A, &format!("/v1/sessions/{session}/files/{file}"))
        .await;
    assert_eq!(got["metadata"], metadata);
    let listed = gw.get_json(KEY_A, &format!("/v1/sessions/{session}")).await;
    assert_eq!(listed["files"][0]["metadata"], metadata);
    // Without metadata: an empty object.
    let plain = gw
        .register_json(KEY_A, &session, json!({"fileName": "p", "sizeBytes": 1}))
        .await;
    assert_eq!(plain["metadata"], json!({}));
    for bad in [
        json!({"n": 1}),
        json!(["x"]),
        json!("x"),
        json!({"o": {"a": "b"}}),
    ] {
        let p = problem(
            gw.register(
                KEY_A,
                &session,
                json!({"fileName": "b", "sizeBytes": 1, "metadata": bad}),
            )
            .await,
            400,
            "validationFailed",
        )
        .await;
        assert_eq!(p["errors"][0]["field"], "metadata", "{bad}");
    }
    let big = json!({"k": "x".repeat(16 * 1024)});
    problem(
        gw.register(
            KEY_A,
            &session,
            json!({"fileName": "big", "sizeBytes": 1, "metadata": big}),
        )
        .await,
        413,
        "payloadTooLarge",
    )
    .await;
}

async fn aborting_a_file_frees_its_key_and_slot(backend: Backend) {
    let gw = gateway(&backend).await;
    let session = sid(&gw.create_session(KEY_A, json!({"maxFiles": 1})).await);
    let f: Value = gw
        .register_json(KEY_A, &session, json!({"fileName": "k", "sizeBytes": 3}))
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, b"abc".to_vec())
            .await
            .status(),
        200
    );
    let path = format!("/v1/sessions/{session}/files/{file}");
    assert_eq!(
        gw.req(Method::DELETE, &path, KEY_A)
            .send()
            .await
            .expect("send")
            .status(),
        204
    );
    // A deleted file is gone: nothing of it is kept once storage confirmed its cleanup.
    for method in [Method::DELETE, Method::GET] {
        let res = gw.req(method, &path, KEY_A).send().await.expect("send");
        problem(res, 404, "fileNotFound").await;
    }
    // The storage upload is gone and the key and slot are free again.
    assert!(gw.counting.aborts.load(Ordering::SeqCst) >= 1);
    let again = gw
        .register(KEY_A, &session, json!({"fileName": "k", "sizeBytes": 3}))
        .await;
    assert_eq!(again.status(), 201);
    let view = gw.get_json(KEY_A, &format!("/v1/sessions/{session}")).await;
    assert_eq!(view["fileCount"], 1);
    let statuses: Vec<&str> = view["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["status"].as_str())
        .collect();
    assert_eq!(statuses, ["registered"], "the deleted file is not listed");
}

async fn deleting_a_session_aborts_uploads_and_is_repeatable(backend: Backend) {
    let gw = gateway(&backend).await;
    let session = sid(&gw.create_session(KEY_A, json!({})).await);
    for i in 0..3 {
        let f: Value = gw
            .register_json(
                KEY_A,
                &session,
                json!({"fileName": format!("f{i}"), "sizeBytes": 3}),
            )
            .await;
        let file = f["fileId"].as_str().expect("id").to_owned();
        assert_eq!(
            gw.put_part(KEY_A, &session, &file, 1, b"abc".to_vec())
                .await
                .status(),
            200
        );
    }
    let uploads = gw.storage_dir.join(".uploads");
    assert_eq!(std::fs::read_dir(&uploads).expect("uploads").count(), 3);
    let path = format!("/v1/sessions/{session}");
    assert_eq!(
        gw.req(Method::DELETE, &path, KEY_A)
            .send()
            .await
            .expect("send")
            .status(),
        204
    );
    assert_eq!(
        std::fs::read_dir(&uploads).expect("uploads").count(),
        0,
        "every upload aborted"
    );
    assert_eq!(
        gw.req(Method::DELETE, &path, KEY_A)
            .send()
            .await
            .expect("send")
            .status(),
        204,
        "repeatable"
    );
    let view: Value = gw
        .req(Method::GET, &path, KEY_A)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(view["status"], "aborted");
}

/// The first bytes of a PNG.
const PNG: &[u8] = &[
    0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0x0D, b'I', b'H', b'D', b'R',
];

async fn finalize_checks_magic_bytes(backend: Backend) {
    let gw = gateway(&backend).await;
    for (declared, status) in [("application/pdf", 415u16), ("image/png", 200)] {
        let session = sid(&gw.create_session(KEY_A, json!({})).await);
        let f: Value = gw
            .register_json(
                KEY_A,
                &session,
                json!({"fileName": "pic", "sizeBytes": PNG.len(), "contentType": declared}),
            )
            .await;
        let file = f["fileId"].as_str().expect("id").to_owned();
        assert_eq!(
            gw.put_part(KEY_A, &session, &file, 1, PNG.to_vec())
                .await
                .status(),
            200
        );
        assert_eq!(gw.complete(KEY_A, &session, &file).await.status(), 200);
        let res = gw.finalize(KEY_A, &session).await;
        if status == 415 {
            let p = problem(res, 415, "contentTypeMismatch").await;
            assert_eq!(p["fileId"], json!(file));
            assert_eq!(p["declared"], "application/pdf");
            assert_eq!(p["detected"], "image/png");
        } else {
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.expect("json");
            assert_eq!(v["status"], "finalized");
        }
    }
}

async fn resume_lists_uploaded_parts(backend: Backend) {
    let gw = gateway(&backend).await;
    let session = sid(&gw.create_session(KEY_A, json!({})).await);
    let part = 5 * 1024 * 1024;
    let size = 3 * part;
    let f: Value = gw
        .register_json(KEY_A, &session, json!({"fileName": "r", "sizeBytes": size}))
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 2, vec![2; part])
            .await
            .status(),
        200
    );
    let parts: Value = gw
        .req(
            Method::GET,
            &format!("/v1/sessions/{session}/files/{file}/parts"),
            KEY_A,
        )
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(parts["parts"][0]["partNumber"], 2);
    assert_eq!(parts["parts"][0]["sizeBytes"], part);
    assert_eq!(parts["parts"].as_array().map(Vec::len), Some(1));
    // Re-sending a part replaces it.
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 2, vec![9; part])
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, vec![1; part])
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 3, vec![3; part])
            .await
            .status(),
        200
    );
    let done: Value = gw
        .complete(KEY_A, &session, &file)
        .await
        .json()
        .await
        .expect("json");
    let path = done["fileUrl"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .expect("url")
        .to_owned();
    let bytes = std::fs::read(path).expect("object");
    assert_eq!(&bytes[part..part + 3], &[9, 9, 9]);
    assert_eq!(bytes.len(), size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_gives_503_and_recovers() {
    let mut server = upgate_testkit::RedisServer::start();
    let gw = TestGateway::start(config(""), redis_store(&server.url()).await).await;
    let session = sid(&gw.create_session(KEY_A, json!({})).await);
    server.stop();
    let started = std::time::Instant::now();
    let res = gw
        .req(Method::GET, &format!("/v1/sessions/{session}"), KEY_A)
        .send()
        .await
        .expect("send");
    let p = problem(res, 503, "unavailable").await;
    assert!(
        !p.to_string().to_lowercase().contains("redis"),
        "no internals leak: {p}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "503 instead of a hang"
    );
    let res = gw
        .register(KEY_A, &session, json!({"fileName": "x", "sizeBytes": 1}))
        .await;
    assert!(res.headers().get("retry-after").is_some());
    problem(res, 503, "unavailable").await;
    // Redis comes back (empty: the session is gone), and the gateway serves again by itself.
    server.restart();
    let mut recovered = false;
    for _ in 0..50 {
        let res = gw
            .req(Method::POST, "/v1/sessions", KEY_A)
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        if res.status() == 201 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the gateway recovers when Redis returns");
}
