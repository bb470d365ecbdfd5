use std::time::SystemTime;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};

use super::Expiring;
use crate::util::text_response;

/// Builds the response for an expired resource.
///
/// Receives the [`Expiring<T>`], the time of the decision and the request parts.
/// It may also trigger side effects (e.g. schedule a cleanup). Implemented for
/// closures `Fn(&Expiring<T>, SystemTime, &Parts) -> Response<B>`.
///
/// ```
/// use std::time::{SystemTime, UNIX_EPOCH};
/// use bytes::Bytes;
/// use http::request::Parts;
/// use http::{Response, StatusCode};
/// use http_body_util::Full;
/// use upgate_layers::expiry::{ExpiredResponse, Expiring};
///
/// let gone = |e: &Expiring<String>, now: SystemTime, _parts: &Parts| {
///     let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
///     let body = format!(
///         "{{\"type\":\"sessionExpired\",\"sessionId\":\"{}\",\"expiresAt\":{},\"now\":{}}}",
///         e.info, secs(e.expires_at), secs(now)
///     );
///     let mut res = Response::new(Full::new(Bytes::from(body)));
///     *res.status_mut() = StatusCode::GONE;
///     res
/// };
/// let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
/// let e = Expiring { expires_at: UNIX_EPOCH, info: "s1".to_owned() };
/// assert_eq!(gone.expired(&e, SystemTime::now(), &parts).status(), 410);
/// ```
pub trait ExpiredResponse<T, B>: Send + Sync + 'static {
    /// The response for a request to something that expired at `expiring.expires_at`.
    fn expired(&self, expiring: &Expiring<T>, now: SystemTime, parts: &Parts) -> Response<B>;
}

impl<T, B, F> ExpiredResponse<T, B> for F
where
    F: Fn(&Expiring<T>, SystemTime, &Parts) -> Response<B> + Send + Sync + 'static,
{
    fn expired(&self, expiring: &Expiring<T>, now: SystemTime, parts: &Parts) -> Response<B> {
        self(expiring, now, parts)
    }
}

/// `410 Gone` with a plain-text body.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use upgate_layers::expiry::{DefaultExpired, ExpiredResponse, Expiring};
/// let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
/// let e = Expiring { expires_at: std::time::UNIX_EPOCH, info: () };
/// let res: http::Response<Full<Bytes>> = DefaultExpired.expired(&e, std::time::SystemTime::now(), &parts);
/// assert_eq!(res.status(), 410);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultExpired;

impl<T, B: From<Bytes>> ExpiredResponse<T, B> for DefaultExpired {
    fn expired(&self, _expiring: &Expiring<T>, _now: SystemTime, _parts: &Parts) -> Response<B> {
        text_response(StatusCode::GONE, "expired\n")
    }
}
