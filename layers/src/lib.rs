//! Tower middleware for the upgate upload gateway, usable in any tower stack
//! (hyper, axum, tonic).
//!
//! Each layer lives behind its own cargo feature:
//!
//! | feature       | module            | what it does                                              |
//! |---------------|-------------------|-----------------------------------------------------------|
//! | `rate-limit`  | [`rate_limit`]    | keyed GCRA rate limiting (in-process or Redis), IETF headers |
//! | `idempotency` | [`idempotency`]   | `Idempotency-Key` reservation, replay and conflict detection |
//! | `expiry`      | [`expiry`]        | answers for resources whose deadline has passed            |
//! | `count-limit` | [`count_limit`]   | "at most N of X per key" and per-key concurrency caps      |
//! | `keys`        | [`key`]           | request keys: peer IP, client IP behind trusted proxies, a header |
//! | `redis`       |                   | Redis backends for whichever of the above are enabled      |
//! | `full`        |                   | everything                                                 |
//!
//! # Conventions shared by all layers
//!
//! * `poll_ready` forwards to the inner service; decisions are made in `call`.
//! * Policy outcomes (429, 409, 410, 422, replays, ...) are **responses**, built by
//!   overridable builder traits that have closure implementations, so callers can
//!   render their own error format.
//! * Infrastructure failures (a backend that cannot be reached) are **errors**: every
//!   service has `Error = BoxError`; the layer's own error type (for example
//!   `rate_limit::Error`) can be recovered with `downcast_ref`.
//! * Responses built by a layer need `ResBody: From<Bytes>`.
//!
//! ```
//! // The crate's shared error type is a plain boxed error.
//! let err: upgate_layers::BoxError = "backend down".into();
//! assert_eq!(err.to_string(), "backend down");
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]
#![deny(missing_docs)]
#![cfg_attr(
    not(any(
        feature = "rate-limit",
        feature = "idempotency",
        feature = "expiry",
        feature = "count-limit"
    )),
    allow(dead_code, unused_imports)
)]

/// Boxed error returned by every service in this crate.
///
/// ```
/// use upgate_layers::BoxError;
/// let e: BoxError = std::io::Error::other("boom").into();
/// assert!(e.downcast_ref::<std::io::Error>().is_some());
/// ```
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

mod future;
mod util;

/// The README's examples, compiled and run as doctests.
#[cfg(all(
    doctest,
    feature = "rate-limit",
    feature = "idempotency",
    feature = "expiry",
    feature = "count-limit",
    feature = "keys"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(feature = "count-limit")]
pub mod count_limit;
#[cfg(feature = "expiry")]
pub mod expiry;
#[cfg(feature = "idempotency")]
pub mod idempotency;
#[cfg(feature = "keys")]
pub mod key;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
