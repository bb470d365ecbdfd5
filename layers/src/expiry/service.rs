use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::{Clock, DeadlineLookup, Error, ExpiredResponse, ResponseFuture};
use crate::BoxError;

#[derive(Debug)]
pub(crate) struct Shared<L, R, C> {
    pub(crate) lookup: Arc<L>,
    pub(crate) response: Arc<R>,
    pub(crate) clock: Arc<C>,
}

/// Answers requests for expired resources; see the [module docs](super).
///
/// Built by [`ExpiryLayer`](super::ExpiryLayer).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use bytes::Bytes;
/// use http::request::Parts;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::{service_fn, BoxError, Layer, ServiceExt};
/// use upgate_layers::expiry::{Expiring, ExpiryLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let expires_at = SystemTime::now() + Duration::from_secs(3600);
/// let svc = ExpiryLayer::new(move |_: &Parts| async move {
///     Ok(Some(Expiring { expires_at, info: 42u32 }))
/// })
/// .layer(service_fn(|req: Request<Full<Bytes>>| async move {
///     // Handlers find the Expiring<T> in the extensions.
///     let info = req.extensions().get::<Expiring<u32>>().map(|e| e.info);
///     Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(format!("{info:?}")))))
/// }));
/// let res = svc.oneshot(Request::new(Full::default())).await?;
/// assert_eq!(res.status(), 200);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Expiry<S, L, R, C> {
    inner: S,
    shared: Arc<Shared<L, R, C>>,
}

impl<S: Clone, L, R, C> Clone for Expiry<S, L, R, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, L, R, C> Expiry<S, L, R, C> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<L, R, C>>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    ///
    /// ```
    /// use http::request::Parts;
    /// use tower::Layer;
    /// use upgate_layers::expiry::{Expiring, ExpiryLayer};
    /// let svc = ExpiryLayer::new(|_: &Parts| async { Ok::<_, upgate_layers::BoxError>(None::<Expiring<()>>) }).layer(5u8);
    /// assert_eq!(*svc.get_ref(), 5);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, L, R, C, ReqBody, ResBody> Service<Request<ReqBody>> for Expiry<S, L, R, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    L: DeadlineLookup,
    R: ExpiredResponse<L::Info, ResBody>,
    C: Clock,
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
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::boxed(async move {
            let (mut parts, body) = req.into_parts();
            let found = shared
                .lookup
                .lookup(&parts)
                .await
                .map_err(|e| Box::new(Error::lookup(e)) as BoxError)?;
            if let Some(expiring) = found {
                let now = shared.clock.now();
                if expiring.is_expired_at(now) {
                    return Ok(shared.response.expired(&expiring, now, &parts));
                }
                parts.extensions.insert(expiring);
            }
            inner
                .call(Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        })
    }
}
