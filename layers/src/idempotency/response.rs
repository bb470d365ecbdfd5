use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};

use crate::util::text_response;

/// Why the idempotency layer answered a request itself.
///
/// ```
/// use upgate_layers::idempotency::Rejection;
/// assert_eq!(Rejection::InProgress.status(), 409);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The `Idempotency-Key` is empty, longer than 255 characters or not visible ASCII (400).
    InvalidKey,
    /// The request body is larger than the buffering limit (413).
    PayloadTooLarge,
    /// Another request with the same key is being processed (409).
    InProgress,
    /// The key was used for a different request (422).
    FingerprintMismatch,
}

impl Rejection {
    /// The status the default builder uses.
    ///
    /// ```
    /// use upgate_layers::idempotency::Rejection;
    /// assert_eq!(Rejection::FingerprintMismatch.status(), 422);
    /// ```
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::InvalidKey => StatusCode::BAD_REQUEST,
            Rejection::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::InProgress => StatusCode::CONFLICT,
            Rejection::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

/// Builds the layer's own responses (400, 409, 413, 422).
///
/// Receives the rejection and the request's parts. Implemented for closures
/// `Fn(Rejection, &Parts) -> Response<B>`.
///
/// ```
/// use bytes::Bytes;
/// use http::request::Parts;
/// use http::Response;
/// use http_body_util::Full;
/// use upgate_layers::idempotency::{Rejection, RejectionBuilder};
///
/// let problem = |r: Rejection, parts: &Parts| {
///     let mut res = Response::new(Full::new(Bytes::from(format!("{r:?} at {}", parts.uri.path()))));
///     *res.status_mut() = r.status();
///     res
/// };
/// let (parts, ()) = http::Request::post("/x").body(()).unwrap().into_parts();
/// assert_eq!(problem.rejected(Rejection::InProgress, &parts).status(), 409);
/// ```
pub trait RejectionBuilder<B>: Send + Sync + 'static {
    /// The response for `rejection`.
    fn rejected(&self, rejection: Rejection, parts: &Parts) -> Response<B>;
}

impl<B, F> RejectionBuilder<B> for F
where
    F: Fn(Rejection, &Parts) -> Response<B> + Send + Sync + 'static,
{
    fn rejected(&self, rejection: Rejection, parts: &Parts) -> Response<B> {
        self(rejection, parts)
    }
}

/// Plain-text rejections with the statuses of [`Rejection::status`].
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use upgate_layers::idempotency::{DefaultRejection, Rejection, RejectionBuilder};
/// let (parts, ()) = http::Request::post("/x").body(()).unwrap().into_parts();
/// let res: http::Response<Full<Bytes>> = DefaultRejection.rejected(Rejection::InvalidKey, &parts);
/// assert_eq!(res.status(), 400);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultRejection;

impl<B: From<Bytes>> RejectionBuilder<B> for DefaultRejection {
    fn rejected(&self, rejection: Rejection, _parts: &Parts) -> Response<B> {
        let msg = match rejection {
            Rejection::InvalidKey => "invalid Idempotency-Key\n",
            Rejection::PayloadTooLarge => "request body too large\n",
            Rejection::InProgress => "a request with this Idempotency-Key is in progress\n",
            Rejection::FingerprintMismatch => {
                "this Idempotency-Key was used for a different request\n"
            }
        };
        text_response(rejection.status(), msg)
    }
}
