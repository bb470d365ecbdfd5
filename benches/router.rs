//! The whole API stack in process: one `POST /v1/sessions/{id}/files` through the router
//! the gateway serves (request id, trace span, metrics, auth, CORS, rate limit,
//! idempotency pass-through, expiry, count limit, JSON validation, the in-memory store,
//! the JSON response), against a bare axum router answering the same JSON. No sockets and
//! no Redis, so the figure is the gateway's own CPU per registration, steady enough to
//! compare two builds (the load test in `benches/load/` measures the whole system).
//!
//! `get_session/*` does the same for `GET /v1/sessions/{id}` on a session without files: no
//! state grows, so it is the steadier figure for comparing two builds of the stack.
//!
//! `*/full_stack_upload_token` make the same requests with the session's upload token
//! instead of the API key, and `upload_token/verify` checks one token alone.
//! `end_user_jwt/verify_*` verifies one end-user JWT per algorithm (keys made by `openssl`
//! for the run), `verify_cached` a token verified before (what every request of an upload
//! after the first costs), `get_session/full_stack_end_user_jwt` is the GET with an EdDSA JWT.
//!
//! `cargo bench --bench router`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, StatusCode};
use tower::ServiceExt;
use upgate::config::Config;

/// The `upgate` binary's allocator, so the figure is the deployed one.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "bench-key";
const ISSUER: &str = "https://auth.bench.example";

/// The tenant's JWT signing keys (one per algorithm, made by `openssl` once per run) and
/// the JWK Set file of their public halves.
struct JwtKeys {
    signers: Vec<(jsonwebtoken::Algorithm, String, jsonwebtoken::EncodingKey)>,
    jwks: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn jwt_keys() -> &'static JwtKeys {
    static KEYS: std::sync::OnceLock<JwtKeys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        use jsonwebtoken::{Algorithm, EncodingKey};
        let dir = tempfile::tempdir().expect("tempdir");
        let gen = |name: &str, args: &[&str]| {
            let path = dir.path().join(name);
            let status = std::process::Command::new("openssl")
                .arg("genpkey")
                .args(args)
                .arg("-out")
                .arg(&path)
                .status()
                .expect("openssl");
            assert!(status.success());
            std::fs::read(path).expect("key")
        };
        let ed = gen("ed.pem", &["-algorithm", "ed25519"]);
        let ec = gen(
            "ec.pem",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        );
        let rsa = gen(
            "rsa.pem",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let signers = vec![
            (
                Algorithm::EdDSA,
                "ed".to_owned(),
                EncodingKey::from_ed_pem(&ed).expect("ed"),
            ),
            (
                Algorithm::ES256,
                "ec".to_owned(),
                EncodingKey::from_ec_pem(&ec).expect("ec"),
            ),
            (
                Algorithm::RS256,
                "rsa".to_owned(),
                EncodingKey::from_rsa_pem(&rsa).expect("rsa"),
            ),
            (
                Algorithm::HS256,
                "hmac".to_owned(),
                EncodingKey::from_secret(&[9u8; 32]).expect("secret"),
            ),
        ];
        let keys = signers
            .iter()
            .map(|(alg, kid, key)| {
                let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(key, *alg).expect("jwk");
                jwk.common.key_id = Some(kid.clone());
                jwk
            })
            .collect();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(
            &jwks,
            serde_json::to_vec(&jsonwebtoken::jwk::JwkSet { keys }).expect("json"),
        )
        .expect("write");
        JwtKeys {
            signers,
            jwks,
            _dir: dir,
        }
    })
}

/// An end-user token of `sub` signed by the key of `alg`, valid for a day.
fn jwt(alg: jsonwebtoken::Algorithm, sub: &str) -> String {
    let (_, kid, key) = jwt_keys()
        .signers
        .iter()
        .find(|(a, _, _)| *a == alg)
        .expect("a key of alg");
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.clone());
    let exp = upgate::model::now_ms() / 1000 + 86_400;
    jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": ISSUER, "sub": sub, "exp": exp}),
        key,
    )
    .expect("sign")
}

