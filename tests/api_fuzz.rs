//! Property tests over HTTP: arbitrary request bodies, fileKeys, part numbers and headers
//! never panic the gateway, never produce a 5xx, and every rejection is a 4xx problem
//! document with a `code`.

mod common;

use common::strategies::json_value;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        3 => json_value().prop_map(Body::Json),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Body::Raw),
        1 => ("\\PC{0,30}", any::<u32>()).prop_map(|(k, n)| Body::Json(json!({"fileName": "f", "fileKey": k, "sizeBytes": n}))),
    ]
}

async fn assert_problem_or_success(
    res: reqwest::Response,
    what: &str,
) -> Result<(), TestCaseError> {
    let status = res.status().as_u16();
    // 501 notSupported is the contract's answer for presigned parts on filesystem storage.
    prop_assert!(
        status < 500 || status == 501,
        "{what}: server error {status}"
    );
    if status >= 400 {
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        prop_assert_eq!(ct, "application/problem+json", "{}", what);
        let v: Value = res
            .json()
            .await
            .map_err(|e| TestCaseError::fail(format!("{what}: body {e}")))?;
        prop_assert!(
            v["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{}: {}",
            what,
            v
        );
    }
    Ok(())
}

#[test]
fn arbitrary_requests_get_a_success_or_a_4xx_problem() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let gw = rt.block_on(async {
        let store = std::sync::Arc::new(upgate::store::memory::MemoryStore::new(
            std::time::Duration::from_secs(3600),
        ));
        TestGateway::start(config(""), store).await
    });
    let (session, file) = rt.block_on(async {
        let s = gw.create_session(KEY_A, json!({"maxFiles": 1000})).await;
        let session = s["sessionId"].as_str().expect("id").to_owned();
        let f: Value = gw
            .register_json(
                KEY_A,
                &session,
                json!({"fileName": "seed", "sizeBytes": 10}),
            )
            .await;
        (session, f["fileId"].as_str().expect("id").to_owned())
    });
    let mut runner = TestRunner::new(PtConfig {
        cases: 256,
        failure_persistence: None,
        ..PtConfig::default()
    });
    let paths = [
        "/v1/sessions".to_owned(),
        format!("/v1/sessions/{session}/files"),
        format!("/v1/sessions/{session}/files/{file}/complete"),
        format!("/v1/sessions/{session}/files/{file}/presigned-parts"),
    ];
    runner
        .run(
            &(0..paths.len(), body(), "\\PC{0,12}", 0u64..40),
            |(which, body, part, len)| {
                rt.block_on(async {
                    let rb = gw.req(reqwest::Method::POST, &paths[which], KEY_A);
                    let rb = match &body {
                        Body::Json(v) => rb.json(v),
                        Body::Raw(b) => rb.body(b.clone()),
                    };
                    assert_problem_or_success(
                        rb.send().await.expect("send"),
                        &format!("POST {} {body:?}", paths[which]),
                    )
                    .await?;
                    // Arbitrary part numbers and lengths on the byte path.
                    let path = format!(
                        "/v1/sessions/{session}/files/{file}/parts/{}",
                        urlencode(&part)
                    );
                    let res = gw
                        .req(reqwest::Method::PUT, &path, KEY_A)
                        .body(vec![7u8; len as usize])
                        .send()
                        .await
                        .expect("send");
                    assert_problem_or_success(res, &format!("PUT part {part:?} len {len}")).await
                })
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
