//! Uppy in a real browser: Debian's headless chromium, driven by puppeteer-core
//! (`tests/clients/uppy_browser.mjs`), opens the browser example (`examples/browser`, its
//! own backend binary handing the page an upload token), adds a 1 MiB and a 12 MiB file
//! through the Dashboard's file input and uploads them:
//! - with `@uppy/aws-s3` against the in-process S3 server (whose CORS exposes `ETag`): the
//!   12 MiB file multipart through the Companion routes, the 1 MiB one as a form POST;
//! - with `@uppy/tus`, on S3 and on filesystem storage.
//!
//! Then the objects are compared byte for byte and the session must show the files
//! completed. A removed file's multipart upload must be aborted, and Golden Retriever must
//! finish an upload interrupted by a reload. Screenshots of the finished Dashboard go to
//! `target/browser-artifacts/` (`scripts/test.sh` prints their paths).

mod common;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use upgate::config::Config;

const MIB: usize = 1024 * 1024;

/// The test configuration with tenant `a` open to every origin (the page's port is the
/// example backend's, chosen at start).
fn browser_config() -> Config {
    let toml = config_toml("").replacen(
        "max_concurrent_uploads = 1000",
        "max_concurrent_uploads = 1000\n        cors_allowed_origins = [\"*\"]",
        1,
    );
    Config::from_toml(&toml, |_| None, false).unwrap_or_else(|e| panic!("{e}"))
}

/// The example backend (`cargo run --example browser`), built with the tests.
struct Example {
    child: Child,
    url: String,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example_binary() -> PathBuf {
    // target/<profile>/deps/browser-<hash> → target/<profile>/examples/browser
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples");
    let bin = dir.join("browser");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds the examples (run the whole test command)",
        bin.display()
    );
    bin
}

fn start_example(gateway: &str) -> Example {
    let mut child = Command::new(example_binary())
        .env("UPGATE_URL", gateway)
        .env("UPGATE_API_KEY", KEY_A)
        .env("EXAMPLE_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the example backend");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the example's first line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    Example { child, url }
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

/// Runs the puppeteer driver; its JSON line.
async fn drive(page: &str, plugin: &str, mode: &str, shot: &str, files: &[PathBuf]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/uppy_browser.mjs");
    let screenshot = artifacts().join(shot);
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(script)
        .arg(page)
        .arg(plugin)
        .arg(mode)
        .arg(&screenshot)
        .args(files)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("the browser run took over 240 s")
        .expect("run node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("driver output is not JSON ({e}): {stdout}\n{stderr}"));
    assert!(
        v.get("error").is_none(),
        "the browser run failed: {v}\n{stderr}"
    );
    eprintln!("browser screenshot: {}", screenshot.display());
    v
}

/// A 1 MiB and a 12 MiB file of distinct bytes.
fn test_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    [
        ("one-mib.bin", MIB, 3u8),
        ("twelve-mib.bin", 12 * MIB, 11u8),
    ]
    .into_iter()
    .map(|(name, len, seed)| {
        let bytes: Vec<u8> = (0..len)
            .map(|i| {
                ((i / 7) as u8)
                    .wrapping_mul(seed)
                    .wrapping_add((i % 251) as u8)
            })
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, &bytes).expect("write test file");
        (path, bytes)
    })
    .collect()
}

async fn session(gw: &TestGateway, id: &str) -> Value {
    gw.client
        .get(format!("{}/v1/sessions/{id}", gw.base))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("get session")
        .json()
        .await
        .expect("json")
}

/// Every file of `files` is a completed file of the session, byte-identical in storage.
async fn check_uploaded(
    gw: &TestGateway,
    run: &Value,
    files: &[(PathBuf, Vec<u8>)],
    object: impl Fn(&Value) -> Vec<u8>,
) {
    let result = &run["result"];
    assert_eq!(result["failed"].as_array().map(Vec::len), Some(0), "{run}");
    assert_eq!(
        result["successful"].as_array().map(Vec::len),
        Some(files.len()),
        "{run}"
    );
    let sid = run["sessionId"].as_str().expect("sessionId");
    let s = session(gw, sid).await;
    let listed = s["files"].as_array().expect("files");
    assert_eq!(listed.len(), files.len(), "{s}");
    for (path, bytes) in files {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        let f = listed
            .iter()
            .find(|f| f["fileName"] == name)
            .unwrap_or_else(|| panic!("{name} not in the session: {s}"));
        assert_eq!(f["status"], "completed", "{f}");
        assert_eq!(f["sizeBytes"], bytes.len(), "{f}");
        assert!(
            object(f) == *bytes,
            "{name}: the object differs from the file"
        );
    }
}