fn config() -> Config {
    let toml = format!(
        r#"
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        reaper_interval_seconds = 3600
        [[tenants]]
        id = "bench"
        api_keys_sha256 = ["{}"]
        max_files_per_session = 1000000
        rate_limit = {{ requests_per_second = 1000000, burst = 10000000 }}
        end_user_rate_limit = {{ requests_per_second = 1000000, burst = 10000000 }}
        [tenants.jwt]
        issuer = "{ISSUER}"
        algorithms = ["EdDSA", "ES256", "RS256", "HS256"]
        keys_file = "{}"
        "#,
        Config::hash_key(KEY),
        jwt_keys().jwks.display()
    );
    Config::from_toml(&toml, |_| None, false).expect("bench config")
}

fn register_request(session: &str, n: u64) -> Request<Body> {
    register_request_with(session, n, KEY)
}

fn register_request_with(session: &str, n: u64, credential: &str) -> Request<Body> {
    Request::post(format!("/v1/sessions/{session}/files"))
        .header("authorization", format!("Bearer {credential}"))
        .header("content-type", "application/json")
        .body(Body::from(format!(
            r#"{{"fileName":"file-{n}.bin","sizeBytes":10485760,"contentType":"application/octet-stream"}}"#
        )))
        .expect("request")
}

