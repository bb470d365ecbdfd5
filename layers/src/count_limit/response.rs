use bytes::Bytes;
use http::{Response, StatusCode};

use crate::util::text_response;

/// Builds the response when no slot is free for a key.
///
/// Receives the key and the limit. Implemented for closures
/// `Fn(&str, u64) -> Response<B>`.
///
/// ```
/// use bytes::Bytes;
/// use http::{Response, StatusCode};
/// use http_body_util::Full;
/// use upgate_layers::count_limit::RejectionBuilder;
///
/// let too_many = |_key: &str, limit: u64| {
///     let body = format!("{{\"type\":\"tooManyConcurrentUploads\",\"limit\":{limit}}}");
///     let mut res = Response::new(Full::new(Bytes::from(body)));
///     *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
///     res
/// };
/// assert_eq!(too_many.rejected("k", 4).status(), 429);
/// ```
pub trait RejectionBuilder<B>: Send + Sync + 'static {
    /// The response when `key` already has `limit` slots taken.
    fn rejected(&self, key: &str, limit: u64) -> Response<B>;
}

impl<B, F> RejectionBuilder<B> for F
where
    F: Fn(&str, u64) -> Response<B> + Send + Sync + 'static,
{
    fn rejected(&self, key: &str, limit: u64) -> Response<B> {
        self(key, limit)
    }
}

/// `429 Too Many Requests` with a plain-text body.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use upgate_layers::count_limit::{DefaultRejection, RejectionBuilder};
/// let res: http::Response<Full<Bytes>> = DefaultRejection.rejected("k", 1);
/// assert_eq!(res.status(), 429);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultRejection;

impl<B: From<Bytes>> RejectionBuilder<B> for DefaultRejection {
    fn rejected(&self, _key: &str, _limit: u64) -> Response<B> {
        text_response(
            StatusCode::TOO_MANY_REQUESTS,
            "too many concurrent requests\n",
        )
    }
}
