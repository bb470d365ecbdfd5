//! The browser example's backend: serves the page (`index.html`, `app.js`, Uppy from
//! `node_modules`) and `/config`, which creates an upgate session with the tenant's API key
//! and hands the page the session's upload token (the key never reaches the browser).
//!
//! ```text
//! npm ci --prefix examples/browser
//! cargo run --example browser      # then open http://127.0.0.1:8081
//! ```
//!
//! Settings (environment): `UPGATE_URL` (the gateway, default `http://127.0.0.1:8080`),
//! `UPGATE_API_KEY` (default the dev tenant's key), `EXAMPLE_LISTEN` (default
//! `127.0.0.1:8081`; port 0 picks one). Prints `listening on http://<addr>` once serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

struct Backend {
    gateway: String,
    api_key: String,
    dir: PathBuf,
    http: reqwest::Client,
}

/// A file of the page: only these names, so no path from the request reaches the disk.
fn asset(dir: &Path, name: &str) -> Option<(PathBuf, &'static str)> {
    let (path, kind) = match name {
        "" | "index.html" => (dir.join("index.html"), "text/html; charset=utf-8"),
        "app.js" => (dir.join("app.js"), "text/javascript"),
        "uppy/uppy.min.mjs" => (
            dir.join("node_modules/uppy/dist/uppy.min.mjs"),
            "text/javascript",
        ),
        "uppy/uppy.min.css" => (dir.join("node_modules/uppy/dist/uppy.min.css"), "text/css"),
        _ => return None,
    };
    Some((path, kind))
}

async fn static_file(State(b): State<Arc<Backend>>, uri: axum::http::Uri) -> Response {
    let Some((path, kind)) = asset(&b.dir, uri.path().trim_start_matches('/')) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind)], bytes).into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            format!(
                "{}: {e} (run `npm ci --prefix examples/browser`)",
                path.display()
            ),
        )
            .into_response(),
    }
}

/// A new session for the page, and its upload token.
async fn config(State(b): State<Arc<Backend>>) -> Response {
    let created = b
        .http
        .post(format!("{}/v1/sessions", b.gateway))
        .bearer_auth(&b.api_key)
        .json(&json!({"metadata": {"from": "examples/browser"}}))
        .send()
        .await;
    let body: Result<Value, String> = match created {
        Ok(res) if res.status().is_success() => res.json().await.map_err(|e| e.to_string()),
        Ok(res) => Err(format!("the gateway answered {}", res.status())),
        Err(e) => Err(e.to_string()),
    };
    match body {
        Ok(session) => Json(json!({
            "gateway": b.gateway,
            "sessionId": session["sessionId"],
            "uploadToken": session["uploadToken"],
            "uploadTokenExpiresAt": session["uploadTokenExpiresAt"],
        }))
        .into_response(),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("creating a session at {} failed: {e}", b.gateway),
        )
            .into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let backend = Arc::new(Backend {
        gateway: env("UPGATE_URL", "http://127.0.0.1:8080")
            .trim_end_matches('/')
            .to_owned(),
        api_key: env("UPGATE_API_KEY", "upgate-dev-key"),
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser"),
        http: reqwest::Client::new(),
    });
    let listen: SocketAddr = env("EXAMPLE_LISTEN", "127.0.0.1:8081").parse()?;
    let app = Router::new()
        .route("/config", get(config))
        .fallback(get(static_file))
        .with_state(backend);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
