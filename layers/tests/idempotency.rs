#![cfg(feature = "idempotency")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use upgate_layers::idempotency::{IdempotencyLayer, IdempotencyStore, InMemory};

type Body = Full<Bytes>;

fn scope(req: &Request<Body>) -> Option<String> {
    req.headers()
        .get("x-tenant")?
        .to_str()
        .ok()
        .map(|t| format!("{{{t}}}"))
}

fn req(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::post("/uploads?x=1").header("x-tenant", "acme");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// An inner service that counts calls, waits a little (so concurrent requests
/// overlap), echoes the body and answers with the status in `x-status` (default 201).
fn inner(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync {
    service_fn(move |req: Request<Body>| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let status = req
                .headers()
                .get("x-status")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(201u16);
            if status == 999 {
                return Err::<Response<Body>, BoxError>("inner failed".into());
            }
            let body = req.into_body().collect().await?.to_bytes();
            let mut res = Response::new(Body::new(body));
            *res.status_mut() = StatusCode::from_u16(status)?;
            res.headers_mut()
                .insert("location", format!("/uploads/{n}").parse()?);
            res.headers_mut()
                .insert("content-type", "application/json".parse()?);
            res.headers_mut().insert("x-not-stored", "1".parse()?);
            Ok(res)
        }
    })
}

async fn body_of<B>(res: Response<B>) -> Bytes
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

