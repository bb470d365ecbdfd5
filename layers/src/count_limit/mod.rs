//! "At most N of X per key": counted slots, reserved atomically before the inner
//! service runs.
//!
//! A [`CountPolicy`] maps a request to a key and a limit (or `None`: not counted). A
//! [`CountBackend`] atomically takes a slot if fewer than `limit` are taken; when
//! none is free the response comes from a [`RejectionBuilder`] (default `429`).
//!
//! What happens to the slot afterwards is the [`Release`] mode:
//!
//! * [`Release::OnCompletion`]: the slot is held only while the request is in
//!   flight, released when the response future completes (response or error) or is
//!   dropped: a per-key concurrency cap.
//! * [`Release::OnFailure`]: the slot is kept when the inner service succeeds (the
//!   thing it counts now exists; release it later with
//!   [`CountBackend::release`], e.g. when an upload session completes) and released
//!   when the inner service errors, the response future is dropped, or the response
//!   is a failure according to [`CountLimitLayer::failure_classifier`] (default:
//!   status >= 400).
//!
//! Backends: [`InProcess`] and, with the `redis` feature, `RedisCount` (Lua:
//! increment-if-below-limit with a TTL safety net, decrement on release, key removed
//! at zero). Backend failures are returned as [`Error`]s.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use upgate_layers::count_limit::{CountLimitLayer, InProcess, Release};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CountLimitLayer::new(
//!     |_: &Request<Full<Bytes>>| Some(("{tenant-1}".to_owned(), 1)),
//!     InProcess::new(),
//!     Release::OnFailure,
//! );
//! let backend = layer.backend().clone();
//! let svc = layer.layer(service_fn(|_: Request<Full<Bytes>>| async {
//!     Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
//! }));
//! assert_eq!(svc.clone().oneshot(Request::new(Full::default())).await?.status(), 200);
//! // The slot is kept after a success: the second request is over the limit.
//! assert_eq!(svc.clone().oneshot(Request::new(Full::default())).await?.status(), 429);
//! assert_eq!(backend.count("{tenant-1}"), 1);
//! # Ok(())
//! # }
//! ```

mod backend;
mod error;
mod in_process;
mod layer;
#[cfg(feature = "redis")]
mod redis;
mod response;
mod service;

pub use self::backend::{Acquired, CountBackend};
pub use self::error::Error;
pub use self::in_process::InProcess;
pub use self::layer::{CountLimitLayer, Release};
#[cfg(feature = "redis")]
pub use self::redis::RedisCount;
pub use self::response::{DefaultRejection, RejectionBuilder};
pub use self::service::{CountLimit, CountPolicy};
pub use crate::future::ResponseFuture;
