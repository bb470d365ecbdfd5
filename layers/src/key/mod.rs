//! Ready-made request keys for the rate limit (and idempotency scopes): the peer's IP, the
//! client's IP behind trusted proxies, a header's value, and combinations of them.
//!
//! A [`KeyExtractor`] turns a request into a key, or `None` when it has none (the request is
//! then not limited, or not deduplicated). Closures `Fn(&Request<B>) -> Option<String>` are
//! extractors too. [`And`] joins two keys (for example tenant and IP), `WithQuota` makes an
//! extractor a `RateLimitPolicy` (feature `rate-limit`) and `Scope` an `IdempotencyScope`
//! (feature `idempotency`).
//!
//! | extractor | key |
//! |---|---|
//! | [`PeerIp`] | the TCP peer's IP, from a [`PeerAddr`] extension (or any extension you name) |
//! | [`ClientIp`] | the client's IP from `X-Forwarded-For` or `Forwarded` (the one your proxies write), believed only from trusted proxies |
//! | [`HeaderValue`] | a header's value |
//!
//! # Behind proxies: never trust a header from anyone
//!
//! `X-Forwarded-For` and `Forwarded` are written by whoever sent the request, so a client can
//! put any address there. [`ClientIp`] starts from the TCP peer and walks the header from
//! the right (the entry the nearest proxy appended) only while the hop that wrote the entry
//! is in the trusted list: the first address that is not a trusted proxy is the client. A
//! peer that is not trusted is the client itself, whatever its headers say.
//!
//! ```
//! use std::net::SocketAddr;
//! use http::Request;
//! use upgate_layers::key::{ClientIp, KeyExtractor, PeerAddr};
//!
//! let key = ClientIp::x_forwarded_for(["10.0.0.0/8".parse().unwrap()]);
//! let req = |peer: &str, xff: &str| {
//!     let mut req = Request::builder().header("x-forwarded-for", xff).body(()).unwrap();
//!     req.extensions_mut().insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
//!     req
//! };
//! // Through the trusted load balancer: the client it saw.
//! assert_eq!(key.extract(&req("10.0.0.5:443", "203.0.113.7")).as_deref(), Some("203.0.113.7"));
//! // A forged entry to the left of it changes nothing.
//! assert_eq!(
//!     key.extract(&req("10.0.0.5:443", "1.2.3.4, 203.0.113.7")).as_deref(),
//!     Some("203.0.113.7")
//! );
//! // Straight from the internet: the header is ignored.
//! assert_eq!(key.extract(&req("198.51.100.9:5000", "1.2.3.4")).as_deref(), Some("198.51.100.9"));
//! ```

mod forwarded;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderName, Request};
pub use ipnet::IpNet;

/// Produces the key of a request, or `None` when it has none.
///
/// ```
/// use http::Request;
/// use upgate_layers::key::KeyExtractor;
///
/// let tenant = |req: &Request<()>| req.headers().get("x-tenant")?.to_str().ok().map(str::to_owned);
/// let req = Request::builder().header("x-tenant", "acme").body(()).unwrap();
/// assert_eq!(tenant.extract(&req).as_deref(), Some("acme"));
/// ```
pub trait KeyExtractor<B>: Send + Sync + 'static {
    /// The key of `req`.
    fn extract(&self, req: &Request<B>) -> Option<String>;
}

impl<B, F> KeyExtractor<B> for F
where
    F: Fn(&Request<B>) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, req: &Request<B>) -> Option<String> {
        self(req)
    }
}

/// Two keys joined unambiguously (the first key's length, `:`, the first key, the second):
/// `None` unless both have a key. For example tenant and client IP.
///
/// ```
/// use http::Request;
/// use upgate_layers::key::{And, HeaderValue, KeyExtractor};
///
/// let key = And::new(HeaderValue::new("x-tenant"), HeaderValue::new("x-user"));
/// let req = Request::builder().header("x-tenant", "a:b").header("x-user", "c").body(()).unwrap();
/// assert_eq!(key.extract(&req).as_deref(), Some("3:a:bc"));
/// let req = Request::builder().header("x-tenant", "a").header("x-user", ":bc").body(()).unwrap();
/// assert_eq!(key.extract(&req).as_deref(), Some("1:a:bc"), "another pair, another key");
/// ```
#[derive(Debug, Clone)]
pub struct And<A, C>(A, C);

impl<A, C> And<A, C> {
    /// `first` and `second`, joined.
    pub fn new(first: A, second: C) -> Self {
        And(first, second)
    }
}

impl<B, A: KeyExtractor<B>, C: KeyExtractor<B>> KeyExtractor<B> for And<A, C> {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        use std::fmt::Write as _;
        let a = self.0.extract(req)?;
        let c = self.1.extract(req)?;
        let mut out = String::with_capacity(a.len() + c.len() + 6);
        // Writing into a String cannot fail.
        let _ = write!(out, "{}:{a}{c}", a.len());
        Some(out)
    }
}

