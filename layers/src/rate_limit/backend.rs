use std::future::Future;
use std::time::Duration;

use super::Quota;
use crate::BoxError;

/// The outcome of one rate-limit decision.
///
/// ```
/// use std::time::Duration;
/// use upgate_layers::rate_limit::Decision;
///
/// let d = Decision {
///     allowed: false,
///     limit: 10,
///     remaining: 0,
///     reset_after: Duration::from_secs(10),
///     retry_after: Some(Duration::from_millis(1500)),
/// };
/// assert_eq!(d.retry_after_secs(), Some(2));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is admitted.
    pub allowed: bool,
    /// The quota's burst.
    pub limit: u32,
    /// Requests that can still be made immediately (after this one).
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
    /// For rejections: time until one request will be admitted.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// `retry_after` in whole seconds, rounded up and at least 1 (the `Retry-After` value).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use upgate_layers::rate_limit::Decision;
    /// let d = Decision { allowed: false, limit: 1, remaining: 0,
    ///     reset_after: Duration::ZERO, retry_after: Some(Duration::from_millis(1)) };
    /// assert_eq!(d.retry_after_secs(), Some(1));
    /// ```
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(|d| crate::util::ceil_secs(d).max(1))
    }
}

/// Makes GCRA decisions for a key under a quota.
///
/// Implemented by [`InProcess`](super::InProcess) and, with the `redis` feature,
/// `RedisGcra`. Errors are infrastructure failures: the service returns them as
/// errors rather than admitting or rejecting.
///
/// ```
/// use std::time::Duration;
/// use upgate_layers::rate_limit::{Decision, Quota, RateLimitBackend};
/// use upgate_layers::BoxError;
///
/// /// A backend that admits everything (e.g. for tests).
/// struct AllowAll;
/// impl RateLimitBackend for AllowAll {
///     fn check(&self, _key: &str, quota: Quota)
///         -> impl std::future::Future<Output = Result<Decision, BoxError>> + Send {
///         std::future::ready(Ok(Decision { allowed: true, limit: quota.burst(),
///             remaining: quota.burst(), reset_after: Duration::ZERO, retry_after: None }))
///     }
/// }
/// # let d = futures_util::FutureExt::now_or_never(AllowAll.check("k", Quota::new(1, 1))).unwrap().unwrap();
/// # assert!(d.allowed);
/// ```
pub trait RateLimitBackend: Send + Sync + 'static {
    /// Counts one request for `key` under `quota` and says whether it is admitted.
    fn check(
        &self,
        key: &str,
        quota: Quota,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send;
}
