use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http::Request;
use proptest::prelude::*;

use super::*;

fn req(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder();
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut req = b.body(()).unwrap();
    req.extensions_mut()
        .insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
    req
}

fn trusted_nets() -> [IpNet; 2] {
    ["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()]
}

/// Behind proxies that write `X-Forwarded-For`.
fn trusted() -> ClientIp<()> {
    ClientIp::x_forwarded_for(trusted_nets())
}

/// Behind proxies that write `Forwarded`.
fn trusted_fwd() -> ClientIp<()> {
    ClientIp::forwarded(trusted_nets())
}

#[test]
fn untrusted_peer_is_the_client_whatever_it_sends() {
    for (k, h) in [
        (trusted(), ("x-forwarded-for", "10.1.1.1")),
        (trusted(), ("x-forwarded-for", "1.1.1.1, 10.0.0.1")),
        (trusted_fwd(), ("forwarded", "for=10.0.0.9")),
    ] {
        assert_eq!(
            k.extract(&req("198.51.100.2:1000", &[h])).as_deref(),
            Some("198.51.100.2"),
            "{h:?}"
        );
    }
}

#[test]
fn trusted_chain_is_walked_from_the_right() {
    let k = trusted();
    let r = req(
        "10.0.0.2:443",
        &[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.7")],
    );
    assert_eq!(k.extract(&r).as_deref(), Some("203.0.113.9"));
    // Two header lines are one list, in order.
    let r = req(
        "10.0.0.2:443",
        &[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.7"),
        ],
    );
    assert_eq!(k.extract(&r).as_deref(), Some("203.0.113.9"));
    // Every hop trusted: the leftmost.
    let r = req("10.0.0.2:443", &[("x-forwarded-for", "10.9.9.9, 10.0.0.7")]);
    assert_eq!(k.extract(&r).as_deref(), Some("10.9.9.9"));
    // No header at all: the proxy itself.
    assert_eq!(
        k.extract(&req("10.0.0.2:443", &[])).as_deref(),
        Some("10.0.0.2")
    );
    // Garbage written by the nearest proxy ends the walk at that proxy.
    let r = req("10.0.0.2:443", &[("x-forwarded-for", "6.6.6.6, bogus")]);
    assert_eq!(k.extract(&r).as_deref(), Some("10.0.0.2"));
    let r = req(
        "10.0.0.2:443",
        &[("x-forwarded-for", "6.6.6.6, bogus, 10.0.0.3")],
    );
    assert_eq!(k.extract(&r).as_deref(), Some("10.0.0.3"));
}

#[test]
fn only_the_named_header_is_read_and_ipv6_is_canonical() {
    let r = req(
        "[fd00::1]:443",
        &[
            ("forwarded", "for=\"[2001:db8::5]:1234\", for=10.0.0.4"),
            ("x-forwarded-for", "9.9.9.9"),
        ],
    );
    assert_eq!(trusted_fwd().extract(&r).as_deref(), Some("2001:db8::5"));
    assert_eq!(trusted().extract(&r).as_deref(), Some("9.9.9.9"));
    // Behind an X-Forwarded-For proxy, a client's own `Forwarded` is never read.
    let r = req(
        "10.0.0.2:443",
        &[
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "203.0.113.1"),
        ],
    );
    assert_eq!(trusted().extract(&r).as_deref(), Some("203.0.113.1"));
    // An IPv4-mapped peer is its IPv4 address (and is trusted as such).
    let r = req(
        "[::ffff:10.0.0.2]:443",
        &[("x-forwarded-for", "203.0.113.1")],
    );
    assert_eq!(trusted().extract(&r).as_deref(), Some("203.0.113.1"));
}

/// A quote the client leaves open would swallow what the proxy appends to the same line:
/// the walk stops at the proxy instead.
#[test]
fn an_open_quote_cannot_hide_the_proxys_entry() {
    let r = req(
        "10.0.0.2:443",
        &[("forwarded", "for=1.2.3.4;x=\", for=203.0.113.7")],
    );
    assert_eq!(trusted_fwd().extract(&r).as_deref(), Some("10.0.0.2"));
}

#[test]
fn no_peer_no_key() {
    assert_eq!(trusted().extract(&Request::new(())), None);
    assert_eq!(trusted_fwd().extract(&Request::new(())), None);
    assert_eq!(PeerIp::new().extract(&Request::new(())), None);
}

#[test]
fn combined_keys_need_both() {
    let k = And::new(HeaderValue::new("x-tenant"), PeerIp::new());
    let r = req("192.0.2.1:1", &[("x-tenant", "acme")]);
    assert_eq!(k.extract(&r).as_deref(), Some("4:acme192.0.2.1"));
    assert_eq!(k.extract(&req("192.0.2.1:1", &[])), None);
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever a client puts in the headers, an untrusted peer is its own key.
    #[test]
    fn a_client_cannot_choose_its_key(
        peer in ipv4().prop_filter("untrusted", |ip| ip.octets()[0] != 10),
        forged in proptest::collection::vec(ipv4(), 0..6),
        junk in "[ -~]{0,40}",
    ) {
        let xff = forged.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(", ");
        let mut r = Request::builder()
            .header("x-forwarded-for", format!("{xff}, {junk}").trim_start_matches(", "))
            .body(())
            .unwrap();
        r.extensions_mut().insert(PeerAddr(SocketAddr::new(IpAddr::V4(peer), 1)));
        prop_assert_eq!(trusted().extract(&r), Some(peer.to_string()));
    }

    /// Behind a chain of trusted proxies, the key is the address the outermost trusted proxy
    /// saw: entries the client added to the left of it never matter.
    #[test]
    fn forged_entries_left_of_the_real_client_never_matter(
        client in ipv4().prop_filter("untrusted", |ip| ip.octets()[0] != 10),
        forged in proptest::collection::vec(ipv4(), 0..6),
        proxies in proptest::collection::vec(any::<[u8; 3]>(), 1..5),
    ) {
        let proxies: Vec<Ipv4Addr> =
            proxies.iter().map(|b| Ipv4Addr::new(10, b[0], b[1], b[2])).collect();
        // The client sends `forged`; each proxy appends the address it received from.
        let mut chain: Vec<String> = forged.iter().map(|ip| ip.to_string()).collect();
        chain.push(client.to_string());
        for p in &proxies[..proxies.len() - 1] {
            chain.push(p.to_string());
        }
        let peer = proxies[proxies.len() - 1];
        let mut r = Request::builder()
            .header("x-forwarded-for", chain.join(", "))
            .body(())
            .unwrap();
        r.extensions_mut().insert(PeerAddr(SocketAddr::new(IpAddr::V4(peer), 443)));
        prop_assert_eq!(trusted().extract(&r), Some(client.to_string()));
        // The same through `Forwarded`.
        let fwd = chain.iter().map(|a| format!("for={a}")).collect::<Vec<_>>().join(", ");
        let mut r = Request::builder().header("forwarded", fwd).body(()).unwrap();
        r.extensions_mut().insert(PeerAddr(SocketAddr::new(IpAddr::V4(peer), 443)));
        prop_assert_eq!(trusted_fwd().extract(&r), Some(client.to_string()));
    }

    /// Whatever text the client sends in `Forwarded` (open quotes, `;`, `,`), with the
    /// proxies' entries appended to the same line or on their own lines, the key is the
    /// client the outermost trusted proxy saw or a trusted proxy: never an address the client
    /// wrote.
    #[test]
    fn forwarded_junk_never_becomes_the_key(
        client in ipv4().prop_filter("untrusted", |ip| ip.octets()[0] != 10),
        junk in "[ -~]{0,60}",
        proxies in proptest::collection::vec(any::<[u8; 3]>(), 1..4),
        same_line in any::<bool>(),
    ) {
        let proxies: Vec<Ipv4Addr> =
            proxies.iter().map(|b| Ipv4Addr::new(10, b[0], b[1], b[2])).collect();
        let mut appended = vec![format!("for={client}")];
        for p in &proxies[..proxies.len() - 1] {
            appended.push(format!("for={p}"));
        }
        let peer = proxies[proxies.len() - 1];
        let mut b = Request::builder();
        if same_line {
            b = b.header("forwarded", format!("{junk}, {}", appended.join(", ")));
        } else {
            b = b.header("forwarded", junk.as_str());
            b = b.header("forwarded", appended.join(", "));
        }
        let Ok(mut r) = b.body(()) else { return Ok(()); };
        r.extensions_mut().insert(PeerAddr(SocketAddr::new(IpAddr::V4(peer), 443)));
        let key = trusted_fwd().ip(&r).expect("a peer");
        let allowed = key == IpAddr::V4(client)
            || matches!(key, IpAddr::V4(v4) if v4.octets()[0] == 10);
        prop_assert!(allowed, "key {} from junk {:?}", key, junk);
    }

    /// Arbitrary header bytes never panic the parsers.
    #[test]
    fn parsers_take_any_header(value in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(v) = http::HeaderValue::from_bytes(&value) {
            let mut r = Request::builder().body(()).unwrap();
            r.headers_mut().insert("x-forwarded-for", v.clone());
            r.headers_mut().insert("forwarded", v);
            r.extensions_mut().insert(PeerAddr("10.0.0.1:1".parse().unwrap()));
            prop_assert!(trusted().extract(&r).is_some());
            prop_assert!(trusted_fwd().extract(&r).is_some());
        }
    }
}

/// A chain longer than the hops looked at ends at a trusted proxy, never at the addresses a
/// client put at its far left.
#[test]
fn a_chain_past_the_hop_bound_ends_at_a_trusted_proxy() {
    let mut chain = vec!["6.6.6.6".to_owned()];
    chain.extend((0..40).map(|i| format!("10.0.0.{i}")));
    let r = req("10.0.1.1:443", &[("x-forwarded-for", &chain.join(", "))]);
    let key = trusted().ip(&r).expect("a peer");
    assert!(
        matches!(key, IpAddr::V4(v4) if v4.octets()[0] == 10),
        "key {key}"
    );
}
