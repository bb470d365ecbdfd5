//! Fuzzing what parses untrusted bytes, through the whole router in process (no sockets, so
//! many cases are cheap): request methods, paths, headers (`Authorization`,
//! `Idempotency-Key`, `Content-MD5`, `x-amz-checksum-*`, `Content-Type`, `X-Request-Id`,
//! `Range`-like and arbitrary ones) and bodies (JSON near the API's shapes, and raw bytes).
//!
//! Properties: nothing panics (the panic catcher would answer 500), nothing answers 5xx but
//! 501 `notSupported` (presigned parts on filesystem storage), and every 4xx (but to HEAD,
//! which has no body) is an RFC 9457 problem document with a `code`.
//!
//! `FUZZ_CASES` sets the number of cases (default 3,000, a few seconds); a long campaign is
//! `FUZZ_CASES=300000 cargo test --release --test fuzz -- --nocapture` (figures in
//! `tests/README.md`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use common::strategies::json_value;
use common::*;
use http::{Request, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};
use serde_json::{json, Value};
use tower::ServiceExt as _;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// A header value of visible ASCII, spaces and tabs (what `HeaderValue` takes from text),
/// or arbitrary bytes above 0x80.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~\t]{0,80}".prop_map(String::into_bytes),
        prop::collection::vec(0x80u8..=0xff, 0..16),
        Just(b"dGVzdA==".to_vec()),
        Just(b"\"quoted\"".to_vec()),
    ]
}

fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
    (
        prop_oneof![
            Just("authorization".to_owned()),
            Just("idempotency-key".to_owned()),
            Just("content-md5".to_owned()),
            Just("x-amz-checksum-crc32".to_owned()),
            Just("x-amz-checksum-crc32c".to_owned()),
            Just("x-amz-checksum-sha1".to_owned()),
            Just("x-amz-checksum-sha256".to_owned()),
            Just("content-type".to_owned()),
            Just("x-request-id".to_owned()),
            Just("range".to_owned()),
            Just("content-range".to_owned()),
            Just("origin".to_owned()),
            Just("access-control-request-method".to_owned()),
            Just("traceparent".to_owned()),
            "[a-z][a-z0-9-]{0,20}",
        ],
        header_value(),
    )
}

#[derive(Debug, Clone)]
enum Payload {
    Json(Value),
    Raw(Vec<u8>),
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        3 => json_value().prop_map(Payload::Json),
        1 => prop::collection::vec(any::<u8>(), 0..96).prop_map(Payload::Raw),
        1 => ("\\PC{0,40}", any::<u64>()).prop_map(|(k, n)| Payload::Json(json!({"fileName": "f", "fileKey": k, "sizeBytes": n}))),
        1 => prop::collection::vec((0u32..12, "[0-9a-f\"]{0,34}"), 0..4).prop_map(|parts| {
            Payload::Json(json!({"parts": parts.into_iter().map(|(n, e)| json!({"partNumber": n, "etag": e})).collect::<Vec<_>>()}))
        }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    method: String,
    path: usize,
    junk: String,
    key: usize,
    headers: Vec<(String, Vec<u8>)>,
    payload: Payload,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            6 => prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE")].prop_map(str::to_owned),
            1 => prop_oneof![Just("HEAD"), Just("PATCH"), Just("OPTIONS")].prop_map(str::to_owned),
            1 => "[A-Z]{1,12}",
        ],
        0usize..PATHS,
        "[a-zA-Z0-9._~%-]{0,40}",
        0usize..4,
        prop::collection::vec(header(), 0..5),
        payload(),
    )
        .prop_map(|(method, path, junk, key, headers, payload)| Case {
            method,
            path,
            junk,
            key,
            headers,
            payload,
        })
}

const PATHS: usize = 12;

fn path(which: usize, session: &str, file: &str, junk: &str) -> String {
    match which {
        0 => "/v1/sessions".to_owned(),
        1 => format!("/v1/sessions/{session}"),
        2 => format!("/v1/sessions/{session}/files"),
        3 => format!("/v1/sessions/{session}/files/{file}"),
        4 => format!("/v1/sessions/{session}/files/{file}/parts/1"),
        5 => format!("/v1/sessions/{session}/files/{file}/parts/{junk}"),
        6 => format!("/v1/sessions/{session}/files/{file}/parts"),
        7 => format!("/v1/sessions/{session}/files/{file}/complete"),
        8 => format!("/v1/sessions/{session}/files/{file}/presigned-parts"),
        9 => format!("/v1/sessions/{session}/finalize"),
        10 => format!("/v1/sessions/{junk}/files/{junk}"),
        _ => format!("/{junk}"),
    }
}

