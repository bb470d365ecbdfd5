//! Deployments (`../shared/API.md` v1.1): tenants on their own buckets, and the attributes
//! completed objects carry, against the in-process S3 server through the real aws-sdk-s3
//! client. The gateway is built from its configuration (`Gateway::from_config`), the way the
//! binary builds it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use upgate_testkit::s3::S3Server;

const MIB: usize = 1024 * 1024;

/// The gateway's S3 client reads its credentials from the standard chain: the test server's
/// fixed keys, set once for this test binary before any client is built.
fn aws_credentials(s3: &S3Server) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", s3.access_key());
        std::env::set_var("AWS_SECRET_ACCESS_KEY", s3.secret_key());
    });
}

/// The test tenants (`a`, `b`) on `s3`'s bucket under `pa`, with `a_extra` and `b_extra`
/// added to each tenant's table.
fn s3_config(s3: &S3Server, top: &str, a_extra: &str, b_extra: &str) -> upgate::config::Config {
    aws_credentials(s3);
    let extra = format!(
        "storage = \"s3://{}/pa\"\n{top}\n[s3]\nendpoint = \"{}\"\nregion = \"{}\"\nforce_path_style = true\n",
        s3.bucket(),
        s3.endpoint(),
        s3.region()
    );
    let toml = config_toml(&extra)
        .replace("id = \"a\"", &format!("id = \"a\"\n{a_extra}"))
        .replace("id = \"b\"", &format!("id = \"b\"\n{b_extra}"));
    upgate::config::Config::from_toml(&toml, |_| None, false).unwrap_or_else(|e| panic!("{e}"))
}

