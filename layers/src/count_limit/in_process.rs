use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use super::{Acquired, CountBackend};
use crate::BoxError;

/// In-process counters (a mutex-protected map; entries are removed at zero).
///
/// ```
/// use upgate_layers::count_limit::InProcess;
/// let backend = InProcess::new();
/// assert!(backend.try_acquire("k", 2).acquired);
/// assert_eq!(backend.count("k"), 1);
/// backend.release_now("k");
/// assert_eq!(backend.count("k"), 0);
/// assert!(backend.is_empty());
/// ```
#[derive(Debug, Default)]
pub struct InProcess {
    counts: Mutex<HashMap<String, u64>>,
}

impl InProcess {
    /// Empty counters.
    ///
    /// ```
    /// let backend = upgate_layers::count_limit::InProcess::new();
    /// # let _ = backend;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots taken for `key`.
    ///
    /// ```
    /// assert_eq!(upgate_layers::count_limit::InProcess::new().count("k"), 0);
    /// ```
    pub fn count(&self, key: &str) -> u64 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// Whether no slot is taken.
    ///
    /// ```
    /// assert!(upgate_layers::count_limit::InProcess::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// [`CountBackend::acquire`], synchronously.
    ///
    /// ```
    /// let backend = upgate_layers::count_limit::InProcess::new();
    /// assert!(!backend.try_acquire("k", 0).acquired);
    /// ```
    pub fn try_acquire(&self, key: &str, limit: u64) -> Acquired {
        let mut map = self.lock();
        match map.get_mut(key) {
            Some(count) if *count >= limit => Acquired {
                acquired: false,
                count: *count,
            },
            Some(count) => {
                *count += 1;
                Acquired {
                    acquired: true,
                    count: *count,
                }
            }
            None if limit == 0 => Acquired {
                acquired: false,
                count: 0,
            },
            None => {
                map.insert(key.to_owned(), 1);
                Acquired {
                    acquired: true,
                    count: 1,
                }
            }
        }
    }

    /// [`CountBackend::release`], synchronously.
    ///
    /// ```
    /// let backend = upgate_layers::count_limit::InProcess::new();
    /// backend.release_now("never-taken");
    /// assert!(backend.is_empty());
    /// ```
    pub fn release_now(&self, key: &str) {
        let mut map = self.lock();
        if let Some(count) = map.get_mut(key) {
            if *count <= 1 {
                map.remove(key);
            } else {
                *count -= 1;
            }
        }
    }
}

impl CountBackend for InProcess {
    fn acquire(
        &self,
        key: &str,
        limit: u64,
    ) -> impl Future<Output = Result<Acquired, BoxError>> + Send {
        std::future::ready(Ok(self.try_acquire(key, limit)))
    }

    fn release(&self, key: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.release_now(key);
        std::future::ready(Ok(()))
    }
}
