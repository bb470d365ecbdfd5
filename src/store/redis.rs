//! The Redis (or Redis Cluster) session store.
//!
//! Every operation is one Lua script (see `src/store/lua/`), so each decision — expiry,
//! fileKey uniqueness, file-count limit, completion lease — is made atomically next to the
//! data, exactly like the reference [`MemoryStore`](super::memory::MemoryStore) does under
//! its mutex. Scripts are sent with `EVALSHA` (falling back to `SCRIPT LOAD` on `NOSCRIPT`).
//!
//! ## Key layout
//! With prefix `P` (default `upgate`), tenant `t` and session `s`, every key of a session
//! carries the hash tag `{t:s}` so a script touches exactly one cluster slot:
//!
//! | key | type | content |
//! |---|---|---|
//! | `P:{t:s}:s` | hash | the session record (+ `keep_until`, ms, the retention deadline; `file_seq`, the last registration sequence number) |
//! | `P:{t:s}:keys` | hash | fileKey → fileId of live files |
//! | `P:{t:s}:o` | sorted set | ids of the files not deleted, scored by registration sequence number (the page cursor) |
//! | `P:{t:s}:f:<fileId>` | hash | the file record (+ `lease_token`, `lease_until` while completing) |
//! | `P:{t:s}:p:<fileId>` | hash | partNumber → `<sizeBytes>:<etag>` |
//! | `P:{t:s}:c` | hash | queued storage cleanups: fileId → `<uploadId>\n<objectKey>` |
//!
//! A file `DELETE` removes the file's `f:`, `p:` and `o` entries in its script; what storage
//! still has to do waits in `c` until [`SessionStore::cleanup_done`], so a register/delete
//! loop leaves nothing behind.
//! | `P:reap` | sorted set | reaper index: member `t:s`, score = ms when due |
//!
//! Every session key gets `PEXPIREAT expires_at*1000 + retention` when written, so nothing
//! outlives the retention window. The reaper index is global (its own slot): members are
//! removed or re-scored by [`SessionStore::reap_done`], moved earlier by
//! [`SessionStore::schedule_reap`].
//!
//! ## Failure behaviour
//! Every call is bounded by [`RedisStoreOptions::command_timeout`] (connecting or pool wait
//! included); a timeout or any connection error is a [`StoreError`]. On a single server a
//! dropped connection is replaced by [`ConnectionManager`] in the background, and the Cluster
//! pool checks a connection before handing it out, so calls succeed again once Redis is back.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Runtime, Timeouts};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, RedisWrite, Script,
    ToRedisArgs, Value,
};
use tracing::Instrument;

use super::{
    BeginComplete, Cleanup, ExpiredInfo, FileAborted, Finalized, Gate, Page, Reaped, Registered,
    SessionAborted, SessionStore, SessionView, StoreError, TailOp, TusAdvance, TusAdvanced,
    TusBegin, TusBegun, TusState, UploadIdSet, FILES_PAGE_MAX,
};
use crate::model::{FileRecord, FileStatus, PartRecord, SessionRecord, SessionStatus};

// ---------------------------------------------------------------------------------------
// Connection handle
// ---------------------------------------------------------------------------------------

/// Pool settings of a [`RedisHandle`].
#[derive(Debug, Clone)]
pub struct RedisPoolOptions {
    /// Maximum pooled Cluster connections (each is multiplexed, so a few are plenty; a single
    /// server uses one multiplexed connection). Default 16.
    pub max_size: usize,
    /// Bound on opening a connection, on one response, and (Cluster) on waiting for a pooled
    /// connection and on its health check. Default 2 s.
    pub timeout: Duration,
    /// For `rediss://` URLs: PEM certificates that verify the server, instead of the
    /// system's roots. Default none.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for RedisPoolOptions {
    fn default() -> Self {
        RedisPoolOptions {
            max_size: 16,
            timeout: Duration::from_secs(2),
            ca_pem: None,
        }
    }
}

/// The certificates a TLS connection verifies the server with (`None`: the system's roots).
fn tls_certificates(opts: &RedisPoolOptions) -> Option<redis::TlsCertificates> {
    opts.ca_pem.as_ref().map(|pem| redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.clone()),
    })
}

/// A cloneable handle on a single Redis server or a pooled Redis Cluster connection.
///
/// It implements [`redis::aio::ConnectionLike`], so besides backing the [`RedisStore`] it can
/// be handed to anything generic over a connection, such as the tower layers' Redis backends.
#[derive(Clone)]
pub enum RedisHandle {
    /// One Redis server (or a proxy in front of several): one multiplexed connection that
    /// serves any number of concurrent calls and is reconnected in the background when it
    /// drops.
    Single(SingleConnection),
    /// A Redis Cluster: a small pool of multiplexed cluster connections.
    Cluster(ClusterPool),
}

/// The connection to one Redis server: a [`ConnectionManager`], replaced by a new one when
/// a call fails to parse its reply.
///
/// redis-rs 1.8's manager reconnects on I/O errors and dropped connections, but keeps a
/// connection attempt that failed otherwise: a reply cut mid-frame while it connects (the
/// handshake's answer) fails as a parse error ("unexpected end of input"), the failed
/// attempt stays, and every later call fails at once, for good. Seen in
/// `tests/fault_matrix.rs` (`a_redis_fault_mid_patch_after_a_part_is_stored`): after a cut
/// the gateway answered 503 for as long as the test waited while a fresh connection through
/// the same proxy answered PING.
#[derive(Clone)]
pub struct SingleConnection(std::sync::Arc<SingleInner>);

struct SingleInner {
    /// The manager in use, with its generation (a failure replaces only the one it saw).
    current: std::sync::RwLock<(u64, ConnectionManager)>,
    client: redis::Client,
    config: ConnectionManagerConfig,
}

impl SingleConnection {
    fn new(client: redis::Client, config: ConnectionManagerConfig) -> Result<Self, StoreError> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(StoreError::new)?;
        Ok(SingleConnection(std::sync::Arc::new(SingleInner {
            current: std::sync::RwLock::new((0, manager)),
            client,
            config,
        })))
    }

    fn manager(&self) -> (u64, ConnectionManager) {
        self.0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After a failed call on generation `seen`: a reply that did not parse replaces the
    /// manager (once per generation).
    fn after<T>(&self, seen: u64, result: &RedisResult<T>) {
        let Err(e) = result else { return };
        if e.kind() != redis::ErrorKind::Parse {
            return;
        }
        let mut current = self.0.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 != seen {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.0.client.clone(), self.0.config.clone())
        {
            Ok(manager) => {
                tracing::warn!(error = %e, "a Redis reply did not parse; reconnecting");
                *current = (seen + 1, manager);
            }
            Err(e) => tracing::warn!(error = %e, "replacing the Redis connection failed"),
        }
    }
}

/// The pool of Redis Cluster connections.
pub type ClusterPool = deadpool::managed::Pool<ClusterManager>;

/// Creates and checks Redis Cluster connections for the pool, with a connect and a
/// response timeout on every node connection (deadpool-redis's own cluster manager sets
/// neither, so a node that accepts a connection and never answers held a call until the
/// store's outer timeout, and the connection stayed in the pool afterwards).
pub struct ClusterManager {
    client: redis::cluster::ClusterClient,
    pings: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for ClusterManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterManager").finish_non_exhaustive()
    }
}

impl deadpool::managed::Manager for ClusterManager {
    type Type = redis::cluster_async::ClusterConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<Self::Type, RedisError> {
        self.client.get_async_connection().await
    }

    async fn recycle(
        &self,
        conn: &mut Self::Type,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<RedisError> {
        let n = self
            .pings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let echoed: String = redis::cmd("PING").arg(&n).query_async(conn).await?;
        if echoed == n {
            Ok(())
        } else {
            Err(deadpool::managed::RecycleError::message(
                "unexpected PING reply",
            ))
        }
    }
}

impl fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisHandle::Single(_) => f.write_str("RedisHandle::Single"),
            RedisHandle::Cluster(p) => f
                .debug_tuple("RedisHandle::Cluster")
                .field(&p.status())
                .finish(),
        }
    }
}

fn pool_timeouts(t: Duration) -> Timeouts {
    Timeouts {
        wait: Some(t),
        create: Some(t),
        recycle: Some(t),
    }
}

impl RedisHandle {
    /// A connection to one Redis server (`redis://host:port/db`), default options. Does not
    /// connect yet: the connection is opened on first use (so the gateway starts, not ready,
    /// while Redis is down). Call it inside a Tokio runtime.
    pub fn single(url: &str) -> Result<Self, StoreError> {
        Self::single_with(url, &RedisPoolOptions::default())
    }

