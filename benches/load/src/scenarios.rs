//! The load scenarios: `flow`, `register`, `parts`, `parts-presigned`, and the Redis memory
//! probe `redis-mem`. Every loop is bounded by a deadline and a request budget.

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use crate::client::{check_loopback, Http, Reply};
use crate::stats::{Outcome, Stats};

/// Settings every scenario shares.
#[derive(Clone)]
pub struct Common {
    pub target: String,
    pub http: Http,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Upper bound on the scenario's main operations (flows, registrations, parts).
    pub max_requests: u64,
}

/// Deadline, warm-up end and request budget of one run.
pub struct Budget {
    pub deadline: Instant,
    pub measure_from: Instant,
    remaining: AtomicI64,
    /// A fatal misconfiguration seen by a worker stops everyone.
    stop: AtomicU64,
}

impl Budget {
    fn new(c: &Common) -> Arc<Budget> {
        let now = Instant::now();
        Arc::new(Budget {
            measure_from: now + c.warmup,
            deadline: now + c.warmup + c.duration,
            remaining: AtomicI64::new(c.max_requests.min(i64::MAX as u64) as i64),
            stop: AtomicU64::new(0),
        })
    }

    /// Time and budget left, and nobody stopped the run.
    pub fn open(&self) -> bool {
        self.stop.load(Ordering::Relaxed) == 0
            && self.remaining.load(Ordering::Relaxed) > 0
            && Instant::now() < self.deadline
    }

    /// Time left and nobody stopped the run (the request budget aside).
    pub fn time_left(&self) -> bool {
        self.stop.load(Ordering::Relaxed) == 0 && Instant::now() < self.deadline
    }

    /// Takes one unit of the request budget (false: the run is over).
    pub fn take(&self) -> bool {
        self.open() && self.remaining.fetch_sub(1, Ordering::Relaxed) > 0
    }

    fn abort(&self) {
        self.stop.store(1, Ordering::Relaxed);
    }
}

/// Per-worker state handed to the worker closure.
pub struct Worker {
    pub id: usize,
    pub stats: Stats,
    pub budget: Arc<Budget>,
    /// When this worker's last measured request finished.
    pub last_end: Option<Instant>,
    pub fatal: Option<String>,
}

impl Worker {
    fn record(&mut self, name: &'static str, start: Instant, outcome: Outcome) {
        if start >= self.budget.measure_from {
            self.last_end = Some(Instant::now());
        }
        self.stats
            .record(name, start, self.budget.measure_from, outcome);
    }

    /// Records a reply: `bytes` counted on success.
    fn record_reply(
        &mut self,
        name: &'static str,
        start: Instant,
        r: &Result<Reply, String>,
        bytes: u64,
    ) {
        let outcome = match r {
            Ok(rep) if rep.ok() => Outcome::Ok(bytes),
            Ok(rep) => Outcome::Err(rep.error_kind()),
            Err(e) => Outcome::Err(e.clone()),
        };
        self.record(name, start, outcome);
    }

    fn fatal(&mut self, msg: String) {
        self.fatal = Some(msg);
        self.budget.abort();
    }
}

/// The merged result of a run.
pub struct RunResult {
    pub stats: Stats,
    pub window: Duration,
    pub fatal: Option<String>,
}

async fn run_workers<F, Fut>(c: &Common, f: F) -> RunResult
where
    F: Fn(Worker) -> Fut,
    Fut: Future<Output = Worker> + Send + 'static,
{
    let budget = Budget::new(c);
    let mut tasks = Vec::with_capacity(c.concurrency);
    for id in 0..c.concurrency {
        let w = Worker {
            id,
            stats: Stats::default(),
            budget: budget.clone(),
            last_end: None,
            fatal: None,
        };
        tasks.push(tokio::spawn(f(w)));
    }
    let mut stats = Stats::default();
    let mut last_end = budget.measure_from;
    let mut fatal = None;
    for t in tasks {
        match t.await {
            Ok(w) => {
                stats.merge(&w.stats);
                if let Some(e) = w.last_end {
                    last_end = last_end.max(e);
                }
                if fatal.is_none() {
                    fatal = w.fatal;
                }
            }
            Err(e) => fatal = Some(format!("worker panicked: {e}")),
        }
    }
    RunResult {
        stats,
        window: last_end.saturating_duration_since(budget.measure_from),
        fatal,
    }
}

