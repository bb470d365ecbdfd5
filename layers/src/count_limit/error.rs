use std::fmt;

use crate::BoxError;

/// The count backend failed (for example Redis is unreachable).
///
/// Returned (boxed) from the service; recover it with `downcast_ref::<Error>()`.
///
/// ```
/// use upgate_layers::count_limit::Error;
/// let e: upgate_layers::BoxError = "inner".into();
/// assert!(e.downcast_ref::<Error>().is_none());
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
        f.write_str("count limit backend failed")
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
