//! Answers requests for resources whose deadline has passed.
//!
//! A [`DeadlineLookup`] resolves a request (its [`Parts`](http::request::Parts)) to
//! an optional [`Expiring<T>`]: a deadline plus caller data (for example an upload
//! session). When `now >= expires_at` (time from a [`Clock`]), the response comes
//! from an [`ExpiredResponse`] builder (default: `410 Gone`) and the inner service is
//! not called. Otherwise the `Expiring<T>` is inserted into the request extensions
//! so handlers can reuse it, and the inner service runs. Requests the lookup maps
//! to `None` pass through. Lookup failures are returned as [`Error`]s.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use bytes::Bytes;
//! use http::request::Parts;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use upgate_layers::expiry::{Expiring, ExpiryLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let now = SystemTime::now();
//! // Sessions "/s/old" expired a minute ago; everything else is unknown.
//! let lookup = move |parts: &Parts| {
//!     let found = (parts.uri.path() == "/s/old").then(|| Expiring {
//!         expires_at: now - Duration::from_secs(60),
//!         info: "old".to_owned(),
//!     });
//!     async move { Ok::<_, BoxError>(found) }
//! };
//! let svc = ExpiryLayer::new(lookup).layer(service_fn(|_: Request<Full<Bytes>>| async {
//!     Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
//! }));
//! let res = svc.clone().oneshot(Request::get("/s/old").body(Full::default())?).await?;
//! assert_eq!(res.status(), 410);
//! let res = svc.oneshot(Request::get("/s/other").body(Full::default())?).await?;
//! assert_eq!(res.status(), 200);
//! # Ok(())
//! # }
//! ```

mod clock;
mod error;
mod layer;
mod lookup;
mod response;
mod service;

pub use self::clock::{Clock, SystemClock, TokioClock};
pub use self::error::Error;
pub use self::layer::ExpiryLayer;
pub use self::lookup::{DeadlineLookup, Expiring};
pub use self::response::{DefaultExpired, ExpiredResponse};
pub use self::service::Expiry;
pub use crate::future::ResponseFuture;
