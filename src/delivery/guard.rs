//! Where webhooks may connect: not into the operator's own network unless the operator says so.
//!
//! A bot token can set its bot's webhook URL. Without this guard that is a server-side request
//! forgery path: the component would post to loopback, private, link-local (cloud metadata
//! lives at 169.254.169.254) or other internal addresses on a bot backend's behalf. The check
//! runs on the addresses the HTTP client actually connects to: a literal IP in the URL, and
//! every address a host name resolves to (the resolver below hands the client only allowed
//! ones), so a name that resolves differently later (DNS rebinding) gains nothing.
//! `webhooks.allowed_networks` lists the networks a deployment does want reached.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::Live;

/// Why an address is closed to webhooks by default; `None` for a public address. An IPv6
/// address that carries an IPv4 one (mapped, compatible, NAT64, 6to4) is judged by it.
pub fn internal(ip: IpAddr) -> Option<&'static str> {
    match carried(ip) {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

/// The IPv4 address an IPv6 one carries, when it does; else the address itself.
fn carried(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| IpAddr::V4(Ipv4Addr::from(u32::from(hi) << 16 | u32::from(lo)));
    if let Some(mapped) = v6.to_ipv4_mapped() {
        IpAddr::V4(mapped)
    } else if (s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified())
        || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        // IPv4-compatible (deprecated, RFC 4291), or NAT64's well-known prefix (RFC 6052).
        v4(s[6], s[7])
    } else if s[0] == 0x2002 {
        v4(s[1], s[2]) // 6to4 (RFC 3056)
    } else {
        ip
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local (cloud metadata lives there)"
    } else if a == 100 && (64..128).contains(&b) {
        "shared address space (carrier-grade NAT)"
    } else if ip.is_unspecified() || a == 0 {
        "this network"
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        "not unicast"
    } else {
        return None;
    })
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "this network"
    } else if first & 0xfe00 == 0xfc00 {
        "private (unique local)"
    } else if first & 0xffc0 == 0xfe80 {
        "link-local"
    } else if first & 0xffc0 == 0xfec0 {
        "site-local"
    } else if ip.segments()[..3] == [0x64, 0xff9b, 1] {
        "NAT64 for local use"
    } else if ip.is_multicast() {
        "not unicast"
    } else {
        return None;
    })
}

/// The networks webhooks may reach although they are internal (`webhooks.allowed_networks`);
/// clones share one list, which a reload replaces.
#[derive(Debug, Clone, Default)]
pub struct WebhookNetworks(Arc<Live<Vec<IpNet>>>);

impl WebhookNetworks {
    /// Allows `networks` beyond the public Internet.
    pub fn new(networks: Vec<IpNet>) -> Self {
        WebhookNetworks(Arc::new(Live::new(networks)))
    }

    /// Allows `networks` instead, for every clone and every later connection.
    pub fn set(&self, networks: Vec<IpNet>) {
        self.0.set(networks);
    }

    /// `Err` with the reason when webhooks may not connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let inner = carried(ip);
        match internal(ip) {
            Some(_)
                if self
                    .0
                    .get()
                    .iter()
                    .any(|net| net.contains(&ip) || net.contains(&inner)) =>
            {
                Ok(())
            }
            Some(why) => Err(format!(
                "address {ip} is {why}: webhooks may not reach it unless webhooks.allowed_networks lists it"
            )),
            None => Ok(()),
        }
    }

    /// `Err` with the reason when the URL names an IP that webhooks may not reach.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        let host = url.host_str().unwrap_or_default();
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }
}

impl reqwest::dns::Resolve for WebhookNetworks {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let networks = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match networks.check(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| format!("{host} resolves to no address"));
                return Err(format!("{host}: {why}").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_named_and_public_ones_pass() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "shared"),
            ("0.0.0.0", "this network"),
            ("255.255.255.255", "not unicast"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("fd00:ec2::254", "private"),
            ("fe80::1", "link-local"),
            ("64:ff9b::a00:5", "private"),
            ("::10.0.0.1", "private"),
            ("2002:7f00:1::", "loopback"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("fec0::1", "site-local"),
            ("64:ff9b:1::1", "NAT64"),
        ] {
            let got = internal(ip.parse().unwrap());
            assert!(got.is_some_and(|g| g.starts_with(why)), "{ip}: {got:?}");
        }
        for ip in [
            "93.184.215.14",
            "2606:2800:21f:cb07::1",
            "100.128.0.1",
            "172.32.0.1",
            "64:ff9b::5db8:d70e",
        ] {
            assert_eq!(internal(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn the_allow_list_opens_what_it_names() {
        let none = WebhookNetworks::default();
        let err = none.check("127.0.0.1".parse().unwrap()).unwrap_err();
        assert!(
            err.contains("loopback") && err.contains("webhooks.allowed_networks"),
            "{err}"
        );
        let some = WebhookNetworks::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(some.check("127.0.0.1".parse().unwrap()), Ok(()));
        assert!(some.check("10.0.0.1".parse().unwrap()).is_err());
        assert_eq!(
            some.check("::ffff:127.0.0.1".parse().unwrap()),
            Ok(()),
            "judged by the IPv4 address it carries"
        );
        let shared = some.clone();
        some.set(Vec::new());
        assert!(
            shared.check("127.0.0.1".parse().unwrap()).is_err(),
            "a new list reaches every clone"
        );
        let url = reqwest::Url::parse("http://[::1]:8080/hook").unwrap();
        assert!(none.check_url(&url).is_err());
        let url = reqwest::Url::parse("https://hooks.example.org/x").unwrap();
        assert_eq!(
            none.check_url(&url),
            Ok(()),
            "names are checked when resolved"
        );
    }

    #[tokio::test]
    async fn what_a_name_resolves_to_is_filtered_before_the_client_sees_it() {
        use reqwest::dns::Resolve as _;
        // Numeric names resolve without DNS or /etc/hosts, through the same lookup.
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        for loopback in ["127.0.0.1", "::1"] {
            let err = WebhookNetworks::default()
                .resolve(name(loopback))
                .await
                .err()
                .expect("refused");
            assert!(err.to_string().contains("loopback"), "{err}");
        }
        let allowed = WebhookNetworks::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let addrs: Vec<SocketAddr> = allowed.resolve(name("127.0.0.1")).await.unwrap().collect();
        assert_eq!(addrs, ["127.0.0.1:0".parse::<SocketAddr>().unwrap()]);
        let public: Vec<SocketAddr> = WebhookNetworks::default()
            .resolve(name("192.0.2.7"))
            .await
            .unwrap()
            .collect();
        assert_eq!(public.len(), 1);
    }
}
