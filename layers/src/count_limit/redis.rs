use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::Script;

use super::{Acquired, CountBackend};
use crate::BoxError;

/// KEYS[1] = counter; ARGV = limit, ttl (ms). Returns {acquired, count}.
const ACQUIRE_LUA: &str = r#"
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then return {0, count} end
count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, count}
"#;

/// KEYS[1] = counter. Returns the count after release.
const RELEASE_LUA: &str = r#"
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count <= 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
return redis.call('DECR', KEYS[1])
"#;

/// Redis counters: one Lua script per acquire or release.
///
/// Keys are `<prefix><key>` (the key verbatim, so `{hash tags}` work in Redis
/// Cluster). Every acquire refreshes the key's TTL (default 1 hour): a safety net
/// so slots leaked by crashed replicas eventually disappear; choose a TTL longer
/// than the longest legitimate hold.
///
/// ```no_run
/// use upgate_layers::count_limit::{CountBackend, RedisCount};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), upgate_layers::BoxError> {
/// let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
/// let backend = RedisCount::new(conn)
///     .prefix("upgate:uploads:")
///     .ttl(std::time::Duration::from_secs(6 * 3600));
/// if backend.acquire("{tenant-1}", 10).await?.acquired {
///     backend.release("{tenant-1}").await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisCount<C> {
    conn: C,
    prefix: String,
    ttl: Duration,
    acquire: Script,
    release: Script,
}

impl<C> RedisCount<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Counters using `conn`, prefix `cnt:`, TTL 1 hour.
    ///
    /// ```no_run
    /// # async fn f() -> redis::RedisResult<()> {
    /// let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
    /// let backend = upgate_layers::count_limit::RedisCount::new(conn);
    /// # Ok(()) }
    /// ```
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            prefix: "cnt:".to_owned(),
            ttl: Duration::from_secs(3600),
            acquire: Script::new(ACQUIRE_LUA),
            release: Script::new(RELEASE_LUA),
        }
    }

    /// Sets the key prefix.
    ///
    /// ```no_run
    /// # async fn f() -> redis::RedisResult<()> {
    /// # let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
    /// let backend = upgate_layers::count_limit::RedisCount::new(conn).prefix("app:cnt:");
    /// # Ok(()) }
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the safety-net TTL refreshed on every acquire.
    ///
    /// ```no_run
    /// # async fn f() -> redis::RedisResult<()> {
    /// # let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
    /// let backend = upgate_layers::count_limit::RedisCount::new(conn).ttl(std::time::Duration::from_secs(600));
    /// # Ok(()) }
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    fn full_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }
}

impl<C> CountBackend for RedisCount<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn acquire(
        &self,
        key: &str,
        limit: u64,
    ) -> impl Future<Output = Result<Acquired, BoxError>> + Send {
        let mut conn = self.conn.clone();
        let key = self.full_key(key);
        let ttl = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        async move {
            let (acquired, count): (i64, i64) = self
                .acquire
                .key(key)
                .arg(limit)
                .arg(ttl)
                .invoke_async(&mut conn)
                .await?;
            Ok(Acquired {
                acquired: acquired == 1,
                count: u64::try_from(count).unwrap_or(0),
            })
        }
    }

    fn release(&self, key: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let mut conn = self.conn.clone();
        let key = self.full_key(key);
        async move {
            let _: i64 = self.release.key(key).invoke_async(&mut conn).await?;
            Ok(())
        }
    }
}
