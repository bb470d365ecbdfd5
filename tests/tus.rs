//! tus 1.0 and IETF resumable uploads (issue 16) over real backends: filesystem storage
//! on the memory store, and redis-server with the in-process S3 server (aws-sdk-s3 over
//! HTTP). The protocol is driven here with plain HTTP; `tests/tus_clients.rs` runs the real
//! clients (tus-js-client, tuspy).

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use reqwest::Method;
use serde_json::Value;
use sha2::Digest as _;
use upgate_testkit::s3::S3Server;
use upgate_testkit::RedisServer;

const MIB: usize = 1024 * 1024;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A gateway on redis-server and the S3 server.
struct S3Rig {
    s3: S3Server,
    redis: RedisServer,
    gw: TestGateway,
}

async fn s3_rig() -> S3Rig {
    let s3 = S3Server::start("tus");
    let redis = RedisServer::start();
    let gw = s3_redis_gateway(&s3, &redis).await;
    S3Rig { s3, redis, gw }
}

/// POST /v1/tus; the upload URL (absolute).
async fn create(gw: &TestGateway, length: Option<usize>, meta: &str) -> reqwest::Response {
    let mut req = gw
        .req(Method::POST, "/v1/tus", KEY_A)
        .header("tus-resumable", "1.0.0");
    req = match length {
        Some(l) => req.header("upload-length", l.to_string()),
        None => req.header("upload-defer-length", "1"),
    };
    if !meta.is_empty() {
        req = req.header("upload-metadata", meta);
    }
    req.send().await.expect("create")
}

async fn create_url(gw: &TestGateway, length: Option<usize>, meta: &str) -> String {
    let res = create(gw, length, meta).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let loc = res.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    gw.url(&loc)
}

