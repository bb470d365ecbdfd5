//! `webhook-sink --listen ADDR --json-out FILE`: a webhook receiver for the load test. It
//! answers every POST 204, counts deliveries (and repeated `webhook-id`s), and records each
//! one's latency: its arrival minus the event's `timestamp` (the time of the change, ms
//! precision). Prints `SINK_ADDR=host:port`; the n-th SIGUSR1 writes `<json-out>-<n>.json`:
//! `{"events","duplicates","seconds","eventsPerSec","p50Ms","p99Ms","maxMs"}` (`seconds`:
//! first to last arrival) of what arrived since the start or the last SIGUSR1, and counting
//! starts afresh; SIGTERM/SIGINT end it.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    duplicates: u64,
    first_ms: Option<i64>,
    last_ms: i64,
    latency_us: Option<hdrhistogram::Histogram<u64>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.mmm]Z`.
fn epoch_ms(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let ms = if s.as_bytes().get(19) == Some(&b'.') {
        num(20..23)?
    } else {
        0
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + hh) * 60 + mm) * 60 + ss) * 1000 + ms)
}

pub async fn serve(listen: &str, json_out: &str) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("SINK_ADDR={addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let seen = Arc::new(Mutex::new(Seen {
        latency_us: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
        ..Seen::default()
    }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .map_err(|e| e.to_string())?;
    let mut snapshots = 0u32;
    loop {
        let (stream, _) = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = usr1.recv() => {
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                let snapshot = summary(&s);
                *s = Seen {
                    latency_us: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
                    ..Seen::default()
                };
                drop(s);
                snapshots += 1;
                std::fs::write(format!("{json_out}-{snapshots}.json"), snapshot.to_string())
                    .map_err(|e| e.to_string())?;
                continue;
            }
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let id = req
                        .headers()
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = Limited::new(req.into_body(), 1 << 20)
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let at = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["timestamp"].as_str().and_then(epoch_ms));
                    let now = now_ms();
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    if !s.ids.insert(id) {
                        s.duplicates += 1;
                    }
                    s.first_ms.get_or_insert(now);
                    s.last_ms = now;
                    if let (Some(at), Some(h)) = (at, s.latency_us.as_mut()) {
                        let _ = h.record(((now - at).max(0) as u64).saturating_mul(1000).max(1));
                    }
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    Ok(())
}

/// What arrived, as the JSON the load test reads.
fn summary(s: &Seen) -> Value {
    let events = s.ids.len() as u64 + s.duplicates;
    let seconds = s.first_ms.map_or(0.0, |f| (s.last_ms - f) as f64 / 1000.0);
    let q = |p: f64| {
        s.latency_us
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(f64::NAN, |h| h.value_at_quantile(p) as f64 / 1000.0)
    };
    json!({
        "events": events,
        "duplicates": s.duplicates,
        "seconds": seconds,
        "eventsPerSec": if seconds > 0.0 { events as f64 / seconds } else { f64::NAN },
        "p50Ms": q(0.5),
        "p99Ms": q(0.99),
        "maxMs": q(1.0),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_times_read_as_epoch_ms() {
        assert_eq!(super::epoch_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            super::epoch_ms("2026-12-02T18:32:01.250Z"),
            Some(1_796_236_321_250)
        );
        assert_eq!(
            super::epoch_ms("2000-03-01T00:00:00.000Z"),
            Some(951_868_800_000)
        );
        assert_eq!(super::epoch_ms("nonsense"), None);
    }
}
