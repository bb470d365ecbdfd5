use std::fmt;

use crate::BoxError;

/// An idempotency failure that is not a policy outcome: the store failed, or the
/// request or response body could not be read.
///
/// Returned (boxed) from the service; recover it with `downcast_ref::<Error>()`.
///
/// ```
/// use upgate_layers::idempotency::Error;
/// use upgate_layers::BoxError;
///
/// let other: BoxError = "inner".into();
/// assert!(other.downcast_ref::<Error>().is_none());
/// ```
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    source: BoxError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Store,
    RequestBody,
    ResponseBody,
}

impl Error {
    pub(crate) fn store(source: BoxError) -> Self {
        Self {
            kind: Kind::Store,
            source,
        }
    }

    pub(crate) fn request_body(source: BoxError) -> Self {
        Self {
            kind: Kind::RequestBody,
            source,
        }
    }

    pub(crate) fn response_body(source: BoxError) -> Self {
        Self {
            kind: Kind::ResponseBody,
            source,
        }
    }

    /// Whether the idempotency store failed (as opposed to reading a body).
    ///
    /// ```
    /// # use upgate_layers::idempotency::Error;
    /// fn is_store_down(e: &Error) -> bool { e.is_store() }
    /// ```
    pub fn is_store(&self) -> bool {
        self.kind == Kind::Store
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Store => "idempotency store failed",
            Kind::RequestBody => "failed to read the request body",
            Kind::ResponseBody => "failed to read the response body",
        })
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
