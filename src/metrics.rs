//! Prometheus metrics on [`prometheus_client`], rendered in the Prometheus text format
//! (0.0.4) on the admin listener's `/metrics`.
//!
//! Every label value comes from a fixed set: methods outside the seven the API uses are
//! `other` ([`method_label`]), routes are the router's templates or `unmatched`
//! ([`route_label`]), statuses are numbers, codes and backend operations are `&'static str`
//! the gateway itself names. Nothing a client sends can add a series.

use std::fmt;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Latency buckets in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A histogram family with the latency buckets.
pub type Latency<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency<L: Clone + std::hash::Hash + Eq>() -> Latency<L> {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// The method label: the seven methods the API uses, anything else `other`.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The route label: `matched` (the router's template) if it is one of
/// [`crate::api::ROUTES`], else `unmatched`.
pub fn route_label(matched: Option<&str>) -> &'static str {
    matched
        .and_then(|m| crate::api::ROUTES.iter().copied().find(|r| *r == m))
        .unwrap_or("unmatched")
}

/// Labels of `upgate_http_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// [`method_label`].
    pub method: &'static str,
    /// [`route_label`].
    pub route: &'static str,
    /// The response status.
    pub status: u16,
}

/// Labels of `upgate_http_request_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    /// [`method_label`].
    pub method: &'static str,
    /// [`route_label`].
    pub route: &'static str,
}

/// A problem code (or `created`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabels {
    /// The code.
    pub code: &'static str,
}

/// Labels of `upgate_backend_call_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BackendLabels {
    /// `redis` or `storage`.
    pub backend: &'static str,
    /// The operation.
    pub op: &'static str,
}

/// Latency of calls to Redis and storage, by backend and operation. Process-wide, because the
/// stores are built before (and independently of) a gateway's [`Metrics`]; every gateway's
/// registry shows it.
pub fn backend_calls() -> &'static Latency<BackendLabels> {
    static CALLS: std::sync::OnceLock<Latency<BackendLabels>> = std::sync::OnceLock::new();
    CALLS.get_or_init(latency)
}

/// Records one backend call.
pub fn observe_backend(backend: &'static str, op: &'static str, elapsed: Duration) {
    backend_calls()
        .get_or_create(&BackendLabels { backend, op })
        .observe(elapsed.as_secs_f64());
}

/// Everything `/metrics` shows (with the layers' counters, see [`Metrics::render`]).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by method, route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by method and route.
    pub request_seconds: Latency<RouteLabels>,
    /// Registrations by outcome code (`created` or the error code).
    pub registrations: Family<CodeLabels, Counter>,
    /// Error responses by `code`.
    pub rejections: Family<CodeLabels, Counter>,
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
    /// Webhook attempts by outcome (`delivered`, `retried`, `dead`).
    pub webhook_deliveries: Family<OutcomeLabels, Counter>,
    /// Seconds from an event to its delivery.
    pub webhook_delivery_seconds: Histogram,
    /// Events pending in the outboxes this replica looked at last.
    pub webhook_queue_depth: prometheus_client::metrics::gauge::Gauge,
    /// Age in seconds of the oldest event this replica knows to be undelivered.
    pub webhook_oldest_pending_seconds: prometheus_client::metrics::gauge::Gauge,
}