async fn start(config: upgate::config::Config) -> TestGateway {
    let gw = upgate::Gateway::from_config(config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    TestGateway::from_gateway(gw, tempfile::tempdir().expect("tempdir")).await
}

async fn create_bucket(s3: &S3Server, bucket: &str) {
    s3.client()
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("create bucket");
}

/// `(bucket, key)` of an `s3://bucket/key` fileUrl.
fn location(file_url: &str) -> (String, String) {
    let rest = file_url.strip_prefix("s3://").expect("s3:// fileUrl");
    let (bucket, key) = rest.split_once('/').expect("bucket/key");
    (bucket.to_owned(), key.to_owned())
}

async fn object(s3: &S3Server, bucket: &str, key: &str) -> Option<Vec<u8>> {
    match s3
        .client()
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
    {
        Ok(out) => Some(out.body.collect().await.expect("body").to_vec()),
        Err(_) => None,
    }
}

async fn open_uploads(s3: &S3Server, bucket: &str) -> usize {
    s3.client()
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("list uploads")
        .uploads
        .map_or(0, |u| u.len())
}

/// Registers `body`, PUTs `data` through the gateway in 5 MiB parts, completes; returns the
/// complete response's JSON.
async fn upload(gw: &TestGateway, key: &str, session: &str, body: Value, data: &[u8]) -> Value {
    let f = gw.register_json(key, session, body).await;
    let file = f["fileId"]
        .as_str()
        .unwrap_or_else(|| panic!("{f}"))
        .to_owned();
    for (i, chunk) in data.chunks(5 * MIB).enumerate() {
        let n = u32::try_from(i + 1).expect("part number");
        let res = gw.put_part(key, session, &file, n, chunk.to_vec()).await;
        assert_eq!(res.status(), 200, "part {n}");
    }
    let res = gw.complete(key, session, &file).await;
    assert_eq!(res.status(), 200, "complete");
    res.json().await.expect("json")
}

/// Two tenants on two buckets: each tenant's objects, presigned URLs, deletes and reaped
/// uploads stay in its own bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_uses_its_own_bucket() {
    let s3 = S3Server::start("bucket-a");
    create_bucket(&s3, "bucket-b").await;
    let mut cfg = s3_config(&s3, "", "", "storage = \"s3://bucket-b/pb\"");
    cfg.reaper_interval = Duration::from_secs(1);
    let gw = start(cfg).await;
    assert_eq!(gw.readyz().await, 200);

    for (key, bucket, prefix) in [(KEY_A, "bucket-a", "pa/a/"), (KEY_B, "bucket-b", "pb/b/")] {
        let other = if bucket == "bucket-a" {
            "bucket-b"
        } else {
            "bucket-a"
        };
        let session = gw.session_id(key, json!({})).await;

        // A completed file lands in the tenant's bucket only.
        let data: Vec<u8> = (0..6 * MIB).map(|i| (i % 251) as u8).collect();
        let done = upload(
            &gw,
            key,
            &session,
            json!({"fileName": "a.bin", "sizeBytes": data.len()}),
            &data,
        )
        .await;
        let file_url = done["fileUrl"].as_str().expect("fileUrl");
        let (at, object_key) = location(file_url);
        assert_eq!(at, bucket, "{file_url}");
        assert!(object_key.starts_with(prefix), "{object_key}");
        assert_eq!(
            object(&s3, bucket, &object_key).await.as_deref(),
            Some(&data[..])
        );
        assert_eq!(object(&s3, other, &object_key).await, None);

        // DELETE of one completed file removes its object from the tenant's bucket.
        let doomed = upload(
            &gw,
            key,
            &session,
            json!({"fileName": "doomed.txt", "sizeBytes": 4}),
            b"gone",
        )
        .await;
        let (_, doomed_key) = location(doomed["fileUrl"].as_str().expect("fileUrl"));
        assert!(object(&s3, bucket, &doomed_key).await.is_some());
        let res = gw
            .req(
                Method::DELETE,
                &format!(
                    "/v1/sessions/{session}/files/{}",
                    doomed["fileId"].as_str().expect("id")
                ),
                key,
            )
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 204);
        assert_eq!(object(&s3, bucket, &doomed_key).await, None);

        // Finalize reads the first bytes of typed files from the tenant's bucket: a PDF
        // declared as PNG is refused there.
        let finalize_session = gw.session_id(key, json!({})).await;
        upload(
            &gw,
            key,
            &finalize_session,
            json!({"fileName": "x.png", "sizeBytes": 8, "contentType": "image/png"}),
            b"%PDF-1.7",
        )
        .await;
        problem(
            gw.finalize(key, &finalize_session).await,
            415,
            "contentTypeMismatch",
        )
        .await;

        // Presigned URLs point at the tenant's bucket, and a part PUT there is taken.
        let presigned_file = gw.register_id(key, &session, "presigned.bin", 10).await;
        let res = gw
            .req(
                Method::POST,
                &format!("/v1/sessions/{session}/files/{presigned_file}/presigned-parts"),
                key,
            )
            .json(&json!({"partNumbers": [1]}))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200);
        let presigned: Value = res.json().await.expect("json");
        let url = presigned["parts"][0]["url"].as_str().expect("url");
        assert!(
            url.starts_with(&format!("{}/{bucket}/{prefix}", s3.endpoint())),
            "{url}"
        );
        let put = reqwest::Client::new()
            .put(url)
            .body(vec![7u8; 10])
            .send()
            .await
            .expect("presigned put");
        assert_eq!(put.status(), 200);
        assert_eq!(open_uploads(&s3, bucket).await, 1);
        assert_eq!(open_uploads(&s3, other).await, 0);

        // DELETE of the session removes the object and aborts the upload, in that bucket.
        let res = gw
            .req(Method::DELETE, &format!("/v1/sessions/{session}"), key)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 204);
        assert_eq!(object(&s3, bucket, &object_key).await, None);
        assert_eq!(open_uploads(&s3, bucket).await, 0);
    }

    // The reaper aborts expired sessions' uploads in both buckets.
    let mut sessions = Vec::new();
    for key in [KEY_A, KEY_B] {
        let session = gw.session_id(key, json!({"ttlSeconds": 2})).await;
        let file = gw
            .register_id(key, &session, "half.bin", 6 * MIB as u64)
            .await;
        let res = gw.put_part(key, &session, &file, 1, vec![1; 5 * MIB]).await;
        assert_eq!(res.status(), 200);
        sessions.push(session);
    }
    assert_eq!(open_uploads(&s3, "bucket-a").await, 1);
    assert_eq!(open_uploads(&s3, "bucket-b").await, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_uploads(&s3, "bucket-a").await + open_uploads(&s3, "bucket-b").await > 0 {
        assert!(
            Instant::now() < deadline,
            "the reaper aborted both tenants' uploads"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.stop().await;
}

/// A tenant whose storage is another S3 endpoint (`storage_endpoint`) and region: its
/// objects land there, the gateway's own tenant stays on the gateway's server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_on_another_endpoint() {
    let s3 = S3Server::start("bucket-a");
    let elsewhere = S3Server::start("far-bucket");
    let cfg = s3_config(
        &s3,
        "",
        "",
        &format!(
            "storage = \"s3://far-bucket/far\"\nstorage_endpoint = \"{}\"\nstorage_region = \"eu-west-1\"",
            elsewhere.endpoint()
        ),
    );
    let gw = start(cfg).await;
    assert_eq!(gw.readyz().await, 200);
    for (key, server, bucket) in [(KEY_A, &s3, "bucket-a"), (KEY_B, &elsewhere, "far-bucket")] {
        let session = gw.session_id(key, json!({})).await;
        let done = upload(
            &gw,
            key,
            &session,
            json!({"fileName": "f.txt", "sizeBytes": 5}),
            b"there",
        )
        .await;
        let (at, object_key) = location(done["fileUrl"].as_str().expect("fileUrl"));
        assert_eq!(at, bucket);
        assert_eq!(
            object(server, bucket, &object_key).await.as_deref(),
            Some(&b"there"[..])
        );
    }
    gw.stop().await;
}

/// `/readyz` asks every storage: a tenant whose bucket is missing makes the gateway not
/// ready, and the log names that storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_checks_every_tenant_storage() {
    let s3 = S3Server::start("bucket-a");
    let cfg = s3_config(&s3, "", "", "storage = \"s3://no-such-bucket/x\"");
    let gw = start(cfg).await;
    assert_eq!(gw.readyz().await, 503);
    let body: Value = gw
        .client
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(body["storage"], "unreachable");
    assert_eq!(body["sessionStore"], "ok");
    let lines = log_lines_with("readyz: storage not reachable");
    assert!(
        lines.iter().any(|l| l["storage"]
            .as_str()
            .is_some_and(|s| s.starts_with("s3://no-such-bucket/x"))),
        "{lines:?}"
    );
    // The tenant on the gateway's own bucket still works.
    let session = gw.session_id(KEY_A, json!({})).await;
    let done = upload(
        &gw,
        KEY_A,
        &session,
        json!({"fileName": "ok.txt", "sizeBytes": 2}),
        b"ok",
    )
    .await;
    assert_eq!(done["status"], "completed");
    gw.stop().await;
}

