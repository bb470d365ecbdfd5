//! Prometheus metrics, rendered as text on the admin listener's `/metrics`.
//!
//! A handful of counters and histograms kept in atomics; no registry crate is needed for
//! this few, and rendering is a plain string walk.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
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

/// Label names and values of one series.
type Labels = Vec<(&'static str, String)>;

/// Series keyed by their labels. Looked up with borrowed labels, so counting into a series
/// that exists allocates nothing (this runs several times per request).
#[derive(Debug)]
struct SeriesMap<V>(HashMap<u64, Vec<(Labels, V)>>);

impl<V> Default for SeriesMap<V> {
    fn default() -> Self {
        SeriesMap(HashMap::new())
    }
}

fn labels_hash(labels: &[(&'static str, &str)]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for (k, v) in labels {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

fn same_labels(a: &Labels, b: &[(&'static str, &str)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((k, v), (l, w))| k == l && v == w)
}

impl<V> SeriesMap<V> {
    fn entry(&mut self, labels: &[(&'static str, &str)], init: impl FnOnce() -> V) -> &mut V {
        let bucket = self.0.entry(labels_hash(labels)).or_default();
        let i = match bucket.iter().position(|(k, _)| same_labels(k, labels)) {
            Some(i) => i,
            None => {
                let owned = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
                bucket.push((owned, init()));
                bucket.len() - 1
            }
        };
        &mut bucket[i].1
    }

    fn get(&self, labels: &[(&'static str, &str)]) -> Option<&V> {
        self.0
            .get(&labels_hash(labels))?
            .iter()
            .find(|(k, _)| same_labels(k, labels))
            .map(|(_, v)| v)
    }

    /// Every series, sorted by labels (a stable `/metrics` output).
    fn sorted(&self) -> Vec<&(Labels, V)> {
        let mut all: Vec<_> = self.0.values().flatten().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// Counters keyed by a label value set (e.g. `code`, or `route` + `status`).
#[derive(Debug, Default)]
pub struct LabeledCounter(Mutex<SeriesMap<u64>>);

impl LabeledCounter {
    /// Adds one to the series with these labels.
    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(labels, || 0) += 1;
    }

    /// Adds one to the series `code="<code>"`.
    pub fn inc_code(&self, code: &str) {
        self.inc(&[("code", code)]);
    }

    /// The value of one series.
    pub fn get(&self, labels: &[(&'static str, &str)]) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(labels).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (labels, v) in map.sorted() {
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

/// One histogram series: cumulative bucket counts, count, sum.
type Series = ([u64; BUCKETS.len()], u64, f64);

/// A histogram per label set.
#[derive(Debug, Default)]
pub struct Histogram(Mutex<SeriesMap<Series>>);

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, labels: &[(&'static str, &str)], d: Duration) {
        let secs = d.as_secs_f64();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(labels, || ([0; BUCKETS.len()], 0, 0.0));
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
        map.get(labels).map_or(0, |v| v.1)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (labels, (buckets, count, sum)) in map.sorted() {
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
    backend_calls().observe(&[("backend", backend), ("op", op)], elapsed);
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
    /// Sessions the reaper found past `expiresAt` (once per session; a request that meets an
    /// expired session logs the expiration but does not count it here).
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
                "Sessions the reaper found past expiresAt.",
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
