//! End-user tokens (`../shared/API.md` v1.1, "End-user tokens") against the real binary, on
//! the in-memory store and on Redis. The tenant's keys are real EdDSA, ES256, RS256 and
//! HS256 keys made by `openssl` for each run; the tokens are signed with `jsonwebtoken`.
//! Valid tokens do a whole upload; forged, confused, expired, early and unknown-key tokens
//! are 401; each `upgate` claim limit answers its code; a user sees only its own sessions;
//! the per-user rate limit holds across two replicas sharing Redis; no token is logged.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::binary::Binary;
use common::*;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{json, Value};
use upgate_testkit::RedisServer;

const ISSUER: &str = "https://auth.j.example";
const KEY_J: &str = "key-tenant-j";

/// A signing key of the tenant's: its algorithm, `kid` and private key.
struct Signer {
    alg: Algorithm,
    kid: &'static str,
    key: EncodingKey,
}

/// The tenant's keys, the JWK Set file of their public halves, and an RSA public key in
/// PEM (what an attacker who read the JWK Set has).
struct Keys {
    signers: Vec<Signer>,
    rsa_public_pem: Vec<u8>,
    _dir: tempfile::TempDir,
    jwks_path: std::path::PathBuf,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn genpkey(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let path = path.to_str().expect("utf-8 path");
    let mut all = vec!["genpkey"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-out", path]);
    openssl(&all);
    std::fs::read(path).expect("key file")
}

/// Two Ed25519 keys (rotation: both in the set), one P-256, one RSA, one HMAC secret. The
/// second Ed25519 key and the RSA key omit `alg` in the set: their type decides.
fn make_keys() -> Keys {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ed1 = genpkey(d, "ed1.pem", &["-algorithm", "ed25519"]);
    let ed2 = genpkey(d, "ed2.pem", &["-algorithm", "ed25519"]);
    let ec = genpkey(
        d,
        "ec.pem",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let rsa = genpkey(
        d,
        "rsa.pem",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let rsa_path = d.join("rsa.pem");
    let rsa_public_pem = openssl(&["pkey", "-in", rsa_path.to_str().expect("utf-8"), "-pubout"]);
    let secret: Vec<u8> = (0..32).map(|_| rand_byte()).collect();
    let signers = [
        (Algorithm::EdDSA, "ed-old", EncodingKey::from_ed_pem(&ed1)),
        (Algorithm::EdDSA, "ed-new", EncodingKey::from_ed_pem(&ed2)),
        (Algorithm::ES256, "ec", EncodingKey::from_ec_pem(&ec)),
        (Algorithm::RS256, "rsa", EncodingKey::from_rsa_pem(&rsa)),
        (Algorithm::HS256, "hmac", EncodingKey::from_secret(&secret)),
    ]
    .into_iter()
    .map(|(alg, kid, key)| Signer {
        alg,
        kid,
        key: key.unwrap_or_else(|e| panic!("{kid}: {e}")),
    })
    .collect::<Vec<_>>();
    let keys = signers
        .iter()
        .map(|s| {
            let mut jwk = Jwk::from_encoding_key(&s.key, s.alg).expect("jwk");
            jwk.common.key_id = Some(s.kid.to_owned());
            if s.kid == "ed-new" || s.kid == "rsa" {
                jwk.common.key_algorithm = None;
            }
            jwk
        })
        .collect();
    let jwks_path = d.join("jwks.json");
    std::fs::write(
        &jwks_path,
        serde_json::to_vec(&JwkSet { keys }).expect("jwks json"),
    )
    .expect("write jwks");
    Keys {
        signers,
        rsa_public_pem,
        _dir: dir,
        jwks_path,
    }
}

fn rand_byte() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

fn now() -> i64 {
    upgate::model::now_ms() / 1000
}

impl Keys {
    fn signer(&self, kid: &str) -> &Signer {
        self.signers.iter().find(|s| s.kid == kid).expect("kid")
    }

    /// A token signed by `kid` with `claims` over the defaults (iss, aud, sub, exp).
    fn token(&self, kid: &str, sub: &str, extra: Value) -> String {
        let s = self.signer(kid);
        let mut claims = json!({
            "iss": ISSUER,
            "aud": "upgate",
            "sub": sub,
            "iat": now(),
            "exp": now() + 300,
        });
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        let mut header = Header::new(s.alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, &s.key).expect("sign")
    }
}

/// Tenant `j` (API key, JWTs of `keys`) in front of the test tenants.
fn tenant_j(keys: &Keys, end_user_rate_limit: &str) -> String {
    format!(
        r#"[[tenants]]
id = "j"
api_keys_sha256 = ["{key}"]
session_ttl_seconds = {{ default = 1800, min = 1, max = 86400 }}
rate_limit = {{ requests_per_second = 100000, burst = 100000 }}
{end_user_rate_limit}
[tenants.jwt]
issuer = "{ISSUER}"
audience = "upgate"
algorithms = ["EdDSA", "ES256", "RS256", "HS256"]
keys_file = "{jwks}"
leeway_seconds = 5
"#,
        key = upgate::config::Config::hash_key(KEY_J),
        jwks = keys.jwks_path.display(),
    )
}

fn start(redis: Option<&RedisServer>, extra: &str) -> Binary {
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

async fn call(
    client: &reqwest::Client,
    gw: &Binary,
    credential: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut rb = client.request(method, gw.url(path)).bearer_auth(credential);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    rb.send().await.expect("send")
}

async fn json_of(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    res.json().await.expect("json")
}

/// The whole upload with a JWT alone: create (owned), register, part, complete, finalize.
async fn upload_with(client: &reqwest::Client, gw: &Binary, jwt: &str, sub: &str) -> String {
    let created = json_of(
        call(
            client,
            gw,
            jwt,
            Method::POST,
            "/v1/sessions",
            Some(json!({})),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(created["owner"], sub);
    assert!(created["uploadToken"]
        .as_str()
        .is_some_and(|t| t.starts_with("upt_")));
    let session = created["sessionId"].as_str().expect("id").to_owned();
    let file = json_of(
        call(
            client,
            gw,
            jwt,
            Method::POST,
            &format!("/v1/sessions/{session}/files"),
            Some(json!({"fileName": "a.bin", "sizeBytes": 3})),
        )
        .await,
        201,
    )
    .await;
    let fp = format!(
        "/v1/sessions/{session}/files/{}",
        file["fileId"].as_str().expect("id")
    );
    let res = client
        .put(gw.url(&format!("{fp}/parts/1")))
        .bearer_auth(jwt)
        .body(b"abc".to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    let res = call(
        client,
        gw,
        jwt,
        Method::POST,
        &format!("{fp}/complete"),
        Some(json!({})),
    )
    .await;
    assert_eq!(res.status(), 200);
    let done = json_of(
        call(
            client,
            gw,
            jwt,
            Method::POST,
            &format!("/v1/sessions/{session}/finalize"),
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(done["status"], "finalized");
    assert_eq!(done["owner"], sub);
    session
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

async fn end_user_flow(redis: Option<RedisServer>) {
    let keys = make_keys();
    let gw = start(redis.as_ref(), &tenant_j(&keys, ""));
    let client = reqwest::Client::new();
    let mut seen = Vec::new();

    // Every algorithm, both keys of the rotation, with and without `alg` in the set.
    for kid in ["ed-old", "ed-new", "ec", "rsa", "hmac"] {
        let jwt = keys.token(kid, "user-a", json!({}));
        upload_with(&client, &gw, &jwt, "user-a").await;
        seen.push(jwt);
    }

    // Ownership: user B gets 404 on A's session; the API key sees it; A gets 404 on the
    // API key's session.
    let a = keys.token("ed-new", "user-a", json!({}));
    let b = keys.token("ec", "user-b", json!({}));
    seen.extend([a.clone(), b.clone()]);
    let mine = json_of(
        call(
            &client,
            &gw,
            &a,
            Method::POST,
            "/v1/sessions",
            Some(json!({})),
        )
        .await,
        201,
    )
    .await;
    let mine = mine["sessionId"].as_str().expect("id").to_owned();
    let file = json_of(
        call(
            &client,
            &gw,
            &a,
            Method::POST,
            &format!("/v1/sessions/{mine}/files"),
            Some(json!({"fileName": "x", "sizeBytes": 1})),
        )
        .await,
        201,
    )
    .await;
    let fid = file["fileId"].as_str().expect("id");
    for (method, path) in [
        (Method::GET, format!("/v1/sessions/{mine}")),
        (Method::POST, format!("/v1/sessions/{mine}/files")),
        (Method::GET, format!("/v1/sessions/{mine}/files/{fid}")),
        (
            Method::PUT,
            format!("/v1/sessions/{mine}/files/{fid}/parts/1"),
        ),
        (
            Method::POST,
            format!("/v1/sessions/{mine}/files/{fid}/complete"),
        ),
        (Method::POST, format!("/v1/sessions/{mine}/upload-tokens")),
        (Method::POST, format!("/v1/sessions/{mine}/finalize")),
        (Method::DELETE, format!("/v1/sessions/{mine}")),
        // Percent-encoded, the path still names A's session.
        (
            Method::GET,
            format!("/v1/sessions/%{:02x}{}", mine.as_bytes()[0], &mine[1..]),
        ),
    ] {
        let res = call(
            &client,
            &gw,
            &b,
            method.clone(),
            &path,
            Some(json!({"fileName": "y", "sizeBytes": 1})),
        )
        .await;
        problem(res, 404, "sessionNotFound").await;
    }
    let seen_by_key = json_of(
        call(
            &client,
            &gw,
            KEY_J,
            Method::GET,
            &format!("/v1/sessions/{mine}"),
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(seen_by_key["owner"], "user-a");
    let keys_own = json_of(
        call(
            &client,
            &gw,
            KEY_J,
            Method::POST,
            "/v1/sessions",
            Some(json!({})),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(keys_own["owner"], Value::Null);
    let keys_own = keys_own["sessionId"].as_str().expect("id");
    let res = call(
        &client,
        &gw,
        &a,
        Method::GET,
        &format!("/v1/sessions/{keys_own}"),
        None,
    )
    .await;
    problem(res, 404, "sessionNotFound").await;
    // A mints an upload token for its own session.
    let minted = json_of(
        call(
            &client,
            &gw,
            &a,
            Method::POST,
            &format!("/v1/sessions/{mine}/upload-tokens"),
            Some(json!({})),
        )
        .await,
        201,
    )
    .await;
    seen.push(minted["uploadToken"].as_str().expect("token").to_owned());

    // Refused tokens: 401 `invalid_token`.
    let claims = |extra: Value| keys.token("ed-old", "user-a", extra);
    let header_none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(
        json!({"iss": ISSUER, "aud": "upgate", "sub": "user-a", "exp": now() + 300})
            .to_string()
            .as_bytes(),
    );
    let confused = {
        // The RSA public key (public: it is in the JWK Set) used as an HMAC secret.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa".into());
        jsonwebtoken::encode(
            &h,
            &json!({"iss": ISSUER, "aud": "upgate", "sub": "user-a", "exp": now() + 300}),
            &EncodingKey::from_secret(&keys.rsa_public_pem).expect("key"),
        )
        .expect("sign")
    };
    let unknown_kid = {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some("retired".into());
        jsonwebtoken::encode(
            &h,
            &json!({"iss": ISSUER, "aud": "upgate", "sub": "user-a", "exp": now() + 300}),
            &keys.signer("ed-old").key,
        )
        .expect("sign")
    };
    let good = claims(json!({}));
    let mut tampered = good.clone();
    let flip = if tampered.ends_with('A') { "B" } else { "A" };
    tampered.replace_range(tampered.len() - 1.., flip);
    let refused = [
        ("alg none", format!("{header_none}.{payload}.")),
        ("RS256 public key as HS256 secret", confused),
        ("wrong iss", claims(json!({"iss": "https://evil.example"}))),
        ("wrong aud", claims(json!({"aud": "someone-else"}))),
        ("no aud", claims(json!({"aud": null}))),
        ("expired", claims(json!({"exp": now() - 60}))),
        ("not yet valid", claims(json!({"nbf": now() + 120}))),
        ("issued in the future", claims(json!({"iat": now() + 120}))),
        ("no sub", claims(json!({"sub": null}))),
        ("no exp", claims(json!({"exp": null}))),
        ("unknown kid", unknown_kid),
        ("tampered signature", tampered),
        (
            "bad upgate claim",
            claims(json!({"upgate": {"maxFiles": "many"}})),
        ),
    ];
    for (what, jwt) in &refused {
        let res = call(
            &client,
            &gw,
            jwt,
            Method::POST,
            "/v1/sessions",
            Some(json!({})),
        )
        .await;
        assert_eq!(
            res.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer error=\"invalid_token\""),
            "{what}"
        );
        problem(res, 401, "unauthorized").await;
        seen.push(jwt.clone());
    }
    // Within the leeway, still valid.
    let res = call(
        &client,
        &gw,
        &claims(json!({"exp": now() - 2})),
        Method::GET,
        &format!("/v1/sessions/{mine}"),
        None,
    )
    .await;
    assert_eq!(res.status(), 200);

    // The `upgate` claim's limits, each under the tenant's.
    let limited = keys.token(
        "rsa",
        "user-c",
        json!({"upgate": {"maxFiles": 1, "maxFileSizeBytes": 10, "maxTtlSeconds": 60,
                          "allowedContentTypes": ["image/*"], "maxSessions": 1}}),
    );
    seen.push(limited.clone());
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        "/v1/sessions",
        Some(json!({"ttlSeconds": 600})),
    )
    .await;
    problem(res, 400, "validationFailed").await;
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        "/v1/sessions",
        Some(json!({"maxFiles": 2})),
    )
    .await;
    problem(res, 400, "validationFailed").await;
    let s = json_of(
        call(
            &client,
            &gw,
            &limited,
            Method::POST,
            "/v1/sessions",
            Some(json!({})),
        )
        .await,
        201,
    )
    .await;
    let created = time::OffsetDateTime::parse(
        s["createdAt"].as_str().expect("createdAt"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let expires = time::OffsetDateTime::parse(
        s["expiresAt"].as_str().expect("expiresAt"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    assert!(
        (expires - created).whole_seconds() <= 60,
        "maxTtlSeconds caps the default TTL"
    );
    let sid = s["sessionId"].as_str().expect("id").to_owned();
    let files = format!("/v1/sessions/{sid}/files");
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        &files,
        Some(json!({"fileName": "big.png", "sizeBytes": 11, "contentType": "image/png"})),
    )
    .await;
    let p = problem(res, 413, "fileTooLarge").await;
    assert_eq!(p["maxSizeBytes"], 10);
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        &files,
        Some(json!({"fileName": "a.txt", "sizeBytes": 5, "contentType": "text/plain"})),
    )
    .await;
    let p = problem(res, 415, "contentTypeNotAllowed").await;
    assert_eq!(p["allowed"], json!(["image/*"]));
    // The session keeps the token's file limits: its upload token (and the API key) meet
    // them too.
    let upload_token = s["uploadToken"].as_str().expect("uploadToken").to_owned();
    seen.push(upload_token.clone());
    for credential in [upload_token.as_str(), KEY_J] {
        let res = call(
            &client,
            &gw,
            credential,
            Method::POST,
            &files,
            Some(json!({"fileName": "big.png", "sizeBytes": 11, "contentType": "image/png"})),
        )
        .await;
        let p = problem(res, 413, "fileTooLarge").await;
        assert_eq!(p["maxSizeBytes"], 10);
        for ct in [json!("text/plain"), Value::Null] {
            let res = call(
                &client,
                &gw,
                credential,
                Method::POST,
                &files,
                Some(json!({"fileName": "a.txt", "sizeBytes": 5, "contentType": ct})),
            )
            .await;
            let p = problem(res, 415, "contentTypeNotAllowed").await;
            assert_eq!(p["allowed"], json!(["image/*"]));
        }
    }
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        &files,
        Some(json!({"fileName": "a.png", "sizeBytes": 5, "contentType": "image/png"})),
    )
    .await;
    assert_eq!(res.status(), 201);
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        &files,
        Some(json!({"fileName": "b.png", "sizeBytes": 5, "contentType": "image/png"})),
    )
    .await;
    problem(res, 400, "fileCountExceeded").await;
    // maxSessions: a second live session is refused until the first is deleted.
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        "/v1/sessions",
        Some(json!({})),
    )
    .await;
    problem(res, 429, "quotaExceeded").await;
    // Deleted with the API key: the user's count goes too.
    let res = call(
        &client,
        &gw,
        KEY_J,
        Method::DELETE,
        &format!("/v1/sessions/{sid}"),
        None,
    )
    .await;
    assert_eq!(res.status(), 204);
    let res = call(
        &client,
        &gw,
        &limited,
        Method::POST,
        "/v1/sessions",
        Some(json!({})),
    )
    .await;
    assert_eq!(res.status(), 201);
    // The tenant's own limits still apply to an unlimited token, and the API key is not
    // limited by any user's claim.
    let res = call(
        &client,
        &gw,
        KEY_J,
        Method::POST,
        "/v1/sessions",
        Some(json!({})),
    )
    .await;
    assert_eq!(res.status(), 201);

    // No token or key in any log line of the whole run (debug level, JSON).
    let logs = gw.stdout();
    assert!(logs.lines().count() > 20, "the run logged: {logs}");
    for t in &seen {
        assert!(!logs.contains(t.as_str()), "a token is in the logs");
        // Its signature alone neither.
        if let Some(sig) = t.rsplit('.').next().filter(|s| s.len() > 16) {
            assert!(!logs.contains(sig), "a token's signature is in the logs");
        }
    }
    assert!(!logs.contains(KEY_J), "the API key is in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_users_with_jwts_on_the_memory_store() {
    end_user_flow(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_users_with_jwts_on_redis() {
    end_user_flow(Some(RedisServer::start())).await;
}

/// `end_user_rate_limit` is one budget per user shared by every replica: two replicas on
/// one Redis admit no more of one user's requests together than the limit allows, while
/// another user of the same tenant and the tenant's API key go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_rate_limit_holds_across_two_replicas() {
    let redis = RedisServer::start();
    let keys = make_keys();
    let extra = tenant_j(
        &keys,
        "end_user_rate_limit = { requests_per_second = 1, burst = 10 }",
    );
    let replicas = [start(Some(&redis), &extra), start(Some(&redis), &extra)];
    let client = reqwest::Client::new();
    let a = keys.token("ed-old", "user-a", json!({}));
    let session = json_of(
        call(
            &client,
            &replicas[0],
            &a,
            Method::POST,
            "/v1/sessions",
            Some(json!({})),
        )
        .await,
        201,
    )
    .await;
    let path = format!(
        "/v1/sessions/{}",
        session["sessionId"].as_str().expect("id")
    );
    let started = std::time::Instant::now();
    let sends = (0..60).map(|i| {
        let (client, a, path) = (client.clone(), a.clone(), path.clone());
        let url = replicas[i % 2].url(&path);
        async move {
            client
                .get(url)
                .bearer_auth(&a)
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(sends).await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(admitted + limited, 60, "{statuses:?}");
    // The burst of 10 (the session's creation took one), plus 1 per second elapsed.
    let allowed = 10.0 + elapsed.ceil();
    assert!(
        admitted as f64 <= allowed,
        "{admitted} admitted in {elapsed:.2} s across two replicas; the limit allows {allowed}"
    );
    assert!(admitted >= 5, "only {admitted} admitted");
    // Another user and the tenant's key are not limited by user A's budget.
    let b = keys.token("ec", "user-b", json!({}));
    for gw in &replicas {
        let res = call(
            &client,
            gw,
            &b,
            Method::POST,
            "/v1/sessions",
            Some(json!({})),
        )
        .await;
        assert_eq!(res.status(), 201);
        let res = call(&client, gw, KEY_J, Method::GET, &path, None).await;
        assert_eq!(res.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = call(&client, &replicas[1], &a, Method::GET, &path, None).await;
    assert_eq!(res.status(), 200, "user A's budget refills");
}
