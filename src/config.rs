//! Typed configuration: a TOML file, environment overrides, validated once.
//!
//! [`figment`] layers the file and the fixed environment names of `../shared/API.md`; serde
//! reads the result into raw structs whose every setting is a [`Setting`], so a value of the
//! wrong type does not stop the reading. Every bad, out-of-range or unknown setting is then
//! collected and reported together in one [`ConfigError`], and the gateway refuses to start
//! until all are fixed. With no file at all the embedded default runs: in-memory session
//! store, `./data` filesystem storage, `127.0.0.1:8080`, and the development tenant
//! documented in the README (refused when `environment = "production"`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

use crate::storage::attributes::{Disposition, ObjectSettings, Sse};

/// The development tenant's id (embedded default only).
pub const DEV_TENANT_ID: &str = "dev";
/// The development tenant's API key (embedded default only; refused in production).
pub const DEV_API_KEY: &str = "upgate-dev-key";
/// API keys published in this repository's sample configurations (`config/`): anyone can
/// read them, so a production configuration that accepts one is refused.
pub const SAMPLE_API_KEYS: &[&str] = &[
    DEV_API_KEY,
    "acme-dev-key",
    "acme-prod-key-1",
    "acme-prod-key-2",
    "globex-key",
];

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(u) => f.debug_tuple("Single").field(&redacted(u)).finish(),
            RedisTarget::Cluster(urls) => f
                .debug_tuple("Cluster")
                .field(&urls.iter().map(|u| redacted(u)).collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// `environment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Anything goes (bypass allowed with a warning, dev tenant allowed).
    Development,
    /// Refuses `RATE_LIMIT_BYPASS` and the development tenant.
    Production,
}

/// `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object a line.
    Json,
}

/// `url` with any password replaced by `***`, for messages and logs.
///
/// ```
/// assert_eq!(upgate::config::redacted("rediss://app:s3cret@redis:6380"), "rediss://app:***@redis:6380");
/// assert_eq!(upgate::config::redacted("redis://:s3cret@redis"), "redis://:***@redis");
/// assert_eq!(upgate::config::redacted("redis://redis:6379"), "redis://redis:6379");
/// ```
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".to_owned();
    };
    // The userinfo ends at the last `@` before the host (a password may contain `@`).
    let host_start = rest.find('/').unwrap_or(rest.len());
    match rest[..host_start].rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            }
        }
        None => url.to_owned(),
    }
}

/// Where session state lives. Its `Debug` hides passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis_url`.
    Single(String),
    /// `redis_cluster_urls`.
    Cluster(Vec<String>),
}

/// Where bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageTarget {
    /// `file://<dir>`.
    Filesystem(PathBuf),
    /// `s3://<bucket>/<prefix>`.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without leading or trailing `/` (may be empty).
        prefix: String,
    },
}

/// `[s3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Custom endpoint (absent: AWS).
    pub endpoint: Option<String>,
    /// Region.
    pub region: String,
    /// Path-style addressing.
    pub force_path_style: bool,
}

/// `session_ttl_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlBounds {
    /// Used when the client gives none.
    pub default: u64,
    /// Smallest a client may ask for.
    pub min: u64,
    /// Largest a client may ask for.
    pub max: u64,
}

/// `rate_limit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitConfig {
    /// Sustained rate.
    pub requests_per_second: u32,
    /// Bucket size.
    pub burst: u32,
}

/// One `[[tenants]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    /// `[A-Za-z0-9_-]{1,64}`.
    pub id: String,
    /// Lower-case hex SHA-256 digests of the tenant's API keys.
    pub api_keys_sha256: Vec<String>,
    /// Cap on `maxFiles`.
    pub max_files_per_session: u32,
    /// Cap on a file's `sizeBytes`.
    pub max_file_size_bytes: u64,
    /// Session TTL bounds.
    pub session_ttl_seconds: TtlBounds,
    /// Request rate.
    pub rate_limit: RateLimitConfig,
    /// Prefix of the tenant's object keys, ends with `/`.
    pub storage_prefix: String,
    /// Part uploads in flight at once per tenant and replica (extra key, default 64).
    pub max_concurrent_uploads: u64,
    /// Browser origins allowed by CORS (extra key, default none).
    pub cors_allowed_origins: Vec<String>,
    /// Largest `metadata` of a session, as serialized JSON (`max_metadata_bytes`: the
    /// tenant's, else the top-level setting, default 16 KiB).
    pub max_metadata_bytes: u64,
    /// Live (not expired, finalized or deleted) sessions the tenant may hold at once
    /// (`max_active_sessions`, default 10,000).
    pub max_active_sessions: u64,
    /// The tenant's own storage (`storage`, `storage_endpoint`, `storage_region`); `None`:
    /// the gateway's.
    pub storage: Option<TenantStorageConfig>,
    /// `content_disposition`, `sse` (+ `sse_kms_key_id`) and `storage_class` of the
    /// objects the tenant completes.
    pub objects: ObjectSettings,
    /// `[tenants.jwt]`: end-user tokens the tenant signs (`None`: the tenant has none).
    pub jwt: Option<JwtConfig>,
    /// `end_user_rate_limit`: the request rate of one end user (`tenant:sub`), on top of
    /// the tenant's; default a tenth of `rate_limit` (at least 1).
    pub end_user_rate_limit: RateLimitConfig,
    /// `[[tenants.webhooks]]`: where the tenant's events are delivered ([`crate::events`]).
    pub webhooks: Vec<WebhookConfig>,
}

/// One `[[tenants.webhooks]]` endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// `url`: `https://` (or `http://` with `environment = "development"`).
    pub url: String,
    /// The decoded bytes of `secret` (`whsec_<base64>`), the HMAC key.
    pub secret: Secrets,
    /// `events`: the event types delivered here (`None`: all).
    pub events: Option<Vec<crate::events::EventType>>,
}

impl WebhookConfig {
    /// A short stable name of the endpoint (from its URL): an event remembers which
    /// endpoints took it by these.
    pub fn endpoint_id(&self) -> String {
        use sha2::Digest as _;
        hex::encode(&sha2::Sha256::digest(self.url.as_bytes())[..6])
    }

    /// Whether events of type `t` go to this endpoint.
    pub fn wants(&self, t: crate::events::EventType) -> bool {
        self.events.as_ref().is_none_or(|list| list.contains(&t))
    }
}

/// How webhook deliveries are retried (top-level `webhook_*` settings).
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRetry {
    /// `webhook_retry_initial_seconds` (default 5): the wait after the first failure.
    pub initial: Duration,
    /// `webhook_retry_max_interval_seconds` (default 3600): the longest wait.
    pub max_interval: Duration,
    /// `webhook_retry_hours` (default 24), or `webhook_retry_window_seconds` when set: how
    /// long an event is retried before it is dead-lettered.
    pub window: Duration,
    /// `webhook_dead_letter_days` (default 7): how long dead-lettered and undelivered
    /// events are kept (the outbox's retention is the window plus this).
    pub dead_letter: Duration,
    /// `webhook_recheck_seconds` (default 30): how often a replica looks for events another
    /// replica recorded and did not deliver (it died, or its wake-up was lost).
    pub recheck: Duration,
}

impl WebhookRetry {
    /// How long a session's outbox outlives its last event.
    pub fn outbox_keep(&self) -> Duration {
        self.window + self.dead_letter
    }
}

/// The JWT algorithms a tenant may allow (`algorithms`).
pub const JWT_ALGORITHMS: &[(&str, jsonwebtoken::Algorithm)] = &[
    ("EdDSA", jsonwebtoken::Algorithm::EdDSA),
    ("ES256", jsonwebtoken::Algorithm::ES256),
    ("ES384", jsonwebtoken::Algorithm::ES384),
    ("RS256", jsonwebtoken::Algorithm::RS256),
    ("PS256", jsonwebtoken::Algorithm::PS256),
    ("HS256", jsonwebtoken::Algorithm::HS256),
];

/// `[tenants.jwt]`: how the tenant's end-user tokens are verified ([`crate::jwt`]).
#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    /// The `iss` of the tenant's tokens; unique across tenants.
    pub issuer: String,
    /// The `aud` a token must name, when set.
    pub audience: Option<String>,
    /// The algorithms a token may be signed with.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// `keys_file`, as configured (for messages).
    pub keys_file: PathBuf,
    /// The keys of the JWK Set in `keys_file`, read at start; each one builds a
    /// verification key and fits at least one of `algorithms`.
    pub keys: Vec<jsonwebtoken::jwk::Jwk>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway_seconds: u64,
}

/// A tenant's own `storage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStorageConfig {
    /// `storage`: `s3://bucket/prefix` (or `file://dir`).
    pub target: StorageTarget,
    /// `storage_endpoint`: the S3 endpoint when it is not the gateway's `[s3] endpoint`.
    pub endpoint: Option<String>,
    /// `storage_region`: the region when it is not the gateway's `[s3] region`.
    pub region: Option<String>,
}

