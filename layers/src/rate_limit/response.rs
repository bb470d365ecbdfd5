use std::io::Write;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::{Decision, Quota};
use crate::util::{ceil_secs, int_header, text_response};

/// Builds the response for a rejected request.
///
/// The layer adds `Retry-After`, `RateLimit` and `RateLimit-Policy` afterwards unless
/// the builder already set them. Implemented for closures
/// `Fn(&str, &Decision) -> Response<B>` (key, decision).
///
/// ```
/// use bytes::Bytes;
/// use http::{Response, StatusCode};
/// use http_body_util::Full;
/// use upgate_layers::rate_limit::{Decision, RejectionBuilder};
///
/// let problem = |key: &str, _d: &Decision| {
///     let mut res = Response::new(Full::new(Bytes::from(format!("{{\"type\":\"rateLimited\",\"key\":\"{key}\"}}"))));
///     *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
///     res.headers_mut().insert("content-type", "application/problem+json".parse().unwrap());
///     res
/// };
/// # let d = Decision { allowed: false, limit: 1, remaining: 0,
/// #     reset_after: std::time::Duration::ZERO, retry_after: None };
/// let res: Response<Full<Bytes>> = problem.rejected("t1", &d);
/// assert_eq!(res.status(), 429);
/// ```
pub trait RejectionBuilder<B>: Send + Sync + 'static {
    /// The response for a request over quota.
    fn rejected(&self, key: &str, decision: &Decision) -> Response<B>;
}

impl<B, F> RejectionBuilder<B> for F
where
    F: Fn(&str, &Decision) -> Response<B> + Send + Sync + 'static,
{
    fn rejected(&self, key: &str, decision: &Decision) -> Response<B> {
        self(key, decision)
    }
}

/// The default rejection: `429 Too Many Requests` with a plain-text body.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use upgate_layers::rate_limit::{Decision, DefaultRejection, RejectionBuilder};
/// # let d = Decision { allowed: false, limit: 1, remaining: 0,
/// #     reset_after: std::time::Duration::ZERO, retry_after: None };
/// let res: http::Response<Full<Bytes>> = DefaultRejection.rejected("k", &d);
/// assert_eq!(res.status(), 429);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultRejection;

impl<B: From<Bytes>> RejectionBuilder<B> for DefaultRejection {
    fn rejected(&self, _key: &str, _decision: &Decision) -> Response<B> {
        text_response(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded\n")
    }
}

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The header values for one decision, computed before the inner service runs.
pub(crate) struct RateLimitHeaders {
    policy: HeaderValue,
    state: HeaderValue,
    retry_after: Option<HeaderValue>,
}

fn header_from_buf(buf: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(buf).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

impl RateLimitHeaders {
    pub(crate) fn new(quota: Quota, decision: &Decision) -> Self {
        let mut buf = [0u8; 64];
        let policy = {
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let w = ceil_secs(quota.window()).max(1);
            let _ = write!(cur, "\"default\";q={};w={}", quota.burst(), w);
            let n = cur.position() as usize;
            header_from_buf(&buf[..n])
        };
        let state = {
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(
                cur,
                "\"default\";r={};t={}",
                decision.remaining,
                ceil_secs(decision.reset_after)
            );
            let n = cur.position() as usize;
            header_from_buf(&buf[..n])
        };
        Self {
            policy,
            state,
            retry_after: decision.retry_after_secs().map(int_header),
        }
    }

    /// Adds the fields to `headers`, keeping any the response already has.
    pub(crate) fn apply(self, headers: &mut HeaderMap, with_retry_after: bool) {
        if !headers.contains_key(&RATELIMIT_POLICY) {
            headers.insert(RATELIMIT_POLICY.clone(), self.policy);
        }
        if !headers.contains_key(&RATELIMIT) {
            headers.insert(RATELIMIT.clone(), self.state);
        }
        if with_retry_after {
            if let Some(v) = self.retry_after {
                if !headers.contains_key(header::RETRY_AFTER) {
                    headers.insert(header::RETRY_AFTER, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn header_values() {
        let d = Decision {
            allowed: true,
            limit: 10,
            remaining: 7,
            reset_after: Duration::from_millis(2100),
            retry_after: None,
        };
        let h = RateLimitHeaders::new(Quota::new(3, 10), &d);
        let mut map = HeaderMap::new();
        h.apply(&mut map, true);
        assert_eq!(map["ratelimit-policy"], "\"default\";q=10;w=4");
        assert_eq!(map["ratelimit"], "\"default\";r=7;t=3");
        assert!(map.get("retry-after").is_none());
    }
}
