//! End-user tokens: JWTs (RFC 7519) a tenant signs for its own users (`[tenants.jwt]`,
//! `../shared/API.md` v1.1 "End-user tokens").
//!
//! Verification is `jsonwebtoken`'s; this module only picks what it verifies with: the
//! tenant by `iss`, the key by `kid`, the algorithm by the tenant's list and the key's type.
//! A token's claims are trusted only after its signature verified; `iss` is read before, to
//! choose the tenant whose keys then decide.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::TenantConfig;

/// Longest `sub` accepted (it names the session's owner and a rate-limit key).
pub const MAX_SUB_BYTES: usize = 256;

/// The algorithms `jwk` verifies among `allowed`: the one its `alg` names, else the ones
/// its key type fits (OKP → EdDSA, EC P-256 → ES256, P-384 → ES384, RSA → RS256 and
/// PS256, oct → HS256).
pub fn fitting(jwk: &Jwk, allowed: &[Algorithm]) -> Vec<Algorithm> {
    let by_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            &[Algorithm::EdDSA]
        }
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => &[],
        },
        AlgorithmParameters::RSA(_) => &[Algorithm::RS256, Algorithm::PS256],
        AlgorithmParameters::OctetKey(_) => &[Algorithm::HS256],
        _ => &[],
    };
    let named = match &jwk.common.key_algorithm {
        Some(a) => match a.to_string().parse::<Algorithm>() {
            Ok(alg) => Some(alg),
            // An `alg` this gateway does not verify (an encryption algorithm, say): the key
            // verifies nothing.
            Err(_) => return Vec::new(),
        },
        None => None,
    };
    by_type
        .iter()
        .copied()
        .filter(|alg| named.is_none_or(|n| n == *alg) && allowed.contains(alg))
        .collect()
}

/// The optional `upgate` claim: this token's limits, each applied under the tenant's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Files per session created with the token.
    pub max_files: Option<u32>,
    /// Largest file registered with the token.
    pub max_file_size_bytes: Option<u64>,
    /// Longest session created with the token.
    pub max_ttl_seconds: Option<u64>,
    /// Content types files registered with the token may declare (`type/*` patterns).
    pub allowed_content_types: Option<Vec<String>>,
    /// Live sessions the user may hold at once (every session the user created with a JWT
    /// counts).
    pub max_sessions: Option<u64>,
}

impl Limits {
    /// True when `content_type` (parameters ignored, case-insensitive) is allowed: no list,
    /// or a pattern equal to it, or `type/*` with its type. A file declaring no type is not
    /// allowed under a list.
    pub fn allows_content_type(&self, content_type: Option<&str>) -> bool {
        let Some(allowed) = &self.allowed_content_types else {
            return true;
        };
        let Some(ct) = content_type else {
            return false;
        };
        let essence = ct.split(';').next().unwrap_or("").trim();
        allowed
            .iter()
            .any(|pattern| match pattern.strip_suffix("/*") {
                Some(ty) => essence
                    .split_once('/')
                    .is_some_and(|(t, sub)| t.eq_ignore_ascii_case(ty) && !sub.is_empty()),
                None => pattern.eq_ignore_ascii_case(essence),
            })
    }

    /// The tenant's limits with this token's applied under them (`None`: the claim
    /// changes none of them, use the tenant as it is).
    pub fn under(&self, tenant: &TenantConfig) -> Option<TenantConfig> {
        if self.max_files.is_none()
            && self.max_file_size_bytes.is_none()
            && self.max_ttl_seconds.is_none()
        {
            return None;
        }
        let mut t = tenant.clone();
        if let Some(n) = self.max_files {
            t.max_files_per_session = t.max_files_per_session.min(n);
        }
        if let Some(n) = self.max_file_size_bytes {
            t.max_file_size_bytes = t.max_file_size_bytes.min(n);
        }
        if let Some(n) = self.max_ttl_seconds {
            let ttl = &mut t.session_ttl_seconds;
            ttl.max = ttl.max.min(n.max(1));
            ttl.min = ttl.min.min(ttl.max);
            ttl.default = ttl.default.min(ttl.max);
        }
        Some(t)
    }
}

/// A verified end user: the tenant's user `sub`, with the token's limits.
#[derive(Debug, Clone)]
pub struct EndUser {
    /// The token's `sub`.
    pub sub: String,
    /// 32 hex digits of SHA-256(`sub`): the user in rate-limit, idempotency and quota keys
    /// (any `sub` gives a key of fixed length and alphabet, no Redis hash tag in it).
    pub key: String,
    /// The token's `upgate` claim.
    pub limits: Limits,
}

impl EndUser {
    /// The user `sub` with `limits`.
    pub fn new(sub: String, limits: Limits) -> Self {
        EndUser {
            key: user_key(&sub),
            sub,
            limits,
        }
    }
}

/// 32 hex digits of SHA-256(`sub`) ([`EndUser::key`]).
pub fn user_key(sub: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(sub.as_bytes())[..16])
}

