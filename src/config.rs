//! Typed configuration: a TOML file, environment overrides, validated once.
//!
//! Parsing never stops at the first problem: every bad or unknown setting is collected and
//! reported together in one [`ConfigError`], and the gateway refuses to start until all are
//! fixed. With no file at all the embedded default runs: in-memory session store, `./data`
//! filesystem storage, `127.0.0.1:8080`, and the development tenant documented in the README
//! (refused when `environment = "production"`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use toml::{Table, Value};

/// The development tenant's id (embedded default only).
pub const DEV_TENANT_ID: &str = "dev";
/// The development tenant's API key (embedded default only; refused in production).
pub const DEV_API_KEY: &str = "upgate-dev-key";

/// `environment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Anything goes (bypass allowed with a warning, dev tenant allowed).
    Development,
    /// Refuses `RATE_LIMIT_BYPASS` and the development tenant.
    Production,
}

/// `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object a line.
    Json,
}

/// Where session state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub redis: Option<RedisTarget>,
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
    /// Connections served at once; more wait in the accept queue (extra key `max_connections`, default 10000).
    pub max_connections: usize,
    /// A client must send its whole request head within this (extra key
    /// `header_read_timeout_seconds`, default 10): slowloris protection.
    pub header_read_timeout: Duration,
    /// Bound on every Redis call (extra key `redis_timeout_ms`, default 2000).
    pub redis_timeout: Duration,
    /// The tenants.
    pub tenants: Vec<TenantConfig>,
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
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::one(format!("config file is not valid TOML: {}", e.message()))
        })?;
        let mut p = Parser {
            errors: Vec::new(),
            env: &env,
        };
        let cfg = p.parse(table, embedded);
        if p.errors.is_empty() {
            cfg.ok_or_else(|| ConfigError::one("invalid configuration".into()))
        } else {
            Err(ConfigError { problems: p.errors })
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

struct Parser<'a> {
    errors: Vec<String>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

/// A table being read: remembers which keys were used so leftovers are reported.
struct Section {
    name: String,
    table: Table,
}

impl Section {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.table.remove(key)
    }

    fn path(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.name)
        }
    }
}

