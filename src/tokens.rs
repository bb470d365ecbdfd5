//! Upload tokens (`../shared/API.md` v1.1, "Browser-safe credentials"): a credential for one
//! session that a tenant's backend hands to a browser instead of its API key.
//!
//! A token is signed, not stored: `upt_` followed by the unpadded base64url of
//!
//! ```text
//! version (1 byte, 1) ‖ expires at (8 bytes, Unix seconds, big-endian)
//!   ‖ session id (16 bytes, the UUID) ‖ nonce (16 random bytes) ‖ tenant id (1 to 64 bytes)
//!   ‖ HMAC-SHA256(key, "upgate upload token v1\0" ‖ everything before)
//! ```
//!
//! Checking one costs a base64 decode and one HMAC (about a third of a microsecond,
//! `benches/router.rs` group `upload_token`), with no store round trip: the session's own
//! state (finalized, expired, deleted) is then answered by the store call the request
//! makes anyway. Storing tokens with the session would have added a lookup to every
//! request, or a token argument to every script.
//!
//! The key is shared by every replica: `upload_token_secrets` when configured (the first
//! signs, all verify: rotate by putting a new one first, revoke every token signed with an
//! old one by removing it), else a random key the session store holds (created by the first
//! replica to ask; [`crate::store::SessionStore::upload_token_key`]). The MAC is compared in
//! constant time; tokens are never logged.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Every upload token starts with this.
pub const PREFIX: &str = "upt_";

const VERSION: u8 = 1;
/// Signed before the token's bytes: a MAC made for anything else never verifies here.
const CONTEXT: &[u8] = b"upgate upload token v1\0";
const MAC_LEN: usize = 32;
const FIXED: usize = 1 + 8 + 16 + 16;
/// Longest token accepted (a 64-byte tenant id gives 187 characters, `upt_` included).
const MAX_TOKEN_LEN: usize = 256;
/// Bytes of a signing key.
pub const KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// The tenant that minted it.
    pub tenant: String,
    /// The one session it works on (hyphenated lower-case UUID).
    pub session_id: String,
    /// When it stops working (Unix seconds).
    pub expires_at: i64,
}

/// Why a token was refused (logged at debug level, never with the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Not `upt_` + base64url of the right length and version.
    Malformed,
    /// No key verifies its MAC (tampered, or signed with a key no longer configured).
    BadSignature,
    /// Past its expiry.
    Expired,
    /// The signing keys are not loaded yet (the session store has not answered).
    KeysUnavailable,
}

/// How often a replica asks the store for its key again while minting: a store that lost
/// its key (an emptied Redis) gets a new one from the next replica that asks, and the
/// others pick it up.
pub const RELOAD_AFTER: Duration = Duration::from_secs(60);
/// The least time between two asks, whatever requests send (a token that does not verify
/// makes a replica ask again, at most this often).
pub const RELOAD_ON_FAILURE_AFTER: Duration = Duration::from_secs(1);

/// The keys, each also as an HMAC already keyed with the context label absorbed: a check
/// clones one instead of deriving the key pads again (409 → 327 ns a verification,
/// `benches/router.rs` group `upload_token`).
struct Loaded {
    keys: Vec<[u8; KEY_LEN]>,
    macs: Vec<HmacSha256>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Loaded({} keys, redacted)", self.keys.len())
    }
}

impl Loaded {
    fn new(keys: Vec<[u8; KEY_LEN]>) -> Arc<Loaded> {
        let macs = keys
            .iter()
            .filter_map(|k| {
                let mut mac = HmacSha256::new_from_slice(k).ok()?;
                mac.update(CONTEXT);
                Some(mac)
            })
            .collect();
        Arc::new(Loaded { keys, macs })
    }
}

/// The signing keys: the first signs, every one verifies.
#[derive(Debug, Default)]
pub struct UploadTokens {
    keys: RwLock<Option<Arc<Loaded>>>,
    /// When the store was last asked (successfully or not): requests never make it ask more
    /// often than [`RELOAD_ON_FAILURE_AFTER`], whatever they send.
    asked: std::sync::Mutex<Option<Instant>>,
    /// One ask at a time; the others wait for its answer.
    asking: tokio::sync::Mutex<()>,
    /// Configured keys are final: the store's key is not loaded over them.
    configured: bool,
}

impl UploadTokens {
    /// Keys from `upload_token_secrets` (each at least [`KEY_LEN`] bytes, checked at
    /// start-up; longer ones are hashed down to [`KEY_LEN`]).
    pub fn configured(secrets: &[Vec<u8>]) -> Self {
        let keys = secrets.iter().map(|s| derive_key(s)).collect();
        UploadTokens {
            keys: RwLock::new(Some(Loaded::new(keys))),
            configured: true,
            ..UploadTokens::default()
        }
    }

