//! The delivery worker: one per replica.
//!
//! It takes sessions to look at from two places:
//! * its own replica's changes ([`Waker::wake`], sent by the upload protocol after a call
//!   that may have recorded an event): delivered at once;
//! * every tenant's outbox index, each second: sessions due there are claimed with a lease
//!   (one replica at a time), their due events attempted, and the session rescheduled at
//!   its next due event, or `webhook_recheck_seconds` later, which is how events recorded
//!   by a replica that died before delivering them are found.
//!
//! Each event is claimed in the store with a lease of 15 s per endpoint plus 5 s before an
//! attempt, so an attempt is made by one replica, and one that dies mid-attempt leaves the
//! event to be attempted again when the lease runs out. Events of one session are
//! attempted in sequence order by one task at a time on a replica.
//!
//! An attempt POSTs the event to every endpoint of the tenant that wants its type and has
//! not taken it yet; a 2xx within 15 s is a delivery. Redirects are not followed, the
//! response body is never read (only the status line and headers, within the 15 s), and the
//! gateway's own admin listener is never connected to ([`AdminGuard`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{backoff, body, signature, Delivery, StoredEvent};
use crate::config::{Config, TenantConfig};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::store::{Attempted, SessionStore};

/// How long one endpoint gets to answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Sessions a replica works on at once.
const CONCURRENT_SESSIONS: usize = 32;
/// Wake-ups waiting for the worker; more are dropped (the index finds their sessions).
const WAKE_QUEUE: usize = 4096;
/// Events claimed per store call: one, so that each event's lease (one attempt's worth)
/// starts when its attempt does. A batch under one lease let the leases of its later events
/// run out behind a slow receiver, and another replica then attempted them too.
const CLAIM_BATCH: usize = 1;
/// Sessions claimed from one tenant's index per poll.
const INDEX_BATCH: usize = 1024;
/// How often the outbox indexes are polled.
const POLL: Duration = Duration::from_secs(1);
/// Retry timers a replica keeps for its own sessions; more are left to the index.
const MAX_TIMERS: usize = 100_000;
/// Sessions a replica remembers for the queue-depth gauge.
const MAX_TRACKED: usize = 100_000;

/// A tenant and one of its sessions.
type SessionKey = (String, String);

/// Sends sessions to this replica's worker. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Waker {
    tx: mpsc::Sender<SessionKey>,
    rx: Arc<Mutex<Option<mpsc::Receiver<SessionKey>>>>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").finish_non_exhaustive()
    }
}

impl Default for Waker {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(WAKE_QUEUE);
        Waker {
            tx,
            rx: Arc::new(Mutex::new(Some(rx))),
        }
    }
}

impl Waker {
    /// Asks the worker to look at the session (a change may have recorded an event).
    pub fn wake(&self, tenant: &str, session_id: &str) {
        // A full queue drops the wake-up: the outbox index finds the session later.
        let _ = self.tx.try_send((tenant.to_owned(), session_id.to_owned()));
    }

