use std::sync::Arc;

use tower::Layer;

use super::service::{RateLimit, Shared};
use super::{DefaultRejection, InProcess, RateLimitStats};

/// Applies [`RateLimit`] to a service.
///
/// `P` is the [`RateLimitPolicy`](super::RateLimitPolicy), `K` the
/// [`RateLimitBackend`](super::RateLimitBackend) and `R` the
/// [`RejectionBuilder`](super::RejectionBuilder). Clones share the backend and the stats.
///
/// ```
/// use http::Request;
/// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
///
/// let layer = RateLimitLayer::new(
///     |_req: &Request<String>| Some(("everyone".to_owned(), Quota::new(100, 200))),
///     InProcess::new(),
/// )
/// .bypass(true);
/// let _stats = layer.stats();
/// ```
#[derive(Debug)]
pub struct RateLimitLayer<P, K = InProcess, R = DefaultRejection> {
    policy: Arc<P>,
    backend: Arc<K>,
    rejection: Arc<R>,
    stats: RateLimitStats,
    bypass: bool,
}

impl<P, K, R> Clone for RateLimitLayer<P, K, R> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            backend: self.backend.clone(),
            rejection: self.rejection.clone(),
            stats: self.stats.clone(),
            bypass: self.bypass,
        }
    }
}

impl<P, K> RateLimitLayer<P, K, DefaultRejection> {
    /// A layer classifying requests with `policy` and deciding with `backend`.
    ///
    /// ```
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let layer = RateLimitLayer::new(
    ///     |_req: &http::Request<()>| Some(("k".to_owned(), Quota::new(1, 1))),
    ///     InProcess::new(),
    /// );
    /// # let _ = layer;
    /// ```
    pub fn new(policy: P, backend: K) -> Self {
        Self::with_shared_backend(policy, Arc::new(backend))
    }

    /// Like [`new`](Self::new), with a backend shared with other layers (for
    /// example two routes limited by the same in-process state).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let backend = Arc::new(InProcess::new());
    /// let a = RateLimitLayer::with_shared_backend(|_: &http::Request<()>| None::<(String, Quota)>, backend.clone());
    /// let b = RateLimitLayer::with_shared_backend(|_: &http::Request<()>| None::<(String, Quota)>, backend);
    /// # let _ = (a, b);
    /// ```
    pub fn with_shared_backend(policy: P, backend: Arc<K>) -> Self {
        Self {
            policy: Arc::new(policy),
            backend,
            rejection: Arc::new(DefaultRejection),
            stats: RateLimitStats::default(),
            bypass: false,
        }
    }
}

impl<P, K, R> RateLimitLayer<P, K, R> {
    /// Bypass mode: admit every request, but log each would-be rejection at `warn`
    /// (with its key) and count it in [`RateLimitStats::bypassed`].
    ///
    /// ```
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let layer = RateLimitLayer::new(
    ///     |_req: &http::Request<()>| Some(("k".to_owned(), Quota::new(1, 1))),
    ///     InProcess::new(),
    /// )
    /// .bypass(true);
    /// assert!(layer.is_bypass());
    /// ```
    pub fn bypass(mut self, bypass: bool) -> Self {
        self.bypass = bypass;
        self
    }

    /// Whether bypass mode is on.
    ///
    /// ```
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let layer = RateLimitLayer::new(|_: &http::Request<()>| None::<(String, Quota)>, InProcess::new());
    /// assert!(!layer.is_bypass());
    /// ```
    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// Replaces the builder of rejection responses.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use upgate_layers::rate_limit::{Decision, InProcess, Quota, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::new(
    ///     |_req: &http::Request<Full<Bytes>>| Some(("k".to_owned(), Quota::new(1, 1))),
    ///     InProcess::new(),
    /// )
    /// .rejection(|_key: &str, _d: &Decision| {
    ///     let mut res = http::Response::new(Full::new(Bytes::from_static(b"{}")));
    ///     *res.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
    ///     res
    /// });
    /// # let _ = layer;
    /// ```
    pub fn rejection<R2>(self, rejection: R2) -> RateLimitLayer<P, K, R2> {
        RateLimitLayer {
            policy: self.policy,
            backend: self.backend,
            rejection: Arc::new(rejection),
            stats: self.stats,
            bypass: self.bypass,
        }
    }

    /// The counters shared by every service this layer (and its clones) builds.
    ///
    /// ```
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let layer = RateLimitLayer::new(|_: &http::Request<()>| None::<(String, Quota)>, InProcess::new());
    /// assert_eq!(layer.stats().admitted(), 0);
    /// ```
    pub fn stats(&self) -> RateLimitStats {
        self.stats.clone()
    }

    /// The backend.
    ///
    /// ```
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let layer = RateLimitLayer::new(|_: &http::Request<()>| None::<(String, Quota)>, InProcess::new());
    /// assert!(layer.backend().is_empty());
    /// ```
    pub fn backend(&self) -> &Arc<K> {
        &self.backend
    }
}

impl<S, P, K, R> Layer<S> for RateLimitLayer<P, K, R> {
    type Service = RateLimit<S, P, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::from_shared(
            inner,
            Arc::new(Shared {
                policy: self.policy.clone(),
                backend: self.backend.clone(),
                rejection: self.rejection.clone(),
                stats: self.stats.clone(),
                bypass: self.bypass,
            }),
        )
    }
}
