//! The service's own nftables table, `inet agent_workspaces`: rendered whole from the running
//! containers' links and replaced in one transaction (`nft -f`), never a flush of anyone
//! else's table. What it holds, for every interface `aw-*` (a container's host end):
//! - `guard` (prerouting, raw): a packet from a container must carry that container's own
//!   address (`sources`); IPv6 from containers is dropped (they have IPv4 only).
//! - `dns` (prerouting, dstnat): every query to port 53, wherever addressed, goes to the
//!   service's resolver on the container's host end.
//! - `to_host` (input): the host answers a container's DNS and nothing else, on any address.
//! - `forward`: nothing starts a connection into a container (other containers included);
//!   what a container starts is judged by its own chain `ws_<link>`: never the ranges of
//!   `never` (loopback, link-local, multicast, the pool), not the private ranges, the rest.
//! - `nat` (postrouting): what leaves through any other interface is masqueraded.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::pool::Pool;

pub const TABLE: &str = "agent_workspaces";
/// Every container link's name starts so; `aw-*` in the rules.
pub const LINK_PREFIX: &str = "aw-";

/// The ranges no container reaches, whatever its rules.
pub const NEVER: [&str; 4] = ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3"];
/// The host's private networks (RFC 1918, CGNAT): closed unless a rule opens them.
pub const PRIVATE: [&str; 4] = [
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.168.0.0/16",
];

/// One running container's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The host end, `aw-<12 hex digits of the workspace id>`.
    pub link: String,
    /// The container's address.
    pub inside: Ipv4Addr,
}

fn chain_of(link: &str) -> String {
    format!("ws_{}", link.trim_start_matches(LINK_PREFIX))
}

/// The script that replaces the table with one for `members`, atomically (`nft -f` runs a
/// file as one transaction). With no members the table is removed.
pub fn script(pool: Pool, members: &[Member]) -> String {
    // Declaring the table first makes the delete succeed whether or not it existed.
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if members.is_empty() {
        return s;
    }
    let never = NEVER
        .iter()
        .map(|r| r.to_string())
        .chain([pool.to_string()])
        .collect::<Vec<_>>()
        .join(", ");
    let sources = members
        .iter()
        .map(|m| format!("\"{}\" . {}", m.link, m.inside))
        .collect::<Vec<_>>()
        .join(", ");
    let vmap = members
        .iter()
        .map(|m| format!("\"{}\" : jump {}", m.link, chain_of(&m.link)))
        .collect::<Vec<_>>()
        .join(", ");
    let any = format!("\"{LINK_PREFIX}*\"");
    let _ = write!(
        s,
        "table inet {TABLE} {{
\tset sources {{
\t\ttype ifname . ipv4_addr
\t\telements = {{ {sources} }}
\t}}
\tset never {{
\t\ttype ipv4_addr
\t\tflags interval
\t\tauto-merge
\t\telements = {{ {never} }}
\t}}
\tset private {{
\t\ttype ipv4_addr
\t\tflags interval
\t\tauto-merge
\t\telements = {{ {private} }}
\t}}
\tchain guard {{
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname {any} meta nfproto != ipv4 drop
\t\tiifname {any} iifname . ip saddr != @sources drop
\t}}
\tchain dns {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname {any} meta l4proto {{ tcp, udp }} th dport 53 redirect to :53
\t}}
\tchain to_host {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {any} meta l4proto {{ tcp, udp }} th dport 53 accept
\t\tiifname {any} drop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\toifname {any} ct state established,related accept
\t\toifname {any} drop
\t\tiifname vmap {{ {vmap} }}
\t\tiifname {any} drop
\t}}
\tchain nat {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tiifname {any} oifname != {any} masquerade
\t}}
",
        private = PRIVATE.join(", "),
    );
    for m in members {
        let _ = write!(
            s,
            "\tchain {} {{
\t\tip daddr @never drop
\t\tip daddr @private drop
\t\taccept
\t}}
",
            chain_of(&m.link)
        );
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_members_removes_the_table_and_nothing_else() {
        let s = script(Pool::default(), &[]);
        assert_eq!(
            s,
            "table inet agent_workspaces\ndelete table inet agent_workspaces\n"
        );
        assert!(!s.contains("flush"), "{s}");
    }

    #[test]
    fn each_member_has_its_source_and_chain() {
        let members = [
            Member {
                link: "aw-0123456789ab".into(),
                inside: Ipv4Addr::new(10, 213, 0, 2),
            },
            Member {
                link: "aw-ba9876543210".into(),
                inside: Ipv4Addr::new(10, 213, 0, 6),
            },
        ];
        let s = script(Pool::default(), &members);
        assert!(s.starts_with("table inet agent_workspaces\ndelete table inet agent_workspaces\n"));
        assert!(
            s.contains("\"aw-0123456789ab\" . 10.213.0.2, \"aw-ba9876543210\" . 10.213.0.6"),
            "{s}"
        );
        assert!(
            s.contains("\"aw-ba9876543210\" : jump ws_ba9876543210"),
            "{s}"
        );
        assert!(s.contains("chain ws_0123456789ab {"), "{s}");
        assert!(s.contains("224.0.0.0/3, 10.213.0.0/16 }"), "{s}");
        assert!(!s.contains("flush"), "{s}");
        // Braces balance: the script is one table.
        assert_eq!(s.matches('{').count(), s.matches('}').count(), "{s}");
    }
}
