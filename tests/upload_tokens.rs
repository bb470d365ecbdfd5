//! Upload tokens (`../shared/API.md` v1.1, "Browser-safe credentials") against the real
//! binary, on the in-memory store and on Redis: a browser-like client that holds only a
//! token does a whole upload; the token is refused everywhere else; bad tokens are 401 with
//! RFC 6750's `WWW-Authenticate`; tokens work on every replica; no token is ever logged.

mod common;

use std::time::Duration;

use common::binary::Binary;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use upgate_testkit::RedisServer;

/// A client with no API key: what a browser holds.
struct Browser {
    client: reqwest::Client,
    token: String,
}

impl Browser {
    fn req(&self, gw: &Binary, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, gw.url(path))
            .bearer_auth(&self.token)
            .header("Origin", "https://app.example")
    }
}

async fn send(rb: reqwest::RequestBuilder) -> reqwest::Response {
    rb.send().await.expect("send")
}

fn www_authenticate(res: &reqwest::Response) -> Option<String> {
    res.headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `POST /v1/sessions` with tenant a's API key (the application's backend).
async fn backend_creates_session(gw: &Binary, client: &reqwest::Client) -> Value {
    let res = client
        .post(gw.url("/v1/sessions"))
        .bearer_auth(KEY_A)
        .json(&json!({"ttlSeconds": 600}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    res.json().await.expect("json")
}

fn start(redis: Option<&RedisServer>, extra: &str) -> Binary {
    // Top-level keys first: `extra` may open a `[[tenants]]` table.
    let mut config = String::new();
    if let Some(r) = redis {
        config.push_str(&format!("redis_url = \"{}\"\n", r.url()));
    }
    config.push_str(extra);
    Binary::start(
        &config,
        &[("UPGATE_LOG_FORMAT", "json"), ("RUST_LOG", "debug")],
    )
}

async fn browser_flow(redis: Option<RedisServer>) {
    let gw = start(redis.as_ref(), "");
    let client = reqwest::Client::new();
    let created = backend_creates_session(&gw, &client).await;
    let session = created["sessionId"].as_str().expect("id").to_owned();
    let token = created["uploadToken"]
        .as_str()
        .expect("uploadToken")
        .to_owned();
    assert!(token.starts_with("upt_"), "{token}");
    assert_eq!(created["uploadTokenExpiresAt"], created["expiresAt"]);
    let browser = Browser {
        client: reqwest::Client::new(),
        token: token.clone(),
    };
    let mut seen = vec![token.clone()];

    // The whole upload with the token alone.
    let res = send(browser.req(&gw, Method::GET, &format!("/v1/sessions/{session}"))).await;
    assert_eq!(res.status(), 200);
    let data: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 249) as u8).collect();
    let res = send(
        browser
            .req(&gw, Method::POST, &format!("/v1/sessions/{session}/files"))
            .json(&json!({"fileName": "photo.bin", "sizeBytes": data.len()})),
    )
    .await;
    assert_eq!(res.status(), 201);
    let file: Value = res.json().await.expect("json");
    let file_id = file["fileId"].as_str().expect("fileId").to_owned();
    let fp = format!("/v1/sessions/{session}/files/{file_id}");
    for (i, chunk) in data.chunks(5 * 1024 * 1024).enumerate() {
        let res = send(
            browser
                .req(&gw, Method::PUT, &format!("{fp}/parts/{}", i + 1))
                .body(chunk.to_vec()),
        )
        .await;
        assert_eq!(res.status(), 200, "part {}", i + 1);
    }
    let res = send(browser.req(&gw, Method::GET, &format!("{fp}/parts"))).await;
    assert_eq!(res.status(), 200);
    let res = send(
        browser
            .req(&gw, Method::POST, &format!("{fp}/complete"))
            .json(&json!({})),
    )
    .await;
    assert_eq!(res.status(), 200);
    let res = send(browser.req(
        &gw,
        Method::POST,
        &format!("/v1/sessions/{session}/finalize"),
    ))
    .await;
    assert_eq!(res.status(), 200);
    let done: Value = res.json().await.expect("json");
    assert_eq!(done["status"], "finalized");
    assert_eq!(done["files"][0]["status"], "completed");
    // After finalize, the answers the API key would get.
    let res = send(
        browser
            .req(&gw, Method::POST, &format!("/v1/sessions/{session}/files"))
            .json(&json!({"fileName": "late", "sizeBytes": 1})),
    )
    .await;
    assert_eq!(res.status(), 409);

    // Another session of the same tenant, and its file: 404, as another tenant's.
    let other = backend_creates_session(&gw, &client).await;
    let other_id = other["sessionId"].as_str().expect("id");
    let res = client
        .post(gw.url(&format!("/v1/sessions/{other_id}/files")))
        .bearer_auth(KEY_A)
        .json(&json!({"fileName": "theirs", "sizeBytes": 1}))
        .send()
        .await
        .expect("send");
    let theirs: Value = res.json().await.expect("json");
    let theirs_id = theirs["fileId"].as_str().expect("fileId");
    for (method, path) in [
        (Method::GET, format!("/v1/sessions/{other_id}")),
        (Method::DELETE, format!("/v1/sessions/{other_id}")),
        (Method::POST, format!("/v1/sessions/{other_id}/files")),
        (
            Method::GET,
            format!("/v1/sessions/{other_id}/files/{theirs_id}"),
        ),
        (
            Method::PUT,
            format!("/v1/sessions/{other_id}/files/{theirs_id}/parts/1"),
        ),
        (Method::POST, format!("/v1/sessions/{other_id}/finalize")),
        // The other session's file under the token's own session id.
        (
            Method::GET,
            format!("/v1/sessions/{session}/files/{theirs_id}"),
        ),
    ] {
        let res = send(browser.req(&gw, method.clone(), &path).json(&json!({}))).await;
        assert_eq!(res.status(), 404, "{method} {path}");
    }

    // Creating sessions and minting tokens: 403 insufficientScope.
    for path in [
        "/v1/sessions".to_owned(),
        format!("/v1/sessions/{session}/upload-tokens"),
    ] {
        let res = send(browser.req(&gw, Method::POST, &path).json(&json!({}))).await;
        assert_eq!(
            www_authenticate(&res).as_deref(),
            Some("Bearer error=\"insufficient_scope\"")
        );
        problem(res, 403, "insufficientScope").await;
    }

    // Minting with the API key: a short token that expires; bad ttl; capped at expiresAt.
    let mint = |ttl: Value| {
        client
            .post(gw.url(&format!("/v1/sessions/{other_id}/upload-tokens")))
            .bearer_auth(KEY_A)
            .json(&json!({"ttlSeconds": ttl}))
            .send()
    };
    let res = mint(json!(0)).await.expect("send");
    problem(res, 400, "validationFailed").await;
    let res = mint(json!(86_400 * 365)).await.expect("send");
    assert_eq!(res.status(), 201);
    let long: Value = res.json().await.expect("json");
    assert_eq!(long["uploadTokenExpiresAt"], other["expiresAt"]);
    let res = mint(json!(1)).await.expect("send");
    assert_eq!(res.status(), 201);
    let short: Value = res.json().await.expect("json");
    let short = short["uploadToken"].as_str().expect("token").to_owned();
    seen.push(short.clone());
    let long = long["uploadToken"].as_str().expect("token").to_owned();
    seen.push(long.clone());
    // Both minted tokens work on their session until they expire.
    for minted in [&short, &long] {
        let res = client
            .get(gw.url(&format!("/v1/sessions/{other_id}")))
            .bearer_auth(minted)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200);
    }

    // Bad tokens: 401 with `invalid_token`; no credential: plain `Bearer`.
    let valid = short.clone();
    let mut tampered = valid.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let truncated = valid[..valid.len() - 6].to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for (what, bad) in [
        ("expired", short.as_str()),
        ("tampered", tampered.as_str()),
        ("truncated", truncated.as_str()),
        ("garbage", "upt_not-a-token"),
        ("unknown API key", "no-such-key"),
    ] {
        let res = client
            .get(gw.url(&format!("/v1/sessions/{other_id}")))
            .bearer_auth(bad)
            .send()
            .await
            .expect("send");
        assert_eq!(
            www_authenticate(&res).as_deref(),
            Some("Bearer error=\"invalid_token\""),
            "{what}"
        );
        problem(res, 401, "unauthorized").await;
    }
    let res = client
        .get(gw.url(&format!("/v1/sessions/{other_id}")))
        .send()
        .await
        .expect("send");
    assert_eq!(www_authenticate(&res).as_deref(), Some("Bearer"));
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // DELETE of the session with its token, then 404.
    let third = backend_creates_session(&gw, &client).await;
    let third_browser = Browser {
        client: reqwest::Client::new(),
        token: third["uploadToken"].as_str().expect("token").to_owned(),
    };
    seen.push(third_browser.token.clone());
    let third_id = third["sessionId"].as_str().expect("id");
    let path = format!("/v1/sessions/{third_id}");
    // A file with one part uploaded and one completed, so every file route has a file.
    let mut files = Vec::new();
    for name in ["open.bin", "done.bin"] {
        let res = send(
            third_browser
                .req(&gw, Method::POST, &format!("{path}/files"))
                .json(&json!({"fileName": name, "sizeBytes": 3})),
        )
        .await;
        let f: Value = res.json().await.expect("json");
        let fp = format!("{path}/files/{}", f["fileId"].as_str().expect("fileId"));
        let res = send(
            third_browser
                .req(&gw, Method::PUT, &format!("{fp}/parts/1"))
                .body(b"abc".to_vec()),
        )
        .await;
        assert_eq!(res.status(), 200);
        files.push(fp);
    }
    let res = send(
        third_browser
            .req(&gw, Method::POST, &format!("{}/complete", files[1]))
            .json(&json!({})),
    )
    .await;
    assert_eq!(res.status(), 200);
    let res = send(third_browser.req(&gw, Method::DELETE, &path)).await;
    assert_eq!(res.status(), 204);
    let mut gone = vec![
        (Method::GET, path.clone()),
        (Method::DELETE, path.clone()),
        (Method::GET, format!("{path}/files")),
        (Method::POST, format!("{path}/files")),
        (Method::POST, format!("{path}/finalize")),
    ];
    for fp in &files {
        gone.extend([
            (Method::GET, fp.clone()),
            (Method::DELETE, fp.clone()),
            (Method::GET, format!("{fp}/parts")),
            (Method::PUT, format!("{fp}/parts/1")),
            (Method::POST, format!("{fp}/presigned-parts")),
            (Method::POST, format!("{fp}/complete")),
        ]);
    }
    for (method, path) in gone {
        let res = send(
            third_browser
                .req(&gw, method.clone(), &path)
                .json(&json!({"fileName": "x", "sizeBytes": 1})),
        )
        .await;
        assert_eq!(res.status(), 404, "{method} {path}");
    }
    // The API key still sees the deleted session.
    let res = client
        .get(gw.url(&path))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);

    // No token in any log line of the whole run (debug level, JSON).
    let logs = gw.stdout();
    assert!(logs.lines().count() > 20, "the run logged: {logs}");
    for t in &seen {
        assert!(!logs.contains(t.as_str()), "a token is in the logs");
        assert!(!logs.contains(&t[4..]), "a token's body is in the logs");
    }
    assert!(!logs.contains(KEY_A), "the API key is in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_with_an_upload_token_on_the_memory_store() {
    browser_flow(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_with_an_upload_token_on_redis() {
    browser_flow(Some(RedisServer::start())).await;
}

/// Browsers read every answer, refusals included: the CORS headers of the tenant's origins
/// are on 200, 401, 403 and 404 alike. A token's idempotency keys are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_can_read_refusals_and_idempotency_keys_stay_apart() {
    const KEY_C: &str = "key-tenant-c";
    const ORIGIN: &str = "https://app.example";
    let gw = start(
        None,
        &format!(
            "[[tenants]]\nid = \"c\"\napi_keys_sha256 = [\"{}\"]\ncors_allowed_origins = [\"{ORIGIN}\"]\nrate_limit = {{ requests_per_second = 100000, burst = 100000 }}\n",
            upgate::config::Config::hash_key(KEY_C)
        ),
    );
    let client = reqwest::Client::new();
    let create = || {
        client
            .post(gw.url("/v1/sessions"))
            .bearer_auth(KEY_C)
            .json(&json!({}))
            .send()
    };
    let mine: Value = create().await.expect("send").json().await.expect("json");
    let theirs: Value = create().await.expect("send").json().await.expect("json");
    let session = mine["sessionId"].as_str().expect("id");
    let token = mine["uploadToken"].as_str().expect("token");
    let acao = |res: &reqwest::Response| {
        res.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let browser = |credential: &str, method: Method, path: String| {
        client
            .request(method, gw.url(&path))
            .bearer_auth(credential)
            .header("Origin", ORIGIN)
            .json(&json!({}))
            .send()
    };
    let last = if token.ends_with('A') { 'B' } else { 'A' };
    let tampered = format!("{}{last}", &token[..token.len() - 1]);
    let cases = [
        (token, Method::GET, format!("/v1/sessions/{session}"), 200),
        (
            tampered.as_str(),
            Method::GET,
            format!("/v1/sessions/{session}"),
            401,
        ),
        (token, Method::POST, "/v1/sessions".to_owned(), 403),
        (
            token,
            Method::GET,
            format!("/v1/sessions/{}", theirs["sessionId"].as_str().expect("id")),
            404,
        ),
    ];
    for (credential, method, path, status) in cases {
        let res = browser(credential, method.clone(), path.clone())
            .await
            .expect("send");
        assert_eq!(res.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            acao(&res).as_deref(),
            Some(ORIGIN),
            "{method} {path} ({status})"
        );
    }

    // The API key registers a file with an Idempotency-Key; the token sending the same key
    // and body is not given the API key's stored answer: it runs (and finds the fileKey
    // taken).
    let register = |credential: &str| {
        client
            .post(gw.url(&format!("/v1/sessions/{session}/files")))
            .bearer_auth(credential)
            .header("Idempotency-Key", "same-key")
            .json(&json!({"fileName": "a.txt", "sizeBytes": 1}))
            .send()
    };
    let first = register(KEY_C).await.expect("send");
    assert_eq!(first.status(), 201);
    let again = register(KEY_C).await.expect("send");
    assert!(again.headers().contains_key("idempotent-replayed"));
    let token_try = register(token).await.expect("send");
    assert!(!token_try.headers().contains_key("idempotent-replayed"));
    problem(token_try, 409, "duplicateFileKey").await;

    // After DELETE, the token's 404 keeps the CORS headers too.
    let res = browser(token, Method::DELETE, format!("/v1/sessions/{session}"))
        .await
        .expect("send");
    assert_eq!(res.status(), 204);
    let res = browser(token, Method::GET, format!("/v1/sessions/{session}"))
        .await
        .expect("send");
    assert_eq!(res.status(), 404);
    assert_eq!(acao(&res).as_deref(), Some(ORIGIN));
}

/// Two replicas on one Redis, no configured secret: a token minted by either works on the
/// other (the key lives in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_work_on_every_replica() {
    let redis = RedisServer::start();
    let one = start(Some(&redis), "");
    let two = start(Some(&redis), "");
    let client = reqwest::Client::new();
    for (minting, using) in [(&one, &two), (&two, &one)] {
        let created = backend_creates_session(minting, &client).await;
        let browser = Browser {
            client: reqwest::Client::new(),
            token: created["uploadToken"].as_str().expect("token").to_owned(),
        };
        let session = created["sessionId"].as_str().expect("id");
        let res = send(
            browser
                .req(
                    using,
                    Method::POST,
                    &format!("/v1/sessions/{session}/files"),
                )
                .json(&json!({"fileName": "x", "sizeBytes": 1})),
        )
        .await;
        assert_eq!(res.status(), 201);
    }
}

/// `upload_token_secrets`: the first signs, every one verifies; removing a secret revokes
/// every token signed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_secrets_rotate_and_revoke() {
    const OLD: &str = "old-secret-0123456789abcdef0123456789abcdef";
    const NEW: &str = "new-secret-0123456789abcdef0123456789abcdef";
    let redis = RedisServer::start();
    let client = reqwest::Client::new();
    let old_gw = start(Some(&redis), &format!("upload_token_secrets = [\"{OLD}\"]"));
    let created = backend_creates_session(&old_gw, &client).await;
    let token = created["uploadToken"].as_str().expect("token").to_owned();
    let path = format!(
        "/v1/sessions/{}",
        created["sessionId"].as_str().expect("id")
    );
    drop(old_gw);
    let status = |gw: &Binary| {
        let rb = client.get(gw.url(&path)).bearer_auth(&token);
        async move { rb.send().await.expect("send").status().as_u16() }
    };
    let rotated = start(
        Some(&redis),
        &format!("upload_token_secrets = [\"{NEW}\", \"{OLD}\"]"),
    );
    assert_eq!(status(&rotated).await, 200, "the old secret still verifies");
    drop(rotated);
    let revoked = start(Some(&redis), &format!("upload_token_secrets = [\"{NEW}\"]"));
    assert_eq!(
        status(&revoked).await,
        401,
        "the removed secret's tokens are revoked"
    );
}

