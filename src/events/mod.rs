//! Events and their webhooks (API.md v1.1, "Events").
//!
//! An event is recorded by the session store in the same atomic step as the change it
//! reports (the Redis store's Lua scripts write it next to the session; the memory store
//! under its lock), and only for sessions of tenants with webhooks: a session remembers at
//! creation whether its tenant had any ([`crate::model::SessionRecord::outbox_keep_ms`]).
//! Each event keeps a copy of the session (and file) as the change left them, so what is
//! delivered is what happened, whatever happened since.
//!
//! The delivery worker ([`deliver`]) runs in every replica. Events of a session wait in
//! that session's outbox; a replica that records one wakes its own worker, and every
//! replica looks through the tenants' outbox indexes every `webhook_recheck_seconds` for
//! events nobody delivered (their replica died). An attempt is leased in the store, so
//! each attempt is made by one replica; a replica that dies mid-attempt leaves the lease to
//! run out, and the event is attempted again (at-least-once).

pub mod deliver;

use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};

use crate::model::{FileRecord, FileStatus, SessionRecord};

/// The seven event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `session.created`
    SessionCreated,
    /// `file.registered`
    FileRegistered,
    /// `file.completed`
    FileCompleted,
    /// `file.deleted`
    FileDeleted,
    /// `session.finalized`
    SessionFinalized,
    /// `session.deleted`
    SessionDeleted,
    /// `session.expired`
    SessionExpired,
}

impl EventType {
    /// Every type, in the order API.md lists them.
    pub const ALL: [EventType; 7] = [
        EventType::SessionCreated,
        EventType::FileRegistered,
        EventType::FileCompleted,
        EventType::FileDeleted,
        EventType::SessionFinalized,
        EventType::SessionDeleted,
        EventType::SessionExpired,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::SessionCreated => "session.created",
            EventType::FileRegistered => "file.registered",
            EventType::FileCompleted => "file.completed",
            EventType::FileDeleted => "file.deleted",
            EventType::SessionFinalized => "session.finalized",
            EventType::SessionDeleted => "session.deleted",
            EventType::SessionExpired => "session.expired",
        }
    }

    /// The type named `s`.
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// The delivery state of an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Attempts made so far.
    pub attempts: u32,
    /// When the last attempt was made (ms).
    pub last_attempt_ms: Option<i64>,
    /// The HTTP status of the last attempt's failing answer (`None`: a network error, a
    /// timeout, or no attempt yet).
    pub last_status: Option<u16>,
    /// The endpoints ([`crate::config::WebhookConfig::endpoint_id`]) that took the event.
    pub delivered_to: Vec<String>,
    /// When the retry window of the event began (ms): its recording, or the last
    /// `POST .../retry`.
    pub window_start_ms: i64,
}

impl Delivery {
    /// The stored form: `attempts\nlast_attempt\nlast_status\nwindow_start\nids,`.
    pub fn encode(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}",
            self.attempts,
            self.last_attempt_ms
                .map(|n| n.to_string())
                .unwrap_or_default(),
            self.last_status.map(|n| n.to_string()).unwrap_or_default(),
            self.window_start_ms,
            self.delivered_to.join(",")
        )
    }

    /// The state stored as `s` ([`Delivery::encode`]); a fresh one (window from
    /// `recorded_ms`) when `s` is empty or unreadable.
    pub fn decode(s: &str, recorded_ms: i64) -> Delivery {
        let mut it = s.split('\n');
        let mut next = || it.next().unwrap_or("");
        let attempts = next().parse().unwrap_or(0);
        let last_attempt_ms = next().parse().ok();
        let last_status = next().parse().ok();
        let window_start_ms = next().parse().unwrap_or(recorded_ms);
        let delivered_to = next()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Delivery {
            attempts,
            last_attempt_ms,
            last_status,
            delivered_to,
            window_start_ms,
        }
    }
}

/// Where an event stands in its session's outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    /// Waiting for (another) attempt, due at the time given (ms).
    Pending(i64),
    /// Dead-lettered at the time given (ms): retried for the whole window.
    Failed(i64),
}

