//! Local token leases for [`RedisGcra`](super::RedisGcra): the bookkeeping, no I/O.
//!
//! Under sustained load for one key, a replica takes several GCRA tokens from Redis in one
//! round trip and spends them locally. Every token still comes out of the one shared bucket
//! in Redis, so the replicas together never admit more than the quota allows in Redis; the
//! price is that tokens a replica holds are not available to the others, and tokens left
//! when a lease expires are lost (the bucket refills them at its rate).
//!
//! The lease size adapts like TCP slow start: it starts at 1 (exactly one round trip per
//! request, the behaviour without leasing), doubles each time a replica needs a new lease
//! while the previous one was still live, is capped at `max_tokens` and at a tenth of the
//! burst, and falls back to 1 as soon as a lease expires unused or Redis refuses. A key
//! with sparse traffic is therefore always decided exactly, one round trip per request.
//!
//! A new lease is fetched when the held tokens fall to half the lease size: the request
//! that notices pays the round trip (as every request does without leasing) while the
//! others go on spending the tokens still held. Only one fetch per key is in flight; a
//! request that finds no token while it is in flight asks Redis for exactly one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::Decision;

/// Lapsed leases are pruned once the map grows past this many keys (and then again each
/// time it doubles past what a pruning left, so pruning stays amortized O(1) per call).
const PRUNE_ABOVE: usize = 4096;

/// How a `RedisGcra` leases tokens (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeasePolicy {
    /// The largest lease, in tokens.
    pub(crate) max_tokens: u32,
    /// How long leased tokens may be spent.
    pub(crate) ttl: Duration,
}

#[derive(Debug)]
struct Lease {
    /// Tokens this replica may still spend.
    tokens: u32,
    /// When the held tokens stop being valid.
    expires: Instant,
    /// The size of the last lease asked for (0 after a refusal: the next asks for one).
    size: u32,
    /// Whether a leasing fetch is in flight.
    fetching: bool,
    /// Redis's `remaining` at the last fetch (the other replicas' view of the bucket).
    remaining: u32,
    /// When the bucket is full again, as of the last fetch.
    reset_at: Instant,
    /// After a refusal: no request can be admitted before this instant.
    refused_until: Instant,
}

impl Lease {
    fn new(now: Instant) -> Self {
        Lease {
            tokens: 0,
            expires: now,
            size: 1,
            fetching: false,
            remaining: 0,
            reset_at: now,
            refused_until: now,
        }
    }

    fn decision(&self, limit: u32, now: Instant) -> Decision {
        Decision {
            allowed: true,
            limit,
            remaining: self.remaining.saturating_add(self.tokens).min(limit),
            reset_after: self.reset_at.saturating_duration_since(now),
            retry_after: None,
        }
    }
}

/// What a request must do after looking at the local lease.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Admitted from a held token; nothing to fetch.
    Local(Decision),
    /// Admitted from a held token; this request fetches the next lease of `n` tokens
    /// (and must call [`Leases::refilled`] or drop the guard).
    LocalThenRefill(Decision, u32),
    /// No token held: ask Redis for `n` tokens, this request spends the first.
    Fetch(u32),
    /// No token held and a fetch is in flight: ask Redis for exactly one token.
    Exact,
    /// Redis refused a moment ago and no token can exist before it said: refused locally.
    Refuse(Decision),
}

/// The per-key leases of one `RedisGcra` (shared by its clones).
#[derive(Clone, Debug)]
pub(crate) struct Leases {
    policy: LeasePolicy,
    map: Arc<Mutex<LeaseMap>>,
}

#[derive(Debug)]
struct LeaseMap {
    leases: HashMap<String, Lease>,
    /// The size at which the next pruning runs.
    prune_at: usize,
}

impl Default for LeaseMap {
    fn default() -> Self {
        LeaseMap {
            leases: HashMap::new(),
            prune_at: PRUNE_ABOVE,
        }
    }
}

