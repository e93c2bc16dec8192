//! Networks of their own for containers (`network = "internet"`): nspawn makes a veth pair
//! (`--network-veth-extra=aw-…:host0`) and the container's own network namespace; the service
//! gives both ends their addresses from the pool (`pool.rs`), answers the container's DNS
//! (`dns.rs`) and keeps the rules of its own nftables table (`nft.rs`) that let a container
//! out to the internet through NAT and nowhere near the host, the host's networks or another
//! container, as its egress rules say (`core::egress`). The pair goes with the container's
//! namespace when the container ends; the table follows the running containers, so rules
//! outlive a restart of the service and are taken up again at its start (`reconcile`).

pub mod dns;
mod link;
pub mod nflog;
pub mod nft;
pub mod pool;
pub mod sni;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::core::egress::{Egress, NameVerdict};
use crate::core::error::{Error, Result};
use nft::{LINK_PREFIX, Learnt, Member};
use pool::{Pool, within};

/// Settings of `[network]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkConfig {
    pub pool: Pool,
    /// Resolvers the service asks for containers; empty: those of `/etc/resolv.conf`.
    pub dns: Vec<SocketAddr>,
}

/// How long an address a lookup answered stays open or closed: its TTL, within these bounds
/// (a TTL of seconds would make every connection race its lookup's expiry; one of days would
/// keep an address the name has left).
const LEARNT_MIN: u64 = 60;
const LEARNT_MAX: u64 = 24 * 3600;
/// Refused lookups logged per container and minute; the rest are counted in the next line.
const REFUSALS_LOGGED: u32 = 20;

/// The name of a workspace's link on the host: `aw-` and the first 12 hex digits of its id
/// (an interface name has 15 characters at most).
pub fn link_name(workspace_id: &str) -> String {
    let hex: String = workspace_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("{LINK_PREFIX}{hex}")
}

/// A running container's place in the pool.
struct Attached {
    slot: u32,
    link: String,
    /// Shared with its resolver, which judges lookups by it.
    egress: Arc<RwLock<Egress>>,
    /// Addresses learnt from its lookups, until when.
    opened: HashMap<Ipv4Addr, Instant>,
    closed: HashMap<Ipv4Addr, Instant>,
    /// Ends its resolver when dropped.
    _dns: DropGuard,
}

struct Inner {
    config: NetworkConfig,
    /// Running containers by workspace id; its lock orders every change of the table.
    attached: tokio::sync::Mutex<BTreeMap<String, Attached>>,
}

pub struct Networks {
    inner: Arc<Inner>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::JobFailed(format!("{what}: {e}"))
}

/// Whether an address is one a name's answer may open: not loopback, link-local, multicast,
/// a private network or the pool (DNS rebinding: a public name pointed at them opens nothing).
fn public(pool: Pool, a: Ipv4Addr) -> bool {
    !pool.contains(a)
        && !nft::NEVER
            .iter()
            .chain(nft::PRIVATE.iter())
            .filter_map(|r| r.split_once('/'))
            .any(|(net, len)| {
                net.parse()
                    .ok()
                    .zip(len.parse().ok())
                    .is_some_and(|(net, len)| within(a, net, len))
            })
}

