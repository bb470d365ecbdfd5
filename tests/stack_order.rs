//! The order of the middleware stack, observed from outside: a rate-limited request never
//! reaches the session store; an idempotent replay never re-runs registration; bypass mode
//! admits, logs and counts. Runs on a real redis-server (session store and layer state).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use upgate::model::{FileRecord, PartRecord, SessionRecord};
use upgate::store::*;

/// A real store that counts the calls that reach it.
struct Counted {
    inner: Arc<dyn SessionStore>,
    calls: AtomicUsize,
    registrations: AtomicUsize,
    /// While set, `set_upload_id` runs and then reports an error, as when the reply is lost
    /// to a timeout after Redis ran the script.
    lose_set_upload_id_reply: std::sync::atomic::AtomicBool,
}

macro_rules! forward {
    ($self:ident . $m:ident ( $($a:expr),* )) => {{
        $self.calls.fetch_add(1, Ordering::SeqCst);
        $self.inner.$m($($a),*).await
    }};
}

#[async_trait]
#[allow(clippy::too_many_arguments)]
impl SessionStore for Counted {
    async fn create_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        forward!(self.create_session(s))
    }
    async fn get_session(
        &self,
        t: &str,
        s: &str,
        p: Page,
        n: i64,
    ) -> Result<Gate<SessionView>, StoreError> {
        forward!(self.get_session(t, s, p, n))
    }
    async fn session_deadline(&self, t: &str, s: &str) -> Result<Option<(i64, i64)>, StoreError> {
        forward!(self.session_deadline(t, s))
    }
    async fn session_owner(&self, t: &str, s: &str) -> Result<Option<Option<String>>, StoreError> {
        forward!(self.session_owner(t, s))
    }
    async fn register_file(
        &self,
        t: &str,
        f: &FileRecord,
        n: i64,
    ) -> Result<Gate<Registered>, StoreError> {
        self.registrations.fetch_add(1, Ordering::SeqCst);
        forward!(self.register_file(t, f, n))
    }
    async fn register_tus_file(
        &self,
        t: &str,
        f: &FileRecord,
        d: bool,
        n: i64,
    ) -> Result<Gate<(Registered, i64)>, StoreError> {
        self.registrations.fetch_add(1, Ordering::SeqCst);
        forward!(self.register_tus_file(t, f, d, n))
    }
    async fn tus_file(
        &self,
        t: &str,
        s: &str,
        f: &str,
        n: i64,
    ) -> Result<Gate<(FileRecord, upgate::store::TusState)>, StoreError> {
        forward!(self.tus_file(t, s, f, n))
    }
    async fn tus_begin(
        &self,
        t: &str,
        s: &str,
        f: &str,
        r: &upgate::store::TusBegin<'_>,
        n: i64,
    ) -> Result<Gate<upgate::store::TusBegun>, StoreError> {
        forward!(self.tus_begin(t, s, f, r, n))
    }
    async fn tus_advance(
        &self,
        t: &str,
        s: &str,
        f: &str,
        r: &upgate::store::TusAdvance<'_>,
        n: i64,
    ) -> Result<Gate<upgate::store::TusAdvanced>, StoreError> {
        forward!(self.tus_advance(t, s, f, r, n))
    }
    async fn tus_tail(&self, t: &str, s: &str, f: &str) -> Result<Vec<u8>, StoreError> {
        forward!(self.tus_tail(t, s, f))
    }
    async fn tus_release(&self, t: &str, s: &str, f: &str, k: &str) -> Result<(), StoreError> {
        forward!(self.tus_release(t, s, f, k))
    }
    async fn get_file(
        &self,
        t: &str,
        s: &str,
        f: &str,
        a: bool,
        n: i64,
    ) -> Result<Gate<FileRecord>, StoreError> {
        forward!(self.get_file(t, s, f, a, n))
    }
    async fn set_upload_id(
        &self,
        t: &str,
        s: &str,
        f: &str,
        u: &str,
        n: i64,
    ) -> Result<Gate<UploadIdSet>, StoreError> {
        let result = forward!(self.set_upload_id(t, s, f, u, n));
        if self.lose_set_upload_id_reply.load(Ordering::SeqCst) {
            return Err(StoreError::new("redis: timed out (reply lost)"));
        }
        result
    }
    async fn record_part(
        &self,
        t: &str,
        s: &str,
        f: &str,
        p: &PartRecord,
        n: i64,
    ) -> Result<Gate<FileRecord>, StoreError> {
        forward!(self.record_part(t, s, f, p, n))
    }
    async fn list_parts(
        &self,
        t: &str,
        s: &str,
        f: &str,
        n: i64,
    ) -> Result<Gate<Vec<PartRecord>>, StoreError> {
        forward!(self.list_parts(t, s, f, n))
    }
    async fn begin_complete(
        &self,
        t: &str,
        s: &str,
        f: &str,
        k: &str,
        l: i64,
        n: i64,
    ) -> Result<Gate<BeginComplete>, StoreError> {
        forward!(self.begin_complete(t, s, f, k, l, n))
    }
    async fn finish_complete(
        &self,
        t: &str,
        s: &str,
        f: &str,
        k: &str,
        u: &str,
        e: &str,
        now: i64,
    ) -> Result<Gate<Option<FileRecord>>, StoreError> {
        forward!(self.finish_complete(t, s, f, k, u, e, now))
    }
    async fn release_complete(&self, t: &str, s: &str, f: &str, k: &str) -> Result<(), StoreError> {
        forward!(self.release_complete(t, s, f, k))
    }
    async fn abort_file(
        &self,
        t: &str,
        s: &str,
        f: &str,
        n: i64,
    ) -> Result<Gate<FileAborted>, StoreError> {
        forward!(self.abort_file(t, s, f, n))
    }
    async fn abort_session(
        &self,
        t: &str,
        s: &str,
        n: i64,
    ) -> Result<Gate<SessionAborted>, StoreError> {
        forward!(self.abort_session(t, s, n))
    }
    async fn cleanup_done(&self, t: &str, s: &str, f: &[String]) -> Result<(), StoreError> {
        forward!(self.cleanup_done(t, s, f))
    }
    async fn schedule_reap(&self, t: &str, s: &str, a: i64) -> Result<(), StoreError> {
        forward!(self.schedule_reap(t, s, a))
    }
    async fn renew_complete(
        &self,
        t: &str,
        s: &str,
        f: &str,
        k: &str,
        l: i64,
        n: i64,
    ) -> Result<bool, StoreError> {
        forward!(self.renew_complete(t, s, f, k, l, n))
    }
    async fn finalize(
        &self,
        t: &str,
        s: &str,
        c: &[String],
        n: i64,
    ) -> Result<Gate<Finalized>, StoreError> {
        forward!(self.finalize(t, s, c, n))
    }
    async fn claim_expired(
        &self,
        n: i64,
        l: i64,
        c: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.claim_expired(n, l, c).await
    }
    async fn reap(&self, t: &str, s: &str, n: i64) -> Result<Option<Reaped>, StoreError> {
        self.inner.reap(t, s, n).await
    }
    async fn reap_done(
        &self,
        t: &str,
        s: &str,
        c: i64,
        next: Option<i64>,
    ) -> Result<(), StoreError> {
        self.inner.reap_done(t, s, c, next).await
    }
    async fn reserve_live(
        &self,
        t: &str,
        s: &str,
        e: i64,
        l: u64,
        n: i64,
    ) -> Result<bool, StoreError> {
        forward!(self.reserve_live(t, s, e, l, n))
    }
    async fn release_live(&self, t: &str, s: &str) -> Result<(), StoreError> {
        forward!(self.release_live(t, s))
    }
    async fn upload_token_key(&self) -> Result<Vec<u8>, StoreError> {
        self.inner.upload_token_key().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    // The outbox (not counted: these tenants have no webhooks, so only the worker's
    // bookkeeping would call them).
    async fn claim_event_sessions(
        &self,
        t: &str,
        n: i64,
        l: i64,
        k: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.claim_event_sessions(t, n, l, k).await
    }
    async fn event_session_done(
        &self,
        t: &str,
        s: &str,
        c: i64,
        n: Option<i64>,
    ) -> Result<(), StoreError> {
        self.inner.event_session_done(t, s, c, n).await
    }
    async fn claim_events(
        &self,
        t: &str,
        s: &str,
        n: i64,
        l: i64,
        k: usize,
    ) -> Result<upgate::store::ClaimedEvents, StoreError> {
        self.inner.claim_events(t, s, n, l, k).await
    }
    async fn event_attempted(
        &self,
        t: &str,
        s: &str,
        q: u64,
        d: &upgate::events::Delivery,
        o: upgate::store::Attempted,
        n: i64,
    ) -> Result<(), StoreError> {
        self.inner.event_attempted(t, s, q, d, o, n).await
    }
    async fn list_events(
        &self,
        t: &str,
        f: bool,
        a: Option<(&str, u64)>,
        l: usize,
        n: i64,
    ) -> Result<Vec<upgate::events::StoredEvent>, StoreError> {
        self.inner.list_events(t, f, a, l, n).await
    }
    async fn retry_event(&self, t: &str, s: &str, q: u64, n: i64) -> Result<bool, StoreError> {
        self.inner.retry_event(t, s, q, n).await
    }
}