impl Leases {
    pub(crate) fn new(policy: LeasePolicy) -> Self {
        Leases {
            policy,
            map: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseMap> {
        // The map holds plain counters; a panic elsewhere cannot leave it inconsistent.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The largest lease for a quota with this burst (at most a tenth of it).
    fn cap(&self, burst: u32) -> u32 {
        self.policy.max_tokens.min(burst / 10).max(1)
    }

    /// Decides, for one request on `key`, between a held token and a fetch.
    pub(crate) fn plan(&self, key: &str, burst: u32) -> Plan {
        let cap = self.cap(burst);
        let now = Instant::now();
        let mut guard = self.lock();
        if guard.leases.len() > guard.prune_at {
            guard
                .leases
                .retain(|_, l| l.fetching || l.expires > now || l.refused_until > now);
            guard.prune_at = PRUNE_ABOVE.max(2 * guard.leases.len());
        }
        let map = &mut guard.leases;
        let lease = match map.get_mut(key) {
            Some(l) => l,
            None => map.entry(key.to_owned()).or_insert_with(|| Lease::new(now)),
        };
        if lease.tokens == 0 && lease.refused_until > now {
            // GCRA's next admission time only moves later as tokens are taken, so until
            // the moment Redis named, its answer would be the same refusal.
            return Plan::Refuse(Decision {
                allowed: false,
                limit: burst,
                remaining: 0,
                reset_after: lease.reset_at.saturating_duration_since(now),
                retry_after: Some(lease.refused_until - now),
            });
        }
        if cap <= 1 {
            return Plan::Exact;
        }
        let live = lease.expires > now;
        if !live && lease.tokens > 0 {
            // Expired unused: demand fell, start over with exact decisions.
            lease.tokens = 0;
            lease.size = 1;
        }
        if lease.tokens > 0 {
            lease.tokens -= 1;
            let decision = lease.decision(burst, now);
            if !lease.fetching && lease.tokens <= lease.size / 2 {
                lease.fetching = true;
                lease.size = grow(lease.size, cap);
                return Plan::LocalThenRefill(decision, lease.size);
            }
            return Plan::Local(decision);
        }
        if lease.fetching {
            return Plan::Exact;
        }
        lease.fetching = true;
        lease.size = if live {
            // Spent the whole lease before it expired: demand is high, grow.
            grow(lease.size, cap)
        } else {
            // Idle long enough for the lease to lapse: start over at one token.
            1
        };
        Plan::Fetch(lease.size)
    }

    /// The guard a request holding a `Fetch` or `LocalThenRefill` plan keeps until its
    /// fetch is done.
    pub(crate) fn guard(&self, key: &str) -> FetchGuard {
        FetchGuard {
            leases: self.clone(),
            key: key.to_owned(),
            armed: true,
        }
    }
}

/// The next lease size: double, at least 1, at most `cap`.
fn grow(size: u32, cap: u32) -> u32 {
    size.saturating_mul(2).clamp(1, cap)
}

/// Clears the key's in-flight flag if the fetching request is dropped (or fails) before it
/// records the outcome.
pub(crate) struct FetchGuard {
    leases: Leases,
    key: String,
    armed: bool,
}

impl FetchGuard {
    /// Records the outcome of the fetch (see [`Leases::record`]) and ends it.
    pub(crate) fn finish(mut self, answer: Answer) {
        self.armed = false;
        self.leases.update(&self.key, answer, true);
    }
}

/// One script answer, as the lease bookkeeping needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Answer {
    /// Tokens granted (0: refused).
    pub(crate) granted: u32,
    /// Of those, the tokens the asking request spent itself.
    pub(crate) spent: u32,
    /// Tokens left in the shared bucket.
    pub(crate) remaining: u32,
    /// Time until the shared bucket is full.
    pub(crate) reset: Duration,
    /// For a refusal: time until one token exists.
    pub(crate) retry_after: Duration,
}

impl Leases {
    /// Records a refusal Redis gave an exact (non-leasing) request, so that the requests
    /// that follow are refused locally until a token can exist.
    pub(crate) fn record_refusal(&self, key: &str, answer: Answer) {
        if answer.granted == 0 {
            self.update(key, answer, false);
        }
    }

    fn update(&self, key: &str, answer: Answer, ends_fetch: bool) {
        let now = Instant::now();
        let ttl = self.policy.ttl;
        let mut guard = self.lock();
        let map = &mut guard.leases;
        let lease = match map.get_mut(key) {
            Some(l) => l,
            None => map.entry(key.to_owned()).or_insert_with(|| Lease::new(now)),
        };
        if ends_fetch {
            lease.fetching = false;
        }
        lease.remaining = answer.remaining;
        lease.reset_at = now + answer.reset;
        if answer.granted == 0 {
            // Refused: refuse locally until then; the next fetch asks for one token.
            lease.size = 0;
            lease.refused_until = now + answer.retry_after;
            return;
        }
        if lease.expires <= now {
            lease.tokens = 0;
        }
        lease.tokens = lease
            .tokens
            .saturating_add(answer.granted.saturating_sub(answer.spent));
        lease.expires = now + ttl;
    }
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Some(lease) = self.leases.lock().leases.get_mut(&self.key) {
                lease.fetching = false;
                lease.size = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ans(granted: u32, spent: u32, remaining: u32, reset: Duration) -> Answer {
        Answer {
            granted,
            spent,
            remaining,
            reset,
            retry_after: Duration::from_secs(1),
        }
    }

    fn leases(max: u32) -> Leases {
        Leases::new(LeasePolicy {
            max_tokens: max,
            ttl: Duration::from_secs(60),
        })
    }

    #[test]
    fn small_bursts_are_always_exact() {
        let l = leases(64);
        for _ in 0..5 {
            assert_eq!(l.plan("k", 19), Plan::Exact);
        }
    }

    #[test]
    fn lease_size_starts_at_one_and_doubles_up_to_the_cap() {
        let l = leases(8);
        let mut sizes = Vec::new();
        // Simulate a busy key: every fetch grants what it asked for.
        for _ in 0..200 {
            match l.plan("k", 1_000) {
                Plan::Fetch(n) => {
                    sizes.push(n);
                    l.guard("k").finish(ans(n, 1, 100, Duration::ZERO));
                }
                Plan::LocalThenRefill(d, n) => {
                    assert!(d.allowed);
                    sizes.push(n);
                    l.guard("k").finish(ans(n, 0, 100, Duration::ZERO));
                }
                Plan::Local(d) => assert!(d.allowed),
                Plan::Exact | Plan::Refuse(_) => panic!("no fetch was in flight, no refusal"),
            }
        }
        assert_eq!(&sizes[..4], &[1, 2, 4, 8], "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= 8));
        assert!(
            sizes.len() < 60,
            "most requests were local: {}",
            sizes.len()
        );
    }

    #[test]
    fn the_cap_is_a_tenth_of_the_burst() {
        let l = leases(1_000);
        let mut max = 0;
        for _ in 0..100 {
            match l.plan("k", 40) {
                Plan::Fetch(n) => {
                    max = max.max(n);
                    l.guard("k").finish(ans(n, 1, 0, Duration::ZERO));
                }
                Plan::LocalThenRefill(_, n) => {
                    max = max.max(n);
                    l.guard("k").finish(ans(n, 0, 0, Duration::ZERO));
                }
                Plan::Local(_) | Plan::Exact | Plan::Refuse(_) => {}
            }
        }
        assert_eq!(max, 4);
    }

    #[test]
    fn only_one_fetch_is_in_flight_and_a_dropped_guard_releases_it() {
        let l = leases(64);
        assert_eq!(l.plan("k", 1_000), Plan::Fetch(1));
        let g = l.guard("k");
        assert_eq!(l.plan("k", 1_000), Plan::Exact);
        assert_eq!(l.plan("k", 1_000), Plan::Exact);
        drop(g);
        assert_eq!(l.plan("k", 1_000), Plan::Fetch(1));
    }

    #[test]
    fn a_refusal_resets_the_lease_size() {
        let l = leases(64);
        for _ in 0..20 {
            match l.plan("k", 1_000) {
                Plan::Fetch(n) => l.guard("k").finish(ans(n, 1, 0, Duration::ZERO)),
                Plan::LocalThenRefill(_, n) => l.guard("k").finish(ans(n, 0, 0, Duration::ZERO)),
                _ => {}
            }
        }
        // Spend everything held, then Redis refuses.
        loop {
            match l.plan("k", 1_000) {
                Plan::Fetch(_) => break,
                Plan::LocalThenRefill(_, _) => l.guard("k").finish(Answer {
                    retry_after: Duration::ZERO,
                    ..ans(0, 0, 0, Duration::ZERO)
                }),
                Plan::Refuse(_) => panic!("tokens were still held"),
                _ => {}
            }
        }
        l.guard("k").finish(Answer {
            retry_after: Duration::ZERO,
            ..ans(0, 0, 0, Duration::ZERO)
        });
        assert_eq!(l.plan("k", 1_000), Plan::Fetch(1));
    }

    #[test]
    fn refusals_are_remembered_until_a_token_can_exist() {
        let l = leases(64);
        // Also for quotas too small to lease.
        for burst in [1_000, 3] {
            let key = format!("k{burst}");
            l.record_refusal(&key, ans(0, 0, 0, Duration::from_secs(9)));
            let Plan::Refuse(d) = l.plan(&key, burst) else {
                panic!("refused locally")
            };
            assert!(!d.allowed);
            let retry = d.retry_after.expect("retry_after");
            assert!(retry <= Duration::from_secs(1) && retry > Duration::ZERO);
            assert_eq!(d.limit, burst);
        }
        // A grant recorded by an exact request is not remembered.
        l.record_refusal("g", ans(1, 1, 5, Duration::ZERO));
        assert_eq!(l.plan("g", 1_000), Plan::Fetch(1));
    }

    #[test]
    fn lapsed_leases_are_pruned_and_live_ones_kept() {
        let l = Leases::new(LeasePolicy {
            max_tokens: 64,
            ttl: Duration::ZERO,
        });
        // One key with a live refusal, then many that lapse at once (ttl 0).
        l.record_refusal("refused", ans(0, 0, 0, Duration::from_secs(60)));
        for i in 0..=PRUNE_ABOVE {
            let key = format!("k{i}");
            assert_eq!(l.plan(&key, 1_000), Plan::Fetch(1));
            l.guard(&key).finish(ans(1, 1, 0, Duration::ZERO));
        }
        assert!(matches!(l.plan("another", 1_000), Plan::Fetch(1)));
        let map = l.lock();
        assert!(map.leases.len() <= 3, "{} leases kept", map.leases.len());
        assert!(map.leases.contains_key("refused"));
        assert_eq!(map.prune_at, PRUNE_ABOVE);
    }

    #[test]
    fn expired_tokens_are_never_spent() {
        let l = Leases::new(LeasePolicy {
            max_tokens: 64,
            ttl: Duration::ZERO,
        });
        assert_eq!(l.plan("k", 1_000), Plan::Fetch(1));
        l.guard("k").finish(ans(50, 1, 0, Duration::ZERO));
        // The lease expired the moment it was granted.
        assert!(matches!(l.plan("k", 1_000), Plan::Fetch(1)));
    }

    #[test]
    fn local_decisions_report_held_and_shared_tokens() {
        let l = leases(64);
        assert_eq!(l.plan("k", 1_000), Plan::Fetch(1));
        l.guard("k").finish(ans(1, 1, 10, Duration::from_secs(5)));
        let Plan::Fetch(n) = l.plan("k", 1_000) else {
            panic!("the lease was spent")
        };
        assert_eq!(n, 2);
        l.guard("k").finish(ans(2, 1, 7, Duration::from_secs(5)));
        let Plan::LocalThenRefill(d, 4) = l.plan("k", 1_000) else {
            panic!("one token held")
        };
        assert!(d.allowed);
        assert_eq!(d.remaining, 7);
        assert!(d.reset_after <= Duration::from_secs(5) && d.reset_after > Duration::ZERO);
    }
}
