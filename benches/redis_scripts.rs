//! Redis round trips of the `upgate-layers` Lua scripts against a real
//! `redis-server` started by the testkit: one GCRA decision, and one idempotency
//! reserve + complete. Skipped (with a message) when `redis-server` is missing.
//!
//! `cargo bench --bench redis_scripts -- --warm-up-time 1 --measurement-time 3`

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::StatusCode;
use upgate_layers::count_limit::{CountBackend, RedisCount};
use upgate_layers::idempotency::{IdempotencyStore, RedisStore, StoredResponse};
use upgate_layers::rate_limit::{Quota, RateLimitBackend, RedisGcra};
use upgate_testkit::RedisServer;

fn redis_server_available() -> bool {
    let bin = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn bench_redis(c: &mut Criterion) {
    if !redis_server_available() {
        eprintln!(
            "redis-server not found (install it or set REDIS_SERVER): skipping redis benches"
        );
        return;
    }
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let conn = rt.block_on(async {
        redis::Client::open(server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connection")
    });
    let mut group = c.benchmark_group("redis_scripts");

    let gcra = RedisGcra::new(conn.clone()).prefix("bench:rl:");
    let quota = Quota::new(1_000_000, 1_000_000);
    group.bench_function("rate_limit_decision", |b| {
        b.to_async(&rt)
            .iter(|| async { gcra.check("{tenant}", quota).await.expect("decision") })
    });

    let store = RedisStore::new(conn.clone());
    let response = StoredResponse {
        status: StatusCode::CREATED,
        headers: vec![(
            http::header::LOCATION,
            http::HeaderValue::from_static("/uploads/1"),
        )],
        trailers: vec![],
        body: Bytes::from_static(b"{\"id\":\"1\"}"),
    };
    let counter = AtomicU64::new(0);
    group.bench_function("idempotency_reserve_complete", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!(
                "bench:idem:{{t}}:{}",
                counter.fetch_add(1, Ordering::Relaxed)
            );
            let (store, response) = (&store, &response);
            async move {
                store
                    .reserve(&key, &[1; 32], "owner", Duration::from_secs(60))
                    .await
                    .expect("reserve");
                store
                    .complete(&key, "owner", response, Duration::from_secs(60))
                    .await
                    .expect("complete");
            }
        })
    });

    let counts = RedisCount::new(conn).prefix("bench:cnt:");
    group.bench_function("count_acquire_release", |b| {
        b.to_async(&rt).iter(|| async {
            counts
                .acquire("{tenant}", 1_000_000)
                .await
                .expect("acquire");
            counts.release("{tenant}").await.expect("release");
        })
    });
    group.finish();
    drop(server);
}

criterion_group!(benches, bench_redis);
criterion_main!(benches);