async fn s3_gateway(
    s3: &upgate_testkit::s3::S3Server,
    redis: &upgate_testkit::RedisServer,
) -> TestGateway {
    s3_redis_gateway_with(s3, redis, browser_config()).await
}

#[tokio::test]
async fn uppy_uploads_with_aws_s3_and_tus_on_s3_storage() {
    let s3 = upgate_testkit::s3::S3Server::start("browser-bucket");
    let redis = upgate_testkit::RedisServer::start();
    let gw = s3_gateway(&s3, &redis).await;
    let example = start_example(&gw.base);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = test_files(dir.path());
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();

    let run = drive(&example.url, "s3", "upload", "aws-s3.png", &paths).await;
    check_uploaded(&gw, &run, &files, |f| s3_object(&s3, f)).await;
    // The 12 MiB file went multipart through the Companion routes (its location is the
    // gateway's `fileUrl`), the 1 MiB one as a form POST (its location is S3's URL).
    let url_of = |name: &str| {
        run["result"]["successful"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == name))
            .and_then(|f| f["uploadURL"].as_str())
            .unwrap_or("")
            .to_owned()
    };
    assert!(url_of("twelve-mib.bin").starts_with("s3://"), "{run}");
    assert!(url_of("one-mib.bin").starts_with("http://"), "{run}");
    assert_eq!(s3.open_upload_count(), 0, "no multipart upload left open");

    let run = drive(&example.url, "tus", "upload", "tus-s3.png", &paths).await;
    check_uploaded(&gw, &run, &files, |f| s3_object(&s3, f)).await;
}

#[tokio::test]
async fn uppy_uploads_with_tus_on_filesystem_storage() {
    let gw = TestGateway::start(
        browser_config(),
        Arc::new(upgate::store::memory::MemoryStore::new(
            Duration::from_secs(3600),
        )),
    )
    .await;
    let example = start_example(&gw.base);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = test_files(dir.path());
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let run = drive(&example.url, "tus", "upload", "tus-fs.png", &paths).await;
    check_uploaded(&gw, &run, &files, fs_object).await;
}

#[tokio::test]
async fn a_file_removed_in_the_dashboard_aborts_its_multipart_upload() {
    let s3 = upgate_testkit::s3::S3Server::start("browser-bucket");
    let redis = upgate_testkit::RedisServer::start();
    let gw = s3_gateway(&s3, &redis).await;
    let example = start_example(&gw.base);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = test_files(dir.path());
    let big = vec![files[1].0.clone()];
    let run = drive(&example.url, "s3", "remove", "removed.png", &big).await;
    assert_eq!(run["remaining"], 0, "{run}");
    assert_eq!(run["abortStatus"], 200, "{run}");
    // The driver waited for the gateway's answer to Uppy's abort, which comes once
    // storage aborted the upload.
    assert_eq!(
        s3.open_upload_count(),
        0,
        "the removed file's upload is still open"
    );
    let sid = run["sessionId"].as_str().expect("sessionId");
    let s = session(&gw, sid).await;
    assert_eq!(s["files"].as_array().map(Vec::len), Some(0), "{s}");
}

#[tokio::test]
async fn golden_retriever_finishes_an_aws_s3_upload_after_a_reload() {
    let s3 = upgate_testkit::s3::S3Server::start("browser-bucket");
    let redis = upgate_testkit::RedisServer::start();
    let gw = s3_gateway(&s3, &redis).await;
    let example = start_example(&gw.base);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = test_files(dir.path());
    let big = vec![files[1].clone()];
    let paths = vec![big[0].0.clone()];
    let run = drive(&example.url, "s3", "reload", "resumed.png", &paths).await;
    // The restored file carries the multipart upload it had before the reload.
    let before = &run["beforeReload"][0];
    let after = &run["restored"][0]["s3Multipart"];
    assert!(before["uploadId"].is_string(), "{run}");
    assert_eq!(after["uploadId"], before["uploadId"], "{run}");
    check_uploaded(&gw, &run, &big, |f| s3_object(&s3, f)).await;
    assert_eq!(s3.open_upload_count(), 0);
}
