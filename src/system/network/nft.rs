//! The service's own nftables table, `inet agent_workspaces`: rendered whole from the running
//! containers' links and replaced in one transaction (`nft -f`), never a flush of anyone
//! else's table. What it holds, for every interface `aw-*` (a container's host end):
//! - `guard` (prerouting, raw): a packet from a container must carry that container's own
//!   address (`sources`); IPv6 from containers is dropped (they have IPv4 only).
//! - `dns` (prerouting, dstnat): every query to port 53, wherever addressed, goes to the
//!   service's resolver on the container's host end; a connection to port 80 or 443 of an
//!   address an allowed name opened goes to the name check (`sni.rs`) there.
//! - `to_host` (input): the host answers a container's DNS and name check, nothing else, on
//!   any address.
//! - `forward`: nothing starts a connection into a container (other containers included);
//!   what a container starts is judged by its own chain `ws_<link>`: never the ranges of
//!   `never` (loopback, link-local, multicast, the pool), not the private ranges, the rest.
//! - `nat` (postrouting): what leaves through any other interface is masqueraded.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::pool::Pool;
use crate::core::egress::{Destination, Egress, overlaps};

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
    /// The workspace's id: the prefix of what its refusals log.
    pub id: String,
    /// The host end, `aw-<12 hex digits of the workspace id>`.
    pub link: String,
    /// The container's address.
    pub inside: Ipv4Addr,
    pub egress: Egress,
    /// Addresses its lookups of allowed names answered, with the seconds they stay open.
    pub opened: Vec<(Ipv4Addr, u64)>,
    /// Addresses its lookups of denied names answered, with the seconds they stay closed.
    pub closed: Vec<(Ipv4Addr, u64)>,
}

/// A container's sets of addresses learnt from its lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learnt {
    Opened,
    Closed,
}

impl Learnt {
    fn set(self, link: &str) -> String {
        let suffix = link.trim_start_matches(LINK_PREFIX);
        match self {
            Self::Opened => format!("open_{suffix}"),
            Self::Closed => format!("closed_{suffix}"),
        }
    }
}

/// The script that puts `addresses` into a container's set for the seconds given each, in
/// one transaction (an element there already gets its new timeout: it is added, so that the
/// delete finds it, deleted, and added again).
pub fn learn(link: &str, learnt: Learnt, addresses: &[(Ipv4Addr, u64)]) -> String {
    let set = learnt.set(link);
    let mut s = String::new();
    for (a, secs) in addresses {
        let _ = writeln!(s, "add element inet {TABLE} {set} {{ {a} }}");
        let _ = writeln!(s, "delete element inet {TABLE} {set} {{ {a} }}");
        let _ = writeln!(
            s,
            "add element inet {TABLE} {set} {{ {a} timeout {secs}s }}"
        );
    }
    s
}

/// A container's chain of refusals: the first packet of a connection logged to the service
/// (`nflog.rs`; at most 10 a minute after a burst of 5, so a scan costs nothing), then
/// dropped.
fn refuse_chain(link: &str) -> String {
    format!("refuse_{}", link.trim_start_matches(LINK_PREFIX))
}

fn set_block(name: &str, elements: &[(Ipv4Addr, u64)]) -> String {
    let mut s = format!("\tset {name} {{\n\t\ttype ipv4_addr\n\t\tflags timeout\n");
    if !elements.is_empty() {
        let list: Vec<String> = elements
            .iter()
            .map(|(a, secs)| format!("{a} timeout {secs}s"))
            .collect();
        let _ = writeln!(s, "\t\telements = {{ {} }}", list.join(", "));
    }
    s.push_str("\t}\n");
    s
}