async fn patch(gw: &TestGateway, url: &str, offset: usize, body: Vec<u8>) -> reqwest::Response {
    gw.client
        .patch(url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", offset.to_string())
        .body(body)
        .send()
        .await
        .expect("patch")
}

async fn head(gw: &TestGateway, url: &str) -> reqwest::Response {
    gw.client
        .head(url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("head")
}

async fn delete(gw: &TestGateway, url: &str) -> reqwest::Response {
    gw.client
        .delete(url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("delete")
}

fn offset_of(res: &reqwest::Response) -> usize {
    res.headers()["upload-offset"]
        .to_str()
        .expect("offset")
        .parse()
        .expect("number")
}

/// Uploads `bytes` in `chunk`-sized PATCHes; the file resource at the end.
async fn upload(gw: &TestGateway, bytes: &[u8], chunk: usize) -> (String, Value) {
    let url = create_url(gw, Some(bytes.len()), &format!("filename {}", b64("a.bin"))).await;
    let mut off = 0;
    while off < bytes.len() {
        let end = (off + chunk).min(bytes.len());
        let res = patch(gw, &url, off, bytes[off..end].to_vec()).await;
        assert_eq!(res.status(), 204, "{:?}", res.text().await);
        assert_eq!(offset_of(&res), end);
        off = end;
    }
    let file = file_of(gw, &url).await;
    (url, file)
}

/// The REST view of the upload's file.
async fn file_of(gw: &TestGateway, url: &str) -> Value {
    let res = head(gw, url).await;
    assert_eq!(res.status(), 200);
    let s = res.headers()["upgate-session-id"]
        .to_str()
        .expect("sid")
        .to_owned();
    let f = res.headers()["upgate-file-id"]
        .to_str()
        .expect("fid")
        .to_owned();
    gw.get_json(KEY_A, &format!("/v1/sessions/{s}/files/{f}"))
        .await
}

#[tokio::test]
async fn chunks_of_every_size_make_byte_identical_objects_on_filesystem_storage() {
    let gw = memory_fs_gateway().await;
    for (size, chunk) in [
        (0, 256 * 1024),
        (1, 256 * 1024),
        (5 * MIB, 256 * 1024),
        (5 * MIB, 7 * MIB),
        (23 * MIB, MIB),
        (23 * MIB, 7 * MIB),
    ] {
        let bytes = data(size, (size % 251) as u8);
        let (_, file) = upload(&gw, &bytes, chunk).await;
        assert_eq!(file["status"], "completed", "{size} by {chunk}");
        assert_eq!(file["sizeBytes"], size);
        assert_eq!(
            sha256_hex(&fs_object(&file)),
            sha256_hex(&bytes),
            "{size} by {chunk}"
        );
    }
}

#[tokio::test]
async fn chunks_below_the_s3_part_minimum_make_byte_identical_objects_on_s3() {
    let rig = s3_rig().await;
    for (size, chunk) in [
        (0, 256 * 1024),
        (1, MIB),
        (5 * MIB, MIB),
        (23 * MIB, 256 * 1024),
        (23 * MIB, 7 * MIB),
    ] {
        let bytes = data(size, 7);
        let (_, file) = upload(&rig.gw, &bytes, chunk).await;
        assert_eq!(file["status"], "completed", "{size} by {chunk}");
        assert_eq!(
            sha256_hex(&s3_object(&rig.s3, &file)),
            sha256_hex(&bytes),
            "{size} by {chunk}"
        );
    }
    // Every storage upload was completed: nothing left open.
    assert_eq!(rig.s3.open_upload_count(), 0);
}

#[tokio::test]
async fn options_and_head_answer_the_protocol_headers() {
    let gw = memory_fs_gateway().await;
    let res = gw
        .client
        .request(Method::OPTIONS, gw.url("/v1/tus"))
        .send()
        .await
        .expect("options");
    assert_eq!(res.status(), 204);
    let h = res.headers();
    assert_eq!(h["tus-version"], "1.0.0");
    assert_eq!(
        h["tus-extension"],
        "creation,creation-with-upload,creation-defer-length,expiration,checksum,termination,concatenation"
    );
    assert_eq!(h["tus-checksum-algorithm"], "sha1,sha256,md5");
    assert!(h.contains_key("tus-max-size"));

    let url = create_url(&gw, Some(10), "").await;
    let res = head(&gw, &url).await;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["upload-offset"], "0");
    assert_eq!(h["upload-length"], "10");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["tus-resumable"], "1.0.0");
    assert!(h.contains_key("upload-expires"));
    assert!(h.contains_key("upgate-session-id") && h.contains_key("upgate-file-id"));
}

#[tokio::test]
async fn each_error_case_answers_its_tus_status() {
    let gw = memory_fs_gateway().await;
    let url = create_url(&gw, Some(10), "").await;
    // Wrong version, no version.
    let res = gw
        .client
        .head(&url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "0.2.2")
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), 412);
    assert_eq!(res.headers()["tus-version"], "1.0.0");
    let res = gw
        .client
        .head(&url)
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), 412);
    // Offset mismatch.
    assert_eq!(patch(&gw, &url, 3, b"abc".to_vec()).await.status(), 409);
    // Wrong content type.
    let res = gw
        .client
        .patch(&url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/octet-stream")
        .header("upload-offset", "0")
        .body("abc")
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 415);
    // Checksum mismatch keeps nothing; a matching one keeps the chunk.
    let sum = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(b));
    let send = |algo: &'static str, digest: String, body: &'static [u8], offset: usize| {
        gw.client
            .patch(&url)
            .bearer_auth(KEY_A)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .header("upload-checksum", format!("{algo} {digest}"))
            .body(body)
            .send()
    };
    let res = send("sha1", sum(b"xyz"), b"abc", 0).await.expect("patch");
    assert_eq!(res.status().as_u16(), 460);
    assert_eq!(offset_of(&head(&gw, &url).await), 0);
    let res = send("sha1", sum(b"abcde"), b"abcde", 0)
        .await
        .expect("patch");
    assert_eq!(res.status(), 204);
    assert_eq!(offset_of(&res), 5);
    // Past the upload's length.
    assert_eq!(patch(&gw, &url, 5, vec![1; 6]).await.status(), 413);
    assert_eq!(offset_of(&head(&gw, &url).await), 5);
    // Over Tus-Max-Size at creation.
    let res = create(&gw, Some(2 * 1_099_511_627_776), "").await;
    assert_eq!(res.status(), 413);
    // Termination, then PATCH and HEAD: 404.
    let res = delete(&gw, &url).await;
    assert_eq!(res.status(), 204);
    assert_eq!(patch(&gw, &url, 5, b"fghij".to_vec()).await.status(), 404);
    assert_eq!(head(&gw, &url).await.status(), 404);
    // Another tenant's upload is not found.
    let other = create_url(&gw, Some(3), "").await;
    let res = gw
        .client
        .head(&other)
        .bearer_auth(KEY_B)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn an_expired_session_answers_410() {
    let gw = memory_fs_gateway().await;
    let sid = gw
        .session_id(KEY_A, serde_json::json!({"ttlSeconds": 1}))
        .await;
    let url = create_url(&gw, Some(4), &format!("sessionId {}", b64(&sid))).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(patch(&gw, &url, 0, b"abcd".to_vec()).await.status(), 410);
    assert_eq!(head(&gw, &url).await.status(), 410);
}