/// Labels of `upgate_webhook_deliveries_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `delivered`, `retried` or `dead`.
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_seconds: latency(),
            registrations: Family::default(),
            rejections: Family::default(),
            sessions_created: Counter::default(),
            sessions_finalized: Counter::default(),
            sessions_expired: Counter::default(),
            sessions_reaped: Counter::default(),
            uploads_reaped: Counter::default(),
            files_completed: Counter::default(),
            bytes_received: Counter::default(),
            idempotent_replays: Counter::default(),
            bytes_stored: Counter::default(),
            webhook_deliveries: Family::default(),
            webhook_delivery_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0, 3600.0,
            ]),
            webhook_queue_depth: Default::default(),
            webhook_oldest_pending_seconds: Default::default(),
        };
        let mut r = Registry::default();
        // Counter names get `_total` appended by the encoder; help texts get a full stop.
        r.register(
            "upgate_http_requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        r.register(
            "upgate_http_request_duration_seconds",
            "HTTP request latency by route",
            m.request_seconds.clone(),
        );
        r.register(
            "upgate_file_registrations",
            "File registrations by outcome code",
            m.registrations.clone(),
        );
        r.register(
            "upgate_rejections",
            "Error responses by problem code",
            m.rejections.clone(),
        );
        r.register(
            "upgate_backend_call_duration_seconds",
            "Latency of Redis and storage calls by backend and operation",
            backend_calls().clone(),
        );
        r.register(
            "upgate_webhook_deliveries",
            "Webhook delivery attempts by outcome",
            m.webhook_deliveries.clone(),
        );
        r.register(
            "upgate_webhook_delivery_seconds",
            "Time from an event to its delivery",
            m.webhook_delivery_seconds.clone(),
        );
        r.register(
            "upgate_webhook_queue_depth",
            "Events pending in the outboxes this replica looked at last",
            m.webhook_queue_depth.clone(),
        );
        r.register(
            "upgate_webhook_oldest_pending_seconds",
            "Age of the oldest event this replica knows to be undelivered",
            m.webhook_oldest_pending_seconds.clone(),
        );
        for (name, help, c) in [
            (
                "upgate_idempotent_replays",
                "Responses replayed for a repeated Idempotency-Key",
                &m.idempotent_replays,
            ),
            (
                "upgate_sessions_created",
                "Sessions created",
                &m.sessions_created,
            ),
            (
                "upgate_sessions_finalized",
                "Sessions finalized",
                &m.sessions_finalized,
            ),
            (
                "upgate_sessions_expired",
                "Sessions the reaper found past expiresAt",
                &m.sessions_expired,
            ),
            (
                "upgate_sessions_reaped",
                "Expired sessions reaped",
                &m.sessions_reaped,
            ),
            (
                "upgate_uploads_reaped",
                "Storage multipart uploads aborted by the reaper",
                &m.uploads_reaped,
            ),
            (
                "upgate_files_completed",
                "Files completed in storage",
                &m.files_completed,
            ),
            (
                "upgate_received_bytes",
                "Part bytes received from clients",
                &m.bytes_received,
            ),
            (
                "upgate_stored_bytes",
                "Part bytes acknowledged by storage",
                &m.bytes_stored,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    /// Counts a registration outcome (`created` or the problem code).
    pub fn registration(&self, code: &'static str) {
        self.registrations.get_or_create(&CodeLabels { code }).inc();
    }

    /// Counts an error response by its problem code.
    pub fn rejection(&self, code: &'static str) {
        self.rejections.get_or_create(&CodeLabels { code }).inc();
    }

    /// Counts one response and its latency.
    pub fn request(&self, method: &'static str, route: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route,
                status,
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels { method, route })
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of these metrics, then of `extra` (collectors of
    /// components built apart from the gateway's metrics, such as the layers' counters).
    pub fn render(&self, extra: &Registry) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, extra);
        out
    }
}

/// A counter family read at scrape time from `read`, one series per `(label value, count)`.
pub struct ConstCounters<F> {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    read: F,
}

impl<F> ConstCounters<F>
where
    F: Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
{
    /// Counters `name{label="<value>"}` with the values `read` returns on each scrape.
    pub fn new(name: &'static str, help: &'static str, label: &'static str, read: F) -> Self {
        ConstCounters {
            name,
            help,
            label,
            read,
        }
    }
}

impl<F> fmt::Debug for ConstCounters<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConstCounters")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F> Collector for ConstCounters<F>
where
    F: Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            self.name,
            self.help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (value, n) in (self.read)() {
            let labels = [(self.label, value)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition is Prometheus text with the documented names, `_total` on counters, and
    /// a layer collector's series after the gateway's own.
    #[test]
    fn renders_the_documented_series() {
        let m = Metrics::default();
        m.request(
            "GET",
            "/v1/sessions/{session_id}",
            200,
            Duration::from_millis(3),
        );
        m.registration("created");
        m.rejection("unauthorized");
        m.bytes_received.inc_by(11);
        let mut extra = Registry::default();
        extra.register_collector(Box::new(ConstCounters::new(
            "upgate_rate_limit_decisions",
            "Rate-limit decisions",
            "decision",
            || vec![("admitted", 4), ("limited", 1)],
        )));
        let text = m.render(&extra);
        for want in [
            "upgate_http_requests_total{method=\"GET\",route=\"/v1/sessions/{session_id}\",status=\"200\"} 1",
            "upgate_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/sessions/{session_id}\",le=\"0.005\"} 1",
            "upgate_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/sessions/{session_id}\"} 1",
            "upgate_file_registrations_total{code=\"created\"} 1",
            "upgate_rejections_total{code=\"unauthorized\"} 1",
            "upgate_received_bytes_total 11",
            "# TYPE upgate_sessions_created_total counter",
            "upgate_rate_limit_decisions_total{decision=\"admitted\"} 4",
            "upgate_rate_limit_decisions_total{decision=\"limited\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
    }

    #[test]
    fn labels_come_from_fixed_sets() {
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").unwrap()),
            "other"
        );
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        assert_eq!(route_label(None), "unmatched");
        assert_eq!(route_label(Some("/v1/anything/{x}")), "unmatched");
        assert_eq!(route_label(Some("/v1/sessions")), "/v1/sessions");
    }
}
