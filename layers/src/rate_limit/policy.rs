use std::time::Duration;

use http::Request;

/// A GCRA quota: a sustained rate and a burst.
///
/// `per_second` requests are admitted per second on average, and up to `burst`
/// requests at once. Zero values are treated as 1.
///
/// ```
/// use std::time::Duration;
/// use upgate_layers::rate_limit::Quota;
///
/// let q = Quota::new(10, 50);
/// assert_eq!(q.emission_interval(), Duration::from_millis(100));
/// assert_eq!(q.window(), Duration::from_secs(5));
/// assert_eq!(Quota::new(0, 0), Quota::new(0, 0));
/// assert_eq!(Quota::new(0, 0).burst(), 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Sustained rate, requests per second (0 is treated as 1).
    pub per_second: u32,
    /// The most requests admitted at once (0 is treated as 1).
    pub burst: u32,
}

impl Quota {
    /// A quota of `per_second` requests per second with a burst of `burst`.
    ///
    /// ```
    /// let q = upgate_layers::rate_limit::Quota::new(5, 20);
    /// assert_eq!((q.per_second, q.burst), (5, 20));
    /// ```
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }

    /// The effective rate (at least 1 per second).
    ///
    /// ```
    /// assert_eq!(upgate_layers::rate_limit::Quota::new(0, 3).rate(), 1);
    /// ```
    pub const fn rate(&self) -> u32 {
        if self.per_second == 0 {
            1
        } else {
            self.per_second
        }
    }

    /// The effective burst (at least 1).
    ///
    /// ```
    /// assert_eq!(upgate_layers::rate_limit::Quota::new(3, 0).burst(), 1);
    /// ```
    pub const fn burst(&self) -> u32 {
        if self.burst == 0 {
            1
        } else {
            self.burst
        }
    }

    /// The GCRA emission interval: the time one request "costs", `1s / per_second`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let q = upgate_layers::rate_limit::Quota::new(4, 1);
    /// assert_eq!(q.emission_interval(), Duration::from_millis(250));
    /// ```
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.rate()))
    }

    /// The time needed to refill a full burst from empty (`burst / per_second`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let q = upgate_layers::rate_limit::Quota::new(2, 5);
    /// assert_eq!(q.window(), Duration::from_millis(2500));
    /// ```
    pub fn window(&self) -> Duration {
        self.emission_interval() * self.burst()
    }
}

/// Classifies a request into a rate-limit key and quota.
///
/// `None` means the request is not limited: it passes through without headers.
/// Implemented for closures `Fn(&Request<B>) -> Option<(String, Quota)>`.
///
/// ```
/// use http::Request;
/// use upgate_layers::rate_limit::{Quota, RateLimitPolicy};
///
/// #[derive(Clone)]
/// struct Tenant { id: String, quota: Quota }
///
/// struct PerTenant;
/// impl<B> RateLimitPolicy<B> for PerTenant {
///     fn classify(&self, req: &Request<B>) -> Option<(String, Quota)> {
///         let t = req.extensions().get::<Tenant>()?;
///         Some((format!("{{{}}}", t.id), t.quota))
///     }
/// }
///
/// let mut req = Request::new(());
/// assert!(PerTenant.classify(&req).is_none());
/// req.extensions_mut().insert(Tenant { id: "acme".into(), quota: Quota::new(1, 1) });
/// assert_eq!(PerTenant.classify(&req).unwrap().0, "{acme}");
/// ```
pub trait RateLimitPolicy<B>: Send + Sync + 'static {
    /// The key and quota for `req`, or `None` to let it through unlimited.
    fn classify(&self, req: &Request<B>) -> Option<(String, Quota)>;
}

impl<B, F> RateLimitPolicy<B> for F
where
    F: Fn(&Request<B>) -> Option<(String, Quota)> + Send + Sync + 'static,
{
    fn classify(&self, req: &Request<B>) -> Option<(String, Quota)> {
        self(req)
    }
}
