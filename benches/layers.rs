//! Per-layer overhead of `upgate-layers` (in-process backends) against a bare
//! `service_fn` returning a small response.
//!
//! `cargo bench --bench layers -- --warm-up-time 1 --measurement-time 3`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::request::Parts;
use http::{Request, Response};
use http_body_util::Full;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use upgate_layers::count_limit::{self, CountLimitLayer, Release};
use upgate_layers::expiry::{Expiring, ExpiryLayer};
use upgate_layers::idempotency::{self, IdempotencyLayer};
use upgate_layers::rate_limit::{self, Quota, RateLimitLayer};

type Body = Full<Bytes>;

fn bare(
) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_req: Request<Body>| async {
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

fn request(key: Option<u64>) -> Request<Body> {
    let mut b = Request::post("/sessions/s1/parts").header("x-tenant", "acme");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(b"{}")))
        .expect("request")
}

fn tenant(req: &Request<Body>) -> Option<&str> {
    req.headers().get("x-tenant")?.to_str().ok()
}

fn rate_limit_layer(
) -> RateLimitLayer<impl Fn(&Request<Body>) -> Option<(String, Quota)> + Send + Sync + 'static> {
    RateLimitLayer::new(
        |req: &Request<Body>| tenant(req).map(|t| (t.to_owned(), Quota::new(1_000_000, 1_000_000))),
        rate_limit::InProcess::new(),
    )
}

/// What the benchmark's deadline lookup resolves to.
type Lookup = std::future::Ready<Result<Option<Expiring<u64>>, BoxError>>;

fn expiry_layer() -> ExpiryLayer<impl Fn(&Parts) -> Lookup + Send + Sync + 'static> {
    let expires_at = SystemTime::now() + Duration::from_secs(3600);
    ExpiryLayer::new(move |_: &Parts| {
        std::future::ready(Ok(Some(Expiring {
            expires_at,
            info: 7u64,
        })))
    })
}

fn count_limit_layer(
) -> CountLimitLayer<impl Fn(&Request<Body>) -> Option<(String, u64)> + Send + Sync + 'static> {
    CountLimitLayer::new(
        |req: &Request<Body>| tenant(req).map(|t| (t.to_owned(), 1_000_000)),
        count_limit::InProcess::new(),
        Release::OnCompletion,
    )
}

fn idempotency_layer() -> IdempotencyLayer<
    impl Fn(&Request<Body>) -> Option<String> + Send + Sync + 'static,
    idempotency::InMemory,
> {
    IdempotencyLayer::new(
        |req: &Request<Body>| tenant(req).map(str::to_owned),
        idempotency::InMemory::new(),
    )
}

fn bench_layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("layers");

    macro_rules! bench {
        ($name:expr, $svc:expr, $req:expr) => {{
            let svc = $svc;
            group.bench_function($name, |b| {
                b.to_async(&rt).iter(|| {
                    let svc = svc.clone();
                    let req = $req;
                    async move { svc.oneshot(req).await.expect("response") }
                })
            });
        }};
    }

    bench!("bare", bare(), request(None));
    bench!(
        "rate_limit",
        rate_limit_layer().layer(bare()),
        request(None)
    );
    bench!("expiry", expiry_layer().layer(bare()), request(None));
    bench!(
        "count_limit",
        count_limit_layer().layer(bare()),
        request(None)
    );
    bench!(
        "idempotency_passthrough",
        idempotency_layer().layer(bare()),
        request(None)
    );
    let counter = Arc::new(AtomicU64::new(0));
    bench!(
        "idempotency_fresh_key",
        idempotency_layer().layer(bare()),
        request(Some(counter.fetch_add(1, Ordering::Relaxed)))
    );
    let all = tower::ServiceBuilder::new()
        .layer(rate_limit_layer())
        .layer(expiry_layer())
        .layer(count_limit_layer())
        .layer(idempotency_layer())
        .service(bare());
    bench!("all_four_idempotency_passthrough", all, request(None));
    group.finish();
}

/// The key extractors alone, per request: what a rate limit keyed by them adds before its
/// decision.
fn bench_keys(c: &mut Criterion) {
    use std::net::SocketAddr;
    use upgate_layers::key::{And, ClientIp, HeaderValue, KeyExtractor, PeerAddr, PeerIp};

    let mut req = Request::get("/")
        .header("x-tenant", "acme")
        .header("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.0.0.7")
        .header("forwarded", "for=203.0.113.9;proto=https, for=10.0.0.7")
        .body(())
        .expect("request");
    req.extensions_mut().insert(PeerAddr(
        "10.0.0.2:443".parse::<SocketAddr>().expect("addr"),
    ));
    let trusted = ["10.0.0.0/8".parse().expect("cidr")];
    let mut g = c.benchmark_group("keys");
    let peer = PeerIp::new();
    g.bench_function("peer_ip", |b| b.iter(|| peer.extract(&req)));
    let header = HeaderValue::new("x-tenant");
    g.bench_function("header_value", |b| b.iter(|| header.extract(&req)));
    let xff = ClientIp::x_forwarded_for(trusted);
    g.bench_function("client_ip_x_forwarded_for_3_hops", |b| {
        b.iter(|| xff.extract(&req))
    });
    let fwd = ClientIp::forwarded(trusted);
    g.bench_function("client_ip_forwarded_2_elements", |b| {
        b.iter(|| fwd.extract(&req))
    });
    let both = And::new(
        HeaderValue::new("x-tenant"),
        ClientIp::x_forwarded_for(trusted),
    );
    g.bench_function("tenant_and_client_ip", |b| b.iter(|| both.extract(&req)));
    g.finish();
}

criterion_group!(benches, bench_layers, bench_keys);
criterion_main!(benches);
