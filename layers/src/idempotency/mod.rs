//! `Idempotency-Key` support (draft-ietf-httpapi-idempotency-key-header).
//!
//! Requests whose method is configured (default `POST` and `PATCH`), that carry an
//! `Idempotency-Key` header and that an [`IdempotencyScope`] maps to a scope (for
//! example the tenant id) are deduplicated; every other request passes through
//! untouched.
//!
//! For a deduplicated request the layer:
//!
//! 1. validates the key (1 to 255 visible ASCII characters, surrounding quotes of
//!    a structured-field string are removed) — otherwise `400`;
//! 2. buffers the request body up to a limit — otherwise `413` — and computes its
//!    fingerprint: SHA-256 of method, path and query, and body;
//! 3. **atomically** reserves `<prefix><scope>:<key>` in the [`IdempotencyStore`]
//!    (with a short lock TTL so a crashed replica cannot block the key forever):
//!    * someone else holds the reservation → `409`;
//!    * the key was used with another fingerprint → `422`;
//!    * a response is stored → it is replayed (status, stored headers, body, trailers)
//!      with `Idempotent-Replayed: true`;
//! 4. runs the inner service; `5xx` and `429` responses, responses marked
//!    [`NotReplayable`], responses with bodies over the response limit, inner errors and
//!    dropped response futures (client gone) release the reservation; any other response is
//!    stored for the TTL (default 24 hours).
//!
//! The `400`/`409`/`413`/`422` responses come from a [`RejectionBuilder`] so callers
//! can render their own format. Store failures are returned as [`Error`]s.
//!
//! Responses of deduplicated requests are read into memory (to be stored) up to the response
//! limit: one that announces (`size_hint`) more is streamed at once; one that turns out
//! larger while being read is passed on (what was read, then the rest as it streams) and not
//! stored. Responses keep their trailers ([`IdempotencyBody`]), so gRPC works through the
//! layer (`grpc-status` of a failed call, sent in the headers, is among the stored headers by
//! default).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let svc = IdempotencyLayer::new(
//!     |req: &Request<Full<Bytes>>| req.headers().get("x-tenant")?.to_str().ok().map(str::to_owned),
//!     InMemory::new(),
//! )
//! .layer(service_fn(|_req: Request<Full<Bytes>>| async {
//!     let mut res = Response::new(Full::new(Bytes::from_static(b"created")));
//!     *res.status_mut() = StatusCode::CREATED;
//!     Ok::<_, BoxError>(res)
//! }));
//!
//! let req = || {
//!     Request::post("/uploads")
//!         .header("x-tenant", "acme")
//!         .header("idempotency-key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
//!         .body(Full::new(Bytes::from_static(b"{}")))
//!         .unwrap()
//! };
//! let first = svc.clone().oneshot(req()).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let second = svc.clone().oneshot(req()).await?;
//! assert_eq!(second.status(), StatusCode::CREATED);
//! assert_eq!(second.headers()["idempotent-replayed"], "true");
//! # Ok(())
//! # }
//! ```

mod body;
mod error;
mod key;
mod layer;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod response;
mod service;
mod store;

pub use self::body::{IdempotencyBody, MapBody};
pub use self::error::Error;
pub use self::layer::IdempotencyLayer;
pub use self::memory::InMemory;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;
pub use self::response::{DefaultRejection, Rejection, RejectionBuilder};
pub use self::service::{Idempotency, IdempotencyScope, NotReplayable};
pub use self::store::{IdempotencyStore, Reservation, StoredResponse};
pub use crate::future::ResponseFuture;
