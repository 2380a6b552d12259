//! The webhook executor's SSRF guard (G8): which addresses a webhook may not reach, and a
//! DNS resolver that enforces it at connect time.
//!
//! The check lives *in the resolver* of the shared HTTP client: the client connects to
//! exactly the addresses the resolver returned after checking them, with no second lookup
//! in between, so a DNS answer that changes between check and connect (rebinding) cannot
//! slip an internal address past the guard. IP-literal URLs never reach a resolver, so the
//! executor checks those itself with [`is_internal`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether a webhook must not reach `ip` unless private targets are allowed: loopback,
/// private (RFC 1918), link-local (including the cloud metadata service at
/// 169.254.169.254), unspecified, multicast, broadcast and reserved, carrier-grade NAT
/// (100.64/10), IPv6 unique-local (fc00::/7) and site-local, and every IPv6 form that
/// embeds one of these IPv4 addresses (mapped, compatible, NAT64, 6to4).
pub(crate) fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0 // "this network" 0/8
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT 100.64/10
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments 192.0.0/24
        || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18/15
        || a >= 240 // reserved 240/4
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return true;
    }
    // fe80::/10 link-local, fec0::/10 site-local (deprecated, still routed internally by
    // some networks), fc00::/7 unique-local.
    if (seg[0] & 0xffc0) == 0xfe80 || (seg[0] & 0xffc0) == 0xfec0 || (seg[0] & 0xfe00) == 0xfc00 {
        return true;
    }
    // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d).
    if let Some(v4) = ip.to_ipv4() {
        return is_internal_v4(v4);
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address a gateway will reach.
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        return is_internal_v4(embedded(seg[6], seg[7]));
    }
    if seg[0] == 0x2002 {
        return is_internal_v4(embedded(seg[1], seg[2]));
    }
    false
}

/// A webhook target refused by the guard. Always a permanent failure: the same host will
/// resolve to the same kind of address on the next attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "webhook target {host} resolves to a private or loopback address (set KEEL_WEBHOOK_ALLOW_PRIVATE=true to allow)"
)]
pub(crate) struct Refused {
    /// The host as written in the URL (never the path or query, which may hold secrets).
    pub(crate) host: String,
}

/// Resolves with the system resolver, then refuses the whole answer if *any* address is
/// internal: a host with one public and one private address could otherwise be steered to
/// the private one by connection failures.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.iter().any(|a| is_internal(a.ip())) {
                return Err(Box::new(Refused { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip} should be internal");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip} should be public");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_internal_addresses() {
        let name: Name = "localhost".parse().unwrap();
        let err = match GuardedResolver.resolve(name).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e,
        };
        let refused = err.downcast_ref::<Refused>().expect("a Refused error");
        assert_eq!(refused.host, "localhost");
    }
}