    /// True when the keys come from `upload_token_secrets` (the store's key is never
    /// loaded).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// No keys until [`UploadTokens::load`] gives the store's.
    pub fn pending() -> Self {
        UploadTokens::default()
    }

    /// Takes the store's key: it signs from now on; the previous one (if different) still
    /// verifies, so tokens minted just before a change keep working.
    pub fn load(&self, key: &[u8]) {
        if self.configured {
            return;
        }
        let key = derive_key(key);
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let next = match keys.as_ref().map(|l| l.keys.as_slice()) {
            Some(current) if current.first() == Some(&key) => current.to_vec(),
            Some(current) => {
                let mut next = vec![key];
                next.extend(current.first().copied());
                next
            }
            None => vec![key],
        };
        *keys = Some(Loaded::new(next));
    }

    /// True when the store's key should be asked for again: never asked, or the last ask
    /// (answered or failed) is older than `age`. Never for configured keys.
    pub fn needs_reload(&self, age: Duration) -> bool {
        if self.configured {
            return false;
        }
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|at| at.elapsed() >= age)
    }

    /// Asks `store` for its key and takes it ([`UploadTokens::load`]). One ask at a time:
    /// a caller that waited for another's ask, answered within
    /// [`RELOAD_ON_FAILURE_AFTER`], takes that answer instead of asking again.
    pub async fn reload(
        &self,
        store: &dyn crate::store::SessionStore,
    ) -> Result<(), crate::store::StoreError> {
        if self.configured {
            return Ok(());
        }
        let _one = self.asking.lock().await;
        if !self.needs_reload(RELOAD_ON_FAILURE_AFTER) {
            return if self.ready() {
                Ok(())
            } else {
                Err(crate::store::StoreError::new(
                    "the upload token key could not be read a moment ago",
                ))
            };
        }
        *self.asked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let key = store.upload_token_key().await?;
        self.load(&key);
        Ok(())
    }

    /// True once there is a key to sign with.
    pub fn ready(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Arc<Loaded>> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|l| !l.macs.is_empty())
    }

    /// A token for `session_id` of `tenant` valid until `expires_at`; `None` when no key is
    /// loaded yet or the ids cannot be encoded (a session id that is not a UUID, a tenant
    /// id outside 1 to 64 bytes).
    pub fn mint(&self, tenant: &str, session_id: &str, expires_at: i64) -> Option<String> {
        let keys = self.current()?;
        let session = uuid::Uuid::parse_str(session_id).ok()?;
        if tenant.is_empty() || tenant.len() > 64 {
            return None;
        }
        let mut raw = Vec::with_capacity(FIXED + tenant.len() + MAC_LEN);
        raw.push(VERSION);
        raw.extend_from_slice(&u64::try_from(expires_at).ok()?.to_be_bytes());
        raw.extend_from_slice(session.as_bytes());
        raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        raw.extend_from_slice(tenant.as_bytes());
        let mut mac = keys.macs.first()?.clone();
        mac.update(&raw);
        raw.extend_from_slice(&mac.finalize().into_bytes());
        let mut token = String::with_capacity(PREFIX.len() + raw.len() * 4 / 3 + 4);
        token.push_str(PREFIX);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&raw, &mut token);
        Some(token)
    }

    /// The claims of `token` if it is well formed, signed with one of the keys, and not
    /// past its expiry at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<TokenClaims, Invalid> {
        let body = token.strip_prefix(PREFIX).ok_or(Invalid::Malformed)?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(Invalid::Malformed);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| Invalid::Malformed)?;
        if raw.len() < FIXED + 1 + MAC_LEN || raw[0] != VERSION {
            return Err(Invalid::Malformed);
        }
        let (signed, tag) = raw.split_at(raw.len() - MAC_LEN);
        let keys = self.current().ok_or(Invalid::KeysUnavailable)?;
        let verified = keys.macs.iter().any(|mac| {
            let mut mac = mac.clone();
            mac.update(signed);
            // Constant time.
            mac.verify_slice(tag).is_ok()
        });
        if !verified {
            return Err(Invalid::BadSignature);
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&signed[1..9]);
        let expires_at = i64::try_from(u64::from_be_bytes(exp)).map_err(|_| Invalid::Malformed)?;
        if now >= expires_at {
            return Err(Invalid::Expired);
        }
        let session = uuid::Uuid::from_slice(&signed[9..25]).map_err(|_| Invalid::Malformed)?;
        let tenant = std::str::from_utf8(&signed[FIXED..]).map_err(|_| Invalid::Malformed)?;
        Ok(TokenClaims {
            tenant: tenant.to_owned(),
            session_id: session.hyphenated().to_string(),
            expires_at,
        })
    }
}

