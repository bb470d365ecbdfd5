//! Runs `examples/tonic_grpc.rs`: a real tonic server and client over loopback TCP.

#[path = "../examples/tonic_grpc.rs"]
mod example;

use std::sync::atomic::Ordering;

use tonic::Code;
use upgate_layers::rate_limit::Quota;

async fn start(quota: Quota) -> (std::net::SocketAddr, example::Greeter) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let greeter = example::Greeter::default();
    tokio::spawn(example::serve(listener, greeter.clone(), quota));
    (addr, greeter)
}

/// Over its quota a tenant's call fails with RESOURCE_EXHAUSTED, the IETF headers in the
/// status' metadata; another tenant is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_calls_get_resource_exhausted_with_the_ietf_headers() {
    let (addr, greeter) = start(Quota::new(1, 3)).await;
    for i in 0..3 {
        let res = example::say_hello(addr, "a", &[("x-tenant", "acme")])
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
        assert_eq!(res.get_ref().message, "hello, a");
        assert!(
            res.metadata().get("ratelimit").is_some(),
            "admitted calls carry RateLimit"
        );
    }
    let status = example::say_hello(addr, "a", &[("x-tenant", "acme")])
        .await
        .expect_err("over quota");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let md = status.metadata();
    assert_eq!(
        md.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(
        md.get("ratelimit-policy").and_then(|v| v.to_str().ok()),
        Some("\"default\";q=3;w=3")
    );
    assert!(md
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("\"default\";r=0;")));
    assert_eq!(
        greeter.calls.load(Ordering::SeqCst),
        3,
        "the refused call never ran"
    );
    let other = example::say_hello(addr, "b", &[("x-tenant", "globex")]).await;
    assert!(other.is_ok(), "another tenant's key: {other:?}");
}

/// A call repeated with the same idempotency key gets the stored response (the service runs
/// once); the same key with another message is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_idempotency_key_returns_the_stored_response() {
    let (addr, greeter) = start(Quota::new(100, 100)).await;
    let md = [("x-tenant", "acme"), ("idempotency-key", "order-7")];
    let first = example::say_hello(addr, "world", &md).await.expect("first");
    assert_eq!(first.get_ref().calls, 1);
    assert!(first.metadata().get("idempotent-replayed").is_none());
    for _ in 0..3 {
        let again = example::say_hello(addr, "world", &md)
            .await
            .expect("replay");
        assert_eq!(again.get_ref(), first.get_ref(), "the stored response");
        assert_eq!(
            again
                .metadata()
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok()),
            Some("true")
        );
    }
    assert_eq!(
        greeter.calls.load(Ordering::SeqCst),
        1,
        "the service ran once"
    );
    let status = example::say_hello(addr, "someone else", &md)
        .await
        .expect_err("same key, another request");
    assert_eq!(status.code(), Code::FailedPrecondition);
    // Another tenant's same key is its own.
    let theirs = example::say_hello(
        addr,
        "world",
        &[("x-tenant", "globex"), ("idempotency-key", "order-7")],
    )
    .await
    .expect("other tenant");
    assert_eq!(theirs.get_ref().calls, 2);
}

/// A failed call is stored too (gRPC reports it in a 200 response): its replay is the same
/// failure, status and message, and the service does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_failure_is_the_same_failure() {
    let (addr, greeter) = start(Quota::new(100, 100)).await;
    let md = [("x-tenant", "acme"), ("idempotency-key", "bad-1")];
    let first = example::say_hello(addr, "", &md)
        .await
        .expect_err("empty name");
    assert_eq!(first.code(), Code::InvalidArgument);
    let again = example::say_hello(addr, "", &md)
        .await
        .expect_err("replayed");
    assert_eq!(again.code(), Code::InvalidArgument);
    assert_eq!(again.message(), first.message());
    assert_eq!(
        again
            .metadata()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(greeter.calls.load(Ordering::SeqCst), 1);
}