#[tokio::test]
async fn deferred_length_and_creation_with_upload() {
    let gw = memory_fs_gateway().await;
    let bytes = data(6 * MIB + 3, 3);
    // Deferred: the length comes with a later PATCH.
    let url = create_url(&gw, None, "").await;
    let h = head(&gw, &url).await;
    assert_eq!(h.headers()["upload-defer-length"], "1");
    assert_eq!(
        patch(&gw, &url, 0, bytes[..MIB].to_vec()).await.status(),
        204
    );
    let res = gw
        .client
        .patch(&url)
        .bearer_auth(KEY_A)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", MIB.to_string())
        .header("upload-length", bytes.len().to_string())
        .body(bytes[MIB..].to_vec())
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 204);
    let file = file_of(&gw, &url).await;
    assert_eq!(file["status"], "completed");
    assert_eq!(file["sizeBytes"], bytes.len());
    assert_eq!(sha256_hex(&fs_object(&file)), sha256_hex(&bytes));

    // Creation with upload: the first bytes in the POST.
    let res = gw
        .req(Method::POST, "/v1/tus", KEY_A)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "11")
        .header("content-type", "application/offset+octet-stream")
        .body("hello")
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 201);
    assert_eq!(offset_of(&res), 5);
    let url = gw.url(res.headers()["location"].to_str().expect("loc"));
    assert_eq!(patch(&gw, &url, 5, b" world".to_vec()).await.status(), 204);
    let file = file_of(&gw, &url).await;
    assert_eq!(fs_object(&file), b"hello world");
}

#[tokio::test]
async fn an_upload_in_a_named_session_is_completed_and_the_session_left_open() {
    let gw = memory_fs_gateway().await;
    let sid = gw.session_id(KEY_A, serde_json::json!({})).await;
    let meta = format!(
        "sessionId {},filename {},filetype {},color {}",
        b64(&sid),
        b64("photo.png"),
        b64("image/png"),
        b64("blue")
    );
    let url = create_url(&gw, Some(3), &meta).await;
    assert!(url.contains('.'), "{url}");
    assert_eq!(patch(&gw, &url, 0, b"abc".to_vec()).await.status(), 204);
    let s = gw.get_json(KEY_A, &format!("/v1/sessions/{sid}")).await;
    assert_eq!(s["status"], "active");
    assert_eq!(s["files"][0]["status"], "completed");
    assert_eq!(s["files"][0]["fileName"], "photo.png");
    assert_eq!(s["files"][0]["contentType"], "image/png");
    assert_eq!(
        s["files"][0]["metadata"],
        serde_json::json!({"color": "blue"})
    );
    // An upload with its own session: finalized with its last byte; a content mismatch
    // answers that PATCH 415.
    let url = create_url(&gw, Some(3), &format!("filetype {}", b64("image/png"))).await;
    let res = patch(&gw, &url, 0, b"%PD".to_vec()).await;
    assert_eq!(res.status(), 204, "unknown magic bytes are not a mismatch");
    let png = [
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d,
    ];
    let pdf = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let url = create_url(
        &gw,
        Some(pdf.len()),
        &format!("filetype {}", b64("image/png")),
    )
    .await;
    let res = patch(&gw, &url, 0, pdf).await;
    assert_eq!(res.status(), 415);
    let url = create_url(
        &gw,
        Some(png.len()),
        &format!("filetype {}", b64("image/png")),
    )
    .await;
    assert_eq!(patch(&gw, &url, 0, png.to_vec()).await.status(), 204);
    let h = head(&gw, &url).await;
    let sid = h.headers()["upgate-session-id"]
        .to_str()
        .expect("sid")
        .to_owned();
    let s = gw.get_json(KEY_A, &format!("/v1/sessions/{sid}")).await;
    assert_eq!(s["status"], "finalized");
}