/// Storage losing a live session's upload (a lifecycle rule, say) is the API key's 409
/// `fileNotActive` for a token too, not the 404 of a deleted session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_storage_upload_is_409_for_a_token_as_for_the_key() {
    let gw = TestGateway::start(
        config(""),
        std::sync::Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        )),
    )
    .await;
    let created = gw.create_session(KEY_A, json!({})).await;
    let session = created["sessionId"].as_str().expect("id");
    let token = created["uploadToken"].as_str().expect("token");
    let size = 5 * 1024 * 1024 + 1;
    let file = gw.register_id(token, session, "lost.bin", size).await;
    let res = gw
        .put_part(token, session, &file, 1, vec![1; 5 * 1024 * 1024])
        .await;
    assert_eq!(res.status(), 200);
    // The upload disappears from storage behind the gateway's back.
    let uploads = gw.storage_dir.join(".uploads");
    for entry in std::fs::read_dir(&uploads).expect("uploads") {
        std::fs::remove_dir_all(entry.expect("entry").path()).expect("remove");
    }
    for credential in [token, KEY_A] {
        let res = gw.put_part(credential, session, &file, 2, vec![2]).await;
        let p = problem(res, 409, "fileNotActive").await;
        assert_eq!(p["fileStatus"], "aborted");
    }
}