/// A key with one quota for every key: a
/// [`RateLimitPolicy`](crate::rate_limit::RateLimitPolicy).
///
/// ```
/// use http::Request;
/// use upgate_layers::key::{HeaderValue, WithQuota};
/// use upgate_layers::rate_limit::{Quota, RateLimitPolicy};
///
/// let policy = WithQuota::new(HeaderValue::new("x-api-key"), Quota::new(10, 20));
/// let req = Request::builder().header("x-api-key", "k1").body(()).unwrap();
/// assert_eq!(policy.classify(&req), Some(("k1".to_owned(), Quota::new(10, 20))));
/// ```
#[cfg(feature = "rate-limit")]
#[derive(Debug, Clone)]
pub struct WithQuota<K> {
    key: K,
    quota: crate::rate_limit::Quota,
}

#[cfg(feature = "rate-limit")]
impl<K> WithQuota<K> {
    /// `quota` for every key `key` extracts.
    pub fn new(key: K, quota: crate::rate_limit::Quota) -> Self {
        WithQuota { key, quota }
    }
}

#[cfg(feature = "rate-limit")]
impl<B, K: KeyExtractor<B>> crate::rate_limit::RateLimitPolicy<B> for WithQuota<K> {
    fn classify(&self, req: &Request<B>) -> Option<(String, crate::rate_limit::Quota)> {
        Some((self.key.extract(req)?, self.quota))
    }
}

/// An extractor as an idempotency scope: keys are deduplicated per extracted key.
///
/// ```
/// use http::Request;
/// use upgate_layers::idempotency::IdempotencyScope;
/// use upgate_layers::key::{HeaderValue, Scope};
///
/// let scope = Scope(HeaderValue::new("x-tenant"));
/// let req = Request::builder().header("x-tenant", "acme").body(()).unwrap();
/// assert_eq!(scope.scope(&req).as_deref(), Some("acme"));
/// ```
#[cfg(feature = "idempotency")]
#[derive(Debug, Clone)]
pub struct Scope<K>(pub K);

#[cfg(feature = "idempotency")]
impl<B, K: KeyExtractor<B>> crate::idempotency::IdempotencyScope<B> for Scope<K> {
    fn scope(&self, req: &Request<B>) -> Option<String> {
        self.0.extract(req)
    }
}

/// The TCP peer's address, as a request extension. Servers built on hyper insert it per
/// connection (see the `hyper_rate_limit` example); with axum, copy `ConnectInfo` into it
/// or use [`PeerIp::from_extension`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

type PeerFn<B> = Arc<dyn Fn(&Request<B>) -> Option<IpAddr> + Send + Sync>;

/// The TCP peer's IP (IPv4-mapped IPv6 addresses as IPv4), from [`PeerAddr`] or another
/// extension: `None` when the request carries none.
///
/// ```
/// use http::Request;
/// use upgate_layers::key::{KeyExtractor, PeerAddr, PeerIp};
///
/// let mut req = Request::new(());
/// assert_eq!(PeerIp::new().extract(&req), None);
/// req.extensions_mut().insert(PeerAddr("[::ffff:192.0.2.1]:80".parse().unwrap()));
/// assert_eq!(PeerIp::new().extract(&req).as_deref(), Some("192.0.2.1"));
///
/// // Any extension that holds the address, for example axum's `ConnectInfo<SocketAddr>`.
/// #[derive(Clone)]
/// struct Conn(std::net::SocketAddr);
/// let key = PeerIp::from_extension(|c: &Conn| c.0);
/// let mut req = Request::new(());
/// req.extensions_mut().insert(Conn("192.0.2.2:1".parse().unwrap()));
/// assert_eq!(key.extract(&req).as_deref(), Some("192.0.2.2"));
/// ```
pub struct PeerIp<B> {
    peer: PeerFn<B>,
}

impl<B> Clone for PeerIp<B> {
    fn clone(&self) -> Self {
        PeerIp {
            peer: self.peer.clone(),
        }
    }
}

impl<B> std::fmt::Debug for PeerIp<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIp").finish_non_exhaustive()
    }
}

impl<B: 'static> PeerIp<B> {
    /// The address of the [`PeerAddr`] extension.
    pub fn new() -> Self {
        Self::from_extension(|p: &PeerAddr| p.0)
    }

    /// The address `addr` reads from the extension `E`.
    pub fn from_extension<E, F>(addr: F) -> Self
    where
        E: Clone + Send + Sync + 'static,
        F: Fn(&E) -> SocketAddr + Send + Sync + 'static,
    {
        PeerIp {
            peer: Arc::new(move |req: &Request<B>| {
                req.extensions().get::<E>().map(|e| canonical(addr(e).ip()))
            }),
        }
    }

    fn ip(&self, req: &Request<B>) -> Option<IpAddr> {
        (self.peer)(req)
    }
}