async fn head(
    s3: &S3Server,
    file_url: &str,
) -> aws_sdk_s3::operation::head_object::HeadObjectOutput {
    let (bucket, key) = location(file_url);
    s3.client()
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("head object")
}

/// A completed object carries its Content-Type (declared, else detected, else
/// `application/octet-stream`), an RFC 6266 Content-Disposition, the file's metadata and the
/// tenant's encryption and storage class, as HeadObject reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_objects_carry_their_attributes() {
    let s3 = S3Server::start("bucket-a");
    let cfg = s3_config(
        &s3,
        "",
        "sse = \"aws:kms\"\nsse_kms_key_id = \"arn:aws:kms:us-east-1:111122223333:key/test\"\nstorage_class = \"STANDARD_IA\"",
        "sse = \"AES256\"\ncontent_disposition = \"inline\"",
    );
    let gw = start(cfg).await;
    let session = gw.session_id(KEY_A, json!({})).await;

    // Declared type, a non-ASCII name, metadata (one value non-ASCII), two parts.
    let data: Vec<u8> = (0..6 * MIB).map(|i| (i % 253) as u8).collect();
    let done = upload(
        &gw,
        KEY_A,
        &session,
        json!({
            "fileName": "Grüße résumé.pdf",
            "fileKey": "docs/cv.pdf",
            "sizeBytes": data.len(),
            "contentType": "application/pdf",
            "metadata": {"owner": "ada", "title": "Grüße"}
        }),
        &data,
    )
    .await;
    let h = head(&s3, done["fileUrl"].as_str().expect("url")).await;
    assert_eq!(h.content_type(), Some("application/pdf"));
    assert_eq!(
        h.content_disposition(),
        Some("attachment; filename=\"Gr__e r_sum_.pdf\"; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20r%C3%A9sum%C3%A9.pdf")
    );
    let meta = h.metadata().expect("user metadata");
    assert_eq!(meta.get("owner").map(String::as_str), Some("ada"));
    // Non-ASCII values travel as RFC 2047 encoded words, as S3 stores them.
    assert_eq!(
        meta.get("title").map(String::as_str),
        Some("=?UTF-8?B?R3LDvMOfZQ==?=")
    );
    assert_eq!(
        h.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::AwsKms)
    );
    assert_eq!(
        h.ssekms_key_id(),
        Some("arn:aws:kms:us-east-1:111122223333:key/test")
    );
    assert_eq!(
        h.storage_class(),
        Some(&aws_sdk_s3::types::StorageClass::StandardIa)
    );
    assert_eq!(
        h.e_tag().map(|e| e.trim_matches('"')),
        done["etag"].as_str()
    );

    // No declared type: the first bytes decide (a PNG), and the bytes stay as sent.
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    png.extend((0..5000u32).map(|i| (i % 256) as u8));
    // A fileKey with characters `x-amz-copy-source` must percent-encode.
    let done = upload(
        &gw,
        KEY_A,
        &session,
        json!({"fileName": "picture", "fileKey": "dir/a b+c%d?é=&.png", "sizeBytes": png.len()}),
        &png,
    )
    .await;
    let url = done["fileUrl"].as_str().expect("url");
    let h = head(&s3, url).await;
    assert_eq!(h.content_type(), Some("image/png"));
    // The copy's ETag, not the multipart upload's `<md5>-1`.
    let etag = done["etag"].as_str().expect("etag");
    assert!(!etag.contains('-'), "{etag}");
    assert_eq!(
        h.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::AwsKms)
    );
    assert_eq!(
        h.ssekms_key_id(),
        Some("arn:aws:kms:us-east-1:111122223333:key/test")
    );
    // The rewrite keeps the other attributes and reports its own ETag.
    assert_eq!(
        h.content_disposition(),
        Some("attachment; filename=\"picture\"; filename*=UTF-8''picture")
    );
    assert_eq!(
        h.storage_class(),
        Some(&aws_sdk_s3::types::StorageClass::StandardIa)
    );
    assert_eq!(
        h.e_tag().map(|e| e.trim_matches('"')),
        done["etag"].as_str()
    );
    let (bucket, key) = location(url);
    assert_eq!(object(&s3, &bucket, &key).await.as_deref(), Some(&png[..]));

    // Neither declared nor recognisable: application/octet-stream.
    let done = upload(
        &gw,
        KEY_A,
        &session,
        json!({"fileName": "notes", "sizeBytes": 5}),
        b"hello",
    )
    .await;
    let h = head(&s3, done["fileUrl"].as_str().expect("url")).await;
    assert_eq!(h.content_type(), Some("application/octet-stream"));
    assert_eq!(h.metadata().map_or(0, |m| m.len()), 0);

    // Tenant b: inline, S3-managed keys, no storage class asked for.
    let session_b = gw.session_id(KEY_B, json!({})).await;
    let done = upload(
        &gw,
        KEY_B,
        &session_b,
        json!({"fileName": "b.txt", "sizeBytes": 3, "contentType": "text/plain"}),
        b"abc",
    )
    .await;
    let h = head(&s3, done["fileUrl"].as_str().expect("url")).await;
    assert_eq!(
        h.content_disposition(),
        Some("inline; filename=\"b.txt\"; filename*=UTF-8''b.txt")
    );
    assert_eq!(
        h.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256)
    );
    assert_eq!(h.ssekms_key_id(), None);
    assert_eq!(h.storage_class(), None);

    // Metadata S3 could not take is refused at registration, naming the field.
    for metadata in [
        json!({"k": "v".repeat(3000)}),
        json!({"": "empty key"}),
        json!({"Owner": "a", "owner": "b"}),
    ] {
        let res = gw
            .register(
                KEY_A,
                &session,
                json!({"fileName": "m", "sizeBytes": 1, "metadata": metadata}),
            )
            .await;
        let p = problem(res, 400, "validationFailed").await;
        assert_eq!(p["errors"][0]["field"], "metadata", "{p}");
    }
    gw.stop().await;
}

