use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::response::RateLimitHeaders;
use super::{
    Error, RateLimitBackend, RateLimitPolicy, RateLimitStats, RejectionBuilder, ResponseFuture,
};
use crate::BoxError;

#[derive(Debug)]
pub(crate) struct Shared<P, K, R> {
    pub(crate) policy: Arc<P>,
    pub(crate) backend: Arc<K>,
    pub(crate) rejection: Arc<R>,
    pub(crate) stats: RateLimitStats,
    pub(crate) bypass: bool,
}

/// Rate-limits requests with a GCRA; see the [module docs](super).
///
/// Built by [`RateLimitLayer`](super::RateLimitLayer).
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::{service_fn, BoxError, Layer, ServiceExt};
/// use upgate_layers::rate_limit::{InProcess, Quota, RateLimit, RateLimitLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let inner = service_fn(|_: Request<Full<Bytes>>| async {
///     Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
/// });
/// let svc = RateLimitLayer::new(
///     |_: &Request<Full<Bytes>>| Some(("k".to_owned(), Quota::new(1, 10))),
///     InProcess::new(),
/// )
/// .layer(inner);
/// let res = svc.oneshot(Request::new(Full::default())).await?;
/// assert_eq!(res.headers()["ratelimit"], "\"default\";r=9;t=1");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RateLimit<S, P, K, R> {
    inner: S,
    shared: Arc<Shared<P, K, R>>,
}

impl<S: Clone, P, K, R> Clone for RateLimit<S, P, K, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, P, K, R> RateLimit<S, P, K, R> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<P, K, R>>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    ///
    /// ```
    /// use tower::Layer;
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let svc = RateLimitLayer::new(|_: &http::Request<()>| None::<(String, Quota)>, InProcess::new())
    ///     .layer(42u8);
    /// assert_eq!(*svc.get_ref(), 42);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The counters of this service's layer.
    ///
    /// ```
    /// use tower::Layer;
    /// use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
    /// let svc = RateLimitLayer::new(|_: &http::Request<()>| None::<(String, Quota)>, InProcess::new())
    ///     .layer(());
    /// assert_eq!(svc.stats().limited(), 0);
    /// ```
    pub fn stats(&self) -> RateLimitStats {
        self.shared.stats.clone()
    }
}

impl<S, P, K, R, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, P, K, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    P: RateLimitPolicy<ReqBody>,
    K: RateLimitBackend,
    R: RejectionBuilder<ResBody>,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Response<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some((key, quota)) = self.shared.policy.classify(&req) else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::boxed(async move {
            let decision = shared
                .backend
                .check(&key, quota)
                .await
                .map_err(|e| Box::new(Error::backend(e)) as BoxError)?;
            let headers = RateLimitHeaders::new(quota, &decision);
            if decision.allowed {
                shared.stats.add_admitted();
            } else if shared.bypass {
                shared.stats.add_bypassed();
                tracing::warn!(
                    key = %key,
                    limit = decision.limit,
                    "rate limit exceeded (bypass mode: request admitted)"
                );
            } else {
                shared.stats.add_limited();
                tracing::debug!(key = %key, "rate limit exceeded");
                let mut res = shared.rejection.rejected(&key, &decision);
                headers.apply(res.headers_mut(), true);
                return Ok(res);
            }
            let mut res = inner.call(req).await.map_err(Into::into)?;
            headers.apply(res.headers_mut(), false);
            Ok(res)
        })
    }
}
