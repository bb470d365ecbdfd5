//! Hostile input against the real binary: what an anonymous client sends must not grow the
//! gateway (`../shared/API.md` v1.1, "Limits every deployment relies on").

mod common;

use std::time::Duration;

use common::binary::Binary;
use futures_util::StreamExt as _;

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `len` characters of an HTTP token (valid in a method or a header name).
    fn token(&mut self, len: usize) -> String {
        const CHARS: &[u8] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~";
        (0..len)
            .map(|_| CHARS[self.below(CHARS.len() as u64) as usize] as char)
            .collect()
    }
}

/// One request of random method, path and headers, with no credential.
fn random_request(
    rng: &mut Rng,
    client: &reqwest::Client,
    bin: &Binary,
) -> reqwest::RequestBuilder {
    let method = match rng.below(10) {
        0 => rng.token(20_000),
        1..=4 => {
            let len = 1 + rng.below(24) as usize;
            rng.token(len)
        }
        _ => ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"][rng.below(7) as usize]
            .to_owned(),
    };
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("token method");
    let segments = rng.below(6);
    let mut path = String::from("/v1");
    for _ in 0..segments {
        path.push('/');
        let len = 1 + rng.below(40) as usize;
        path.push_str(&rng.token(len).replace(['#', '%', '`', '|', '^'], "x"));
    }
    let mut req = client.request(method, bin.url(&path));
    for _ in 0..rng.below(4) {
        let len = 1 + rng.below(30) as usize;
        let name = rng.token(len);
        let len = rng.below(200) as usize;
        let value = rng.token(len);
        req = req.header(name, value);
    }
    if rng.below(3) == 0 {
        let len = 1 + rng.below(4_000) as usize;
        let id = rng.token(len);
        req = req.header("x-request-id", id);
    }
    req
}

async fn metrics_len(client: &reqwest::Client, bin: &Binary) -> usize {
    client
        .get(format!("http://{}/metrics", bin.admin))
        .send()
        .await
        .expect("metrics")
        .bytes()
        .await
        .expect("metrics body")
        .len()
}

/// 10,000 requests with random methods (a tenth of them 20 KB long), paths, headers and
/// request ids, no API key: `/metrics` grows by less than 64 KiB and RSS by less than 16 MiB,
/// and none of them gets a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_random_requests_do_not_grow_metrics_or_memory() {
    let bin = Binary::start("", &[]);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut rng = Rng(0x5eed_1234_abcd_ef01);

    // A short warm-up first, so connection buffers and the usual series exist before the
    // baseline is read.
    let warm: Vec<_> = (0..200)
        .map(|_| random_request(&mut rng, &client, &bin))
        .collect();
    futures_util::stream::iter(warm)
        .for_each_concurrent(32, |r| async move {
            let _ = r.send().await;
        })
        .await;
    let metrics_before = metrics_len(&client, &bin).await;
    let rss_before = bin.proc_kib("VmRSS");

    let requests: Vec<_> = (0..10_000)
        .map(|_| random_request(&mut rng, &client, &bin))
        .collect();
    let statuses: Vec<u16> = futures_util::stream::iter(requests)
        .map(|r| async move { r.send().await.map(|res| res.status().as_u16()).unwrap_or(0) })
        .buffer_unordered(32)
        .collect()
        .await;

    let server_errors = statuses.iter().filter(|s| **s >= 500).count();
    let answered = statuses.iter().filter(|s| **s != 0).count();
    assert_eq!(server_errors, 0, "5xx answers among {statuses:?}");
    assert!(answered >= 9_900, "only {answered} of 10,000 were answered");

    let metrics_after = metrics_len(&client, &bin).await;
    let rss_after = bin.proc_kib("VmRSS");
    assert!(
        metrics_after < metrics_before + 64 * 1024,
        "/metrics grew from {metrics_before} to {metrics_after} bytes"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    println!(
        "10,000 random anonymous requests: /metrics {metrics_before} -> {metrics_after} bytes, RSS {rss_before} -> {rss_after} KiB"
    );
}