#[tokio::test]
async fn concurrent_patches_on_one_upload_one_wins_the_other_conflicts() {
    let rig = s3_rig().await;
    let gw2 = s3_redis_gateway(&rig.s3, &rig.redis).await;
    let bytes = data(12 * MIB, 9);
    let url = create_url(&rig.gw, Some(bytes.len()), "").await;
    let url2 = url.replace(&rig.gw.base, &gw2.base);
    // Alternating replicas, 1 MiB at a time, for the first 4 MiB.
    for (i, off) in (0..4 * MIB).step_by(MIB).enumerate() {
        let (gw, u) = if i % 2 == 0 {
            (&rig.gw, &url)
        } else {
            (&gw2, &url2)
        };
        let res = patch(gw, u, off, bytes[off..off + MIB].to_vec()).await;
        assert_eq!(res.status(), 204);
    }
    // Two PATCHes at once from the same offset, one per replica: one is refused with a
    // conflict (423 while the other holds the upload, 409 once it moved the offset).
    for round in 0..5 {
        let off = offset_of(&head(&rig.gw, &url).await);
        if off >= bytes.len() {
            break;
        }
        let end = (off + MIB).min(bytes.len());
        let (a, b) = tokio::join!(
            patch(&rig.gw, &url, off, bytes[off..end].to_vec()),
            patch(&gw2, &url2, off, bytes[off..end].to_vec())
        );
        let mut codes = [a.status().as_u16(), b.status().as_u16()];
        codes.sort_unstable();
        assert!(
            matches!(codes, [204, 409] | [204, 423]),
            "round {round}: {codes:?}"
        );
    }
    let mut off = offset_of(&head(&rig.gw, &url).await);
    while off < bytes.len() {
        let end = (off + 3 * MIB).min(bytes.len());
        assert_eq!(
            patch(&gw2, &url2, off, bytes[off..end].to_vec())
                .await
                .status(),
            204
        );
        off = end;
    }
    let file = file_of(&rig.gw, &url).await;
    assert_eq!(sha256_hex(&s3_object(&rig.s3, &file)), sha256_hex(&bytes));
}

#[tokio::test]
async fn a_client_cut_mid_chunk_resumes_from_the_bytes_that_arrived() {
    let gw = memory_fs_gateway().await;
    let bytes = data(3 * MIB, 5);
    let url = create_url(&gw, Some(bytes.len()), "").await;
    // A raw HTTP/1.1 PATCH announcing 3 MiB that sends 1 MiB and hangs up.
    let addr = gw.base.strip_prefix("http://").expect("addr").to_owned();
    let path = url.strip_prefix(&gw.base).expect("path").to_owned();
    {
        use tokio::io::AsyncWriteExt as _;
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY_A}\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
            bytes.len()
        );
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&bytes[..MIB]).await.expect("body");
        s.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The bytes that arrived are kept, once the PATCH has seen the cut.
    let mut off = 0;
    for _ in 0..50 {
        let res = head(&gw, &url).await;
        off = offset_of(&res);
        if off == MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(off, MIB);
    let mut res = patch(&gw, &url, off, bytes[off..].to_vec()).await;
    // The cut PATCH's lock may still be being given back.
    for _ in 0..20 {
        if res.status() != 423 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        res = patch(&gw, &url, off, bytes[off..].to_vec()).await;
    }
    assert_eq!(res.status(), 204);
    let file = file_of(&gw, &url).await;
    assert_eq!(sha256_hex(&fs_object(&file)), sha256_hex(&bytes));
}