    /// A connection to one Redis server with explicit options.
    pub fn single_with(url: &str, opts: &RedisPoolOptions) -> Result<Self, StoreError> {
        // The manager spawns its reconnection task on the current runtime.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::new(
                "a Redis handle must be created inside a Tokio runtime",
            ));
        }
        // `rediss://` speaks TLS (rustls), with the system's roots unless a CA is given.
        let client = match tls_certificates(opts) {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
        }
        .map_err(StoreError::new)?;
        // A failed (re)connection is retried twice, quickly: a call waiting on it is bounded
        // by the store's command timeout, and the next call starts another attempt.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.timeout))
            .set_response_timeout(Some(opts.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        Ok(RedisHandle::Single(SingleConnection::new(client, config)?))
    }

    /// A pool on a Redis Cluster, given one or more seed node URLs; default pool options.
    pub fn cluster(urls: &[String]) -> Result<Self, StoreError> {
        Self::cluster_with(urls, &RedisPoolOptions::default())
    }

    /// A pool on a Redis Cluster with explicit pool options.
    pub fn cluster_with(urls: &[String], opts: &RedisPoolOptions) -> Result<Self, StoreError> {
        if urls.is_empty() {
            return Err(StoreError::new("redis cluster: no node URLs"));
        }
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
                .connection_timeout(opts.timeout)
                .response_timeout(opts.timeout);
        if let Some(certs) = tls_certificates(opts) {
            builder = builder.certs(certs);
        }
        let client = builder.build().map_err(StoreError::new)?;
        let manager = ClusterManager {
            client,
            pings: std::sync::atomic::AtomicUsize::new(0),
        };
        let pool = ClusterPool::builder(manager)
            .max_size(opts.max_size.max(1))
            .timeouts(pool_timeouts(opts.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(StoreError::new)?;
        Ok(RedisHandle::Cluster(pool))
    }

    /// True for a cluster handle.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisHandle::Cluster(_))
    }
}

fn cluster_pool_error(e: deadpool::managed::PoolError<RedisError>) -> RedisError {
    match e {
        deadpool::managed::PoolError::Backend(e) => e,
        other => RedisError::from((ErrorKind::Io, "redis cluster pool", other.to_string())),
    }
}

// One boxed future per variant: a single async block over both would be as large as the
// cluster pool's checkout future, and every call would move that many bytes into its box.
impl ConnectionLike for RedisHandle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisHandle::Single(single) => Box::pin(async move {
                let (generation, mut manager) = single.manager();
                let result = manager.req_packed_command(cmd).await;
                single.after(generation, &result);
                result
            }),
            RedisHandle::Cluster(pool) => Box::pin(async move {
                let mut con = pool.get().await.map_err(cluster_pool_error)?;
                con.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisHandle::Single(single) => Box::pin(async move {
                let (generation, mut manager) = single.manager();
                let result = manager.req_packed_commands(cmd, offset, count).await;
                single.after(generation, &result);
                result
            }),
            RedisHandle::Cluster(pool) => Box::pin(async move {
                let mut con = pool.get().await.map_err(cluster_pool_error)?;
                con.req_packed_commands(cmd, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        // Cluster has only db 0; for a single server the db is part of the URL and not
        // tracked here (nothing in upgate selects another one).
        0
    }
}

// ---------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreOptions {
    /// First component of every key (default `upgate`). Must not contain `{` or `}`.
    pub key_prefix: String,
    /// How long a session's state outlives its `expires_at` (default 24 h).
    pub retention: Duration,
    /// Bound on every store call, pool wait included (default 2 s).
    pub command_timeout: Duration,
    /// Scripts fail on any key they touch that is not declared in `KEYS` (default false;
    /// the conformance suite turns it on, so a script that would misbehave during a Redis
    /// Cluster slot migration fails its tests).
    pub strict_keys: bool,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        RedisStoreOptions {
            key_prefix: "upgate".to_owned(),
            retention: Duration::from_secs(24 * 3600),
            command_timeout: Duration::from_secs(2),
            strict_keys: false,
        }
    }
}

const PRELUDE: &str = include_str!("lua/prelude.lua");
/// Times a session-wide call reads the file list again when registrations keep changing it
/// between the read and the script.
const STALE_RETRIES: usize = 5;
/// How scripts reach Redis: straight through.
const CALL: &str = "local call = redis.call";
/// How scripts reach Redis with [`RedisStoreOptions::strict_keys`]: failing on any key not
/// declared in `KEYS`.
const CALL_STRICT: &str = include_str!("lua/call_strict.lua");

struct Scripts {
    create: Script,
    get_session: Script,
    register: Script,
    get_file: Script,
    set_upload_id: Script,
    record_part: Script,
    list_parts: Script,
    begin_complete: Script,
    finish_complete: Script,
    release_complete: Script,
    abort_file: Script,
    abort_session: Script,
    finalize: Script,
    reap: Script,
    claim: Script,
    cleanup_done: Script,
    live_reserve: Script,
    renew_complete: Script,
    reschedule: Script,
    token_key: Script,
    ev_claim: Script,
    ev_done: Script,
    ev_list: Script,
    ev_retry: Script,
    index_prune: Script,
    tus_begin: Script,
    tus_advance: Script,
    tus_release: Script,
}

impl Scripts {
    fn new(strict: bool) -> Self {
        let call = if strict { CALL_STRICT } else { CALL };
        let session_script = |body: &str| Script::new(&format!("{call}\n{PRELUDE}\n{body}"));
        let index_script = |body: &str| Script::new(&format!("{call}\n{body}"));
        Scripts {
            create: session_script(include_str!("lua/create.lua")),
            get_session: session_script(include_str!("lua/get_session.lua")),
            register: session_script(include_str!("lua/register.lua")),
            get_file: session_script(include_str!("lua/get_file.lua")),
            set_upload_id: session_script(include_str!("lua/set_upload_id.lua")),
            record_part: session_script(include_str!("lua/record_part.lua")),
            list_parts: session_script(include_str!("lua/list_parts.lua")),
            begin_complete: session_script(include_str!("lua/begin_complete.lua")),
            finish_complete: session_script(include_str!("lua/finish_complete.lua")),
            release_complete: session_script(include_str!("lua/release_complete.lua")),
            abort_file: session_script(include_str!("lua/abort_file.lua")),
            abort_session: session_script(include_str!("lua/abort_session.lua")),
            finalize: session_script(include_str!("lua/finalize.lua")),
            reap: session_script(include_str!("lua/reap.lua")),
            claim: index_script(include_str!("lua/claim.lua")),
            cleanup_done: session_script(include_str!("lua/cleanup_done.lua")),
            live_reserve: index_script(include_str!("lua/live_reserve.lua")),
            renew_complete: session_script(include_str!("lua/renew_complete.lua")),
            reschedule: index_script(include_str!("lua/reschedule.lua")),
            ev_claim: session_script(include_str!("lua/ev_claim.lua")),
            ev_done: session_script(include_str!("lua/ev_done.lua")),
            ev_list: session_script(include_str!("lua/ev_list.lua")),
            ev_retry: session_script(include_str!("lua/ev_retry.lua")),
            tus_begin: session_script(include_str!("lua/tus_begin.lua")),
            tus_advance: session_script(include_str!("lua/tus_advance.lua")),
            tus_release: session_script(include_str!("lua/tus_release.lua")),
            // Removes a member scored before ARGV[2].
            index_prune: index_script(
                "local s = call('ZSCORE', KEYS[1], ARGV[1]) if s and tonumber(s) < tonumber(ARGV[2]) then call('ZREM', KEYS[1], ARGV[1]) return 1 end return 0",
            ),
            // The first replica's key wins; every later call reads it.
            token_key: index_script(
                "local k = call('GET', KEYS[1]) if k then return k end call('SET', KEYS[1], ARGV[1]) return ARGV[1]",
            ),
        }
    }
}

/// [`SessionStore`] on Redis or Redis Cluster. Cheap to share (`Arc` it); all state is in
/// Redis, so any number of gateway replicas can use the same backend.
pub struct RedisStore {
    handle: RedisHandle,
    prefix: String,
    retention_ms: i64,
    timeout: Duration,
    scripts: Scripts,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("handle", &self.handle)
            .field("prefix", &self.prefix)
            .field("retention_ms", &self.retention_ms)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The keys of one session.
/// The keys of one session, borrowed: every key is written straight into the command
/// buffer (no `String` per key per call).
#[derive(Clone, Copy)]
struct SessionKeys<'a> {
    prefix: &'a str,
    tenant: &'a str,
    session_id: &'a str,
}

impl<'a> SessionKeys<'a> {
    fn key(self, suffix: &'static str, id: &'a str) -> Key<'a> {
        Key {
            of: self,
            suffix,
            id,
        }
    }
    fn session(self) -> Key<'a> {
        self.key("s", "")
    }
    fn keys(self) -> Key<'a> {
        self.key("keys", "")
    }
    /// The listed (not deleted) files: a sorted set of file ids scored by registration
    /// sequence number.
    fn order(self) -> Key<'a> {
        self.key("o", "")
    }
    /// Queued storage cleanups: file id → `"<upload id>\n<object key>"`.
    fn cleanup(self) -> Key<'a> {
        self.key("c", "")
    }
    fn file(self, file_id: &'a str) -> Key<'a> {
        self.key("f:", file_id)
    }
    /// The outbox: `seq` (the last sequence number) and sequence number → event (JSON).
    fn events(self) -> Key<'a> {
        self.key("ev", "")
    }
    /// Pending events: sequence numbers scored by when due (ms).
    fn event_queue(self) -> Key<'a> {
        self.key("evq", "")
    }
    /// Delivery states: sequence number → `events::Delivery::encode`.
    fn event_states(self) -> Key<'a> {
        self.key("evs", "")
    }
    /// Dead-lettered events: sequence numbers scored by when (ms).
    fn event_dead(self) -> Key<'a> {
        self.key("evd", "")
    }
    /// The keys of the delivery scripts (`ev_done`, `ev_list`, `ev_retry`).
    fn outbox(self) -> [Key<'a>; 5] {
        [
            self.session(),
            self.events(),
            self.event_queue(),
            self.event_states(),
            self.event_dead(),
        ]
    }
    fn parts(self, file_id: &'a str) -> Key<'a> {
        self.key("p:", file_id)
    }
    /// A tus upload's tail: the bytes past its last whole part (a string).
    fn tail(self, file_id: &'a str) -> Key<'a> {
        self.key("t:", file_id)
    }
}

/// One Redis key of a session: `<prefix>:{<tenant>:<session>}:<suffix><id>`. The hash tag
/// puts every key of a session in one Redis Cluster slot.
#[derive(Clone, Copy)]
struct Key<'a> {
    of: SessionKeys<'a>,
    suffix: &'static str,
    id: &'a str,
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.of;
        write!(
            f,
            "{}:{{{}:{}}}:{}{}",
            k.prefix, k.tenant, k.session_id, self.suffix, self.id
        )
    }
}

impl ToRedisArgs for Key<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        use std::io::Write as _;
        let k = &self.of;
        let mut w = out.writer_for_next_arg();
        // Writing into the command's own buffer cannot fail.
        let _ = w
            .write_all(k.prefix.as_bytes())
            .and_then(|()| w.write_all(b":{"))
            .and_then(|()| w.write_all(k.tenant.as_bytes()))
            .and_then(|()| w.write_all(b":"))
            .and_then(|()| w.write_all(k.session_id.as_bytes()))
            .and_then(|()| w.write_all(b"}:"))
            .and_then(|()| w.write_all(self.suffix.as_bytes()))
            .and_then(|()| w.write_all(self.id.as_bytes()));
    }
}

