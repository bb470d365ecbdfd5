use http::Method;
use sha2::{Digest, Sha256};

/// The key without surrounding quotes, if it is 1..=255 visible ASCII characters.
pub(crate) fn validate(raw: &[u8]) -> Option<&str> {
    let inner = match raw {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    };
    if inner.is_empty() || inner.len() > 255 || !inner.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return None;
    }
    std::str::from_utf8(inner).ok()
}

pub(crate) fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0u8]);
    h.update(path_and_query.as_bytes());
    h.update([0u8]);
    h.update(body);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(validate(b"abc"), Some("abc"));
        assert_eq!(validate(b"\"abc\""), Some("abc"));
        assert_eq!(validate(b""), None);
        assert_eq!(validate(b"\"\""), None);
        assert_eq!(validate(b"a b"), None);
        assert_eq!(validate(&[b'a'; 255]).map(str::len), Some(255));
        assert_eq!(validate(&[b'a'; 256]), None);
        assert_eq!(validate("é".as_bytes()), None);
    }

    #[test]
    fn fingerprints_differ() {
        let a = fingerprint(&Method::POST, "/a", b"x");
        assert_eq!(a, fingerprint(&Method::POST, "/a", b"x"));
        assert_ne!(a, fingerprint(&Method::PATCH, "/a", b"x"));
        assert_ne!(a, fingerprint(&Method::POST, "/a?x", b"x"));
        assert_ne!(a, fingerprint(&Method::POST, "/a", b"y"));
    }
}
