//! Prometheus metrics, rendered as text on the admin listener's `/metrics`.
//!
//! A handful of counters and histograms kept in atomics; no registry crate is needed for
//! this few, and rendering is a plain string walk.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters keyed by a label value set (e.g. `code`, or `route` + `status`).
#[derive(Debug, Default)]
pub struct LabeledCounter(Mutex<BTreeMap<Labels, u64>>);

impl LabeledCounter {
    /// Adds one to the series with these labels.
    pub fn inc(&self, labels: Vec<(&'static str, String)>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(labels).or_default() += 1;
    }

    /// Adds one to the series `code="<code>"`.
    pub fn inc_code(&self, code: &str) {
        self.inc(vec![("code", code.to_owned())]);
    }

    /// The value of one series.
    pub fn get(&self, labels: &[(&'static str, &str)]) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .find(|(k, _)| {
                k.len() == labels.len()
                    && k.iter()
                        .zip(labels)
                        .all(|((a, b), (c, d))| a == c && b == d)
            })
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (labels, v) in map.iter() {
            let _ = writeln!(out, "{name}{{{}}} {v}", render_labels(labels));
        }
    }
}

fn render_labels(labels: &[(&'static str, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Latency buckets in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Label names and values of one series.
type Labels = Vec<(&'static str, String)>;

/// One histogram series: cumulative bucket counts, count, sum.
type Series = ([u64; BUCKETS.len()], u64, f64);

/// A histogram per label set.
#[derive(Debug, Default)]
pub struct Histogram(Mutex<BTreeMap<Labels, Series>>);

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, labels: Vec<(&'static str, String)>, d: Duration) {
        let secs = d.as_secs_f64();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(labels).or_insert(([0; BUCKETS.len()], 0, 0.0));
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                entry.0[i] += 1;
            }
        }
        entry.1 += 1;
        entry.2 += secs;
    }

    /// Observations recorded for one label set.
    pub fn count(&self, labels: &[(&'static str, &str)]) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .find(|(k, _)| {
                k.len() == labels.len()
                    && k.iter()
                        .zip(labels)
                        .all(|((a, b), (c, d))| a == c && b == d)
            })
            .map(|(_, v)| v.1)
            .unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (labels, (buckets, count, sum)) in map.iter() {
            let l = render_labels(labels);
            let sep = if l.is_empty() { "" } else { "," };
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"{b}\"}} {}", buckets[i]);
            }
            let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{l}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{l}}} {count}");
        }
    }
}

/// Latency of calls to Redis and storage, by backend and operation. Process-wide, because the
/// stores are built before (and independently of) a gateway's [`Metrics`].
pub fn backend_calls() -> &'static Histogram {
    static CALLS: std::sync::OnceLock<Histogram> = std::sync::OnceLock::new();
    CALLS.get_or_init(Histogram::default)
}

/// Records one backend call.
pub fn observe_backend(backend: &'static str, op: &'static str, elapsed: Duration) {
    backend_calls().observe(
        vec![("backend", backend.to_owned()), ("op", op.to_owned())],
        elapsed,
    );
}

/// Everything `/metrics` shows.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by route and status.
    pub requests: LabeledCounter,
    /// Request latency by route.
    pub request_seconds: Histogram,
    /// Registrations by outcome code (`created` or the error code).
    pub registrations: LabeledCounter,
    /// Error responses by `code`.
    pub rejections: LabeledCounter,
    /// Sessions created.
    pub sessions_created: Counter,
    /// Sessions finalized.
    pub sessions_finalized: Counter,
    /// Sessions moved to expired (by a request or the reaper).
    pub sessions_expired: Counter,
    /// Expired sessions whose uploads the reaper aborted.
    pub sessions_reaped: Counter,
    /// Storage uploads aborted by the reaper.
    pub uploads_reaped: Counter,
    /// Files completed in storage.
    pub files_completed: Counter,
    /// Part bytes received from clients.
    pub bytes_received: Counter,
    /// Responses replayed from an Idempotency-Key record.
    pub idempotent_replays: Counter,
    /// Part bytes acknowledged by storage.
    pub bytes_stored: Counter,
}

impl Metrics {
    /// Prometheus text exposition; `extra` is appended (layer counters).
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::with_capacity(4096);
        self.requests.render(
            &mut out,
            "upgate_http_requests_total",
            "HTTP requests by route and status.",
        );
        self.request_seconds.render(
            &mut out,
            "upgate_http_request_duration_seconds",
            "HTTP request latency by route.",
        );
        self.registrations.render(
            &mut out,
            "upgate_file_registrations_total",
            "File registrations by outcome code.",
        );
        self.rejections.render(
            &mut out,
            "upgate_rejections_total",
            "Error responses by problem code.",
        );
        backend_calls().render(
            &mut out,
            "upgate_backend_call_duration_seconds",
            "Latency of Redis and storage calls by backend and operation.",
        );
        let counters: [(&str, &str, &Counter); 9] = [
            (
                "upgate_idempotent_replays_total",
                "Responses replayed for a repeated Idempotency-Key.",
                &self.idempotent_replays,
            ),
            (
                "upgate_sessions_created_total",
                "Sessions created.",
                &self.sessions_created,
            ),
            (
                "upgate_sessions_finalized_total",
                "Sessions finalized.",
                &self.sessions_finalized,
            ),
            (
                "upgate_sessions_expired_total",
                "Sessions seen past expiresAt.",
                &self.sessions_expired,
            ),
            (
                "upgate_sessions_reaped_total",
                "Expired sessions reaped.",
                &self.sessions_reaped,
            ),
            (
                "upgate_uploads_reaped_total",
                "Storage multipart uploads aborted by the reaper.",
                &self.uploads_reaped,
            ),
            (
                "upgate_files_completed_total",
                "Files completed in storage.",
                &self.files_completed,
            ),
            (
                "upgate_received_bytes_total",
                "Part bytes received from clients.",
                &self.bytes_received,
            ),
            (
                "upgate_stored_bytes_total",
                "Part bytes acknowledged by storage.",
                &self.bytes_stored,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        out.push_str(extra);
        out
    }
}
