//! The addresses of container networks: a pool (`[network] pool`, an IPv4 prefix) cut into
//! /30 links, one per running container: the host's end is the link's first address, the
//! container's the second.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Ranges a pool may not overlap: what the rules refuse to any container whatever they say
/// (`nft.rs`'s `never`), so a pool there would cut containers off from themselves.
const RESERVED: [(&str, Ipv4Addr, u8); 4] = [
    ("this network", Ipv4Addr::new(0, 0, 0, 0), 8),
    ("loopback", Ipv4Addr::new(127, 0, 0, 0), 8),
    ("link-local", Ipv4Addr::new(169, 254, 0, 0), 16),
    ("multicast and reserved", Ipv4Addr::new(224, 0, 0, 0), 3),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    base: Ipv4Addr,
    prefix: u8,
}

impl Default for Pool {
    /// 10.213.0.0/16: 16384 containers, in no range Docker, libvirt, slirp or Podman take by
    /// default.
    fn default() -> Self {
        Self {
            base: Ipv4Addr::new(10, 213, 0, 0),
            prefix: 16,
        }
    }
}

/// Whether `a` is inside `base/prefix`.
pub fn within(a: Ipv4Addr, base: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    u32::from(a) & mask == u32::from(base) & mask
}

impl Pool {
    /// How many containers it has room for.
    pub fn slots(&self) -> u32 {
        1 << (30 - u32::from(self.prefix))
    }

    /// The host's and the container's address of link `slot`.
    pub fn addresses(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let first = u32::from(self.base) + slot * 4;
        (Ipv4Addr::from(first + 1), Ipv4Addr::from(first + 2))
    }

    /// The slot whose host end is `host`.
    pub fn slot_of_host(&self, host: Ipv4Addr) -> Option<u32> {
        let offset = u32::from(host).checked_sub(u32::from(self.base))?;
        (within(host, self.base, self.prefix) && offset % 4 == 1).then_some(offset / 4)
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        within(a, self.base, self.prefix)
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not an IPv4 prefix like 10.213.0.0/16"))?;
        let base: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("the pool's prefix length must be 8 to 30, not '{prefix}'"))?;
        if u32::from(base) & !(u32::MAX << (32 - prefix)) != 0 {
            return Err(format!(
                "{s} has host bits set: the pool starts at its network address"
            ));
        }
        for (what, r, len) in RESERVED {
            if within(base, r, len) || within(r, base, prefix) {
                return Err(format!("{s} overlaps {what} ({r}/{len})"));
            }
        }
        Ok(Self { base, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_slash_30s_from_the_base() {
        let p: Pool = "10.213.0.0/16".parse().unwrap();
        assert_eq!(p, Pool::default());
        assert_eq!(p.slots(), 16384);
        assert_eq!(
            p.addresses(0),
            (Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 2))
        );
        assert_eq!(
            p.addresses(16383),
            (
                Ipv4Addr::new(10, 213, 255, 253),
                Ipv4Addr::new(10, 213, 255, 254)
            )
        );
        assert_eq!(p.slot_of_host(Ipv4Addr::new(10, 213, 1, 5)), Some(65));
        assert_eq!(p.slot_of_host(Ipv4Addr::new(10, 213, 1, 6)), None);
        assert_eq!(p.slot_of_host(Ipv4Addr::new(10, 214, 0, 1)), None);
        assert_eq!("192.168.50.0/30".parse::<Pool>().unwrap().slots(), 1);
    }

    #[test]
    fn refuses_what_is_no_pool() {
        for (text, says) in [
            ("10.213.0.0", "prefix like"),
            ("10.213.0.0/31", "8 to 30"),
            ("10.213.0.0/x", "8 to 30"),
            ("10.213.0.1/16", "host bits"),
            ("10.213.0/16", "not an IPv4 address"),
            ("127.1.0.0/16", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("224.0.0.0/8", "multicast"),
        ] {
            let e = text.parse::<Pool>().unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