    fn take(&self) -> Option<mpsc::Receiver<SessionKey>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Whether `url` names the admin listener `admin` by a literal address (`localhost`
/// included): such a webhook is refused at start.
pub fn is_admin_target(url: &str, admin: SocketAddr) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    if port_of(&uri) != admin.port() {
        return false;
    }
    let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
    if host.eq_ignore_ascii_case("localhost") {
        return admin.ip().is_loopback() || admin.ip().is_unspecified();
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| reaches(ip, admin))
}

/// Whether connecting to `ip` on the admin port reaches the admin listener `admin`.
fn reaches(ip: std::net::IpAddr, admin: SocketAddr) -> bool {
    ip == admin.ip() || (admin.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
}

/// A DNS resolver that drops the admin listener's addresses for the webhook hosts whose
/// URL port is the admin port (a name that resolves to it, or comes to).
#[derive(Clone)]
struct AdminGuard {
    admin: SocketAddr,
    hosts: Arc<HashSet<String>>,
}

type Resolving = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::io::Result<std::vec::IntoIter<SocketAddr>>> + Send>,
>;

impl tower::Service<Name> for AdminGuard {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        let guarded = self.hosts.contains(&host.to_ascii_lowercase());
        let admin = self.admin;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !(guarded && reaches(a.ip(), admin)))
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::other(
                    "the webhook host resolves only to the gateway's admin listener",
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<AdminGuard>>;
type HttpClient = Client<Connector, Full<Bytes>>;

/// The port `uri` connects to.
fn port_of(uri: &http::Uri) -> u16 {
    uri.port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        })
}

/// The HTTP client webhooks are sent with: HTTP/1.1 over TCP or rustls (aws-lc-rs, the
/// system's roots), pooled, redirects not followed (hyper's client never follows them).
fn client(config: &Config) -> Result<HttpClient, String> {
    let admin = config.admin_listen;
    let hosts = config
        .tenants
        .iter()
        .flat_map(|t| &t.webhooks)
        .filter_map(|h| h.url.parse::<http::Uri>().ok())
        .filter(|u| port_of(u) == admin.port())
        .filter_map(|u| {
            u.host()
                .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
        })
        .collect();
    let mut http = HttpConnector::new_with_resolver(AdminGuard {
        admin,
        hosts: Arc::new(hosts),
    });
    http.enforce_http(false);
    http.set_connect_timeout(Some(ATTEMPT_TIMEOUT));
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no system CA certificates found: https:// webhooks will not verify");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

/// POSTs `body` to `url` with `headers`: the status, or why there is none. The response
/// body is never read; the whole exchange up to the status line is bounded by
/// [`ATTEMPT_TIMEOUT`].
async fn post(
    http: &HttpClient,
    url: &str,
    headers: [(&'static str, String); 3],
    body: Bytes,
) -> Result<http::StatusCode, String> {
    let mut req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("upgate-webhooks/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    match tokio::time::timeout(ATTEMPT_TIMEOUT, http.request(req)).await {
        Ok(Ok(res)) => Ok(res.status()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
    }
}

/// The worker's shared parts.
struct Worker {
    config: Arc<Config>,
    tenants: HashMap<String, Arc<TenantConfig>>,
    store: Arc<dyn SessionStore>,
    metrics: Arc<Metrics>,
    http: HttpClient,
    /// Sessions a task is working on, and whether it must look again when done.
    busy: Mutex<HashMap<SessionKey, bool>>,
    /// Local retry timers: when → sessions.
    timers: Mutex<BTreeMap<i64, HashSet<SessionKey>>>,
    /// Pending events and the oldest one's time, per session, as last seen.
    seen: Mutex<HashMap<SessionKey, (u64, Option<i64>)>>,
}

/// Runs the worker until `stop` is cancelled. Does nothing when no tenant has webhooks
/// (or when another worker took `waker`'s queue).
pub async fn run(
    config: Arc<Config>,
    store: Arc<dyn SessionStore>,
    metrics: Arc<Metrics>,
    waker: Waker,
    stop: CancellationToken,
) {
    let tenants: HashMap<String, Arc<TenantConfig>> = config
        .tenants
        .iter()
        .filter(|t| !t.webhooks.is_empty())
        .map(|t| (t.id.clone(), Arc::new(t.clone())))
        .collect();
    let Some(mut wakes) = waker.take() else {
        return;
    };
    if tenants.is_empty() {
        return;
    }
    let http = match client(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the webhook HTTP client could not be built; no webhooks are delivered");
            return;
        }
    };
    let worker = Arc::new(Worker {
        config,
        tenants,
        store,
        metrics,
        http,
        busy: Mutex::default(),
        timers: Mutex::default(),
        seen: Mutex::default(),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SESSIONS));
    let mut tasks = tokio::task::JoinSet::new();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let job = tokio::select! {
            _ = stop.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a webhook delivery task failed");
                }
                continue;
            }
            Some((tenant, session)) = wakes.recv() => vec![(tenant, session, None)],
            _ = poll.tick() => worker.due_sessions().await,
        };
        for (tenant, session, claim) in job {
            if !worker.tenants.contains_key(&tenant) {
                continue;
            }
            // A session another task has is looked at again by it; an index claim of it
            // then runs out and the index entry is due again.
            if !worker.enter(&tenant, &session) {
                continue;
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let worker = worker.clone();
            tasks.spawn(async move {
                worker.session(&tenant, &session, claim).await;
                drop(permit);
            });
        }
    }
    // Attempts under way are cut: their leases run out and the events are attempted again.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::debug!("webhook worker stopped");
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Worker {
    /// Sessions due in the outbox indexes (claimed) and in the local retry timers.
    async fn due_sessions(&self) -> Vec<(String, String, Option<i64>)> {
        let now = crate::model::now_ms();
        let mut out = Vec::new();
        {
            let mut timers = self.timers.lock().unwrap_or_else(|e| e.into_inner());
            let later = timers.split_off(&(now + 1));
            for (_, sessions) in std::mem::replace(&mut *timers, later) {
                out.extend(sessions.into_iter().map(|(t, s)| (t, s, None)));
            }
        }
        let lease = ms(self.config.webhook_retry.recheck).max(ms(POLL) * 5);
        for tenant in self.tenants.keys() {
            match self
                .store
                .claim_event_sessions(tenant, now, lease, INDEX_BATCH)
                .await
            {
                Ok(sessions) => out.extend(
                    sessions
                        .into_iter()
                        .map(|s| (tenant.clone(), s, Some(now.saturating_add(lease)))),
                ),
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, "claiming outboxes failed; trying again next second")
                }
            }
        }
        self.update_gauges(now);
        out
    }

    /// Marks the session busy; false (and a note to look again) when a task has it.
    fn enter(&self, tenant: &str, session: &str) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        match busy.get_mut(&(tenant.to_owned(), session.to_owned())) {
            Some(again) => {
                *again = true;
                false
            }
            None => {
                busy.insert((tenant.to_owned(), session.to_owned()), false);
                true
            }
        }
    }

