//! The control-plane ceiling: a bare hyper 1 server that answers
//! `POST /v1/sessions/{id}/files` with the file's JSON after exactly ONE `EVALSHA` of a
//! registration-shaped Lua script (gate on the session hash, `HSETNX` of the fileKey, `HINCRBY`
//! of the count, `HSET` of the file hash, all under one `{tenant:session}` hash tag). No auth,
//! no rate limit, no idempotency, no tracing, no metrics: what is left is HTTP/1.1, JSON and
//! one Redis round trip on a single multiplexed connection.
//!
//! `POST /v1/sessions` (setup only, not what is compared) writes the session hash with one
//! `HSET`.
//!
//! With `--script gateway` the one `EVALSHA` runs the gateway's own registration script
//! (`src/store/lua/prelude.lua` + `register.lua`, with the keys and arguments the gateway
//! sends, on a session hash written as `create.lua` writes one) instead of the
//! registration-shaped one. Both servers then cost Redis the same, and the ratio measures
//! only the gateway's own per-request work (`benches/README.md`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const TENANT: &str = "bench";
const PART_SIZE: u64 = 8 * 1024 * 1024;

/// Same shape as the gateway's register script: gate, duplicate key, count, file hash.
pub const REGISTER_LUA: &str = r#"
local st = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'file_limit', 'file_count')
if not st[1] then return 'snf' end
if tonumber(ARGV[1]) >= tonumber(st[2]) * 1000 then return 'exp' end
if st[1] ~= 'active' then return 'na' end
if tonumber(st[4]) >= tonumber(st[3]) then return 'full' end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 'dup' end
redis.call('HINCRBY', KEYS[1], 'file_count', 1)
redis.call('HSET', KEYS[3], unpack(ARGV, 4))
return 'created'
"#;

/// The gateway's registration script as its store assembles it (production `call`).
pub fn gateway_register_lua() -> String {
    format!(
        "local call = redis.call\n{}\n{}",
        include_str!("../../../src/store/lua/prelude.lua"),
        include_str!("../../../src/store/lua/register.lua")
    )
}

/// Which script the one `EVALSHA` runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// [`REGISTER_LUA`]: 4 calls.
    Shaped,
    /// [`gateway_register_lua`]: the gateway's own, 6 calls.
    Gateway,
}

impl std::str::FromStr for Script {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shaped" => Ok(Script::Shaped),
            "gateway" => Ok(Script::Gateway),
            other => Err(format!("--script: {other:?} is not shaped or gateway")),
        }
    }
}

struct State {
    kind: Script,
    con: redis::aio::MultiplexedConnection,
    script: redis::Script,
    ids: AtomicU64,
    seed: u64,
}

impl State {
    /// A 128-bit id, unique per process (counter mixed with a per-process seed).
    fn new_id(&self) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut x = n ^ self.seed;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        format!("{:016x}{:016x}", self.seed, x)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn problem(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let mut r = json_response(
        status,
        &json!({ "status": status.as_u16(), "code": code, "title": code }),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/problem+json"),
    );
    r
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(problem(StatusCode::PAYLOAD_TOO_LARGE, "payloadTooLarge")),
    };
    let path = parts.uri.path();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let res = match (&parts.method, segs.as_slice()) {
        (&Method::POST, ["v1", "sessions"]) => create_session(&state, &body).await,
        (&Method::POST, ["v1", "sessions", sid, "files"]) => register(&state, sid, &body).await,
        _ => problem(StatusCode::NOT_FOUND, "routeNotFound"),
    };
    Ok(res)
}