/// One `EVALSHA`, keys and arguments encoded once, in place, into a single command buffer.
/// (`redis::ScriptInvocation` keeps a `Vec` per key and argument and copies them all into
/// a new command on every invocation: ~35 allocations per registration.)
struct Call<'s> {
    script: &'s Script,
    cmd: Cmd,
}

impl<'s> Call<'s> {
    fn new<K: ToRedisArgs, const N: usize>(script: &'s Script, keys: [K; N]) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(N);
        for k in keys {
            cmd.arg(k);
        }
        Call { script, cmd }
    }

    /// A call whose keys are only known at run time.
    fn dynamic<K: ToRedisArgs>(script: &'s Script, keys: &[K]) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len());
        for k in keys {
            cmd.arg(k);
        }
        Call { script, cmd }
    }

    fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Sends the call; on NOSCRIPT (a fresh or flushed server) loads the script and sends it
    /// again.
    async fn query(&self, con: &mut RedisHandle) -> RedisResult<Value> {
        match self.cmd.query_async::<Value>(con).await {
            Err(e) if is_noscript(&e) => {
                self.script.load_async(con).await?;
                self.cmd.query_async(con).await
            }
            other => other,
        }
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

impl RedisStore {
    /// A store on `handle`. Fails when the key prefix contains `{` or `}` (it would break
    /// the per-session hash tag).
    pub fn new(handle: RedisHandle, options: RedisStoreOptions) -> Result<Self, StoreError> {
        if options.key_prefix.contains(['{', '}']) {
            return Err(StoreError::new(
                "redis key prefix must not contain '{' or '}'",
            ));
        }
        Ok(RedisStore {
            handle,
            prefix: options.key_prefix,
            retention_ms: i64::try_from(options.retention.as_millis()).unwrap_or(i64::MAX),
            timeout: options.command_timeout,
            scripts: Scripts::new(options.strict_keys),
        })
    }

    /// The connection handle (to share with other components).
    pub fn handle(&self) -> &RedisHandle {
        &self.handle
    }

    /// The key of the reaper index (a sorted set).
    pub fn reap_key(&self) -> String {
        format!("{}:reap", self.prefix)
    }

    /// The key of a tenant's live-session set (a sorted set scored by expiry, in the
    /// tenant's own hash slot).
    pub fn live_key(&self, tenant: &str) -> String {
        format!("{}:{{{tenant}}}:live", self.prefix)
    }

    /// The key of a tenant's outbox index: a sorted set of session ids scored by when the
    /// delivery worker looks at them (ms), in the tenant's own hash slot.
    pub fn event_index_key(&self, tenant: &str) -> String {
        format!("{}:{{{tenant}}}:evx", self.prefix)
    }

    /// The key of a tenant's sessions with dead-lettered events (scored by when, ms).
    pub fn dead_index_key(&self, tenant: &str) -> String {
        format!("{}:{{{tenant}}}:evdead", self.prefix)
    }

    /// The session hash key of a session (for diagnostics and tests).
    pub fn session_key(&self, tenant: &str, session_id: &str) -> String {
        self.keys_of(tenant, session_id).session().to_string()
    }

    fn keys_of<'a>(&'a self, tenant: &'a str, session_id: &'a str) -> SessionKeys<'a> {
        SessionKeys {
            prefix: &self.prefix,
            tenant,
            session_id,
        }
    }

    /// Runs `fut` under the command timeout, mapping every failure to [`StoreError`].
    async fn bounded<T, F>(&self, what: &'static str, fut: F) -> Result<T, StoreError>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.timeout, fut).await;
        crate::metrics::observe_backend("redis", what, started.elapsed());
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(op = what, error = %e, "redis session store call failed");
                Err(StoreError::new(format_args!("redis {what}: {e}")))
            }
            Err(_) => {
                tracing::warn!(
                    op = what,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "redis session store call timed out"
                );
                Err(StoreError::new(format_args!(
                    "redis {what}: timed out after {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// Runs a session-wide script. Its keys are `fixed` followed by the `f:` key of every
    /// file of the session (then their `p:` keys with `with_parts`), so that every key it
    /// touches is declared; ARGV is `now, n (files), extra...`. The file list is read first
    /// and the script refuses (`stale`) if it changed meanwhile; then it is read again.
    #[allow(clippy::too_many_arguments)] // one private helper for four scripts
    async fn session_wide(
        &self,
        what: &'static str,
        k: SessionKeys<'_>,
        script: &Script,
        fixed: &[Key<'_>],
        read: IdRead,
        now_ms: i64,
        extra: &[String],
    ) -> Result<Value, StoreError> {
        for attempt in 0..STALE_RETRIES {
            if attempt > 0 {
                // Registrations or deletions are changing the list right now: let a few land.
                tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
            }
            let mut con = self.handle.clone();
            let order = k.order();
            let ids: Vec<String> = self
                .bounded(what, async move {
                    let mut cmd = redis::cmd("ZRANGEBYSCORE");
                    cmd.arg(order);
                    match read {
                        IdRead::All { .. } => cmd.arg("-inf").arg("+inf"),
                        IdRead::Page(page) => cmd
                            .arg(score_after(page.after))
                            .arg("+inf")
                            .arg("LIMIT")
                            .arg(0)
                            .arg(page.limit()),
                    };
                    cmd.query_async(&mut con).await
                })
                .await?;
            let mut keys: Vec<Key<'_>> = fixed.to_vec();
            keys.extend(ids.iter().map(|id| k.file(id)));
            if let IdRead::All { with_parts: true } = read {
                keys.extend(ids.iter().map(|id| k.parts(id)));
            }
            // The outbox keys come last (prelude `record_event`).
            keys.push(k.events());
            keys.push(k.event_queue());
            let mut inv = Call::dynamic(script, &keys);
            inv.arg(now_ms).arg(ids.len());
            if let IdRead::Page(page) = read {
                inv.arg(score_after(page.after)).arg(page.limit());
            }
            for e in extra {
                inv.arg(e);
            }
            let reply = self.invoke(what, &inv).await?;
            let stale = as_array(&reply)
                .ok()
                .and_then(|a| a.first())
                .and_then(|v| as_str(v).ok())
                == Some("stale");
            if !stale {
                return Ok(reply);
            }
        }
        Err(StoreError::new(format_args!(
            "redis {what}: the session's file list kept changing"
        )))
    }

    /// One `ZADD key score member` under the timeout (an index outside the session's slot).
    async fn zadd(
        &self,
        what: &'static str,
        key: &str,
        score: i64,
        member: &str,
    ) -> Result<(), StoreError> {
        let mut con = self.handle.clone();
        self.bounded(what, async move {
            redis::cmd("ZADD")
                .arg(key)
                .arg(score)
                .arg(member)
                .exec_async(&mut con)
                .await
        })
        .await
    }

    /// Runs a script call (EVALSHA, NOSCRIPT → SCRIPT LOAD + retry) under the timeout.
    async fn invoke(&self, what: &'static str, call: &Call<'_>) -> Result<Value, StoreError> {
        let mut con = self.handle.clone();
        self.bounded(what, async move { call.query(&mut con).await })
            .instrument(tracing::debug_span!("redis_script", op = what))
            .await
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Writes the session's hash fields as `name value` argument pairs.
fn session_fields(call: &mut Call<'_>, s: &SessionRecord) -> Result<(), StoreError> {
    call.arg("id")
        .arg(&s.id)
        .arg("tenant")
        .arg(&s.tenant)
        .arg("status")
        .arg(s.status.as_str())
        .arg("part_size_bytes")
        .arg(s.part_size_bytes)
        .arg("file_limit")
        .arg(s.file_limit)
        .arg("file_count")
        .arg(s.file_count)
        .arg("created_at")
        .arg(s.created_at)
        .arg("expires_at")
        .arg(s.expires_at)
        .arg("metadata")
        .arg(serde_json::to_string(&s.metadata).map_err(StoreError::new)?);
    if let Some(m) = s.max_files {
        call.arg("max_files").arg(m);
    }
    if let Some(owner) = &s.owner {
        call.arg("owner").arg(owner);
    }
    if let Some(max) = s.max_file_size_bytes {
        call.arg("max_file_size").arg(max);
    }
    if let Some(types) = &s.allowed_content_types {
        // One line per type between newlines, so register.lua finds one with a plain
        // search for "\n<type>\n" (content types hold no newline).
        call.arg("allowed_types")
            .arg(format!("\n{}\n", types.join("\n")));
    }
    if let Some(keep) = s.outbox_keep_ms {
        // The scripts record events of sessions with this field (prelude `record_event`).
        call.arg("wh").arg(keep);
    }
    Ok(())
}

/// Writes the file's hash fields as `name value` argument pairs.
fn file_fields(call: &mut Call<'_>, f: &FileRecord) {
    call.arg("id")
        .arg(&f.id)
        .arg("session_id")
        .arg(&f.session_id)
        .arg("file_key")
        .arg(&f.file_key)
        .arg("file_name")
        .arg(&f.file_name)
        .arg("size_bytes")
        .arg(f.size_bytes)
        .arg("status")
        .arg(f.status.as_str())
        .arg("part_size_bytes")
        .arg(f.part_size_bytes)
        .arg("part_count")
        .arg(f.part_count)
        .arg("created_at")
        .arg(f.created_at);
    call.arg("object_key").arg(&f.object_key);
    for (name, value) in [
        ("content_type", &f.content_type),
        ("upload_id", &f.upload_id),
        ("file_url", &f.file_url),
        ("etag", &f.etag),
        ("tus_form", &f.tus_form),
    ] {
        if let Some(x) = value {
            call.arg(name).arg(x);
        }
    }
    // Only when there is some: most files have none, and every field costs memory.
    if !f.metadata.is_empty() {
        if let Ok(json) = serde_json::to_string(&f.metadata) {
            call.arg("metadata").arg(json);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decoding (never panics: anything unexpected is a StoreError)
// ---------------------------------------------------------------------------------------

fn corrupt(msg: impl fmt::Display) -> StoreError {
    StoreError::new(format_args!("unexpected redis reply: {msg}"))
}

fn as_str(v: &Value) -> Result<&str, StoreError> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).map_err(|_| corrupt("non-UTF-8 string")),
        Value::SimpleString(s) => Ok(s),
        Value::Okay => Ok("OK"),
        other => Err(corrupt(format_args!("expected a string, got {other:?}"))),
    }
}

fn as_int(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => as_str(other)?
            .parse()
            .map_err(|_| corrupt("expected an integer")),
    }
}

fn as_array(v: &Value) -> Result<&[Value], StoreError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(&[]),
        other => Err(corrupt(format_args!("expected an array, got {other:?}"))),
    }
}

/// A flat `HGETALL` reply (`field, value, ...`) as a map.
struct Fields<'a>(HashMap<&'a str, &'a str>);

impl<'a> Fields<'a> {
    fn parse(v: &'a Value) -> Result<Self, StoreError> {
        let arr = as_array(v)?;
        if arr.len() % 2 != 0 {
            return Err(corrupt("odd hash reply"));
        }
        let mut map = HashMap::with_capacity(arr.len() / 2);
        for pair in arr.chunks_exact(2) {
            map.insert(as_str(&pair[0])?, as_str(&pair[1])?);
        }
        Ok(Fields(map))
    }

    fn str(&self, name: &str) -> Result<&'a str, StoreError> {
        self.0
            .get(name)
            .copied()
            .ok_or_else(|| corrupt(format_args!("missing field {name}")))
    }

    fn opt(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|s| (*s).to_owned())
    }

    fn num<T: std::str::FromStr>(&self, name: &str) -> Result<T, StoreError> {
        self.str(name)?
            .parse()
            .map_err(|_| corrupt(format_args!("bad number in field {name}")))
    }
}

/// What register.lua looks for in a session's `allowed_types`: the declared content type
/// (lower case, parameters dropped) and its `type/*` pattern, each between newlines; two
/// empty strings when the file declares none (no line matches).
fn content_type_keys(content_type: Option<&str>) -> (String, String) {
    let Some(essence) = content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|e| e.contains('/') && !e.ends_with('/'))
    else {
        return (String::new(), String::new());
    };
    let major = essence.split('/').next().unwrap_or("");
    (format!("\n{essence}\n"), format!("\n{major}/*\n"))
}

/// The `allowed_types` field's types ([`session_fields`]).
fn allowed_types(field: &str) -> Vec<String> {
    field
        .split('\n')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_session(v: &Value) -> Result<SessionRecord, StoreError> {
    let f = Fields::parse(v)?;
    let status = f.str("status")?;
    Ok(SessionRecord {
        id: f.str("id")?.to_owned(),
        tenant: f.str("tenant")?.to_owned(),
        status: SessionStatus::parse(status)
            .ok_or_else(|| corrupt(format_args!("session status {status:?}")))?,
        part_size_bytes: f.num("part_size_bytes")?,
        max_files: match f.0.get("max_files") {
            Some(s) => Some(s.parse().map_err(|_| corrupt("bad max_files"))?),
            None => None,
        },
        file_limit: f.num("file_limit")?,
        file_count: f.num("file_count")?,
        created_at: f.num("created_at")?,
        expires_at: f.num("expires_at")?,
        metadata: serde_json::from_str(f.str("metadata")?)
            .map_err(|e| corrupt(format_args!("metadata: {e}")))?,
        owner: f.opt("owner"),
        max_file_size_bytes: match f.0.get("max_file_size") {
            Some(s) => Some(s.parse().map_err(|_| corrupt("bad max_file_size"))?),
            None => None,
        },
        allowed_content_types: f.0.get("allowed_types").map(|s| allowed_types(s)),
        outbox_keep_ms: match f.0.get("wh") {
            Some(s) => Some(s.parse().map_err(|_| corrupt("bad wh"))?),
            None => None,
        },
    })
}

fn parse_file(v: &Value) -> Result<FileRecord, StoreError> {
    let f = Fields::parse(v)?;
    let status = f.str("status")?;
    Ok(FileRecord {
        id: f.str("id")?.to_owned(),
        session_id: f.str("session_id")?.to_owned(),
        file_key: f.str("file_key")?.to_owned(),
        file_name: f.str("file_name")?.to_owned(),
        size_bytes: f.num("size_bytes")?,
        content_type: f.opt("content_type"),
        status: FileStatus::parse(status)
            .ok_or_else(|| corrupt(format_args!("file status {status:?}")))?,
        part_size_bytes: f.num("part_size_bytes")?,
        part_count: f.num("part_count")?,
        created_at: f.num("created_at")?,
        object_key: f.str("object_key")?.to_owned(),
        upload_id: f.opt("upload_id"),
        file_url: f.opt("file_url"),
        etag: f.opt("etag"),
        metadata: match f.0.get("metadata") {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| corrupt(format_args!("file metadata: {e}")))?,
            None => Default::default(),
        },
        tus_form: f.opt("tus_form"),
    })
}

/// The tus fields of a file hash (absent on a file never PATCHed: offset 0).
fn parse_tus(v: &Value) -> Result<TusState, StoreError> {
    let f = Fields::parse(v)?;
    let num = |name: &str| -> Result<Option<i64>, StoreError> {
        f.0.get(name)
            .map(|s| s.parse().map_err(|_| corrupt(format_args!("bad {name}"))))
            .transpose()
    };
    Ok(TusState {
        offset: num("tus_off")?.map_or(0, |n| u64::try_from(n).unwrap_or(0)),
        deferred: f.0.contains_key("tus_defer"),
        locked_until: num("tus_lock_until")?,
    })
}

fn parse_files(vs: &[Value]) -> Result<Vec<FileRecord>, StoreError> {
    vs.iter().map(parse_file).collect()
}

/// The file ids a session-wide script declares (see `session_wide`).
#[derive(Clone, Copy)]
enum IdRead {
    /// Every listed file (with their `p:` keys too when `with_parts`).
    All { with_parts: bool },
    /// One page.
    Page(Page),
}

/// The `ZRANGEBYSCORE` lower bound of the files after cursor `after`.
fn score_after(after: Option<u64>) -> String {
    after.map_or_else(|| "-inf".to_owned(), |seq| format!("({seq}"))
}

/// A next-page cursor as a script returns it ('' for none).
fn parse_cursor(v: &Value) -> Result<Option<u64>, StoreError> {
    let s = as_str(v)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| corrupt("bad cursor"))
}