/// Why a JWT was refused (for the debug log only; every one of them is a 401).
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not three base64url parts with a JSON header and payload, or `alg` unknown (`none`).
    Malformed,
    /// No tenant has the token's `iss`.
    UnknownIssuer,
    /// The tenant does not allow the token's `alg`.
    AlgorithmNotAllowed,
    /// No key with the token's `kid`, or none that fits its `alg`.
    NoKey,
    /// The signature or a registered claim (`exp`, `nbf`, `iat`, `aud`, `sub`) failed.
    Invalid(String),
}

#[derive(Deserialize)]
struct Issuer {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: f64,
    iat: Option<f64>,
    upgate: Option<Limits>,
}

/// Verified tokens remembered per replica; the cache is cleared when it reaches this size.
/// Only tokens whose signature verified enter it, so its size is bounded by the tokens the
/// tenants signed, and by this.
const VERIFIED_CACHE_MAX: usize = 10_000;

/// A token that verified, until its `exp` (with the leeway) passes.
struct Verified {
    tenant: Arc<TenantConfig>,
    user: Arc<EndUser>,
    until: u64,
}

struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

struct TenantKeys {
    tenant: Arc<TenantConfig>,
    keys: Vec<Key>,
    /// One validation per allowed algorithm (`exp` and `sub` required, `nbf` checked,
    /// `iss` and, when configured, `aud` required).
    validations: HashMap<Algorithm, Validation>,
    leeway: u64,
}

/// Every tenant's end-user token keys, by issuer, and the tokens that verified lately.
///
/// A browser sends the same token on every request of an upload (each part included), and
/// one signature check costs more than the rest of a request (`benches/router.rs`: EdDSA
/// 31 µs, ES256 50 µs, RS256 18 µs, HS256 2 µs, against ~5 µs for a whole GET through the
/// stack), so a token that verified is remembered by its SHA-256 until its `exp`: the next
/// request with it costs one hash and one lookup.
#[derive(Default)]
pub struct EndUserTokens {
    by_issuer: HashMap<String, TenantKeys>,
    verified: std::sync::Mutex<HashMap<[u8; 32], Verified>>,
}

impl std::fmt::Debug for EndUserTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndUserTokens")
            .field("issuers", &self.by_issuer.len())
            .finish_non_exhaustive()
    }
}

impl EndUserTokens {
    /// The keys of every tenant with `[tenants.jwt]` (the configuration checked that each
    /// key builds and that issuers are unique).
    pub fn new(tenants: &[Arc<TenantConfig>]) -> Self {
        let mut by_issuer = HashMap::new();
        for t in tenants {
            let Some(jwt) = &t.jwt else { continue };
            let keys = jwt
                .keys
                .iter()
                .filter_map(|jwk| {
                    Some(Key {
                        kid: jwk.common.key_id.clone(),
                        algorithms: fitting(jwk, &jwt.algorithms),
                        key: DecodingKey::from_jwk(jwk).ok()?,
                    })
                })
                .collect();
            let validations = jwt
                .algorithms
                .iter()
                .map(|alg| {
                    let mut v = Validation::new(*alg);
                    v.leeway = jwt.leeway_seconds;
                    v.validate_nbf = true;
                    v.set_issuer(&[&jwt.issuer]);
                    let mut required = vec!["exp", "sub", "iss"];
                    // Without `audience`, a token naming any audience is refused (RFC 7519
                    // 4.1.3: it was meant for someone else).
                    if let Some(aud) = &jwt.audience {
                        v.set_audience(&[aud]);
                        required.push("aud");
                    }
                    v.set_required_spec_claims(&required);
                    (*alg, v)
                })
                .collect();
            by_issuer.insert(
                jwt.issuer.clone(),
                TenantKeys {
                    tenant: t.clone(),
                    keys,
                    validations,
                    leeway: jwt.leeway_seconds,
                },
            );
        }
        EndUserTokens {
            by_issuer,
            verified: Default::default(),
        }
    }

    /// True when some tenant accepts end-user tokens.
    pub fn any(&self) -> bool {
        !self.by_issuer.is_empty()
    }