impl<B: 'static> Default for PeerIp<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: 'static> KeyExtractor<B> for PeerIp<B> {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        self.ip(req).map(|ip| ip.to_string())
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as IPv4, so one client has one key on dual-stack
/// listeners.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Which proxy header [`ClientIp`] reads: the one your proxies write. There is no "either":
/// a proxy passes on the header it does not write untouched, so a client could fill that one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// RFC 7239 `Forwarded` (`for=` of each element).
    Forwarded,
    /// `X-Forwarded-For` (nginx, HAProxy, the cloud load balancers).
    XForwardedFor,
}

/// The client's IP behind trusted proxies; see the [module docs](self).
///
/// The walk: the current hop is the TCP peer ([`PeerIp`]). While the current hop is a
/// trusted proxy and the header has an entry left, the next entry from the right (the one
/// that proxy appended) becomes the current hop. The key is the first hop that is not a
/// trusted proxy; if every hop is trusted, the leftmost address. An entry that is not an
/// address (`unknown`, an obfuscated `_id`, garbage) ends the walk at the proxy that wrote
/// it: that proxy is then the key, never anything a client could choose.
#[derive(Debug, Clone)]
pub struct ClientIp<B> {
    peer: PeerIp<B>,
    trusted: Arc<[IpNet]>,
    header: ProxyHeader,
}

impl<B: 'static> ClientIp<B> {
    /// Trusting the proxies in `trusted` (CIDRs), which append to `X-Forwarded-For`; the
    /// peer from [`PeerAddr`].
    pub fn x_forwarded_for(trusted: impl IntoIterator<Item = IpNet>) -> Self {
        Self::new(ProxyHeader::XForwardedFor, trusted)
    }

    /// Trusting the proxies in `trusted` (CIDRs), which append to `Forwarded`; the peer from
    /// [`PeerAddr`].
    pub fn forwarded(trusted: impl IntoIterator<Item = IpNet>) -> Self {
        Self::new(ProxyHeader::Forwarded, trusted)
    }

    /// Trusting the proxies in `trusted` (CIDRs), which append to `header`.
    pub fn new(header: ProxyHeader, trusted: impl IntoIterator<Item = IpNet>) -> Self {
        ClientIp {
            peer: PeerIp::new(),
            trusted: trusted.into_iter().collect(),
            header,
        }
    }

    /// Takes the peer address from another source (see [`PeerIp::from_extension`]).
    pub fn peer(mut self, peer: PeerIp<B>) -> Self {
        self.peer = peer;
        self
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address.
    pub fn ip(&self, req: &Request<B>) -> Option<IpAddr> {
        let peer = self.peer.ip(req)?;
        if !self.trusted(peer) {
            return Some(peer);
        }
        let headers = req.headers();
        let hops = match self.header {
            ProxyHeader::Forwarded => {
                forwarded::forwarded_for(headers.get_all(http::header::FORWARDED))
            }
            ProxyHeader::XForwardedFor => {
                forwarded::x_forwarded_for(headers.get_all(&X_FORWARDED_FOR))
            }
        };
        let mut current = peer;
        for hop in hops.into_iter().rev().take(forwarded::MAX_HOPS) {
            match hop {
                Some(ip) => {
                    current = canonical(ip);
                    if !self.trusted(current) {
                        return Some(current);
                    }
                }
                None => return Some(current),
            }
        }
        Some(current)
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

impl<B: 'static> KeyExtractor<B> for ClientIp<B> {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        self.ip(req).map(|ip| ip.to_string())
    }
}

/// A header's value (the first one, if it is visible ASCII): `None` when it is missing.
///
/// ```
/// use http::Request;
/// use upgate_layers::key::{HeaderValue, KeyExtractor};
///
/// let key = HeaderValue::new("x-api-key");
/// let req = Request::builder().header("x-api-key", "k-123").body(()).unwrap();
/// assert_eq!(key.extract(&req).as_deref(), Some("k-123"));
/// assert_eq!(key.extract(&Request::new(())), None);
/// ```
#[derive(Debug, Clone)]
pub struct HeaderValue {
    name: HeaderName,
}

impl HeaderValue {
    /// The header `name`.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name (a programming error, caught by the first test).
    pub fn new(name: &'static str) -> Self {
        HeaderValue {
            name: HeaderName::from_static(name),
        }
    }

    /// The header `name`.
    pub fn from_name(name: HeaderName) -> Self {
        HeaderValue { name }
    }
}

impl<B> KeyExtractor<B> for HeaderValue {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        req.headers()
            .get(&self.name)?
            .to_str()
            .ok()
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests;
