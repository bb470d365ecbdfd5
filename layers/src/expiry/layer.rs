use std::sync::Arc;

use tower::Layer;

use super::service::{Expiry, Shared};
use super::{DefaultExpired, SystemClock};

/// Applies [`Expiry`] to a service; see the [module docs](super).
///
/// `L` is the [`DeadlineLookup`](super::DeadlineLookup), `R` the
/// [`ExpiredResponse`](super::ExpiredResponse) builder and `C` the
/// [`Clock`](super::Clock).
///
/// ```
/// use http::request::Parts;
/// use upgate_layers::expiry::{Expiring, ExpiryLayer, TokioClock};
///
/// let layer = ExpiryLayer::new(|_: &Parts| async { Ok::<_, upgate_layers::BoxError>(None::<Expiring<()>>) })
///     .clock(TokioClock::new());
/// # let _ = layer;
/// ```
#[derive(Debug)]
pub struct ExpiryLayer<L, R = DefaultExpired, C = SystemClock> {
    lookup: Arc<L>,
    response: Arc<R>,
    clock: Arc<C>,
}

impl<L, R, C> Clone for ExpiryLayer<L, R, C> {
    fn clone(&self) -> Self {
        Self {
            lookup: self.lookup.clone(),
            response: self.response.clone(),
            clock: self.clock.clone(),
        }
    }
}

impl<L> ExpiryLayer<L> {
    /// A layer resolving deadlines with `lookup`, answering `410 Gone` past them.
    ///
    /// ```
    /// use http::request::Parts;
    /// use upgate_layers::expiry::{Expiring, ExpiryLayer};
    /// let layer = ExpiryLayer::new(|_: &Parts| async { Ok::<_, upgate_layers::BoxError>(None::<Expiring<u64>>) });
    /// # let _ = layer;
    /// ```
    pub fn new(lookup: L) -> Self {
        Self {
            lookup: Arc::new(lookup),
            response: Arc::new(DefaultExpired),
            clock: Arc::new(SystemClock),
        }
    }
}

impl<L, R, C> ExpiryLayer<L, R, C> {
    /// Replaces the builder of the response for expired resources.
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use bytes::Bytes;
    /// use http::request::Parts;
    /// use http_body_util::Full;
    /// use upgate_layers::expiry::{Expiring, ExpiryLayer};
    ///
    /// let layer = ExpiryLayer::new(|_: &Parts| async { Ok::<_, upgate_layers::BoxError>(None::<Expiring<String>>) })
    ///     .expired_response(|e: &Expiring<String>, _now: SystemTime, _: &Parts| {
    ///         let mut res = http::Response::new(Full::new(Bytes::from(e.info.clone())));
    ///         *res.status_mut() = http::StatusCode::GONE;
    ///         res
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn expired_response<R2>(self, response: R2) -> ExpiryLayer<L, R2, C> {
        ExpiryLayer {
            lookup: self.lookup,
            response: Arc::new(response),
            clock: self.clock,
        }
    }

    /// Replaces the clock (default [`SystemClock`]).
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use http::request::Parts;
    /// use upgate_layers::expiry::{Expiring, ExpiryLayer};
    /// let layer = ExpiryLayer::new(|_: &Parts| async { Ok::<_, upgate_layers::BoxError>(None::<Expiring<()>>) })
    ///     .clock(|| SystemTime::UNIX_EPOCH);
    /// # let _ = layer;
    /// ```
    pub fn clock<C2>(self, clock: C2) -> ExpiryLayer<L, R, C2> {
        ExpiryLayer {
            lookup: self.lookup,
            response: self.response,
            clock: Arc::new(clock),
        }
    }
}

impl<S, L, R, C> Layer<S> for ExpiryLayer<L, R, C> {
    type Service = Expiry<S, L, R, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Expiry::from_shared(
            inner,
            Arc::new(Shared {
                lookup: self.lookup.clone(),
                response: self.response.clone(),
                clock: self.clock.clone(),
            }),
        )
    }
}
