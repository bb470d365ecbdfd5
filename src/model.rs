//! The records the gateway keeps about sessions, files and parts, and the rules that
//! derive one from another (part sizes, part counts, timestamps).
//!
//! Records are what the session stores persist; the JSON views the API returns are built
//! from them in [`crate::api`]. Times are whole seconds since the Unix epoch (UTC): the
//! contract renders them as RFC 3339 without fractions, and second granularity keeps every
//! replica's view of `expiresAt` identical.

use serde::{Deserialize, Serialize};

/// 1 MiB.
pub const MIB: u64 = 1024 * 1024;

/// S3 refuses a multipart upload with more than this many parts.
pub const MAX_PARTS: u64 = 10_000;

/// Lifecycle of a session. `Expired` is set by the first request (or the reaper) that sees
/// the session past `expiresAt`; `Finalized` and `Aborted` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SessionStatus {
    /// Accepting files and parts.
    Active,
    /// Every file completed and checked; no more mutations.
    Finalized,
    /// Deleted by the client; everything it stored is removed from storage (at once, or by
    /// the reaper's retries).
    Aborted,
    /// Past `expiresAt`.
    Expired,
}

impl SessionStatus {
    /// The wire name (`active`, ...), also used as the stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Finalized => "finalized",
            SessionStatus::Aborted => "aborted",
            SessionStatus::Expired => "expired",
        }
    }

    /// Parses the stored value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => SessionStatus::Active,
            "finalized" => SessionStatus::Finalized,
            "aborted" => SessionStatus::Aborted,
            "expired" => SessionStatus::Expired,
            _ => return None,
        })
    }
}

/// Lifecycle of a file. `Completing` is internal (a caller holds the completion lease) and is
/// shown to clients as `registered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FileStatus {
    /// Registered, parts may be uploaded.
    Registered,
    /// One caller is completing the storage upload (holds the lease).
    Completing,
    /// The storage object exists; `fileUrl` and `etag` are set.
    Completed,
    /// Deleted by the client (or its session was); its key and count slot are free, and its
    /// upload or object is removed from storage (at once, or by the reaper's retries).
    Aborted,
}

impl FileStatus {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::Registered => "registered",
            FileStatus::Completing => "completing",
            FileStatus::Completed => "completed",
            FileStatus::Aborted => "aborted",
        }
    }

    /// The value clients see (`completing` is shown as `registered`).
    pub fn public_str(self) -> &'static str {
        match self {
            FileStatus::Completing => "registered",
            other => other.as_str(),
        }
    }

    /// Parses the stored value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "registered" => FileStatus::Registered,
            "completing" => FileStatus::Completing,
            "completed" => FileStatus::Completed,
            "aborted" => FileStatus::Aborted,
            _ => return None,
        })
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Unguessable id (UUID v4).
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Current status.
    pub status: SessionStatus,
    /// Base part size for files of this session.
    pub part_size_bytes: u64,
    /// The client's `maxFiles`, if it gave one.
    pub max_files: Option<u32>,
    /// The limit actually enforced: `min(maxFiles, tenant cap)`.
    pub file_limit: u32,
    /// Files currently holding a slot (registered, completing or completed; not aborted).
    pub file_count: u32,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Seconds since the epoch.
    pub expires_at: i64,
    /// Client metadata (a JSON object), stored as given.
    pub metadata: serde_json::Value,
    /// The end user (a JWT's `sub`) the session belongs to; `None` for a session created
    /// with the tenant's API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The largest file the session takes, when the end-user token that created it set
    /// one under the tenant's (`upgate.maxFileSizeBytes`); every credential meets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_size_bytes: Option<u64>,
    /// The content types the session's files may declare (lower case, `type/*` patterns),
    /// when the end-user token that created it set them (`upgate.allowedContentTypes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_content_types: Option<Vec<String>>,
    /// Set when the tenant had webhooks at the session's creation: the session's changes
    /// are recorded as events ([`crate::events`]), and its outbox is kept this long (ms)
    /// after its last event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_keep_ms: Option<i64>,
}

impl SessionRecord {
    /// True once `now_ms` has reached `expires_at`.
    pub fn is_past_expiry(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_at.saturating_mul(1000)
    }
}

/// A file as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Unguessable id (UUID v4).
    pub id: String,
    /// Session it belongs to.
    pub session_id: String,
    /// Key under the session's storage prefix; unique among the session's live files.
    pub file_key: String,
    /// Client's file name.
    pub file_name: String,
    /// Declared size.
    pub size_bytes: u64,
    /// Declared content type (advisory until finalize).
    pub content_type: Option<String>,
    /// Current status.
    pub status: FileStatus,
    /// Part size of this file (see [`part_size_for`]).
    pub part_size_bytes: u64,
    /// Number of parts (see [`part_count`]).
    pub part_count: u32,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Object key in storage (tenant prefix / session / fileKey).
    pub object_key: String,
    /// Storage multipart upload id, created lazily by the first byte-path request.
    pub upload_id: Option<String>,
    /// Set once completed.
    pub file_url: Option<String>,
    /// Set once completed (unquoted).
    pub etag: Option<String>,
    /// The client's metadata (string values), empty when it sent none.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// A tus upload's form ([`crate::uploads::tus::Form`]): the marker its upload id has
    /// between the session and file ids, and for a final upload the ids of the partial
    /// uploads it was made of, space-separated. `None` for a file registered through the
    /// REST API. Not part of the file resource.
    pub tus_form: Option<String>,
}

