//! Webhooks (`../shared/API.md` v1.1, "Events") against a real HTTP receiver in the test:
//! retries with the same `webhook-id`, signatures checked by an independent Standard
//! Webhooks implementation (the `standardwebhooks` crate), the whole upload told in order,
//! dead letters and the retry endpoint, events surviving a SIGKILL (after the change and
//! in the middle of a delivery), and two replicas on one Redis and on a Redis Cluster
//! delivering 1,000 events exactly once with gap-free sequences.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use common::binary::Binary;
use common::*;
use serde_json::{json, Value};
use upgate_testkit::{RedisCluster, RedisServer};

/// The endpoint's secret: `whsec_` and the base64 of 32 bytes.
const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// What the receiver answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Answer {
    Status(u16),
    /// Never answers (the delivery runs into its timeout, or the gateway dies).
    Hang,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    id: String,
    headers: HeaderMap,
    body: Bytes,
    json: Value,
}

type Policy = dyn Fn(&Hit, usize) -> Answer + Send + Sync;

/// A webhook receiver on a loopback port. `policy` gets each request and how many
/// requests with its `webhook-id` came before it.
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    policy: Arc<Mutex<Arc<Policy>>>,
}

impl Receiver {
    async fn start(policy: impl Fn(&Hit, usize) -> Answer + Send + Sync + 'static) -> Receiver {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let policy: Arc<Mutex<Arc<Policy>>> = Arc::new(Mutex::new(Arc::new(policy)));
        let (h, p) = (hits.clone(), policy.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (h, p) = (h.clone(), p.clone());
                async move {
                    let id = headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let hit = Hit {
                        id: id.clone(),
                        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        headers,
                        body,
                    };
                    let before = {
                        let mut all = h.lock().unwrap();
                        let n = all.iter().filter(|x| x.id == id).count();
                        all.push(hit.clone());
                        n
                    };
                    let policy = p.lock().unwrap().clone();
                    match policy(&hit, before) {
                        Answer::Status(s) => StatusCode::from_u16(s).unwrap(),
                        Answer::Hang => std::future::pending().await,
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, hits, policy }
    }

    fn set_policy(&self, policy: impl Fn(&Hit, usize) -> Answer + Send + Sync + 'static) {
        *self.policy.lock().unwrap() = Arc::new(policy);
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The hits the receiver answered 2xx for, by policy (re-evaluated: tests keep
    /// policies that depend only on the hit and its count).
    async fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&[Hit]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.hits()) {
                return;
            }
            if Instant::now() > deadline {
                let got: Vec<(String, Value)> = self
                    .hits()
                    .iter()
                    .map(|h| (h.id.clone(), h.json["type"].clone()))
                    .collect();
                panic!("timed out waiting for {what}; got {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn kind(h: &Hit) -> &str {
    h.json["type"].as_str().unwrap_or("")
}

/// The test tenants, tenant `a` with a webhook to each of `urls` (each with its event
/// filter), and the retry settings shortened.
fn hooked_toml(extra: &str, hooks: &[(&str, Option<&[&str]>)]) -> String {
    let mut tables = String::new();
    for (url, events) in hooks {
        tables.push_str(&format!(
            "\n[[tenants.webhooks]]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n"
        ));
        if let Some(list) = events {
            tables.push_str(&format!("events = {list:?}\n"));
        }
    }
    let extra = format!("webhook_retry_initial_seconds = 1\nwebhook_recheck_seconds = 1\n{extra}");
    edit_hooks(config_toml(&extra), &tables)
}

fn edit_hooks(cfg: String, tables: &str) -> String {
    let anchor = "max_concurrent_uploads = 1000\n";
    assert!(cfg.contains(anchor), "tenant a's table");
    cfg.replacen(anchor, &format!("{anchor}{tables}"), 1)
}

fn hooked(extra: &str, hooks: &[(&str, Option<&[&str]>)]) -> upgate::config::Config {
    upgate::config::Config::from_toml(&hooked_toml(extra, hooks), |_| None, false)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn verify(h: &Hit) {
    let wh = standardwebhooks::Webhook::new(SECRET).expect("secret");
    wh.verify(&h.body, &h.headers)
        .unwrap_or_else(|e| panic!("signature of {}: {e:?}", h.id));
    assert_eq!(
        h.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
}

async fn upload_one(gw: &TestGateway, session: &str, name: &str) -> String {
    let file = gw.register_id(KEY_A, session, name, 5).await;
    let put = gw
        .put_part(KEY_A, session, &file, 1, b"hello".to_vec())
        .await;
    assert_eq!(put.status(), 200, "part");
    let done = gw.complete(KEY_A, session, &file).await;
    assert_eq!(done.status(), 200, "complete");
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_until_delivered_with_one_id_and_a_signature_that_verifies() {
    // The first two attempts of every event fail (a 500, then a 503).
    let rx = Receiver::start(|_, before| match before {
        0 => Answer::Status(500),
        1 => Answer::Status(503),
        _ => Answer::Status(204),
    })
    .await;
    let gw = TestGateway::start(
        hooked("", &[(&rx.url, None)]),
        Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        )),
    )
    .await;
    let sid = gw
        .session_id(KEY_A, json!({"metadata": {"order": 7}}))
        .await;
    rx.wait_for("three attempts", Duration::from_secs(20), |h| h.len() >= 3)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = rx.hits();
    assert_eq!(
        hits.len(),
        3,
        "delivered on the third attempt, then no more"
    );
    let id = &hits[0].id;
    assert_eq!(*id, format!("evt_{sid}_1"));
    assert!(
        hits.iter().all(|h| &h.id == id),
        "one webhook-id for every attempt"
    );
    for h in &hits {
        verify(h);
    }
    // Backoff: a second or so, then about twice that (jitter keeps each in its upper half).
    let ts: Vec<i64> = hits
        .iter()
        .map(|h| {
            h.headers["webhook-timestamp"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(ts[0] <= ts[1] && ts[1] <= ts[2], "{ts:?}");
    let body = &hits[2].json;
    assert_eq!(body["type"], "session.created");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(body["data"]["tenant"], "a");
    assert_eq!(body["data"]["sessionId"], sid.as_str());
    assert_eq!(body["data"]["sequence"], 1);
    assert_eq!(body["data"]["session"]["status"], "active");
    assert_eq!(body["data"]["session"]["metadata"]["order"], 7);
    assert!(body["data"].get("file").is_none());
    // Nothing is pending any more.
    let pending = gw.get_json(KEY_A, "/v1/webhooks/events").await;
    assert_eq!(pending["events"], json!([]), "{pending}");
    let metrics = gw
        .client
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "upgate_webhook_deliveries_total{outcome=\"retried\"} 2",
        "upgate_webhook_deliveries_total{outcome=\"delivered\"} 1",
        "upgate_webhook_delivery_seconds_count 1",
        "upgate_webhook_queue_depth ",
        "upgate_webhook_oldest_pending_seconds ",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // Tenant b has no webhooks: its sessions record nothing and nothing is sent for them.
    gw.session_id(KEY_B, json!({})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.hits().len(), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_upload_is_told_in_order_and_filters_hold() {
    let redis = RedisServer::start();
    let all = Receiver::start(|_, _| Answer::Status(200)).await;
    let landed = Receiver::start(|_, _| Answer::Status(200)).await;
    let filter: &[&str] = &["file.completed", "session.finalized"];
    let gw = TestGateway::start(
        hooked("", &[(&all.url, None), (&landed.url, Some(filter))]),
        redis_store(&redis.url()).await,
    )
    .await;
    let sid = gw.session_id(KEY_A, json!({})).await;
    let file = upload_one(&gw, &sid, "a.bin").await;
    let gone = gw.register_id(KEY_A, &sid, "b.bin", 3).await;
    let del = gw
        .req(
            reqwest::Method::DELETE,
            &format!("/v1/sessions/{sid}/files/{gone}"),
            KEY_A,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(gw.finalize(KEY_A, &sid).await.status(), 200);
    let del = gw
        .req(
            reqwest::Method::DELETE,
            &format!("/v1/sessions/{sid}"),
            KEY_A,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    all.wait_for("seven events", Duration::from_secs(15), |h| h.len() >= 7)
        .await;
    landed
        .wait_for("two events", Duration::from_secs(15), |h| h.len() >= 2)
        .await;
    let mut hits = all.hits();
    hits.sort_by_key(|h| h.json["data"]["sequence"].as_u64());
    let kinds: Vec<&str> = hits.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            "session.created",
            "file.registered",
            "file.completed",
            "file.registered",
            "file.deleted",
            "session.finalized",
            "session.deleted"
        ]
    );
    let seqs: Vec<u64> = hits
        .iter()
        .map(|h| h.json["data"]["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    for h in &hits {
        verify(h);
    }
    let completed = &hits[2].json["data"]["file"];
    assert_eq!(completed["fileId"], file.as_str());
    assert_eq!(completed["status"], "completed");
    assert!(completed["fileUrl"].is_string(), "{completed}");
    assert_eq!(hits[4].json["data"]["file"]["status"], "aborted");
    assert_eq!(hits[5].json["data"]["session"]["status"], "finalized");
    let mut got: Vec<String> = landed.hits().iter().map(|h| kind(h).to_owned()).collect();
    got.sort();
    assert_eq!(
        got,
        ["file.completed", "session.finalized"],
        "the filter holds"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(all.hits().len(), 7, "each delivered once");
    assert_eq!(landed.hits().len(), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_after_the_window_and_delivered_again_on_retry() {
    let rx = Receiver::start(|_, _| Answer::Status(500)).await;
    let gw = TestGateway::start(
        hooked("webhook_retry_window_seconds = 2\n", &[(&rx.url, None)]),
        Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        )),
    )
    .await;
    let created = gw.create_session(KEY_A, json!({})).await;
    let sid = created["sessionId"].as_str().unwrap().to_owned();
    let token = created["uploadToken"].as_str().map(str::to_owned);
    let id = format!("evt_{sid}_1");
    let deadline = Instant::now() + Duration::from_secs(20);
    let failed = loop {
        let v = gw
            .get_json(KEY_A, "/v1/webhooks/events?status=failed")
            .await;
        if v["events"].as_array().is_some_and(|e| !e.is_empty()) {
            break v;
        }
        assert!(Instant::now() < deadline, "not dead-lettered: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ev = &failed["events"][0];
    assert_eq!(ev["eventId"], id.as_str());
    assert_eq!(ev["type"], "session.created");
    assert_eq!(ev["sessionId"], sid.as_str());
    assert_eq!(ev["status"], "failed");
    assert_eq!(ev["lastStatusCode"], 500);
    assert!(ev["attempts"].as_u64().unwrap() >= 2, "{ev}");
    assert!(ev["lastAttemptAt"].is_string());
    assert_eq!(ev["nextAttemptAt"], Value::Null);
    assert_eq!(failed["nextCursor"], Value::Null);
    let attempts = rx.hits().len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(rx.hits().len(), attempts, "a dead letter is not attempted");
    // Only the API key sees the queue.
    if let Some(t) = &token {
        let res = gw
            .req(reqwest::Method::GET, "/v1/webhooks/events", t)
            .send()
            .await
            .unwrap();
        problem(res, 403, "insufficientScope").await;
    }
    let res = gw
        .req(
            reqwest::Method::POST,
            "/v1/webhooks/events/evt_nosuch_1/retry",
            KEY_A,
        )
        .send()
        .await
        .unwrap();
    problem(res, 404, "eventNotFound").await;
    // Another tenant cannot retry it.
    let res = gw
        .req(
            reqwest::Method::POST,
            &format!("/v1/webhooks/events/{id}/retry"),
            KEY_B,
        )
        .send()
        .await
        .unwrap();
    problem(res, 404, "eventNotFound").await;
    rx.set_policy(|_, _| Answer::Status(200));
    let res = gw
        .req(
            reqwest::Method::POST,
            &format!("/v1/webhooks/events/{id}/retry"),
            KEY_A,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    rx.wait_for("the redelivery", Duration::from_secs(10), |h| {
        h.len() > attempts
    })
    .await;
    let last = rx.hits().pop().unwrap();
    assert_eq!(last.id, id);
    verify(&last);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = gw
        .get_json(KEY_A, "/v1/webhooks/events?status=failed")
        .await;
    assert_eq!(left["events"], json!([]));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_to_a_sigkill_after_the_change_or_during_its_delivery() {
    let redis = RedisServer::start();
    // file.completed's first attempt never gets an answer: the gateway is killed during
    // it. Everything else is taken.
    let rx = Receiver::start(|h, before| {
        if kind(h) == "file.completed" && before == 0 {
            Answer::Hang
        } else {
            Answer::Status(200)
        }
    })
    .await;
    let extra = format!("redis_url = \"{}\"\n", redis.url());
    let cfg = |c: String| {
        edit_hooks(
            c,
            &format!(
                "\n[[tenants.webhooks]]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
                rx.url
            ),
        )
    };
    let settings =
        format!("webhook_retry_initial_seconds = 1\nwebhook_recheck_seconds = 1\n{extra}");
    let mut first = Binary::start_edited(&settings, &[], cfg);
    let client = reqwest::Client::new();
    let created = first.post_json(&client, "/v1/sessions", json!({})).await;
    let sid = created["sessionId"].as_str().unwrap().to_owned();
    let file = first
        .post_json(
            &client,
            &format!("/v1/sessions/{sid}/files"),
            json!({"fileName": "x.bin", "sizeBytes": 4}),
        )
        .await;
    let fid = file["fileId"].as_str().unwrap().to_owned();
    let put = client
        .put(first.url(&format!("/v1/sessions/{sid}/files/{fid}/parts/1")))
        .bearer_auth(KEY_A)
        .body("abcd")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let done = first
        .post_json(
            &client,
            &format!("/v1/sessions/{sid}/files/{fid}/complete"),
            json!({}),
        )
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    rx.wait_for("the hanging attempt", Duration::from_secs(10), |h| {
        h.iter().any(|h| kind(h) == "file.completed")
    })
    .await;
    first.signal("-KILL");
    let _ = first.wait(Duration::from_secs(10));
    // A second session whose change is answered and then killed at once: its event is
    // in Redis, delivered by the next process.
    let mut second = Binary::start_edited(&settings, &[], cfg);
    rx.set_policy(|_, _| Answer::Hang);
    let other = second.post_json(&client, "/v1/sessions", json!({})).await;
    let other_sid = other["sessionId"].as_str().unwrap().to_owned();
    second.signal("-KILL");
    let _ = second.wait(Duration::from_secs(10));
    rx.set_policy(|_, _| Answer::Status(200));
    let _third = Binary::start_edited(&settings, &[], cfg);
    // The interrupted delivery's lease (15 s per endpoint plus 5 s) runs out first.
    let completed_id = format!("evt_{sid}_3");
    let created_id = format!("evt_{other_sid}_1");
    rx.wait_for(
        "both events after the restart",
        Duration::from_secs(60),
        |h| {
            h.iter().filter(|h| h.id == completed_id).count() >= 2
                && h.iter().any(|h| h.id == created_id)
        },
    )
    .await;
    let again = rx
        .hits()
        .into_iter()
        .filter(|h| h.id == completed_id)
        .last()
        .unwrap();
    assert_eq!(kind(&again), "file.completed");
    assert_eq!(again.json["data"]["file"]["fileId"], fid.as_str());
    verify(&again);
}

/// 100 sessions with 9 files each on two replicas (1,000 events): each event delivered
/// once, each session's sequence gap-free.
async fn two_replicas_deliver_each_event_once(
    store_a: Arc<dyn upgate::store::SessionStore>,
    store_b: Arc<dyn upgate::store::SessionStore>,
) {
    let rx = Receiver::start(|_, _| Answer::Status(200)).await;
    let cfg = || hooked("", &[(&rx.url, None)]);
    let a = Arc::new(TestGateway::start(cfg(), store_a).await);
    let b = Arc::new(TestGateway::start(cfg(), store_b).await);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (first, second) = if i % 2 == 0 {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        tasks.push(tokio::spawn(async move {
            let sid = first.session_id(KEY_A, json!({})).await;
            for f in 0..9 {
                // Alternate replicas within a session too.
                let gw = if f % 2 == 0 { &second } else { &first };
                gw.register_id(KEY_A, &sid, &format!("f{f}"), 1).await;
            }
            sid
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.unwrap());
    }
    rx.wait_for("1,000 events", Duration::from_secs(120), |h| {
        h.len() >= 1000
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hits = rx.hits();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for h in &hits {
        *by_id.entry(h.id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = by_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(by_id.len(), 1000);
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    for h in &hits {
        seqs.entry(h.json["data"]["sessionId"].as_str().unwrap().to_owned())
            .or_default()
            .push(h.json["data"]["sequence"].as_u64().unwrap());
    }
    assert_eq!(seqs.len(), 100);
    for s in &sessions {
        let mut got = seqs.remove(s).expect("the session's events");
        got.sort();
        assert_eq!(got, (1..=10).collect::<Vec<_>>(), "session {s}");
    }
    for gw in [a, b] {
        if let Ok(gw) = Arc::try_unwrap(gw) {
            gw.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_redis_deliver_each_event_once() {
    let redis = RedisServer::start();
    two_replicas_deliver_each_event_once(
        redis_store(&redis.url()).await,
        redis_store(&redis.url()).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_a_redis_cluster_deliver_each_event_once() {
    let cluster = RedisCluster::start(3);
    let store = || {
        let urls = cluster.urls();
        async move {
            let handle = upgate::store::redis::RedisHandle::cluster(&urls).expect("cluster");
            Arc::new(
                upgate::store::redis::RedisStore::new(handle, Default::default()).expect("store"),
            ) as Arc<dyn upgate::store::SessionStore>
        }
    };
    two_replicas_deliver_each_event_once(store().await, store().await).await;
}