/// Registrations per session before the register bench moves to the next one.
const FILES_PER_SESSION: u64 = 900_000;
/// Sessions the register bench fills (16 × 900,000 registrations before it would wrap).
const FILLED_SESSIONS: usize = 16;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (router, sessions, tokens, empty_session, empty_token) = rt.block_on(async {
        let config = config();
        let store = Arc::new(upgate::store::memory::MemoryStore::new(
            config.session_retention,
        ));
        let storage = Arc::new(
            upgate::storage::fs::FsStore::new(dir.path())
                .await
                .expect("fs store"),
        );
        let gw = upgate::Gateway::with_backends(config, store, storage);
        let router = gw.router();
        // Sessions the registrations fill (a new one every FILES_PER_SESSION, below the
        // tenant's 1,000,000-file cap, so long runs do not hit fileCountExceeded), and one
        // that stays empty for the GET pair.
        let mut ids = Vec::new();
        let mut tokens = Vec::new();
        for _ in 0..=FILLED_SESSIONS {
            let v = create_session(&router, KEY).await;
            ids.push(v["sessionId"].as_str().expect("sessionId").to_owned());
            tokens.push(v["uploadToken"].as_str().expect("uploadToken").to_owned());
        }
        let empty = ids.pop().expect("an empty session");
        let empty_token = tokens.pop().expect("its token");
        (router, ids, tokens, empty, empty_token)
    });
    let n = AtomicU64::new(0);
    let mut group = c.benchmark_group("router");
    group.bench_function("register_file/full_stack_memory_store", |b| {
        b.to_async(&rt).iter(|| async {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let session = &sessions[(i / FILES_PER_SESSION) as usize % sessions.len()];
            call(&router, register_request(session, i), StatusCode::CREATED).await
        })
    });
    group.bench_function("register_file/full_stack_upload_token", |b| {
        b.to_async(&rt).iter(|| async {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let k = (i / FILES_PER_SESSION) as usize % sessions.len();
            call(
                &router,
                register_request_with(&sessions[k], i, &tokens[k]),
                StatusCode::CREATED,
            )
            .await
        })
    });
    let bare = axum::Router::new().route(
        "/v1/sessions/{id}/files",
        axum::routing::post(
            |axum::extract::Path(id): axum::extract::Path<String>,
             axum::Json(v): axum::Json<serde_json::Value>| async move {
                (
                    StatusCode::CREATED,
                    axum::Json(serde_json::json!({
                        "fileId": uuid::Uuid::now_v7().to_string(),
                        "sessionId": id,
                        "fileName": v["fileName"],
                        "sizeBytes": v["sizeBytes"],
                        "status": "pending",
                    })),
                )
            },
        ),
    );
    group.bench_function("register_file/bare_axum_same_json", |b| {
        b.to_async(&rt).iter(|| async {
            let i = n.fetch_add(1, Ordering::Relaxed);
            call(
                &bare,
                register_request(&sessions[0], i),
                StatusCode::CREATED,
            )
            .await
        })
    });
    // Read-only: no state grows, so this is the steadier figure for comparing two builds.
    group.bench_function("get_session/full_stack_memory_store", |b| {
        b.to_async(&rt)
            .iter(|| async { call(&router, get_request(&empty_session), StatusCode::OK).await })
    });
    group.bench_function("get_session/full_stack_upload_token", |b| {
        b.to_async(&rt).iter(|| async {
            call(
                &router,
                get_request_with(&empty_session, &empty_token),
                StatusCode::OK,
            )
            .await
        })
    });
    let user_jwt = jwt(jsonwebtoken::Algorithm::EdDSA, "user-1");
    let owned_session = rt.block_on(async {
        let v = create_session(&router, &user_jwt).await;
        v["sessionId"].as_str().expect("sessionId").to_owned()
    });
    group.bench_function("get_session/full_stack_end_user_jwt", |b| {
        b.to_async(&rt).iter(|| async {
            call(
                &router,
                get_request_with(&owned_session, &user_jwt),
                StatusCode::OK,
            )
            .await
        })
    });
    let bare_get = axum::Router::new().route(
        "/v1/sessions/{id}",
        axum::routing::get(
            |axum::extract::Path(id): axum::extract::Path<String>| async move {
                axum::Json(serde_json::json!({
                    "sessionId": id,
                    "status": "active",
                    "partSizeBytes": 5242880,
                    "maxFiles": null,
                    "fileCount": 0,
                    "createdAt": "2026-11-27T00:00:00Z",
                    "expiresAt": "2026-11-27T01:00:00Z",
                    "metadata": {},
                    "files": [],
                }))
            },
        ),
    );
    group.bench_function("get_session/bare_axum_same_json", |b| {
        b.to_async(&rt)
            .iter(|| async { call(&bare_get, get_request(&empty_session), StatusCode::OK).await })
    });
    group.finish();

    let mut group = c.benchmark_group("end_user_jwt");
    let tenants: Vec<Arc<upgate::config::TenantConfig>> =
        config().tenants.into_iter().map(Arc::new).collect();
    let end_users = upgate::jwt::EndUserTokens::new(&tenants);
    let now = u64::try_from(upgate::model::now_ms() / 1000).expect("time");
    for (name, alg) in [
        ("verify_eddsa", jsonwebtoken::Algorithm::EdDSA),
        ("verify_es256", jsonwebtoken::Algorithm::ES256),
        ("verify_rs256", jsonwebtoken::Algorithm::RS256),
        ("verify_hs256", jsonwebtoken::Algorithm::HS256),
    ] {
        let token = jwt(alg, "user-1");
        group.bench_function(name, |b| {
            b.iter(|| {
                end_users
                    .verify_uncached(std::hint::black_box(&token), now)
                    .expect("valid")
            })
        });
    }
    // A token seen before: one SHA-256 and one lookup.
    let token = jwt(jsonwebtoken::Algorithm::EdDSA, "user-1");
    group.bench_function("verify_cached", |b| {
        b.iter(|| {
            end_users
                .verify(std::hint::black_box(&token), now)
                .expect("valid")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("upload_token");
    let keys = upgate::tokens::UploadTokens::configured(&[vec![7u8; 32]]);
    let token = keys
        .mint("bench", &empty_session, i64::MAX / 2)
        .expect("mint");
    group.bench_function("verify", |b| {
        b.iter(|| keys.verify(std::hint::black_box(&token), 0).expect("valid"))
    });
    group.bench_function("mint", |b| {
        b.iter(|| keys.mint("bench", &empty_session, i64::MAX / 2))
    });
    group.finish();
}

/// `POST /v1/sessions` (one hour) with `credential`; the created session's JSON.
async fn create_session(router: &axum::Router, credential: &str) -> serde_json::Value {
    let req = Request::post("/v1/sessions")
        .header("authorization", format!("Bearer {credential}"))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"ttlSeconds":3600}"#))
        .expect("request");
    let body = call(router, req, StatusCode::CREATED).await;
    serde_json::from_slice(&body).expect("json")
}

/// One request through `router`, its status checked and its body read to the end.
async fn call(router: &axum::Router, req: Request<Body>, expected: StatusCode) -> bytes::Bytes {
    let res = router.clone().oneshot(req).await.expect("response");
    assert_eq!(res.status(), expected);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes()
}

fn get_request(session: &str) -> Request<Body> {
    get_request_with(session, KEY)
}

fn get_request_with(session: &str, credential: &str) -> Request<Body> {
    Request::get(format!("/v1/sessions/{session}"))
        .header("authorization", format!("Bearer {credential}"))
        .body(Body::empty())
        .expect("request")
}

criterion_group!(benches, bench);
criterion_main!(benches);