impl StorageTarget {
    /// The storage's URL, with the S3 endpoint and region when given: names one storage
    /// in logs and tells two apart (two tenants with equal labels share one client).
    pub fn label(&self, endpoint: Option<&str>, region: Option<&str>) -> String {
        match self {
            StorageTarget::Filesystem(dir) => format!("file://{}", dir.display()),
            StorageTarget::S3 { bucket, prefix } => {
                let mut label = format!("s3://{bucket}/{prefix}");
                if let Some(e) = endpoint {
                    label.push_str(&format!(" at {e}"));
                }
                if let Some(r) = region {
                    label.push_str(&format!(" in {r}"));
                }
                label
            }
        }
    }
}

impl Config {
    /// The label of the gateway's own storage (see [`StorageTarget::label`]).
    pub fn storage_label(&self) -> String {
        self.storage
            .label(self.s3.endpoint.as_deref(), Some(&self.s3.region))
    }

    /// Where `tenant`'s objects go: its own storage, endpoint and region, each falling back
    /// to the gateway's (`storage`, `[s3] endpoint`, `[s3] region`).
    pub fn tenant_storage<'a>(
        &'a self,
        tenant: &'a TenantConfig,
    ) -> (&'a StorageTarget, Option<&'a str>, &'a str) {
        match &tenant.storage {
            None => (&self.storage, self.s3.endpoint.as_deref(), &self.s3.region),
            Some(own) => (
                &own.target,
                own.endpoint.as_deref().or(self.s3.endpoint.as_deref()),
                own.region.as_deref().unwrap_or(&self.s3.region),
            ),
        }
    }

    /// The label of `tenant`'s storage: its own, else the gateway's.
    pub fn tenant_storage_label(&self, tenant: &TenantConfig) -> String {
        let (target, endpoint, region) = self.tenant_storage(tenant);
        target.label(endpoint, Some(region))
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `environment` / `UPGATE_ENV`.
    pub environment: Environment,
    /// `listen` / `UPGATE_LISTEN`.
    pub listen: SocketAddr,
    /// `admin_listen` / `UPGATE_ADMIN_LISTEN`.
    pub admin_listen: SocketAddr,
    /// `redis_url` / `redis_cluster_urls` / `UPGATE_REDIS_URL`; `None`: in-memory store.
    /// `rediss://` URLs connect over TLS (rustls), `user:password@` authenticates with a
    /// Redis ACL user.
    pub redis: Option<RedisTarget>,
    /// `redis_ca_file`: the PEM certificates that verify a `rediss://` server, instead of
    /// the system's roots.
    pub redis_ca: Option<Vec<u8>>,
    /// `storage` / `UPGATE_STORAGE`.
    pub storage: StorageTarget,
    /// `[s3]` (`UPGATE_S3_ENDPOINT`).
    pub s3: S3Config,
    /// `part_size_mb` / `MULTIPART_PART_SIZE_MB`, 5..=100.
    pub part_size_mb: u64,
    /// `idempotency_ttl_seconds`.
    pub idempotency_ttl: Duration,
    /// `reaper_interval_seconds`.
    pub reaper_interval: Duration,
    /// `log_format` / `UPGATE_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `RATE_LIMIT_BYPASS` (or `rate_limit_bypass`).
    pub rate_limit_bypass: bool,
    /// How long after `expiresAt` a session is still remembered (answers 410, extra key
    /// `session_retention_seconds`, default 86400).
    pub session_retention: Duration,
    /// Largest JSON request body (extra key `max_json_body_bytes`, default 65536).
    pub max_json_body_bytes: usize,
    /// Whole-request timeout for control-plane requests (extra key `request_timeout_seconds`, default 30).
    pub request_timeout: Duration,
    /// A part upload whose body sends nothing for this long is cut off (extra key
    /// `part_idle_timeout_seconds`, default 30).
    pub part_idle_timeout: Duration,
    /// In-flight requests get this long to finish on SIGTERM (extra key `shutdown_grace_seconds`, default 30).
    pub shutdown_grace: Duration,
    /// Connections served at once; one more is answered 503 `unavailable` with `Retry-After`
    /// and closed (extra key `max_connections`, default 10000).
    pub max_connections: usize,
    /// A connection must have its first request under way, and every request head must
    /// arrive, within this (`header_read_timeout_seconds`, default 10): slowloris protection.
    pub header_read_timeout: Duration,
    /// A connection without a request in flight is closed this long after its last response
    /// (`idle_timeout_seconds`, default 60). On HTTP/1 hyper's header timeout also runs while
    /// a keep-alive connection waits for its next request: the smaller of the two applies.
    pub idle_timeout: Duration,
    /// Bound on every Redis call (extra key `redis_timeout_ms`, default 2000).
    pub redis_timeout: Duration,
    /// `upload_token_secrets`: the keys upload tokens are signed with (the first signs,
    /// all verify); empty: a key the session store holds ([`crate::tokens`]).
    pub upload_token_secrets: Secrets,
    /// The tenants.
    pub tenants: Vec<TenantConfig>,
    /// Webhook retry settings.
    pub webhook_retry: WebhookRetry,
}

/// Secret byte strings whose `Debug` shows only how many there are.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secrets(pub Vec<Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

impl Config {
    /// Part size in bytes.
    pub fn part_size_bytes(&self) -> u64 {
        self.part_size_mb * crate::model::MIB
    }

    /// The embedded default (no file, no environment).
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::from_toml("", |_| None, true)
    }

    /// Reads the configuration the way the binary does: `path` (if any) then the process
    /// environment. With no path, the embedded default plus environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env = |k: &str| std::env::var(k).ok();
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError::one(format!("cannot read config file {}: {e}", p.display()))
                })?;
                Config::from_toml(&text, env, false)
            }
            None => Config::from_toml("", env, true),
        }
    }

    /// Parses TOML text with `env` as the environment. `embedded` adds the development
    /// tenant when the text defines no tenants (the no-file default).
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        embedded: bool,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = Figment::new()
            .merge(Toml::string(text))
            .merge(EnvOverrides::read(&env))
            .extract()
            .map_err(|e| ConfigError::one(format!("config file is not valid TOML: {}", e.kind)))?;
        let mut check = Check::default();
        let config = check.config(raw, embedded);
        if check.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: check.problems,
            })
        }
    }

    /// The SHA-256 hex digest of an API key, as stored in `api_keys_sha256`.
    pub fn hash_key(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(msg: String) -> Self {
        ConfigError {
            problems: vec![msg],
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// Environment overrides
// ---------------------------------------------------------------------------------------

/// How an environment variable's text becomes a setting.
#[derive(Clone, Copy)]
enum EnvKind {
    Text,
    Number,
    Flag,
}

/// The fixed environment names of the contract (plus `AWS_REGION`), the setting each
/// overrides, and how its text is read.
const ENV_OVERRIDES: &[(&str, &str, EnvKind)] = &[
    ("UPGATE_ENV", "environment", EnvKind::Text),
    ("UPGATE_LISTEN", "listen", EnvKind::Text),
    ("UPGATE_ADMIN_LISTEN", "admin_listen", EnvKind::Text),
    ("UPGATE_REDIS_URL", "redis_url", EnvKind::Text),
    ("UPGATE_STORAGE", "storage", EnvKind::Text),
    ("UPGATE_LOG_FORMAT", "log_format", EnvKind::Text),
    ("RATE_LIMIT_BYPASS", "rate_limit_bypass", EnvKind::Flag),
    ("MULTIPART_PART_SIZE_MB", "part_size_mb", EnvKind::Number),
    ("UPGATE_S3_ENDPOINT", "s3.endpoint", EnvKind::Text),
    ("AWS_REGION", "s3.region", EnvKind::Text),
];

/// The name a problem with `key` is reported under: the key, and the variable that can
/// override it.
fn display_name(key: &str) -> String {
    match ENV_OVERRIDES.iter().find(|(_, k, _)| *k == key) {
        Some((var, _, _)) => format!("{key} ({var})"),
        None => key.to_owned(),
    }
}

/// A figment provider of the environment overrides, read through a lookup function (the
/// process environment in the binary, a closure in tests).
struct EnvOverrides(Dict);

impl EnvOverrides {
    fn read(env: &dyn Fn(&str) -> Option<String>) -> Self {
        let mut root = Dict::new();
        for &(var, key, kind) in ENV_OVERRIDES {
            let Some(raw) = env(var) else { continue };
            let value = match kind {
                EnvKind::Text => Value::from(raw),
                // A number that does not parse stays text, and is reported as a wrong type.
                EnvKind::Number => match (raw.trim().parse::<i64>(), raw.trim().parse::<u64>()) {
                    (Ok(n), _) => Value::from(n),
                    (_, Ok(n)) => Value::from(n),
                    _ => Value::from(raw),
                },
                EnvKind::Flag => match raw.trim().to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "on" => Value::from(true),
                    "0" | "false" | "no" | "off" | "" => Value::from(false),
                    _ => Value::from(raw),
                },
            };
            match key.split_once('.') {
                None => {
                    root.insert(key.to_owned(), value);
                }
                Some((table, leaf)) => {
                    let entry = root
                        .entry(table.to_owned())
                        .or_insert_with(|| Value::from(Dict::new()));
                    if let Value::Dict(_, dict) = entry {
                        dict.insert(leaf.to_owned(), value);
                    }
                }
            }
        }
        EnvOverrides(root)
    }
}

impl Provider for EnvOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.0.clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Raw settings
// ---------------------------------------------------------------------------------------

/// One setting as read: absent, a value of the right type, or the reason it is not.
/// Reading never fails on a setting, so every problem can be reported together.
#[derive(Debug, Default)]
enum Setting<T> {
    #[default]
    Unset,
    Set(T),
    Bad(String),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = <Value as Deserialize>::deserialize(d)?;
        Ok(match value.deserialize::<T>() {
            Ok(v) => Setting::Set(v),
            Err(e) => Setting::Bad(e.kind.to_string()),
        })
    }
}

/// A whole number in `MIN..=MAX`, `DEFAULT` when the setting is absent.
#[derive(Debug, Clone, Copy)]
struct Int<const MIN: u64, const MAX: u64, const DEFAULT: u64>(u64);

impl<const MIN: u64, const MAX: u64, const DEFAULT: u64> Default for Int<MIN, MAX, DEFAULT> {
    fn default() -> Self {
        Int(DEFAULT)
    }
}

impl<'de, const MIN: u64, const MAX: u64, const DEFAULT: u64> Deserialize<'de>
    for Int<MIN, MAX, DEFAULT>
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if (MIN..=MAX).contains(&n) {
            Ok(Int(n))
        } else {
            Err(serde::de::Error::custom(format!(
                "{n} is outside the allowed range {MIN}..={MAX}"
            )))
        }
    }
}