/// The edge's request timeout (here: finalize waiting on a stalled storage read) answers a
/// browser through the CORS layer too, so the page can read the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_is_readable_by_the_browser() {
    const ORIGIN: &str = "https://app.example";
    let mut cfg = config("request_timeout_seconds = 1");
    cfg.tenants[0].cors_allowed_origins = vec![ORIGIN.to_owned()];
    let gw = TestGateway::start(
        cfg,
        std::sync::Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        )),
    )
    .await;
    let created = gw.create_session(KEY_A, json!({})).await;
    let session = created["sessionId"].as_str().expect("id");
    let token = created["uploadToken"].as_str().expect("token");
    let f = gw
        .register_json(
            token,
            session,
            json!({"fileName": "a.png", "sizeBytes": 8, "contentType": "image/png"}),
        )
        .await;
    let file = f["fileId"].as_str().expect("fileId");
    let png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    assert_eq!(
        gw.put_part(token, session, file, 1, png).await.status(),
        200
    );
    assert_eq!(gw.complete(token, session, file).await.status(), 200);
    gw.counting.hold_reads.send_replace(true);
    let res = gw
        .req(
            Method::POST,
            &format!("/v1/sessions/{session}/finalize"),
            token,
        )
        .header("Origin", ORIGIN)
        .send()
        .await
        .expect("send");
    gw.counting.hold_reads.send_replace(false);
    assert_eq!(
        res.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(ORIGIN)
    );
    problem(res, 503, "unavailable").await;
}