#[tokio::test]
async fn ietf_drafts_3_to_8_create_append_and_complete() {
    let gw = memory_fs_gateway().await;
    for v in 3..=8u32 {
        let bytes = data(2 * MIB + 17, v as u8);
        let (incomplete, complete) = if v <= 3 {
            ("upload-incomplete", ("?1", "?0"))
        } else {
            ("upload-complete", ("?0", "?1"))
        };
        // Creation with the first MiB, not complete yet.
        let res = gw
            .req(Method::POST, "/v1/tus", KEY_A)
            .header("upload-draft-interop-version", v.to_string())
            .header(incomplete, complete.0)
            .body(bytes[..MIB].to_vec())
            .send()
            .await
            .expect("post");
        assert_eq!(res.status(), 201, "v{v}");
        let url = gw.url(res.headers()["location"].to_str().expect("loc"));
        // Offset retrieval.
        let res = gw
            .client
            .head(&url)
            .bearer_auth(KEY_A)
            .header("upload-draft-interop-version", v.to_string())
            .send()
            .await
            .expect("head");
        assert_eq!(res.status(), 200);
        assert_eq!(offset_of(&res), MIB, "v{v}");
        assert_eq!(res.headers()[incomplete], complete.0, "v{v}");
        assert_eq!(res.headers()["cache-control"], "no-store");
        assert!(res.headers()["upload-limit"]
            .to_str()
            .expect("limit")
            .starts_with("min-size=0,max-size="));
        // Append the rest, completing.
        let ct = if v >= 6 {
            "application/partial-upload"
        } else {
            "application/offset+octet-stream"
        };
        let res = gw
            .client
            .patch(&url)
            .bearer_auth(KEY_A)
            .header("upload-draft-interop-version", v.to_string())
            .header("content-type", ct)
            .header("upload-offset", MIB.to_string())
            .header(incomplete, complete.1)
            .body(bytes[MIB..].to_vec())
            .send()
            .await
            .expect("patch");
        assert_eq!(res.status(), 204, "v{v}");
        let res = gw
            .client
            .head(&url)
            .bearer_auth(KEY_A)
            .header("upload-draft-interop-version", v.to_string())
            .send()
            .await
            .expect("head");
        assert_eq!(res.headers()[incomplete], complete.1, "v{v}");
        let s = res.headers()["upgate-session-id"]
            .to_str()
            .expect("s")
            .to_owned();
        let f = res.headers()["upgate-file-id"]
            .to_str()
            .expect("f")
            .to_owned();
        let file = gw
            .get_json(KEY_A, &format!("/v1/sessions/{s}/files/{f}"))
            .await;
        assert_eq!(file["status"], "completed", "v{v}");
        assert_eq!(sha256_hex(&fs_object(&file)), sha256_hex(&bytes), "v{v}");
    }
}

#[tokio::test]
async fn upload_tokens_reach_their_session_uploads_only() {
    let gw = memory_fs_gateway().await;
    let s = gw.create_session(KEY_A, serde_json::json!({})).await;
    let token = s["uploadToken"].as_str().expect("token").to_owned();
    let sid = s["sessionId"].as_str().expect("sid").to_owned();
    let res = gw
        .req(Method::POST, "/v1/tus", &token)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "2")
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.headers()["upgate-session-id"].to_str().expect("sid"),
        sid
    );
    let url = gw.url(res.headers()["location"].to_str().expect("loc"));
    let res = gw
        .client
        .patch(&url)
        .bearer_auth(&token)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body("hi")
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 204);
    // Another session's upload: 404 for the token.
    let other = create_url(&gw, Some(1), "").await;
    let res = gw
        .client
        .head(&other)
        .bearer_auth(&token)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), 404);
}