/// `max_metadata_bytes`: 2 (`{}`) to 1 MiB, default 16 KiB.
type MetadataBytes = Int<2, { 1024 * 1024 }, { 16 * 1024 }>;

/// Seconds in `MIN..=MAX`, `DEFAULT` when absent.
type Secs<const MIN: u64, const MAX: u64, const DEFAULT: u64> = Int<MIN, MAX, DEFAULT>;

const DAY: u64 = 86_400;

/// Keys of a table that no setting claimed.
type Unknown = BTreeMap<String, IgnoredAny>;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    environment: Setting<Environment>,
    listen: Setting<String>,
    admin_listen: Setting<String>,
    redis_url: Setting<String>,
    redis_cluster_urls: Setting<Vec<String>>,
    redis_ca_file: Setting<String>,
    storage: Setting<String>,
    part_size_mb: Setting<Int<5, 100, 5>>,
    idempotency_ttl_seconds: Setting<Secs<1, { 30 * DAY }, DAY>>,
    reaper_interval_seconds: Setting<Secs<1, DAY, 30>>,
    log_format: Setting<LogFormat>,
    rate_limit_bypass: Setting<bool>,
    session_retention_seconds: Setting<Secs<60, { 30 * DAY }, DAY>>,
    max_json_body_bytes: Setting<Int<1_024, { 16 * 1024 * 1024 }, 65_536>>,
    request_timeout_seconds: Setting<Secs<1, 3_600, 30>>,
    part_idle_timeout_seconds: Setting<Secs<1, 3_600, 30>>,
    shutdown_grace_seconds: Setting<Secs<0, 3_600, 30>>,
    max_connections: Setting<Int<1, 1_000_000, 10_000>>,
    redis_timeout_ms: Setting<Int<10, 60_000, 2_000>>,
    upload_token_secrets: Setting<Vec<String>>,
    header_read_timeout_seconds: Setting<Secs<1, 600, 10>>,
    idle_timeout_seconds: Setting<Secs<1, 3_600, 60>>,
    max_metadata_bytes: Setting<MetadataBytes>,
    webhook_retry_initial_seconds: Setting<Secs<1, DAY, 5>>,
    webhook_retry_max_interval_seconds: Setting<Secs<1, DAY, 3_600>>,
    webhook_retry_hours: Setting<Int<1, 720, 24>>,
    webhook_retry_window_seconds: Setting<Secs<1, { 30 * DAY }, DAY>>,
    webhook_dead_letter_days: Setting<Int<1, 90, 7>>,
    webhook_recheck_seconds: Setting<Secs<1, 3_600, 30>>,
    s3: Setting<RawS3>,
    tenants: Setting<Vec<Setting<RawTenant>>>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawS3 {
    endpoint: Setting<String>,
    region: Setting<String>,
    force_path_style: Setting<bool>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTenant {
    id: Setting<String>,
    api_keys_sha256: Setting<Vec<String>>,
    max_files_per_session: Setting<Int<1, 1_000_000, 1_000>>,
    max_file_size_bytes: Setting<Int<0, { u64::MAX }, 5_497_558_138_880>>,
    session_ttl_seconds: Setting<RawTtl>,
    rate_limit: Setting<RawRateLimit>,
    storage_prefix: Setting<String>,
    max_concurrent_uploads: Setting<Int<1, 100_000, 64>>,
    cors_allowed_origins: Setting<Vec<String>>,
    max_metadata_bytes: Setting<MetadataBytes>,
    max_active_sessions: Setting<Int<1, 10_000_000, 10_000>>,
    storage: Setting<String>,
    storage_endpoint: Setting<String>,
    storage_region: Setting<String>,
    content_disposition: Setting<String>,
    sse: Setting<String>,
    sse_kms_key_id: Setting<String>,
    storage_class: Setting<String>,
    jwt: Setting<RawJwt>,
    end_user_rate_limit: Setting<RawRateLimit>,
    webhooks: Setting<Vec<Setting<RawWebhook>>>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawWebhook {
    url: Setting<String>,
    secret: Setting<String>,
    events: Setting<Vec<String>>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawJwt {
    issuer: Setting<String>,
    audience: Setting<String>,
    algorithms: Setting<Vec<String>>,
    keys_file: Setting<String>,
    leeway_seconds: Setting<Secs<0, 600, 30>>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTtl {
    default: Setting<Secs<1, { 365 * DAY }, 1_800>>,
    min: Setting<Secs<1, { 365 * DAY }, 60>>,
    max: Setting<Secs<1, { 365 * DAY }, DAY>>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRateLimit {
    requests_per_second: Setting<Int<1, 1_000_000, 100>>,
    burst: Setting<Int<1, 10_000_000, 200>>,
    #[serde(flatten)]
    unknown: Unknown,
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// Turns raw settings into a [`Config`], collecting every problem on the way.
#[derive(Default)]
struct Check {
    problems: Vec<String>,
}

impl Check {
    fn err(&mut self, msg: String) {
        self.problems.push(msg);
    }

    /// The value, or `None` (with a problem recorded under `key` when it was bad).
    fn opt<T>(&mut self, setting: Setting<T>, key: &str) -> Option<T> {
        match setting {
            Setting::Unset => None,
            Setting::Set(v) => Some(v),
            Setting::Bad(why) => {
                self.err(format!("{}: {why}", display_name(key)));
                None
            }
        }
    }

    /// The value, or its default.
    fn get<T: Default>(&mut self, setting: Setting<T>, key: &str) -> T {
        self.opt(setting, key).unwrap_or_default()
    }

    fn int<const A: u64, const B: u64, const D: u64>(
        &mut self,
        setting: Setting<Int<A, B, D>>,
        key: &str,
    ) -> u64 {
        self.get(setting, key).0
    }

    fn secs<const A: u64, const B: u64, const D: u64>(
        &mut self,
        setting: Setting<Secs<A, B, D>>,
        key: &str,
    ) -> Duration {
        Duration::from_secs(self.int(setting, key))
    }

    fn text(&mut self, setting: Setting<String>, key: &str, default: &str) -> String {
        self.opt(setting, key).unwrap_or_else(|| default.to_owned())
    }

    fn unknown(&mut self, prefix: &str, unknown: Unknown) {
        for key in unknown.into_keys() {
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            self.err(format!("{}: unknown setting", display_name(&name)));
        }
    }

    fn addr(&mut self, setting: Setting<String>, key: &str, default: &str) -> SocketAddr {
        let raw = self.text(setting, key, default);
        raw.parse().unwrap_or_else(|_| {
            let name = display_name(key);
            self.err(format!(
                "{name}: {raw:?} is not an address like 127.0.0.1:8080"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn config(&mut self, raw: RawConfig, embedded: bool) -> Config {
        let environment = self.opt(raw.environment, "environment");
        let environment = environment.unwrap_or(Environment::Development);
        let listen = self.addr(raw.listen, "listen", "127.0.0.1:8080");
        let admin_listen = self.addr(raw.admin_listen, "admin_listen", "127.0.0.1:9090");
        let redis = self.redis(raw.redis_url, raw.redis_cluster_urls);
        let redis_ca = self.redis_ca(raw.redis_ca_file, redis.as_ref());
        let storage_raw = self.text(raw.storage, "storage", "file://./data");
        let storage = parse_storage(&storage_raw).unwrap_or_else(|e| {
            self.err(format!("{}: {e}", display_name("storage")));
            StorageTarget::Filesystem(PathBuf::from("./data"))
        });
        let log_format = self.opt(raw.log_format, "log_format");
        let rate_limit_bypass = self.get(raw.rate_limit_bypass, "rate_limit_bypass");
        let s3 = self.s3(raw.s3);
        let max_metadata_bytes = self.int(raw.max_metadata_bytes, "max_metadata_bytes");
        let config = Config {
            environment,
            listen,
            admin_listen,
            redis,
            redis_ca,
            storage,
            s3,
            part_size_mb: self.int(raw.part_size_mb, "part_size_mb"),
            idempotency_ttl: self.secs(raw.idempotency_ttl_seconds, "idempotency_ttl_seconds"),
            reaper_interval: self.secs(raw.reaper_interval_seconds, "reaper_interval_seconds"),
            log_format: log_format.unwrap_or(LogFormat::Pretty),
            rate_limit_bypass,
            session_retention: self
                .secs(raw.session_retention_seconds, "session_retention_seconds"),
            max_json_body_bytes: self.int(raw.max_json_body_bytes, "max_json_body_bytes") as usize,
            request_timeout: self.secs(raw.request_timeout_seconds, "request_timeout_seconds"),
            part_idle_timeout: self
                .secs(raw.part_idle_timeout_seconds, "part_idle_timeout_seconds"),
            shutdown_grace: self.secs(raw.shutdown_grace_seconds, "shutdown_grace_seconds"),
            max_connections: self.int(raw.max_connections, "max_connections") as usize,
            header_read_timeout: self.secs(
                raw.header_read_timeout_seconds,
                "header_read_timeout_seconds",
            ),
            idle_timeout: self.secs(raw.idle_timeout_seconds, "idle_timeout_seconds"),
            redis_timeout: Duration::from_millis(
                self.int(raw.redis_timeout_ms, "redis_timeout_ms"),
            ),
            upload_token_secrets: self.secrets(raw.upload_token_secrets),
            tenants: self.tenants(raw.tenants, embedded, environment, max_metadata_bytes),
            webhook_retry: WebhookRetry {
                initial: self.secs(
                    raw.webhook_retry_initial_seconds,
                    "webhook_retry_initial_seconds",
                ),
                max_interval: self.secs(
                    raw.webhook_retry_max_interval_seconds,
                    "webhook_retry_max_interval_seconds",
                ),
                window: match self.opt(
                    raw.webhook_retry_window_seconds,
                    "webhook_retry_window_seconds",
                ) {
                    Some(secs) => Duration::from_secs(secs.0),
                    None => Duration::from_secs(
                        3_600 * self.int(raw.webhook_retry_hours, "webhook_retry_hours"),
                    ),
                },
                dead_letter: Duration::from_secs(
                    DAY * self.int(raw.webhook_dead_letter_days, "webhook_dead_letter_days"),
                ),
                recheck: self.secs(raw.webhook_recheck_seconds, "webhook_recheck_seconds"),
            },
        };
        self.unknown("", raw.unknown);
        if config.rate_limit_bypass && environment == Environment::Production {
            self.err("RATE_LIMIT_BYPASS is enabled with environment = \"production\": refusing to run without rate limits in production".into());
        }
        let any_s3 = matches!(config.storage, StorageTarget::S3 { .. })
            || config.tenants.iter().any(|t| {
                t.storage.as_ref().is_some_and(|s| {
                    matches!(s.target, StorageTarget::S3 { .. }) && s.endpoint.is_none()
                })
            });
        if any_s3
            && config
                .s3
                .endpoint
                .as_deref()
                .is_some_and(|e| !is_http_url(e))
        {
            self.err(
                "s3.endpoint (UPGATE_S3_ENDPOINT): must be an http:// or https:// URL with a host"
                    .into(),
            );
        }
        let dev_only =
            config.tenants.len() == 1 && config.tenants[0].id == DEV_TENANT_ID && embedded;
        if dev_only && !listen.ip().is_loopback() {
            self.err(format!(
                "listen (UPGATE_LISTEN) is {listen}: the development tenant (no [[tenants]] configured, its key is published) is served only on a loopback address; configure [[tenants]] to listen on other addresses"
            ));
        }
        self.tenants_storage(&config);
        let mut issuers = std::collections::HashMap::new();
        for t in &config.tenants {
            if let Some(jwt) = &t.jwt {
                if let Some(other) = issuers.insert(jwt.issuer.as_str(), t.id.as_str()) {
                    self.err(format!(
                        "tenants {other:?} and {:?} have the same jwt.issuer {:?}: the issuer picks the tenant",
                        t.id, jwt.issuer
                    ));
                }
            }
        }
        if listen == admin_listen && listen.port() != 0 {
            self.err(format!("listen and admin_listen are both {listen}"));
        }
        for t in &config.tenants {
            for (i, hook) in t.webhooks.iter().enumerate() {
                if crate::events::deliver::is_admin_target(&hook.url, admin_listen) {
                    self.err(format!(
                        "tenant {:?} webhooks[{i}].url {:?} is the gateway's own admin listener",
                        t.id, hook.url
                    ));
                }
            }
        }
        config
    }

    fn redis(
        &mut self,
        url: Setting<String>,
        cluster: Setting<Vec<String>>,
    ) -> Option<RedisTarget> {
        // An empty UPGATE_REDIS_URL selects the in-memory store.
        let url = self.opt(url, "redis_url").filter(|u| !u.is_empty());
        let cluster = self.opt(cluster, "redis_cluster_urls");
        if cluster.as_ref().is_some_and(Vec::is_empty) {
            self.err("redis_cluster_urls: expected a non-empty list of redis:// URLs".into());
        }
        let target = match (url, cluster) {
            (Some(_), Some(_)) => {
                self.err("redis_url and redis_cluster_urls are both set: choose one".into());
                return None;
            }
            (Some(u), None) => RedisTarget::Single(u),
            (None, Some(urls)) => RedisTarget::Cluster(urls),
            (None, None) => return None,
        };
        let urls = match &target {
            RedisTarget::Single(u) => std::slice::from_ref(u),
            RedisTarget::Cluster(u) => u.as_slice(),
        };
        let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
        for u in urls {
            if !u.starts_with("redis://") && !u.starts_with("rediss://") {
                // The URL may carry a password: name its position, not its text.
                self.err(format!(
                    "redis URL {} must start with redis:// or rediss://",
                    redacted(u)
                ));
            }
        }
        if tls != 0 && tls != urls.len() {
            self.err("redis_cluster_urls: either every URL is rediss:// (TLS) or none".into());
        }
        Some(target)
    }

    /// `upload_token_secrets`: each at least 32 bytes (256 bits); never echoed in messages.
    fn secrets(&mut self, raw: Setting<Vec<String>>) -> Secrets {
        // A value of the wrong type is reported without serde's message, which would quote it.
        let raw = match raw {
            Setting::Bad(_) => {
                self.err("upload_token_secrets: must be an array of strings".into());
                Setting::Unset
            }
            other => other,
        };
        let secrets = self.opt(raw, "upload_token_secrets").unwrap_or_default();
        for (i, secret) in secrets.iter().enumerate() {
            if secret.len() < crate::tokens::KEY_LEN {
                self.err(format!(
                    "upload_token_secrets[{i}]: {} bytes; a secret needs at least {} (for example `openssl rand -hex 32`)",
                    secret.len(),
                    crate::tokens::KEY_LEN
                ));
            }
        }
        Secrets(secrets.into_iter().map(String::into_bytes).collect())
    }

    /// `redis_ca_file`: read and checked now, so a missing or empty file is a start-up error.
    fn redis_ca(&mut self, file: Setting<String>, redis: Option<&RedisTarget>) -> Option<Vec<u8>> {
        let path = self.opt(file, "redis_ca_file").filter(|p| !p.is_empty())?;
        let tls = match redis {
            Some(RedisTarget::Single(u)) => u.starts_with("rediss://"),
            Some(RedisTarget::Cluster(urls)) => urls.iter().all(|u| u.starts_with("rediss://")),
            None => false,
        };
        if !tls {
            self.err(format!(
                "redis_ca_file {path:?} is set, but Redis is not reached over TLS (rediss://)"
            ));
            return None;
        }
        match std::fs::read(&path) {
            Ok(pem) if String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") => {
                Some(pem)
            }
            Ok(_) => {
                self.err(format!(
                    "redis_ca_file {path:?}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
                ));
                None
            }
            Err(e) => {
                self.err(format!("redis_ca_file {path:?}: {e}"));
                None
            }
        }
    }

    fn s3(&mut self, raw: Setting<RawS3>) -> S3Config {
        let raw = self.get(raw, "s3");
        let endpoint = self.opt(raw.endpoint, "s3.endpoint");
        let force_path_style = self.opt(raw.force_path_style, "s3.force_path_style");
        let config = S3Config {
            endpoint: endpoint.filter(|e| !e.is_empty()),
            region: self.text(raw.region, "s3.region", "us-east-1"),
            force_path_style: force_path_style.unwrap_or(true),
        };
        self.unknown("s3", raw.unknown);
        config
    }

    fn tenants(
        &mut self,
        raw: Setting<Vec<Setting<RawTenant>>>,
        embedded: bool,
        environment: Environment,
        max_metadata_bytes: u64,
    ) -> Vec<TenantConfig> {
        let mut tenants = Vec::new();
        for (i, t) in self.get(raw, "tenants").into_iter().enumerate() {
            let name = format!("tenants[{i}]");
            if let Some(t) = self.opt(t, &name) {
                tenants.push(self.tenant(&name, t, max_metadata_bytes));
            }
        }
        if tenants.is_empty() && embedded {
            tenants.push(dev_tenant(max_metadata_bytes));
        }
        if tenants.is_empty() {
            self.err("no [[tenants]] configured: nobody could authenticate".into());
        }
        self.tenants_together(&tenants, environment);
        tenants
    }

    fn tenant(&mut self, name: &str, t: RawTenant, max_metadata_bytes: u64) -> TenantConfig {
        let field = |key: &str| format!("{name}.{key}");
        let id = self.text(t.id, &field("id"), "");
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            self.err(format!(
                "{name}.id: {id:?} must be 1-64 characters of A-Z a-z 0-9 - _"
            ));
        }
        let keys: Vec<String> = self.get(t.api_keys_sha256, &field("api_keys_sha256"));
        let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_lowercase()).collect();
        if keys.is_empty() {
            self.err(format!(
                "{name} ({id}): api_keys_sha256 is empty: the tenant has no API key"
            ));
        }
        for k in &keys {
            if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.err(format!(
                    "{name}.api_keys_sha256: {k:?} is not a 64-digit hex SHA-256"
                ));
            }
        }

        let ttl_name = field("session_ttl_seconds");
        let ttl = self.get(t.session_ttl_seconds, &ttl_name);
        let session_ttl_seconds = TtlBounds {
            default: self.int(ttl.default, &format!("{ttl_name}.default")),
            min: self.int(ttl.min, &format!("{ttl_name}.min")),
            max: self.int(ttl.max, &format!("{ttl_name}.max")),
        };
        self.unknown(&ttl_name, ttl.unknown);
        let TtlBounds { default, min, max } = session_ttl_seconds;
        if !(min <= default && default <= max) {
            self.err(format!("{ttl_name}: needs min <= default <= max"));
        }

        let rate_limit = self.rate_limit(t.rate_limit, &field("rate_limit"));
        let end_user_rate_limit = match t.end_user_rate_limit {
            Setting::Unset => RateLimitConfig {
                requests_per_second: (rate_limit.requests_per_second / 10).max(1),
                burst: (rate_limit.burst / 10).max(1),
            },
            raw => self.rate_limit(raw, &field("end_user_rate_limit")),
        };
        let jwt = self.jwt(&field("jwt"), t.jwt);
        let webhooks = self.webhooks(&field("webhooks"), t.webhooks);

        let storage_prefix = self.text(
            t.storage_prefix,
            &field("storage_prefix"),
            &format!("{id}/"),
        );
        if !storage_prefix.ends_with('/')
            || storage_prefix.starts_with('/')
            || storage_prefix.starts_with('.')
            || storage_prefix
                .split('/')
                .any(|seg| seg == ".." || seg == ".")
            || storage_prefix.len() < 2
        {
            self.err(format!(
                "{name}.storage_prefix: {storage_prefix:?} must end with '/', not start with '/' or '.', and have no . or .. segments"
            ));
        }
        let storage =
            self.tenant_storage(name, &id, t.storage, t.storage_endpoint, t.storage_region);
        let objects = self.objects(
            name,
            t.content_disposition,
            t.sse,
            t.sse_kms_key_id,
            t.storage_class,
        );
        let tenant = TenantConfig {
            storage,
            objects,
            max_files_per_session: self
                .int(t.max_files_per_session, &field("max_files_per_session"))
                as u32,
            max_file_size_bytes: self.int(t.max_file_size_bytes, &field("max_file_size_bytes")),
            max_concurrent_uploads: self
                .int(t.max_concurrent_uploads, &field("max_concurrent_uploads")),
            cors_allowed_origins: self.get(t.cors_allowed_origins, &field("cors_allowed_origins")),
            max_metadata_bytes: self
                .opt(t.max_metadata_bytes, &field("max_metadata_bytes"))
                .map_or(max_metadata_bytes, |n| n.0),
            max_active_sessions: self.int(t.max_active_sessions, &field("max_active_sessions")),
            id,
            api_keys_sha256: keys,
            session_ttl_seconds,
            rate_limit,
            storage_prefix,
            jwt,
            end_user_rate_limit,
            webhooks,
        };
        self.unknown(name, t.unknown);
        tenant
    }

    /// `[[tenants.webhooks]]`: URLs, secrets and event filters checked. Whether `http://` is
    /// allowed depends on the environment, checked with the tenants together.
    fn webhooks(
        &mut self,
        name: &str,
        raw: Setting<Vec<Setting<RawWebhook>>>,
    ) -> Vec<WebhookConfig> {
        let mut out = Vec::new();
        for (i, hook) in self.get(raw, name).into_iter().enumerate() {
            let name = format!("{name}[{i}]");
            let Some(hook) = self.opt(hook, &name) else {
                continue;
            };
            let url = self.text(hook.url, &format!("{name}.url"), "");
            if !is_http_url(&url) {
                self.err(format!(
                    "{name}.url: {url:?} must be an https:// (or, in development, http://) URL with a host"
                ));
            }
            let raw_secret = self.text(hook.secret, &format!("{name}.secret"), "");
            let secret = raw_secret
                .strip_prefix("whsec_")
                .and_then(|b| {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.decode(b).ok()
                })
                .filter(|k| (24..=64).contains(&k.len()));
            if secret.is_none() {
                self.err(format!(
                    "{name}.secret: must be whsec_ followed by the base64 of 24 to 64 random bytes"
                ));
            }
            let events = match self.opt(hook.events, &format!("{name}.events")) {
                None => None,
                Some(list) => {
                    let mut types = Vec::new();
                    for e in list {
                        match crate::events::EventType::parse(&e) {
                            Some(t) => types.push(t),
                            None => self.err(format!(
                                "{name}.events: {e:?} is not an event type (one of {})",
                                crate::events::EventType::ALL
                                    .iter()
                                    .map(|t| t.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )),
                        }
                    }
                    Some(types)
                }
            };
            self.unknown(&name, hook.unknown);
            out.push(WebhookConfig {
                url,
                secret: Secrets(secret.into_iter().collect()),
                events,
            });
        }
        out
    }

    /// A `{ requests_per_second, burst }` table named `name`.
    fn rate_limit(&mut self, raw: Setting<RawRateLimit>, name: &str) -> RateLimitConfig {
        let rl = self.get(raw, name);
        let limit = RateLimitConfig {
            requests_per_second: self.int(
                rl.requests_per_second,
                &format!("{name}.requests_per_second"),
            ) as u32,
            burst: self.int(rl.burst, &format!("{name}.burst")) as u32,
        };
        self.unknown(name, rl.unknown);
        limit
    }

    /// `[tenants.jwt]`, its JWK Set read and checked: every key builds a verification key,
    /// fits one of `algorithms` (by its `alg`, else by its type), and `kid`s are unique.
    fn jwt(&mut self, name: &str, raw: Setting<RawJwt>) -> Option<JwtConfig> {
        let raw = self.opt(raw, name)?;
        let field = |key: &str| format!("{name}.{key}");
        let issuer = self.text(raw.issuer, &field("issuer"), "");
        if issuer.is_empty() {
            self.err(format!(
                "{}: required (the iss of the tenant's tokens)",
                field("issuer")
            ));
        }
        let audience = self.opt(raw.audience, &field("audience"));
        if audience.as_deref() == Some("") {
            self.err(format!("{}: must not be empty", field("audience")));
        }
        let names: Vec<String> = self.get(raw.algorithms, &field("algorithms"));
        let mut algorithms = Vec::new();
        for n in &names {
            match JWT_ALGORITHMS.iter().find(|(a, _)| a == n) {
                Some((_, alg)) if !algorithms.contains(alg) => algorithms.push(*alg),
                Some(_) => {}
                None => self.err(format!(
                    "{}: {n:?} is not one of EdDSA, ES256, ES384, RS256, PS256, HS256",
                    field("algorithms")
                )),
            }
        }
        if names.is_empty() {
            self.err(format!(
                "{}: name at least one algorithm",
                field("algorithms")
            ));
        }
        let leeway_seconds = self.int(raw.leeway_seconds, &field("leeway_seconds"));
        let keys_file = PathBuf::from(self.text(raw.keys_file, &field("keys_file"), ""));
        self.unknown(name, raw.unknown);
        let keys = if keys_file.as_os_str().is_empty() {
            self.err(format!("{}: required (a JWK Set file)", field("keys_file")));
            Vec::new()
        } else {
            self.jwks(&field("keys_file"), &keys_file, &algorithms)
        };
        Some(JwtConfig {
            issuer,
            audience,
            algorithms,
            keys_file,
            keys,
            leeway_seconds,
        })
    }

    /// The keys of the JWK Set at `path`, each checked against `algorithms`.
    fn jwks(
        &mut self,
        name: &str,
        path: &Path,
        algorithms: &[jsonwebtoken::Algorithm],
    ) -> Vec<jsonwebtoken::jwk::Jwk> {
        let shown = path.display();
        let set: jsonwebtoken::jwk::JwkSet = match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        {
            Ok(set) => set,
            Err(e) => {
                self.err(format!("{name}: {shown:?} is not a readable JWK Set: {e}"));
                return Vec::new();
            }
        };
        if set.keys.is_empty() {
            self.err(format!("{name}: {shown:?} holds no key"));
        }
        let mut kids = std::collections::HashSet::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let which = match &jwk.common.key_id {
                Some(kid) => format!("key {kid:?}"),
                None => format!("key #{}", i + 1),
            };
            if let Some(kid) = &jwk.common.key_id {
                if !kids.insert(kid.clone()) {
                    self.err(format!("{name}: {shown:?}: two keys have the kid {kid:?}"));
                }
            } else if set.keys.len() > 1 {
                self.err(format!(
                    "{name}: {shown:?}: {which} has no kid (with several keys, kid picks one)"
                ));
            }
            if let Err(e) = jsonwebtoken::DecodingKey::from_jwk(jwk) {
                self.err(format!("{name}: {shown:?}: {which} is not usable: {e}"));
                continue;
            }
            if let jsonwebtoken::jwk::AlgorithmParameters::OctetKey(k) = &jwk.algorithm {
                // 256 bits at least for HS256 (RFC 7518 section 3.2).
                if k.value.len() < 43 {
                    self.err(format!(
                        "{name}: {shown:?}: {which} (an HS256 secret) is shorter than 32 bytes"
                    ));
                }
            }
            if crate::jwt::fitting(jwk, algorithms).is_empty() {
                self.err(format!(
                    "{name}: {shown:?}: {which} fits none of the tenant's algorithms"
                ));
            }
        }
        set.keys
    }

    /// Rules between tenants and their storage: two tenants on one storage have different
    /// prefixes; `sse` and `storage_class` need S3 storage.
    fn tenants_storage(&mut self, config: &Config) {
        // (where, full key prefix) of each tenant: no tenant's keys may start inside
        // another's on the same bucket or directory.
        let mut places: Vec<(String, String, &str)> = Vec::new();
        for t in &config.tenants {
            let label = config.tenant_storage_label(t);
            let (target, endpoint, _) = config.tenant_storage(t);
            let (place, full) = match target {
                StorageTarget::Filesystem(dir) => (
                    format!("file://{}", dir.display()),
                    t.storage_prefix.clone(),
                ),
                StorageTarget::S3 { bucket, prefix } => (
                    format!("s3://{bucket} at {}", endpoint.unwrap_or("AWS")),
                    if prefix.is_empty() {
                        t.storage_prefix.clone()
                    } else {
                        format!("{prefix}/{}", t.storage_prefix)
                    },
                ),
            };
            for (other_place, other_full, other_id) in &places {
                if *other_place == place
                    && (full.starts_with(other_full.as_str()) || other_full.starts_with(&full))
                {
                    self.err(format!(
                        "storage_prefix {:?} is shared by two tenants on {label}: the keys of {:?} and {other_id:?} would overlap",
                        t.storage_prefix, t.id
                    ));
                }
            }
            places.push((place, full, t.id.as_str()));
            let target = t.storage.as_ref().map_or(&config.storage, |s| &s.target);
            let s3 = matches!(target, StorageTarget::S3 { .. });
            if !s3 && (t.objects.sse.is_some() || t.objects.storage_class.is_some()) {
                self.err(format!(
                    "tenant {:?}: sse and storage_class apply to S3 storage only, and its storage is {label}",
                    t.id
                ));
            }
        }
    }

    /// `storage`, `storage_endpoint` and `storage_region` of a tenant.
    fn tenant_storage(
        &mut self,
        name: &str,
        id: &str,
        storage: Setting<String>,
        endpoint: Setting<String>,
        region: Setting<String>,
    ) -> Option<TenantStorageConfig> {
        let field = |key: &str| format!("{name}.{key}");
        let storage = self.opt(storage, &field("storage"));
        let endpoint = self
            .opt(endpoint, &field("storage_endpoint"))
            .filter(|e| !e.is_empty());
        let region = self
            .opt(region, &field("storage_region"))
            .filter(|r| !r.is_empty());
        let Some(raw) = storage.filter(|s| !s.is_empty()) else {
            if endpoint.is_some() || region.is_some() {
                self.err(format!(
                    "{name} ({id}): storage_endpoint and storage_region need the tenant's own storage = \"s3://bucket/prefix\""
                ));
            }
            return None;
        };
        let target = match parse_storage(&raw) {
            Ok(t) => t,
            Err(e) => {
                self.err(format!("{}: {e}", field("storage")));
                return None;
            }
        };
        if matches!(target, StorageTarget::Filesystem(_))
            && (endpoint.is_some() || region.is_some())
        {
            self.err(format!(
                "{name} ({id}): storage_endpoint and storage_region apply to s3:// storage only"
            ));
        }
        if let Some(e) = &endpoint {
            if !is_http_url(e) {
                self.err(format!(
                    "{}: {e:?} must be an http:// or https:// URL with a host",
                    field("storage_endpoint")
                ));
            }
        }
        if let Some(r) = &region {
            if r.len() > 64
                || !r
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                self.err(format!(
                    "{}: {r:?} is not a region name (lower-case letters, digits and -)",
                    field("storage_region")
                ));
            }
        }
        Some(TenantStorageConfig {
            target,
            endpoint,
            region,
        })
    }

    /// `content_disposition`, `sse`, `sse_kms_key_id` and `storage_class` of a tenant.
    fn objects(
        &mut self,
        name: &str,
        disposition: Setting<String>,
        sse: Setting<String>,
        kms_key: Setting<String>,
        storage_class: Setting<String>,
    ) -> ObjectSettings {
        let field = |key: &str| format!("{name}.{key}");
        let disposition = match self
            .opt(disposition, &field("content_disposition"))
            .as_deref()
        {
            None | Some("attachment") => Disposition::Attachment,
            Some("inline") => Disposition::Inline,
            Some(other) => {
                self.err(format!(
                    "{}: {other:?} is not \"attachment\" or \"inline\"",
                    field("content_disposition")
                ));
                Disposition::Attachment
            }
        };
        let kms_key = self
            .opt(kms_key, &field("sse_kms_key_id"))
            .filter(|k| !k.is_empty());
        if let Some(k) = &kms_key {
            // Key ids, aliases and ARNs: letters, digits and `-_/:.`.
            let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_/:.".contains(&b);
            if k.len() > 2048 || !k.bytes().all(plain) {
                self.err(format!(
                    "{}: expected a KMS key id, alias or ARN (letters, digits and - _ / : .)",
                    field("sse_kms_key_id")
                ));
            }
        }
        let sse = match self.opt(sse, &field("sse")).as_deref() {
            None | Some("") => None,
            Some("AES256") => Some(Sse::Aes256),
            Some("aws:kms") => Some(Sse::Kms {
                key_id: kms_key.clone(),
            }),
            Some(other) => {
                self.err(format!(
                    "{}: {other:?} is not \"AES256\" or \"aws:kms\"",
                    field("sse")
                ));
                None
            }
        };
        if kms_key.is_some() && !matches!(sse, Some(Sse::Kms { .. })) {
            self.err(format!(
                "{}: needs sse = \"aws:kms\"",
                field("sse_kms_key_id")
            ));
        }
        let storage_class = self
            .opt(storage_class, &field("storage_class"))
            .filter(|c| !c.is_empty());
        if let Some(class) = &storage_class {
            if !READABLE_STORAGE_CLASSES.contains(&class.as_str()) {
                self.err(format!(
                    "{}: {class:?} is not one of {} (archive classes cannot be read back for finalize's content check, and the others need special buckets)",
                    field("storage_class"),
                    READABLE_STORAGE_CLASSES.join(", ")
                ));
            }
        }
        ObjectSettings {
            disposition,
            sse,
            storage_class,
        }
    }

    /// Rules across tenants: unique ids, prefixes and keys; no development key in production.
    fn tenants_together(&mut self, tenants: &[TenantConfig], environment: Environment) {
        let mut ids = HashSet::new();
        let mut keys = HashSet::new();
        let samples: Vec<(String, &str)> = SAMPLE_API_KEYS
            .iter()
            .map(|k| (Config::hash_key(k), *k))
            .collect();
        for t in tenants {
            if !ids.insert(t.id.as_str()) {
                self.err(format!("tenant id {:?} is configured twice", t.id));
            }
            for k in &t.api_keys_sha256 {
                if !keys.insert(k.as_str()) {
                    self.err(format!(
                        "an API key digest of tenant {:?} belongs to another tenant too",
                        t.id
                    ));
                }
            }
            if environment != Environment::Production {
                continue;
            }
            for (i, hook) in t.webhooks.iter().enumerate() {
                if !hook.url.starts_with("https://") {
                    self.err(format!(
                        "tenant {:?} webhooks[{i}].url {:?}: environment = \"production\" requires https://",
                        t.id, hook.url
                    ));
                }
            }
            for (digest, key) in &samples {
                if t.api_keys_sha256.contains(digest) {
                    self.err(format!(
                        "tenant {:?} accepts the published sample API key {key:?}, which is refused with environment = \"production\"; make your own key and put its digest (`upgate hash-key <key>`) in api_keys_sha256",
                        t.id
                    ));
                }
            }
        }
    }
}

fn dev_tenant(max_metadata_bytes: u64) -> TenantConfig {
    TenantConfig {
        id: DEV_TENANT_ID.to_owned(),
        api_keys_sha256: vec![Config::hash_key(DEV_API_KEY)],
        max_files_per_session: 1_000,
        max_file_size_bytes: 5_497_558_138_880,
        session_ttl_seconds: TtlBounds {
            default: 1_800,
            min: 1,
            max: 86_400,
        },
        rate_limit: RateLimitConfig {
            requests_per_second: 100,
            burst: 200,
        },
        storage_prefix: format!("{DEV_TENANT_ID}/"),
        max_concurrent_uploads: 64,
        cors_allowed_origins: vec!["*".to_owned()],
        max_metadata_bytes,
        max_active_sessions: 10_000,
        storage: None,
        objects: ObjectSettings::default(),
        jwt: None,
        end_user_rate_limit: RateLimitConfig {
            requests_per_second: 10,
            burst: 20,
        },
        webhooks: Vec::new(),
    }
}

/// S3 storage classes a tenant may choose: the ones whose objects can be read at once from
/// an ordinary bucket (finalize reads every completed object's first bytes).
pub const READABLE_STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "REDUCED_REDUNDANCY",
];

/// `http://host...` or `https://host...`.
fn is_http_url(s: &str) -> bool {
    s.parse::<http::Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    })
}

fn parse_storage(raw: &str) -> Result<StorageTarget, String> {
    if let Some(path) = raw.strip_prefix("file://") {
        if path.is_empty() {
            return Err("file:// needs a directory, e.g. file://./data".into());
        }
        return Ok(StorageTarget::Filesystem(PathBuf::from(path)));
    }
    if let Some(rest) = raw.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!("{bucket:?} is not a valid bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|s| s == ".." || s == ".") {
            return Err("the key prefix must not contain . or .. segments".into());
        }
        return Ok(StorageTarget::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        });
    }
    Err(format!(
        "{raw:?} must be file://<dir> or s3://<bucket>/<prefix>"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn embedded_default_runs_the_dev_tenant_on_loopback() {
        let c = Config::embedded_default().expect("default");
        assert_eq!(c.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(c.redis, None);
        assert_eq!(
            c.storage,
            StorageTarget::Filesystem(PathBuf::from("./data"))
        );
        assert_eq!(c.part_size_mb, 5);
        assert_eq!(c.tenants.len(), 1);
        assert_eq!(
            c.tenants[0].api_keys_sha256,
            vec![Config::hash_key(DEV_API_KEY)]
        );
    }

    #[test]
    fn part_size_outside_range_is_refused_with_the_variable_named() {
        for bad in ["4", "101", "0", "five"] {
            let env = |k: &str| (k == "MULTIPART_PART_SIZE_MB").then(|| bad.to_owned());
            let err = Config::from_toml("", env, true).expect_err(bad);
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.contains("MULTIPART_PART_SIZE_MB")),
                "{err}"
            );
        }
        let env = |k: &str| (k == "MULTIPART_PART_SIZE_MB").then(|| "100".to_owned());
        assert_eq!(
            Config::from_toml("", env, true)
                .expect("100 ok")
                .part_size_mb,
            100
        );
    }

    #[test]
    fn production_refuses_bypass_and_dev_tenant_together_in_one_report() {
        let env = |k: &str| match k {
            "UPGATE_ENV" => Some("production".to_owned()),
            "RATE_LIMIT_BYPASS" => Some("true".to_owned()),
            _ => None,
        };
        let err = Config::from_toml("", env, true).expect_err("refused");
        assert!(
            err.problems.iter().any(|p| p.contains("RATE_LIMIT_BYPASS")),
            "{err}"
        );
        assert!(
            err.problems
                .iter()
                .any(|p| p.contains("sample API key \"upgate-dev-key\"")),
            "{err}"
        );
    }

    #[test]
    fn every_bad_setting_is_reported_together() {
        let text = r#"
            listen = "nowhere"
            part_size_mb = 3
            log_format = "xml"
            storage = "ftp://x"
            colour = "blue"
            [[tenants]]
            id = "a b"
            api_keys_sha256 = []
            session_ttl_seconds = { default = 10, min = 60, max = 100 }
        "#;
        let err = Config::from_toml(text, no_env, false).expect_err("bad");
        let joined = err.to_string();
        for needle in [
            "listen",
            "part_size_mb",
            "log_format",
            "storage",
            "colour",
            "tenants[0].id",
            "api_keys_sha256",
            "session_ttl_seconds",
        ] {
            assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
        }
        assert!(err.problems.len() >= 8, "{joined}");
    }

    #[test]
    fn a_file_without_tenants_is_refused() {
        let err =
            Config::from_toml("listen = \"127.0.0.1:1\"", no_env, false).expect_err("no tenants");
        assert!(err.to_string().contains("no [[tenants]]"));
    }

    #[test]
    fn full_example_parses() {
        let text = format!(
            r#"
            environment = "production"
            listen = "0.0.0.0:8080"
            admin_listen = "0.0.0.0:9090"
            redis_url = "redis://127.0.0.1:6379"
            storage = "s3://uploads/in/coming/"
            part_size_mb = 8
            [s3]
            endpoint = "http://127.0.0.1:9000"
            region = "eu-west-1"
            force_path_style = true
            [[tenants]]
            id = "acme"
            api_keys_sha256 = ["{}"]
            max_files_per_session = 10
            rate_limit = {{ requests_per_second = 5, burst = 10 }}
            "#,
            Config::hash_key("k")
        );
        let c = Config::from_toml(&text, no_env, false).expect("valid");
        assert_eq!(c.environment, Environment::Production);
        assert_eq!(
            c.storage,
            StorageTarget::S3 {
                bucket: "uploads".into(),
                prefix: "in/coming".into()
            }
        );
        assert_eq!(
            c.redis,
            Some(RedisTarget::Single("redis://127.0.0.1:6379".into()))
        );
        assert_eq!(c.tenants[0].storage_prefix, "acme/");
        assert_eq!(c.tenants[0].rate_limit.burst, 10);
        assert_eq!(c.s3.region, "eu-west-1");
    }

    #[test]
    fn env_overrides_keys_that_the_file_also_sets() {
        let env = |k: &str| match k {
            // A loopback address: the embedded development tenant is served only on loopback.
            "UPGATE_LISTEN" => Some("127.0.0.2:8080".to_owned()),
            "UPGATE_ADMIN_LISTEN" => Some("0.0.0.0:9090".to_owned()),
            "MULTIPART_PART_SIZE_MB" => Some("10".to_owned()),
            "RATE_LIMIT_BYPASS" => Some("false".to_owned()),
            _ => None,
        };
        let text = "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\npart_size_mb = 5\nrate_limit_bypass = true\n";
        let c = Config::from_toml(text, env, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.admin_listen.port(), 9090);
        assert_eq!(c.part_size_mb, 10);
        assert!(!c.rate_limit_bypass);
    }

    #[test]
    fn env_overrides_file() {
        let env = |k: &str| match k {
            "UPGATE_LISTEN" => Some("127.0.0.1:7000".to_owned()),
            "UPGATE_REDIS_URL" => Some("redis://10.0.0.1:6379".to_owned()),
            "UPGATE_STORAGE" => Some("s3://bkt".to_owned()),
            "UPGATE_LOG_FORMAT" => Some("json".to_owned()),
            _ => None,
        };
        let c = Config::from_toml("listen = \"127.0.0.1:1\"", env, true).expect("valid");
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(matches!(c.storage, StorageTarget::S3 { ref bucket, .. } if bucket == "bkt"));
        assert!(matches!(c.redis, Some(RedisTarget::Single(_))));
    }

    #[test]
    fn the_dev_tenant_is_served_only_on_loopback() {
        for listen in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080"] {
            let env = |k: &str| (k == "UPGATE_LISTEN").then(|| listen.to_owned());
            let err = Config::from_toml("", env, true).expect_err(listen);
            assert!(err.to_string().contains("loopback"), "{err}");
        }
        for listen in ["127.0.0.1:8080", "[::1]:8080"] {
            let env = |k: &str| (k == "UPGATE_LISTEN").then(|| listen.to_owned());
            assert!(Config::from_toml("", env, true).is_ok(), "{listen}");
        }
        // Configured tenants may listen anywhere.
        let text = format!(
            "listen = \"0.0.0.0:8080\"\n[[tenants]]\nid = \"t\"\napi_keys_sha256 = [\"{}\"]\n",
            Config::hash_key("k")
        );
        assert!(Config::from_toml(&text, no_env, false).is_ok());
    }

    #[test]
    fn jwt_settings_are_checked_together_and_keys_read_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks = dir.path().join("jwks.json");
        // An Ed25519 key with a kid; an RSA key whose `alg` names HS256 (fits nothing).
        std::fs::write(
            &jwks,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"a","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
        )
        .expect("write");
        let tenant = |id: &str, jwt: &str| {
            format!(
                "[[tenants]]\nid = \"{id}\"\napi_keys_sha256 = [\"{}\"]\nrate_limit = {{ requests_per_second = 50, burst = 80 }}\n[tenants.jwt]\n{jwt}\n",
                Config::hash_key(id)
            )
        };
        let good = format!(
            "issuer = \"https://i\"\nalgorithms = [\"EdDSA\"]\nkeys_file = \"{}\"",
            jwks.display()
        );
        let c = Config::from_toml(&tenant("t", &good), no_env, false).expect("valid");
        let jwt = c.tenants[0].jwt.as_ref().expect("jwt");
        assert_eq!(jwt.keys.len(), 1);
        assert_eq!(jwt.leeway_seconds, 30);
        assert_eq!(jwt.audience, None);
        // The per-user limit defaults to a tenth of the tenant's.
        assert_eq!(
            c.tenants[0].end_user_rate_limit,
            RateLimitConfig {
                requests_per_second: 5,
                burst: 8
            }
        );
        // Every problem at once: an unknown algorithm, an unreadable set, a duplicate issuer.
        let text = format!(
            "{}{}",
            tenant(
                "t",
                "issuer = \"https://i\"\nalgorithms = [\"none\"]\nkeys_file = \"/no/such/jwks.json\""
            ),
            tenant("u", &good)
        );
        let err = Config::from_toml(&text, no_env, false)
            .expect_err("bad jwt settings")
            .to_string();
        assert!(err.contains("\"none\" is not one of"), "{err}");
        assert!(err.contains("not a readable JWK Set"), "{err}");
        assert!(err.contains("the same jwt.issuer"), "{err}");
        // A key that fits none of the algorithms.
        let only_rs = good.replace("EdDSA", "RS256");
        let err = Config::from_toml(&tenant("t", &only_rs), no_env, false)
            .expect_err("no key fits")
            .to_string();
        assert!(
            err.contains("fits none of the tenant's algorithms"),
            "{err}"
        );
    }

    #[test]
    fn webhook_settings_are_checked_together() {
        let hook = |url: &str, secret: &str, events: &str| {
            format!(
                "[[tenants]]\nid = \"w\"\napi_keys_sha256 = [\"{}\"]\nrate_limit = {{ requests_per_second = 50, burst = 80 }}\n[[tenants.webhooks]]\nurl = \"{url}\"\nsecret = \"{secret}\"\n{events}\n",
                Config::hash_key("wk")
            )
        };
        let good = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let c = Config::from_toml(
            &hook(
                "http://hooks.local/x",
                good,
                "events = [\"file.completed\"]",
            ),
            no_env,
            false,
        )
        .expect("valid");
        let w = &c.tenants[0].webhooks[0];
        assert_eq!(w.secret.0[0], b"0123456789abcdef0123456789abcdef");
        assert!(w.wants(crate::events::EventType::FileCompleted));
        assert!(!w.wants(crate::events::EventType::SessionCreated));
        assert_eq!(c.webhook_retry.window, Duration::from_secs(24 * 3600));
        assert_eq!(c.webhook_retry.initial, Duration::from_secs(5));
        let err = Config::from_toml(
            &format!(
                "admin_listen = \"127.0.0.1:9090\"\n{}",
                hook(
                    "http://127.0.0.1:9090/metrics",
                    "whsec_c2hvcnQ=",
                    "events = [\"file.landed\"]"
                )
            ),
            no_env,
            false,
        )
        .expect_err("bad webhooks")
        .to_string();
        assert!(err.contains("secret: must be whsec_"), "{err}");
        assert!(
            err.contains("\"file.landed\" is not an event type"),
            "{err}"
        );
        assert!(err.contains("is the gateway's own admin listener"), "{err}");
        let err = Config::from_toml(
            &format!(
                "environment = \"production\"\n{}",
                hook("http://hooks.example/x", good, "")
            ),
            no_env,
            false,
        )
        .expect_err("http in production")
        .to_string();
        assert!(err.contains("requires https://"), "{err}");
    }

    #[test]
    fn max_active_sessions_has_a_default_and_a_range() {
        let tenant = |extra: &str| {
            format!(
                "[[tenants]]\nid = \"t\"\napi_keys_sha256 = [\"{}\"]\n{extra}",
                Config::hash_key("k")
            )
        };
        let c = Config::from_toml(&tenant(""), no_env, false).expect("valid");
        assert_eq!(c.tenants[0].max_active_sessions, 10_000);
        let c =
            Config::from_toml(&tenant("max_active_sessions = 3\n"), no_env, false).expect("valid");
        assert_eq!(c.tenants[0].max_active_sessions, 3);
        let err = Config::from_toml(&tenant("max_active_sessions = 0\n"), no_env, false)
            .expect_err("0 is out of range");
        assert!(err.to_string().contains("max_active_sessions"), "{err}");
    }

    #[test]
    fn max_metadata_bytes_has_a_default_a_top_level_setting_and_a_tenant_override() {
        let tenant = |extra: &str| {
            format!(
                "[[tenants]]\nid = \"t\"\napi_keys_sha256 = [\"{}\"]\n{extra}",
                Config::hash_key("k")
            )
        };
        let c = Config::from_toml(&tenant(""), no_env, false).expect("valid");
        assert_eq!(c.tenants[0].max_metadata_bytes, 16 * 1024);
        let c = Config::from_toml(
            &format!("max_metadata_bytes = 100\n{}", tenant("")),
            no_env,
            false,
        )
        .expect("valid");
        assert_eq!(c.tenants[0].max_metadata_bytes, 100);
        let c = Config::from_toml(
            &format!(
                "max_metadata_bytes = 100\n{}",
                tenant("max_metadata_bytes = 7\n")
            ),
            no_env,
            false,
        )
        .expect("valid");
        assert_eq!(c.tenants[0].max_metadata_bytes, 7);
        let err = Config::from_toml(&tenant("max_metadata_bytes = 1\n"), no_env, false)
            .expect_err("below the minimum");
        assert!(
            err.to_string().contains("tenants[0].max_metadata_bytes"),
            "{err}"
        );
    }

    proptest! {
        // Arbitrary text never panics the parser: it is either a config or a list of problems.
        #[test]
        fn arbitrary_toml_never_panics(text in ".{0,200}") {
            match Config::from_toml(&text, no_env, true) {
                Ok(_) => {}
                Err(e) => prop_assert!(!e.problems.is_empty()),
            }
        }

        #[test]
        fn arbitrary_part_size_env_is_accepted_only_in_range(v in any::<i64>()) {
            let s = v.to_string();
            let env = |k: &str| (k == "MULTIPART_PART_SIZE_MB").then(|| s.clone());
            let r = Config::from_toml("", env, true);
            prop_assert_eq!(r.is_ok(), (5..=100).contains(&v));
        }
    }
}
