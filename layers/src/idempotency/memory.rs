use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{IdempotencyStore, Reservation, StoredResponse};
use crate::BoxError;

#[derive(Debug)]
enum State {
    InProgress { owner: String },
    Completed(StoredResponse),
}

#[derive(Debug)]
struct Entry {
    fingerprint: [u8; 32],
    state: State,
    expires_at: Instant,
}

const SWEEP_EVERY: u64 = 1024;

/// In-process [`IdempotencyStore`] (a mutex-protected map with expiry).
///
/// Suitable for a single replica and tests. Expiry uses `tokio::time::Instant`, so
/// `tokio::time::pause()` controls it.
///
/// ```
/// use upgate_layers::idempotency::InMemory;
/// let store = InMemory::new();
/// assert_eq!(store.len(), 0);
/// ```
#[derive(Debug, Default)]
pub struct InMemory {
    map: Mutex<HashMap<String, Entry>>,
    ops: AtomicU64,
}

impl InMemory {
    /// An empty store.
    ///
    /// ```
    /// let store = upgate_layers::idempotency::InMemory::new();
    /// # let _ = store;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records (reservations and stored responses), expired ones included
    /// until they are swept.
    ///
    /// ```
    /// assert_eq!(upgate_layers::idempotency::InMemory::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store holds no record.
    ///
    /// ```
    /// assert!(upgate_layers::idempotency::InMemory::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reserve_now(
        &self,
        key: &str,
        fp: &[u8; 32],
        owner: &str,
        lock_ttl: Duration,
    ) -> Reservation {
        let now = Instant::now();
        let mut map = self.lock();
        if self.ops.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            map.retain(|_, e| e.expires_at > now);
        }
        if let Some(e) = map.get(key) {
            if e.expires_at > now {
                if &e.fingerprint != fp {
                    return Reservation::FingerprintMismatch;
                }
                return match &e.state {
                    State::InProgress { .. } => Reservation::InProgress,
                    State::Completed(r) => Reservation::Completed(r.clone()),
                };
            }
        }
        map.insert(
            key.to_owned(),
            Entry {
                fingerprint: *fp,
                state: State::InProgress {
                    owner: owner.to_owned(),
                },
                expires_at: now + lock_ttl,
            },
        );
        Reservation::Reserved
    }

    fn finish(&self, key: &str, owner: &str, complete: Option<(&StoredResponse, Duration)>) {
        let mut map = self.lock();
        let held = matches!(
            map.get(key),
            Some(Entry { state: State::InProgress { owner: o }, .. }) if o == owner
        );
        if !held {
            return;
        }
        match complete {
            None => {
                map.remove(key);
            }
            Some((resp, ttl)) => {
                if let Some(e) = map.get_mut(key) {
                    e.state = State::Completed(resp.clone());
                    e.expires_at = Instant::now() + ttl;
                }
            }
        }
    }
}

impl IdempotencyStore for InMemory {
    fn reserve(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        owner: &str,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<Reservation, BoxError>> + Send {
        std::future::ready(Ok(self.reserve_now(key, fingerprint, owner, lock_ttl)))
    }

    fn complete(
        &self,
        key: &str,
        owner: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.finish(key, owner, Some((response, ttl)));
        std::future::ready(Ok(()))
    }

    fn release(&self, key: &str, owner: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.finish(key, owner, None);
        std::future::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lock_ttl_and_ttl_expire() {
        let s = InMemory::new();
        let fp = [1; 32];
        let lock = Duration::from_secs(60);
        assert_eq!(s.reserve_now("k", &fp, "a", lock), Reservation::Reserved);
        assert_eq!(s.reserve_now("k", &fp, "b", lock), Reservation::InProgress);
        tokio::time::advance(Duration::from_secs(61)).await;
        // The crashed holder's lock expired: b takes over; a can no longer complete.
        assert_eq!(s.reserve_now("k", &fp, "b", lock), Reservation::Reserved);
        let r = StoredResponse {
            status: http::StatusCode::OK,
            headers: vec![],
            trailers: vec![],
            body: "x".into(),
        };
        s.finish("k", "a", Some((&r, Duration::from_secs(10))));
        assert_eq!(s.reserve_now("k", &fp, "c", lock), Reservation::InProgress);
        s.finish("k", "b", Some((&r, Duration::from_secs(10))));
        assert_eq!(
            s.reserve_now("k", &fp, "c", lock),
            Reservation::Completed(r)
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(s.reserve_now("k", &fp, "c", lock), Reservation::Reserved);
        s.finish("k", "c", None);
        assert!(s.is_empty());
    }
}