impl Networks {
    pub fn new(config: NetworkConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                attached: Default::default(),
            }),
        }
    }

    pub fn pool(&self) -> Pool {
        self.inner.config.pool
    }

    /// Gives the running container of workspace `id` (its leader's pidfd) its addresses, its
    /// resolver and its rules. Returns the container's resolver address, for its
    /// `/etc/resolv.conf`.
    pub async fn attach(
        &self,
        id: &str,
        leader: BorrowedFd<'_>,
        egress: Egress,
    ) -> Result<Ipv4Addr> {
        let link = link_name(id);
        let inner = &self.inner;
        let mut attached = inner.attached.lock().await;
        attached.remove(id);
        // A container that ended by itself left its place taken; its link is gone.
        let present: Vec<String> = blocking(link::links)
            .await
            .map_err(|e| failed("Cannot list the container links", e))?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        attached.retain(|_, a| present.contains(&a.link));
        if !present.contains(&link) {
            return Err(Error::JobFailed(format!(
                "The container has no link {link} on the host (systemd-nspawn did not make it)"
            )));
        }
        let pool = inner.config.pool;
        let slot = (0..pool.slots())
            .find(|s| attached.values().all(|a| a.slot != *s))
            .ok_or_else(|| {
                Error::LimitsExceeded(format!(
                    "The address pool {pool} is full: it has room for {} running containers ([network] pool in the configuration)",
                    pool.slots()
                ))
            })?;
        let (host, inside) = pool.addresses(slot);
        let l = link.clone();
        blocking(move || link::configure_host_end(&l, host))
            .await
            .map_err(|e| failed(&format!("Cannot configure {link}"), e))?;
        let leader = leader
            .try_clone_to_owned()
            .map_err(|e| failed("Cannot hold the container's leader", e))?;
        blocking(move || link::configure_inside(leader.as_fd(), host, inside))
            .await
            .map_err(|e| failed("Cannot configure the container's network", e))?;
        let entry = self
            .entry(id, slot, link, egress)
            .await
            .map_err(|e| failed(&format!("Cannot serve DNS on {host}:53"), e))?;
        attached.insert(id.to_owned(), entry);
        if let Err(e) = Self::apply(inner, &attached).await {
            attached.remove(id);
            return Err(e);
        }
        match blocking(link::enable_forwarding).await {
            Ok(true) => info!("Turned IPv4 forwarding on for the networks of containers"),
            Ok(false) => {}
            Err(e) => {
                attached.remove(id);
                let _ = Self::apply(inner, &attached).await;
                return Err(failed(
                    "Cannot turn IPv4 forwarding on (net.ipv4.ip_forward)",
                    e,
                ));
            }
        }
        Ok(host)
    }

    /// A container's place, with its resolver started on the host end of its link.
    async fn entry(
        &self,
        id: &str,
        slot: u32,
        link: String,
        egress: Egress,
    ) -> std::io::Result<Attached> {
        let (host, _) = self.inner.config.pool.addresses(slot);
        let egress = Arc::new(RwLock::new(egress));
        let policy = Arc::new(WorkspacePolicy {
            id: id.to_owned(),
            egress: egress.clone(),
            networks: Arc::downgrade(&self.inner),
            names: Mutex::new(HashMap::new()),
            refusals: Mutex::new((Instant::now(), 0)),
        });
        let cancel = CancellationToken::new();
        dns::serve(host, self.upstreams(), policy.clone(), cancel.clone()).await?;
        sni::serve(host, policy, cancel.clone()).await?;
        Ok(Attached {
            slot,
            link,
            egress,
            opened: HashMap::new(),
            closed: HashMap::new(),
            _dns: cancel.drop_guard(),
        })
    }

    fn upstreams(&self) -> Arc<Vec<SocketAddr>> {
        let config = &self.inner.config;
        if !config.dns.is_empty() {
            return Arc::new(config.dns.clone());
        }
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Arc::new(dns::resolvers_of(&text))
    }

    /// Gives workspace `id`'s running container `egress` at once (nothing when it does not
    /// run: its next start takes the record's). Addresses learnt under the old rules are
    /// forgotten: the next lookups learn them again under the new ones.
    pub async fn set_egress(&self, id: &str, egress: Egress) -> Result<()> {
        let mut attached = self.inner.attached.lock().await;
        let Some(a) = attached.get_mut(id) else {
            return Ok(());
        };
        let before = std::mem::replace(
            &mut *a.egress.write().unwrap_or_else(|e| e.into_inner()),
            egress,
        );
        let learnt = (std::mem::take(&mut a.opened), std::mem::take(&mut a.closed));
        if let Err(e) = Self::apply(&self.inner, &attached).await {
            if let Some(a) = attached.get_mut(id) {
                *a.egress.write().unwrap_or_else(|e| e.into_inner()) = before;
                (a.opened, a.closed) = learnt;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Forgets workspace `id`'s container: its rules go, its place in the pool is free, its
    /// link (if the container left it) is removed.
    pub async fn detach(&self, id: &str) -> Result<()> {
        let mut attached = self.inner.attached.lock().await;
        let link = link_name(id);
        let had = attached.remove(id).is_some();
        let present = blocking(link::links).await.unwrap_or_default();
        if present.iter().any(|(name, _)| *name == link) {
            let l = link.clone();
            if let Err(e) = blocking(move || link::delete(&l)).await {
                warn!("Cannot remove {link}: {e}");
            }
        }
        if had {
            Self::apply(&self.inner, &attached).await?;
        }
        Ok(())
    }

    /// At start: takes up the links of running containers of `known` workspaces (ids and
    /// rules of container workspaces with a network of their own) with the addresses they
    /// have, removes links of no known workspace, and writes the table for what runs.
    pub async fn reconcile(&self, known: &[(String, Egress)]) {
        let mut attached = self.inner.attached.lock().await;
        let links = match blocking(link::links).await {
            Ok(l) => l,
            Err(e) => {
                warn!("Cannot list the container links: {e}");
                return;
            }
        };
        let pool = self.inner.config.pool;
        for (link, addr) in links {
            let owner = known.iter().find(|(id, _)| link_name(id) == link);
            let slot = addr.and_then(|a| pool.slot_of_host(a));
            match (owner, slot) {
                (Some((id, egress)), Some(slot)) => {
                    match self.entry(id, slot, link.clone(), egress.clone()).await {
                        Ok(entry) => {
                            attached.insert(id.clone(), entry);
                        }
                        Err(e) => warn!("Cannot serve DNS for {link}: {e}"),
                    }
                }
                _ => {
                    warn!("Removing {link}: it belongs to no running workspace of this pool");
                    let l = link.clone();
                    if let Err(e) = blocking(move || link::delete(&l)).await {
                        warn!("Cannot remove {link}: {e}");
                    }
                }
            }
        }
        if let Err(e) = Self::apply(&self.inner, &attached).await {
            // Nothing attached: a machine without nft never had a table of ours.
            if !attached.is_empty() {
                warn!("{e}");
            }
        }
    }

    /// Writes the table for `attached`.
    async fn apply(inner: &Inner, attached: &BTreeMap<String, Attached>) -> Result<()> {
        let pool = inner.config.pool;
        let now = Instant::now();
        let left = |m: &HashMap<Ipv4Addr, Instant>| -> Vec<(Ipv4Addr, u64)> {
            m.iter()
                .filter(|(_, until)| **until > now + Duration::from_secs(1))
                .map(|(a, until)| (*a, (*until - now).as_secs()))
                .collect()
        };
        let members: Vec<Member> = attached
            .iter()
            .map(|(id, a)| Member {
                id: id.clone(),
                link: a.link.clone(),
                inside: pool.addresses(a.slot).1,
                egress: a.egress.read().unwrap_or_else(|e| e.into_inner()).clone(),
                opened: left(&a.opened),
                closed: left(&a.closed),
            })
            .collect();
        if !members.is_empty() {
            nflog::start();
        }
        let script = nft::script(pool, &members);
        blocking(move || link::nft(&script))
            .await
            .map_err(|e| failed("Cannot write the nftables table inet agent_workspaces", e))
    }
}

/// A container's egress rules as its resolver sees them.
struct WorkspacePolicy {
    id: String,
    egress: Arc<RwLock<Egress>>,
    networks: Weak<Inner>,
    /// The addresses its lookups of allowed names answered, by name, until when: a
    /// connection that names one of them must be for one of its addresses (`sni.rs`).
    names: Mutex<HashMap<String, HashMap<Ipv4Addr, Instant>>>,
    /// Refusals logged in the current minute: since when, how many.
    refusals: Mutex<(Instant, u32)>,
}

impl WorkspacePolicy {
    /// Logs a refusal, at most `REFUSALS_LOGGED` a minute (then a count).
    fn log_refusal(&self, what: &str, field: &str) {
        let mut r = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(r.0) >= Duration::from_secs(60) {
            if r.1 > REFUSALS_LOGGED {
                info!(workspace_id = %self.id,
                      "{} more lookups and connections refused by the egress rules in the last minute",
                      r.1 - REFUSALS_LOGGED);
            }
            *r = (now, 0);
        }
        r.1 += 1;
        if r.1 <= REFUSALS_LOGGED {
            info!(workspace_id = %self.id, refused = %field, "{what}");
        }
    }
}

impl sni::Names for WorkspacePolicy {
    fn agrees(&self, name: &str, addr: Ipv4Addr) -> std::result::Result<(), String> {
        if self
            .egress
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .judge_name(name)
            != NameVerdict::Open
        {
            return Err("which the egress rules do not allow".into());
        }
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match names.get(name).and_then(|a| a.get(&addr)) {
            Some(until) if *until > now => Ok(()),
            _ => Err(format!("whose lookups did not answer {addr}")),
        }
    }

    fn refused(&self, to: std::net::SocketAddrV4, why: &str) {
        self.log_refusal(
            &format!("Refused a connection to {to}: {why}"),
            &to.to_string(),
        );
    }
}

#[async_trait]
impl dns::Policy for WorkspacePolicy {
    fn judge(&self, name: &str) -> NameVerdict {
        self.egress
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .judge_name(name)
    }

    async fn resolved(&self, name: &str, verdict: NameVerdict, addresses: Vec<(Ipv4Addr, u32)>) {
        let Some(inner) = self.networks.upgrade() else {
            return;
        };
        let pool = inner.config.pool;
        let learnt = match verdict {
            NameVerdict::Open => Learnt::Opened,
            NameVerdict::Deny => Learnt::Closed,
            _ => return,
        };
        // An address a deny rule names is never opened by a name (the name check would
        // otherwise let it through ahead of the rule).
        let egress = self
            .egress
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let denied = |a: Ipv4Addr| {
            egress.deny.iter().any(|d| match d {
                crate::core::egress::Destination::Net { addr, prefix } => within(a, *addr, *prefix),
                _ => false,
            })
        };
        let addresses: Vec<(Ipv4Addr, u64)> = addresses
            .into_iter()
            .filter(|(a, _)| learnt == Learnt::Closed || (public(pool, *a) && !denied(*a)))
            .map(|(a, ttl)| (a, u64::from(ttl).clamp(LEARNT_MIN, LEARNT_MAX)))
            .collect();
        if addresses.is_empty() {
            return;
        }
        let mut attached = inner.attached.lock().await;
        let Some(a) = attached.get_mut(&self.id) else {
            return;
        };
        let now = Instant::now();
        let map = match learnt {
            Learnt::Opened => &mut a.opened,
            Learnt::Closed => &mut a.closed,
        };
        for (addr, secs) in &addresses {
            map.insert(*addr, now + Duration::from_secs(*secs));
        }
        if learnt == Learnt::Opened {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            names.retain(|_, a| {
                a.retain(|_, until| *until > now);
                !a.is_empty()
            });
            let of = names.entry(name.to_owned()).or_default();
            for (addr, secs) in &addresses {
                of.insert(*addr, now + Duration::from_secs(*secs));
            }
        }
        map.retain(|_, until| *until > now);
        let script = nft::learn(&a.link, learnt, &addresses);
        if let Err(e) = blocking(move || link::nft(&script)).await {
            warn!(workspace_id = %self.id, "Cannot add the addresses of {name} to the rules: {e}");
        }
    }

    fn refused(&self, name: &str) {
        self.log_refusal(
            &format!("Refused a DNS lookup of {name}: the egress rules do not allow it"),
            name,
        );
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_fit_an_interface_name() {
        let l = link_name("0f1e2d3c-4b5a-4987-8765-43210fedcba9");
        assert_eq!(l, "aw-0f1e2d3c4b5a");
        assert!(l.len() <= 15);
    }

    #[test]
    fn only_public_addresses_are_opened_by_a_name() {
        let pool = Pool::default();
        for a in ["192.0.2.1", "198.51.100.7", "8.8.8.8"] {
            assert!(public(pool, a.parse().unwrap()), "{a}");
        }
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "0.0.0.0",
            "10.213.0.2",
        ] {
            assert!(!public(pool, a.parse().unwrap()), "{a}");
        }
    }
}
