//! Egress rules of a container with a network of its own: `egress_allow` and `egress_deny`,
//! each entry an IPv4 network (`203.0.113.0/24`, or an address) or a domain name
//! (`api.example.com`, or `*.githubusercontent.com` for every name below it). With
//! `egress_allow` non-empty only what it names is reachable; `egress_deny` takes destinations
//! away from what is otherwise reachable. Pure: checked and normalized here, enforced by the
//! system layer (`system/network/`).

use std::fmt;
use std::net::Ipv4Addr;

use super::error::{Error, Result};

/// Entries in one list, at most.
pub const RULES_MAX: usize = 256;

/// Ranges no container reaches whatever its rules say, so an allow rule naming them is a
/// mistake said at once rather than a rule that silently does nothing.
pub const NEVER: [(Ipv4Addr, u8, &str); 4] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "'this network'"),
    (
        Ipv4Addr::new(127, 0, 0, 0),
        8,
        "loopback (a container's own is its own)",
    ),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local (cloud metadata services live there)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 3, "multicast and reserved"),
];

/// One checked entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Net {
        addr: Ipv4Addr,
        prefix: u8,
    },
    /// Lowercase, no trailing dot; `*.` first for every name below the rest.
    Name(String),
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Whether two networks share an address.
pub fn overlaps(a: Ipv4Addr, a_len: u8, b: Ipv4Addr, b_len: u8) -> bool {
    let m = mask(a_len.min(b_len));
    u32::from(a) & m == u32::from(b) & m
}

impl Destination {
    /// Reads one entry as a caller wrote it.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("an empty entry".into());
        }
        if t.contains(':') {
            return Err(format!(
                "'{t}': containers have IPv4 only; an IPv6 rule would match nothing"
            ));
        }
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        if let Ok(addr) = addr.parse::<Ipv4Addr>() {
            let prefix = match prefix {
                None => 32,
                Some(p) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("'{t}': the prefix length must be 0 to 32"))?,
            };
            if u32::from(addr) & !mask(prefix) != 0 {
                let net = Ipv4Addr::from(u32::from(addr) & mask(prefix));
                return Err(format!(
                    "'{t}' has host bits set: did you mean {net}/{prefix}?"
                ));
            }
            return Ok(Self::Net { addr, prefix });
        }
        if prefix.is_some() {
            return Err(format!(
                "'{t}' is neither an IPv4 network nor a domain name"
            ));
        }
        let name = t.strip_suffix('.').unwrap_or(t).to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        if name.len() > 253 || bare.is_empty() {
            return Err(format!("'{t}' is not a domain name"));
        }
        let labels: Vec<&str> = bare.split('.').collect();
        for label in &labels {
            let good = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !good {
                return Err(format!(
                    "'{t}' is not a domain name (labels are 1-63 of a-z, 0-9, '-' and '_'; '*.' only first)"
                ));
            }
        }
        if labels.len() < 2
            || labels
                .last()
                .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "'{t}' is neither an IPv4 network nor a domain name with a dot"
            ));
        }
        Ok(Self::Name(name))
    }

    /// Whether `name` (lowercase, no trailing dot) is what this entry names.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Self::Net { .. } => false,
            Self::Name(rule) => match rule.strip_prefix("*.") {
                Some(parent) => name
                    .strip_suffix(parent)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1),
                None => rule == name,
            },
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net { addr, prefix } => write!(f, "{addr}/{prefix}"),
            Self::Name(n) => f.write_str(n),
        }
    }
}

/// A workspace's rules, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    pub allow: Vec<Destination>,
    pub deny: Vec<Destination>,
}

impl Egress {
    /// Reads rules stored in a record (checked when they were set).
    pub fn of(allow: &[String], deny: &[String]) -> Self {
        let read = |l: &[String]| {
            l.iter()
                .filter_map(|e| Destination::parse(e).ok())
                .collect()
        };
        Self {
            allow: read(allow),
            deny: read(deny),
        }
    }

    /// What the container's resolver does with a lookup of `name` (lowercase, no trailing
    /// dot).
    pub fn judge_name(&self, name: &str) -> NameVerdict {
        if self.deny.iter().any(|d| d.matches_name(name)) {
            NameVerdict::Deny
        } else if self.allow.iter().any(|d| d.matches_name(name)) {
            NameVerdict::Open
        } else if self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|d| matches!(d, Destination::Net { .. }))
        {
            // Nothing here is about this name: its addresses are judged as addresses.
            NameVerdict::Answer
        } else {
            NameVerdict::Refuse
        }
    }

    /// Whether a rule names domains (so the resolver's answers matter to the rules).
    pub fn has_names(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|d| matches!(d, Destination::Name(_)))
    }
}

/// What a container's resolver does with a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict {
    /// Refused, and the addresses the name has closed too (for as long as their TTL): a
    /// denied name.
    Deny,
    /// Refused: a name that an allow list of names does not name.
    Refuse,
    /// Answered, and the public addresses in the answer opened for the container (an allowed
    /// name): for TCP, for as long as the answer's TTL.
    Open,
    /// Answered; no rule is about the name.
    Answer,
}

