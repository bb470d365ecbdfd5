//! Real tus clients against the gateway (issue 16): tus-js-client (npm, run by Node) and
//! tuspy (PyPI), both installed by `scripts/test.sh` from `tests/clients/`. Each uploads
//! files of 0 B, 1 B, 5 MiB and 23 MiB in chunks of 256 KiB, 1 MiB and 7 MiB to filesystem
//! storage and to S3 (the in-process server over HTTP, with Redis); the object must be
//! byte-identical. tus-js-client also resumes, in tus 1.0 and in the IETF drafts, after the
//! gateway is killed mid-upload and a new one starts on the same Redis, and uploads with
//! `parallelUploads` (the concatenation extension).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::binary::Binary;
use common::*;
use serde_json::{json, Value};
use upgate_testkit::s3::S3Server;
use upgate_testkit::RedisServer;

const MIB: usize = 1024 * 1024;
const SIZES: [usize; 4] = [0, 1, 5 * MIB, 23 * MIB];
const CHUNKS: [usize; 3] = [256 * 1024, MIB, 7 * MIB];

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Client {
    TusJs,
    Tuspy,
}

/// Runs one client upload; its JSON line.
fn run(client: Client, opts: &Value) -> Value {
    let dir = clients_dir();
    let mut cmd = match client {
        Client::TusJs => {
            assert!(
                dir.join("node_modules/tus-js-client").exists(),
                "tus-js-client is not installed: run `npm ci --prefix tests/clients` (scripts/test.sh does)"
            );
            let mut c = Command::new("node");
            c.arg(dir.join("tus_upload.mjs"));
            c
        }
        Client::Tuspy => {
            let mut c = Command::new("python3");
            c.arg(dir.join("tuspy_upload.py"));
            c
        }
    };
    let out = cmd.arg(opts.to_string()).output().expect("run the client");
    assert!(
        out.status.success(),
        "{client:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("a result line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{client:?}: {e}: {stdout}"))
}

/// The REST view of the file behind a tus upload URL.
async fn file_of(base: &str, upload_url: &str) -> Value {
    let http = reqwest::Client::new();
    let res = http
        .head(upload_url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), 200, "{upload_url}");
    let s = res.headers()["upgate-session-id"]
        .to_str()
        .expect("s")
        .to_owned();
    let f = res.headers()["upgate-file-id"]
        .to_str()
        .expect("f")
        .to_owned();
    http.get(format!("{base}/v1/sessions/{s}/files/{f}"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// Every size in every chunk size through `client`; `object` reads a completed file's
/// object from its storage.
async fn matrix(client: Client, base: &str, object: impl Fn(&Value) -> Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    for size in SIZES {
        let bytes = data(size, size as u64 + 1);
        let path = dir.path().join(format!("f{size}.bin"));
        std::fs::write(&path, &bytes).expect("write");
        for chunk in CHUNKS {
            let name = format!("f{size}-{chunk}.bin");
            let out = run(
                client,
                &json!({
                    "endpoint": format!("{base}/v1/tus"),
                    "file": path,
                    "chunkSize": chunk,
                    "token": KEY_A,
                    "metadata": {"filename": name, "filetype": "application/octet-stream"},
                }),
            );
            let url = out["url"].as_str().expect("url");
            let file = file_of(base, url).await;
            assert_eq!(
                file["status"], "completed",
                "{client:?} {size} by {chunk}: {file}"
            );
            assert_eq!(file["fileName"], name);
            assert_eq!(file["sizeBytes"], size);
            assert_eq!(
                sha256_hex(&object(&file)),
                sha256_hex(&bytes),
                "{client:?} {size} by {chunk}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_on_filesystem_storage() {
    let gw = memory_fs_gateway().await;
    matrix(Client::TusJs, &gw.base, fs_object).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_on_s3() {
    let s3 = S3Server::start("tusjs");
    let redis = RedisServer::start();
    let gw = s3_redis_gateway(&s3, &redis).await;
    matrix(Client::TusJs, &gw.base, |f| s3_object(&s3, f)).await;
    assert_eq!(s3.open_upload_count(), 0);
}

/// tus-js-client's `parallelUploads`: the file split into partial uploads sent at once and
/// joined by the concatenation extension into one byte-identical object.
async fn parallel(base: &str, object: impl Fn(&Value) -> Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (size, parallel) in [(23 * MIB, 3), (5 * MIB + 1, 2)] {
        let bytes = data(size, 99);
        let path = dir.path().join("p.bin");
        std::fs::write(&path, &bytes).expect("write");
        let out = run(
            Client::TusJs,
            &json!({
                "endpoint": format!("{base}/v1/tus"),
                "file": path,
                "chunkSize": MIB,
                "parallelUploads": parallel,
                "token": KEY_A,
                "metadata": {"filename": "p.bin"},
            }),
        );
        let url = out["url"].as_str().expect("url");
        assert!(url.contains("c~"), "a final upload: {url}");
        let file = file_of(base, url).await;
        assert_eq!(file["status"], "completed", "{size} in {parallel}: {file}");
        assert_eq!(file["fileName"], "p.bin");
        assert_eq!(file["sizeBytes"], size);
        assert_eq!(sha256_hex(&object(&file)), sha256_hex(&bytes));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_parallel_uploads_on_filesystem_storage() {
    let gw = memory_fs_gateway().await;
    parallel(&gw.base, fs_object).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_parallel_uploads_on_s3() {
    let s3 = S3Server::start("tusjspar");
    let redis = RedisServer::start();
    let gw = s3_redis_gateway(&s3, &redis).await;
    parallel(&gw.base, |f| s3_object(&s3, f)).await;
    assert_eq!(s3.open_upload_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_on_filesystem_storage() {
    let gw = memory_fs_gateway().await;
    matrix(Client::Tuspy, &gw.base, fs_object).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_on_s3() {
    let s3 = S3Server::start("tuspy");
    let redis = RedisServer::start();
    let gw = s3_redis_gateway(&s3, &redis).await;
    matrix(Client::Tuspy, &gw.base, |f| s3_object(&s3, f)).await;
    assert_eq!(s3.open_upload_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_with_checksums_and_resume_by_url() {
    let gw = memory_fs_gateway().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = data(6 * MIB + 5, 42);
    let path = dir.path().join("half.bin");
    // The first half, through the REST-free path: a client that stopped.
    std::fs::write(&path, &bytes[..3 * MIB]).expect("write");
    let res = gw
        .req(reqwest::Method::POST, "/v1/tus", KEY_A)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", bytes.len().to_string())
        .header("content-type", "application/offset+octet-stream")
        .body(bytes[..3 * MIB].to_vec())
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 201);
    let url = gw.url(res.headers()["location"].to_str().expect("loc"));
    // tuspy resumes it from its URL (HEAD, then PATCHes with Upload-Checksum).
    std::fs::write(&path, &bytes).expect("write");
    let out = run(
        Client::Tuspy,
        &json!({"endpoint": gw.url("/v1/tus"), "file": path, "chunkSize": MIB, "token": KEY_A, "uploadUrl": url, "checksum": true}),
    );
    assert_eq!(out["offset"], bytes.len());
    let file = file_of(&gw.base, &url).await;
    assert_eq!(file["status"], "completed");
    assert_eq!(sha256_hex(&fs_object(&file)), sha256_hex(&bytes));
}

fn binary_config(redis: &RedisServer, s3: &S3Server) -> String {
    format!(
        "redis_url = \"{}\"\nstorage = \"s3://{}/pfx\"\n[s3]\nendpoint = \"{}\"\nregion = \"{}\"\nforce_path_style = true\n",
        redis.url(),
        s3.bucket(),
        s3.endpoint(),
        s3.region()
    )
}

/// tus-js-client pauses before a PATCH past 7 MiB; meanwhile the gateway is killed
/// (SIGKILL) and a new one starts on the same Redis and port; the client's next request
/// fails, it retries, HEADs the upload and resumes from the stored offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_resumes_after_the_gateway_is_killed_in_tus_and_the_ietf_drafts() {
    let redis = RedisServer::start();
    let s3 = S3Server::start("resume");
    let extra = binary_config(&redis, &s3);
    let env = [
        ("AWS_ACCESS_KEY_ID", s3.access_key()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key()),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = data(23 * MIB, 7);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &bytes).expect("write");
    for protocol in ["tus-v1", "ietf-draft-03", "ietf-draft-05"] {
        let port = upgate_testkit::free_port();
        let mut first = Binary::start_on(&extra, &env, port);
        let base = format!("http://127.0.0.1:{port}");
        let mut child = Command::new("node")
            .arg(clients_dir().join("tus_upload.mjs"))
            .arg(
                json!({
                    "endpoint": format!("{base}/v1/tus"),
                    "file": path,
                    "chunkSize": MIB,
                    "protocol": protocol,
                    "token": KEY_A,
                    "metadata": {"filename": "big.bin"},
                    "pauseAt": 7 * MIB,
                    "pauseMs": 4000,
                })
                .to_string(),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("node");
        // Wait for the pause, then kill the gateway and start another on the same port.
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
        assert!(line.starts_with("PAUSED "), "{protocol}: {line}");
        first.signal("-KILL");
        first.wait(Duration::from_secs(10));
        let second = Binary::start_on(&extra, &env, port);
        let out = tokio::task::spawn_blocking(move || {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut rest).expect("read");
            let status = child.wait().expect("wait");
            (status, rest)
        })
        .await
        .expect("join");
        assert!(out.0.success(), "{protocol}: the client failed: {}", out.1);
        let result: Value =
            serde_json::from_str(out.1.lines().last().expect("line")).expect("json");
        let url = result["url"].as_str().expect("url");
        // The same upload went on (a client that started over would have made another).
        let paused_url = line.split_whitespace().nth(1).expect("paused url");
        assert_eq!(url, paused_url, "{protocol}");
        let file = file_of(&base, url).await;
        assert_eq!(file["status"], "completed", "{protocol}: {file}");
        assert_eq!(
            sha256_hex(&s3_object(&s3, &file)),
            sha256_hex(&bytes),
            "{protocol}"
        );
        drop(second);
    }
}

/// The gateway SIGKILLed while it makes a final upload of two 40 MiB partial uploads on S3
/// (killed once the final upload's multipart upload is open): after a restart on the same
/// Redis the partial uploads are still there, completed and whole, and creating the final
/// upload again makes the whole object and removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concatenation_killed_midway_leaves_its_partial_uploads_whole() {
    let redis = RedisServer::start();
    let s3 = S3Server::start("concatkill");
    let extra = binary_config(&redis, &s3);
    let env = [
        ("AWS_ACCESS_KEY_ID", s3.access_key()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key()),
    ];
    let port = upgate_testkit::free_port();
    let mut first = Binary::start_on(&extra, &env, port);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let pieces = [data(40 * MIB, 11), data(40 * MIB + 5, 12)];
    let mut urls = Vec::new();
    for bytes in &pieces {
        let res = http
            .post(format!("{base}/v1/tus"))
            .bearer_auth(KEY_A)
            .header("tus-resumable", "1.0.0")
            .header("upload-concat", "partial")
            .header("upload-length", bytes.len().to_string())
            .header("content-type", "application/offset+octet-stream")
            .body(bytes.clone())
            .send()
            .await
            .expect("partial");
        assert_eq!(res.status(), 201, "{}", first.stdout());
        let loc = res.headers()["location"].to_str().expect("loc").to_owned();
        urls.push(format!("{base}{loc}"));
    }
    assert_eq!(
        s3.open_upload_count(),
        0,
        "the partial uploads are completed"
    );
    let final_req = |http: &reqwest::Client| {
        http.post(format!("{base}/v1/tus"))
            .bearer_auth(KEY_A)
            .header("tus-resumable", "1.0.0")
            .header("upload-concat", format!("final;{}", urls.join(" ")))
            .send()
    };
    let killed = tokio::spawn(final_req(&http));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s3.open_upload_count() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    assert_eq!(
        s3.open_upload_count(),
        1,
        "the final upload's multipart upload is open"
    );
    first.signal("-KILL");
    first.wait(Duration::from_secs(10));
    assert!(
        killed.await.expect("join").is_err(),
        "the concatenation was cut"
    );

    let second = Binary::start_on(&extra, &env, port);
    for (url, bytes) in urls.iter().zip(&pieces) {
        let file = file_of(&base, url).await;
        assert_eq!(file["status"], "completed", "{url}: {file}");
        assert_eq!(sha256_hex(&s3_object(&s3, &file)), sha256_hex(bytes));
    }
    let res = final_req(&http).await.expect("final again");
    assert_eq!(
        res.status(),
        201,
        "{:?}\n{}",
        res.text().await,
        second.stdout()
    );
    let loc = res.headers()["location"].to_str().expect("loc").to_owned();
    let file = file_of(&base, &format!("{base}{loc}")).await;
    assert_eq!(file["status"], "completed", "{file}");
    assert_eq!(
        sha256_hex(&s3_object(&s3, &file)),
        sha256_hex(&pieces.concat())
    );
    for url in &urls {
        let res = http
            .head(url)
            .bearer_auth(KEY_A)
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .expect("head");
        assert_eq!(res.status(), 404, "{url} is gone");
    }
}