/// Deterministic, incompressible-looking bytes (xorshift), shared by every request.
pub fn payload(len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len + 8);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn url(c: &Common, path: &str) -> String {
    format!("{}{}", c.target.trim_end_matches('/'), path)
}

async fn create_session(c: &Common, w: &mut Worker, max_files: u64) -> Option<String> {
    create_session_with_token(c, w, max_files)
        .await
        .map(|(sid, _)| sid)
}

/// [`create_session`], with the session's `uploadToken`.
async fn create_session_with_token(
    c: &Common,
    w: &mut Worker,
    max_files: u64,
) -> Option<(String, String)> {
    let start = Instant::now();
    let r = c
        .http
        .post_json(&url(c, "/v1/sessions"), &json!({ "maxFiles": max_files }))
        .await;
    w.record_reply("create session", start, &r, 0);
    match r {
        Ok(rep) if rep.ok() => {
            let v = rep.json();
            let sid = v["sessionId"].as_str().map(str::to_owned)?;
            let token = v["uploadToken"].as_str().unwrap_or_default().to_owned();
            Some((sid, token))
        }
        Ok(rep) if rep.status == 401 || rep.status == 400 => {
            w.fatal(format!(
                "POST /v1/sessions answered {}: {}",
                rep.status,
                String::from_utf8_lossy(&rep.body)
            ));
            None
        }
        _ => {
            tokio::time::sleep(Duration::from_millis(10)).await;
            None
        }
    }
}

fn file_doc(name: &str, size: u64) -> Value {
    json!({ "fileName": name, "sizeBytes": size, "contentType": "application/octet-stream" })
}

/// The length of part `n` of a file (1-based).
fn part_len(size: u64, part_size: u64, part_count: u64, n: u64) -> u64 {
    if n < part_count {
        part_size
    } else {
        size - part_size * (part_count - 1)
    }
}

/// `flow`: create session → register F files → upload every part → complete each → finalize.
pub async fn flow(c: Common, files: u64, file_size: u64) -> RunResult {
    let buf = payload(file_size.min(100 * 1024 * 1024) as usize);
    let c2 = c.clone();
    run_workers(&c, move |mut w| {
        let c = c2.clone();
        let buf = buf.clone();
        async move {
            let mut seq = 0u64;
            while w.budget.take() {
                let flow_start = Instant::now();
                let Some(sid) = create_session(&c, &mut w, files).await else {
                    continue;
                };
                let mut ok = true;
                let mut registered = Vec::new();
                for i in 0..files {
                    seq += 1;
                    let start = Instant::now();
                    let name = format!("w{}-{seq}-{i}.bin", w.id);
                    let r = c
                        .http
                        .post_json(
                            &url(&c, &format!("/v1/sessions/{sid}/files")),
                            &file_doc(&name, file_size),
                        )
                        .await;
                    w.record_reply("register file", start, &r, 0);
                    match r {
                        Ok(rep) if rep.ok() => {
                            let v = rep.json();
                            let id = v["fileId"].as_str().unwrap_or_default().to_owned();
                            let ps = v["partSizeBytes"].as_u64().unwrap_or(0);
                            let pc = v["partCount"].as_u64().unwrap_or(0);
                            registered.push((id, ps, pc));
                        }
                        _ => ok = false,
                    }
                }
                'files: for (fid, ps, pc) in &registered {
                    if !ok {
                        break;
                    }
                    for n in 1..=*pc {
                        if !w.budget.time_left() {
                            ok = false;
                            break 'files;
                        }
                        let len = part_len(file_size, *ps, *pc, n);
                        if len as usize > buf.len() {
                            w.fatal(format!(
                                "part of {len} bytes exceeds the 100 MiB payload buffer"
                            ));
                            ok = false;
                            break 'files;
                        }
                        let start = Instant::now();
                        let u = url(&c, &format!("/v1/sessions/{sid}/files/{fid}/parts/{n}"));
                        let r = c
                            .http
                            .send(
                                Method::PUT,
                                &u,
                                true,
                                Some("application/octet-stream"),
                                buf.slice(0..len as usize),
                            )
                            .await;
                        w.record_reply("upload part", start, &r, len);
                        if !matches!(&r, Ok(rep) if rep.ok()) {
                            ok = false;
                            break 'files;
                        }
                    }
                }
                if ok {
                    for (fid, _, _) in &registered {
                        let start = Instant::now();
                        let r = c
                            .http
                            .post_json(
                                &url(&c, &format!("/v1/sessions/{sid}/files/{fid}/complete")),
                                &json!({}),
                            )
                            .await;
                        w.record_reply("complete file", start, &r, 0);
                        ok &= matches!(&r, Ok(rep) if rep.ok());
                    }
                }
                if ok {
                    let start = Instant::now();
                    let r = c
                        .http
                        .post_json(
                            &url(&c, &format!("/v1/sessions/{sid}/finalize")),
                            &json!({}),
                        )
                        .await;
                    w.record_reply("finalize session", start, &r, 0);
                    ok = matches!(&r, Ok(rep) if rep.ok());
                }
                if ok {
                    w.record("whole flow", flow_start, Outcome::Ok(0));
                } else {
                    // Free the storage of a failed or cut-off flow (not measured).
                    let _ = c
                        .http
                        .send(
                            Method::DELETE,
                            &url(&c, &format!("/v1/sessions/{sid}")),
                            true,
                            None,
                            Bytes::new(),
                        )
                        .await;
                }
            }
            w
        }
    })
    .await
}

