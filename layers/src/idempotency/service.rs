use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::Service;

use super::key::{fingerprint, validate};
use super::layer::Config;
use super::{
    Error, IdempotencyBody, IdempotencyStore, MapBody, Rejection, RejectionBuilder, Reservation,
    ResponseFuture, StoredResponse,
};
use crate::BoxError;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A response extension that keeps a response out of the idempotency store: the layer passes
/// it through and releases the key, so a retry with the same key runs again. For responses
/// that are not worth replaying: ones that expire (presigned URLs) or that depend on state a
/// retry may find changed (a conflict that a later request resolves).
#[derive(Debug, Clone, Copy, Default)]
pub struct NotReplayable;

/// Maps a request to the scope its `Idempotency-Key` lives in (for example the
/// tenant id), or `None` to let it pass through without deduplication.
///
/// Implemented for closures `Fn(&Request<B>) -> Option<String>`.
///
/// ```
/// use http::Request;
/// use upgate_layers::idempotency::IdempotencyScope;
///
/// #[derive(Clone)]
/// struct Tenant(String);
/// let scope = |req: &Request<()>| req.extensions().get::<Tenant>().map(|t| format!("{{{}}}", t.0));
///
/// let mut req = Request::new(());
/// assert_eq!(scope.scope(&req), None);
/// req.extensions_mut().insert(Tenant("acme".into()));
/// assert_eq!(scope.scope(&req).as_deref(), Some("{acme}"));
/// ```
pub trait IdempotencyScope<B>: Send + Sync + 'static {
    /// The scope of `req`'s idempotency key, or `None` to skip deduplication.
    fn scope(&self, req: &Request<B>) -> Option<String>;
}

impl<B, F> IdempotencyScope<B> for F
where
    F: Fn(&Request<B>) -> Option<String> + Send + Sync + 'static,
{
    fn scope(&self, req: &Request<B>) -> Option<String> {
        self(req)
    }
}

#[derive(Debug)]
pub(crate) struct Shared<P, St, R> {
    pub(crate) scope: Arc<P>,
    pub(crate) store: Arc<St>,
    pub(crate) rejection: Arc<R>,
    pub(crate) config: Arc<Config>,
}

/// Deduplicates requests carrying an `Idempotency-Key`; see the [module docs](super).
///
/// Built by [`IdempotencyLayer`](super::IdempotencyLayer).
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::{service_fn, BoxError, Layer, ServiceExt};
/// use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let svc = IdempotencyLayer::new(|_: &Request<Full<Bytes>>| Some("t".to_owned()), InMemory::new())
///     .layer(service_fn(|_: Request<Full<Bytes>>| async {
///         Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
///     }));
/// // An invalid key is rejected.
/// let req = Request::post("/").header("idempotency-key", "has space").body(Full::default())?;
/// assert_eq!(svc.oneshot(req).await?.status(), 400);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Idempotency<S, P, St, R> {
    inner: S,
    shared: Arc<Shared<P, St, R>>,
}

impl<S: Clone, P, St, R> Clone for Idempotency<S, P, St, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, P, St, R> Idempotency<S, P, St, R> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<P, St, R>>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    ///
    /// ```
    /// use tower::Layer;
    /// use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let svc = IdempotencyLayer::new(|_: &http::Request<()>| None::<String>, InMemory::new()).layer(7u8);
    /// assert_eq!(*svc.get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// A token unique to this request across replicas.
fn owner_token() -> String {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{seed:016x}{n:x}")
}

/// Releases the reservation in the background if dropped while armed (the response
/// future was dropped: the client went away).
struct ReleaseGuard<St: IdempotencyStore> {
    store: Arc<St>,
    key: String,
    owner: String,
    armed: bool,
}

impl<St: IdempotencyStore> ReleaseGuard<St> {
    async fn release(mut self) {
        if let Err(e) = self.store.release(&self.key, &self.owner).await {
            tracing::warn!(key = %self.key, error = %e, "failed to release idempotency key; it expires with its lock TTL");
        }
        self.armed = false;
    }

    async fn complete(mut self, response: StoredResponse, ttl: std::time::Duration) {
        if let Err(e) = self
            .store
            .complete(&self.key, &self.owner, &response, ttl)
            .await
        {
            tracing::warn!(key = %self.key, error = %e, "failed to store idempotent response; it expires with its lock TTL");
        }
        self.armed = false;
    }
}

impl<St: IdempotencyStore> Drop for ReleaseGuard<St> {
    fn drop(&mut self) {
        if self.armed {
            let store = self.store.clone();
            let key = std::mem::take(&mut self.key);
            let owner = std::mem::take(&mut self.owner);
            crate::util::spawn_detached(async move {
                if let Err(e) = store.release(&key, &owner).await {
                    tracing::warn!(key = %key, error = %e, "failed to release idempotency key of a dropped request");
                }
            });
        }
    }
}

fn replay<B>(stored: StoredResponse) -> Response<IdempotencyBody<B>> {
    let trailers = (!stored.trailers.is_empty()).then(|| {
        let mut map = http::HeaderMap::with_capacity(stored.trailers.len());
        for (name, value) in stored.trailers {
            map.append(name, value);
        }
        map
    });
    let mut res = Response::new(IdempotencyBody::buffered(stored.body, trailers));
    *res.status_mut() = stored.status;
    let headers = res.headers_mut();
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    res
}

impl<S, P, St, R, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, P, St, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    P: IdempotencyScope<ReqBody>,
    St: IdempotencyStore,
    R: RejectionBuilder<ResBody>,
    ReqBody: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<IdempotencyBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<MapBody<S::Future>, Response<IdempotencyBody<ResBody>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !self.shared.config.methods.contains(req.method())
            || !req.headers().contains_key(&IDEMPOTENCY_KEY)
        {
            return ResponseFuture::inner(MapBody::new(self.inner.call(req)));
        }
        let Some(scope) = self.shared.scope.scope(&req) else {
            return ResponseFuture::inner(MapBody::new(self.inner.call(req)));
        };
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::boxed(run(self.shared.clone(), inner, req, scope))
    }
}

