use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderName, Method};
use tower::Layer;

use super::service::{Idempotency, Shared};
use super::DefaultRejection;

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) body_limit: usize,
    pub(crate) response_limit: usize,
    pub(crate) ttl: Duration,
    pub(crate) lock_ttl: Duration,
    pub(crate) prefix: String,
    pub(crate) stored_headers: Vec<HeaderName>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            body_limit: 1024 * 1024,
            response_limit: 1024 * 1024,
            ttl: Duration::from_secs(24 * 60 * 60),
            lock_ttl: Duration::from_secs(60),
            prefix: "idem:".to_owned(),
            // gRPC sends a failed call as a "trailers-only" response: its status is in the
            // headers, and a replay without them would be a call with no status at all.
            stored_headers: vec![
                header::CONTENT_TYPE,
                header::LOCATION,
                header::ETAG,
                HeaderName::from_static("grpc-status"),
                HeaderName::from_static("grpc-message"),
                HeaderName::from_static("grpc-status-details-bin"),
            ],
        }
    }
}

/// Applies [`Idempotency`] to a service; see the [module docs](super).
///
/// `P` is the [`IdempotencyScope`](super::IdempotencyScope), `St` the
/// [`IdempotencyStore`](super::IdempotencyStore), `R` the
/// [`RejectionBuilder`](super::RejectionBuilder).
///
/// Defaults: methods `POST` and `PATCH`, request body limit 1 MiB, stored response
/// body limit 1 MiB, TTL 24 h, lock TTL 60 s, prefix `idem:`, stored headers
/// `content-type`, `location`, `etag` and gRPC's `grpc-status`, `grpc-message`,
/// `grpc-status-details-bin` (every trailer is stored too).
///
/// ```
/// use std::time::Duration;
/// use http::Method;
/// use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
///
/// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("tenant".to_owned()), InMemory::new())
///     .methods([Method::POST, Method::PUT, Method::PATCH])
///     .body_limit(64 * 1024)
///     .response_limit(64 * 1024)
///     .ttl(Duration::from_secs(3600))
///     .lock_ttl(Duration::from_secs(30))
///     .prefix("app:idem:")
///     .store_header(http::HeaderName::from_static("x-upload-id"));
/// # let _ = layer;
/// ```
#[derive(Debug)]
pub struct IdempotencyLayer<P, St, R = DefaultRejection> {
    scope: Arc<P>,
    store: Arc<St>,
    rejection: Arc<R>,
    config: Arc<Config>,
}

impl<P, St, R> Clone for IdempotencyLayer<P, St, R> {
    fn clone(&self) -> Self {
        Self {
            scope: self.scope.clone(),
            store: self.store.clone(),
            rejection: self.rejection.clone(),
            config: self.config.clone(),
        }
    }
}

impl<P, St> IdempotencyLayer<P, St> {
    /// A layer scoping keys with `scope` and recording them in `store`.
    ///
    /// ```
    /// use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new());
    /// # let _ = layer;
    /// ```
    pub fn new(scope: P, store: St) -> Self {
        Self::with_shared_store(scope, Arc::new(store))
    }

    /// Like [`new`](Self::new) with a store shared with other layers.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let store = Arc::new(InMemory::new());
    /// let layer = IdempotencyLayer::with_shared_store(|_: &http::Request<()>| Some("t".to_owned()), store.clone());
    /// assert!(Arc::ptr_eq(layer.store(), &store));
    /// ```
    pub fn with_shared_store(scope: P, store: Arc<St>) -> Self {
        Self {
            scope: Arc::new(scope),
            store,
            rejection: Arc::new(DefaultRejection),
            config: Arc::new(Config::default()),
        }
    }
}

impl<P, St, R> IdempotencyLayer<P, St, R> {
    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The methods deduplicated (default `POST` and `PATCH`).
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new())
    ///     .methods([http::Method::POST]);
    /// # let _ = layer;
    /// ```
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config_mut().methods = methods.into_iter().collect();
        self
    }

    /// The most request body bytes buffered; larger bodies get `413` (default 1 MiB).
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new())
    ///     .body_limit(16 * 1024);
    /// # let _ = layer;
    /// ```
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config_mut().body_limit = bytes;
        self
    }

    /// The largest response body stored for replay (default 1 MiB); larger responses
    /// are returned but not stored, and the key is released.
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new())
    ///     .response_limit(16 * 1024);
    /// # let _ = layer;
    /// ```
    pub fn response_limit(mut self, bytes: usize) -> Self {
        self.config_mut().response_limit = bytes;
        self
    }

    /// How long completed responses are kept (default 24 hours).
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new())
    ///     .ttl(std::time::Duration::from_secs(3600));
    /// # let _ = layer;
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config_mut().ttl = ttl;
        self
    }

    /// How long a reservation blocks its key if its holder never finishes (default 60 s).
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new())
    ///     .lock_ttl(std::time::Duration::from_secs(30));
    /// # let _ = layer;
    /// ```
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.config_mut().lock_ttl = ttl;
        self
    }

    /// The storage key prefix (default `idem:`); keys are `<prefix><scope>:<key>`.
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new())
    ///     .prefix("upgate:idem:");
    /// # let _ = layer;
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config_mut().prefix = prefix.into();
        self
    }

    /// Also stores and replays the response header `name` (besides `content-type`,
    /// `location` and `etag`).
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new())
    ///     .store_header(http::HeaderName::from_static("upload-offset"));
    /// # let _ = layer;
    /// ```
    pub fn store_header(mut self, name: HeaderName) -> Self {
        let config = self.config_mut();
        if !config.stored_headers.contains(&name) {
            config.stored_headers.push(name);
        }
        self
    }

    /// Replaces the builder of the layer's own responses (400, 409, 413, 422).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::request::Parts;
    /// use http_body_util::Full;
    /// use upgate_layers::idempotency::{IdempotencyLayer, InMemory, Rejection};
    ///
    /// let layer = IdempotencyLayer::new(|_: &http::Request<Full<Bytes>>| Some("t".to_owned()), InMemory::new())
    ///     .rejection(|r: Rejection, _: &Parts| {
    ///         let mut res = http::Response::new(Full::new(Bytes::from_static(b"{}")));
    ///         *res.status_mut() = r.status();
    ///         res
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn rejection<R2>(self, rejection: R2) -> IdempotencyLayer<P, St, R2> {
        IdempotencyLayer {
            scope: self.scope,
            store: self.store,
            rejection: Arc::new(rejection),
            config: self.config,
        }
    }

    /// The store.
    ///
    /// ```
    /// # use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
    /// let layer = IdempotencyLayer::new(|_: &http::Request<()>| Some("t".to_owned()), InMemory::new());
    /// assert!(layer.store().is_empty());
    /// ```
    pub fn store(&self) -> &Arc<St> {
        &self.store
    }
}

impl<S, P, St, R> Layer<S> for IdempotencyLayer<P, St, R> {
    type Service = Idempotency<S, P, St, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_shared(
            inner,
            Arc::new(Shared {
                scope: self.scope.clone(),
                store: self.store.clone(),
                rejection: self.rejection.clone(),
                config: self.config.clone(),
            }),
        )
    }
}
