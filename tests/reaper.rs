//! The reaper: expired sessions' storage uploads are aborted, once, by one of several
//! replicas sharing a real redis-server.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_reap_an_expired_session_once() {
    let redis = upgate_testkit::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config("");
    cfg.reaper_interval = Duration::from_secs(1);
    cfg.redis = Some(upgate::config::RedisTarget::Single(redis.url()));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = upgate::build_store(&cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let fs = upgate::storage::fs::FsStore::new(dir.path())
            .await
            .expect("fs");
        let counting = CountingStorage::new(Arc::new(fs));
        replicas.push(
            TestGateway::start_with(cfg.clone(), store, counting, dir.path().to_owned(), None)
                .await,
        );
    }
    let gw = &replicas[0];
    let s = gw.create_session(KEY_A, json!({"ttlSeconds": 6})).await;
    let session = s["sessionId"].as_str().expect("id").to_owned();
    // A half-uploaded file: part 1 of 2.
    let size = 5 * 1024 * 1024 + 10;
    let f: Value = gw
        .register_json(
            KEY_A,
            &session,
            json!({"fileName": "half", "sizeBytes": size}),
        )
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.put_part(KEY_A, &session, &file, 1, vec![1; 5 * 1024 * 1024])
            .await
            .status(),
        200
    );
    let uploads = dir.path().join(".uploads");
    assert_eq!(std::fs::read_dir(&uploads).expect("uploads").count(), 1);

    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&uploads).expect("uploads").count() > 0 {
        assert!(Instant::now() < deadline, "the reaper aborted the upload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give both reapers a few more passes, then count.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reaped: u64 = replicas
        .iter()
        .map(|r| r.state.metrics.sessions_reaped.get())
        .sum();
    let aborted: usize = replicas
        .iter()
        .map(|r| r.counting.aborts.load(Ordering::SeqCst))
        .sum();
    assert_eq!(reaped, 1, "reaped once between the two replicas");
    assert_eq!(aborted, 1, "one storage abort");
    let events: Vec<Value> = log_lines_with(&session)
        .into_iter()
        .filter(|l| l["event"] == "session_expired")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["observed_by"], "reaper");
    assert_eq!(events[0]["files_registered"], 1);
    // Requests now answer 410 (the gateway still remembers the session).
    let res = gw
        .req(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}"),
            KEY_A,
        )
        .send()
        .await
        .expect("send");
    problem(res, 410, "sessionExpired").await;
}
