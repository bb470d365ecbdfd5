use std::fmt;

use crate::BoxError;

/// A rate-limit backend failed (for example Redis is unreachable).
///
/// Returned (boxed) from the service instead of a response; recover it with
/// `downcast_ref::<Error>()`. The backend's own error is its `source()`.
///
/// ```
/// use upgate_layers::rate_limit::Error;
/// use upgate_layers::BoxError;
///
/// fn is_rate_limit_failure(err: &BoxError) -> bool {
///     err.downcast_ref::<Error>().is_some()
/// }
/// let other: BoxError = "inner".into();
/// assert!(!is_rate_limit_failure(&other));
/// ```
#[derive(Debug)]
pub struct Error {
    source: BoxError,
}

impl Error {
    pub(crate) fn backend(source: BoxError) -> Self {
        Self { source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("rate limit backend failed")
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
