use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::Script;

use super::lease::{Answer, LeasePolicy, Leases, Plan};
use super::{Decision, Quota, RateLimitBackend};
use crate::BoxError;

/// GCRA in one Lua script, granting up to `n` tokens at once. Times in microseconds; the
/// clock is Redis `TIME`.
///
/// KEYS[1] = bucket key, ARGV[1] = emission interval (us), ARGV[2] = burst, ARGV[3] = the
/// most tokens wanted (1 for one request). Grants as many as fit, at least one or none.
/// Returns {granted, remaining, retry_after_us, reset_after_us}.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tau = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local fit = math.floor((now + tau - tat) / interval)
if fit < 1 then
  return {0, 0, tat + interval - tau - now, tat - now}
end
local granted = math.min(want, fit)
local new_tat = tat + granted * interval
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {granted, math.floor((now + tau - new_tat) / interval), 0, new_tat - now}
"#;

/// Distributed GCRA in Redis: one `EVALSHA` per decision (with `EVAL` fallback on
/// `NOSCRIPT`; fewer for busy keys with [`lease`](Self::lease)), clock from Redis `TIME`
/// so all replicas share one clock.
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
    leases: Option<Leases>,
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
            leases: None,
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

    /// Lets this instance (and its clones) take up to `max_tokens` tokens from Redis in one
    /// round trip when one key is busy, and spend them locally for up to `ttl`.
    ///
    /// Every token still comes out of the one bucket in Redis, so all replicas together
    /// never admit more than the bucket holds; over any window they admit at most what the
    /// quota allows in that window plus `ttl` × its rate. Tokens are not shared between replicas while
    /// held, and tokens left when a lease lapses are lost, so a busy tenant near its limit
    /// can see a 429 slightly before the bucket is empty. The lease starts at one token (a
    /// round trip per request), doubles while the key stays busy, never exceeds a tenth of
    /// the quota's burst, and drops back to one when the key goes quiet or Redis refuses:
    /// quotas with a burst under 20 are always decided exactly, one round trip each.
    ///
    /// ```no_run
    /// # async fn f() -> redis::RedisResult<()> {
    /// # let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
    /// use std::time::Duration;
    /// let backend = upgate_layers::rate_limit::RedisGcra::new(conn)
    ///     .lease(64, Duration::from_millis(250));
    /// # Ok(()) }
    /// ```
    pub fn lease(mut self, max_tokens: u32, ttl: std::time::Duration) -> Self {
        self.leases = (max_tokens > 1).then(|| Leases::new(LeasePolicy { max_tokens, ttl }));
        self
    }
}

fn to_duration(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// One script run's answer.
struct Grant {
    granted: u32,
    remaining: u32,
    retry_after: Duration,
    reset_after: Duration,
}

impl Grant {
    /// The lease bookkeeping's view, `spent` tokens used by the asking request.
    fn answer(&self, spent: u32) -> Answer {
        Answer {
            granted: self.granted,
            spent,
            remaining: self.remaining,
            reset: self.reset_after,
            retry_after: self.retry_after,
        }
    }

    /// The decision for the request that asked, which spends the first granted token and
    /// leaves `held` more in the local lease.
    fn decision(&self, burst: u32, held: u32) -> Decision {
        Decision {
            allowed: self.granted > 0,
            limit: burst,
            remaining: self.remaining.saturating_add(held).min(burst),
            reset_after: self.reset_after,
            retry_after: (self.granted == 0).then_some(self.retry_after),
        }
    }
}

impl<C> RedisGcra<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn grant(
        &self,
        full_key: &str,
        interval_us: u64,
        burst: u32,
        want: u32,
    ) -> Result<Grant, BoxError> {
        let mut conn = self.conn.clone();
        let (granted, remaining, retry_us, reset_us): (i64, i64, i64, i64) = self
            .script
            .key(full_key)
            .arg(interval_us)
            .arg(burst)
            .arg(want)
            .invoke_async(&mut conn)
            .await?;
        Ok(Grant {
            granted: u32::try_from(granted.max(0)).unwrap_or(0).min(want),
            remaining: u32::try_from(remaining.max(0)).unwrap_or(0).min(burst),
            retry_after: to_duration(retry_us),
            reset_after: to_duration(reset_us),
        })
    }
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
        let mut full_key = String::with_capacity(self.prefix.len() + key.len());
        full_key.push_str(&self.prefix);
        full_key.push_str(key);
        let interval_us = quota.emission_interval().as_micros().max(1) as u64;
        let burst = quota.burst();
        let plan = match &self.leases {
            Some(leases) => leases.plan(&full_key, burst),
            None => Plan::Exact,
        };
        async move {
            match plan {
                Plan::Local(decision) | Plan::Refuse(decision) => Ok(decision),
                Plan::Exact => {
                    let g = self.grant(&full_key, interval_us, burst, 1).await?;
                    if let Some(leases) = &self.leases {
                        leases.record_refusal(&full_key, g.answer(1));
                    }
                    Ok(g.decision(burst, 0))
                }
                Plan::Fetch(want) => {
                    let Some(leases) = &self.leases else {
                        return Err("lease plan without leases".into());
                    };
                    let guard = leases.guard(&full_key);
                    let g = self.grant(&full_key, interval_us, burst, want).await?;
                    guard.finish(g.answer(1));
                    Ok(g.decision(burst, g.granted.saturating_sub(1)))
                }
                Plan::LocalThenRefill(decision, want) => {
                    let Some(leases) = &self.leases else {
                        return Ok(decision);
                    };
                    let guard = leases.guard(&full_key);
                    // This request already holds a token: a failed refill only means the
                    // next requests ask Redis themselves (the guard resets the lease).
                    if let Ok(g) = self.grant(&full_key, interval_us, burst, want).await {
                        guard.finish(g.answer(0));
                    }
                    Ok(decision)
                }
            }
        }
    }
}