/// POST /v1/tus with `Upload-Concat` (and `Upload-Length` for a partial upload).
async fn create_concat(
    gw: &TestGateway,
    key: &str,
    concat: &str,
    length: Option<usize>,
) -> reqwest::Response {
    let mut req = gw
        .req(Method::POST, "/v1/tus", key)
        .header("tus-resumable", "1.0.0")
        .header("upload-concat", concat)
        .header("upload-metadata", format!("filename {}", b64("joined.bin")));
    if let Some(l) = length {
        req = req.header("upload-length", l.to_string());
    }
    req.send().await.expect("create")
}

/// The REST view of the upload's session.
async fn session_of(gw: &TestGateway, url: &str) -> Value {
    let res = head(gw, url).await;
    assert_eq!(res.status(), 200);
    let s = res.headers()["upgate-session-id"].to_str().expect("sid");
    gw.get_json(KEY_A, &format!("/v1/sessions/{s}")).await
}

/// A partial upload of `bytes`, PATCHed in 1 MiB chunks; its URL and file resource.
async fn partial(gw: &TestGateway, bytes: &[u8]) -> (String, Value) {
    let res = create_concat(gw, KEY_A, "partial", Some(bytes.len())).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let url = gw.url(res.headers()["location"].to_str().expect("location"));
    let mut off = 0;
    while off < bytes.len() {
        let end = (off + MIB).min(bytes.len());
        let res = patch(gw, &url, off, bytes[off..end].to_vec()).await;
        assert_eq!(res.status(), 204, "{:?}", res.text().await);
        off = end;
    }
    let res = head(gw, &url).await;
    assert_eq!(res.headers()["upload-concat"], "partial");
    let file = file_of(gw, &url).await;
    assert_eq!(file["status"], "completed");
    // A partial upload's own session is not finalized: it is made into a final upload.
    let session = session_of(gw, &url).await;
    assert_eq!(session["status"], "active", "{session}");
    (url, file)
}

/// tus concatenation (tus-js-client's `parallelUploads`): partial uploads of 7 MiB + 12,345
/// bytes, 1 byte, 0 bytes and 3 MiB made into one final upload (URLs absolute and as paths);
/// the object is their bytes in order, the final upload is completed and its own session
/// finalized, the partial uploads and their objects are gone, and a PATCH on the final
/// upload is refused (403).
async fn concatenation_on(gw: &TestGateway, object: impl Fn(&Value) -> Option<Vec<u8>>) {
    let pieces = [
        data(7 * MIB + 12_345, 41),
        data(1, 42),
        Vec::new(),
        data(3 * MIB, 43),
    ];
    let mut urls = Vec::new();
    let mut partial_files = Vec::new();
    for (i, bytes) in pieces.iter().enumerate() {
        let (url, file) = partial(gw, bytes).await;
        // One as a path, the others absolute, as clients send them.
        urls.push(if i == 1 {
            url.split_once("/v1/tus/")
                .map(|(_, id)| format!("/v1/tus/{id}"))
                .expect("path")
        } else {
            url.clone()
        });
        partial_files.push((url, file));
    }
    let whole: Vec<u8> = pieces.concat();
    let res = create_concat(gw, KEY_A, &format!("final;{}", urls.join(" ")), None).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let url = gw.url(res.headers()["location"].to_str().expect("location"));
    let res = head(gw, &url).await;
    assert_eq!(res.status(), 200);
    assert_eq!(offset_of(&res), whole.len());
    assert_eq!(res.headers()["upload-length"], whole.len().to_string());
    let listed = res.headers()["upload-concat"].to_str().expect("concat");
    let ids: Vec<String> = partial_files
        .iter()
        .map(|(u, _)| format!("/v1/tus/{}", u.split_once("/v1/tus/").expect("id").1))
        .collect();
    assert_eq!(listed, format!("final;{}", ids.join(" ")));
    let file = file_of(gw, &url).await;
    assert_eq!(file["status"], "completed", "{file}");
    assert_eq!(file["fileName"], "joined.bin");
    assert_eq!(file["sizeBytes"], whole.len());
    let stored = object(&file).expect("the final object");
    assert_eq!(sha256_hex(&stored), sha256_hex(&whole));
    let session = session_of(gw, &url).await;
    assert_eq!(session["status"], "finalized", "{session}");
    for (purl, pfile) in &partial_files {
        assert_eq!(head(gw, purl).await.status(), 404, "{purl} is gone");
        assert!(object(pfile).is_none(), "{purl}'s object is deleted");
    }
    let res = patch(gw, &url, whole.len(), Vec::new()).await;
    assert_eq!(res.status(), 403);
    let problem: Value = res.json().await.expect("problem");
    assert_eq!(problem["code"], "finalUpload");
    // Made of them once: the partial uploads are gone now.
    let res = create_concat(gw, KEY_A, &format!("final;{}", urls.join(" ")), None).await;
    assert_eq!(res.status(), 400);
}

