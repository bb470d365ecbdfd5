//! Uppy Companion's S3 routes (`../shared/API.md` v1.1, "Uppy") over HTTP, called exactly as
//! `@uppy/aws-s3` 6.x calls them (its `CompanionS3` client: the paths, query strings and
//! JSON bodies it sends, the `ETag` header it reads), against a gateway on Redis and the
//! in-process S3 server: parts PUT to the presigned URLs, small files POSTed as a form
//! with the presigned policy. The browser test (`tests/browser.rs`) runs the real Uppy.

mod common;

use common::*;
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

struct Uppy {
    client: reqwest::Client,
    /// `companionEndpoint`: `<gateway>/v1/uppy/<token>`.
    endpoint: String,
}

impl Uppy {
    fn url(&self, path: &str) -> String {
        format!("{}/s3{path}", self.endpoint)
    }

    async fn create(&self, name: &str) -> reqwest::Response {
        self.client
            .post(self.url("/multipart"))
            .header("content-type", "application/json")
            .body(
                json!({"filename": name, "type": "application/octet-stream",
                    "metadata": {"name": name, "type": "application/octet-stream", "relativePath": null, "caption": "c"}})
                .to_string(),
            )
            .send()
            .await
            .expect("create")
    }

    fn q(key: &str) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("key", key)
            .finish()
    }

    async fn sign(&self, id: &str, key: &str, n: u32) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/multipart/{id}/{n}?{}", Self::q(key))))
            .send()
            .await
            .expect("sign")
    }

    /// Signs and PUTs one part; its unquoted ETag.
    async fn put_part(&self, id: &str, key: &str, n: u32, bytes: Vec<u8>) -> String {
        let res = self.sign(id, key, n).await;
        assert_eq!(res.status(), 200);
        let url = res.json::<Value>().await.expect("json")["url"]
            .as_str()
            .expect("url")
            .to_owned();
        let put = self.client.put(&url).body(bytes).send().await.expect("put");
        assert_eq!(put.status(), 200, "{:?}", put.text().await);
        put.headers()["etag"]
            .to_str()
            .expect("etag")
            .trim_matches('"')
            .to_owned()
    }

    async fn list(&self, id: &str, key: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/multipart/{id}?{}", Self::q(key))))
            .send()
            .await
            .expect("list")
    }

    async fn complete(&self, id: &str, key: &str, parts: &[(u32, String)]) -> reqwest::Response {
        let parts: Vec<Value> = parts
            .iter()
            .map(|(n, e)| json!({"PartNumber": n, "ETag": e}))
            .collect();
        self.client
            .post(self.url(&format!("/multipart/{id}/complete?{}", Self::q(key))))
            .header("content-type", "application/json")
            .body(json!({ "parts": parts }).to_string())
            .send()
            .await
            .expect("complete")
    }

    async fn abort(&self, id: &str, key: &str) -> reqwest::Response {
        self.client
            .delete(self.url(&format!("/multipart/{id}?{}", Self::q(key))))
            .send()
            .await
            .expect("abort")
    }

    /// `s3/params` for an octet-stream file `name`: the form to POST.
    async fn form(&self, name: &str) -> Value {
        let res = self.params(name, "application/octet-stream").await;
        assert_eq!(res.status(), 200);
        res.json().await.expect("json")
    }

    async fn params(&self, name: &str, kind: &str) -> reqwest::Response {
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("filename", name)
            .append_pair("type", kind)
            .append_pair("metadata[name]", name)
            .append_pair("metadata[caption]", "small one")
            .finish();
        self.client
            .get(self.url(&format!("/params?{q}")))
            .send()
            .await
            .expect("params")
    }
}

