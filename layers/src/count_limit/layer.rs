use std::fmt;
use std::sync::Arc;

use http::StatusCode;
use tower::Layer;

use super::service::{CountLimit, Shared};
use super::{DefaultRejection, InProcess};

/// When a taken slot is given back; see the [module docs](super).
///
/// ```
/// use upgate_layers::count_limit::Release;
/// assert_ne!(Release::OnFailure, Release::OnCompletion);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Keep the slot after a successful response; release it when the inner service
    /// errors, the response future is dropped, or the response is a failure.
    OnFailure,
    /// Hold the slot only while the request is in flight (a concurrency cap):
    /// released when the response future completes or is dropped. (The response
    /// body may still be streaming then.)
    OnCompletion,
}

pub(crate) type Classifier = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// Applies [`CountLimit`] to a service.
///
/// `P` is the [`CountPolicy`](super::CountPolicy), `K` the
/// [`CountBackend`](super::CountBackend), `R` the
/// [`RejectionBuilder`](super::RejectionBuilder).
///
/// ```
/// use http::Request;
/// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
///
/// // At most 4 concurrent part uploads per tenant.
/// let layer = CountLimitLayer::new(
///     |req: &Request<()>| {
///         let tenant = req.headers().get("x-tenant")?.to_str().ok()?;
///         Some((format!("{{{tenant}}}:parts"), 4))
///     },
///     InProcess::new(),
///     Release::OnCompletion,
/// );
/// # let _ = layer;
/// ```
pub struct CountLimitLayer<P, K = InProcess, R = DefaultRejection> {
    policy: Arc<P>,
    backend: Arc<K>,
    rejection: Arc<R>,
    release: Release,
    is_failure: Classifier,
}

impl<P, K, R> fmt::Debug for CountLimitLayer<P, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountLimitLayer")
            .field("release", &self.release)
            .finish_non_exhaustive()
    }
}

impl<P, K, R> Clone for CountLimitLayer<P, K, R> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            backend: self.backend.clone(),
            rejection: self.rejection.clone(),
            release: self.release,
            is_failure: self.is_failure.clone(),
        }
    }
}

impl<P, K> CountLimitLayer<P, K> {
    /// A layer counting with `policy` and `backend`, releasing slots per `release`.
    ///
    /// ```
    /// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
    /// let layer = CountLimitLayer::new(|_: &http::Request<()>| Some(("k".to_owned(), 1)), InProcess::new(), Release::OnFailure);
    /// # let _ = layer;
    /// ```
    pub fn new(policy: P, backend: K, release: Release) -> Self {
        Self::with_shared_backend(policy, Arc::new(backend), release)
    }

    /// Like [`new`](Self::new) with a backend shared with other code (for example
    /// the handler that releases a slot when an upload session completes).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
    /// let backend = Arc::new(InProcess::new());
    /// let layer = CountLimitLayer::with_shared_backend(
    ///     |_: &http::Request<()>| Some(("k".to_owned(), 1)), backend.clone(), Release::OnFailure);
    /// assert!(Arc::ptr_eq(layer.backend(), &backend));
    /// ```
    pub fn with_shared_backend(policy: P, backend: Arc<K>, release: Release) -> Self {
        Self {
            policy: Arc::new(policy),
            backend,
            rejection: Arc::new(DefaultRejection),
            release,
            is_failure: Arc::new(|status: StatusCode| status.as_u16() >= 400),
        }
    }
}

impl<P, K, R> CountLimitLayer<P, K, R> {
    /// Replaces the builder of the response when no slot is free (default `429`).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
    /// let layer = CountLimitLayer::new(|_: &http::Request<Full<Bytes>>| Some(("k".to_owned(), 1)), InProcess::new(), Release::OnCompletion)
    ///     .rejection(|_key: &str, _limit: u64| {
    ///         let mut res = http::Response::new(Full::new(Bytes::from_static(b"busy")));
    ///         *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    ///         res
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn rejection<R2>(self, rejection: R2) -> CountLimitLayer<P, K, R2> {
        CountLimitLayer {
            policy: self.policy,
            backend: self.backend,
            rejection: Arc::new(rejection),
            release: self.release,
            is_failure: self.is_failure,
        }
    }

    /// Which response statuses count as failures for [`Release::OnFailure`]
    /// (default: status >= 400).
    ///
    /// ```
    /// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
    /// let layer = CountLimitLayer::new(|_: &http::Request<()>| Some(("k".to_owned(), 1)), InProcess::new(), Release::OnFailure)
    ///     .failure_classifier(|status| status.is_server_error());
    /// # let _ = layer;
    /// ```
    pub fn failure_classifier<F>(mut self, is_failure: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.is_failure = Arc::new(is_failure);
        self
    }

    /// The backend (to release slots kept by [`Release::OnFailure`]).
    ///
    /// ```
    /// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
    /// let layer = CountLimitLayer::new(|_: &http::Request<()>| Some(("k".to_owned(), 1)), InProcess::new(), Release::OnFailure);
    /// assert!(layer.backend().is_empty());
    /// ```
    pub fn backend(&self) -> &Arc<K> {
        &self.backend
    }
}

impl<S, P, K, R> Layer<S> for CountLimitLayer<P, K, R> {
    type Service = CountLimit<S, P, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        CountLimit::from_shared(
            inner,
            Arc::new(Shared {
                policy: self.policy.clone(),
                backend: self.backend.clone(),
                rejection: self.rejection.clone(),
                release: self.release,
                is_failure: self.is_failure.clone(),
            }),
        )
    }
}
