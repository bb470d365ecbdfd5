//! `upgate-bench`: whole-gateway load test (see `benches/README.md`, "Whole-gateway load test").
//!
//! ```text
//! upgate-bench flow            --target URL --key KEY [--concurrency N] [--duration S] [--files F] [--file-size BYTES]
//! upgate-bench register        --target URL [--key KEY] [--concurrency N] [--duration S]
//!                              [--credential key|token|jwt] [--jwt TOKEN] (token: register with the session's upload token; jwt: create and register with an end-user JWT)
//! upgate-bench parts           --target URL --key KEY [--concurrency N] [--duration S] [--part-size BYTES] [--parts-per-file P] [--complete true] (complete each file before deleting it)
//! upgate-bench parts-presigned --target URL --key KEY   (same options; bytes go straight to S3)
//!                              [--via HOST:PORT]        (connect to an L4 proxy in front of S3)
//! upgate-bench tcp-proxy       --to HOST:PORT [--listen ADDR] [--buffer BYTES] [--splice true]
//!                              (user-space L4 forwarder; prints its address, blocks)
//! upgate-bench baseline-server --listen ADDR --redis URL [--script shaped|gateway]
//! upgate-bench s3-server       [--bucket NAME]          (in-process s3s-fs; prints env lines, blocks)
//! upgate-bench webhook-sink    --json-out FILE [--listen ADDR] (answers webhooks 204; prints its
//!                              address; on SIGTERM writes deliveries/s and latency, exits)
//! upgate-bench tus-create      --target URL --key KEY [--concurrency N] [--duration S] (POST /v1/tus into a worker's session)
//! upgate-bench uppy-create     --target URL --key KEY [--concurrency N] [--duration S] (Uppy's POST /v1/uppy/{token}/s3/multipart)
//! upgate-bench uppy-sign       --target URL --key KEY [--concurrency N] [--duration S] (Uppy's GET .../s3/multipart/{id}/{n})
//! upgate-bench tus-patch       --target URL --key KEY [--chunk-size BYTES] [--chunks-per-upload N] (PATCH, completing each upload)
//! upgate-bench redis-mem       --target URL --key KEY --redis URL [--sessions N] [--files M]
//! upgate-bench report          --dir DIR
//! ```
//! Load options common to every scenario: `--warmup S` (not measured, default 1),
//! `--requests N` (bound on the scenario's main operations, default 10,000,000),
//! `--json-out FILE`, `--label TEXT`, `--threads N` (Tokio workers, default: all cores).
//! Every target must be a loopback address.

mod baseline;
mod client;
mod proxy;
mod report;
mod scenarios;
mod sink;
mod stats;

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use serde_json::json;

/// With `--features mimalloc`: the allocator of a `--features mimalloc` gateway, for the
/// baseline server and the load generator alike.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::client::{check_loopback, Http};