async fn create_session(state: &State, body: &[u8]) -> Response<Full<Bytes>> {
    let v: Value = serde_json::from_slice(body).unwrap_or(json!({}));
    let max_files = v["maxFiles"].as_u64().unwrap_or(1000);
    let id = state.new_id();
    let now = now_ms() / 1000;
    let expires = now + 1800;
    let mut con = state.con.clone();
    let key = format!("bl:{{{TENANT}:{id}}}:s");
    let mut hset = redis::cmd("HSET");
    hset.arg(&key)
        .arg(&[("status", "active")])
        .arg(&[("expires_at", expires), ("created_at", now)])
        .arg(&[("file_limit", max_files), ("file_count", 0)]);
    // The fields `create.lua` adds that `register.lua` reads, and the session's retention.
    let keep_until_ms = (expires + 3600) * 1000;
    if state.kind == Script::Gateway {
        hset.arg(&[
            ("keep_until", keep_until_ms),
            ("part_size_bytes", PART_SIZE as i64),
            ("ordered", 1),
            ("file_seq", 0),
        ]);
    }
    let r: redis::RedisResult<()> = async {
        hset.exec_async(&mut con).await?;
        if state.kind == Script::Gateway {
            redis::cmd("PEXPIREAT")
                .arg(&key)
                .arg(keep_until_ms)
                .exec_async(&mut con)
                .await?;
        }
        Ok(())
    }
    .await;
    if r.is_err() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    json_response(
        StatusCode::CREATED,
        &json!({"sessionId": id, "status": "active", "partSizeBytes": PART_SIZE, "maxFiles": max_files, "fileCount": 0, "createdAt": now, "expiresAt": expires, "metadata": {}}),
    )
}

async fn register(state: &State, sid: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return problem(StatusCode::BAD_REQUEST, "validationFailed");
    };
    let (Some(name), Some(size)) = (v["fileName"].as_str(), v["sizeBytes"].as_u64()) else {
        return problem(StatusCode::BAD_REQUEST, "validationFailed");
    };
    let file_key = v["fileKey"].as_str().unwrap_or(name);
    let content_type = v["contentType"]
        .as_str()
        .unwrap_or("application/octet-stream");
    let part_count = if size == 0 {
        1
    } else {
        size.div_ceil(PART_SIZE)
    };
    let file = NewFile {
        sid,
        name,
        size,
        file_key,
        content_type,
        part_count,
        id: state.new_id(),
        now: now_ms(),
    };
    let base = format!("bl:{{{TENANT}:{sid}}}:");
    if state.kind == Script::Gateway {
        return register_gateway_script(state, &base, &file).await;
    }
    let (id, now) = (&file.id, file.now);
    let object_key = format!("{TENANT}/{sid}/{file_key}");
    let mut inv = state.script.prepare_invoke();
    inv.key(format!("{base}s"))
        .key(format!("{base}keys"))
        .key(format!("{base}f:{id}"))
        .arg(now)
        .arg(file_key)
        .arg(id)
        .arg("file_name")
        .arg(name)
        .arg("size_bytes")
        .arg(size)
        .arg("content_type")
        .arg(content_type)
        .arg("status")
        .arg("registered")
        .arg("part_size_bytes")
        .arg(PART_SIZE)
        .arg("part_count")
        .arg(part_count)
        .arg("created_at")
        .arg(now / 1000)
        .arg("object_key")
        .arg(&object_key);
    let mut con = state.con.clone();
    let outcome: redis::RedisResult<String> = inv.invoke_async(&mut con).await;
    match outcome.as_deref() {
        Ok("created") => created(&file),
        Ok("dup") => problem(StatusCode::CONFLICT, "duplicateFileKey"),
        Ok("full") => problem(StatusCode::BAD_REQUEST, "fileCountExceeded"),
        Ok("exp") => problem(StatusCode::GONE, "sessionExpired"),
        Ok("na") => problem(StatusCode::CONFLICT, "sessionNotActive"),
        Ok(_) => problem(StatusCode::NOT_FOUND, "sessionNotFound"),
        Err(e) => {
            eprintln!("baseline: redis: {e}");
            problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    }
}

/// A registration as the request gave it, with its id, part count and time.
struct NewFile<'a> {
    sid: &'a str,
    name: &'a str,
    size: u64,
    file_key: &'a str,
    content_type: &'a str,
    part_count: u64,
    id: String,
    now: i64,
}

