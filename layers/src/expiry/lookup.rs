use std::future::Future;
use std::time::SystemTime;

use http::request::Parts;

use crate::BoxError;

/// A deadline and the caller's data about the thing that expires.
///
/// Inserted into the request extensions when the deadline has not passed.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use upgate_layers::expiry::Expiring;
///
/// let e = Expiring { expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(10), info: "session-1" };
/// assert!(e.is_expired_at(SystemTime::UNIX_EPOCH + Duration::from_secs(10)));
/// assert!(!e.is_expired_at(SystemTime::UNIX_EPOCH));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiring<T> {
    /// When it expires (expired when `now >= expires_at`).
    pub expires_at: SystemTime,
    /// Caller data.
    pub info: T,
}

impl<T> Expiring<T> {
    /// Whether it is expired at `now`.
    ///
    /// ```
    /// # use std::time::SystemTime;
    /// # use upgate_layers::expiry::Expiring;
    /// let e = Expiring { expires_at: SystemTime::UNIX_EPOCH, info: () };
    /// assert!(e.is_expired_at(SystemTime::now()));
    /// ```
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.expires_at
    }
}

/// Resolves a request to the deadline of what it addresses.
///
/// It receives the request's [`Parts`] (not the body; `Parts` is `Sync`, which keeps
/// the service future `Send` for bodies that are not `Sync`, like axum's). `Ok(None)`
/// lets the request through; errors are infrastructure failures.
///
/// Implemented for closures `Fn(&Parts) -> Fut` whose future is `'static` (copy what
/// you need out of the parts before the `async move` block).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::request::Parts;
/// use upgate_layers::expiry::{DeadlineLookup, Expiring};
/// use upgate_layers::BoxError;
///
/// #[derive(Clone, Debug)]
/// struct Session { id: String }
///
/// struct Sessions;
/// impl DeadlineLookup for Sessions {
///     type Info = Session;
///     fn lookup(&self, parts: &Parts)
///         -> impl std::future::Future<Output = Result<Option<Expiring<Session>>, BoxError>> + Send {
///         let id = parts.uri.path().strip_prefix("/sessions/").map(str::to_owned);
///         async move {
///             Ok(id.map(|id| Expiring {
///                 expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
///                 info: Session { id },
///             }))
///         }
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (parts, ()) = http::Request::get("/sessions/abc").body(()).unwrap().into_parts();
/// let found = Sessions.lookup(&parts).await.unwrap().unwrap();
/// assert_eq!(found.info.id, "abc");
/// # }
/// ```
pub trait DeadlineLookup: Send + Sync + 'static {
    /// Caller data carried with the deadline.
    type Info: Clone + Send + Sync + 'static;

    /// The deadline of what `parts` addresses, if any.
    fn lookup(
        &self,
        parts: &Parts,
    ) -> impl Future<Output = Result<Option<Expiring<Self::Info>>, BoxError>> + Send;
}

impl<F, Fut, T> DeadlineLookup for F
where
    F: Fn(&Parts) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Expiring<T>>, BoxError>> + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    type Info = T;

    fn lookup(
        &self,
        parts: &Parts,
    ) -> impl Future<Output = Result<Option<Expiring<T>>, BoxError>> + Send {
        self(parts)
    }
}
