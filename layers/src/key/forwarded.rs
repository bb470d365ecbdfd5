//! Parsing `X-Forwarded-For` and RFC 7239 `Forwarded` into the addresses of their entries,
//! left to right (`None` for an entry that is not an address).

use std::net::{IpAddr, SocketAddr};

use http::header::GetAll;
use http::HeaderValue;

/// Entries looked at, from the right: a longer chain of trusted proxies ends at the last
/// one looked at (a trusted proxy, never a client-chosen address).
pub(super) const MAX_HOPS: usize = 32;

/// The entries of every `X-Forwarded-For` line, in order.
pub(super) fn x_forwarded_for(lines: GetAll<'_, HeaderValue>) -> Vec<Option<IpAddr>> {
    let mut out = Vec::new();
    for line in lines {
        match line.to_str() {
            Ok(text) => out.extend(text.split(',').map(|e| address(e.trim()))),
            Err(_) => out.push(None),
        }
    }
    out
}

/// The `for=` of every element of every `Forwarded` line, in order.
pub(super) fn forwarded_for(lines: GetAll<'_, HeaderValue>) -> Vec<Option<IpAddr>> {
    let mut out = Vec::new();
    for line in lines {
        match line.to_str() {
            // A quote left open swallows what a proxy appended to the same line: the whole
            // line is then one entry that is not an address.
            Ok(text) => match split_outside_quotes(text, ',') {
                Some(elements) => out.extend(elements.into_iter().map(element_for)),
                None => out.push(None),
            },
            Err(_) => out.push(None),
        }
    }
    out
}

/// The address of one element's `for=` pair (`None`: absent, `unknown`, obfuscated, bad).
fn element_for(element: &str) -> Option<IpAddr> {
    let value = split_outside_quotes(element, ';')?
        .into_iter()
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("for")
                .then_some(value.trim())
        })?;
    let value = match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => value,
    };
    // RFC 7239: an IPv6 node is always in brackets (with or without a port).
    if let Some(rest) = value.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    match value.split_once(':') {
        Some((v4, _port)) => v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
        None => value.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// An `X-Forwarded-For` entry: an address, with or without a port.
fn address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// `text` split at `sep` where it is not inside a quoted string; `None` when a quote is left
/// open.
fn split_outside_quotes(text: &str, sep: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&text[start..]);
    (!quoted).then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarded_elements() {
        assert_eq!(
            element_for("for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(
            element_for("For=\"[2001:db8:cafe::17]:4711\""),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(element_for("for=\"192.0.2.1:8080\""), ip("192.0.2.1"));
        assert_eq!(
            element_for("proto=https;for=198.51.100.17"),
            ip("198.51.100.17")
        );
        assert_eq!(element_for("for=unknown"), None);
        assert_eq!(element_for("for=_hidden"), None);
        assert_eq!(
            element_for("for=2001:db8::1"),
            None,
            "IPv6 without brackets"
        );
        assert_eq!(element_for("for=\"[2001:db8::1]x\""), None);
        assert_eq!(element_for("for=\"192.0.2.1"), None, "unterminated quote");
        assert_eq!(element_for("by=192.0.2.1"), None);
    }

    #[test]
    fn x_forwarded_for_entries() {
        assert_eq!(address("203.0.113.195"), ip("203.0.113.195"));
        assert_eq!(
            address("2001:db8:85a3::8a2e:370:7334"),
            ip("2001:db8:85a3::8a2e:370:7334")
        );
        assert_eq!(address("203.0.113.195:41237"), ip("203.0.113.195"));
        assert_eq!(address("[2001:db8::1]:80"), ip("2001:db8::1"));
        assert_eq!(address("unknown"), None);
        assert_eq!(address(""), None);
    }

    #[test]
    fn quotes_protect_separators() {
        let parts = split_outside_quotes(r#"for="a,b";x=1, for=c"#, ',');
        assert_eq!(parts, Some(vec![r#"for="a,b";x=1"#, " for=c"]));
        let parts = split_outside_quotes(r#"for="a\"b,c", d"#, ',');
        assert_eq!(parts, Some(vec![r#"for="a\"b,c""#, " d"]));
        assert_eq!(
            split_outside_quotes(r#"for=1.2.3.4;x=", for=5.6.7.8"#, ','),
            None
        );
    }
}
