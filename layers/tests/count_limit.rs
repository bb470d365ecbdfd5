#![cfg(feature = "count-limit")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use upgate_layers::count_limit::{CountBackend, CountLimitLayer, InProcess, Release};

type Body = Full<Bytes>;

#[derive(Default)]
struct Probe {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

fn policy(limit: u64) -> impl Fn(&Request<Body>) -> Option<(String, u64)> + Send + Sync + 'static {
    move |req: &Request<Body>| {
        let tenant = req.headers().get("x-tenant")?.to_str().ok()?;
        Some((format!("{{{tenant}}}:uploads"), limit))
    }
}

fn req(status: u16) -> Request<Body> {
    Request::post("/")
        .header("x-tenant", "acme")
        .header("x-status", status.to_string())
        .body(Body::default())
        .unwrap()
}

/// Tracks concurrency, holds each request for a while, answers with `x-status`
/// (999 = error).
fn inner(
    probe: Arc<Probe>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync {
    service_fn(move |req: Request<Body>| {
        let probe = probe.clone();
        async move {
            probe.calls.fetch_add(1, Ordering::SeqCst);
            let now = probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            probe.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            probe.in_flight.fetch_sub(1, Ordering::SeqCst);
            let status: u16 = req.headers()["x-status"].to_str()?.parse()?;
            if status == 999 {
                return Err::<Response<Body>, BoxError>("inner failed".into());
            }
            let mut res = Response::new(Body::default());
            *res.status_mut() = StatusCode::from_u16(status)?;
            Ok(res)
        }
    })
}

async fn run_concurrent<S>(svc: S, n: usize, status: u16) -> (usize, usize)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(req(status)).await.map(|r| r.status()) })
        })
        .collect();
    let (mut passed, mut rejected) = (0, 0);
    for t in tasks {
        match t.await.unwrap().unwrap() {
            StatusCode::TOO_MANY_REQUESTS => rejected += 1,
            _ => passed += 1,
        }
    }
    (passed, rejected)
}

async fn concurrency_cap<K: CountBackend>(
    backend: Arc<K>,
    count: impl Fn() -> futures_util::future::BoxFuture<'static, u64>,
) {
    let probe = Arc::new(Probe::default());
    let svc = CountLimitLayer::with_shared_backend(policy(5), backend, Release::OnCompletion)
        .layer(inner(probe.clone()));
    let (passed, rejected) = run_concurrent(svc.clone(), 200, 200).await;
    assert_eq!(passed + rejected, 200);
    assert!(passed >= 5, "passed {passed}");
    assert!(rejected > 0);
    let max = probe.max_in_flight.load(Ordering::SeqCst);
    assert!((1..=5).contains(&max), "max in flight {max}");
    assert_eq!(probe.calls.load(Ordering::SeqCst), passed);
    assert_eq!(count().await, 0, "all slots released");
}

async fn kept_on_success<K: CountBackend>(
    backend: Arc<K>,
    count: impl Fn() -> futures_util::future::BoxFuture<'static, u64>,
) {
    let probe = Arc::new(Probe::default());
    let svc = CountLimitLayer::with_shared_backend(policy(7), backend.clone(), Release::OnFailure)
        .layer(inner(probe.clone()));
    // Failures (status >= 400 and errors) never keep a slot.
    let (passed, _) = run_concurrent(svc.clone(), 50, 500).await;
    assert!(passed > 0);
    assert_eq!(count().await, 0);
    assert!(svc.clone().oneshot(req(999)).await.is_err());
    assert_eq!(count().await, 0);
    // Successes keep theirs: exactly 7 of 200 get through.
    let (passed, rejected) = run_concurrent(svc.clone(), 200, 201).await;
    assert_eq!((passed, rejected), (7, 193));
    assert_eq!(count().await, 7);
    assert!(probe.max_in_flight.load(Ordering::SeqCst) <= 7);
    // Releasing one (e.g. the upload completed) frees one slot.
    backend.release("{acme}:uploads").await.unwrap();
    assert_eq!(svc.clone().oneshot(req(201)).await.unwrap().status(), 201);
    assert_eq!(svc.clone().oneshot(req(201)).await.unwrap().status(), 429);
}

