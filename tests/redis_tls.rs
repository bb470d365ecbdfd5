//! Redis over TLS (`rediss://`, API.md v1.1 "Deployments"): a real `redis-server` started with
//! `--tls-port` and certificates generated in the test (rcgen).

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;
use upgate::config::{Config, RedisTarget};
use upgate_testkit::tls::{TestCerts, TlsRedis};

async fn tls_gateway(url: String, ca: Option<Vec<u8>>) -> TestGateway {
    let mut cfg = config("");
    cfg.redis = Some(RedisTarget::Single(url));
    cfg.redis_ca = ca;
    let store = upgate::build_store(&cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    TestGateway::start(cfg, store).await
}

/// Creating a session answers 503 `unavailable` (Redis is out of reach).
async fn create_is_unavailable(gw: &TestGateway) {
    let res = gw
        .req(Method::POST, "/v1/sessions", KEY_A)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    problem(res, 503, "unavailable").await;
}

fn ca_of(redis: &TlsRedis) -> Vec<u8> {
    std::fs::read(redis.certs.ca_file()).expect("ca.pem")
}

/// A whole upload through a gateway whose only way to Redis is TLS, verified against the
/// test's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_upload_over_tls() {
    let redis = TlsRedis::start();
    let gw = tls_gateway(redis.url(None), Some(ca_of(&redis))).await;
    let session = gw.session_id(KEY_A, json!({})).await;
    let file = gw.register_id(KEY_A, &session, "t.bin", 3).await;
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, b"abc".to_vec())
            .await
            .status(),
        200
    );
    assert_eq!(gw.complete(KEY_A, &session, &file).await.status(), 200);
    assert_eq!(gw.finalize(KEY_A, &session).await.status(), 200);
    assert_eq!(gw.readyz().await, 200);
}

/// An ACL user with a password in the URL works; a wrong password is 503 like an outage;
/// the password is in no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_and_password_in_the_url_never_logged() {
    const PASSWORD: &str = "s3cret-Pa55word-for-upgate";
    let redis = TlsRedis::start();
    let client = redis::Client::open(redis.server.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("plain connection");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("app")
        .arg("on")
        .arg(format!(">{PASSWORD}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut con)
        .await
        .expect("ACL SETUSER");
    let gw = tls_gateway(redis.url(Some(("app", PASSWORD))), Some(ca_of(&redis))).await;
    let session = gw.session_id(KEY_A, json!({})).await;
    gw.register_id(KEY_A, &session, "a.bin", 1).await;
    let wrong = tls_gateway(
        redis.url(Some(("app", "not-the-password"))),
        Some(ca_of(&redis)),
    )
    .await;
    create_is_unavailable(&wrong).await;
    let logs =
        String::from_utf8_lossy(&logs().lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(!logs.is_empty(), "the gateways logged");
    assert!(!logs.contains(PASSWORD), "the password is in a log line");
    assert!(
        !logs.contains("not-the-password"),
        "the wrong password is in a log line"
    );
    let debug = format!(
        "{:?}",
        RedisTarget::Single(redis.url(Some(("app", PASSWORD))))
    );
    assert!(!debug.contains(PASSWORD), "{debug}");
}

/// A server certificate the configured CA did not sign: the gateway starts, is not ready, and
/// answers 503 `unavailable`; the log says the certificate did not verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_is_an_outage_and_says_so() {
    let redis = TlsRedis::start();
    let other = TestCerts::generate();
    let wrong_ca = std::fs::read(other.ca_file()).expect("other ca");
    let gw = tls_gateway(redis.url(None), Some(wrong_ca)).await;
    // Reported at start, before any request.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let at_start = log_lines_with("not reachable at start");
        if at_start
            .iter()
            .any(|l| l.to_string().to_ascii_lowercase().contains("certificate"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no start-up log line says the certificate did not verify: {at_start:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    create_is_unavailable(&gw).await;
    assert_eq!(gw.readyz().await, 503);
    let mentions: Vec<_> = log_lines_with("certificate");
    assert!(
        !mentions.is_empty(),
        "no log line says the certificate did not verify"
    );
}

/// `redis_ca_file` is read at start-up: a missing file, a file without a certificate, or a
/// CA for a Redis that is not reached over TLS are configuration errors, reported together.
#[test]
fn redis_ca_file_problems_are_start_up_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").expect("write");
    let parse = |extra: String| {
        Config::from_toml(&config_toml(&extra), |_| None, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = parse(format!(
        "redis_url = \"rediss://127.0.0.1:1\"\nredis_ca_file = \"{}\"\n",
        dir.path().join("missing.pem").display()
    ));
    assert!(e.contains("redis_ca_file"), "{e}");
    let e = parse(format!(
        "redis_url = \"rediss://127.0.0.1:1\"\nredis_ca_file = \"{}\"\n",
        empty.display()
    ));
    assert!(e.contains("no PEM certificate"), "{e}");
    let certs = TestCerts::generate();
    let e = parse(format!(
        "redis_url = \"redis://127.0.0.1:1\"\nredis_ca_file = \"{}\"\n",
        certs.ca_file().display()
    ));
    assert!(e.contains("not reached over TLS"), "{e}");
    let e = parse("redis_url = \"http://u:hunter2@127.0.0.1:1\"\n".into());
    assert!(e.contains("must start with redis:// or rediss://"), "{e}");
    assert!(
        !e.contains("hunter2"),
        "the password is in the message: {e}"
    );
    // A rediss:// URL with the system's roots is accepted as configuration.
    assert_eq!(parse("redis_url = \"rediss://127.0.0.1:1\"\n".into()), "");
}
