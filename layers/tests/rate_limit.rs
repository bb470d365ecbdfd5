#![cfg(feature = "rate-limit")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use upgate_layers::rate_limit::{Decision, InProcess, Quota, RateLimitBackend, RateLimitLayer};

type Body = Full<Bytes>;

fn policy(
    quota: Quota,
) -> impl Fn(&Request<Body>) -> Option<(String, Quota)> + Send + Sync + 'static {
    move |req: &Request<Body>| {
        let tenant = req.headers().get("x-tenant")?.to_str().ok()?;
        Some((format!("{{{tenant}}}"), quota))
    }
}

fn req(tenant: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().uri("/upload");
    if let Some(t) = tenant {
        b = b.header("x-tenant", t);
    }
    b.body(Body::default()).expect("request")
}

fn counting_inner(
    hits: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync {
    service_fn(move |_req: Request<Body>| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(Response::new(Body::new(Bytes::from_static(b"ok"))))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn in_process_limits_sets_headers_and_refills() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new(policy(Quota::new(1, 3)), InProcess::new());
    let stats = layer.stats();
    let svc = layer.layer(counting_inner(hits.clone()));

    for remaining in [2, 1, 0] {
        let res = svc.clone().oneshot(req(Some("a"))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=3;w=3");
        assert_eq!(
            res.headers()["ratelimit"],
            format!("\"default\";r={remaining};t={}", 3 - remaining).as_str()
        );
        assert!(res.headers().get("retry-after").is_none());
    }
    let res = svc.clone().oneshot(req(Some("a"))).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["ratelimit"], "\"default\";r=0;t=3");
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    // Another tenant has its own bucket.
    assert_eq!(
        svc.clone().oneshot(req(Some("b"))).await.unwrap().status(),
        200
    );

    // Unclassified requests pass without headers.
    let res = svc.clone().oneshot(req(None)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("ratelimit").is_none());

    // One token refills after one second.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        svc.clone().oneshot(req(Some("a"))).await.unwrap().status(),
        200
    );
    assert_eq!(
        svc.clone().oneshot(req(Some("a"))).await.unwrap().status(),
        429
    );

    assert_eq!(
        (stats.admitted(), stats.limited(), stats.bypassed()),
        (5, 2, 0)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn bypass_admits_and_counts() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new(policy(Quota::new(1, 2)), InProcess::new()).bypass(true);
    let stats = layer.stats();
    let svc = layer.layer(counting_inner(hits.clone()));
    for _ in 0..5 {
        let res = svc.clone().oneshot(req(Some("a"))).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().contains_key("ratelimit"));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    assert_eq!(
        (stats.admitted(), stats.limited(), stats.bypassed()),
        (2, 0, 3)
    );
}

#[tokio::test(start_paused = true)]
async fn custom_rejection_keeps_its_headers_and_gets_retry_after() {
    let layer = RateLimitLayer::new(policy(Quota::new(1, 1)), InProcess::new()).rejection(
        |key: &str, d: &Decision| {
            let mut res = Response::new(Body::new(Bytes::from(format!("{key} {}", d.limit))));
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            res.headers_mut()
                .insert("content-type", "application/problem+json".parse().unwrap());
            res
        },
    );
    let svc = layer.layer(counting_inner(Arc::default()));
    assert_eq!(
        svc.clone().oneshot(req(Some("a"))).await.unwrap().status(),
        200
    );
    let res = svc.clone().oneshot(req(Some("a"))).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(res.headers()["retry-after"], "1");
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"{a} 1");
}

struct Failing;
impl RateLimitBackend for Failing {
    fn check(
        &self,
        _key: &str,
        _quota: Quota,
    ) -> impl std::future::Future<Output = Result<Decision, BoxError>> + Send {
        std::future::ready(Err::<Decision, BoxError>("redis down".into()))
    }
}

#[tokio::test]
async fn backend_errors_are_errors() {
    let hits = Arc::new(AtomicUsize::new(0));
    let svc =
        RateLimitLayer::new(policy(Quota::new(1, 1)), Failing).layer(counting_inner(hits.clone()));
    let err = svc.oneshot(req(Some("a"))).await.unwrap_err();
    let err = err
        .downcast_ref::<upgate_layers::rate_limit::Error>()
        .expect("rate_limit::Error");
    assert_eq!(
        std::error::Error::source(err).unwrap().to_string(),
        "redis down"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[cfg(feature = "redis")]
mod redis_backend {
    use super::*;
    use upgate_layers::rate_limit::RedisGcra;
    use upgate_testkit::RedisServer;

    async fn conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_share_one_quota_under_load() {
        let server = RedisServer::start();
        let hits = Arc::new(AtomicUsize::new(0));
        // 1 request/s, burst 50: within a short test at most 50 + elapsed seconds are admitted.
        let quota = Quota::new(1, 50);
        let a_layer = RateLimitLayer::new(
            policy(quota),
            RedisGcra::new(conn(&server).await).prefix("t:"),
        );
        let b_layer = RateLimitLayer::new(
            policy(quota),
            RedisGcra::new(conn(&server).await).prefix("t:"),
        );
        let (a_stats, b_stats) = (a_layer.stats(), b_layer.stats());
        let a = a_layer.layer(counting_inner(hits.clone()));
        let b = b_layer.layer(counting_inner(hits.clone()));

        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..400 {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                svc.oneshot(req(Some("shared"))).await.map(|r| r.status())
            }));
        }
        let mut ok = 0;
        let mut limited = 0;
        for t in tasks {
            match t.await.unwrap().unwrap() {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => limited += 1,
                other => panic!("unexpected {other}"),
            }
        }
        let elapsed = started.elapsed().as_secs();
        assert!(ok >= 50, "burst must be admitted, got {ok}");
        assert!(
            ok <= 50 + elapsed as usize + 1,
            "admitted {ok} in {elapsed}s"
        );
        assert_eq!(ok + limited, 400);
        assert_eq!(hits.load(Ordering::SeqCst), ok);
        assert_eq!(a_stats.admitted() + b_stats.admitted(), ok as u64);
        // Each instance decided its half; their admissions add up to one shared quota.
        assert_eq!(a_stats.admitted() + a_stats.limited(), 200);
        assert_eq!(b_stats.admitted() + b_stats.limited(), 200);
    }

    #[tokio::test]
    async fn redis_decisions_and_ttl() {
        let server = RedisServer::start();
        let mut c = conn(&server).await;
        let backend = RedisGcra::new(c.clone()).prefix("p:");
        let q = Quota::new(1, 3);
        let d = backend.check("{k}", q).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
        assert_eq!(d.limit, 3);
        assert!(d.reset_after <= Duration::from_secs(1));
        backend.check("{k}", q).await.unwrap();
        backend.check("{k}", q).await.unwrap();
        let d = backend.check("{k}", q).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        let retry = d.retry_after.unwrap();
        assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
        assert_eq!(d.retry_after_secs(), Some(1));
        let ttl: i64 = redis::cmd("PTTL")
            .arg("p:{k}")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 3001, "ttl {ttl}");
    }

    async fn evalsha_calls(c: &mut redis::aio::MultiplexedConnection) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(c)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    /// Three leasing replicas under sustained load (16 workers each, one request after the
    /// other): together they admit no more than the one bucket in Redis holds, lose at
    /// most the tokens still held at the end, and need far fewer round trips than requests.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leasing_replicas_share_one_bucket_with_fewer_round_trips() {
        let server = RedisServer::start();
        let mut admin = conn(&server).await;
        let hits = Arc::new(AtomicUsize::new(0));
        // 1 token/s, burst 600: a tenth of the burst (60) caps each lease at 32 here.
        let quota = Quota::new(1, 600);
        let mut replicas = Vec::new();
        for _ in 0..3 {
            let layer = RateLimitLayer::new(
                policy(quota),
                RedisGcra::new(conn(&server).await)
                    .prefix("t:")
                    .lease(32, Duration::from_secs(30)),
            );
            replicas.push((layer.stats(), layer.layer(counting_inner(hits.clone()))));
        }
        let calls_before = evalsha_calls(&mut admin).await;
        let started = std::time::Instant::now();
        let mut workers = Vec::new();
        for (_, svc) in &replicas {
            for _ in 0..16 {
                let svc = svc.clone();
                workers.push(tokio::spawn(async move {
                    let (mut ok, mut limited) = (0usize, 0usize);
                    for _ in 0..50 {
                        match svc
                            .clone()
                            .oneshot(req(Some("busy")))
                            .await
                            .unwrap()
                            .status()
                        {
                            StatusCode::OK => ok += 1,
                            StatusCode::TOO_MANY_REQUESTS => limited += 1,
                            other => panic!("unexpected {other}"),
                        }
                    }
                    (ok, limited)
                }));
            }
        }
        let (mut ok, mut limited) = (0, 0);
        for w in workers {
            let (o, l) = w.await.unwrap();
            ok += o;
            limited += l;
        }
        let elapsed = started.elapsed().as_secs() as usize;
        let calls = evalsha_calls(&mut admin).await - calls_before;
        assert_eq!(ok + limited, 2400);
        assert_eq!(hits.load(Ordering::SeqCst), ok);
        let admitted: u64 = replicas.iter().map(|(s, _)| s.admitted()).sum();
        assert_eq!(admitted, ok as u64);
        // Never more than the bucket: burst + refill while the test ran.
        assert!(ok <= 600 + elapsed + 1, "admitted {ok} in {elapsed}s");
        // At most one lease (32 tokens) per replica is still held, unspent, at the end.
        assert!(ok + 3 * 32 >= 600, "admitted only {ok}");
        // Measured here: 380-436 round trips (most while the leases ramp up from one
        // token); a third of the requests leaves room for a loaded CI machine.
        eprintln!("{calls} round trips for 2400 requests, {ok} admitted");
        assert!(
            (calls as usize) < 2400 / 3,
            "{calls} round trips for 2400 requests"
        );
    }

    /// A key with requests further apart than the lease ttl never leases: each request
    /// takes exactly one token from Redis.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sparse_traffic_takes_one_token_per_request() {
        let server = RedisServer::start();
        let quota = Quota::new(1, 1000);
        let leasing = RedisGcra::new(conn(&server).await)
            .prefix("s:")
            .lease(64, Duration::from_millis(40));
        for _ in 0..8 {
            assert!(leasing.check("{k}", quota).await.unwrap().allowed);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let exact = RedisGcra::new(conn(&server).await).prefix("s:");
        let d = exact.check("{k}", quota).await.unwrap();
        // 1000 - 8 - this one, plus at most one token refilled in the half second.
        assert!(
            (991..=992).contains(&d.remaining),
            "remaining {}",
            d.remaining
        );
    }

    /// With leasing on, a small quota is decided exactly as without it.
    #[tokio::test]
    async fn leasing_keeps_small_quotas_exact() {
        let server = RedisServer::start();
        let backend = RedisGcra::new(conn(&server).await)
            .prefix("x:")
            .lease(64, Duration::from_secs(1));
        let q = Quota::new(1, 3);
        let remaining: Vec<u32> =
            futures_util::future::join_all((0..3).map(|_| backend.check("{k}", q)))
                .await
                .into_iter()
                .map(|d| d.unwrap().remaining)
                .collect();
        assert_eq!(remaining.iter().sum::<u32>(), 2 + 1);
        let d = backend.check("{k}", q).await.unwrap();
        assert!(!d.allowed);
        assert!(d.retry_after.is_some());
    }

    #[tokio::test]
    async fn redis_down_is_an_error() {
        let mut server = RedisServer::start();
        let c = conn(&server).await;
        let svc = RateLimitLayer::new(policy(Quota::new(1, 1)), RedisGcra::new(c))
            .layer(counting_inner(Arc::default()));
        server.stop();
        let err = svc.oneshot(req(Some("a"))).await.unwrap_err();
        assert!(err
            .downcast_ref::<upgate_layers::rate_limit::Error>()
            .is_some());
    }
}
