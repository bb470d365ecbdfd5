use std::future::Future;

use crate::BoxError;

/// The outcome of [`CountBackend::acquire`].
///
/// ```
/// use upgate_layers::count_limit::Acquired;
/// let a = Acquired { acquired: false, count: 3 };
/// assert!(!a.acquired);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquired {
    /// Whether a slot was taken.
    pub acquired: bool,
    /// Slots taken for the key after the call.
    pub count: u64,
}

/// Atomic per-key slot counters.
///
/// ```
/// use upgate_layers::count_limit::{CountBackend, InProcess};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), upgate_layers::BoxError> {
/// let backend = InProcess::new();
/// assert!(backend.acquire("k", 1).await?.acquired);
/// assert!(!backend.acquire("k", 1).await?.acquired);
/// backend.release("k").await?;
/// assert!(backend.acquire("k", 1).await?.acquired);
/// # Ok(())
/// # }
/// ```
pub trait CountBackend: Send + Sync + 'static {
    /// Takes a slot for `key` if fewer than `limit` are taken.
    fn acquire(
        &self,
        key: &str,
        limit: u64,
    ) -> impl Future<Output = Result<Acquired, BoxError>> + Send;

    /// Gives back one slot of `key` (no-op at zero; the key is removed at zero).
    fn release(&self, key: &str) -> impl Future<Output = Result<(), BoxError>> + Send;
}