/// A signing key of exactly [`KEY_LEN`] bytes from a secret of at least that many.
fn derive_key(secret: &[u8]) -> [u8; KEY_LEN] {
    if let Ok(key) = <[u8; KEY_LEN]>::try_from(secret) {
        return key;
    }
    use sha2::Digest;
    Sha256::digest(secret).into()
}

/// A fresh random key (two v4 UUIDs: 244 random bits from the OS's generator).
pub fn random_key() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SESSION: &str = "0b6f0d43-8c1e-4c47-9a39-4a8f2a4f6c11";

    fn tokens() -> UploadTokens {
        UploadTokens::configured(&[vec![7u8; 32]])
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let t = tokens();
        let token = t.mint("acme", SESSION, 1_000).expect("mint");
        assert!(token.starts_with("upt_"));
        let claims = t.verify(&token, 999).expect("valid");
        assert_eq!(
            claims,
            TokenClaims {
                tenant: "acme".into(),
                session_id: SESSION.into(),
                expires_at: 1_000
            }
        );
        assert_eq!(t.verify(&token, 1_000), Err(Invalid::Expired));
        // Two tokens for one session differ (the nonce).
        assert_ne!(token, t.mint("acme", SESSION, 1_000).expect("mint"));
    }

    #[test]
    fn truncated_padded_or_foreign_tokens_are_malformed() {
        let t = tokens();
        let token = t.mint("acme", SESSION, 1_000).expect("mint");
        for bad in [
            "",
            "upt_",
            "upt_!!!!",
            &token[..token.len() - 10],
            &token[4..],
            &format!("{token}="),
            &format!("upt_{}", "A".repeat(300)),
        ] {
            assert!(t.verify(bad, 0).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_and_removal_revokes_them() {
        let old = UploadTokens::configured(&[vec![1u8; 32]]);
        let token = old.mint("acme", SESSION, 1_000).expect("mint");
        let rotated = UploadTokens::configured(&[vec![2u8; 32], vec![1u8; 32]]);
        assert!(rotated.verify(&token, 0).is_ok());
        let new = rotated.mint("acme", SESSION, 1_000).expect("mint");
        assert!(UploadTokens::configured(&[vec![2u8; 32]])
            .verify(&new, 0)
            .is_ok());
        assert_eq!(
            UploadTokens::configured(&[vec![2u8; 32]]).verify(&token, 0),
            Err(Invalid::BadSignature)
        );
    }

    #[test]
    fn store_keys_load_once_and_keep_the_previous_one() {
        let t = UploadTokens::pending();
        assert_eq!(t.mint("acme", SESSION, 1_000), None);
        assert_eq!(t.verify("upt_AAAA", 0), Err(Invalid::Malformed));
        let other = tokens().mint("acme", SESSION, 1_000).expect("mint");
        assert_eq!(t.verify(&other, 0), Err(Invalid::KeysUnavailable));
        t.load(&[1u8; 32]);
        let first = t.mint("acme", SESSION, 1_000).expect("mint");
        t.load(&[2u8; 32]);
        assert!(
            t.verify(&first, 0).is_ok(),
            "the previous key still verifies"
        );
        let second = t.mint("acme", SESSION, 1_000).expect("mint");
        t.load(&[3u8; 32]);
        assert!(t.verify(&second, 0).is_ok());
        assert_eq!(t.verify(&first, 0), Err(Invalid::BadSignature));
    }

    /// A hundred concurrent reloads (one asks, the others wait for its answer) all end with
    /// the key, and no reload is due right after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reloads_all_get_the_key() {
        let store = Arc::new(crate::store::memory::MemoryStore::new(Duration::from_secs(
            60,
        )));
        let t = Arc::new(UploadTokens::pending());
        let asks: Vec<_> = (0..100)
            .map(|_| {
                let (t, store) = (t.clone(), store.clone());
                tokio::spawn(async move { t.reload(&*store).await.is_ok() })
            })
            .collect();
        for ask in asks {
            assert!(ask.await.expect("join"), "every caller gets the key");
        }
        assert!(t.ready());
        assert!(!t.needs_reload(RELOAD_ON_FAILURE_AFTER));
    }

    proptest! {
        /// Flipping any bit of a token's bytes makes it invalid.
        #[test]
        fn any_tampering_is_refused(byte in 0usize..200, bit in 0u8..8) {
            let t = tokens();
            let token = t.mint("tenant-x", SESSION, i64::MAX / 2).expect("mint");
            let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&token[4..]).expect("decode");
            let i = byte % raw.len();
            raw[i] ^= 1 << bit;
            let tampered = format!("upt_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw));
            prop_assert!(t.verify(&tampered, 0).is_err());
        }
    }
}
