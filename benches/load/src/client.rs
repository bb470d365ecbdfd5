//! A pooled hyper 1 HTTP/1.1 client for loopback targets.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::stats::bucket;

/// Every request gives up after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A response: status and the whole body.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    /// The `Location` header, when the response has one.
    pub location: Option<String>,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// `"409 duplicateFileKey"` (the problem document's `code` when there is one).
    pub fn error_kind(&self) -> String {
        let code = self.json()["code"].as_str().map(str::to_owned);
        match code {
            Some(c) => format!("{} {c}", self.status.as_u16()),
            None => self.status.as_u16().to_string(),
        }
    }
}

/// Refuses anything but a loopback host: every load loop of this tool targets 127.0.0.1 only.
pub fn check_loopback(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "{url}: refusing a non-loopback target (load is only ever sent to 127.0.0.1 / ::1)"
        ))
    }
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    auth: Option<HeaderValue>,
}

impl Http {
    pub fn new(key: Option<&str>, max_idle_per_host: usize) -> Http {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let auth = key.map(|k| {
            HeaderValue::from_str(&format!("Bearer {k}")).expect("api key is a valid header value")
        });
        Http { client, auth }
    }

    /// The same client (its connection pool included) sending `credential` instead of the
    /// API key: an upload token.
    pub fn with_credential(&self, credential: &str) -> Http {
        Http {
            client: self.client.clone(),
            auth: HeaderValue::from_str(&format!("Bearer {credential}")).ok(),
        }
    }

    /// Sends one request (with the API key unless `with_auth` is false) and reads the whole
    /// response body. Transport errors and timeouts come back as an error bucket name.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        with_auth: bool,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<Reply, String> {
        self.send_via(method, url, None, with_auth, content_type, body)
            .await
    }

    /// [`Http::send`], connecting to `via` (a loopback `host:port`) instead of the URL's
    /// authority, which is still sent as `Host` (so a presigned URL's signature holds).
    pub async fn send_via(
        &self,
        method: Method,
        url: &str,
        via: Option<&str>,
        with_auth: bool,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<Reply, String> {
        self.send_full(method, url, via, with_auth, content_type, &[], body)
            .await
    }

    /// [`Http::send`] with extra request headers (a tus request's).
    pub async fn send_headers(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<Reply, String> {
        self.send_full(method, url, None, true, content_type, headers, body)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_full(
        &self,
        method: Method,
        url: &str,
        via: Option<&str>,
        with_auth: bool,
        content_type: Option<&'static str>,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Reply, String> {
        let mut req = Request::builder().method(method);
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        match via {
            None => req = req.uri(url),
            Some(via) => {
                let uri: hyper::Uri = url.parse().map_err(|e| bucket(&format!("url: {e}")))?;
                let host = uri
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .ok_or_else(|| bucket("url: no authority"))?;
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                req = req
                    .uri(format!("http://{via}{path}"))
                    .header(header::HOST, host);
            }
        }
        if with_auth {
            if let Some(a) = &self.auth {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| bucket(&format!("request: {e}")))?;
        let fut = async {
            let res = self.client.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                if let Some(src) = std::error::Error::source(&e) {
                    msg = format!("{msg}: {src}");
                }
                bucket(&format!("io: {msg}"))
            })?;
            let status = res.status();
            let location = res
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| bucket(&format!("io: body: {e}")))?
                .to_bytes();
            Ok(Reply {
                status,
                body,
                location,
            })
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err("timeout".into()),
        }
    }

    /// POST a JSON document.
    pub async fn post_json(&self, url: &str, body: &Value) -> Result<Reply, String> {
        self.send(
            Method::POST,
            url,
            true,
            Some("application/json"),
            Bytes::from(body.to_string()),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::check_loopback;

    #[test]
    fn only_loopback_targets_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:80/x",
            "http://127.3.2.1/",
        ] {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "http://192.168.1.1/",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }
}