    /// Leaves the session; true when it must be looked at again.
    fn leave(&self, tenant: &str, session: &str) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_owned(), session.to_owned());
        match busy.get(&key) {
            Some(true) => {
                busy.insert(key, false);
                true
            }
            _ => {
                busy.remove(&key);
                false
            }
        }
    }

    /// Delivers the session's due events; with an index claim (its lease end), ends it.
    #[tracing::instrument(level = "debug", skip(self, claim), fields(tenant = %tenant, session_id = %session_id))]
    async fn session(&self, tenant: &str, session_id: &str, claim: Option<i64>) {
        let Some(t) = self.tenants.get(tenant).cloned() else {
            return;
        };
        let mut claim = claim;
        loop {
            let next = self.drain(&t, session_id).await;
            if let Some(until) = claim.take() {
                let recheck =
                    crate::model::now_ms().saturating_add(ms(self.config.webhook_retry.recheck));
                let next_ms = match next {
                    Ok(Some(Some(due))) => Some(due.min(recheck)),
                    Ok(Some(None)) | Err(()) => Some(recheck),
                    Ok(None) => None,
                };
                if let Err(e) = self
                    .store
                    .event_session_done(tenant, session_id, until, next_ms)
                    .await
                {
                    tracing::warn!(error = %e, "rescheduling an outbox failed; its claim runs out instead");
                }
            } else if let Ok(Some(Some(due))) = next {
                self.timer(tenant, session_id, due);
            }
            if !self.leave(tenant, session_id) {
                break;
            }
        }
    }

    /// Attempts the session's due events until none is due. `Ok(None)`: the outbox is
    /// drained for good; `Ok(Some(next))`: when the next pending event is due (if any).
    async fn drain(&self, t: &TenantConfig, session_id: &str) -> Result<Option<Option<i64>>, ()> {
        let lease = ms(ATTEMPT_TIMEOUT)
            .saturating_mul(t.webhooks.len() as i64)
            .saturating_add(5_000);
        loop {
            let now = crate::model::now_ms();
            let claimed = match self
                .store
                .claim_events(&t.id, session_id, now, lease, CLAIM_BATCH)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming events failed");
                    return Err(());
                }
            };
            let full = claimed.events.len() == CLAIM_BATCH;
            let mut next = claimed.next_due_ms;
            let mut left = claimed.pending;
            let mut oldest: Option<i64> = None;
            for event in claimed.events {
                let at = event.at_ms;
                match self.attempt(t, event).await {
                    Some(Attempted::Delivered) | Some(Attempted::Dead) => {
                        left = left.saturating_sub(1)
                    }
                    Some(Attempted::RetryAt(due)) => {
                        next = Some(next.map_or(due, |n| n.min(due)));
                        oldest = Some(oldest.map_or(at, |o| o.min(at)));
                    }
                    None => {}
                }
            }
            self.note(&t.id, session_id, left, oldest);
            if claimed.drained {
                return Ok(None);
            }
            if !full {
                return Ok(Some(next.filter(|_| left > 0)));
            }
        }
    }

    /// One attempt at `event`, recorded in the store; `None` when recording failed (the
    /// lease runs out and the event is attempted again).
    async fn attempt(&self, t: &TenantConfig, event: StoredEvent) -> Option<Attempted> {
        let id = event.id();
        let span = tracing::info_span!("webhook", tenant = %t.id, session_id = %event.session.id, event_id = %id, kind = event.kind.as_str());
        let _enter = span.enter();
        let payload = Bytes::from(body(&event));
        let mut delivery = Delivery {
            attempts: event.delivery.attempts.saturating_add(1),
            ..event.delivery.clone()
        };
        let mut failed = false;
        let mut any = false;
        for hook in &t.webhooks {
            let endpoint = hook.endpoint_id();
            if !hook.wants(event.kind) || delivery.delivered_to.contains(&endpoint) {
                continue;
            }
            any = true;
            let ts = crate::model::now_ms() / 1000;
            let sig = hook
                .secret
                .0
                .first()
                .map(|k| signature(k, &id, ts, &payload))
                .unwrap_or_default();
            let headers = [
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", sig),
            ];
            match post(&self.http, &hook.url, headers, payload.clone()).await {
                Ok(status) if status.is_success() => {
                    delivery.delivered_to.push(endpoint);
                }
                Ok(status) => {
                    failed = true;
                    delivery.last_status = Some(status.as_u16());
                    tracing::info!(status = status.as_u16(), url = %hook.url, "webhook refused; retried later");
                }
                Err(e) => {
                    failed = true;
                    delivery.last_status = None;
                    tracing::info!(error = %e, url = %hook.url, "webhook not delivered; retried later");
                }
            }
        }
        let now = crate::model::now_ms();
        if any {
            delivery.last_attempt_ms = Some(now);
        } else {
            // No endpoint wants it (or all took it): nothing was attempted.
            delivery.attempts = event.delivery.attempts;
        }
        let retry = &self.config.webhook_retry;
        let outcome = if !failed {
            Attempted::Delivered
        } else {
            let wait = backoff(
                delivery.attempts,
                retry.initial,
                retry.max_interval,
                jitter(),
            );
            let at = now.saturating_add(ms(wait));
            if at > delivery.window_start_ms.saturating_add(ms(retry.window)) {
                Attempted::Dead
            } else {
                Attempted::RetryAt(at)
            }
        };
        match self
            .store
            .event_attempted(
                &t.id,
                &event.session.id,
                event.sequence,
                &delivery,
                outcome,
                now,
            )
            .await
        {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "recording a webhook attempt failed; the event is attempted again");
                return None;
            }
        }
        let label = match outcome {
            Attempted::Delivered => "delivered",
            Attempted::RetryAt(_) => "retried",
            Attempted::Dead => "dead",
        };
        if any {
            self.metrics
                .webhook_deliveries
                .get_or_create(&OutcomeLabels { outcome: label })
                .inc();
        }
        if outcome == Attempted::Delivered && any {
            self.metrics
                .webhook_delivery_seconds
                .observe((now - event.at_ms).max(0) as f64 / 1000.0);
        }
        if outcome == Attempted::Dead {
            tracing::warn!(
                attempts = delivery.attempts,
                "webhook event dead-lettered after its retry window"
            );
        }
        Some(outcome)
    }

    fn timer(&self, tenant: &str, session: &str, at: i64) {
        let mut timers = self.timers.lock().unwrap_or_else(|e| e.into_inner());
        if timers.values().map(HashSet::len).sum::<usize>() >= MAX_TIMERS {
            return;
        }
        timers
            .entry(at)
            .or_default()
            .insert((tenant.to_owned(), session.to_owned()));
    }

    fn note(&self, tenant: &str, session: &str, pending: u64, oldest: Option<i64>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_owned(), session.to_owned());
        if pending == 0 {
            seen.remove(&key);
        } else if seen.len() < MAX_TRACKED || seen.contains_key(&key) {
            seen.insert(key, (pending, oldest));
        }
    }

    fn update_gauges(&self, now: i64) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let depth: u64 = seen.values().map(|(n, _)| *n).sum();
        let oldest = seen.values().filter_map(|(_, o)| *o).min();
        self.metrics
            .webhook_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.metrics
            .webhook_oldest_pending_seconds
            .set(oldest.map_or(0, |o| (now - o).max(0) / 1000));
    }
}

/// A random number in 0.0..1.0 for the backoff's jitter.
fn jitter() -> f64 {
    let bytes = uuid::Uuid::new_v4();
    let n = u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_targets_are_recognised_by_address_and_port() {
        let admin: SocketAddr = "127.0.0.1:9090".parse().expect("addr");
        assert!(is_admin_target("http://127.0.0.1:9090/metrics", admin));
        assert!(is_admin_target("http://localhost:9090/", admin));
        assert!(!is_admin_target("http://127.0.0.1:9091/", admin));
        assert!(!is_admin_target("https://hooks.example:9090/", admin));
        let any: SocketAddr = "0.0.0.0:9090".parse().expect("addr");
        assert!(is_admin_target("http://127.0.0.1:9090/", any));
        assert!(is_admin_target("http://[::1]:9090/", any));
        assert!(!is_admin_target("http://10.1.2.3:9090/", admin));
    }

    #[test]
    fn jitter_stays_in_its_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
