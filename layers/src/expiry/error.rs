use std::fmt;

use crate::BoxError;

/// The [`DeadlineLookup`](super::DeadlineLookup) failed (for example Redis is
/// unreachable).
///
/// Returned (boxed) from the service; recover it with `downcast_ref::<Error>()`.
///
/// ```
/// use upgate_layers::expiry::Error;
/// let e: upgate_layers::BoxError = "inner".into();
/// assert!(e.downcast_ref::<Error>().is_none());
/// ```
#[derive(Debug)]
pub struct Error {
    source: BoxError,
}

impl Error {
    pub(crate) fn lookup(source: BoxError) -> Self {
        Self { source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline lookup failed")
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