/// Checks one list as given for `key`, normalized (each entry as it will be stored and shown;
/// duplicates dropped, order kept).
pub fn check(key: &str, list: &[String]) -> Result<Vec<String>> {
    if list.len() > RULES_MAX {
        return Err(Error::invalid(
            key,
            format!("{} entries, at most {RULES_MAX}", list.len()),
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for entry in list {
        let d = Destination::parse(entry).map_err(|e| Error::invalid(key, e))?;
        // An allow rule that names only addresses no container reaches is a mistake said at
        // once (a wider one, 0.0.0.0/0 say, still leaves them out).
        if let (Destination::Net { addr, prefix }, "egress_allow") = (&d, key)
            && let Some((_, _, what)) = NEVER
                .iter()
                .find(|(n, len, _)| *prefix >= *len && overlaps(*addr, *prefix, *n, *len))
        {
            return Err(Error::invalid(
                key,
                format!("'{d}' is {what}, which no container reaches whatever its rules"),
            ));
        }
        let s = d.to_string();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Destination {
        Destination::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"))
    }

    #[test]
    fn reads_networks_addresses_and_names() {
        assert_eq!(
            parse("203.0.113.0/24"),
            Destination::Net {
                addr: Ipv4Addr::new(203, 0, 113, 0),
                prefix: 24
            }
        );
        assert_eq!(parse("198.51.100.7").to_string(), "198.51.100.7/32");
        assert_eq!(parse("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(parse("API.Example.COM.").to_string(), "api.example.com");
        assert_eq!(
            parse("*.githubusercontent.com").to_string(),
            "*.githubusercontent.com"
        );
        assert_eq!(
            parse("_dmarc.example.org").to_string(),
            "_dmarc.example.org"
        );
    }

    #[test]
    fn refuses_what_is_neither() {
        for (t, says) in [
            ("", "empty"),
            ("10.0.0.1/24", "did you mean 10.0.0.0/24"),
            ("10.0.0.0/33", "0 to 32"),
            ("2001:db8::/32", "IPv4 only"),
            ("10.0.0.300", "with a dot"),
            ("localhost", "with a dot"),
            ("exa mple.com", "not a domain name"),
            ("-bad.example.com", "not a domain name"),
            ("a.*.example.com", "not a domain name"),
            ("*.", "not a domain name"),
            ("example.com/24", "neither"),
        ] {
            let e = Destination::parse(t).unwrap_err();
            assert!(e.contains(says), "{t}: {e}");
        }
    }

    #[test]
    fn wildcards_name_what_is_below_only() {
        let w = parse("*.example.com");
        assert!(w.matches_name("a.example.com"));
        assert!(w.matches_name("a.b.example.com"));
        assert!(!w.matches_name("example.com"));
        assert!(!w.matches_name("badexample.com"));
        assert!(!w.matches_name("a.example.com.evil.net"));
        let e = parse("example.com");
        assert!(e.matches_name("example.com"));
        assert!(!e.matches_name("a.example.com"));
    }

    #[test]
    fn lookups_judged_by_the_lists() {
        use NameVerdict::*;
        let open = Egress::of(&[], &["evil.example".into()]);
        assert_eq!(open.judge_name("deb.debian.org"), Answer);
        assert_eq!(open.judge_name("evil.example"), Deny);
        let closed = Egress::of(
            &["*.debian.org".into(), "pypi.org".into()],
            &["bad.debian.org".into()],
        );
        assert_eq!(closed.judge_name("deb.debian.org"), Open);
        assert_eq!(closed.judge_name("pypi.org"), Open);
        assert_eq!(closed.judge_name("bad.debian.org"), Deny);
        assert_eq!(closed.judge_name("example.com"), Refuse);
        // An allowed network: other names are answered, their addresses judged as such.
        let nets = Egress::of(&["192.0.2.0/24".into(), "pypi.org".into()], &[]);
        assert_eq!(nets.judge_name("example.com"), Answer);
        assert_eq!(nets.judge_name("pypi.org"), Open);
        assert!(nets.has_names() && !Egress::of(&["192.0.2.0/24".into()], &[]).has_names());
    }

    #[test]
    fn checked_lists_are_normalized_and_bounded() {
        let l = check(
            "egress_allow",
            &[
                "Example.com".into(),
                "example.com.".into(),
                "10.1.0.0/16".into(),
            ],
        )
        .unwrap();
        assert_eq!(l, ["example.com", "10.1.0.0/16"]);
        assert!(check("egress_allow", &["0.0.0.0/0".into()]).is_ok());
        for bad in ["127.0.0.1", "169.254.169.254", "0.0.0.0/8", "224.0.0.1"] {
            let e = check("egress_allow", &[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("egress_allow") && e.contains("no container reaches"),
                "{bad}: {e}"
            );
        }
        // Denying them is harmless.
        assert!(check("egress_deny", &["169.254.0.0/16".into()]).is_ok());
        let many: Vec<String> = (0..=RULES_MAX)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let e = check("egress_deny", &many).unwrap_err().to_string();
        assert!(e.contains("at most 256"), "{e}");
    }
}