/// One uploaded part as recorded by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartRecord {
    /// 1-based.
    pub part_number: u32,
    /// Unquoted ETag from storage.
    pub etag: String,
    /// Bytes in the part.
    pub size_bytes: u64,
}

/// The part size of a file: the session's part size, raised to the smallest whole MiB that
/// keeps the file within [`MAX_PARTS`] parts.
pub fn part_size_for(session_part_size: u64, size_bytes: u64) -> u64 {
    let needed = size_bytes.div_ceil(MAX_PARTS);
    if needed <= session_part_size {
        session_part_size
    } else {
        needed.div_ceil(MIB) * MIB
    }
}

/// Number of parts of a file; a zero-byte file has one empty part.
pub fn part_count(size_bytes: u64, part_size: u64) -> u32 {
    if size_bytes == 0 {
        return 1;
    }
    // part_size_for keeps this within MAX_PARTS, so it fits in u32.
    u32::try_from(size_bytes.div_ceil(part_size)).unwrap_or(u32::MAX)
}

/// The exact length part `part_number` (1-based) must have: parts 1..n-1 are full, the last
/// is the remainder. `None` when the part number is out of range.
pub fn expected_part_len(size_bytes: u64, part_size: u64, part_number: u32) -> Option<u64> {
    let count = part_count(size_bytes, part_size);
    if part_number == 0 || part_number > count {
        return None;
    }
    if part_number < count {
        Some(part_size)
    } else {
        Some(size_bytes - part_size * u64::from(count - 1))
    }
}

/// Renders seconds since the epoch as RFC 3339 UTC without fractions (every response
/// carries two or three of these: plain `write!` instead of interpreting a format
/// description on each call).
pub fn rfc3339(secs: i64) -> String {
    use std::fmt::Write as _;
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = String::with_capacity(20);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    out
}

/// Renders milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let mut out = rfc3339(ms.div_euclid(1000));
    out.pop();
    out.push_str(&format!(".{:03}Z", ms.rem_euclid(1000)));
    out
}

/// Milliseconds since the epoch, from the system clock.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn part_size_stays_at_session_size_for_small_files() {
        assert_eq!(part_size_for(5 * MIB, 64 * MIB), 5 * MIB);
        assert_eq!(part_count(64 * MIB, 5 * MIB), 13);
        assert_eq!(expected_part_len(64 * MIB, 5 * MIB, 13), Some(4 * MIB));
        assert_eq!(expected_part_len(64 * MIB, 5 * MIB, 14), None);
        assert_eq!(expected_part_len(64 * MIB, 5 * MIB, 0), None);
    }

    #[test]
    fn zero_byte_file_has_one_empty_part() {
        assert_eq!(part_count(0, 5 * MIB), 1);
        assert_eq!(expected_part_len(0, 5 * MIB, 1), Some(0));
    }

    #[test]
    fn huge_file_raises_part_size_to_whole_mib() {
        // 5 TiB / 10,000 parts = 549,755,814 bytes → 525 MiB (524.29 rounded up).
        let five_tib = 5 * 1024 * 1024 * MIB;
        let ps = part_size_for(5 * MIB, five_tib);
        assert_eq!(ps, 525 * MIB);
        assert!(part_count(five_tib, ps) <= 10_000);
    }

    #[test]
    fn rfc3339_has_no_fraction() {
        assert_eq!(rfc3339(1_795_797_480), "2026-11-27T16:38:00Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    proptest! {
        #[test]
        fn rfc3339_matches_the_time_crates_formatter(secs in 0i64..253_402_300_799) {
            let f = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
            );
            let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
            prop_assert_eq!(rfc3339(secs), t.format(&f).unwrap());
            let parsed = time::OffsetDateTime::parse(
                &rfc3339(secs),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            prop_assert_eq!(parsed.unix_timestamp(), secs);
        }

        #[test]
        fn parts_cover_the_file_exactly(size in 0u64..(6 * 1024 * 1024 * MIB), base_mib in 5u64..=100) {
            let ps = part_size_for(base_mib * MIB, size);
            prop_assert!(ps >= base_mib * MIB);
            prop_assert_eq!(ps % MIB, 0);
            let n = part_count(size, ps);
            prop_assert!(u64::from(n) <= MAX_PARTS);
            let total: u64 = (1..=n).map(|p| expected_part_len(size, ps, p).unwrap_or(u64::MAX)).sum();
            prop_assert_eq!(total, size);
            // Smallest whole MiB: one MiB less would need more than MAX_PARTS parts.
            if ps > base_mib * MIB {
                prop_assert!(size.div_ceil(ps - MIB) > MAX_PARTS);
            }
        }
    }
}
