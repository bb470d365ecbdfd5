//! Session-store throughput against a real `redis-server` (started by the testkit).
//!
//! * `floor/evalsha_trivial_direct`: `EVALSHA` of `return 1` on a plain multiplexed
//!   connection — one round trip, nothing else;
//! * `floor/evalsha_trivial_handle`: the same through [`RedisHandle`] (a
//!   `ConnectionManager` on a single server);
//! * `redis_store/register_file`: the real registration script through the store, one
//!   session with a huge file limit, a fresh file id and key per iteration;
//! * `redis_store/get_file`: a read-only gated script, for comparison;
//! * `memory_store/register_file`: the in-process reference.
//!
//! `register_file / evalsha_trivial_handle` is the script's own cost. Skipped (with a
//! message) when `redis-server` is not installed.
//!
//! Register in Cargo.toml as `[[bench]] name = "session_store" harness = false`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use upgate::model::{FileRecord, FileStatus, SessionRecord, SessionStatus};
use upgate::store::memory::MemoryStore;
use upgate::store::redis::{RedisHandle, RedisStore, RedisStoreOptions};
use upgate::store::{Gate, Registered, SessionStore};

fn redis_available() -> bool {
    let bin = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
    std::process::Command::new(bin)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn session(tenant: &str) -> SessionRecord {
    let now = upgate::model::now_ms() / 1000;
    SessionRecord {
        id: uuid::Uuid::new_v4().to_string(),
        tenant: tenant.to_owned(),
        status: SessionStatus::Active,
        part_size_bytes: 5 * 1024 * 1024,
        max_files: None,
        file_limit: u32::MAX,
        file_count: 0,
        created_at: now,
        expires_at: now + 3600,
        metadata: serde_json::json!({"bench": true}),
        owner: None,
        max_file_size_bytes: None,
        allowed_content_types: None,
        outbox_keep_ms: None,
    }
}

fn file(session_id: &str, n: u64) -> FileRecord {
    FileRecord {
        id: uuid::Uuid::new_v4().to_string(),
        session_id: session_id.to_owned(),
        file_key: format!("dir/file-{n}.bin"),
        file_name: format!("file-{n}.bin"),
        size_bytes: 64 * 1024 * 1024,
        content_type: Some("application/octet-stream".to_owned()),
        status: FileStatus::Registered,
        part_size_bytes: 5 * 1024 * 1024,
        part_count: 13,
        created_at: 0,
        object_key: format!("bench/{session_id}/dir/file-{n}.bin"),
        upload_id: None,
        file_url: None,
        etag: None,
        metadata: Default::default(),
        tus_form: None,
    }
}

fn bench_register(
    c: &mut Criterion,
    name: &str,
    rt: &tokio::runtime::Runtime,
    store: Arc<dyn SessionStore>,
) {
    let s = session("bench");
    rt.block_on(store.create_session(&s))
        .expect("create_session");
    let seq = AtomicU64::new(0);
    let now = upgate::model::now_ms();
    c.bench_function(name, |b| {
        b.to_async(rt).iter(|| {
            let f = file(&s.id, seq.fetch_add(1, Ordering::Relaxed));
            let store = store.clone();
            async move {
                let r = store
                    .register_file("bench", &f, now)
                    .await
                    .expect("register_file");
                assert!(matches!(r, Gate::Ok(Registered::Created(_))), "{r:?}");
            }
        })
    });
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    bench_register(
        c,
        "memory_store/register_file",
        &rt,
        Arc::new(MemoryStore::new(Duration::from_secs(3600))),
    );

    if !redis_available() {
        eprintln!("session_store bench: redis-server not found (install it or set REDIS_SERVER); skipping the Redis benches");
        return;
    }
    let server = upgate_testkit::RedisServer::start();
    let handle = {
        let _runtime = rt.enter();
        RedisHandle::single(&server.url()).expect("redis handle")
    };

    // Floor: a trivial script, directly and through the pooled handle.
    let trivial = redis::Script::new("return 1");
    let mut direct = rt
        .block_on(async {
            redis::Client::open(server.url())?
                .get_multiplexed_async_connection()
                .await
        })
        .expect("direct connection");
    c.bench_function("floor/evalsha_trivial_direct", |b| {
        b.to_async(&rt).iter(|| {
            let mut con = direct.clone();
            let trivial = &trivial;
            async move {
                let v: i64 = trivial.invoke_async(&mut con).await.expect("evalsha");
                assert_eq!(v, 1);
            }
        })
    });
    c.bench_function("floor/evalsha_trivial_handle", |b| {
        b.to_async(&rt).iter(|| {
            let mut con = handle.clone();
            let trivial = &trivial;
            async move {
                let v: i64 = trivial.invoke_async(&mut con).await.expect("evalsha");
                assert_eq!(v, 1);
            }
        })
    });
    // Keep the direct connection alive until here.
    let _ = &mut direct;

    let store: Arc<dyn SessionStore> = Arc::new(
        RedisStore::new(
            handle.clone(),
            RedisStoreOptions {
                key_prefix: "bench".to_owned(),
                ..RedisStoreOptions::default()
            },
        )
        .expect("redis store"),
    );
    bench_register(c, "redis_store/register_file", &rt, store.clone());

    let s = session("bench");
    rt.block_on(store.create_session(&s))
        .expect("create_session");
    let f = file(&s.id, 0);
    rt.block_on(store.register_file("bench", &f, upgate::model::now_ms()))
        .expect("register");
    c.bench_function("redis_store/get_file", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let (sid, fid) = (s.id.clone(), f.id.clone());
            async move {
                let r = store
                    .get_file("bench", &sid, &fid, true, upgate::model::now_ms())
                    .await
                    .expect("get_file");
                assert!(matches!(r, Gate::Ok(_)));
            }
        })
    });
    drop(server);
}

criterion_group! {
    name = session_store;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(session_store);