fn in_process_count(
    b: &Arc<InProcess>,
) -> impl Fn() -> futures_util::future::BoxFuture<'static, u64> {
    let b = b.clone();
    move || {
        let n = b.count("{acme}:uploads");
        Box::pin(async move { n })
    }
}

#[tokio::test(start_paused = true)]
async fn in_process_on_completion_caps_concurrency() {
    let b = Arc::new(InProcess::new());
    concurrency_cap(b.clone(), in_process_count(&b)).await;
    assert!(b.is_empty());
}

#[tokio::test(start_paused = true)]
async fn in_process_on_failure_keeps_successes() {
    let b = Arc::new(InProcess::new());
    kept_on_success(b.clone(), in_process_count(&b)).await;
}

#[tokio::test(start_paused = true)]
async fn dropped_requests_release_and_uncounted_pass() {
    let b = Arc::new(InProcess::new());
    for mode in [Release::OnCompletion, Release::OnFailure] {
        let probe = Arc::new(Probe::default());
        let svc = CountLimitLayer::with_shared_backend(policy(1), b.clone(), mode)
            .layer(inner(probe.clone()));
        let fut = svc.clone().oneshot(req(200));
        assert!(tokio::time::timeout(Duration::from_millis(5), fut)
            .await
            .is_err());
        tokio::task::yield_now().await;
        assert!(b.is_empty(), "{mode:?}: released after drop");
        // Requests the policy does not count pass freely.
        let uncounted = Request::post("/")
            .header("x-status", "200")
            .body(Body::default())
            .unwrap();
        assert_eq!(svc.clone().oneshot(uncounted).await.unwrap().status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn custom_classifier_and_rejection() {
    let b = Arc::new(InProcess::new());
    let svc = CountLimitLayer::with_shared_backend(policy(1), b.clone(), Release::OnFailure)
        .failure_classifier(|s| s.is_server_error())
        .rejection(|key: &str, limit: u64| {
            let mut res = Response::new(Body::new(Bytes::from(format!("{key}/{limit}"))));
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            res
        })
        .layer(inner(Arc::default()));
    // 404 is not a failure for this classifier: the slot is kept.
    assert_eq!(svc.clone().oneshot(req(404)).await.unwrap().status(), 404);
    let res = svc.clone().oneshot(req(200)).await.unwrap();
    assert_eq!(res.status(), 429);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "{acme}:uploads/1");
}

#[cfg(feature = "redis")]
mod redis_backend {
    use super::*;
    use upgate_layers::count_limit::RedisCount;
    use upgate_testkit::RedisServer;

    async fn setup() -> (RedisServer, redis::aio::MultiplexedConnection) {
        let server = RedisServer::start();
        let c = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        (server, c)
    }

    fn redis_count(
        c: &redis::aio::MultiplexedConnection,
    ) -> impl Fn() -> futures_util::future::BoxFuture<'static, u64> {
        let c = c.clone();
        move || {
            let mut c = c.clone();
            Box::pin(async move {
                let v: Option<u64> = redis::cmd("GET")
                    .arg("cnt:{acme}:uploads")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                v.unwrap_or(0)
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_on_completion_caps_concurrency() {
        let (_server, c) = setup().await;
        concurrency_cap(Arc::new(RedisCount::new(c.clone())), redis_count(&c)).await;
        let exists: i64 = redis::cmd("EXISTS")
            .arg("cnt:{acme}:uploads")
            .query_async(&mut c.clone())
            .await
            .unwrap();
        assert_eq!(exists, 0, "key removed at zero");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_on_failure_keeps_successes_with_ttl() {
        let (_server, c) = setup().await;
        let backend = Arc::new(RedisCount::new(c.clone()).ttl(Duration::from_secs(600)));
        kept_on_success(backend, redis_count(&c)).await;
        let ttl: i64 = redis::cmd("PTTL")
            .arg("cnt:{acme}:uploads")
            .query_async(&mut c.clone())
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 600_000, "ttl {ttl}");
    }

    #[tokio::test]
    async fn redis_down_is_an_error() {
        let (mut server, c) = setup().await;
        let svc = CountLimitLayer::new(policy(1), RedisCount::new(c), Release::OnCompletion)
            .layer(inner(Arc::default()));
        server.stop();
        let err = svc.oneshot(req(200)).await.unwrap_err();
        assert!(err
            .downcast_ref::<upgate_layers::count_limit::Error>()
            .is_some());
    }
}