/// A queued cleanup entry: `"<upload id or empty>\n<object key>"`. An entry of the layout
/// before it (file id -> fileKey only, written by an older build) names no object key: it is
/// skipped with a warning (`None`), and storage's lifecycle rule is left to it.
fn parse_cleanup(file_id: &Value, entry: &Value) -> Result<Option<Cleanup>, StoreError> {
    let file_id = as_str(file_id)?;
    let Some((upload_id, object_key)) = as_str(entry)?.split_once('\n') else {
        tracing::warn!(file_id, "cleanup entry from an older layout skipped");
        return Ok(None);
    };
    Ok(Some(Cleanup {
        file_id: file_id.to_owned(),
        object_key: object_key.to_owned(),
        upload_id: (!upload_id.is_empty()).then(|| upload_id.to_owned()),
    }))
}

/// A cleanup hash as `HGETALL` returns it (file id, entry, ...).
fn parse_cleanups(v: &Value) -> Result<Vec<Cleanup>, StoreError> {
    let arr = as_array(v)?;
    if arr.len() % 2 != 0 {
        return Err(corrupt("odd cleanup reply"));
    }
    let mut out = Vec::with_capacity(arr.len() / 2);
    for pair in arr.chunks_exact(2) {
        out.extend(parse_cleanup(&pair[0], &pair[1])?);
    }
    Ok(out)
}