/// Tenant storage settings are checked at start-up, every problem reported together.
#[test]
fn bad_tenant_storage_settings_are_reported_together() {
    let toml = config_toml("")
        .replace(
            "id = \"a\"",
            "id = \"a\"\nstorage = \"s3://Bad_Bucket\"\nsse = \"des\"\nstorage_class = \"GLACIER\"\ncontent_disposition = \"download\"",
        )
        .replace(
            "id = \"b\"",
            "id = \"b\"\nstorage_endpoint = \"ftp://x\"\nsse_kms_key_id = \"k\"\nsse = \"AES256\"",
        );
    let toml = format!(
        "{toml}\n[[tenants]]\nid = \"c\"\napi_keys_sha256 = [\"{}\"]\nstorage = \"s3://c-bucket\"\nstorage_endpoint = \"https://\"\nstorage_region = \"EU West\"\nsse = \"aws:kms\"\nsse_kms_key_id = \"key with spaces\"\n",
        "0".repeat(64)
    );
    let err = upgate::config::Config::from_toml(&toml, |_| None, false)
        .expect_err("refused")
        .to_string();
    for needle in [
        "tenants[0].storage",
        "tenants[0].sse",
        "tenants[0].storage_class",
        "tenants[0].content_disposition",
        "storage_endpoint and storage_region need the tenant's own storage",
        "tenants[1].sse_kms_key_id: needs sse = \"aws:kms\"",
        "sse and storage_class apply to S3 storage only",
        "storage_endpoint: \"https://\" must be an http:// or https:// URL with a host",
        "storage_region: \"EU West\" is not a region name",
        "sse_kms_key_id: expected a KMS key id, alias or ARN",
    ] {
        assert!(err.contains(needle), "{needle:?} missing in:\n{err}");
    }
}

/// Two tenants whose keys would overlap in one bucket are refused, whichever way the
/// bucket's prefix and the tenant's are split.
#[test]
fn overlapping_tenant_prefixes_in_one_bucket_are_refused() {
    let toml = config_toml("storage = \"s3://shared/t\"")
        .replace("id = \"a\"", "id = \"a\"\nstorage_prefix = \"x/\"")
        .replace(
            "id = \"b\"",
            "id = \"b\"\nstorage = \"s3://shared\"\nstorage_prefix = \"t/x/\"",
        );
    let err = upgate::config::Config::from_toml(&toml, |_| None, false)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("would overlap"), "{err}");
    // On two buckets the same prefix is fine.
    let toml = config_toml("storage = \"s3://one\"")
        .replace("id = \"a\"", "id = \"a\"\nstorage_prefix = \"p/\"")
        .replace(
            "id = \"b\"",
            "id = \"b\"\nstorage = \"s3://two\"\nstorage_prefix = \"p/\"",
        );
    upgate::config::Config::from_toml(&toml, |_| None, false).unwrap_or_else(|e| panic!("{e}"));
}