/// The 201 answer for `f`.
fn created(f: &NewFile<'_>) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::CREATED,
        &json!({
            "fileId": f.id, "fileKey": f.file_key, "fileName": f.name, "sizeBytes": f.size,
            "contentType": f.content_type, "status": "registered", "partSizeBytes": PART_SIZE,
            "partCount": f.part_count, "createdAt": f.now / 1000,
        }),
    )
}

/// `register` with the gateway's script: its 6 keys and the arguments the gateway's store
/// sends (`src/store/redis.rs`, `register` and `file_fields`), its reply decoded.
async fn register_gateway_script(
    state: &State,
    base: &str,
    f: &NewFile<'_>,
) -> Response<Full<Bytes>> {
    let NewFile {
        sid,
        name,
        size,
        file_key,
        content_type,
        part_count,
        ref id,
        now,
    } = *f;
    let object_key = format!("{TENANT}/{sid}/{id}/{file_key}");
    // The two probes as the gateway's store computes them (`content_type_keys`).
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let major = essence.split('/').next().unwrap_or("");
    let mut inv = state.script.prepare_invoke();
    inv.key(format!("{base}s"))
        .key(format!("{base}keys"))
        .key(format!("{base}o"))
        .key(format!("{base}f:{id}"))
        .key(format!("{base}ev"))
        .key(format!("{base}evq"))
        .arg(now)
        .arg(file_key)
        .arg(id)
        .arg(size)
        .arg(PART_SIZE)
        .arg(format!("\n{essence}\n"))
        .arg(format!("\n{major}/*\n"))
        .arg("id")
        .arg(id)
        .arg("session_id")
        .arg(sid)
        .arg("file_key")
        .arg(file_key)
        .arg("file_name")
        .arg(name)
        .arg("size_bytes")
        .arg(size)
        .arg("status")
        .arg("registered")
        .arg("part_size_bytes")
        .arg(PART_SIZE)
        .arg("part_count")
        .arg(part_count)
        .arg("created_at")
        .arg(now / 1000)
        .arg("object_key")
        .arg(&object_key)
        .arg("content_type")
        .arg(content_type);
    let mut con = state.con.clone();
    let outcome: redis::RedisResult<Vec<redis::Value>> = inv.invoke_async(&mut con).await;
    // The reply's first two words, borrowed (no allocation per request).
    fn word(v: Option<&redis::Value>) -> &[u8] {
        match v {
            Some(redis::Value::BulkString(b)) => b,
            Some(redis::Value::SimpleString(s)) => s.as_bytes(),
            _ => b"",
        }
    }
    match outcome {
        Ok(reply) => match (word(reply.first()), word(reply.get(1))) {
            (b"ok", b"created") => created(f),
            (b"ok", b"dup") => problem(StatusCode::CONFLICT, "duplicateFileKey"),
            (b"ok", b"full") => problem(StatusCode::BAD_REQUEST, "fileCountExceeded"),
            (b"exp", _) => problem(StatusCode::GONE, "sessionExpired"),
            (b"na", _) => problem(StatusCode::CONFLICT, "sessionNotActive"),
            (b"snf", _) => problem(StatusCode::NOT_FOUND, "sessionNotFound"),
            (a, b) => {
                eprintln!(
                    "baseline: unexpected register reply {:?} {:?}",
                    String::from_utf8_lossy(a),
                    String::from_utf8_lossy(b)
                );
                problem(StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        },
        Err(e) => {
            eprintln!("baseline: redis: {e}");
            problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    }
}

/// Serves until the process is killed.
pub async fn serve(listen: &str, redis_url: &str, kind: Script) -> Result<(), String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let con = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let source = match kind {
        Script::Shaped => REGISTER_LUA.to_owned(),
        Script::Gateway => gateway_register_lua(),
    };
    let script = redis::Script::new(&source);
    // Load once up front, so every request is exactly one EVALSHA.
    let mut c = con.clone();
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(&source)
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let state = Arc::new(State {
        kind,
        con,
        script,
        ids: AtomicU64::new(0),
        seed,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    println!(
        "baseline ({} script) listening on http://{}",
        match kind {
            Script::Shaped => "registration-shaped",
            Script::Gateway => "the gateway's",
        },
        listener.local_addr().map_err(|e| e.to_string())?
    );
    loop {
        let stream = crate::accept(&listener, "baseline").await;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One `POST` on a fresh connection: the status and the body.
    async fn post(port: u16, path: &str, body: &str) -> (u16, Value) {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the baseline");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        let text = String::from_utf8(raw).expect("utf-8 answer");
        let status = text[9..12].parse().expect("status code");
        let (_, json) = text.split_once("\r\n\r\n").expect("head and body");
        (status, serde_json::from_str(json).expect("JSON body"))
    }

    async fn start(kind: Script) -> (upgate_testkit::RedisServer, u16) {
        let redis = upgate_testkit::RedisServer::start();
        let port = upgate_testkit::free_port();
        let url = redis.url();
        tokio::spawn(async move {
            if let Err(e) = serve(&format!("127.0.0.1:{port}"), &url, kind).await {
                panic!("baseline: {e}");
            }
        });
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return (redis, port);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the baseline did not listen");
    }

    async fn connect(redis: &upgate_testkit::RedisServer) -> redis::aio::MultiplexedConnection {
        redis::Client::open(redis.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// Registers one file twice in a new session: 201, then 409. The session id.
    async fn register_twice(port: u16) -> String {
        let (status, session) = post(port, "/v1/sessions", r#"{"maxFiles": 10}"#).await;
        assert_eq!(status, 201, "{session}");
        let sid = session["sessionId"].as_str().expect("sessionId").to_owned();
        let file =
            r#"{"fileName":"a.bin","sizeBytes":1048576,"contentType":"application/octet-stream"}"#;
        let path = format!("/v1/sessions/{sid}/files");
        let (status, created) = post(port, &path, file).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["fileKey"], "a.bin");
        let (status, dup) = post(port, &path, file).await;
        assert_eq!(status, 409, "{dup}");
        assert_eq!(dup["code"], "duplicateFileKey");
        sid
    }

    #[tokio::test]
    async fn the_gateway_script_mode_runs_the_gateways_registration() {
        let (redis, port) = start(Script::Gateway).await;
        let sid = register_twice(port).await;
        // What the gateway's script leaves: the count and sequence number, the order set
        // entry, and the file hash under the session's retention.
        let mut con = connect(&redis).await;
        let base = format!("bl:{{{TENANT}:{sid}}}:");
        let (count, seq): (u32, u32) = redis::cmd("HMGET")
            .arg(format!("{base}s"))
            .arg("file_count")
            .arg("file_seq")
            .query_async(&mut con)
            .await
            .expect("HMGET");
        assert_eq!((count, seq), (1, 1));
        let order: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{base}o"))
            .arg(0)
            .arg(-1)
            .query_async(&mut con)
            .await
            .expect("ZRANGE");
        assert_eq!(order.len(), 1);
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("{base}f:{}", order[0]))
            .query_async(&mut con)
            .await
            .expect("PTTL");
        assert!(ttl > 0, "the file hash has no retention: {ttl}");
    }

    #[tokio::test]
    async fn the_shaped_mode_counts_and_refuses_a_taken_file_key() {
        let (redis, port) = start(Script::Shaped).await;
        let sid = register_twice(port).await;
        let mut con = connect(&redis).await;
        let count: u32 = redis::cmd("HGET")
            .arg(format!("bl:{{{TENANT}:{sid}}}:s"))
            .arg("file_count")
            .query_async(&mut con)
            .await
            .expect("HGET");
        assert_eq!(count, 1);
    }
}