async fn one_key_many_concurrent<St: IdempotencyStore>(store: St) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(scope, store).layer(inner(calls.clone()));
    let futures = (0..100).map(|_| svc.clone().oneshot(req(Some("k-1"), "{\"a\":1}")));
    let results = futures_util::future::join_all(futures).await;
    let mut created = 0;
    let mut conflict = 0;
    for r in results {
        let res = r.unwrap();
        match res.status() {
            StatusCode::CREATED => {
                created += 1;
                assert_eq!(body_of(res).await, "{\"a\":1}");
            }
            StatusCode::CONFLICT => conflict += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "inner service ran exactly once"
    );
    assert_eq!(created, 1);
    assert_eq!(conflict, 99);

    // After completion: replay with stored headers only, plus Idempotent-Replayed.
    let res = svc
        .clone()
        .oneshot(req(Some("k-1"), "{\"a\":1}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.headers()["location"], "/uploads/0");
    assert_eq!(res.headers()["content-type"], "application/json");
    assert!(res.headers().get("x-not-stored").is_none());
    assert_eq!(body_of(res).await, "{\"a\":1}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Same key, different body: 422.
    let res = svc
        .clone()
        .oneshot(req(Some("k-1"), "{\"a\":2}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Same key in another scope is independent.
    let mut other = req(Some("k-1"), "{\"a\":2}");
    other
        .headers_mut()
        .insert("x-tenant", "other".parse().unwrap());
    assert_eq!(
        svc.clone().oneshot(other).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn in_memory_one_key_100_concurrent() {
    one_key_many_concurrent(InMemory::new()).await;
}

#[tokio::test(start_paused = true)]
async fn passthrough_and_validation() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(scope, InMemory::new())
        .body_limit(8)
        .layer(inner(calls.clone()));
    // No key: passes through every time.
    for _ in 0..2 {
        let res = svc.clone().oneshot(req(None, "x")).await.unwrap();
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    // GET is not deduplicated.
    let get = Request::get("/")
        .header("x-tenant", "a")
        .header("idempotency-key", "g")
        .body(Body::default())
        .unwrap();
    svc.clone().oneshot(get).await.unwrap();
    // No scope: passes through.
    let no_scope = Request::post("/")
        .header("idempotency-key", "s")
        .body(Body::default())
        .unwrap();
    svc.clone().oneshot(no_scope).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    let long = "a".repeat(256);
    for bad in ["", "a b", long.as_str(), "\"\""] {
        let res = svc.clone().oneshot(req(Some(bad), "x")).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "key {bad:?}");
    }
    let res = svc
        .clone()
        .oneshot(req(Some("big"), "123456789"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn failures_are_not_stored_and_release_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(InMemory::new());
    let svc = IdempotencyLayer::with_shared_store(scope, store.clone()).layer(inner(calls.clone()));
    let with_status = |key: &str, status: &str| {
        let mut r = req(Some(key), "b");
        r.headers_mut().insert("x-status", status.parse().unwrap());
        r
    };
    for status in ["500", "503", "429"] {
        let res = svc.clone().oneshot(with_status("k", status)).await.unwrap();
        assert_eq!(res.status().as_str(), status);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    // Inner error: released too.
    assert!(svc.clone().oneshot(with_status("k", "999")).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(store.is_empty());
    // 4xx other than 429 is stored.
    let res = svc.clone().oneshot(with_status("k", "404")).await.unwrap();
    assert_eq!(res.status(), 404);
    let res = svc.clone().oneshot(with_status("k", "404")).await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn oversized_responses_are_not_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(InMemory::new());
    let svc = IdempotencyLayer::with_shared_store(scope, store.clone())
        .response_limit(3)
        .layer(inner(calls.clone()));
    let res = svc
        .clone()
        .oneshot(req(Some("k"), "long body"))
        .await
        .unwrap();
    assert_eq!(body_of(res).await, "long body");
    assert!(store.is_empty());
    let res = svc
        .clone()
        .oneshot(req(Some("k"), "long body"))
        .await
        .unwrap();
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn dropped_request_releases_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(InMemory::new());
    let svc = IdempotencyLayer::with_shared_store(scope, store.clone()).layer(inner(calls.clone()));
    // The client goes away while the inner service runs.
    let fut = svc.clone().oneshot(req(Some("k"), "b"));
    assert!(tokio::time::timeout(Duration::from_millis(10), fut)
        .await
        .is_err());
    assert_eq!(store.len(), 1);
    tokio::task::yield_now().await;
    assert!(store.is_empty(), "the drop guard released the reservation");
    let res = svc.clone().oneshot(req(Some("k"), "b")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;
    use upgate_layers::idempotency::{RedisStore, Reservation, StoredResponse};
    use upgate_testkit::RedisServer;

    async fn conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_one_key_100_concurrent() {
        let server = RedisServer::start();
        one_key_many_concurrent(RedisStore::new(conn(&server).await)).await;
    }

    #[tokio::test]
    async fn redis_store_semantics_and_ttls() {
        let server = RedisServer::start();
        let mut c = conn(&server).await;
        let store = RedisStore::new(c.clone());
        let fp = [3u8; 32];
        let lock = Duration::from_secs(60);
        assert_eq!(
            store.reserve("{t}:k", &fp, "a", lock).await.unwrap(),
            Reservation::Reserved
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg("{t}:k")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 60_000);
        assert_eq!(
            store.reserve("{t}:k", &fp, "b", lock).await.unwrap(),
            Reservation::InProgress
        );
        assert_eq!(
            store.reserve("{t}:k", &[4; 32], "b", lock).await.unwrap(),
            Reservation::FingerprintMismatch
        );
        // A non-owner cannot release or complete.
        store.release("{t}:k", "b").await.unwrap();
        assert_eq!(
            store.reserve("{t}:k", &fp, "b", lock).await.unwrap(),
            Reservation::InProgress
        );
        let resp = StoredResponse {
            status: StatusCode::ACCEPTED,
            headers: vec![(http::header::ETAG, "\"x\"".parse().unwrap())],
            trailers: vec![(
                http::HeaderName::from_static("grpc-status"),
                "0".parse().unwrap(),
            )],
            body: Bytes::from_static(b"\x00binary\xff"),
        };
        store
            .complete("{t}:k", "b", &resp, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            store.reserve("{t}:k", &fp, "b", lock).await.unwrap(),
            Reservation::InProgress
        );
        store
            .complete("{t}:k", "a", &resp, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            store.reserve("{t}:k", &fp, "c", lock).await.unwrap(),
            Reservation::Completed(resp)
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg("{t}:k")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(ttl > 60_000 && ttl <= 3_600_000, "ttl {ttl}");
        // Release by the owner deletes the record.
        store.reserve("{t}:r", &fp, "o", lock).await.unwrap();
        store.release("{t}:r", "o").await.unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg("{t}:r")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(exists, 0);
    }

    #[tokio::test]
    async fn redis_down_is_an_error() {
        let mut server = RedisServer::start();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = IdempotencyLayer::new(scope, RedisStore::new(conn(&server).await))
            .layer(inner(calls.clone()));
        server.stop();
        let err = svc.oneshot(req(Some("k"), "b")).await.unwrap_err();
        let err = err
            .downcast_ref::<upgate_layers::idempotency::Error>()
            .expect("idempotency::Error");
        assert!(err.is_store());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}

/// A streamed response with no size hint and more bytes than the record limit is passed on
/// whole (what was read, then the rest), trailers included, and not stored: the layer never
/// holds more than the limit of it.
#[tokio::test]
async fn streamed_responses_over_the_limit_pass_through_unstored() {
    use http_body::Frame;
    type Streamed = http_body_util::StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>,
    >;
    let calls = Arc::new(AtomicUsize::new(0));
    let streamed = {
        let calls = calls.clone();
        service_fn(move |_req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..64)
                    .map(|i| Ok(Frame::data(Bytes::from(format!("chunk-{i:02};")))))
                    .collect();
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                frames.push(Ok(Frame::trailers(trailers)));
                Ok::<_, BoxError>(Response::new(Streamed::new(futures_util::stream::iter(
                    frames,
                ))))
            }
        })
    };
    let store = Arc::new(InMemory::new());
    let svc = IdempotencyLayer::with_shared_store(scope, store.clone())
        .response_limit(100)
        .rejection(|_r, _p: &http::request::Parts| {
            Response::new(Streamed::new(futures_util::stream::iter(Vec::new())))
        })
        .layer(streamed);
    for round in 1..=2 {
        let res = svc
            .clone()
            .oneshot(req(Some("k-stream"), "{}"))
            .await
            .unwrap();
        assert!(res.headers().get("idempotent-replayed").is_none());
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        let want: String = (0..64).map(|i| format!("chunk-{i:02};")).collect();
        assert_eq!(collected.to_bytes(), want.as_bytes(), "round {round}");
        assert!(store.is_empty(), "not stored");
        assert_eq!(calls.load(Ordering::SeqCst), round, "runs again");
    }
}