async fn start(
    redis: &upgate_testkit::RedisServer,
    burst: u32,
    bypass: bool,
) -> (TestGateway, Arc<Counted>) {
    let mut cfg = config("");
    cfg.redis = Some(upgate::config::RedisTarget::Single(redis.url()));
    cfg.rate_limit_bypass = bypass;
    cfg.tenants[0].rate_limit.requests_per_second = 1;
    cfg.tenants[0].rate_limit.burst = burst;
    let inner = upgate::build_store(&cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let counted = Arc::new(Counted {
        inner,
        calls: AtomicUsize::new(0),
        registrations: AtomicUsize::new(0),
        lose_set_upload_id_reply: Default::default(),
    });
    // The layers keep their state in the same Redis, as in production.
    let handle = upgate::redis_handle(&cfg, cfg.redis.as_ref().expect("redis"))
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = upgate::storage::fs::FsStore::new(dir.path())
        .await
        .expect("fs");
    let gw = upgate::Gateway::with_backends(cfg, counted.clone(), Arc::new(fs))
        .with_redis_layers(Some(handle));
    let tg = TestGateway::from_gateway(gw, dir).await;
    (tg, counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limited_requests_never_reach_the_session_store() {
    let redis = upgate_testkit::RedisServer::start();
    let (gw, store) = start(&redis, 5, false).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let res = gw
            .req(Method::POST, "/v1/sessions", KEY_A)
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        assert!(
            res.headers().contains_key("ratelimit")
                && res.headers().contains_key("ratelimit-policy")
        );
        if res.status() == 429 {
            assert!(res.headers().contains_key("retry-after"));
            problem(res, 429, "rateLimited").await;
            statuses.push(429);
        } else {
            assert_eq!(res.status(), 201);
            statuses.push(201);
        }
    }
    let admitted = statuses.iter().filter(|s| **s == 201).count();
    assert!(
        (5..=7).contains(&admitted),
        "burst 5 at 1/s admits 5 (+ refill): {statuses:?}"
    );
    // Each admitted create makes two store calls: the tenant's quota count, the session.
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        2 * admitted,
        "only admitted requests touched the store"
    );
    // Tenant b has its own quota.
    let res = gw
        .req(Method::POST, "/v1/sessions", KEY_B)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_replays_never_rerun_registration() {
    let redis = upgate_testkit::RedisServer::start();
    let (gw, store) = start(&redis, 100_000, false).await;
    let s = gw.create_session(KEY_A, json!({})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let path = format!("/v1/sessions/{session}/files");
    let body = json!({"fileName": "once.txt", "sizeBytes": 3});
    let first = gw
        .req(Method::POST, &path, KEY_A)
        .header("idempotency-key", "k-1")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.expect("json");
    let again = gw
        .req(Method::POST, &path, KEY_A)
        .header("idempotency-key", "k-1")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(again.status(), 201);
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(
        again.json::<Value>().await.expect("json"),
        first,
        "the stored body"
    );
    assert_eq!(
        store.registrations.load(Ordering::SeqCst),
        1,
        "registration ran once"
    );
    // Same key, different request: 422; a rejection is replayed too (4xx are stored).
    let other = gw
        .req(Method::POST, &path, KEY_A)
        .header("idempotency-key", "k-1")
        .json(&json!({"fileName": "other.txt", "sizeBytes": 3}))
        .send()
        .await
        .expect("send");
    problem(other, 422, "idempotencyKeyReused").await;
    // Keys are per tenant: tenant b may use the same key for its own request.
    let sb = gw.create_session(KEY_B, json!({})).await;
    let res = gw
        .req(
            Method::POST,
            &format!(
                "/v1/sessions/{}/files",
                sb["sessionId"].as_str().expect("id")
            ),
            KEY_B,
        )
        .header("idempotency-key", "k-1")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("idempotent-replayed").is_none());

    // 100 concurrent requests with one fresh key: registration runs once; the others see
    // 409 requestInProgress or the replay.
    let before = store.registrations.load(Ordering::SeqCst);
    let gw = Arc::new(gw);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (gw, path) = (gw.clone(), path.clone());
            tokio::spawn(async move {
                let res = gw
                    .req(Method::POST, &path, KEY_A)
                    .header("idempotency-key", "k-concurrent")
                    .json(&json!({"fileName": "c.txt", "sizeBytes": 3}))
                    .send()
                    .await
                    .expect("send");
                let status = res.status().as_u16();
                let code = res
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v["code"].as_str().map(str::to_owned));
                (status, code)
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.expect("task") {
            (201, _) => created += 1,
            (409, Some(code)) => assert_eq!(code, "requestInProgress"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(created >= 1);
    assert_eq!(
        store.registrations.load(Ordering::SeqCst) - before,
        1,
        "the inner service ran once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bypass_mode_admits_logs_and_counts() {
    let redis = upgate_testkit::RedisServer::start();
    let (gw, store) = start(&redis, 2, true).await;
    for _ in 0..8 {
        let res = gw
            .req(Method::POST, "/v1/sessions", KEY_A)
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 201, "bypass admits");
    }
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        2 * 8,
        "quota count + session each"
    );
    let metrics = gw
        .client
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    let bypassed = metrics
        .lines()
        .find(|l| l.starts_with("upgate_rate_limit_decisions_total{decision=\"bypassed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("bypassed counter");
    assert!(
        (5..=6).contains(&bypassed),
        "would-be rejections counted: {bypassed}"
    );
    let warned = log_lines_with("bypass mode: request admitted").len();
    assert!(warned >= 5, "would-be rejections logged: {warned}");
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// The store ran `set_upload_id` but its reply was lost (a timeout after Redis executed the
/// script): the part answers 503, the storage upload the store now points at is not
/// aborted, and the retry uploads into it and completes (the file is not left pointing at a
/// dead upload, every PUT 409 while GET says `registered`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_set_upload_id_reply_does_not_kill_the_upload() {
    let redis = upgate_testkit::RedisServer::start();
    let (gw, store) = start(&redis, 100_000, false).await;
    let s = gw.create_session(KEY_A, json!({})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    let f: Value = gw
        .register_json(
            KEY_A,
            &session,
            json!({"fileName": "u.bin", "sizeBytes": 4}),
        )
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    store.lose_set_upload_id_reply.store(true, Ordering::SeqCst);
    let res = gw
        .put_part(KEY_A, &session, &file, 1, b"data".to_vec())
        .await;
    problem(res, 503, "unavailable").await;
    store
        .lose_set_upload_id_reply
        .store(false, Ordering::SeqCst);
    let res = gw
        .put_part(KEY_A, &session, &file, 1, b"data".to_vec())
        .await;
    assert_eq!(res.status(), 200);
    let done = gw.complete(KEY_A, &session, &file).await;
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.expect("json");
    assert_eq!(done["status"], "completed");
}