/// The networks of a list of rules, without those another one of them holds (nft refuses
/// overlapping intervals in one set).
fn networks(rules: &[Destination]) -> Vec<String> {
    let nets: Vec<(Ipv4Addr, u8)> = rules
        .iter()
        .filter_map(|d| match d {
            Destination::Net { addr, prefix } => Some((*addr, *prefix)),
            Destination::Name(_) => None,
        })
        .collect();
    let mut kept: Vec<String> = Vec::new();
    for (i, (a, len)) in nets.iter().enumerate() {
        let held = nets.iter().enumerate().any(|(j, (b, blen))| {
            j != i && overlaps(*a, *len, *b, *blen) && (*blen < *len || (*blen == *len && j < i))
        });
        if !held {
            kept.push(format!("{a}/{len}"));
        }
    }
    kept
}

/// The rules of one container's chain, in order: what is never reachable, what it denies
/// (networks, and the addresses of denied names), what it allows by network (private ranges
/// included), the private ranges, the addresses of allowed names (TCP only: QUIC and other
/// UDP to them are closed, what no name check could follow), then the rest (or nothing, when
/// it allows only what it names).
fn chain_rules(link: &str, egress: &Egress) -> Vec<String> {
    let refuse = format!("jump {}", refuse_chain(link));
    let mut rules = vec![format!("ip daddr @never {refuse}")];
    let deny = networks(&egress.deny);
    if !deny.is_empty() {
        rules.push(format!("ip daddr {{ {} }} {refuse}", deny.join(", ")));
    }
    rules.push(format!("ip daddr @{} {refuse}", Learnt::Closed.set(link)));
    let allow = networks(&egress.allow);
    if !allow.is_empty() {
        rules.push(format!("ip daddr {{ {} }} accept", allow.join(", ")));
    }
    rules.push(format!("ip daddr @private {refuse}"));
    rules.push(format!(
        "meta l4proto tcp ip daddr @{} accept",
        Learnt::Opened.set(link)
    ));
    rules.push(if egress.allow.is_empty() {
        "accept".to_owned()
    } else {
        refuse
    });
    rules
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
{names}\t}}
\tchain to_host {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {any} meta l4proto {{ tcp, udp }} th dport 53 accept
\t\tiifname {any} tcp dport {sni} accept
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
        sni = super::sni::PORT,
        names = members
            .iter()
            .map(|m| format!(
                "\t\tiifname \"{}\" ip daddr @{} ip daddr != @{} tcp dport {{ 80, 443 }} redirect to :{}\n",
                m.link,
                Learnt::Opened.set(&m.link),
                Learnt::Closed.set(&m.link),
                super::sni::PORT
            ))
            .collect::<String>(),
    );
    for m in members {
        s.push_str(&set_block(&Learnt::Opened.set(&m.link), &m.opened));
        s.push_str(&set_block(&Learnt::Closed.set(&m.link), &m.closed));
        let _ = writeln!(
            s,
            "\tchain {} {{\n\t\tct state new limit rate 10/minute burst 5 packets log prefix \"{}{}\" group {}\n\t\tdrop\n\t}}",
            refuse_chain(&m.link),
            super::nflog::PREFIX,
            m.id,
            super::nflog::GROUP
        );
        let _ = writeln!(s, "\tchain {} {{", chain_of(&m.link));
        for rule in chain_rules(&m.link, &m.egress) {
            let _ = writeln!(s, "\t\t{rule}");
        }
        let _ = writeln!(s, "\t}}");
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

    fn member(link: &str, last: u8, opened: Vec<(Ipv4Addr, u64)>) -> Member {
        Member {
            id: "0f1e2d3c-4b5a-4987-8765-43210fedcba9".into(),
            link: link.into(),
            inside: Ipv4Addr::new(10, 213, 0, last),
            egress: Egress::default(),
            opened,
            closed: vec![],
        }
    }

    #[test]
    fn each_member_has_its_source_chain_and_sets() {
        let members = [
            member(
                "aw-0123456789ab",
                2,
                vec![(Ipv4Addr::new(192, 0, 2, 1), 60)],
            ),
            member("aw-ba9876543210", 6, vec![]),
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
        assert!(s.contains("224.0.0.0/3, 10.213.0.0/16 }"), "{s}");
        assert!(!s.contains("flush"), "{s}");
        assert!(
            s.contains(
                "chain ws_0123456789ab {\n\t\tip daddr @never jump refuse_0123456789ab\n\t\tip daddr @closed_0123456789ab jump refuse_0123456789ab\n\t\tip daddr @private jump refuse_0123456789ab\n\t\tmeta l4proto tcp ip daddr @open_0123456789ab accept\n\t\taccept\n\t}"
            ),
            "{s}"
        );
        // What lookups opened is kept when the table is written again.
        assert!(
            s.contains(
                "set open_0123456789ab {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t\telements = { 192.0.2.1 timeout 60s }\n\t}"
            ),
            "{s}"
        );
        assert!(
            s.contains("set closed_ba9876543210 {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t}"),
            "{s}"
        );
        assert!(
            s.contains("chain refuse_ba9876543210 {\n\t\tct state new limit rate 10/minute burst 5 packets log prefix \"aw-refused 0f1e2d3c-4b5a-4987-8765-43210fedcba9\" group 3407\n\t\tdrop\n\t}"),
            "{s}"
        );
        assert!(
            s.contains("iifname \"aw-0123456789ab\" ip daddr @open_0123456789ab ip daddr != @closed_0123456789ab tcp dport { 80, 443 } redirect to :3129\n"),
            "{s}"
        );
        // Braces balance: the script is one table.
        assert_eq!(s.matches('{').count(), s.matches('}').count(), "{s}");
    }

    fn egress(allow: &[&str], deny: &[&str]) -> Egress {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Egress::of(&l(allow), &l(deny))
    }

    #[test]
    fn rules_in_their_order() {
        assert_eq!(
            chain_rules("aw-x", &egress(&[], &["198.51.100.0/24", "203.0.113.7"])),
            [
                "ip daddr @never jump refuse_x",
                "ip daddr { 198.51.100.0/24, 203.0.113.7/32 } jump refuse_x",
                "ip daddr @closed_x jump refuse_x",
                "ip daddr @private jump refuse_x",
                "meta l4proto tcp ip daddr @open_x accept",
                "accept"
            ]
        );
        // An allow list: its networks (private ones too) and nothing else; denials first.
        assert_eq!(
            chain_rules(
                "aw-x",
                &egress(&["10.9.0.0/16", "198.51.100.0/24"], &["198.51.100.128/25"])
            ),
            [
                "ip daddr @never jump refuse_x",
                "ip daddr { 198.51.100.128/25 } jump refuse_x",
                "ip daddr @closed_x jump refuse_x",
                "ip daddr { 10.9.0.0/16, 198.51.100.0/24 } accept",
                "ip daddr @private jump refuse_x",
                "meta l4proto tcp ip daddr @open_x accept",
                "jump refuse_x"
            ]
        );
        // Names alone still close what they do not name.
        let names = chain_rules("aw-x", &egress(&["example.com"], &[]));
        assert_eq!(names.last().unwrap(), "jump refuse_x");
    }

    #[test]
    fn networks_held_by_another_are_left_out() {
        let e = egress(
            &[
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.0.2.0/24",
                "192.0.2.0/24",
                "0.0.0.0/0",
            ],
            &[],
        );
        assert_eq!(networks(&e.allow), ["0.0.0.0/0"]);
        let e = egress(&["10.1.0.0/16", "10.0.0.0/8", "192.0.2.0/24"], &[]);
        assert_eq!(networks(&e.allow), ["10.0.0.0/8", "192.0.2.0/24"]);
    }

    #[test]
    fn learnt_addresses_get_their_new_timeout() {
        let s = learn(
            "aw-x",
            Learnt::Opened,
            &[(Ipv4Addr::new(192, 0, 2, 9), 300)],
        );
        assert_eq!(
            s,
            "add element inet agent_workspaces open_x { 192.0.2.9 }\n\
             delete element inet agent_workspaces open_x { 192.0.2.9 }\n\
             add element inet agent_workspaces open_x { 192.0.2.9 timeout 300s }\n"
        );
    }
}