/// The next connection on `listener` with TCP_NODELAY set; an accept error (EMFILE and
/// friends) is reported under `who` and retried after 10 ms instead of spinning.
pub(crate) async fn accept(listener: &tokio::net::TcpListener, who: &str) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => {
                eprintln!("{who}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
use crate::scenarios::{Common, RunResult};

const USAGE: &str = "usage: upgate-bench <flow|register|parts|parts-presigned|tus-create|tus-patch|uppy-create|uppy-sign|tcp-proxy|baseline-server|s3-server|webhook-sink|redis-mem|report> [--option value ...]\n(see the doc comment in benches/load/src/main.rs or benches/README.md)";

struct Args {
    map: HashMap<String, String>,
}

impl Args {
    fn parse(rest: &[String]) -> Result<Args, String> {
        let mut map = HashMap::new();
        let mut it = rest.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (
                    name.to_owned(),
                    it.next()
                        .ok_or_else(|| format!("--{name} needs a value"))?
                        .clone(),
                ),
            };
            map.insert(name, value);
        }
        Ok(Args { map })
    }

    fn get<T: FromStr>(&mut self, name: &str, default: T) -> Result<T, String> {
        match self.map.remove(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }

    fn opt(&mut self, name: &str) -> Option<String> {
        self.map.remove(name)
    }

    fn req(&mut self, name: &str) -> Result<String, String> {
        self.opt(name)
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn finish(self) -> Result<(), String> {
        match self.map.keys().next() {
            Some(k) => Err(format!("unknown option --{k}")),
            None => Ok(()),
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if cmd == "-h" || cmd == "--help" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match run(cmd, rest) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upgate-bench {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn run(cmd: &str, rest: &[String]) -> Result<(), String> {
    let mut a = Args::parse(rest)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let threads: usize = a.get("threads", cores)?;
    match cmd {
        "baseline-server" => {
            let listen = a.get("listen", "127.0.0.1:8090".to_owned())?;
            let redis = a.req("redis")?;
            let script: baseline::Script = a.get("script", "shaped".to_owned())?.parse()?;
            a.finish()?;
            check_loopback(&format!("http://{listen}"))?;
            check_loopback(&redis.replace("redis://", "http://"))?;
            runtime(threads)?.block_on(baseline::serve(&listen, &redis, script))
        }
        "tcp-proxy" => {
            let listen = a.get("listen", "127.0.0.1:0".to_owned())?;
            let to = a.req("to")?;
            let buffer: usize = a.get("buffer", 128 * 1024)?;
            let zero_copy: bool = a.get("splice", false)?;
            a.finish()?;
            check_loopback(&format!("http://{listen}"))?;
            check_loopback(&format!("http://{to}"))?;
            if !(4096..=16 * 1024 * 1024).contains(&buffer) {
                return Err("--buffer must be 4 KiB..=16 MiB".into());
            }
            runtime(threads)?.block_on(proxy::serve(&listen, &to, buffer, zero_copy))
        }
        "webhook-sink" => {
            let listen = a.get("listen", "127.0.0.1:0".to_owned())?;
            let out = a.req("json-out")?;
            a.finish()?;
            check_loopback(&format!("http://{listen}"))?;
            runtime(threads)?.block_on(sink::serve(&listen, &out))
        }
        "s3-server" => {
            let bucket = a.get("bucket", "bench-bucket".to_owned())?;
            a.finish()?;
            s3_server(&bucket)
        }
        "report" => {
            let dir = a.req("dir")?;
            a.finish()?;
            print!("{}", report::report(std::path::Path::new(&dir)));
            Ok(())
        }
        "flow" | "register" | "parts" | "parts-presigned" | "redis-mem" | "tus-create"
        | "tus-patch" | "uppy-create" | "uppy-sign" => {
            let target = a.get("target", "http://127.0.0.1:8080".to_owned())?;
            check_loopback(&target)?;
            let key = a.opt("key");
            let concurrency: usize = a.get("concurrency", 16)?;
            let duration: f64 = a.get("duration", 10.0)?;
            let warmup: f64 = a.get("warmup", 1.0)?;
            let max_requests: u64 = a.get("requests", 10_000_000)?;
            let json_out = a.opt("json-out");
            let label = a.get("label", target.clone())?;
            if !(duration > 0.0 && duration <= 3600.0 && (0.0..=600.0).contains(&warmup)) {
                return Err("--duration must be in (0, 3600] s and --warmup in [0, 600] s".into());
            }
            if concurrency == 0 || concurrency > 4096 {
                return Err("--concurrency must be 1..=4096".into());
            }
            let common = Common {
                target: target.clone(),
                http: Http::new(key.as_deref(), concurrency * 2),
                concurrency,
                duration: Duration::from_secs_f64(duration),
                warmup: Duration::from_secs_f64(warmup),
                max_requests,
            };
            let rt = runtime(threads)?;
            let (value, fatal) = match cmd {
                "redis-mem" => {
                    let redis = a.req("redis")?;
                    check_loopback(&redis.replace("redis://", "http://"))?;
                    let sessions: u64 = a.get("sessions", 1000)?;
                    let files: u64 = a.get("files", 10)?;
                    a.finish()?;
                    let v = rt.block_on(scenarios::redis_mem(common, &redis, sessions, files))?;
                    print!("{}", scenarios::redis_mem_markdown(&v));
                    (v, None)
                }
                "flow" => {
                    let files: u64 = a.get("files", 4)?;
                    let file_size: u64 = a.get("file-size", 1024 * 1024)?;
                    a.finish()?;
                    let r = rt.block_on(scenarios::flow(common, files, file_size));
                    let params = json!({"concurrency": concurrency, "files": files, "fileSizeBytes": file_size, "durationSeconds": duration});
                    scenario_json(
                        "flow",
                        &label,
                        params,
                        r,
                        &[
                            "whole flow",
                            "create session",
                            "register file",
                            "upload part",
                            "complete file",
                            "finalize session",
                        ],
                    )
                }
                "register" => {
                    let per_session: u64 = a.get("per-session", 100_000)?;
                    let credential = a.get("credential", "key".to_owned())?;
                    let jwt = a.opt("jwt");
                    a.finish()?;
                    let mut common = common;
                    match (credential.as_str(), jwt) {
                        ("key" | "token", _) => {}
                        // Every request (session creation too) carries the end user's JWT,
                        // so the sessions are the user's.
                        ("jwt", Some(jwt)) => common.http = common.http.with_credential(&jwt),
                        ("jwt", None) => return Err("--credential jwt needs --jwt TOKEN".into()),
                        _ => return Err("--credential must be key, token or jwt".into()),
                    }
                    let with_token = credential == "token";
                    let r = rt.block_on(scenarios::register(common, per_session, with_token));
                    let params = json!({"concurrency": concurrency, "durationSeconds": duration, "credential": credential});
                    scenario_json(
                        "register",
                        &label,
                        params,
                        r,
                        &["register file", "create session"],
                    )
                }
                "tus-create" => {
                    let per_session: u64 = a.get("per-session", 100_000)?;
                    a.finish()?;
                    let r = rt.block_on(scenarios::tus_create(common, per_session));
                    let params = json!({"concurrency": concurrency, "durationSeconds": duration});
                    scenario_json(
                        "tus-create",
                        &label,
                        params,
                        r,
                        &["tus create", "create session"],
                    )
                }
                "uppy-create" | "uppy-sign" => {
                    let per_session: u64 = a.get("per-session", 100_000)?;
                    a.finish()?;
                    let op = if cmd == "uppy-sign" { "sign" } else { "create" };
                    let r = rt.block_on(scenarios::uppy(common, op, per_session));
                    let params = json!({"concurrency": concurrency, "durationSeconds": duration});
                    let order: &[&'static str] = if op == "sign" {
                        &["uppy sign", "uppy create", "create session"]
                    } else {
                        &["uppy create", "create session"]
                    };
                    scenario_json(cmd, &label, params, r, order)
                }
                "tus-patch" => {
                    let chunk: u64 = a.get("chunk-size", 5 * 1024 * 1024)?;
                    let chunks: u64 = a.get("chunks-per-upload", 4)?;
                    a.finish()?;
                    if chunk == 0 || chunk > 100 * 1024 * 1024 || chunks == 0 {
                        return Err(
                            "--chunk-size 1..=100 MiB, --chunks-per-upload at least 1".into()
                        );
                    }
                    let r = rt.block_on(scenarios::tus_patch(common, chunk, chunks));
                    let params = json!({"concurrency": concurrency, "chunkSizeBytes": chunk, "chunksPerUpload": chunks, "durationSeconds": duration});
                    scenario_json(
                        "tus-patch",
                        &label,
                        params,
                        r,
                        &["tus patch", "tus create", "tus delete"],
                    )
                }
                _ => {
                    let presigned = cmd == "parts-presigned";
                    let part_size: u64 = a.get("part-size", 8 * 1024 * 1024)?;
                    let per_file: u64 = a.get("parts-per-file", 4)?;
                    let via = a.opt("via");
                    let complete: bool = a.get("complete", false)?;
                    a.finish()?;
                    if let Some(v) = &via {
                        if !presigned {
                            return Err("--via applies to parts-presigned only".into());
                        }
                        check_loopback(&format!("http://{v}"))?;
                    }
                    if part_size > 100 * 1024 * 1024 || per_file == 0 || per_file > 10_000 {
                        return Err(
                            "--part-size at most 100 MiB, --parts-per-file 1..=10000".into()
                        );
                    }
                    let r = rt.block_on(scenarios::parts(
                        common, part_size, per_file, presigned, via, complete,
                    ));
                    let params = json!({"concurrency": concurrency, "partSizeBytes": part_size, "partsPerFile": per_file, "durationSeconds": duration, "complete": complete});
                    scenario_json(
                        cmd,
                        &label,
                        params,
                        r,
                        &[
                            "upload part (proxied)",
                            "upload part (presigned, direct to S3)",
                            "register file",
                            "presign parts",
                            "complete file",
                            "abort file",
                            "create session",
                        ],
                    )
                }
            };
            // Let pooled connections close before the runtime goes.
            drop(rt);
            if let Some(path) = json_out {
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?,
                )
                .map_err(|e| format!("{path}: {e}"))?;
            }
            match fatal {
                Some(f) => Err(f),
                None => Ok(()),
            }
        }
        _ => Err(USAGE.into()),
    }
}

fn scenario_json(
    scenario: &str,
    label: &str,
    params: serde_json::Value,
    r: RunResult,
    order: &[&'static str],
) -> (serde_json::Value, Option<String>) {
    let v = stats::to_json(scenario, label, params, &r.stats, r.window, order);
    print!("{}", stats::markdown(&v));
    println!();
    let _ = std::io::stdout().flush();
    (v, r.fatal)
}

/// Starts the in-process S3 server (testkit's s3s-fs with its AWS-compatibility layer),
/// prints shell-sourceable settings, and serves until SIGINT/SIGTERM (then removes its data).
fn s3_server(bucket: &str) -> Result<(), String> {
    let server = upgate_testkit::s3::S3Server::start(bucket);
    println!("S3_ENDPOINT={}", server.endpoint());
    println!("S3_BUCKET={}", server.bucket());
    println!("S3_REGION={}", server.region());
    println!("AWS_ACCESS_KEY_ID={}", server.access_key());
    println!("AWS_SECRET_ACCESS_KEY={}", server.secret_key());
    println!("S3_ROOT={}", server.root().display());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<(), String>(())
    })?;
    drop(server);
    Ok(())
}
