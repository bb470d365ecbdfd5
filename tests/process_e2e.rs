//! Whole-process scenarios against real Redis and a real S3 server over HTTP: resuming an
//! upload across a gateway crash, and the memory a large proxied upload costs.

mod common;

use std::time::Duration;

use common::binary::Binary;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use upgate_testkit::s3::S3Server;
use upgate_testkit::RedisServer;

const MIB: usize = 1024 * 1024;

fn start(redis: &RedisServer, s3: &S3Server) -> Binary {
    let extra = format!(
        "redis_url = \"{}\"\nstorage = \"s3://{}/pfx\"\n[s3]\nendpoint = \"{}\"\nregion = \"{}\"\nforce_path_style = true\n",
        redis.url(),
        s3.bucket(),
        s3.endpoint(),
        s3.region()
    );
    // [s3] must come before [[tenants]]: config_toml appends the tenants after `extra`.
    Binary::start(
        &extra,
        &[
            ("AWS_ACCESS_KEY_ID", s3.access_key()),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_key()),
        ],
    )
}

fn part(data: &[u8], n: usize) -> Vec<u8> {
    let start = (n - 1) * 5 * MIB;
    data[start..(start + 5 * MIB).min(data.len())].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_gateway_is_killed() {
    let redis = RedisServer::start();
    let s3 = S3Server::start("uploads");
    let client = reqwest::Client::new();
    let size = 6 * 5 * MIB;
    let data: Vec<u8> = (0..size)
        .map(|i| (i % 241) as u8 ^ (i >> 20) as u8)
        .collect();

    let mut first = start(&redis, &s3);
    let (session, f) = first
        .session_with_file(&client, json!({"fileName": "movie.mp4", "sizeBytes": size}))
        .await;
    let file = f["fileId"].as_str().expect("id").to_owned();
    assert_eq!(f["partCount"], 6);
    let parts_path = format!("/v1/sessions/{session}/files/{file}/parts");
    for n in 1..=3 {
        let res = client
            .put(first.url(&format!("{parts_path}/{n}")))
            .bearer_auth(KEY_A)
            .body(part(&data, n))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200);
    }
    // Crash: SIGKILL, no shutdown.
    first.signal("-KILL");
    first.wait(Duration::from_secs(10));

    let second = start(&redis, &s3);
    let listed: Value = client
        .get(second.url(&parts_path))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let numbers: Vec<u64> = listed["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter_map(|p| p["partNumber"].as_u64())
        .collect();
    assert_eq!(
        numbers,
        [1, 2, 3],
        "the new gateway knows the uploaded parts"
    );
    for n in 4..=6 {
        let res = client
            .put(second.url(&format!("{parts_path}/{n}")))
            .bearer_auth(KEY_A)
            .body(part(&data, n))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200);
    }
    let done = complete(&second, &client, &session, &file).await;
    assert_eq!(done["status"], "completed", "{done}");
    let stored = s3
        .read_object(&format!("pfx/a/{session}/{file}/movie.mp4"))
        .expect("object in S3");
    assert_eq!(
        hex::encode(Sha256::digest(&stored)),
        hex::encode(Sha256::digest(&data)),
        "byte-identical"
    );
}

