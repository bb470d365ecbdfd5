use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::layer::Classifier;
use super::{CountBackend, Error, RejectionBuilder, Release, ResponseFuture};
use crate::BoxError;

/// Maps a request to the key it is counted under and that key's limit, or `None`
/// when it is not counted.
///
/// Implemented for closures `Fn(&Request<B>) -> Option<(String, u64)>`.
///
/// ```
/// use http::Request;
/// use upgate_layers::count_limit::CountPolicy;
///
/// let per_tenant = |req: &Request<()>| {
///     let tenant = req.headers().get("x-tenant")?.to_str().ok()?;
///     Some((format!("{{{tenant}}}:uploads"), 10))
/// };
/// let req = Request::builder().header("x-tenant", "acme").body(()).unwrap();
/// assert_eq!(per_tenant.classify(&req), Some(("{acme}:uploads".to_owned(), 10)));
/// ```
pub trait CountPolicy<B>: Send + Sync + 'static {
    /// The key and limit of `req`, or `None` to let it through uncounted.
    fn classify(&self, req: &Request<B>) -> Option<(String, u64)>;
}

impl<B, F> CountPolicy<B> for F
where
    F: Fn(&Request<B>) -> Option<(String, u64)> + Send + Sync + 'static,
{
    fn classify(&self, req: &Request<B>) -> Option<(String, u64)> {
        self(req)
    }
}

pub(crate) struct Shared<P, K, R> {
    pub(crate) policy: Arc<P>,
    pub(crate) backend: Arc<K>,
    pub(crate) rejection: Arc<R>,
    pub(crate) release: Release,
    pub(crate) is_failure: Classifier,
}

/// Limits how many of something exist (or run) per key; see the
/// [module docs](super).
///
/// Built by [`CountLimitLayer`](super::CountLimitLayer).
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::{service_fn, BoxError, Layer, ServiceExt};
/// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let layer = CountLimitLayer::new(|_: &Request<Full<Bytes>>| Some(("k".to_owned(), 1)), InProcess::new(), Release::OnCompletion);
/// let backend = layer.backend().clone();
/// let svc = layer.layer(service_fn(|_: Request<Full<Bytes>>| async {
///     Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
/// }));
/// // Sequential requests never overlap: each gets the slot.
/// for _ in 0..3 {
///     assert_eq!(svc.clone().oneshot(Request::new(Full::default())).await?.status(), 200);
/// }
/// assert!(backend.is_empty());
/// # Ok(())
/// # }
/// ```
pub struct CountLimit<S, P, K, R> {
    inner: S,
    shared: Arc<Shared<P, K, R>>,
}

impl<S: fmt::Debug, P, K, R> fmt::Debug for CountLimit<S, P, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountLimit")
            .field("inner", &self.inner)
            .field("release", &self.shared.release)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, P, K, R> Clone for CountLimit<S, P, K, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, P, K, R> CountLimit<S, P, K, R> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<P, K, R>>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    ///
    /// ```
    /// use tower::Layer;
    /// use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
    /// let svc = CountLimitLayer::new(|_: &http::Request<()>| None::<(String, u64)>, InProcess::new(), Release::OnCompletion).layer(3u8);
    /// assert_eq!(*svc.get_ref(), 3);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Gives the slot back in the background if dropped while armed.
struct SlotGuard<K: CountBackend> {
    backend: Arc<K>,
    key: String,
    armed: bool,
}

impl<K: CountBackend> SlotGuard<K> {
    async fn release(mut self) {
        if let Err(e) = self.backend.release(&self.key).await {
            tracing::warn!(key = %self.key, error = %e, "failed to release a count-limit slot");
        }
        self.armed = false;
    }

    fn keep(mut self) {
        self.armed = false;
    }
}

impl<K: CountBackend> Drop for SlotGuard<K> {
    fn drop(&mut self) {
        if self.armed {
            let backend = self.backend.clone();
            let key = std::mem::take(&mut self.key);
            crate::util::spawn_detached(async move {
                if let Err(e) = backend.release(&key).await {
                    tracing::warn!(key = %key, error = %e, "failed to release a count-limit slot of a dropped request");
                }
            });
        }
    }
}

impl<S, P, K, R, ReqBody, ResBody> Service<Request<ReqBody>> for CountLimit<S, P, K, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    P: CountPolicy<ReqBody>,
    K: CountBackend,
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
        let Some((key, limit)) = self.shared.policy.classify(&req) else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::boxed(async move {
            let acquired = shared
                .backend
                .acquire(&key, limit)
                .await
                .map_err(|e| Box::new(Error::backend(e)) as BoxError)?;
            if !acquired.acquired {
                return Ok(shared.rejection.rejected(&key, limit));
            }
            let guard = SlotGuard {
                backend: shared.backend.clone(),
                key,
                armed: true,
            };
            let result: Result<Response<ResBody>, BoxError> =
                inner.call(req).await.map_err(Into::into);
            let keep = match (&result, shared.release) {
                (Ok(res), Release::OnFailure) => !(shared.is_failure)(res.status()),
                _ => false,
            };
            if keep {
                guard.keep();
            } else {
                guard.release().await;
            }
            result
        })
    }
}
