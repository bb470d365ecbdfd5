use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::Script;

use super::{Decision, Quota, RateLimitBackend};
use crate::BoxError;

/// GCRA in one Lua script. Times in microseconds; the clock is Redis `TIME`.
///
/// KEYS[1] = bucket key, ARGV[1] = emission interval (us), ARGV[2] = burst.
/// Returns {allowed, remaining, retry_after_us, reset_after_us}.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tau = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tau
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {1, math.floor((now + tau - new_tat) / interval), 0, new_tat - now}
"#;

/// Distributed GCRA in Redis: one `EVALSHA` per decision (with `EVAL` fallback on
/// `NOSCRIPT`), clock from Redis `TIME` so all replicas share one clock.
///
/// Bucket keys are `<prefix><key>`; the key is used verbatim, so a `{hash tag}` in it
/// keeps working in Redis Cluster. Each bucket expires as soon as it is full again,
/// so nothing lives forever.
///
/// ```no_run
/// use upgate_layers::rate_limit::{Quota, RateLimitBackend, RedisGcra};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), upgate_layers::BoxError> {
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let conn = client.get_multiplexed_async_connection().await?;
/// let backend = RedisGcra::new(conn).prefix("upgate:rl:");
/// let decision = backend.check("{tenant-1}", Quota::new(10, 100)).await?;
/// println!("allowed: {}", decision.allowed);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisGcra<C> {
    conn: C,
    prefix: String,
    script: Script,
}

impl<C> RedisGcra<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A backend using `conn` (a multiplexed connection or a `ConnectionManager`),
    /// with the key prefix `rl:`.
    ///
    /// ```no_run
    /// # async fn f() -> redis::RedisResult<()> {
    /// let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
    /// let backend = upgate_layers::rate_limit::RedisGcra::new(conn);
    /// # Ok(()) }
    /// ```
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            prefix: "rl:".to_owned(),
            script: Script::new(GCRA_LUA),
        }
    }

    /// Sets the key prefix.
    ///
    /// ```no_run
    /// # async fn f() -> redis::RedisResult<()> {
    /// # let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
    /// let backend = upgate_layers::rate_limit::RedisGcra::new(conn).prefix("app:rl:");
    /// # Ok(()) }
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

fn to_duration(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

impl<C> RateLimitBackend for RedisGcra<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn check(
        &self,
        key: &str,
        quota: Quota,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send {
        let mut conn = self.conn.clone();
        let mut full_key = String::with_capacity(self.prefix.len() + key.len());
        full_key.push_str(&self.prefix);
        full_key.push_str(key);
        let interval_us = quota.emission_interval().as_micros().max(1) as u64;
        let burst = quota.burst();
        async move {
            let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) = self
                .script
                .key(full_key)
                .arg(interval_us)
                .arg(burst)
                .invoke_async(&mut conn)
                .await?;
            Ok(Decision {
                allowed: allowed == 1,
                limit: burst,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(0).min(burst),
                reset_after: to_duration(reset_us),
                retry_after: (allowed != 1).then(|| to_duration(retry_us)),
            })
        }
    }
}