    /// The tenant and the end user of `token`, verified at `now` (seconds), or remembered
    /// from an earlier verification while its `exp` (with the leeway) has not passed.
    pub fn verify(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Arc<TenantConfig>, Arc<EndUser>), Refused> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        {
            let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = cache.get(&digest).filter(|v| now <= v.until) {
                return Ok((v.tenant.clone(), v.user.clone()));
            }
        }
        let (tenant, user, until) = self.verify_signed(token, now)?;
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.retain(|_, v| now <= v.until);
            if cache.len() >= VERIFIED_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(
            digest,
            Verified {
                tenant: tenant.clone(),
                user: user.clone(),
                until,
            },
        );
        Ok((tenant, user))
    }

    /// [`EndUserTokens::verify`] without the cache: the signature and claims are checked
    /// every time (what the first request with a token costs; benches measure it).
    pub fn verify_uncached(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Arc<TenantConfig>, Arc<EndUser>), Refused> {
        self.verify_signed(token, now).map(|(t, u, _)| (t, u))
    }

    /// The signature and claims of `token`; also returns until when the token stays valid
    /// (`exp` + leeway).
    fn verify_signed(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Arc<TenantConfig>, Arc<EndUser>, u64), Refused> {
        // `alg: none` (and any algorithm the crate does not know) fails here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refused::Malformed)?;
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<Issuer>(token)
            .map_err(|_| Refused::Malformed)?
            .iss
            .ok_or(Refused::UnknownIssuer)?;
        let tenant = self.by_issuer.get(&iss).ok_or(Refused::UnknownIssuer)?;
        let validation = tenant
            .validations
            .get(&header.alg)
            .ok_or(Refused::AlgorithmNotAllowed)?;
        let mut last = Refused::NoKey;
        let candidates = tenant.keys.iter().filter(|k| {
            k.algorithms.contains(&header.alg) && (header.kid.is_none() || k.kid == header.kid)
        });
        for key in candidates {
            let claims = match jsonwebtoken::decode::<Claims>(token, &key.key, validation) {
                Ok(data) => data.claims,
                Err(e) => {
                    last = Refused::Invalid(e.to_string());
                    continue;
                }
            };
            if claims.sub.is_empty()
                || claims.sub.len() > MAX_SUB_BYTES
                || claims.sub.chars().any(char::is_control)
            {
                return Err(Refused::Invalid(format!(
                    "sub must be 1 to {MAX_SUB_BYTES} bytes without control characters"
                )));
            }
            if claims
                .iat
                .is_some_and(|iat| iat > now.saturating_add(tenant.leeway) as f64)
            {
                return Err(Refused::Invalid("iat is in the future".into()));
            }
            let until = (claims.exp.max(0.0) as u64).saturating_add(tenant.leeway);
            return Ok((
                tenant.tenant.clone(),
                Arc::new(EndUser::new(claims.sub, claims.upgate.unwrap_or_default())),
                until,
            ));
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(json: &str) -> Jwk {
        serde_json::from_str(json).expect("jwk")
    }

    const ALL: &[Algorithm] = &[
        Algorithm::EdDSA,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::HS256,
    ];

    #[test]
    fn the_key_type_limits_the_algorithm() {
        let okp = jwk(
            r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#,
        );
        assert_eq!(fitting(&okp, ALL), vec![Algorithm::EdDSA]);
        let oct = jwk(r#"{"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI"}"#);
        assert_eq!(fitting(&oct, ALL), vec![Algorithm::HS256]);
        assert!(fitting(&oct, &[Algorithm::RS256]).is_empty());
        let rsa = jwk(r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#);
        assert_eq!(fitting(&rsa, ALL), vec![Algorithm::RS256, Algorithm::PS256]);
        let rsa_named = jwk(r#"{"kty":"RSA","alg":"PS256","n":"AQAB","e":"AQAB"}"#);
        assert_eq!(fitting(&rsa_named, ALL), vec![Algorithm::PS256]);
        // A key naming an algorithm its type cannot do verifies nothing.
        let wrong = jwk(r#"{"kty":"RSA","alg":"HS256","n":"AQAB","e":"AQAB"}"#);
        assert!(fitting(&wrong, ALL).is_empty());
    }

    #[test]
    fn content_type_patterns() {
        let l = Limits {
            allowed_content_types: Some(vec!["image/*".into(), "application/pdf".into()]),
            ..Limits::default()
        };
        assert!(l.allows_content_type(Some("image/png")));
        assert!(l.allows_content_type(Some("IMAGE/JPEG; q=1")));
        assert!(l.allows_content_type(Some("application/pdf")));
        assert!(!l.allows_content_type(Some("application/pdfx")));
        assert!(!l.allows_content_type(Some("image/")));
        assert!(!l.allows_content_type(Some("text/plain")));
        assert!(!l.allows_content_type(None));
        assert!(Limits::default().allows_content_type(None));
    }

    #[test]
    fn limits_apply_under_the_tenants() {
        let tenant = crate::config::Config::embedded_default()
            .expect("defaults")
            .tenants[0]
            .clone();
        assert!(Limits::default().under(&tenant).is_none());
        let l = Limits {
            max_files: Some(2),
            max_file_size_bytes: Some(u64::MAX),
            max_ttl_seconds: Some(30),
            ..Limits::default()
        };
        let t = l.under(&tenant).expect("limited");
        assert_eq!(t.max_files_per_session, 2);
        assert_eq!(
            t.max_file_size_bytes, tenant.max_file_size_bytes,
            "never above the tenant's"
        );
        assert_eq!(t.session_ttl_seconds.max, 30);
        assert!(t.session_ttl_seconds.min <= 30 && t.session_ttl_seconds.default <= 30);
    }
}
