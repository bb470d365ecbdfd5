use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Script, Value};

use super::{IdempotencyStore, Reservation, StoredResponse};
use crate::BoxError;

/// KEYS[1] = record; ARGV = fingerprint, owner, lock ttl (ms).
/// Returns {0} reserved, {1} in progress, {2, response} completed, {3} mismatch.
const RESERVE_LUA: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'fp', 'st', 'resp')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'st', 'p', 'own', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {0}
end
if cur[1] ~= ARGV[1] then return {3} end
if cur[2] == 'c' and cur[3] then return {2, cur[3]} end
return {1}
"#;

/// KEYS[1] = record; ARGV = owner, mode ('c' complete / 'r' release), ttl (ms), response.
const FINISH_LUA: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'own', 'st')
if cur[1] ~= ARGV[1] or cur[2] ~= 'p' then return 0 end
if ARGV[2] == 'r' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'st', 'c', 'resp', ARGV[4])
redis.call('HDEL', KEYS[1], 'own')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Redis [`IdempotencyStore`]: one Lua script to reserve, one to complete or release.
///
/// Records are hashes at the full key given by the layer (`<prefix><scope>:<key>`),
/// which the store uses verbatim, so a `{hash tag}` in the scope keeps working in
/// Redis Cluster. Every record has a TTL (the lock TTL while reserved).
///
/// ```no_run
/// use upgate_layers::idempotency::{IdempotencyLayer, RedisStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), upgate_layers::BoxError> {
/// let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
/// let layer = IdempotencyLayer::new(
///     |_req: &http::Request<http_body_util::Full<bytes::Bytes>>| Some("{tenant-1}".to_owned()),
///     RedisStore::new(conn),
/// );
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisStore<C> {
    conn: C,
    reserve: Script,
    finish: Script,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store using `conn` (a multiplexed connection or a `ConnectionManager`).
    ///
    /// ```no_run
    /// # async fn f() -> redis::RedisResult<()> {
    /// let conn = redis::Client::open("redis://127.0.0.1/")?.get_multiplexed_async_connection().await?;
    /// let store = upgate_layers::idempotency::RedisStore::new(conn);
    /// # Ok(()) }
    /// ```
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            reserve: Script::new(RESERVE_LUA),
            finish: Script::new(FINISH_LUA),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn parse_reservation(reply: Vec<Value>) -> Result<Reservation, BoxError> {
    let mut it = reply.into_iter();
    let code = match it.next() {
        Some(Value::Int(c)) => c,
        other => return Err(format!("unexpected reserve reply: {other:?}").into()),
    };
    Ok(match code {
        0 => Reservation::Reserved,
        1 => Reservation::InProgress,
        3 => Reservation::FingerprintMismatch,
        2 => match it.next() {
            Some(Value::BulkString(data)) => Reservation::Completed(
                StoredResponse::decode(&data).ok_or("corrupt stored idempotent response")?,
            ),
            other => return Err(format!("unexpected reserve reply: {other:?}").into()),
        },
        other => return Err(format!("unexpected reserve code {other}").into()),
    })
}

impl<C> IdempotencyStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn reserve(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        owner: &str,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<Reservation, BoxError>> + Send {
        let mut conn = self.conn.clone();
        async move {
            let reply: Vec<Value> = self
                .reserve
                .key(key)
                .arg(&fingerprint[..])
                .arg(owner)
                .arg(millis(lock_ttl))
                .invoke_async(&mut conn)
                .await?;
            parse_reservation(reply)
        }
    }

    fn complete(
        &self,
        key: &str,
        owner: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let mut conn = self.conn.clone();
        let encoded = response.encode();
        async move {
            let _: i64 = self
                .finish
                .key(key)
                .arg(owner)
                .arg("c")
                .arg(millis(ttl))
                .arg(&encoded[..])
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        }
    }

    fn release(&self, key: &str, owner: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let mut conn = self.conn.clone();
        async move {
            let _: i64 = self
                .finish
                .key(key)
                .arg(owner)
                .arg("r")
                .arg(1u64)
                .arg("")
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        }
    }
}