#[tokio::test]
async fn concatenation_joins_partial_uploads_on_filesystem_storage() {
    let gw = memory_fs_gateway().await;
    concatenation_on(&gw, |file| {
        let url = file["fileUrl"].as_str()?;
        std::fs::read(url.strip_prefix("file://")?).ok()
    })
    .await;
}

#[tokio::test]
async fn concatenation_joins_partial_uploads_on_s3() {
    let rig = s3_rig().await;
    concatenation_on(&rig.gw, |file| {
        let url = file["fileUrl"].as_str()?;
        rig.s3
            .read_object(url.strip_prefix(&format!("s3://{}/", rig.s3.bucket()))?)
    })
    .await;
    assert_eq!(rig.s3.open_upload_count(), 0);
}

/// A final upload is made of completed partial uploads of the caller's only: a plain
/// upload, an unfinished partial upload, another tenant's, an IETF request, a length sent
/// along or a body are refused (400).
#[tokio::test]
async fn a_final_upload_refuses_what_it_cannot_be_made_of() {
    let gw = memory_fs_gateway().await;
    let (done, _) = partial(&gw, b"abc").await;
    let unfinished = create_concat(&gw, KEY_A, "partial", Some(10)).await;
    let unfinished = gw.url(unfinished.headers()["location"].to_str().expect("location"));
    let plain = create_url(&gw, Some(1), "").await;
    assert_eq!(patch(&gw, &plain, 0, b"x".to_vec()).await.status(), 204);
    // An id claims a form its file does not have: a plain upload called partial, an own
    // session's partial upload called one of a named session.
    let plain_as_partial = plain.replacen('_', "_p~", 1);
    let done_as_named = done.replacen("_p~", ".p~", 1);
    for list in [
        plain.clone(),
        unfinished.clone(),
        format!("{done} {unfinished}"),
        format!("{done} {done}"),
        plain_as_partial.clone(),
        done_as_named.clone(),
        "/v1/tus/nosuch_p~upload".to_owned(),
    ] {
        let res = create_concat(&gw, KEY_A, &format!("final;{list}"), None).await;
        assert_eq!(res.status(), 400, "{list}");
        assert_eq!(res.headers()["tus-resumable"], "1.0.0");
    }
    // Another tenant's partial upload is not found for it, and learns nothing.
    let res = create_concat(&gw, KEY_B, &format!("final;{done}"), None).await;
    assert_eq!(res.status(), 400);
    let res = gw
        .req(Method::POST, "/v1/tus", KEY_A)
        .header("tus-resumable", "1.0.0")
        .header("upload-concat", format!("final;{done}"))
        .header("upload-length", "3")
        .send()
        .await
        .expect("create");
    assert_eq!(res.status(), 400);
    let res = gw
        .req(Method::POST, "/v1/tus", KEY_A)
        .header("tus-resumable", "1.0.0")
        .header("upload-concat", format!("final;{done}"))
        .header("content-type", "application/offset+octet-stream")
        .body("abc")
        .send()
        .await
        .expect("create");
    assert_eq!(res.status(), 400);
    let res = gw
        .req(Method::POST, "/v1/tus", KEY_A)
        .header("upload-draft-interop-version", "6")
        .header("upload-concat", "partial")
        .header("upload-complete", "?0")
        .send()
        .await
        .expect("create");
    assert_eq!(res.status(), 400);
    // Nor do the other requests take an id for another form: HEAD, PATCH and DELETE by
    // those ids find nothing, and the uploads are untouched.
    for url in [&plain_as_partial, &done_as_named] {
        assert_eq!(head(&gw, url).await.status(), 404, "{url}");
        assert_eq!(
            patch(&gw, url, 1, b"y".to_vec()).await.status(),
            404,
            "{url}"
        );
        let res = delete(&gw, url).await;
        assert_eq!(res.status(), 404, "{url}");
    }
    assert_eq!(head(&gw, &plain).await.status(), 200);
    // The other way round: a file of a named session called an upload with a session of its
    // own; deleting by that id would delete the whole session.
    let named = gw.create_session(KEY_A, serde_json::json!({})).await;
    let sid = named["sessionId"].as_str().expect("sid");
    let in_named = create_url(&gw, Some(2), &format!("sessionId {}", b64(sid))).await;
    assert!(in_named.contains(&format!("{sid}.")), "{in_named}");
    let forged = in_named.replacen(&format!("{sid}."), &format!("{sid}_"), 1);
    let res = delete(&gw, &forged).await;
    assert_eq!(res.status(), 404);
    let session = gw.get_json(KEY_A, &format!("/v1/sessions/{sid}")).await;
    assert_eq!(session["status"], "active", "{session}");
    // An open upload: the forged id is refused under the PATCH lock, which it gives back.
    assert_eq!(patch(&gw, &forged, 0, b"ab".to_vec()).await.status(), 404);
    let unfinished_as_named = unfinished.replacen("_p~", ".p~", 1);
    assert_eq!(
        patch(&gw, &unfinished_as_named, 0, b"x".to_vec())
            .await
            .status(),
        404
    );
    assert_eq!(patch(&gw, &in_named, 0, b"ab".to_vec()).await.status(), 204);
    assert_eq!(
        patch(&gw, &unfinished, 0, b"x".to_vec()).await.status(),
        204
    );
    // Nothing was consumed: the completed partial upload still makes a final upload.
    let res = create_concat(&gw, KEY_A, &format!("final;{done}"), None).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
}