/// `register`: register-file throughput, one session per worker (renewed when full).
pub async fn register(c: Common, per_session: u64, with_token: bool) -> RunResult {
    let c2 = c.clone();
    run_workers(&c, move |mut w| {
        let c = c2.clone();
        async move {
            let mut seq = 0u64;
            'sessions: while w.budget.open() {
                let Some((sid, token)) = create_session_with_token(&c, &mut w, per_session).await
                else {
                    continue;
                };
                // With `with_token`, registrations carry the session's upload token (what a
                // browser sends) instead of the API key.
                let http = if with_token {
                    c.http.with_credential(&token)
                } else {
                    c.http.clone()
                };
                let files_url = url(&c, &format!("/v1/sessions/{sid}/files"));
                for _ in 0..per_session {
                    if !w.budget.take() {
                        break 'sessions;
                    }
                    seq += 1;
                    let name = format!("w{}-{seq}.bin", w.id);
                    let start = Instant::now();
                    let r = http.post_json(&files_url, &file_doc(&name, 1024)).await;
                    w.record_reply("register file", start, &r, 0);
                    match r {
                        Ok(rep) if rep.ok() => {}
                        Ok(rep)
                            if rep.status == 400 && rep.json()["code"] == "fileCountExceeded" =>
                        {
                            continue 'sessions
                        }
                        Ok(rep) if rep.status == 401 || rep.status == 404 || rep.status == 410 => {
                            if rep.status == 401 {
                                w.fatal(format!(
                                    "register answered 401: {}",
                                    String::from_utf8_lossy(&rep.body)
                                ));
                            }
                            continue 'sessions;
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }
            w
        }
    })
    .await
}

/// `parts` / `parts-presigned`: part upload throughput through the gateway, or straight to
/// S3 with URLs the gateway presigned once per file. Each worker registers a file of
/// `parts_per_file` parts, uploads them, then deletes the file (aborting its upload, so
/// storage does not fill up).
///
/// With `via` (presigned only), every part PUT connects to that loopback address (an L4
/// proxy in front of the S3 server, `upgate-bench tcp-proxy`) and sends the presigned URL's
/// host as `Host`.
pub async fn parts(
    c: Common,
    part_size: u64,
    parts_per_file: u64,
    presigned: bool,
    via: Option<String>,
    complete: bool,
) -> RunResult {
    let buf = payload(part_size as usize);
    let c2 = c.clone();
    let part_name: &'static str = if presigned {
        "upload part (presigned, direct to S3)"
    } else {
        "upload part (proxied)"
    };
    run_workers(&c, move |mut w| {
        let c = c2.clone();
        let buf = buf.clone();
        let via = via.clone();
        async move {
            let mut seq = 0u64;
            let mut sid: Option<String> = None;
            while w.budget.open() {
                let session = match &sid {
                    Some(s) => s.clone(),
                    None => match create_session(&c, &mut w, 100_000).await {
                        Some(s) => {
                            sid = Some(s.clone());
                            s
                        }
                        None => continue,
                    },
                };
                seq += 1;
                let start = Instant::now();
                let name = format!("w{}-{seq}.bin", w.id);
                let r = c
                    .http
                    .post_json(&url(&c, &format!("/v1/sessions/{session}/files")), &file_doc(&name, part_size * parts_per_file))
                    .await;
                w.record_reply("register file", start, &r, 0);
                let file = match r {
                    Ok(rep) if rep.ok() => rep.json(),
                    Ok(rep) if rep.status == 400 && rep.json()["code"] == "fileCountExceeded" => {
                        sid = None;
                        continue;
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let fid = file["fileId"].as_str().unwrap_or_default().to_owned();
                if file["partSizeBytes"].as_u64() != Some(part_size) {
                    w.fatal(format!(
                        "the gateway's part size is {} bytes, not --part-size {part_size}: set part_size_mb / MULTIPART_PART_SIZE_MB",
                        file["partSizeBytes"]
                    ));
                    break;
                }
                let file_url = url(&c, &format!("/v1/sessions/{session}/files/{fid}"));
                let targets: Vec<String> = if presigned {
                    let start = Instant::now();
                    let numbers: Vec<u64> = (1..=parts_per_file).collect();
                    let r = c.http.post_json(&format!("{file_url}/presigned-parts"), &json!({ "partNumbers": numbers })).await;
                    w.record_reply("presign parts", start, &r, 0);
                    let urls: Vec<String> = match &r {
                        Ok(rep) if rep.ok() => rep.json()["parts"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|p| p["url"].as_str().map(str::to_owned)).collect())
                            .unwrap_or_default(),
                        Ok(rep) if rep.status == 501 => {
                            w.fatal("presigned-parts answered 501: the gateway needs S3 storage".into());
                            break;
                        }
                        _ => Vec::new(),
                    };
                    if let Some(bad) = urls.iter().find(|u| check_loopback(u).is_err()) {
                        w.fatal(format!("presigned URL is not on loopback: {bad}"));
                        break;
                    }
                    urls
                } else {
                    (1..=parts_per_file).map(|n| format!("{file_url}/parts/{n}")).collect()
                };
                for t in &targets {
                    if !w.budget.take() {
                        break;
                    }
                    let start = Instant::now();
                    let r = if presigned {
                        c.http.send_via(Method::PUT, t, via.as_deref(), false, None, buf.clone()).await
                    } else {
                        c.http.send(Method::PUT, t, true, Some("application/octet-stream"), buf.clone()).await
                    };
                    w.record_reply(part_name, start, &r, part_size);
                    if r.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                if complete && w.budget.open() {
                    let start = Instant::now();
                    let r = c.http.post_json(&format!("{file_url}/complete"), &json!({})).await;
                    w.record_reply("complete file", start, &r, 0);
                }
                // Delete the file (its upload, or its object once completed) so storage does
                // not fill up (measured, every variant alike).
                let start = Instant::now();
                let r = c.http.send(Method::DELETE, &file_url, true, None, Bytes::new()).await;
                w.record_reply("abort file", start, &r, 0);
            }
            w
        }
    })
    .await
}

/// Reads `used_memory` from `INFO memory`.
async fn used_memory(con: &mut redis::aio::MultiplexedConnection) -> Result<i64, String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(con)
        .await
        .map_err(|e| e.to_string())?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "INFO memory has no used_memory".into())
}

/// `redis-mem`: Redis memory per active session and per registered file, created through
/// the gateway. `used_memory` deltas across `sessions` sessions with `files` files each, and
/// `MEMORY USAGE` of one session's keys by kind.
pub async fn redis_mem(
    c: Common,
    redis_url: &str,
    sessions: u64,
    files: u64,
) -> Result<Value, String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let _: () = redis::cmd("MEMORY")
        .arg("PURGE")
        .query_async(&mut con)
        .await
        .unwrap_or(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m0 = used_memory(&mut con).await?;

    let next = Arc::new(AtomicU64::new(0));
    let ids = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..c.concurrency {
        let (c, next, ids) = (c.clone(), next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < sessions {
                let r = c
                    .http
                    .post_json(
                        &url(&c, "/v1/sessions"),
                        &json!({ "maxFiles": files.max(1) }),
                    )
                    .await;
                match r {
                    Ok(rep) if rep.ok() => {
                        if let Some(id) = rep.json()["sessionId"].as_str() {
                            ids.lock().await.push(id.to_owned());
                        }
                    }
                    Ok(rep) => return Err(format!("create session: {}", rep.error_kind())),
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let ids: Vec<String> = ids.lock().await.clone();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m1 = used_memory(&mut con).await?;

    let next = Arc::new(AtomicU64::new(0));
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for _ in 0..c.concurrency {
        let (c, next, ids) = (c.clone(), next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ids.len() as u64 * files {
                    return Ok::<(), String>(());
                }
                let sid = &ids[(i / files) as usize];
                let doc = file_doc(&format!("dir/file-{}.bin", i % files), 20 * 1024 * 1024);
                let r = c
                    .http
                    .post_json(&url(&c, &format!("/v1/sessions/{sid}/files")), &doc)
                    .await;
                match r {
                    Ok(rep) if rep.ok() => {}
                    Ok(rep) => return Err(format!("register: {}", rep.error_kind())),
                    Err(e) => return Err(e),
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m2 = used_memory(&mut con).await?;

    // One session's keys, by kind (the part after the hash tag, ids folded).
    let mut by_kind: std::collections::BTreeMap<String, (u64, i64)> =
        std::collections::BTreeMap::new();
    if let Some(sid) = ids.first() {
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next_cursor, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{sid}*"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut con)
                .await
                .map_err(|e| e.to_string())?;
            keys.extend(batch);
            cursor = next_cursor;
            if cursor == 0 {
                break;
            }
        }
        for k in keys {
            let bytes: Option<i64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&k)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut con)
                .await
                .map_err(|e| e.to_string())?;
            let kind = k
                .rsplit_once("}:")
                .map(|(_, s)| s.to_owned())
                .unwrap_or_else(|| k.clone());
            let kind = match kind.split_once(':') {
                Some((prefix, _id)) => format!("{prefix}:<fileId>"),
                None => kind,
            };
            let e = by_kind.entry(kind).or_default();
            e.0 += 1;
            e.1 += bytes.unwrap_or(0);
        }
    }
    let n = ids.len().max(1) as f64;
    let per_session = (m1 - m0) as f64 / n;
    let per_file = if files > 0 {
        (m2 - m1) as f64 / (n * files as f64)
    } else {
        0.0
    };
    Ok(json!({
        "sessions": ids.len(),
        "filesPerSession": files,
        "usedMemoryBefore": m0,
        "usedMemoryAfterSessions": m1,
        "usedMemoryAfterFiles": m2,
        "bytesPerSession": per_session,
        "bytesPerFile": per_file,
        "oneSessionKeys": by_kind.iter().map(|(k, (count, bytes))| json!({"kind": k, "keys": count, "memoryUsageBytes": bytes})).collect::<Vec<_>>(),
    }))
}

/// Markdown for the `redis-mem` JSON.
pub fn redis_mem_markdown(v: &Value) -> String {
    let mut out = format!(
        "#### Redis memory (`INFO memory` used_memory deltas, {} sessions × {} files)\n\n| what | bytes |\n|---|---:|\n| per active session (no files) | {:.0} |\n| per registered file | {:.0} |\n| one session with {} files | {:.0} |\n\n",
        v["sessions"], v["filesPerSession"],
        v["bytesPerSession"].as_f64().unwrap_or(0.0),
        v["bytesPerFile"].as_f64().unwrap_or(0.0),
        v["filesPerSession"],
        v["bytesPerSession"].as_f64().unwrap_or(0.0) + v["bytesPerFile"].as_f64().unwrap_or(0.0) * v["filesPerSession"].as_f64().unwrap_or(0.0),
    );
    out.push_str("`MEMORY USAGE` of one session's keys (key bytes only; the keyspace's own per-key overhead is in the deltas above):\n\n| key | keys | bytes |\n|---|---:|---:|\n");
    for k in v["oneSessionKeys"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            k["kind"].as_str().unwrap_or("?"),
            k["keys"],
            k["memoryUsageBytes"]
        ));
    }
    out
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// `tus-create`: tus creation throughput (`POST /v1/tus` of a 1 KiB upload into a session
/// the worker created, `Upload-Metadata` `sessionId`): the tus counterpart of `register`.
pub async fn tus_create(c: Common, per_session: u64) -> RunResult {
    let c2 = c.clone();
    run_workers(&c, move |mut w| {
        let c = c2.clone();
        async move {
            let mut seq = 0u64;
            let endpoint = url(&c, "/v1/tus");
            'sessions: while w.budget.open() {
                let Some(sid) = create_session(&c, &mut w, per_session).await else {
                    continue;
                };
                let sid_b64 = b64(&sid);
                for _ in 0..per_session {
                    if !w.budget.take() {
                        break 'sessions;
                    }
                    seq += 1;
                    let meta = format!(
                        "sessionId {sid_b64},filename {}",
                        b64(&format!("w{}-{seq}.bin", w.id))
                    );
                    let headers = [
                        ("tus-resumable", "1.0.0".to_owned()),
                        ("upload-length", "1024".to_owned()),
                        ("upload-metadata", meta),
                    ];
                    let start = Instant::now();
                    let r = c
                        .http
                        .send_headers(Method::POST, &endpoint, &headers, None, Bytes::new())
                        .await;
                    w.record_reply("tus create", start, &r, 0);
                    match r {
                        Ok(rep) if rep.ok() => {}
                        Ok(rep)
                            if rep.status == 400 && rep.json()["code"] == "fileCountExceeded" =>
                        {
                            continue 'sessions
                        }
                        Ok(rep) if rep.status == 401 => {
                            w.fatal(format!(
                                "tus create answered 401: {}",
                                String::from_utf8_lossy(&rep.body)
                            ));
                            break 'sessions;
                        }
                        Ok(_) => continue 'sessions,
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }
            w
        }
    })
    .await
}

/// `uppy`: Uppy Companion's S3 routes (`/v1/uppy/{token}/s3/...`), as `@uppy/aws-s3`
/// calls them: the upload token in the path, no `Authorization`. `op` `create`: multipart
/// creations (`POST .../s3/multipart`: a file registered; the S3 multipart upload is
/// created with the first part's URL), each worker in a session of its own; `sign`: part
/// URL signing (`GET .../s3/multipart/{uploadId}/{n}`) of one upload per worker, part
/// numbers 1..=100 in turn (the first also creates the S3 upload).
pub async fn uppy(c: Common, op: &'static str, per_session: u64) -> RunResult {
    let c2 = c.clone();
    run_workers(&c, move |mut w| {
        let c = c2.clone();
        async move {
            let mut seq = 0u64;
            let label = if op == "sign" {
                "uppy sign"
            } else {
                "uppy create"
            };
            'sessions: while w.budget.open() {
                let Some((_, token)) = create_session_with_token(&c, &mut w, per_session).await
                else {
                    continue;
                };
                let base = url(&c, &format!("/v1/uppy/{token}/s3/multipart"));
                let create = |seq: u64, id: usize| {
                    let body = json!({"filename": format!("w{id}-{seq}.bin"),
                        "type": "application/octet-stream", "metadata": {}});
                    let base = base.clone();
                    let http = c.http.clone();
                    async move {
                        http.send(
                            Method::POST,
                            &base,
                            false,
                            Some("application/json"),
                            Bytes::from(body.to_string()),
                        )
                        .await
                    }
                };
                let mut upload: Option<String> = None;
                if op == "sign" {
                    seq += 1;
                    let start = Instant::now();
                    let r = create(seq, w.id).await;
                    w.record_reply("uppy create", start, &r, 0);
                    match r {
                        Ok(rep) if rep.ok() => {
                            upload = rep.json()["uploadId"].as_str().map(str::to_owned);
                        }
                        Ok(rep) => {
                            w.fatal(format!(
                                "uppy create answered {}: {}",
                                rep.status,
                                String::from_utf8_lossy(&rep.body)
                            ));
                            break 'sessions;
                        }
                        Err(_) => continue 'sessions,
                    }
                }
                for i in 0..per_session {
                    if !w.budget.take() {
                        break 'sessions;
                    }
                    seq += 1;
                    let start = Instant::now();
                    let r = match &upload {
                        Some(id) => {
                            let n = i % 100 + 1;
                            c.http
                                .send(
                                    Method::GET,
                                    &format!("{base}/{id}/{n}?key=k"),
                                    false,
                                    None,
                                    Bytes::new(),
                                )
                                .await
                        }
                        None => create(seq, w.id).await,
                    };
                    w.record_reply(label, start, &r, 0);
                    match r {
                        Ok(rep) if rep.ok() => {}
                        Ok(rep)
                            if rep.status == 400 && rep.json()["code"] == "fileCountExceeded" =>
                        {
                            continue 'sessions
                        }
                        Ok(rep) if rep.status == 401 || rep.status == 403 || rep.status == 404 => {
                            w.fatal(format!(
                                "{label} answered {}: {}",
                                rep.status,
                                String::from_utf8_lossy(&rep.body)
                            ));
                            break 'sessions;
                        }
                        Ok(_) => continue 'sessions,
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }
            w
        }
    })
    .await
}

/// `tus-patch`: tus PATCH throughput. Each worker creates an upload of `chunks` chunks of
/// `chunk` bytes in a session of its own (`Upload-Metadata` `sessionId`), PATCHes them one
/// after another (the last one completes the file), then deletes the upload: the tus
/// counterpart of `parts --complete true` (register, parts, complete, delete).
pub async fn tus_patch(c: Common, chunk: u64, chunks: u64) -> RunResult {
    let buf = payload(chunk as usize);
    let c2 = c.clone();
    run_workers(&c, move |mut w| {
        let c = c2.clone();
        let buf = buf.clone();
        async move {
            let endpoint = url(&c, "/v1/tus");
            let mut sid: Option<String> = None;
            while w.budget.open() {
                let session = match &sid {
                    Some(s) => s.clone(),
                    None => match create_session(&c, &mut w, 100_000).await {
                        Some(s) => {
                            sid = Some(s.clone());
                            s
                        }
                        None => continue,
                    },
                };
                let headers = [
                    ("tus-resumable", "1.0.0".to_owned()),
                    ("upload-length", (chunk * chunks).to_string()),
                    ("upload-metadata", format!("sessionId {}", b64(&session))),
                ];
                let start = Instant::now();
                let r = c
                    .http
                    .send_headers(Method::POST, &endpoint, &headers, None, Bytes::new())
                    .await;
                w.record_reply("tus create", start, &r, 0);
                let upload = match r {
                    Ok(rep) if rep.ok() => match rep.location {
                        Some(l) => url(&c, &l),
                        None => {
                            w.fatal("tus create answered without Location".into());
                            break;
                        }
                    },
                    _ => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                for n in 0..chunks {
                    if !w.budget.take() {
                        break;
                    }
                    let headers = [
                        ("tus-resumable", "1.0.0".to_owned()),
                        ("upload-offset", (n * chunk).to_string()),
                    ];
                    let start = Instant::now();
                    let r = c
                        .http
                        .send_headers(
                            Method::PATCH,
                            &upload,
                            &headers,
                            Some("application/offset+octet-stream"),
                            buf.clone(),
                        )
                        .await;
                    w.record_reply("tus patch", start, &r, chunk);
                    if !matches!(&r, Ok(rep) if rep.ok()) {
                        break;
                    }
                }
                let headers = [("tus-resumable", "1.0.0".to_owned())];
                let start = Instant::now();
                let r = c
                    .http
                    .send_headers(Method::DELETE, &upload, &headers, None, Bytes::new())
                    .await;
                w.record_reply("tus delete", start, &r, 0);
            }
            w
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_part_is_the_remainder() {
        assert_eq!(part_len(10, 4, 3, 1), 4);
        assert_eq!(part_len(10, 4, 3, 3), 2);
        assert_eq!(part_len(0, 4, 1, 1), 0);
    }

    #[test]
    fn payload_has_the_asked_length() {
        assert_eq!(payload(13).len(), 13);
        assert_eq!(payload(0).len(), 0);
    }
}