/// The form `@uppy/aws-s3` POSTs: every field, then the file, last.
async fn post_form(client: &reqwest::Client, params: &Value, bytes: &[u8]) -> reqwest::Response {
    let boundary = "----upgate-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in params["fields"].as_object().expect("fields") {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{}\r\n",
                v.as_str().expect("string field")
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    client
        .post(params["url"].as_str().expect("url"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("form post")
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Setup {
    gw: TestGateway,
    s3: upgate_testkit::s3::S3Server,
    _redis: upgate_testkit::RedisServer,
    session: String,
    uppy: Uppy,
}

async fn setup() -> Setup {
    let s3 = upgate_testkit::s3::S3Server::start("uppy-bucket");
    let redis = upgate_testkit::RedisServer::start();
    let gw = s3_redis_gateway(&s3, &redis).await;
    Setup::on(gw, s3, redis).await
}

impl Setup {
    /// A session of `gw` and its Uppy endpoint.
    async fn on(
        gw: TestGateway,
        s3: upgate_testkit::s3::S3Server,
        redis: upgate_testkit::RedisServer,
    ) -> Setup {
        let (session, uppy) = new_session(&gw).await;
        Setup {
            gw,
            s3,
            _redis: redis,
            session,
            uppy,
        }
    }
}

/// A new session of `gw` (API key A): its id, and the Uppy endpoint of its upload token.
async fn new_session(gw: &TestGateway) -> (String, Uppy) {
    let created: Value = gw
        .client
        .post(format!("{}/v1/sessions", gw.base))
        .bearer_auth(KEY_A)
        .json(&json!({}))
        .send()
        .await
        .expect("session")
        .json()
        .await
        .expect("json");
    let token = created["uploadToken"].as_str().expect("token");
    let session = created["sessionId"].as_str().expect("id").to_owned();
    (session, uppy_with(gw, token))
}

/// The Uppy endpoint of upload token `token` on `gw`.
fn uppy_with(gw: &TestGateway, token: &str) -> Uppy {
    Uppy {
        client: reqwest::Client::new(),
        endpoint: format!("{}/v1/uppy/{token}", gw.base),
    }
}

async fn session_files(gw: &TestGateway, session: &str) -> Vec<Value> {
    let v: Value = gw
        .client
        .get(format!("{}/v1/sessions/{session}", gw.base))
        .bearer_auth(KEY_A)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    v["files"].as_array().expect("files").clone()
}

#[tokio::test]
async fn a_multipart_upload_becomes_a_completed_file_of_the_session() {
    let t = setup().await;
    let res = t.uppy.create("big file.bin").await;
    assert_eq!(res.status(), 200);
    let created: Value = res.json().await.expect("json");
    let id = created["uploadId"].as_str().expect("uploadId").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    // Uppy's chunks for 12 MiB: 5, 5 and 2 MiB.
    let bytes = data(12 * MIB, 7);
    let mut parts = Vec::new();
    for (i, chunk) in bytes.chunks(5 * MIB).enumerate() {
        let n = i as u32 + 1;
        parts.push((n, t.uppy.put_part(&id, &key, n, chunk.to_vec()).await));
    }
    let listed: Value = t.uppy.list(&id, &key).await.json().await.expect("json");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[2]["PartNumber"], 3);
    assert_eq!(listed[2]["Size"], 2 * MIB);
    assert_eq!(
        listed[0]["ETag"].as_str().map(|e| e.trim_matches('"')),
        Some(parts[0].1.as_str())
    );
    let res = t.uppy.complete(&id, &key, &parts).await;
    assert_eq!(res.status(), 200);
    let done: Value = res.json().await.expect("json");
    assert!(
        done["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("s3://")),
        "{done}"
    );
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["status"], "completed");
    assert_eq!(files[0]["sizeBytes"], 12 * MIB);
    assert_eq!(files[0]["fileName"], "big file.bin");
    assert_eq!(files[0]["metadata"], json!({"caption": "c"}));
    assert_eq!(s3_object(&t.s3, &files[0]), bytes);
    assert_eq!(t.s3.open_upload_count(), 0);
    // A repeated complete answers the stored result.
    let again = t.uppy.complete(&id, &key, &parts).await;
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn parts_against_the_part_size_rule_or_over_the_limit_are_refused_at_completion() {
    let t = setup().await;
    let created: Value = t.uppy.create("odd.bin").await.json().await.expect("json");
    let id = created["uploadId"].as_str().expect("id").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    // A first part of 4 MiB (not one part size) then 2 MiB.
    let p1 = t.uppy.put_part(&id, &key, 1, data(4 * MIB, 1)).await;
    let p2 = t.uppy.put_part(&id, &key, 2, data(2 * MIB, 2)).await;
    let res = t
        .uppy
        .complete(&id, &key, &[(1, p1.clone()), (2, p2.clone())])
        .await;
    let v = problem(res, 400, "partSizeMismatch").await;
    assert_eq!(v["partNumber"], 1, "{v}");
    // A part listed that storage does not hold (part 1 now one part size).
    let _ = (p1, p2);
    let p1 = t.uppy.put_part(&id, &key, 1, data(5 * MIB, 1)).await;
    let res = t
        .uppy
        .complete(&id, &key, &[(1, p1), (2, "nope".into())])
        .await;
    let v = problem(res, 400, "partsMissing").await;
    assert_eq!(v["missingParts"], json!([2]), "{v}");
    // Completing before any part was signed: nothing is in storage.
    let fresh: Value = t.uppy.create("empty.bin").await.json().await.expect("json");
    let fresh_id = fresh["uploadId"].as_str().expect("id");
    let fresh_key = fresh["key"].as_str().expect("key");
    let listed: Value = t
        .uppy
        .list(fresh_id, fresh_key)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(listed, json!([]));
    let res = t
        .uppy
        .complete(fresh_id, fresh_key, &[(1, "e".into())])
        .await;
    problem(res, 400, "partsMissing").await;
    // Part numbers past what the tenant's largest file allows are not signed.
    let res = t.uppy.sign(&id, &key, 10_001).await;
    assert_eq!(res.status(), 400);
    let files = session_files(&t.gw, &t.session).await;
    assert!(
        files.iter().all(|f| f["status"] == "registered"),
        "{files:?}"
    );
}

#[tokio::test]
async fn an_aborted_upload_leaves_nothing_open_and_the_file_deleted() {
    let t = setup().await;
    let created: Value = t.uppy.create("gone.bin").await.json().await.expect("json");
    let id = created["uploadId"].as_str().expect("id").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    t.uppy.put_part(&id, &key, 1, data(5 * MIB, 3)).await;
    assert_eq!(t.s3.open_upload_count(), 1);
    let res = t.uppy.abort(&id, &key).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json"), json!({}));
    assert_eq!(t.s3.open_upload_count(), 0);
    assert!(session_files(&t.gw, &t.session).await.is_empty());
    // Aborting again (Uppy does on removal whatever happened) is fine.
    assert_eq!(t.uppy.abort(&id, &key).await.status(), 200);
    // The file is gone for every other route.
    assert_eq!(t.uppy.sign(&id, &key, 1).await.status(), 404);
}

#[tokio::test]
async fn a_form_upload_is_registered_then_completed_with_the_objects_size() {
    let t = setup().await;
    let res = t.uppy.params("small.png", "image/png").await;
    assert_eq!(res.status(), 200);
    let params: Value = res.json().await.expect("json");
    assert_eq!(params["method"], "POST");
    assert!(
        params["url"].as_str().is_some_and(|u| u.ends_with('/')),
        "{params}"
    );
    let fields = params["fields"].as_object().expect("fields");
    for f in [
        "key",
        "policy",
        "x-amz-signature",
        "x-amz-credential",
        "Content-Type",
    ] {
        assert!(fields.contains_key(f), "{f} missing: {params}");
    }
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["status"], "registered");
    // A form whose key was changed is refused by storage (the policy fixes it).
    let mut tampered = params.clone();
    tampered["fields"]["key"] = json!("pfx/elsewhere");
    let res = post_form(&t.uppy.client, &tampered, b"x").await;
    assert!(res.status().is_client_error(), "{}", res.status());
    let bytes = data(MIB, 9);
    let res = post_form(&t.uppy.client, &params, &bytes).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files[0]["status"], "completed", "{:?}", files[0]);
    assert_eq!(files[0]["sizeBytes"], MIB);
    assert_eq!(files[0]["contentType"], "image/png");
    assert_eq!(files[0]["metadata"], json!({"caption": "small one"}));
    assert_eq!(s3_object(&t.s3, &files[0]), bytes);
}

#[tokio::test]
async fn the_routes_take_only_an_upload_token_and_only_its_own_session() {
    let t = setup().await;
    let created: Value = t.uppy.create("mine.bin").await.json().await.expect("json");
    let id = created["uploadId"].as_str().expect("id").to_owned();
    // The API key is not a session's credential.
    let res = t
        .uppy
        .client
        .post(format!("{}/v1/uppy/{KEY_A}/s3/multipart", t.gw.base))
        .header("content-type", "application/json")
        .body(json!({"filename": "x"}).to_string())
        .send()
        .await
        .expect("send");
    problem(res, 403, "insufficientScope").await;
    // No credential, or a made-up one.
    let res = t
        .uppy
        .client
        .get(format!(
            "{}/v1/uppy/upt_bogus/s3/multipart/{id}/1?key=k",
            t.gw.base
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 401);
    // Another session's token does not reach this session's file.
    let (_, other) = new_session(&t.gw).await;
    assert_eq!(other.sign(&id, "k", 1).await.status(), 404);
    assert_eq!(other.list(&id, "k").await.status(), 404);
    // A REST file is not an Uppy upload.
    let reg: Value =
        t.gw.client
            .post(format!("{}/v1/sessions/{}/files", t.gw.base, t.session))
            .bearer_auth(KEY_A)
            .json(&json!({"fileName": "r", "sizeBytes": 5}))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("json");
    let rest_id = reg["fileId"].as_str().expect("fileId");
    assert_eq!(t.uppy.sign(rest_id, "k", 1).await.status(), 404);
    // Companion's abort does not delete it either.
    assert_eq!(t.uppy.abort(rest_id, "k").await.status(), 200);
    let res =
        t.gw.client
            .get(format!(
                "{}/v1/sessions/{}/files/{rest_id}",
                t.gw.base, t.session
            ))
            .bearer_auth(KEY_A)
            .send()
            .await
            .expect("get");
    assert_eq!(res.status(), 200);
    // And the REST routes do not touch an Uppy upload, whose parts bypass their rules.
    let files = format!("{}/v1/sessions/{}/files/{id}", t.gw.base, t.session);
    let res =
        t.gw.client
            .put(format!("{files}/parts/1"))
            .bearer_auth(KEY_A)
            .body(vec![0u8; 10])
            .send()
            .await
            .expect("part");
    problem(res, 404, "fileNotFound").await;
    let res =
        t.gw.client
            .post(format!("{files}/presigned-parts"))
            .bearer_auth(KEY_A)
            .json(&json!({"partNumbers": [1]}))
            .send()
            .await
            .expect("presign");
    problem(res, 404, "fileNotFound").await;
    let res =
        t.gw.client
            .post(format!("{files}/complete"))
            .bearer_auth(KEY_A)
            .json(&json!({}))
            .send()
            .await
            .expect("complete");
    problem(res, 404, "fileNotFound").await;
    // The multipart routes do not take a form upload's file.
    let res = t.uppy.params("f.bin", "application/octet-stream").await;
    assert_eq!(res.status(), 200);
    let listed = session_files(&t.gw, &t.session).await;
    let form_id = listed
        .iter()
        .find(|f| f["fileName"] == "f.bin")
        .and_then(|f| f["fileId"].as_str())
        .expect("form file")
        .to_owned();
    assert_eq!(t.uppy.sign(&form_id, "k", 1).await.status(), 404);
    assert_eq!(t.uppy.list(&form_id, "k").await.status(), 404);
    assert_eq!(
        t.uppy
            .complete(&form_id, "k", &[(1, "e".into())])
            .await
            .status(),
        404
    );
    // The token may come as `Authorization: Bearer` instead (the path segment is then
    // not read).
    let token = t
        .uppy
        .endpoint
        .rsplit('/')
        .next()
        .expect("token")
        .to_owned();
    let res = t
        .uppy
        .client
        .get(format!("{}/v1/uppy/-/s3/multipart/{id}/1?key=k", t.gw.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("sign");
    assert_eq!(res.status(), 200);
    // Nor is an Uppy upload a tus upload, whatever id names it.
    for upload in [format!("{}.{id}", t.session), format!("{}_{id}", t.session)] {
        let res = t
            .uppy
            .client
            .head(format!("{}/v1/tus/{upload}", t.gw.base))
            .header("tus-resumable", "1.0.0")
            .bearer_auth(&token)
            .send()
            .await
            .expect("head");
        assert_eq!(res.status(), 404, "{upload}");
        let res = t
            .uppy
            .client
            .patch(format!("{}/v1/tus/{upload}", t.gw.base))
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", "0")
            .header("content-type", "application/offset+octet-stream")
            .bearer_auth(&token)
            .body("x")
            .send()
            .await
            .expect("patch");
        assert_eq!(res.status(), 404, "{upload}");
    }
}

#[tokio::test]
async fn the_reaper_completes_a_landed_form_upload_without_anyone_reading_the_session() {
    let t = setup().await;
    let params = t.uppy.form("quiet.bin").await;
    let files = session_files(&t.gw, &t.session).await;
    let file_id = files[0]["fileId"].as_str().expect("fileId").to_owned();
    assert_eq!(t.gw.state.uploads.pending_posts().len(), 1);
    let status = |gate: upgate::store::Gate<upgate::model::FileRecord>| match gate {
        upgate::store::Gate::Ok(f) => f.status,
        other => panic!("{other:?}"),
    };
    let read = || async {
        t.gw.state
            .store
            .get_file("a", &t.session, &file_id, false, upgate::model::now_ms())
            .await
            .expect("store")
    };
    // Nothing landed yet: a pass leaves the file registered and still looked for.
    upgate::reaper::pass(&t.gw.state).await.expect("pass");
    assert_eq!(status(read().await), upgate::model::FileStatus::Registered);
    assert_eq!(t.gw.state.uploads.pending_posts().len(), 1);
    let bytes = data(300_000, 4);
    assert_eq!(
        post_form(&t.uppy.client, &params, &bytes).await.status(),
        201
    );
    upgate::reaper::pass(&t.gw.state).await.expect("pass");
    let f = match read().await {
        upgate::store::Gate::Ok(f) => f,
        other => panic!("{other:?}"),
    };
    assert_eq!(f.status, upgate::model::FileStatus::Completed);
    assert_eq!(f.size_bytes, 300_000);
    // No longer awaited; held until the policy's deadline, to remove a staged resend.
    assert_eq!(t.gw.state.uploads.pending_posts().awaiting(), 0);
    assert_eq!(t.gw.state.uploads.pending_posts().len(), 1);
}

#[tokio::test]
async fn a_form_over_the_tenants_largest_file_is_refused_by_storage() {
    let s3 = upgate_testkit::s3::S3Server::start("uppy-bucket");
    let redis = upgate_testkit::RedisServer::start();
    let mut cfg = config("");
    cfg.tenants[0].max_file_size_bytes = 1000;
    let gw = s3_redis_gateway_with(&s3, &redis, cfg).await;
    let (sid, uppy) = new_session(&gw).await;
    let params = uppy.form("x.bin").await;
    let res = post_form(&uppy.client, &params, &data(1001, 1)).await;
    assert!(res.status().is_client_error(), "{}", res.status());
    let files = session_files(&gw, &sid).await;
    assert_eq!(files[0]["status"], "registered");
    // At the limit, it lands.
    let res = post_form(&uppy.client, &params, &data(1000, 1)).await;
    assert_eq!(res.status(), 201);
    let files = session_files(&gw, &sid).await;
    assert_eq!(files[0]["status"], "completed");
    assert_eq!(files[0]["sizeBytes"], 1000);
    // Multipart: one part is all 1000 bytes allow, and a part over them is refused at
    // completion.
    let created: Value = uppy.create("m.bin").await.json().await.expect("json");
    let id = created["uploadId"].as_str().expect("id").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    assert_eq!(uppy.sign(&id, &key, 2).await.status(), 400);
    let p1 = uppy.put_part(&id, &key, 1, data(1001, 2)).await;
    let res = uppy.complete(&id, &key, &[(1, p1)]).await;
    problem(res, 413, "fileTooLarge").await;
}

#[tokio::test]
async fn concurrent_first_signings_open_one_storage_upload() {
    let t = setup().await;
    let created: Value = t.uppy.create("race.bin").await.json().await.expect("json");
    let id = created["uploadId"].as_str().expect("id").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    assert_eq!(
        t.s3.open_upload_count(),
        0,
        "creation opens no storage upload"
    );
    let signs = (1..=50u32).map(|i| t.uppy.sign(&id, &key, i % 3 + 1));
    for res in futures_util::future::join_all(signs).await {
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        t.s3.open_upload_count(),
        1,
        "one storage upload for the file"
    );
    // The URLs all name that upload: parts PUT through any of them complete the file.
    let bytes = data(6 * MIB, 5);
    let p1 = t
        .uppy
        .put_part(&id, &key, 1, bytes[..5 * MIB].to_vec())
        .await;
    let p2 = t
        .uppy
        .put_part(&id, &key, 2, bytes[5 * MIB..].to_vec())
        .await;
    assert_eq!(
        t.uppy
            .complete(&id, &key, &[(1, p1), (2, p2)])
            .await
            .status(),
        200
    );
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(s3_object(&t.s3, &files[0]), bytes);
}

#[tokio::test]
async fn filesystem_storage_refuses_the_routes_before_registering_anything() {
    let gw = memory_fs_gateway().await;
    let (sid, uppy) = new_session(&gw).await;
    problem(uppy.create("a.bin").await, 501, "notSupported").await;
    problem(
        uppy.params("b.bin", "text/plain").await,
        501,
        "notSupported",
    )
    .await;
    assert!(session_files(&gw, &sid).await.is_empty());
}

/// A gateway whose form policies last `ttl` with no grace, and whose cleanups are retried
/// after 100 ms.
async fn short_forms(ttl: std::time::Duration) -> Setup {
    let s3 = upgate_testkit::s3::S3Server::start("uppy-bucket");
    let redis = upgate_testkit::RedisServer::start();
    let timing = upgate::uploads::Timing {
        cleanup_retry: std::time::Duration::from_millis(100),
        form_post_ttl: ttl,
        form_post_grace: std::time::Duration::ZERO,
        ..upgate::uploads::Timing::default()
    };
    let gw = s3_redis_gateway_timed(&s3, &redis, config(""), timing).await;
    Setup::on(gw, s3, redis).await
}

/// The object keys under the bucket's root (the S3 server's files).
fn keys(s3: &upgate_testkit::s3::S3Server) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![s3.root().join(s3.bucket())];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(rel) = path.strip_prefix(s3.root().join(s3.bucket())) {
                let rel = rel.to_string_lossy().into_owned();
                // s3s-fs keeps its own bookkeeping next to the objects.
                if !rel.starts_with('.') && !rel.contains("/.") {
                    out.push(rel);
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_form_sent_again_after_completion_leaves_the_files_object_as_it_was() {
    let t = short_forms(std::time::Duration::from_secs(3)).await;
    let params = t.uppy.form("once.bin").await;
    let first = data(200_000, 1);
    assert_eq!(
        post_form(&t.uppy.client, &params, &first).await.status(),
        201
    );
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files[0]["status"], "completed");
    assert_eq!(s3_object(&t.s3, &files[0]), first);
    // The policy is still valid: sending other bytes through it lands them only on the
    // staging key, which the completed file no longer reads.
    let other = data(150_000, 2);
    assert_eq!(
        post_form(&t.uppy.client, &params, &other).await.status(),
        201
    );
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files[0]["status"], "completed");
    assert_eq!(files[0]["sizeBytes"], 200_000);
    assert_eq!(s3_object(&t.s3, &files[0]), first);
    let staged: Vec<String> = keys(&t.s3)
        .into_iter()
        .filter(|k| k.ends_with(".post"))
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    // Past the policy's deadline, the reaper's pass removes the staged resend.
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    upgate::reaper::pass(&t.gw.state).await.expect("pass");
    let left = keys(&t.s3);
    assert!(!left.iter().any(|k| k.ends_with(".post")), "{left:?}");
    assert_eq!(s3_object(&t.s3, &files[0]), first);
    assert!(t.gw.state.uploads.pending_posts().is_empty());
}

#[tokio::test]
async fn a_form_sent_after_its_file_was_deleted_leaves_nothing_once_its_policy_expired() {
    let t = short_forms(std::time::Duration::from_secs(2)).await;
    let params = t.uppy.form("late.bin").await;
    let files = session_files(&t.gw, &t.session).await;
    let id = files[0]["fileId"].as_str().expect("id").to_owned();
    // Uppy's removal of a form upload in flight: the file is deleted first, then the
    // POST lands anyway.
    assert_eq!(t.uppy.abort(&id, "k").await.status(), 200);
    assert!(session_files(&t.gw, &t.session).await.is_empty());
    assert_eq!(
        post_form(&t.uppy.client, &params, &data(100_000, 3))
            .await
            .status(),
        201
    );
    assert_eq!(keys(&t.s3).len(), 1, "{:?}", keys(&t.s3));
    // The cleanup the delete queued waits for the deadline, then removes it (the reaper
    // retries it, as any cleanup).
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    upgate::reaper::pass(&t.gw.state).await.expect("pass");
    assert!(keys(&t.s3).is_empty(), "{:?}", keys(&t.s3));
    // The file stays deleted.
    assert!(session_files(&t.gw, &t.session).await.is_empty());
}

#[tokio::test]
async fn an_end_users_file_size_limit_bounds_uppy_uploads_as_well() {
    let t = setup().await;
    // A session as an end user's token with `maxFileSizeBytes: 1000` creates it (the
    // record the sessions route writes, with the user's limit).
    let now = upgate::model::now_ms();
    let page = upgate::store::Page {
        after: None,
        limit: 1,
    };
    let mut record = match t
        .gw
        .state
        .store
        .get_session("a", &t.session, page, now)
        .await
        .expect("store")
    {
        upgate::store::Gate::Ok(v) => v.session,
        other => panic!("{other:?}"),
    };
    record.id = uuid::Uuid::new_v4().to_string();
    record.max_file_size_bytes = Some(1000);
    t.gw.state
        .store
        .create_session(&record)
        .await
        .expect("create");
    let minted: Value =
        t.gw.client
            .post(format!(
                "{}/v1/sessions/{}/upload-tokens",
                t.gw.base, record.id
            ))
            .bearer_auth(KEY_A)
            .json(&json!({}))
            .send()
            .await
            .expect("mint")
            .json()
            .await
            .expect("json");
    let uppy = uppy_with(&t.gw, minted["uploadToken"].as_str().expect("token"));
    let params = uppy.form("u.bin").await;
    let res = post_form(&uppy.client, &params, &data(1001, 1)).await;
    assert!(res.status().is_client_error(), "{}", res.status());
    let res = post_form(&uppy.client, &params, &data(1000, 1)).await;
    assert_eq!(res.status(), 201);
    let created: Value = uppy.create("m.bin").await.json().await.expect("json");
    let id = created["uploadId"].as_str().expect("id").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    let p1 = uppy.put_part(&id, &key, 1, data(1001, 2)).await;
    let res = uppy.complete(&id, &key, &[(1, p1)]).await;
    problem(res, 413, "fileTooLarge").await;
    let files = session_files(&t.gw, &record.id).await;
    let statuses: Vec<&str> = files.iter().filter_map(|f| f["status"].as_str()).collect();
    assert_eq!(statuses, vec!["completed", "registered"], "{files:?}");
}

#[tokio::test]
async fn a_form_landed_but_not_yet_settled_at_its_deadline_is_completed_not_removed() {
    let t = short_forms(std::time::Duration::from_secs(2)).await;
    let params = t.uppy.form("slow.bin").await;
    let bytes = data(120_000, 6);
    assert_eq!(
        post_form(&t.uppy.client, &params, &bytes).await.status(),
        201
    );
    // Nobody reads the session and no pass runs before the policy's deadline.
    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
    upgate::reaper::pass(&t.gw.state).await.expect("pass");
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files[0]["status"], "completed", "{files:?}");
    assert_eq!(files[0]["sizeBytes"], 120_000);
    assert_eq!(s3_object(&t.s3, &files[0]), bytes);
    let left = keys(&t.s3);
    assert!(!left.iter().any(|k| k.ends_with(".post")), "{left:?}");
    assert!(t.gw.state.uploads.pending_posts().is_empty());
}

#[tokio::test]
async fn a_form_sent_again_before_settling_completes_with_the_last_version() {
    let t = setup().await;
    let params = t.uppy.form("twice.bin").await;
    let files = session_files(&t.gw, &t.session).await;
    let id = files[0]["fileId"].as_str().expect("id").to_owned();
    assert_eq!(
        post_form(&t.uppy.client, &params, &data(90_000, 7))
            .await
            .status(),
        201
    );
    // The length of the first version is declared (a settling that stopped before its
    // copy), then the policy is sent again with other bytes of another size.
    t.gw.state
        .uploads
        .declare_length("a", &t.session, &id, 90_000)
        .await
        .expect("declare");
    let last = data(70_000, 8);
    assert_eq!(
        post_form(&t.uppy.client, &params, &last).await.status(),
        201
    );
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files[0]["status"], "completed", "{files:?}");
    assert_eq!(files[0]["sizeBytes"], 70_000);
    assert_eq!(s3_object(&t.s3, &files[0]), last);
}

#[tokio::test]
async fn a_form_settling_cut_short_is_taken_over_once_its_lease_runs_out() {
    let t = setup().await;
    let params = t.uppy.form("cut.bin").await;
    let files = session_files(&t.gw, &t.session).await;
    let id = files[0]["fileId"].as_str().expect("id").to_owned();
    let bytes = data(80_000, 9);
    assert_eq!(
        post_form(&t.uppy.client, &params, &bytes).await.status(),
        201
    );
    // A settling that took the completion's lease and never came back (its request
    // cancelled, its replica gone): 300 ms of lease, never renewed nor given back.
    let gate =
        t.gw.state
            .store
            .begin_complete(
                "a",
                &t.session,
                &id,
                "cut-short",
                300,
                upgate::model::now_ms(),
            )
            .await
            .expect("store");
    assert!(
        matches!(
            gate,
            upgate::store::Gate::Ok(upgate::store::BeginComplete::Acquired(..))
        ),
        "{gate:?}"
    );
    let files = session_files(&t.gw, &t.session).await;
    assert_ne!(files[0]["status"], "completed", "{files:?}");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    // Past the lease, the next read's settling takes over.
    let files = session_files(&t.gw, &t.session).await;
    assert_eq!(files[0]["status"], "completed", "{files:?}");
    assert_eq!(s3_object(&t.s3, &files[0]), bytes);
}