impl Parser<'_> {
    fn err(&mut self, msg: String) {
        self.errors.push(msg);
    }

    fn finish(&mut self, section: Section) {
        for key in section.table.keys() {
            let p = section.path(key);
            self.err(format!("{p}: unknown setting"));
        }
    }

    fn string(&mut self, s: &mut Section, key: &str, env: Option<&str>, default: &str) -> String {
        // The file's key is always consumed (so it is never reported as unknown), then the
        // environment wins.
        let from_file = s.take(key);
        if let Some(v) = env.and_then(|e| (self.env)(e)) {
            return v;
        }
        match from_file {
            None => default.to_owned(),
            Some(Value::String(v)) => v,
            Some(other) => {
                let p = s.path(key);
                self.err(format!(
                    "{p}: expected a string, found {}",
                    other.type_str()
                ));
                default.to_owned()
            }
        }
    }

    fn opt_string(&mut self, s: &mut Section, key: &str, env: Option<&str>) -> Option<String> {
        let from_file = s.take(key);
        if let Some(v) = env.and_then(|e| (self.env)(e)) {
            return Some(v).filter(|v| !v.is_empty());
        }
        match from_file {
            None => None,
            Some(Value::String(v)) => Some(v),
            Some(other) => {
                let p = s.path(key);
                self.err(format!(
                    "{p}: expected a string, found {}",
                    other.type_str()
                ));
                None
            }
        }
    }

    fn int(
        &mut self,
        s: &mut Section,
        key: &str,
        env: Option<&str>,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        let from_file = s.take(key);
        let from_env = env.and_then(|e| (self.env)(e).map(|v| (v, e)));
        let (value, source) = if let Some((raw, var)) = from_env {
            match raw.trim().parse::<u64>() {
                Ok(n) => (n, var.to_owned()),
                Err(_) => {
                    self.err(format!("{var}: expected a whole number, found {raw:?}"));
                    return default;
                }
            }
        } else {
            match from_file {
                None => return default,
                Some(Value::Integer(n)) if n >= 0 => (n as u64, s.path(key)),
                Some(other) => {
                    let p = s.path(key);
                    self.err(format!("{p}: expected a whole number >= 0, found {other}"));
                    return default;
                }
            }
        };
        if !range.contains(&value) {
            self.err(format!(
                "{source}: {value} is outside the allowed range {}..={}",
                range.start(),
                range.end()
            ));
            return default;
        }
        value
    }

    fn boolean(&mut self, s: &mut Section, key: &str, env: Option<&str>, default: bool) -> bool {
        let from_file = s.take(key);
        if let Some(e) = env {
            if let Some(v) = (self.env)(e) {
                return match v.trim().to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "on" => true,
                    "0" | "false" | "no" | "off" | "" => false,
                    _ => {
                        self.err(format!("{e}: expected true or false, found {v:?}"));
                        default
                    }
                };
            }
        }
        match from_file {
            None => default,
            Some(Value::Boolean(b)) => b,
            Some(other) => {
                let p = s.path(key);
                self.err(format!("{p}: expected true or false, found {other}"));
                default
            }
        }
    }

    fn addr(&mut self, s: &mut Section, key: &str, env: &str, default: &str) -> SocketAddr {
        let raw = self.string(s, key, Some(env), default);
        raw.parse().unwrap_or_else(|_| {
            self.err(format!(
                "{key} ({env}): {raw:?} is not an address like 127.0.0.1:8080"
            ));
            default
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
        })
    }

    fn section(&mut self, s: &mut Section, key: &str) -> Section {
        let name = s.path(key);
        match s.take(key) {
            None => Section {
                name,
                table: Table::new(),
            },
            Some(Value::Table(t)) => Section { name, table: t },
            Some(other) => {
                self.err(format!(
                    "{name}: expected a table, found {}",
                    other.type_str()
                ));
                Section {
                    name,
                    table: Table::new(),
                }
            }
        }
    }

    fn parse(&mut self, table: Table, embedded: bool) -> Option<Config> {
        let mut root = Section {
            name: String::new(),
            table,
        };
        let environment = match self
            .string(&mut root, "environment", Some("UPGATE_ENV"), "development")
            .as_str()
        {
            "development" => Environment::Development,
            "production" => Environment::Production,
            other => {
                self.err(format!("environment (UPGATE_ENV): {other:?} is neither \"development\" nor \"production\""));
                Environment::Development
            }
        };
        let listen = self.addr(&mut root, "listen", "UPGATE_LISTEN", "127.0.0.1:8080");
        let admin_listen = self.addr(
            &mut root,
            "admin_listen",
            "UPGATE_ADMIN_LISTEN",
            "127.0.0.1:9090",
        );

        let redis_url = self.opt_string(&mut root, "redis_url", Some("UPGATE_REDIS_URL"));
        let cluster = match root.take("redis_cluster_urls") {
            None => None,
            Some(Value::Array(a)) => {
                let urls: Vec<String> = a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                if urls.len() != a.len() || urls.is_empty() {
                    self.err(
                        "redis_cluster_urls: expected a non-empty list of redis:// URLs".into(),
                    );
                }
                Some(urls)
            }
            Some(other) => {
                self.err(format!(
                    "redis_cluster_urls: expected a list, found {}",
                    other.type_str()
                ));
                None
            }
        };
        let redis = match (redis_url, cluster) {
            (Some(_), Some(_)) => {
                self.err("redis_url and redis_cluster_urls are both set: choose one".into());
                None
            }
            (Some(u), None) => Some(RedisTarget::Single(u)),
            (None, Some(urls)) => Some(RedisTarget::Cluster(urls)),
            (None, None) => None,
        };
        if let Some(target) = &redis {
            let urls = match target {
                RedisTarget::Single(u) => std::slice::from_ref(u),
                RedisTarget::Cluster(u) => u.as_slice(),
            };
            for u in urls {
                if u.starts_with("rediss://") {
                    self.err(format!(
                        "redis URL {u:?}: TLS to Redis (rediss://) is not supported by this build; use redis:// on a private network or a TLS sidecar"
                    ));
                } else if !u.starts_with("redis://") {
                    self.err(format!("redis URL {u:?} must start with redis://"));
                }
            }
        }

        let storage_raw = self.string(
            &mut root,
            "storage",
            Some("UPGATE_STORAGE"),
            "file://./data",
        );
        let storage = parse_storage(&storage_raw).unwrap_or_else(|e| {
            self.err(format!("storage (UPGATE_STORAGE): {e}"));
            StorageTarget::Filesystem(PathBuf::from("./data"))
        });

        let part_size_mb = self.int(
            &mut root,
            "part_size_mb",
            Some("MULTIPART_PART_SIZE_MB"),
            5,
            5..=100,
        );
        let idempotency_ttl = self.int(
            &mut root,
            "idempotency_ttl_seconds",
            None,
            86_400,
            1..=30 * 86_400,
        );
        let reaper_interval = self.int(&mut root, "reaper_interval_seconds", None, 30, 1..=86_400);
        let log_format = match self
            .string(&mut root, "log_format", Some("UPGATE_LOG_FORMAT"), "pretty")
            .as_str()
        {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                self.err(format!(
                    "log_format (UPGATE_LOG_FORMAT): {other:?} is neither \"pretty\" nor \"json\""
                ));
                LogFormat::Pretty
            }
        };
        let rate_limit_bypass = self.boolean(
            &mut root,
            "rate_limit_bypass",
            Some("RATE_LIMIT_BYPASS"),
            false,
        );
        let session_retention = self.int(
            &mut root,
            "session_retention_seconds",
            None,
            86_400,
            60..=30 * 86_400,
        );
        let max_json_body_bytes = self.int(
            &mut root,
            "max_json_body_bytes",
            None,
            65_536,
            1_024..=16 * 1024 * 1024,
        );
        let request_timeout = self.int(&mut root, "request_timeout_seconds", None, 30, 1..=3_600);
        let part_idle_timeout =
            self.int(&mut root, "part_idle_timeout_seconds", None, 30, 1..=3_600);
        let shutdown_grace = self.int(&mut root, "shutdown_grace_seconds", None, 30, 0..=3_600);
        let max_connections = self.int(&mut root, "max_connections", None, 10_000, 1..=1_000_000);
        let redis_timeout = self.int(&mut root, "redis_timeout_ms", None, 2_000, 10..=60_000);
        let header_read_timeout =
            self.int(&mut root, "header_read_timeout_seconds", None, 10, 1..=600);

        let mut s3 = self.section(&mut root, "s3");
        let s3_config = S3Config {
            endpoint: self.opt_string(&mut s3, "endpoint", Some("UPGATE_S3_ENDPOINT")),
            region: self.string(&mut s3, "region", Some("AWS_REGION"), "us-east-1"),
            force_path_style: self.boolean(&mut s3, "force_path_style", None, true),
        };
        self.finish(s3);

        let tenants_value = root.take("tenants");
        self.finish(root);
        let mut tenants = match tenants_value {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::Table(t) => Some(self.tenant(i, t)),
                    other => {
                        self.err(format!(
                            "tenants[{i}]: expected a table, found {}",
                            other.type_str()
                        ));
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.err(format!(
                    "tenants: expected [[tenants]] entries, found {}",
                    other.type_str()
                ));
                Vec::new()
            }
        };
        if tenants.is_empty() && embedded {
            tenants.push(dev_tenant());
        }
        if tenants.is_empty() {
            self.err("no [[tenants]] configured: nobody could authenticate".into());
        }
        self.check_tenants(&tenants, environment);
        if rate_limit_bypass && environment == Environment::Production {
            self.err("RATE_LIMIT_BYPASS is enabled with environment = \"production\": refusing to run without rate limits in production".into());
        }
        if matches!(storage, StorageTarget::S3 { .. })
            && s3_config
                .endpoint
                .as_deref()
                .is_some_and(|e| !e.starts_with("http"))
        {
            self.err("s3.endpoint (UPGATE_S3_ENDPOINT): must be an http:// or https:// URL".into());
        }
        if listen == admin_listen && listen.port() != 0 {
            self.err(format!("listen and admin_listen are both {listen}"));
        }

        Some(Config {
            environment,
            listen,
            admin_listen,
            redis,
            storage,
            s3: s3_config,
            part_size_mb,
            idempotency_ttl: Duration::from_secs(idempotency_ttl),
            reaper_interval: Duration::from_secs(reaper_interval),
            log_format,
            rate_limit_bypass,
            session_retention: Duration::from_secs(session_retention),
            max_json_body_bytes: max_json_body_bytes as usize,
            request_timeout: Duration::from_secs(request_timeout),
            part_idle_timeout: Duration::from_secs(part_idle_timeout),
            shutdown_grace: Duration::from_secs(shutdown_grace),
            max_connections: max_connections as usize,
            redis_timeout: Duration::from_millis(redis_timeout),
            header_read_timeout: Duration::from_secs(header_read_timeout),
            tenants,
        })
    }

    fn tenant(&mut self, index: usize, table: Table) -> TenantConfig {
        let mut t = Section {
            name: format!("tenants[{index}]"),
            table,
        };
        let id = self.string(&mut t, "id", None, "");
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            self.err(format!(
                "tenants[{index}].id: {id:?} must be 1-64 characters of A-Z a-z 0-9 - _"
            ));
        }
        let keys = match t.take("api_keys_sha256") {
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            Some(_) => {
                self.err(format!(
                    "tenants[{index}].api_keys_sha256: expected a list of hex strings"
                ));
                Vec::new()
            }
            None => Vec::new(),
        };
        if keys.is_empty() {
            self.err(format!(
                "tenants[{index}] ({id}): api_keys_sha256 is empty: the tenant has no API key"
            ));
        }
        for k in &keys {
            if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.err(format!(
                    "tenants[{index}].api_keys_sha256: {k:?} is not a 64-digit hex SHA-256"
                ));
            }
        }
        let max_files_per_session =
            self.int(&mut t, "max_files_per_session", None, 1_000, 1..=1_000_000) as u32;
        let max_file_size_bytes = self.int(
            &mut t,
            "max_file_size_bytes",
            None,
            5_497_558_138_880,
            0..=u64::MAX,
        );
        let mut ttl = self.section(&mut t, "session_ttl_seconds");
        let session_ttl_seconds = TtlBounds {
            default: self.int(&mut ttl, "default", None, 1_800, 1..=365 * 86_400),
            min: self.int(&mut ttl, "min", None, 60, 1..=365 * 86_400),
            max: self.int(&mut ttl, "max", None, 86_400, 1..=365 * 86_400),
        };
        self.finish(ttl);
        if !(session_ttl_seconds.min <= session_ttl_seconds.default
            && session_ttl_seconds.default <= session_ttl_seconds.max)
        {
            self.err(format!(
                "tenants[{index}].session_ttl_seconds: needs min <= default <= max"
            ));
        }
        let mut rl = self.section(&mut t, "rate_limit");
        let rate_limit = RateLimitConfig {
            requests_per_second: self.int(&mut rl, "requests_per_second", None, 100, 1..=1_000_000)
                as u32,
            burst: self.int(&mut rl, "burst", None, 200, 1..=10_000_000) as u32,
        };
        self.finish(rl);
        let default_prefix = format!("{id}/");
        let storage_prefix = self.string(&mut t, "storage_prefix", None, &default_prefix);
        if !storage_prefix.ends_with('/')
            || storage_prefix.starts_with('/')
            || storage_prefix.starts_with('.')
            || storage_prefix
                .split('/')
                .any(|seg| seg == ".." || seg == ".")
            || storage_prefix.len() < 2
        {
            self.err(format!(
                "tenants[{index}].storage_prefix: {storage_prefix:?} must end with '/', not start with '/' or '.', and have no . or .. segments"
            ));
        }
        let max_concurrent_uploads =
            self.int(&mut t, "max_concurrent_uploads", None, 64, 1..=100_000);
        let cors_allowed_origins = match t.take("cors_allowed_origins") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(_) => {
                self.err(format!(
                    "tenants[{index}].cors_allowed_origins: expected a list of origins"
                ));
                Vec::new()
            }
        };
        self.finish(t);
        TenantConfig {
            id,
            api_keys_sha256: keys,
            max_files_per_session,
            max_file_size_bytes,
            session_ttl_seconds,
            rate_limit,
            storage_prefix,
            max_concurrent_uploads,
            cors_allowed_origins,
        }
    }

    fn check_tenants(&mut self, tenants: &[TenantConfig], environment: Environment) {
        let mut ids = HashSet::new();
        let mut keys = HashSet::new();
        let mut prefixes = HashSet::new();
        let dev_hash = Config::hash_key(DEV_API_KEY);
        for t in tenants {
            if !ids.insert(t.id.as_str()) {
                self.err(format!("tenant id {:?} is configured twice", t.id));
            }
            if !prefixes.insert(t.storage_prefix.as_str()) {
                self.err(format!(
                    "storage_prefix {:?} is shared by two tenants",
                    t.storage_prefix
                ));
            }
            for k in &t.api_keys_sha256 {
                if !keys.insert(k.as_str()) {
                    self.err(format!(
                        "an API key digest of tenant {:?} belongs to another tenant too",
                        t.id
                    ));
                }
            }
            if environment == Environment::Production && t.api_keys_sha256.contains(&dev_hash) {
                self.err(format!(
                    "tenant {:?} uses the development API key, which is refused with environment = \"production\"",
                    t.id
                ));
            }
        }
    }
}

fn dev_tenant() -> TenantConfig {
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
    }
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
                .any(|p| p.contains("development API key")),
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
            "UPGATE_LISTEN" => Some("0.0.0.0:8080".to_owned()),
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
