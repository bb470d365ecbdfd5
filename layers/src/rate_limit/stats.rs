use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Shared counters of a [`RateLimitLayer`](super::RateLimitLayer), cheap to clone.
///
/// Only classified requests are counted: `admitted` (under quota), `limited`
/// (rejected) and `bypassed` (over quota but admitted because of bypass mode).
///
/// ```
/// use upgate_layers::rate_limit::{InProcess, RateLimitLayer, RateLimitStats, Quota};
///
/// let layer = RateLimitLayer::new(|_: &http::Request<()>| None::<(String, Quota)>, InProcess::new());
/// let stats: RateLimitStats = layer.stats();
/// assert_eq!((stats.admitted(), stats.limited(), stats.bypassed()), (0, 0, 0));
/// ```
#[derive(Clone, Debug, Default)]
pub struct RateLimitStats {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    limited: AtomicU64,
    bypassed: AtomicU64,
}

impl RateLimitStats {
    /// Requests admitted under their quota.
    ///
    /// ```
    /// assert_eq!(upgate_layers::rate_limit::RateLimitStats::default().admitted(), 0);
    /// ```
    pub fn admitted(&self) -> u64 {
        self.inner.admitted.load(Ordering::Relaxed)
    }

    /// Requests rejected.
    ///
    /// ```
    /// assert_eq!(upgate_layers::rate_limit::RateLimitStats::default().limited(), 0);
    /// ```
    pub fn limited(&self) -> u64 {
        self.inner.limited.load(Ordering::Relaxed)
    }

    /// Requests over quota that bypass mode admitted.
    ///
    /// ```
    /// assert_eq!(upgate_layers::rate_limit::RateLimitStats::default().bypassed(), 0);
    /// ```
    pub fn bypassed(&self) -> u64 {
        self.inner.bypassed.load(Ordering::Relaxed)
    }

    pub(crate) fn add_admitted(&self) {
        self.inner.admitted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_limited(&self) {
        self.inner.limited.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_bypassed(&self) {
        self.inner.bypassed.fetch_add(1, Ordering::Relaxed);
    }
}