/// A client's `X-Request-Id` comes back when it is at most 128 visible ASCII characters;
/// a longer or non-visible one is replaced by a generated id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_bounded() {
    let bin = Binary::start("", &[]);
    let client = reqwest::Client::new();
    let echo = |id: String| {
        let req = client
            .get(bin.url("/v1/sessions/x"))
            .header("x-request-id", id);
        async move {
            let res = req.send().await.expect("send");
            res.headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_default()
        }
    };
    let ok = "r".repeat(128);
    assert_eq!(echo(ok.clone()).await, ok);
    for bad in ["r".repeat(129), "r".repeat(100_000), "two words".to_owned()] {
        let got = echo(bad.clone()).await;
        assert_ne!(got, bad);
        assert!(
            !got.is_empty() && got.len() <= 128 && got.bytes().all(|b| b.is_ascii_graphic()),
            "{got:?}"
        );
    }
}

/// How many silent connections this process may open: 5,000, or fewer when the open-file
/// limit is lower (the gateway, a separate process, has the same limit).
fn silent_budget() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1024);
    let n = 5_000.min(soft.saturating_sub(300));
    if n < 5_000 {
        println!("open-file limit {soft}: {n} silent connections instead of 5,000");
    }
    n
}

/// Reads until the server closes the connection (EOF or reset); `false` if it stays open
/// for `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. the HTTP/2 server's SETTINGS frame
        }
    }
}

/// 5,000 connections that send nothing, or only the HTTP/2 preface: each is closed after the
/// header timeout (1 s here), not before, and a normal client's requests all succeed while
/// they are open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt as _;
    let bin = Binary::start("header_read_timeout_seconds = 1\n", &[]);
    let n = silent_budget();
    let mut silent = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(&bin.api)
            .await
            .expect("connect");
        if i % 2 == 1 {
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .expect("h2c preface");
        }
        silent.push(s);
    }
    // The newest one is still open half a second later: the timeout, not the open itself,
    // closes them.
    let newest = silent.last_mut().expect("at least one");
    assert!(!closed_within(newest, Duration::from_millis(500)).await);

    let client = reqwest::Client::new();
    for i in 0..100 {
        let res = client
            .get(bin.url(&format!("/v1/sessions/00000000-0000-4000-8000-{i:012}")))
            .bearer_auth(common::KEY_A)
            .send()
            .await
            .expect("normal request while silent connections are open");
        assert_eq!(res.status(), 404);
    }

    let results = futures_util::future::join_all(
        silent
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(20))),
    )
    .await;
    let still_open = results.iter().filter(|closed| !**closed).count();
    assert_eq!(
        still_open, 0,
        "{still_open} of {n} silent connections stayed open"
    );
}

/// Opens a connection, sends one unauthenticated HTTP/1.1 request and reads the start of
/// the answer; the connection stays open (keep-alive).
async fn keep_alive_request(bin: &Binary) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(&bin.api)
        .await
        .expect("connect");
    s.write_all(b"GET /v1/sessions/x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .expect("request");
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).await.expect("response");
    buf.truncate(n);
    (s, buf)
}

/// An HTTP/1.1 keep-alive connection is closed `idle_timeout_seconds` (2 s here) after its
/// last response, and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let bin = Binary::start("idle_timeout_seconds = 2\n", &[]);
    let (mut s, head) = keep_alive_request(&bin).await;
    assert!(
        head.starts_with(b"HTTP/1.1 401"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    let answered = std::time::Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(15)).await,
        "idle connection stayed open"
    );
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(1_500),
        "closed after only {idle:?}"
    );
}

/// Over `max_connections` (2 here), a new connection is answered at once with 503
/// `unavailable`, `Retry-After` and a problem document, then closed, instead of waiting in
/// the accept queue; once a slot is free, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503_with_retry_after() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let bin = Binary::start("max_connections = 2\n", &[]);
    // Two keep-alive connections that were served (so each holds a slot; the start-up
    // probes may hold one for a moment, so a shed attempt is tried again).
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while held.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "could not take two slots"
        );
        let (s, head) = keep_alive_request(&bin).await;
        if head.starts_with(b"HTTP/1.1 401") {
            held.push(s);
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut extra = tokio::net::TcpStream::connect(&bin.api)
        .await
        .expect("connect");
    let _ = extra
        .write_all(b"GET /v1/sessions/x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer))
        .await
        .expect("answered at once, not queued")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    assert!(text.contains("\"code\":\"unavailable\""), "{text}");
    drop(held);
    // The held connections are gone: a normal request is served again.
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client
            .get(bin.url("/v1/sessions/00000000-0000-4000-8000-000000000000"))
            .bearer_auth(common::KEY_A)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still refused: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
