use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::RateLimiter;

use super::{Decision, Quota, RateLimitBackend};
use crate::BoxError;

/// Time source of the in-process limiters: `tokio::time::Instant`, so that
/// `tokio::time::pause()` / `advance()` control it in tests.
#[derive(Clone, Debug)]
struct TokioClock {
    origin: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.origin)
    }
}

type Limiter =
    RateLimiter<String, DashMapStateStore<String>, TokioClock, StateInformationMiddleware>;

/// How many decisions between two sweeps of idle keys.
const SWEEP_EVERY: u64 = 8192;

/// In-process GCRA backed by `governor`: one keyed limiter per distinct [`Quota`].
///
/// State is per process (each replica limits on its own). Time comes from
/// `tokio::time::Instant`, so `tokio::time::pause()` controls it in tests. Keys whose
/// bucket is full again are swept periodically.
///
/// ```
/// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitBackend};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let backend = InProcess::new();
/// let q = Quota::new(1, 2);
/// assert!(backend.check("a", q).await.unwrap().allowed);
/// assert!(backend.check("a", q).await.unwrap().allowed);
/// let third = backend.check("a", q).await.unwrap();
/// assert!(!third.allowed);
/// assert_eq!(third.retry_after_secs(), Some(1));
/// // Another key has its own bucket.
/// assert!(backend.check("b", q).await.unwrap().allowed);
/// # }
/// ```
#[derive(Debug)]
pub struct InProcess {
    limiters: RwLock<HashMap<Quota, Arc<Limiter>>>,
    clock: TokioClock,
    decisions: AtomicU64,
}

impl Default for InProcess {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcess {
    /// An empty backend.
    ///
    /// ```
    /// let backend = upgate_layers::rate_limit::InProcess::new();
    /// assert_eq!(backend.len(), 0);
    /// ```
    pub fn new() -> Self {
        Self {
            limiters: RwLock::new(HashMap::new()),
            clock: TokioClock {
                origin: tokio::time::Instant::now(),
            },
            decisions: AtomicU64::new(0),
        }
    }

    /// Number of keys currently tracked (across all quotas).
    ///
    /// ```
    /// use upgate_layers::rate_limit::{InProcess, Quota};
    /// let backend = InProcess::new();
    /// backend.check_now("k", Quota::new(1, 1));
    /// assert_eq!(backend.len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.read().values().map(|l| l.len()).sum()
    }

    /// Whether no key is tracked.
    ///
    /// ```
    /// assert!(upgate_layers::rate_limit::InProcess::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets keys whose bucket is full again (it is also done automatically).
    ///
    /// ```
    /// let backend = upgate_layers::rate_limit::InProcess::new();
    /// backend.sweep();
    /// ```
    pub fn sweep(&self) {
        for limiter in self.read().values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// The decision, synchronously (what [`RateLimitBackend::check`] resolves to).
    ///
    /// ```
    /// use upgate_layers::rate_limit::{InProcess, Quota};
    /// let d = InProcess::new().check_now("k", Quota::new(1, 3));
    /// assert!(d.allowed);
    /// assert_eq!(d.remaining, 2);
    /// ```
    pub fn check_now(&self, key: &str, quota: Quota) -> Decision {
        let quota = Quota::new(quota.rate(), quota.burst());
        let limiter = self.limiter(quota);
        let key = key.to_owned();
        let interval = quota.emission_interval();
        let burst = quota.burst();
        let decision = match limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(burst);
                Decision {
                    allowed: true,
                    limit: burst,
                    remaining,
                    reset_after: interval * (burst - remaining),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let retry = not_until.wait_time_from(self.clock.now());
                Decision {
                    allowed: false,
                    limit: burst,
                    remaining: 0,
                    reset_after: retry + interval * (burst - 1),
                    retry_after: Some(retry),
                }
            }
        };
        if self.decisions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        decision
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Quota, Arc<Limiter>>> {
        self.limiters.read().unwrap_or_else(|e| e.into_inner())
    }

    fn limiter(&self, quota: Quota) -> Arc<Limiter> {
        if let Some(l) = self.read().get(&quota) {
            return l.clone();
        }
        let mut map = self.limiters.write().unwrap_or_else(|e| e.into_inner());
        map.entry(quota)
            .or_insert_with(|| {
                let burst = NonZeroU32::new(quota.burst()).unwrap_or(NonZeroU32::MIN);
                let per_second = NonZeroU32::new(quota.rate()).unwrap_or(NonZeroU32::MIN);
                let gq = governor::Quota::per_second(per_second).allow_burst(burst);
                Arc::new(RateLimiter::new(
                    gq,
                    DashMapStateStore::default(),
                    self.clock.clone(),
                ))
            })
            .clone()
    }
}

impl RateLimitBackend for InProcess {
    fn check(
        &self,
        key: &str,
        quota: Quota,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send {
        std::future::ready(Ok(self.check_now(key, quota)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refills_with_paused_time() {
        let b = InProcess::new();
        let q = Quota::new(2, 4);
        for i in 0..4 {
            let d = b.check_now("k", q);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 3 - i);
        }
        let d = b.check_now("k", q);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.check_now("k", q).allowed);
        assert!(!b.check_now("k", q).allowed);
        tokio::time::advance(Duration::from_secs(2)).await;
        let d = b.check_now("k", q);
        assert!(d.allowed);
        assert_eq!(d.remaining, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn quotas_are_independent_and_swept() {
        let b = InProcess::new();
        assert!(b.check_now("a", Quota::new(1, 1)).allowed);
        assert!(!b.check_now("a", Quota::new(1, 1)).allowed);
        // Same key, other quota: another limiter.
        assert!(b.check_now("a", Quota::new(1, 5)).allowed);
        assert_eq!(b.len(), 2);
        tokio::time::advance(Duration::from_secs(10)).await;
        b.sweep();
        assert!(b.is_empty());
    }
}
