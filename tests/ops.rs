//! Operating the gateway: the real `upgate` binary's logs, traces, shutdown and slow-client
//! protection, plus metrics and readiness of an in-process gateway.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::Binary;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_never_contain_api_keys() {
    let mut bin = Binary::start("", &[("UPGATE_LOG_FORMAT", "json"), ("RUST_LOG", "debug")]);
    let client = reqwest::Client::new();
    let s: Value = client
        .post(bin.url("/v1/sessions"))
        .bearer_auth(KEY_A)
        .json(&json!({}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let session = s["sessionId"].as_str().expect("id").to_owned();
    client
        .post(bin.url(&format!("/v1/sessions/{session}/files")))
        .bearer_auth(KEY_A)
        .json(&json!({"fileName": "a", "sizeBytes": 1}))
        .send()
        .await
        .expect("send");
    client
        .get(bin.url("/v1/sessions/x"))
        .bearer_auth("secret-wrong-key-123")
        .send()
        .await
        .expect("send");
    bin.signal("-TERM");
    assert_eq!(bin.wait(Duration::from_secs(20)), Some(0));
    let out = bin.stdout();
    let mut lines = 0;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 5, "logs were written: {out}");
    assert!(out.contains(&session), "spans carry the session id");
    for secret in [KEY_A, KEY_B, "secret-wrong-key-123"] {
        assert!(
            !out.contains(secret),
            "API key {secret} leaked into the logs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_streaming_part_finish_then_exits_zero() {
    let mut bin = Binary::start("shutdown_grace_seconds = 30", &[]);
    let client = reqwest::Client::new();
    let s: Value = client
        .post(bin.url("/v1/sessions"))
        .bearer_auth(KEY_A)
        .json(&json!({}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let size = 5 * 1024 * 1024;
    let f: Value = client
        .post(bin.url(&format!("/v1/sessions/{session}/files")))
        .bearer_auth(KEY_A)
        .json(&json!({"fileName": "big", "sizeBytes": size}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let file = f["fileId"].as_str().expect("id").to_owned();
    let api = bin.api.clone();
    // Stream half the part, SIGTERM, then the other half.
    let mut conn = TcpStream::connect(&api).expect("connect");
    let head = format!(
        "PUT /v1/sessions/{session}/files/{file}/parts/1 HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {KEY_A}\r\nContent-Length: {size}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(&vec![1u8; size / 2]).expect("first half");
    std::thread::sleep(Duration::from_millis(300));
    bin.signal("-TERM");
    std::thread::sleep(Duration::from_millis(300));
    conn.write_all(&vec![1u8; size - size / 2])
        .expect("second half");
    let mut response = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = conn.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "the in-flight part completed: {text}"
    );
    assert_eq!(
        bin.wait(Duration::from_secs(20)),
        Some(0),
        "exit code 0 after SIGTERM"
    );
    // New connections are refused once shutdown began.
    assert!(TcpStream::connect(&api).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let bin = Binary::start(
        "header_read_timeout_seconds = 1\npart_idle_timeout_seconds = 1",
        &[],
    );
    // Slowloris: a request head trickled byte by byte.
    let api = bin.api.clone();
    let trickle = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(&api).expect("connect");
        let started = Instant::now();
        let head = b"GET /v1/sessions/x HTTP/1.1\r\nHost: h\r\nX-Slow: ";
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if conn.write_all(&[*b]).is_err() || started.elapsed() > Duration::from_secs(15) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            conn.set_read_timeout(Some(Duration::from_millis(1))).ok();
            let mut buf = [0u8; 256];
            if let Ok(0) = conn.read(&mut buf) {
                break;
            }
        }
        started.elapsed()
    });
    // Meanwhile, a normal client is served.
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let res = client
            .post(bin.url("/v1/sessions"))
            .bearer_auth(KEY_A)
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 201);
    }
    let cut_after = trickle.join().expect("thread");
    assert!(
        cut_after < Duration::from_secs(15),
        "the trickling client was cut off (after {cut_after:?})"
    );

    // A part body that stalls is cut off by the idle timeout.
    let (session, f) = bin
        .session_with_file(&client, json!({"fileName": "stall", "sizeBytes": 1000}))
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    let mut conn = TcpStream::connect(&bin.api).expect("connect");
    let head = format!(
        "PUT /v1/sessions/{session}/files/{file}/parts/1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {KEY_A}\r\nContent-Length: 1000\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(&[0u8; 10]).expect("some bytes");
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut response = Vec::new();
    let _ = conn.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "stalled part answered and closed: {text}"
    );
    assert!(text.contains("bodyIncomplete"), "{text}");
}

/// A minimal OTLP/HTTP receiver: stores every POST body.
fn otlp_receiver() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let sink = bodies.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let sink = sink.clone();
            std::thread::spawn(move || loop {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let len = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if conn.read_exact(&mut body).is_err() {
                    return;
                }
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(body);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n");
            });
        }
    });
    (format!("http://{addr}"), bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_otlp_with_the_callers_trace_id() {
    let (endpoint, bodies) = otlp_receiver();
    let mut bin = Binary::start(
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = reqwest::Client::new()
        .post(bin.url("/v1/sessions"))
        .bearer_auth(KEY_A)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    bin.signal("-TERM");
    assert_eq!(bin.wait(Duration::from_secs(20)), Some(0));
    let wanted = (0..trace_id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&trace_id[i..i + 2], 16).expect("hex"))
        .collect::<Vec<u8>>();
    let bodies = bodies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(!bodies.is_empty(), "spans were exported");
    assert!(
        bodies
            .iter()
            .any(|b| b.windows(16).any(|w| w == wanted.as_slice())),
        "an exported span carries the incoming trace id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_a_known_sequence() {
    let store = Arc::new(upgate::store::memory::MemoryStore::new(
        Duration::from_secs(3600),
    ));
    let gw = TestGateway::start(config(""), store).await;
    let s = gw.create_session(KEY_A, json!({"maxFiles": 1})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let f: Value = gw
        .register_json(KEY_A, &session, json!({"fileName": "a", "sizeBytes": 5}))
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.register(KEY_A, &session, json!({"fileName": "b", "sizeBytes": 5}))
            .await
            .status(),
        400
    );
    assert_eq!(
        gw.register(KEY_A, &session, json!({"fileName": "a", "sizeBytes": 5}))
            .await
            .status(),
        409
    );
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, b"hello".to_vec())
            .await
            .status(),
        200
    );
    assert_eq!(gw.complete(KEY_A, &session, &file).await.status(), 200);
    let text = gw
        .client
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("series {series} missing in:\n{text}"))
    };
    assert_eq!(value("upgate_sessions_created_total"), 1.0);
    assert_eq!(
        value("upgate_file_registrations_total{code=\"created\"}"),
        1.0
    );
    assert_eq!(
        value("upgate_file_registrations_total{code=\"fileCountExceeded\"}"),
        1.0
    );
    assert_eq!(
        value("upgate_file_registrations_total{code=\"duplicateFileKey\"}"),
        1.0
    );
    assert_eq!(value("upgate_files_completed_total"), 1.0);
    assert_eq!(
        value("upgate_rejections_total{code=\"fileCountExceeded\"}"),
        1.0
    );
    assert_eq!(
        value("upgate_rejections_total{code=\"duplicateFileKey\"}"),
        1.0
    );
    assert!(value("upgate_backend_call_duration_seconds_count{backend=\"storage\",op=\"complete_upload\"}") >= 1.0);
    assert!(text.contains("upgate_rate_limit_decisions_total{decision=\"admitted\"}"));
    assert_eq!(value("upgate_received_bytes_total"), 5.0);
    assert_eq!(value("upgate_stored_bytes_total"), 5.0);
    assert_eq!(
        value("upgate_http_requests_total{method=\"POST\",route=\"/v1/sessions/{session_id}/files\",status=\"201\"}"),
        1.0
    );
    assert_eq!(
        value("upgate_http_request_duration_seconds_count{method=\"PUT\",route=\"/v1/sessions/{session_id}/files/{file_id}/parts/{part_number}\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_redis() {
    let mut server = upgate_testkit::RedisServer::start();
    let gw = TestGateway::start(config(""), redis_store(&server.url()).await).await;
    let ready = || async {
        gw.client
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);
    assert_eq!(
        gw.client
            .get(format!("{}/healthz", gw.admin))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    server.stop();
    assert_eq!(ready().await, 503);
    server.restart();
    let mut status = 0;
    for _ in 0..50 {
        status = ready().await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "ready again once Redis returns");
    let _ = gw.req(Method::GET, "/v1/sessions/x", KEY_A).send().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_per_tenant_and_exposes_etag() {
    let mut cfg = config("");
    cfg.tenants[0].cors_allowed_origins = vec!["https://app.a.example".to_owned()];
    let gw = TestGateway::start(
        cfg,
        Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(60),
        )),
    )
    .await;
    let preflight = gw
        .client
        .request(Method::OPTIONS, gw.url("/v1/sessions"))
        .header("origin", "https://app.a.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, idempotency-key",
        )
        .send()
        .await
        .expect("send");
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://app.a.example")
    );
    let allow_headers = preflight
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(allow_headers.contains("idempotency-key") && allow_headers.contains("authorization"));
    let other = gw
        .client
        .request(Method::OPTIONS, gw.url("/v1/sessions"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("send");
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // Tenant a's origin gets the headers on a real request; tenant b (no origins) does not.
    let res = gw
        .req(Method::POST, "/v1/sessions", KEY_A)
        .header("origin", "https://app.a.example")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    let expose = res
        .headers()
        .get("access-control-expose-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(expose.contains("etag"), "{expose}");
    let res = gw
        .req(Method::POST, "/v1/sessions", KEY_B)
        .header("origin", "https://app.a.example")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_seed_creates_the_seed_fixtures_in_redis() {
    let redis = upgate_testkit::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_upgate"))
        .arg("dev-seed")
        .current_dir(dir.path())
        .env("UPGATE_REDIS_URL", redis.url())
        .env_remove("UPGATE_CONFIG")
        .output()
        .expect("run dev-seed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
            .to_owned()
    };
    let mut cfg = upgate::config::Config::embedded_default().expect("default");
    cfg.redis = Some(upgate::config::RedisTarget::Single(redis.url()));
    let store = upgate::build_store(&cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gw = TestGateway::start(cfg, store).await;
    let key = upgate::config::DEV_API_KEY;
    let expired = gw
        .req(
            Method::GET,
            &format!("/v1/sessions/{}", id("EXPIRED_SESSION_ID")),
            key,
        )
        .send()
        .await
        .expect("send");
    problem(expired, 410, "sessionExpired").await;
    let limited = id("LIMITED_SESSION_ID");
    for (i, want) in [(1, 201u16), (2, 201), (3, 400)] {
        let res = gw
            .register(
                key,
                &limited,
                json!({"fileName": format!("f{i}"), "sizeBytes": 1}),
            )
            .await;
        assert_eq!(res.status().as_u16(), want);
    }
    let res = gw
        .complete(key, &id("COMPLETED_SESSION_ID"), &id("COMPLETED_FILE_ID"))
        .await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.expect("json");
    assert_eq!(v["status"], "completed");
    assert!(v["fileUrl"]
        .as_str()
        .is_some_and(|u| u.starts_with("file://")));
}

/// HTTP/1.1 half-close: a client that sends its request and then shuts down its sending
/// side still gets the whole response, even when the request is still in flight at that
/// moment (here: Redis paused by `CLIENT PAUSE`), and its effect happened. Without
/// half-close the server would take the early EOF for an abandoned request and drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_during_its_request_still_gets_the_response() {
    let server = upgate_testkit::RedisServer::start();
    let gw = TestGateway::start(config(""), redis_store(&server.url()).await).await;
    // Warm the connection and the scripts, then hold every Redis client for 1.5 s.
    let warm = gw.create_session(KEY_A, json!({})).await;
    assert!(warm["sessionId"].is_string(), "{warm}");
    let admin = redis::Client::open(server.url()).expect("redis url");
    let mut con = admin
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut con)
        .await
        .expect("CLIENT PAUSE");
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let response = tokio::task::spawn_blocking(move || {
        let mut conn = TcpStream::connect(&addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let body = "{}";
        let req = format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY_A}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).expect("write");
        // The request now waits on the paused Redis; the client says it is done sending.
        std::thread::sleep(Duration::from_millis(300));
        conn.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut out = String::new();
        let _ = conn.read_to_string(&mut out);
        out
    })
    .await
    .expect("client thread");
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "response after half-close: {response:?}"
    );
    let (_, body) = response.split_once("\r\n\r\n").expect("head and body");
    let v: Value = serde_json::from_str(body.trim()).expect("JSON body");
    let session = v["sessionId"].as_str().expect("sessionId").to_owned();
    let res = gw
        .client
        .get(format!("{}/v1/sessions/{session}", gw.base))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 200);
}