/// A parts hash (`partNumber, "<size>:<etag>", ...`), sorted by part number.
fn parse_parts(v: &Value) -> Result<Vec<PartRecord>, StoreError> {
    let arr = as_array(v)?;
    if arr.len() % 2 != 0 {
        return Err(corrupt("odd parts reply"));
    }
    let mut parts = arr
        .chunks_exact(2)
        .map(|pair| {
            let part_number: u32 = as_str(&pair[0])?
                .parse()
                .map_err(|_| corrupt("bad part number"))?;
            let (size, etag) = as_str(&pair[1])?
                .split_once(':')
                .ok_or_else(|| corrupt("bad part value"))?;
            Ok(PartRecord {
                part_number,
                etag: etag.to_owned(),
                size_bytes: size.parse().map_err(|_| corrupt("bad part size"))?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    parts.sort_by_key(|p| p.part_number);
    Ok(parts)
}

/// A gate outcome that ends the operation early.
enum Early {
    SessionNotFound,
    FileNotFound,
    Expired(Box<ExpiredInfo>),
    NotActive(SessionStatus),
}

impl Early {
    fn into_gate<T>(self) -> Gate<T> {
        match self {
            Early::SessionNotFound => Gate::SessionNotFound,
            Early::FileNotFound => Gate::FileNotFound,
            Early::Expired(e) => Gate::Expired(e),
            Early::NotActive(s) => Gate::NotActive(s),
        }
    }
}

/// Splits a script reply into the gate outcome or the payload after `'ok'`.
fn gated(v: &Value) -> Result<Result<&[Value], Early>, StoreError> {
    let arr = as_array(v)?;
    let (code, rest) = arr
        .split_first()
        .ok_or_else(|| corrupt("empty script reply"))?;
    match as_str(code)? {
        "ok" => Ok(Ok(rest)),
        "snf" => Ok(Err(Early::SessionNotFound)),
        "fnf" => Ok(Err(Early::FileNotFound)),
        "na" => {
            let s = as_str(rest.first().ok_or_else(|| corrupt("na without status"))?)?;
            let status = SessionStatus::parse(s)
                .ok_or_else(|| corrupt(format_args!("session status {s:?}")))?;
            Ok(Err(Early::NotActive(status)))
        }
        "exp" => {
            let [first, session, ..] = rest else {
                return Err(corrupt("short exp reply"));
            };
            Ok(Err(Early::Expired(Box::new(ExpiredInfo {
                session: parse_session(session)?,
                first_observation: as_int(first)? == 1,
            }))))
        }
        other => Err(corrupt(format_args!("unknown reply code {other:?}"))),
    }
}

/// An event as the prelude's `record_event` stores it.
#[derive(serde::Deserialize)]
struct RawEvent {
    t: String,
    at: String,
    s: Vec<String>,
    #[serde(default)]
    f: Option<Vec<String>>,
}

/// A sorted-set score holding a time in ms (Redis may print it in exponent form).
fn score_ms(s: &str) -> Result<i64, StoreError> {
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(|f| f as i64)
        .ok_or_else(|| corrupt(format_args!("score {s:?}")))
}

/// A flat field list as the `HGETALL` reply it was copied from.
fn as_hash_reply(fields: Vec<String>) -> Value {
    Value::Array(
        fields
            .into_iter()
            .map(|f| Value::BulkString(f.into_bytes()))
            .collect(),
    )
}

/// Event `seq` of an outbox: its stored JSON and delivery state (`status` given).
fn parse_event(
    seq: &Value,
    json: &Value,
    state: &Value,
    status: impl FnOnce(i64) -> crate::events::EventStatus,
    score: i64,
) -> Result<crate::events::StoredEvent, StoreError> {
    let sequence: u64 = as_str(seq)?
        .parse()
        .map_err(|_| corrupt("event sequence number"))?;
    let raw: RawEvent =
        serde_json::from_str(as_str(json)?).map_err(|e| corrupt(format_args!("event: {e}")))?;
    let kind = crate::events::EventType::parse(&raw.t)
        .ok_or_else(|| corrupt(format_args!("event type {:?}", raw.t)))?;
    let at_ms: i64 = raw.at.parse().map_err(|_| corrupt("event time"))?;
    let session = parse_session(&as_hash_reply(raw.s))?;
    let file = match raw.f {
        Some(f) => {
            let file = parse_file(&as_hash_reply(f))?;
            Some(if kind == crate::events::EventType::FileDeleted {
                crate::events::deleted_view(file)
            } else {
                file
            })
        }
        None => None,
    };
    Ok(crate::events::StoredEvent {
        sequence,
        kind,
        at_ms,
        session,
        file,
        delivery: crate::events::Delivery::decode(as_str(state)?, at_ms),
        status: status(score),
    })
}

/// Payload element `i`.
fn at(rest: &[Value], i: usize) -> Result<&Value, StoreError> {
    rest.get(i).ok_or_else(|| corrupt("short script reply"))
}

macro_rules! payload_or_return {
    ($reply:expr) => {
        match gated(&$reply)? {
            Ok(rest) => rest,
            Err(early) => return Ok(early.into_gate()),
        }
    };
}

impl RedisStore {
    /// `register_file`, with `tus_defer` set in the file hash when `deferred`; with the
    /// session's `expires_at` (0 unless created).
    async fn register(
        &self,
        tenant: &str,
        file: &FileRecord,
        deferred: bool,
        now_ms: i64,
    ) -> Result<Gate<(Registered, i64)>, StoreError> {
        let k = self.keys_of(tenant, &file.session_id);
        let mut file = std::borrow::Cow::Borrowed(file);
        // Twice at most: the second call uses the session's part size the first one named;
        // a second `ps` answer (the part size changed in between) is corrupt data.
        for attempt in 0..2 {
            let mut inv = Call::new(
                &self.scripts.register,
                [
                    k.session(),
                    k.keys(),
                    k.order(),
                    k.file(&file.id),
                    k.events(),
                    k.event_queue(),
                ],
            );
            let (essence, any_subtype) = content_type_keys(file.content_type.as_deref());
            inv.arg(now_ms)
                .arg(&file.file_key)
                .arg(&file.id)
                .arg(file.size_bytes)
                .arg(file.part_size_bytes)
                .arg(essence)
                .arg(any_subtype);
            file_fields(&mut inv, &file);
            if deferred {
                inv.arg("tus_defer").arg("1");
            }
            let reply = self.invoke("register_file", &inv).await?;
            let rest = payload_or_return!(reply);
            if as_str(at(rest, 0)?)? != "ps" || attempt == 1 {
                return registered(rest, &file);
            }
            let session_ps: u64 = as_str(at(rest, 1)?)?.parse().map_err(corrupt)?;
            file = std::borrow::Cow::Owned(with_session_part_size(&file, session_ps));
        }
        Err(corrupt("register: no answer"))
    }
}

fn reap_member(tenant: &str, session_id: &str) -> String {
    format!("{tenant}:{session_id}")
}

fn parse_reap_member(m: &str) -> Result<(String, String), StoreError> {
    m.split_once(':')
        .map(|(t, s)| (t.to_owned(), s.to_owned()))
        .ok_or_else(|| corrupt(format_args!("reaper member {m:?}")))
}

// ---------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------

/// `f` with the part size (and count) its session's part size gives it.
fn with_session_part_size(f: &FileRecord, session_part_size: u64) -> FileRecord {
    let part_size_bytes = crate::model::part_size_for(session_part_size, f.size_bytes);
    FileRecord {
        part_size_bytes,
        part_count: crate::model::part_count(f.size_bytes, part_size_bytes),
        ..f.clone()
    }
}

/// Decodes the registration script's reply past `ok`.
fn registered(rest: &[Value], file: &FileRecord) -> Result<Gate<(Registered, i64)>, StoreError> {
    let outcome = match as_str(at(rest, 0)?)? {
        "created" => {
            let expires_at = match rest.get(1) {
                Some(v) => as_str(v)?.parse().map_err(corrupt)?,
                None => 0,
            };
            return Ok(Gate::Ok((Registered::Created(file.clone()), expires_at)));
        }
        "dup" => Registered::DuplicateKey,
        "big" => Registered::TooLarge(as_str(at(rest, 1)?)?.parse().map_err(corrupt)?),
        "type" => Registered::ContentTypeNotAllowed(allowed_types(as_str(at(rest, 1)?)?)),
        "full" => Registered::CountExceeded {
            file_limit: u32::try_from(as_int(at(rest, 1)?)?).map_err(corrupt)?,
            file_count: u32::try_from(as_int(at(rest, 2)?)?).map_err(corrupt)?,
        },
        other => return Err(corrupt(format_args!("register outcome {other:?}"))),
    };
    Ok(Gate::Ok((outcome, 0)))
}

#[async_trait]
#[allow(clippy::too_many_arguments)]
impl SessionStore for RedisStore {
    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %session.tenant, session_id = %session.id))]
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        if session.tenant.contains(':') || session.tenant.contains(['{', '}']) {
            return Err(StoreError::new(
                "tenant id must not contain ':', '{' or '}'",
            ));
        }
        let k = self.keys_of(&session.tenant, &session.id);
        let due_ms = session.expires_at.saturating_mul(1000);
        let keep_until = due_ms.saturating_add(self.retention_ms);
        let mut inv = Call::new(
            &self.scripts.create,
            [
                k.session(),
                k.keys(),
                k.order(),
                k.cleanup(),
                k.events(),
                k.event_queue(),
            ],
        );
        inv.arg(session.created_at.saturating_mul(1000))
            .arg(keep_until);
        session_fields(&mut inv, session)?;
        let member = reap_member(&session.tenant, &session.id);
        let reap_key = self.reap_key();
        let mut con = self.handle.clone();
        // The reaper index entry is written before the session: if the call is cut between
        // the two (a timeout, a dropped connection), the index names a session that does not
        // exist, which the reaper drops (`reap` finds nothing, `reap_done`); the other order
        // would leave a session the reaper never finds.
        // The outbox index entry likewise: due at once, so a replica finds the session's
        // first event even if this one dies before delivering it.
        let outbox_index = session.outbox_keep_ms.map(|_| {
            (
                self.event_index_key(&session.tenant),
                session.created_at.saturating_mul(1000),
            )
        });
        let fut = async {
            if con.is_cluster() {
                // Different slots: separate commands.
                redis::cmd("ZADD")
                    .arg(&reap_key)
                    .arg(due_ms)
                    .arg(&member)
                    .exec_async(&mut con)
                    .await?;
                if let Some((key, at)) = &outbox_index {
                    redis::cmd("ZADD")
                        .arg(key)
                        .arg(at)
                        .arg(&session.id)
                        .exec_async(&mut con)
                        .await?;
                }
                inv.query(&mut con).await.map(drop)
            } else {
                // One round trip; on NOSCRIPT (the ZADDs ran anyway, they are idempotent)
                // load the script and send the pipeline again.
                let mut pipe = redis::pipe();
                pipe.zadd(&reap_key, &member, due_ms).ignore();
                if let Some((key, at)) = &outbox_index {
                    pipe.zadd(key, &session.id, at).ignore();
                }
                pipe.add_command(inv.cmd.clone()).ignore();
                match pipe.exec_async(&mut con).await {
                    Err(e) if is_noscript(&e) => {
                        inv.script.load_async(&mut con).await?;
                        pipe.exec_async(&mut con).await
                    }
                    other => other,
                }
            }
        };
        self.bounded("create_session", fut).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn get_session(
        &self,
        tenant: &str,
        session_id: &str,
        page: Page,
        now_ms: i64,
    ) -> Result<Gate<SessionView>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let reply = self
            .session_wide(
                "get_session",
                k,
                &self.scripts.get_session,
                &[k.session(), k.order()],
                IdRead::Page(page),
                now_ms,
                &[],
            )
            .await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(SessionView {
            session: parse_session(at(rest, 0)?)?,
            next_cursor: parse_cursor(at(rest, 1)?)?,
            files: parse_files(as_array(at(rest, 2)?)?)?,
        }))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn session_deadline(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let key = self.keys_of(tenant, session_id).session();
        let mut con = self.handle.clone();
        let (exp, created): (Option<i64>, Option<i64>) = self
            .bounded("session_deadline", async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("expires_at")
                    .arg("created_at")
                    .query_async(&mut con)
                    .await
            })
            .await?;
        match (exp, created) {
            (Some(e), Some(c)) => Ok(Some((e, c))),
            (None, None) => Ok(None),
            _ => Err(corrupt("session hash without expires_at/created_at")),
        }
    }

    async fn session_owner(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<Option<String>>, StoreError> {
        let key = self.keys_of(tenant, session_id).session();
        let mut con = self.handle.clone();
        let (id, owner): (Option<String>, Option<String>) = self
            .bounded("session_owner", async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("id")
                    .arg("owner")
                    .query_async(&mut con)
                    .await
            })
            .await?;
        Ok(id.map(|_| owner))
    }

    #[tracing::instrument(level = "debug", skip(self, file), fields(session_id = %file.session_id, file_id = %file.id))]
    async fn register_file(
        &self,
        tenant: &str,
        file: &FileRecord,
        now_ms: i64,
    ) -> Result<Gate<Registered>, StoreError> {
        Ok(self
            .register(tenant, file, false, now_ms)
            .await?
            .map(|(r, _)| r))
    }

    #[tracing::instrument(level = "debug", skip(self, file), fields(session_id = %file.session_id, file_id = %file.id))]
    async fn register_tus_file(
        &self,
        tenant: &str,
        file: &FileRecord,
        deferred: bool,
        now_ms: i64,
    ) -> Result<Gate<(Registered, i64)>, StoreError> {
        self.register(tenant, file, deferred, now_ms).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn tus_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<(FileRecord, TusState)>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.get_file,
            [k.session(), k.file(file_id), k.events(), k.event_queue()],
        );
        inv.arg(now_ms).arg("0");
        let reply = self.invoke("tus_file", &inv).await?;
        let rest = payload_or_return!(reply);
        let fields = at(rest, 0)?;
        let mut state = parse_tus(fields)?;
        state.locked_until = state.locked_until.filter(|until| *until > now_ms);
        Ok(Gate::Ok((parse_file(fields)?, state)))
    }

    #[tracing::instrument(level = "debug", skip(self, req), fields(offset = req.offset))]
    async fn tus_begin(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: &TusBegin<'_>,
        now_ms: i64,
    ) -> Result<Gate<TusBegun>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.tus_begin,
            [k.session(), k.file(file_id), k.events(), k.event_queue()],
        );
        inv.arg(now_ms)
            .arg(req.token)
            .arg(now_ms.saturating_add(req.lease_ms))
            .arg(req.offset);
        let reply = self.invoke("tus_begin", &inv).await?;
        let rest = payload_or_return!(reply);
        let num = |v: &Value| -> Result<u64, StoreError> {
            as_str(v)?
                .parse()
                .map_err(|_| corrupt("tus_begin: bad number"))
        };
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "held" => {
                let fields = at(rest, 1)?;
                TusBegun::Held(parse_file(fields)?, parse_tus(fields)?)
            }
            "locked" => TusBegun::Locked,
            "offset" => TusBegun::OffsetMismatch(num(at(rest, 1)?)?),
            "notopen" => TusBegun::NotOpen(parse_file(at(rest, 1)?)?),
            other => return Err(corrupt(format_args!("tus_begin outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self, req), fields(from = req.from, to = req.to))]
    async fn tus_advance(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        req: &TusAdvance<'_>,
        now_ms: i64,
    ) -> Result<Gate<TusAdvanced>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.tus_advance,
            [
                k.session(),
                k.file(file_id),
                k.parts(file_id),
                k.tail(file_id),
                k.events(),
                k.event_queue(),
            ],
        );
        inv.arg(now_ms)
            .arg(req.token)
            .arg(now_ms.saturating_add(req.lease_ms))
            .arg(req.from)
            .arg(req.to)
            .arg(req.tail_len);
        match req.tail {
            TailOp::Keep => inv.arg("keep").arg(""),
            TailOp::Append(bytes) => inv.arg("append").arg(bytes),
            TailOp::Set(bytes) => inv.arg("set").arg(bytes),
        };
        match req.length {
            Some((size, count)) => inv.arg(size).arg(count),
            None => inv.arg("").arg(""),
        };
        for part in req.parts {
            inv.arg(part.part_number)
                .arg(format!("{}:{}", part.size_bytes, part.etag));
        }
        let reply = self.invoke("tus_advance", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "done" => TusAdvanced::Done,
            "lost" => TusAdvanced::Lost,
            "notopen" => TusAdvanced::NotOpen(parse_file(at(rest, 1)?)?),
            other => return Err(corrupt(format_args!("tus_advance outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn tus_tail(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
    ) -> Result<Vec<u8>, StoreError> {
        let key = self.keys_of(tenant, session_id).tail(file_id);
        let mut con = self.handle.clone();
        let tail: Option<Vec<u8>> = self
            .bounded("tus_tail", async move {
                redis::cmd("GET").arg(key).query_async(&mut con).await
            })
            .await?;
        Ok(tail.unwrap_or_default())
    }

    #[tracing::instrument(level = "debug", skip(self, token))]
    async fn tus_release(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
    ) -> Result<(), StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(&self.scripts.tus_release, [k.session(), k.file(file_id)]);
        inv.arg(0).arg(token);
        self.invoke("tus_release", &inv).await.map(drop)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn get_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        require_active: bool,
        now_ms: i64,
    ) -> Result<Gate<FileRecord>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.get_file,
            [k.session(), k.file(file_id), k.events(), k.event_queue()],
        );
        inv.arg(now_ms).arg(if require_active { "1" } else { "0" });
        let reply = self.invoke("get_file", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(parse_file(at(rest, 0)?)?))
    }

    #[tracing::instrument(level = "debug", skip(self, upload_id))]
    async fn set_upload_id(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<Gate<UploadIdSet>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.set_upload_id,
            [k.session(), k.file(file_id), k.events(), k.event_queue()],
        );
        inv.arg(now_ms).arg(upload_id);
        let reply = self.invoke("set_upload_id", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "stored" => UploadIdSet::Stored,
            "existing" => UploadIdSet::Existing(as_str(at(rest, 1)?)?.to_owned()),
            "notopen" => UploadIdSet::FileNotOpen(parse_file(at(rest, 1)?)?),
            other => return Err(corrupt(format_args!("set_upload_id outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self, part), fields(part_number = part.part_number))]
    async fn record_part(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        part: &PartRecord,
        now_ms: i64,
    ) -> Result<Gate<FileRecord>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.record_part,
            [
                k.session(),
                k.file(file_id),
                k.parts(file_id),
                k.events(),
                k.event_queue(),
            ],
        );
        inv.arg(now_ms)
            .arg(part.part_number)
            .arg(format!("{}:{}", part.size_bytes, part.etag));
        let reply = self.invoke("record_part", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(parse_file(at(rest, 0)?)?))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn list_parts(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<Vec<PartRecord>>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.list_parts,
            [
                k.session(),
                k.file(file_id),
                k.parts(file_id),
                k.events(),
                k.event_queue(),
            ],
        );
        inv.arg(now_ms);
        let reply = self.invoke("list_parts", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(parse_parts(at(rest, 0)?)?))
    }

    #[tracing::instrument(level = "debug", skip(self, token))]
    async fn begin_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Gate<BeginComplete>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.begin_complete,
            [
                k.session(),
                k.file(file_id),
                k.parts(file_id),
                k.events(),
                k.event_queue(),
            ],
        );
        inv.arg(now_ms)
            .arg(token)
            .arg(now_ms.saturating_add(lease_ms));
        let reply = self.invoke("begin_complete", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "done" => BeginComplete::AlreadyCompleted(parse_file(at(rest, 1)?)?),
            "aborted" => BeginComplete::Aborted,
            "busy" => BeginComplete::InProgress,
            "acquired" => {
                BeginComplete::Acquired(parse_file(at(rest, 1)?)?, parse_parts(at(rest, 2)?)?)
            }
            other => return Err(corrupt(format_args!("begin_complete outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self, token, file_url, etag))]
    async fn finish_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        file_url: &str,
        etag: &str,
        now_ms: i64,
    ) -> Result<Gate<Option<FileRecord>>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.finish_complete,
            [k.session(), k.file(file_id), k.events(), k.event_queue()],
        );
        inv.arg(now_ms).arg(token).arg(file_url).arg(etag);
        let reply = self.invoke("finish_complete", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "done" => Some(parse_file(at(rest, 1)?)?),
            "lost" => None,
            other => return Err(corrupt(format_args!("finish_complete outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self, token))]
    async fn renew_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(&self.scripts.renew_complete, [k.session(), k.file(file_id)]);
        inv.arg(0).arg(token).arg(now_ms.saturating_add(lease_ms));
        let reply = self.invoke("renew_complete", &inv).await?;
        Ok(as_int(&reply)? == 1)
    }

    #[tracing::instrument(level = "debug", skip(self, token))]
    async fn release_complete(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        token: &str,
    ) -> Result<(), StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.release_complete,
            [k.session(), k.file(file_id)],
        );
        inv.arg(0).arg(token);
        self.invoke("release_complete", &inv).await.map(drop)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn abort_file(
        &self,
        tenant: &str,
        session_id: &str,
        file_id: &str,
        now_ms: i64,
    ) -> Result<Gate<FileAborted>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.abort_file,
            [
                k.session(),
                k.keys(),
                k.file(file_id),
                k.cleanup(),
                k.parts(file_id),
                k.order(),
                k.tail(file_id),
                k.events(),
                k.event_queue(),
            ],
        );
        inv.arg(now_ms).arg(file_id);
        let reply = self.invoke("abort_file", &inv).await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "busy" => FileAborted::CompletionInProgress,
            "deleted" => {
                let entry = at(rest, 1)?;
                FileAborted::Deleted {
                    cleanup: if as_str(entry)?.is_empty() {
                        None
                    } else {
                        parse_cleanup(&Value::SimpleString(file_id.to_owned()), entry)?
                    },
                }
            }
            other => return Err(corrupt(format_args!("abort_file outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn abort_session(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<Gate<SessionAborted>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let reply = self
            .session_wide(
                "abort_session",
                k,
                &self.scripts.abort_session,
                &[k.session(), k.keys(), k.order(), k.cleanup()],
                IdRead::All { with_parts: true },
                now_ms,
                &[],
            )
            .await?;
        let rest = payload_or_return!(reply);
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "busy" => SessionAborted::CompletionInProgress,
            "forgot" => SessionAborted::Forgotten,
            "pending" => SessionAborted::CleanupFirst(parse_cleanups(at(rest, 1)?)?),
            "aborted" => SessionAborted::Aborted(parse_cleanups(at(rest, 1)?)?),
            other => return Err(corrupt(format_args!("abort_session outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn cleanup_done(
        &self,
        tenant: &str,
        session_id: &str,
        file_ids: &[String],
    ) -> Result<(), StoreError> {
        if file_ids.is_empty() {
            return Ok(());
        }
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(&self.scripts.cleanup_done, [k.session(), k.cleanup()]);
        inv.arg(0);
        for id in file_ids {
            inv.arg(id);
        }
        self.invoke("cleanup_done", &inv).await.map(drop)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn schedule_reap(
        &self,
        tenant: &str,
        session_id: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let key = self.reap_key();
        let member = reap_member(tenant, session_id);
        let mut con = self.handle.clone();
        self.bounded("schedule_reap", async move {
            // LT: the entry only ever moves earlier (a missing one is added).
            redis::cmd("ZADD")
                .arg(&key)
                .arg("LT")
                .arg(at_ms)
                .arg(&member)
                .exec_async(&mut con)
                .await
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self, checked))]
    async fn finalize(
        &self,
        tenant: &str,
        session_id: &str,
        checked: &[String],
        now_ms: i64,
    ) -> Result<Gate<Finalized>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut extra = Vec::with_capacity(checked.len() + 1);
        extra.push(FILES_PAGE_MAX.to_string());
        extra.extend_from_slice(checked);
        let reply = self
            .session_wide(
                "finalize",
                k,
                &self.scripts.finalize,
                &[k.session(), k.order()],
                IdRead::All { with_parts: false },
                now_ms,
                &extra,
            )
            .await?;
        let rest = payload_or_return!(reply);
        let ids = |v: &Value| -> Result<Vec<String>, StoreError> {
            as_array(v)?
                .iter()
                .map(|v| as_str(v).map(str::to_owned))
                .collect()
        };
        Ok(Gate::Ok(match as_str(at(rest, 0)?)? {
            "incomplete" => Finalized::Incomplete(ids(at(rest, 1)?)?),
            "unchecked" => Finalized::Unchecked(ids(at(rest, 1)?)?),
            "done" => Finalized::Done(SessionView {
                session: parse_session(at(rest, 1)?)?,
                next_cursor: parse_cursor(at(rest, 2)?)?,
                files: parse_files(as_array(at(rest, 3)?)?)?,
            }),
            other => return Err(corrupt(format_args!("finalize outcome {other:?}"))),
        }))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn claim_expired(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = Call::new(&self.scripts.claim, [self.reap_key()]);
        inv.arg(now_ms)
            .arg(now_ms.saturating_add(lease_ms))
            .arg(i64::try_from(limit).unwrap_or(i64::MAX));
        let reply = self.invoke("claim_expired", &inv).await?;
        as_array(&reply)?
            .iter()
            .map(|m| parse_reap_member(as_str(m)?))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn reap(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
    ) -> Result<Option<Reaped>, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let reply = self
            .session_wide(
                "reap",
                k,
                &self.scripts.reap,
                &[k.session(), k.order(), k.cleanup()],
                IdRead::All { with_parts: false },
                now_ms,
                &[],
            )
            .await?;
        let arr = as_array(&reply)?;
        let (code, rest) = arr
            .split_first()
            .ok_or_else(|| corrupt("empty reap reply"))?;
        match as_str(code)? {
            "none" => Ok(None),
            "ok" => {
                let [first, session, busy, open, queued] = rest else {
                    return Err(corrupt("short reap reply"));
                };
                let busy = as_str(busy)?;
                Ok(Some(Reaped {
                    session: parse_session(session)?,
                    first_observation: as_int(first)? == 1,
                    open_uploads: parse_files(as_array(open)?)?,
                    cleanup: parse_cleanups(queued)?,
                    busy_until: if busy.is_empty() {
                        None
                    } else {
                        Some(busy.parse().map_err(corrupt)?)
                    },
                }))
            }
            other => Err(corrupt(format_args!("reap outcome {other:?}"))),
        }
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn reap_done(
        &self,
        tenant: &str,
        session_id: &str,
        claimed_until: i64,
        next_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut inv = Call::new(&self.scripts.reschedule, [self.reap_key()]);
        inv.arg(reap_member(tenant, session_id)).arg(claimed_until);
        match next_ms {
            Some(at) => inv.arg(at),
            None => inv.arg(""),
        };
        self.invoke("reap_done", &inv).await.map(drop)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn reserve_live(
        &self,
        tenant: &str,
        session_id: &str,
        expires_at_ms: i64,
        limit: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut inv = Call::new(&self.scripts.live_reserve, [self.live_key(tenant)]);
        inv.arg(now_ms)
            .arg(session_id)
            .arg(expires_at_ms)
            .arg(limit);
        let reply = self.invoke("reserve_live", &inv).await?;
        Ok(as_int(&reply)? == 1)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn release_live(&self, tenant: &str, session_id: &str) -> Result<(), StoreError> {
        let key = self.live_key(tenant);
        let mut con = self.handle.clone();
        self.bounded("release_live", async move {
            redis::cmd("ZREM")
                .arg(&key)
                .arg(session_id)
                .exec_async(&mut con)
                .await
        })
        .await
    }

    async fn claim_event_sessions(
        &self,
        tenant: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut inv = Call::new(&self.scripts.claim, [self.event_index_key(tenant)]);
        inv.arg(now_ms)
            .arg(now_ms.saturating_add(lease_ms))
            .arg(i64::try_from(limit).unwrap_or(i64::MAX));
        let reply = self.invoke("claim_event_sessions", &inv).await?;
        as_array(&reply)?
            .iter()
            .map(|v| as_str(v).map(str::to_owned))
            .collect()
    }

    async fn event_session_done(
        &self,
        tenant: &str,
        session_id: &str,
        claimed_until: i64,
        next_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut inv = Call::new(&self.scripts.reschedule, [self.event_index_key(tenant)]);
        inv.arg(session_id).arg(claimed_until);
        match next_ms {
            Some(at) => inv.arg(at),
            None => inv.arg(""),
        };
        self.invoke("event_session_done", &inv).await.map(drop)
    }

    async fn claim_events(
        &self,
        tenant: &str,
        session_id: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<super::ClaimedEvents, StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(
            &self.scripts.ev_claim,
            [k.session(), k.events(), k.event_queue(), k.event_states()],
        );
        let lease_end = now_ms.saturating_add(lease_ms);
        inv.arg(now_ms)
            .arg(lease_end)
            .arg(i64::try_from(limit).unwrap_or(i64::MAX));
        let reply = self.invoke("claim_events", &inv).await?;
        let r = as_array(&reply)?;
        let exists = as_int(at(r, 0)?)? == 1;
        let pending = u64::try_from(as_int(at(r, 1)?)?).unwrap_or(0);
        let next_due_ms = match as_str(at(r, 2)?)? {
            "" => None,
            n => Some(score_ms(n)?),
        };
        let rows = as_array(at(r, 3)?)?;
        let mut events = Vec::with_capacity(rows.len() / 3);
        for row in rows.chunks(3) {
            let [seq, json, state] = row else {
                return Err(corrupt("short claim_events reply"));
            };
            events.push(parse_event(
                seq,
                json,
                state,
                crate::events::EventStatus::Pending,
                lease_end,
            )?);
        }
        Ok(super::ClaimedEvents {
            events,
            pending,
            next_due_ms,
            drained: !exists && pending == 0,
        })
    }

    async fn event_attempted(
        &self,
        tenant: &str,
        session_id: &str,
        sequence: u64,
        delivery: &crate::events::Delivery,
        outcome: super::Attempted,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(&self.scripts.ev_done, k.outbox());
        inv.arg(now_ms).arg(sequence).arg(delivery.encode());
        match outcome {
            super::Attempted::Delivered => inv.arg("done"),
            super::Attempted::Dead => inv.arg("dead"),
            super::Attempted::RetryAt(at) => inv.arg(at),
        };
        if outcome == super::Attempted::Dead {
            // Listed among the tenant's dead letters: written first, so a cut between the
            // two leaves an entry naming nothing dead (skipped by the listing), never a dead
            // letter the listing cannot find.
            self.zadd(
                "event_attempted",
                &self.dead_index_key(tenant),
                now_ms,
                session_id,
            )
            .await?;
        }
        self.invoke("event_attempted", &inv).await.map(drop)
    }

    async fn list_events(
        &self,
        tenant: &str,
        failed: bool,
        after: Option<(&str, u64)>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<crate::events::StoredEvent>, StoreError> {
        let index = if failed {
            self.dead_index_key(tenant)
        } else {
            self.event_index_key(tenant)
        };
        let mut con = self.handle.clone();
        let mut sessions: Vec<String> = self
            .bounded("list_events", async move {
                redis::cmd("ZRANGE")
                    .arg(index)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        sessions.sort();
        let mut out = Vec::new();
        for session_id in &sessions {
            let from = match after {
                Some((s, _)) if session_id.as_str() < s => continue,
                Some((s, seq)) if session_id == s => seq,
                _ => 0,
            };
            if out.len() >= limit {
                break;
            }
            let k = self.keys_of(tenant, session_id);
            let mut inv = Call::new(&self.scripts.ev_list, k.outbox());
            inv.arg(0)
                .arg(if failed { "failed" } else { "pending" })
                .arg(from)
                .arg(limit - out.len());
            let reply = self.invoke("list_events", &inv).await?;
            if failed && from == 0 && as_array(&reply)?.is_empty() {
                // No dead letter left: the entry goes, unless it was written in the last
                // minute (a dead letter on its way: the index entry comes first).
                let mut prune = Call::new(&self.scripts.index_prune, [self.dead_index_key(tenant)]);
                prune
                    .arg(session_id.as_str())
                    .arg(now_ms.saturating_sub(60_000));
                self.invoke("list_events", &prune).await?;
            }
            for row in as_array(&reply)?.chunks(4) {
                let [seq, json, state, score] = row else {
                    return Err(corrupt("short list_events reply"));
                };
                let score = score_ms(as_str(score)?)?;
                let status = if failed {
                    crate::events::EventStatus::Failed
                } else {
                    crate::events::EventStatus::Pending
                };
                out.push(parse_event(seq, json, state, status, score)?);
            }
        }
        Ok(out)
    }

    async fn retry_event(
        &self,
        tenant: &str,
        session_id: &str,
        sequence: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        // Back in the outbox index first (an entry naming nothing due is harmless).
        self.zadd(
            "retry_event",
            &self.event_index_key(tenant),
            now_ms,
            session_id,
        )
        .await?;
        let k = self.keys_of(tenant, session_id);
        let mut inv = Call::new(&self.scripts.ev_retry, k.outbox());
        inv.arg(now_ms).arg(sequence);
        let reply = self.invoke("retry_event", &inv).await?;
        Ok(as_int(&reply)? == 1)
    }

    async fn upload_token_key(&self) -> Result<Vec<u8>, StoreError> {
        let key = format!("{}:upload-token-key", self.prefix);
        let mut inv = Call::new(&self.scripts.token_key, [key]);
        inv.arg(hex::encode(crate::tokens::random_key()));
        let reply = self.invoke("upload_token_key", &inv).await?;
        hex::decode(as_str(&reply)?)
            .ok()
            .filter(|k| k.len() == crate::tokens::KEY_LEN)
            .ok_or_else(|| {
                StoreError::new("the upload token key in Redis is not 32 hex-encoded bytes")
            })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut con = self.handle.clone();
        self.bounded("ping", async move {
            redis::cmd("PING").exec_async(&mut con).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    /// The strict `call` the conformance suite runs every script with: a command on a key
    /// not declared in `KEYS` fails the script (and a declared one works), for one-key
    /// commands and for the all-keys ones (`DEL`, `EXISTS`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strict_call_refuses_undeclared_keys() {
        let server = upgate_testkit::RedisServer::start();
        let client = redis::Client::open(server.url()).expect("client");
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let script = |body: &str| Script::new(&format!("{CALL_STRICT}\n{body}"));
        let ok: String = script("call('SET', KEYS[1], 'v') return call('GET', KEYS[1])")
            .key("{t}:a")
            .invoke_async(&mut con)
            .await
            .expect("declared keys work");
        assert_eq!(ok, "v");
        for body in [
            "return call('GET', KEYS[1] .. 'x')",
            "return call('HGET', string.sub(KEYS[1], 1, -2) .. 'f:1', 'status')",
            "return call('DEL', KEYS[1], '{t}:b')",
            "return call('EXISTS', KEYS[1], '{t}:b')",
        ] {
            let err = script(body)
                .key("{t}:a")
                .invoke_async::<redis::Value>(&mut con)
                .await
                .expect_err(body);
            assert!(err.to_string().contains("undeclared key"), "{body}: {err}");
        }
    }

    use super::*;

    /// Every key of a session carries the same `{tenant:session}` hash tag, and the bytes a
    /// key writes into a command are exactly its display form.
    #[test]
    fn session_keys_share_one_hash_tag_and_encode_as_displayed() {
        let k = SessionKeys {
            prefix: "upgate",
            tenant: "acme",
            session_id: "s-1",
        };
        let keys = [
            (k.session(), "upgate:{acme:s-1}:s"),
            (k.keys(), "upgate:{acme:s-1}:keys"),
            (k.order(), "upgate:{acme:s-1}:o"),
            (k.cleanup(), "upgate:{acme:s-1}:c"),
            (k.file("f-9"), "upgate:{acme:s-1}:f:f-9"),
            (k.parts("f-9"), "upgate:{acme:s-1}:p:f-9"),
        ];
        for (key, want) in keys {
            assert_eq!(key.to_string(), want);
            assert_eq!(key.to_redis_args(), vec![want.as_bytes().to_vec()]);
            // Redis Cluster hashes what lies between the first `{` and the next `}`.
            let tag = want
                .split_once('{')
                .and_then(|(_, rest)| rest.split_once('}'))
                .map(|(tag, _)| tag);
            assert_eq!(tag, Some("acme:s-1"));
        }
    }

    /// A script call is `EVALSHA <sha1> <number of keys> <keys...> <args...>`, one argument
    /// per key and per value, numbers in decimal.
    #[test]
    fn script_call_encodes_evalsha_keys_then_arguments() {
        let script = Script::new("return 1");
        let k = SessionKeys {
            prefix: "p",
            tenant: "t",
            session_id: "s",
        };
        let mut call = Call::new(&script, [k.session(), k.file("f")]);
        call.arg(42_i64).arg("x");
        let args: Vec<Vec<u8>> = call
            .cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => b"<not a plain argument>".to_vec(),
            })
            .collect();
        let want: Vec<Vec<u8>> = [
            "EVALSHA",
            script.get_hash(),
            "2",
            "p:{t:s}:s",
            "p:{t:s}:f:f",
            "42",
            "x",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        assert_eq!(args, want);
    }

    #[test]
    fn cleanup_entries_parse_and_older_ones_are_skipped() {
        let id = Value::BulkString(b"f-1".to_vec());
        let entry = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            parse_cleanup(&id, &entry("up-1\nt/s/f-1/a.bin")).unwrap(),
            Some(Cleanup {
                file_id: "f-1".into(),
                object_key: "t/s/f-1/a.bin".into(),
                upload_id: Some("up-1".into()),
            })
        );
        assert_eq!(
            parse_cleanup(&id, &entry("\nt/s/f-1/a.bin")).unwrap(),
            Some(Cleanup {
                file_id: "f-1".into(),
                object_key: "t/s/f-1/a.bin".into(),
                upload_id: None,
            })
        );
        // The older layout (file id -> fileKey): skipped, not an error for the whole session.
        assert_eq!(parse_cleanup(&id, &entry("a.bin")).unwrap(), None);
        let hash = Value::Array(vec![id.clone(), entry("a.bin"), id, entry("u\nk")]);
        assert_eq!(parse_cleanups(&hash).unwrap().len(), 1);
    }

    #[test]
    fn parsers_reject_garbage_without_panicking() {
        assert!(gated(&Value::Nil).is_err());
        assert!(gated(&Value::Int(3)).is_err());
        assert!(gated(&Value::Array(vec![Value::BulkString(b"weird".to_vec())])).is_err());
        assert!(gated(&Value::Array(vec![Value::BulkString(b"exp".to_vec())])).is_err());
        assert!(gated(&Value::Array(vec![
            Value::BulkString(b"na".to_vec()),
            Value::BulkString(b"zzz".to_vec())
        ]))
        .is_err());
        assert!(parse_session(&Value::Array(vec![Value::BulkString(b"id".to_vec())])).is_err());
        assert!(parse_file(&Value::Array(vec![])).is_err());
        assert!(parse_parts(&Value::Array(vec![
            Value::BulkString(b"1".to_vec()),
            Value::BulkString(b"nocolon".to_vec())
        ]))
        .is_err());
        assert!(parse_reap_member("nocolon").is_err());
    }

    /// Reply values shaped like the scripts' (arrays of words the decoders look for,
    /// numbers, field/value pairs) and garbage.
    fn reply() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let word = prop_oneof![
            Just("ok"),
            Just("snf"),
            Just("exp"),
            Just("na"),
            Just("fnf"),
            Just("created"),
            Just("dup"),
            Just("full"),
            Just("ps"),
            Just("status"),
            Just("active"),
            Just("expires_at"),
            Just("id"),
            Just("part_size_bytes"),
            Just("size_bytes"),
            Just("1"),
            Just("0"),
            Just("-1"),
            Just("99999999999999999999"),
            Just("1:e"),
        ]
        .prop_map(|w| Value::BulkString(w.as_bytes().to_vec()));
        let leaf = prop_oneof![
            4 => word,
            1 => Just(Value::Nil),
            1 => any::<i64>().prop_map(Value::Int),
            1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::BulkString),
        ];
        leaf.prop_recursive(3, 40, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(Value::Array)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
        ))]
        /// No reply, however malformed, panics a decoder: it is a value or a StoreError.
        #[test]
        fn reply_decoders_never_panic(v in reply()) {
            let _ = gated(&v);
            let _ = parse_session(&v);
            let _ = parse_file(&v);
            let _ = parse_parts(&v);
            if let Value::Array(items) = &v {
                let _ = parse_files(items);
                let _ = registered(items, &sample_file());
                if let Ok(Ok(rest)) = gated(&v) {
                    let _ = registered(rest, &sample_file());
                    let _ = parse_files(rest);
                }
            }
        }
    }

    fn sample_file() -> FileRecord {
        FileRecord {
            id: "f".into(),
            session_id: "s".into(),
            file_key: "k".into(),
            file_name: "n".into(),
            size_bytes: 1,
            content_type: None,
            status: FileStatus::Registered,
            part_size_bytes: 5 * 1024 * 1024,
            part_count: 1,
            created_at: 0,
            object_key: "o".into(),
            upload_id: None,
            file_url: None,
            etag: None,
            metadata: [("k".to_owned(), "v \"quoted\" é".to_owned())].into(),
            tus_form: Some("_c~ a_p~b c.p~d".into()),
        }
    }

    #[test]
    fn parts_sort_and_keep_colons_in_etags() {
        let v = Value::Array(vec![
            Value::BulkString(b"10".to_vec()),
            Value::BulkString(b"5:a:b".to_vec()),
            Value::BulkString(b"2".to_vec()),
            Value::BulkString(b"7:c".to_vec()),
        ]);
        let parts = parse_parts(&v).unwrap();
        assert_eq!(parts[0].part_number, 2);
        assert_eq!(parts[1].etag, "a:b");
        assert_eq!(parts[1].size_bytes, 5);
    }

    #[test]
    fn reap_member_round_trips() {
        let m = reap_member("acme_co-1", "0190c2d1-7f00-7000-8000-000000000000");
        assert_eq!(
            parse_reap_member(&m).unwrap(),
            (
                "acme_co-1".to_owned(),
                "0190c2d1-7f00-7000-8000-000000000000".to_owned()
            )
        );
    }
}
