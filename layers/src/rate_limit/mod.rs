//! Keyed GCRA rate limiting with IETF `RateLimit` / `RateLimit-Policy` headers.
//!
//! A [`RateLimitPolicy`] classifies each request into a key and a [`Quota`] (or `None`:
//! the request is not limited, passes through and gets no headers). A
//! [`RateLimitBackend`] makes the GCRA decision: [`InProcess`] (one `governor` keyed
//! limiter per distinct quota, so each tenant can have its own quota) or, with the
//! `redis` feature, `RedisGcra` (one Lua script per decision, clock = Redis `TIME`,
//! so every replica shares one clock and one state; with `RedisGcra::lease`, a busy key
//! takes tokens from Redis in batches and a refused key is refused locally until its
//! `Retry-After`, so most decisions need no round trip).
//!
//! # Headers (draft-ietf-httpapi-ratelimit-headers)
//!
//! Every classified response carries:
//!
//! * `RateLimit-Policy: "default";q=<burst>;w=<window>` where `q` is the quota's burst
//!   (the most requests that can be made at once) and `w` the time in whole seconds
//!   (rounded up, at least 1) the GCRA needs to refill a full burst from empty:
//!   `burst / per_second`.
//! * `RateLimit: "default";r=<remaining>;t=<reset>` where `r` is the number of
//!   requests that can still be made immediately and `t` the whole seconds (rounded
//!   up) until the bucket is full again.
//!
//! Rejections are answered with `429 Too Many Requests` (by default; see
//! [`RejectionBuilder`]) and `Retry-After` (whole seconds until one request is
//! admitted again, rounded up, at least 1).
//!
//! # Bypass
//!
//! [`RateLimitLayer::bypass`] admits everything but logs every would-be rejection at
//! `warn` (with the key) and counts it in [`RateLimitStats::bypassed`]: use it to roll
//! out a quota safely.
//!
//! # Errors
//!
//! Backend failures are not turned into admissions: the service returns an [`Error`]
//! (inside a `BoxError`).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};
//! use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = RateLimitLayer::new(
//!     |req: &Request<Full<Bytes>>| {
//!         let tenant = req.headers().get("x-tenant")?.to_str().ok()?;
//!         Some((tenant.to_owned(), Quota::new(1, 2)))
//!     },
//!     InProcess::new(),
//! );
//! let stats = layer.stats();
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"ok"))))
//! }));
//!
//! let req = || Request::builder().header("x-tenant", "t1").body(Full::default()).unwrap();
//! assert_eq!(svc.clone().oneshot(req()).await?.status(), 200);
//! assert_eq!(svc.clone().oneshot(req()).await?.status(), 200);
//! let res = svc.clone().oneshot(req()).await?;
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "1");
//! assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=2;w=2");
//! assert_eq!((stats.admitted(), stats.limited()), (2, 1));
//! # Ok(())
//! # }
//! ```

mod backend;
mod error;
mod in_process;
mod layer;
#[cfg(feature = "redis")]
mod lease;
mod policy;
#[cfg(feature = "redis")]
mod redis;
mod response;
mod service;
mod stats;

pub use self::backend::{Decision, RateLimitBackend};
pub use self::error::Error;
pub use self::in_process::InProcess;
pub use self::layer::RateLimitLayer;
pub use self::policy::{Quota, RateLimitPolicy};
#[cfg(feature = "redis")]
pub use self::redis::RedisGcra;
pub use self::response::{DefaultRejection, RejectionBuilder};
pub use self::service::RateLimit;
pub use self::stats::RateLimitStats;
pub use crate::future::ResponseFuture;