#[test]
fn untrusted_bytes_never_panic_or_5xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (router, session, file) = rt.block_on(async {
        let store = Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        ));
        let fs = upgate::storage::fs::FsStore::new(dir.path())
            .await
            .expect("fs");
        let gw = upgate::Gateway::with_backends(config(""), store, Arc::new(fs));
        let router = gw.router();
        let send = |req: Request<Body>| {
            let router = router.clone();
            async move {
                let res = router.oneshot(req).await.expect("infallible");
                let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
                    .await
                    .expect("body");
                serde_json::from_slice::<Value>(&bytes).expect("json")
            }
        };
        let s = send(
            Request::post("/v1/sessions")
                .header("authorization", format!("Bearer {KEY_A}"))
                .header("content-type", "application/json")
                .body(Body::from(r#"{"maxFiles": 1000}"#))
                .expect("request"),
        )
        .await;
        let session = s["sessionId"].as_str().expect("id").to_owned();
        let f = send(
            Request::post(format!("/v1/sessions/{session}/files"))
                .header("authorization", format!("Bearer {KEY_A}"))
                .header("content-type", "application/json")
                .body(Body::from(r#"{"fileName": "seed.bin", "sizeBytes": 10}"#))
                .expect("request"),
        )
        .await;
        let file = f["fileId"].as_str().expect("id").to_owned();
        (router, session, file)
    });
    let keys = [
        format!("Bearer {KEY_A}"),
        format!("Bearer {KEY_B}"),
        "Bearer nope".to_owned(),
        String::new(),
    ];

    let n = cases();
    let started = Instant::now();
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new());
    let mut runner = TestRunner::new(PtConfig {
        cases: n,
        failure_persistence: None,
        ..PtConfig::default()
    });
    runner
        .run(&case(), |c| {
            let Ok(method) = http::Method::from_bytes(c.method.as_bytes()) else {
                return Ok(());
            };
            let uri = path(c.path, &session, &file, &c.junk);
            let mut req = Request::builder().method(method).uri(&uri);
            if !keys[c.key].is_empty() {
                req = req.header("authorization", &keys[c.key]);
            }
            for (name, value) in &c.headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    http::HeaderValue::from_bytes(value),
                ) {
                    req = req.header(n, v);
                }
            }
            let body = match &c.payload {
                Payload::Json(v) => {
                    req = req.header("content-type", "application/json");
                    v.to_string().into_bytes()
                }
                Payload::Raw(b) => b.clone(),
            };
            let req = req
                .header("content-length", body.len())
                .body(Body::from(body));
            let Ok(req) = req else {
                return Ok(()); // the junk made no valid URI: nothing reaches the gateway
            };
            let (status, ct, problem) = rt.block_on(async {
                let res = router.clone().oneshot(req).await.expect("infallible");
                let status = res.status();
                let ct = res
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                (status, ct, serde_json::from_slice::<Value>(&bytes).ok())
            });
            *statuses
                .lock()
                .expect("statuses")
                .entry(status.as_u16())
                .or_default() += 1;
            prop_assert!(
                !status.is_server_error() || status == StatusCode::NOT_IMPLEMENTED,
                "{status} for {c:?} ({uri})"
            );
            // HEAD answers carry no body by definition.
            if status.is_client_error() && c.method != "HEAD" {
                prop_assert_eq!(&ct, "application/problem+json", "{:?} {}", c, uri);
                let code = problem
                    .as_ref()
                    .and_then(|p| p["code"].as_str())
                    .unwrap_or("");
                prop_assert!(!code.is_empty(), "no code for {c:?} ({uri}): {problem:?}");
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "fuzz: {n} cases in {:.1} s, statuses {:?}",
        started.elapsed().as_secs_f64(),
        statuses.lock().expect("statuses")
    );
}