/// With upload tokens, partial and final uploads join the token's session; a final upload
/// cannot be made of another session's partial uploads, and the partial files leave the
/// session once made into one.
#[tokio::test]
async fn upload_tokens_concatenate_their_own_session_partial_uploads_only() {
    let gw = memory_fs_gateway().await;
    let a = gw.create_session(KEY_A, serde_json::json!({})).await;
    let b = gw.create_session(KEY_A, serde_json::json!({})).await;
    let (ta, tb) = (
        a["uploadToken"].as_str().expect("token"),
        b["uploadToken"].as_str().expect("token"),
    );
    // Two partial uploads of one file (the same name) in one session.
    let mut urls = Vec::new();
    for body in ["abcd", "ef"] {
        let res = create_concat(&gw, ta, "partial", Some(body.len())).await;
        assert_eq!(res.status(), 201, "{:?}", res.text().await);
        let url = gw.url(res.headers()["location"].to_str().expect("location"));
        assert!(url.contains(".p~"), "{url}");
        let res = gw
            .client
            .patch(&url)
            .bearer_auth(ta)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", "0")
            .body(body)
            .send()
            .await
            .expect("patch");
        assert_eq!(res.status(), 204);
        urls.push(url);
    }
    let list = format!("final;{}", urls.join(" "));
    let res = create_concat(&gw, tb, &list, None).await;
    assert_eq!(res.status(), 400, "another session's token");
    let res = create_concat(&gw, ta, &list, None).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let sid = a["sessionId"].as_str().expect("sid");
    let session = gw.get_json(KEY_A, &format!("/v1/sessions/{sid}")).await;
    let files: Vec<&Value> = session["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|f| f["status"] != "aborted")
        .collect();
    assert_eq!(files.len(), 1, "only the final file: {session}");
    assert_eq!(files[0]["sizeBytes"], 6);
    assert_eq!(files[0]["status"], "completed");
    assert_eq!(files[0]["fileKey"], "joined.bin");
}