/// Peak RSS of the gateway while it proxies a 1 GiB file (205 parts of 5 MiB, 4 in flight)
/// into S3. The figure is printed; the bound is the (< 64 MiB over the idle peak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_keeps_gateway_memory_bounded() {
    let redis = RedisServer::start();
    let s3 = S3Server::start("uploads");
    let bin = start(&redis, &s3);
    let client = reqwest::Client::new();
    let s: Value = client
        .post(bin.url("/v1/sessions"))
        .bearer_auth(KEY_A)
        .json(&json!({}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let session = s["sessionId"].as_str().expect("id").to_owned();
    // Warm up (pools, TLS-free HTTP client, script cache) with a small file first.
    let w: Value = client
        .post(bin.url(&format!("/v1/sessions/{session}/files")))
        .bearer_auth(KEY_A)
        .json(&json!({"fileName": "warm", "sizeBytes": 5 * MIB}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let warm = w["fileId"].as_str().expect("id").to_owned();
    let res = client
        .put(bin.url(&format!("/v1/sessions/{session}/files/{warm}/parts/1")))
        .bearer_auth(KEY_A)
        .body(vec![1u8; 5 * MIB])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    let idle_peak = bin.proc_kib("VmHWM");

    let size = 1024 * MIB;
    let f: Value = client
        .post(bin.url(&format!("/v1/sessions/{session}/files")))
        .bearer_auth(KEY_A)
        .json(&json!({"fileName": "one-gib.bin", "sizeBytes": size}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let file = f["fileId"].as_str().expect("id").to_owned();
    let count = f["partCount"].as_u64().expect("count") as usize;
    let chunk = bytes::Bytes::from(vec![0xA5u8; 5 * MIB]);
    let mut next = 1usize;
    let mut inflight = tokio::task::JoinSet::new();
    while next <= count || !inflight.is_empty() {
        while next <= count && inflight.len() < 4 {
            let len = if next == count {
                size - (count - 1) * 5 * MIB
            } else {
                5 * MIB
            };
            let body = chunk.slice(0..len);
            let req = client
                .put(bin.url(&format!("/v1/sessions/{session}/files/{file}/parts/{next}")))
                .bearer_auth(KEY_A)
                .body(body);
            inflight.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
            next += 1;
        }
        if let Some(done) = inflight.join_next().await {
            assert_eq!(done.expect("task").expect("send"), 200);
        }
    }
    let done = client
        .post(bin.url(&format!("/v1/sessions/{session}/files/{file}/complete")))
        .bearer_auth(KEY_A)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(done.status(), 200);
    let peak = bin.proc_kib("VmHWM");
    let grew_mib = (peak.saturating_sub(idle_peak)) as f64 / 1024.0;
    println!(
        "gateway peak RSS: idle {:.1} MiB, after 1 GiB {:.1} MiB, growth {grew_mib:.1} MiB",
        idle_peak as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    assert!(grew_mib < 64.0, "peak RSS grew by {grew_mib:.1} MiB");
    assert_eq!(
        s3.object_path(&format!("pfx/a/{session}/{file}/one-gib.bin"))
            .metadata()
            .map(|m| m.len())
            .ok(),
        Some(size as u64)
    );
}

/// The gateway on Redis and filesystem storage in `data`.
fn start_fs(redis: &RedisServer, data: &std::path::Path) -> Binary {
    Binary::start(
        &format!(
            "redis_url = \"{}\"\nstorage = \"file://{}\"\n",
            redis.url(),
            data.display()
        ),
        &[],
    )
}

/// `write_bytes` of `/proc/<pid>/io`: bytes the process caused to be written to disk.
fn write_bytes(bin: &Binary) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/io", bin.child.id()))
        .expect("proc io")
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: ")?.trim().parse().ok())
        .expect("write_bytes")
}

/// Registers `data` as `name` and PUTs every part; returns (session, file id, object path).
async fn upload_all_parts(
    bin: &Binary,
    client: &reqwest::Client,
    root: &std::path::Path,
    name: &str,
    data: &[u8],
) -> (String, String, std::path::PathBuf) {
    let (session, f) = bin
        .session_with_file(client, json!({"fileName": name, "sizeBytes": data.len()}))
        .await;
    let file = f["fileId"].as_str().expect("fileId").to_owned();
    let part_size = f["partSizeBytes"].as_u64().expect("partSizeBytes") as usize;
    for (i, chunk) in data.chunks(part_size).enumerate() {
        let res = client
            .put(bin.url(&format!(
                "/v1/sessions/{session}/files/{file}/parts/{}",
                i + 1
            )))
            .bearer_auth(KEY_A)
            .body(chunk.to_vec())
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200);
    }
    let object = root.join(format!("a/{session}/{file}/{name}"));
    (session, file, object)
}

async fn complete(bin: &Binary, client: &reqwest::Client, session: &str, file: &str) -> Value {
    bin.post_json(
        client,
        &format!("/v1/sessions/{session}/files/{file}/complete"),
        json!({}),
    )
    .await
}

/// Filesystem storage writes each byte once: the part PUTs write the file's bytes, and
/// `complete` writes next to nothing (it publishes the file the parts were written into).
/// Measured on the process, by `/proc/<pid>/io`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_complete_writes_no_part_again() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let bin = start_fs(&redis, root.path());
    let client = reqwest::Client::new();
    let size = 48 * MIB;
    let data: Vec<u8> = (0..size)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();

    let before_parts = write_bytes(&bin);
    let (session, file, object) =
        upload_all_parts(&bin, &client, root.path(), "big.bin", &data).await;
    let before_complete = write_bytes(&bin);
    let done = complete(&bin, &client, &session, &file).await;
    let after_complete = write_bytes(&bin);
    assert_eq!(done["status"], "completed", "{done}");
    let parts_wrote = before_complete - before_parts;
    let complete_wrote = after_complete - before_complete;
    println!(
        "{size} bytes: the part PUTs wrote {parts_wrote} bytes, complete wrote {complete_wrote}"
    );
    assert!(
        parts_wrote >= size as u64,
        "the measure sees the parts' writes ({parts_wrote} bytes)"
    );
    assert!(
        complete_wrote < 256 * 1024,
        "complete wrote {complete_wrote} bytes of a {size}-byte file"
    );
    let stored = std::fs::read(&object).expect("object");
    assert_eq!(
        hex::encode(Sha256::digest(&stored)),
        hex::encode(Sha256::digest(&data))
    );
}

/// The gateway SIGKILLed while `complete` runs: eight files complete at staggered starts
/// (every 25 ms) and the kill comes when the first object is published, so files are caught
/// before, during and after their completion. Before the restart each object is absent or whole, never partial; after
/// it (once the killed holders' completion leases run out) completing again gives each
/// whole object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_complete_survives_a_kill() {
    let redis = RedisServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let size = 16 * MIB + 12_345;
    let mut bin = start_fs(&redis, root.path());
    let mut files = Vec::new();
    for round in 0..8u8 {
        let data: Vec<u8> = (0..size)
            .map(|i| (i % 239) as u8 ^ (i >> 12) as u8 ^ round)
            .collect();
        let digest = hex::encode(Sha256::digest(&data));
        let (session, file, object) =
            upload_all_parts(&bin, &client, root.path(), &format!("r{round}.bin"), &data).await;
        files.push((session, file, object, digest));
    }
    let mut requests = Vec::new();
    for (i, (session, file, _, _)) in files.iter().enumerate() {
        let url = bin.url(&format!("/v1/sessions/{session}/files/{file}/complete"));
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(25 * i as u64)).await;
            client
                .post(url)
                .bearer_auth(KEY_A)
                .json(&json!({}))
                .send()
                .await
        }));
    }
    // The kill comes as soon as the first object is published: the later files are then
    // still uploading, waiting for the lock, being fsynced or not yet asked.
    let first = files[0].2.clone();
    let watch_deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !first.exists() && std::time::Instant::now() < watch_deadline {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    bin.signal("-KILL");
    bin.wait(Duration::from_secs(10));
    let mut published = 0;
    for (i, (_, _, object, digest)) in files.iter().enumerate() {
        if object.exists() {
            published += 1;
            let stored = std::fs::read(object).expect("object");
            assert_eq!(
                &hex::encode(Sha256::digest(&stored)),
                digest,
                "file {i}: an object published before the kill is whole"
            );
        }
    }
    for r in requests {
        let _ = r.await;
    }
    println!(
        "{published} of {} objects were published at the kill",
        files.len()
    );

    bin = start_fs(&redis, root.path());
    // A completion the kill interrupted holds its lease (60 s) until it runs out: 409
    // `requestInProgress` until then.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for (i, (session, file, object, digest)) in files.iter().enumerate() {
        loop {
            let done = complete(&bin, &client, session, file).await;
            if done["status"] == "completed" {
                break;
            }
            assert_eq!(done["code"], "requestInProgress", "file {i}: {done}");
            assert!(std::time::Instant::now() < deadline, "file {i}: {done}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let stored = std::fs::read(object).expect("object after restart");
        assert_eq!(
            &hex::encode(Sha256::digest(&stored)),
            digest,
            "file {i}: whole after completing again"
        );
    }
}