async fn run<S, P, St, R, ReqBody, ResBody>(
    shared: Arc<Shared<P, St, R>>,
    mut inner: S,
    req: Request<ReqBody>,
    scope: String,
) -> Result<Response<IdempotencyBody<ResBody>>, BoxError>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    St: IdempotencyStore,
    R: RejectionBuilder<ResBody>,
    ReqBody: Body<Data = Bytes> + From<Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let config = &*shared.config;
    let (parts, body) = req.into_parts();
    let Some(key) = parts
        .headers
        .get(&IDEMPOTENCY_KEY)
        .and_then(|v| validate(v.as_bytes()))
    else {
        return Ok(shared
            .rejection
            .rejected(Rejection::InvalidKey, &parts)
            .map(IdempotencyBody::inner));
    };
    let mut storage_key = String::with_capacity(config.prefix.len() + scope.len() + key.len() + 1);
    storage_key.push_str(&config.prefix);
    storage_key.push_str(&scope);
    storage_key.push(':');
    storage_key.push_str(key);

    if body.size_hint().lower() > config.body_limit as u64 {
        return Ok(shared
            .rejection
            .rejected(Rejection::PayloadTooLarge, &parts)
            .map(IdempotencyBody::inner));
    }
    let bytes = match Limited::new(body, config.body_limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Ok(shared
                .rejection
                .rejected(Rejection::PayloadTooLarge, &parts)
                .map(IdempotencyBody::inner));
        }
        Err(e) => return Err(Box::new(Error::request_body(e))),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fp = fingerprint(&parts.method, path, &bytes);
    let owner = owner_token();

    match shared
        .store
        .reserve(&storage_key, &fp, &owner, config.lock_ttl)
        .await
        .map_err(|e| Box::new(Error::store(e)) as BoxError)?
    {
        Reservation::Reserved => {}
        Reservation::InProgress => {
            return Ok(shared
                .rejection
                .rejected(Rejection::InProgress, &parts)
                .map(IdempotencyBody::inner));
        }
        Reservation::FingerprintMismatch => {
            return Ok(shared
                .rejection
                .rejected(Rejection::FingerprintMismatch, &parts)
                .map(IdempotencyBody::inner));
        }
        Reservation::Completed(stored) => return Ok(replay(stored)),
    }

    let guard = ReleaseGuard {
        store: shared.store.clone(),
        key: storage_key,
        owner,
        armed: true,
    };
    let result: Result<_, BoxError> = inner
        .call(Request::from_parts(parts, ReqBody::from(bytes)))
        .await
        .map_err(Into::into);
    let res = match result {
        Ok(res) => res,
        Err(e) => {
            guard.release().await;
            return Err(e);
        }
    };
    let status = res.status();
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || res.extensions().get::<NotReplayable>().is_some()
    {
        guard.release().await;
        return Ok(res.map(IdempotencyBody::inner));
    }
    let (res_parts, body) = res.into_parts();
    // Read up to the record limit; past it the response is passed on (what was read, then
    // the rest as it streams) and not stored, so memory stays bounded by the limit.
    let read = read_bounded(body, config.response_limit)
        .await
        .map_err(|e| Error::response_body(e.into()));
    let read = match read {
        Ok(read) => read,
        Err(e) => {
            guard.release().await;
            return Err(Box::new(e));
        }
    };
    let (bytes, trailers) = match read {
        Bounded::Whole(bytes, trailers) => (bytes, trailers),
        Bounded::TooLarge(prefix, rest) => {
            tracing::info!(
                limit = config.response_limit,
                "response larger than the idempotency record limit: not stored"
            );
            guard.release().await;
            return Ok(Response::from_parts(
                res_parts,
                IdempotencyBody::continued(prefix, rest),
            ));
        }
    };
    let headers = config
        .stored_headers
        .iter()
        .flat_map(|name| {
            res_parts
                .headers
                .get_all(name)
                .iter()
                .map(move |v| (name.clone(), v.clone()))
        })
        .collect();
    let stored = StoredResponse {
        status,
        headers,
        trailers: trailers
            .iter()
            .flat_map(|t| t.iter().map(|(n, v)| (n.clone(), v.clone())))
            .collect(),
        body: bytes.clone(),
    };
    guard.complete(stored, config.ttl).await;
    Ok(Response::from_parts(
        res_parts,
        IdempotencyBody::buffered(bytes, trailers),
    ))
}

/// A response body read up to a limit.
enum Bounded<B> {
    /// All of it, with its trailers.
    Whole(Bytes, Option<http::HeaderMap>),
    /// More than the limit: what was read, and the body to read the rest from.
    TooLarge(Bytes, Pin<Box<B>>),
}

/// Reads `body` until it ends or more than `limit` bytes have arrived (at once, reading
/// nothing, when its size hint says it will be more).
async fn read_bounded<B>(body: B, limit: usize) -> Result<Bounded<B>, B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = Box::pin(body);
    if body.size_hint().lower() > limit as u64 {
        return Ok(Bounded::TooLarge(Bytes::new(), body));
    }
    let mut data = bytes::BytesMut::new();
    let mut trailers: Option<http::HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    return Ok(Bounded::TooLarge(data.freeze(), body));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    match &mut trailers {
                        Some(all) => all.extend(t),
                        None => trailers = Some(t),
                    }
                }
            }
        }
    }
    Ok(Bounded::Whole(data.freeze(), trailers))
}