/// An event as its session's outbox holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// The event's sequence number in its session (1 for `session.created`).
    pub sequence: u64,
    /// Its type.
    pub kind: EventType,
    /// When it happened (ms).
    pub at_ms: i64,
    /// The session as the change left it.
    pub session: SessionRecord,
    /// The file, for file events, as the change left it (a deleted file shows `aborted`).
    pub file: Option<FileRecord>,
    /// Its delivery so far.
    pub delivery: Delivery,
    /// Pending or dead-lettered.
    pub status: EventStatus,
}

impl StoredEvent {
    /// The event's id (`webhook-id`): its session and sequence number.
    pub fn id(&self) -> String {
        event_id(&self.session.id, self.sequence)
    }
}

/// The id of event `sequence` of session `session_id`.
pub fn event_id(session_id: &str, sequence: u64) -> String {
    format!("evt_{session_id}_{sequence}")
}

/// The session id and sequence number an event id names.
pub fn parse_event_id(id: &str) -> Option<(&str, u64)> {
    let rest = id.strip_prefix("evt_")?;
    let (session, seq) = rest.rsplit_once('_')?;
    let seq: u64 = seq.parse().ok()?;
    (!session.is_empty() && seq > 0).then_some((session, seq))
}

/// The file of a `file.deleted` event shows `aborted` (the copy was taken just before the
/// record went).
pub(crate) fn deleted_view(mut f: FileRecord) -> FileRecord {
    f.status = FileStatus::Aborted;
    f
}

#[derive(serde::Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: Data<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Data<'a> {
    tenant: &'a str,
    session_id: &'a str,
    sequence: u64,
    session: crate::api::SessionView<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<crate::api::FileView<'a>>,
}

/// The JSON body delivered for `event`.
pub fn body(event: &StoredEvent) -> Vec<u8> {
    let body = Body {
        kind: event.kind.as_str(),
        timestamp: crate::model::rfc3339_ms(event.at_ms),
        data: Data {
            tenant: &event.session.tenant,
            session_id: &event.session.id,
            sequence: event.sequence,
            session: crate::api::session_json(&event.session),
            file: event.file.as_ref().map(crate::api::file_json),
        },
    };
    // Serializing owned strings and numbers into a Vec cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The Standard Webhooks `webhook-signature` value: `v1,<base64 HMAC-SHA256 over
/// "{id}.{timestamp}.{body}">` with the secret's decoded bytes.
pub fn signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The wait before the attempt after `attempts` failed ones: `initial` doubled per failure
/// up to `max`, then scaled by `jitter` (0.0 to 1.0, random) into its upper half, so
/// replicas retrying many events do not all come back at once.
pub fn backoff(attempts: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(32);
    let base = initial
        .saturating_mul(1u32 << doublings.min(31))
        .min(max)
        .max(Duration::from_millis(1));
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_name_their_session_and_sequence() {
        let id = event_id("6f1c-4a", 12);
        assert_eq!(id, "evt_6f1c-4a_12");
        assert_eq!(parse_event_id(&id), Some(("6f1c-4a", 12)));
        assert_eq!(parse_event_id("evt__3"), None);
        assert_eq!(parse_event_id("evt_a_0"), None);
        assert_eq!(parse_event_id("evt_a_x"), None);
        assert_eq!(parse_event_id("a_1"), None);
    }

    #[test]
    fn delivery_state_round_trips() {
        let d = Delivery {
            attempts: 3,
            last_attempt_ms: Some(1_700_000_000_123),
            last_status: Some(503),
            delivered_to: vec!["aa".into(), "bb".into()],
            window_start_ms: 1_700_000_000_000,
        };
        assert_eq!(Delivery::decode(&d.encode(), 0), d);
        let fresh = Delivery::decode("", 42);
        assert_eq!(fresh.window_start_ms, 42);
        assert_eq!(fresh.attempts, 0);
        assert!(fresh.delivered_to.is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_within_its_jitter() {
        let (i, m) = (Duration::from_secs(5), Duration::from_secs(3600));
        assert_eq!(backoff(1, i, m, 1.0), Duration::from_secs(5));
        assert_eq!(backoff(2, i, m, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(3, i, m, 0.0), Duration::from_secs(10));
        assert_eq!(backoff(20, i, m, 1.0), m);
        assert_eq!(backoff(u32::MAX, i, m, 1.0), m);
    }

    #[test]
    fn the_signature_is_standard_webhooks() {
        // The example of the Standard Webhooks specification's reference tests.
        let secret = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("secret");
        let sig = signature(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
