//! Networks of their own for containers (`network = "internet"`): nspawn makes a veth pair
//! (`--network-veth-extra=aw-…:host0`) and the container's own network namespace; the service
//! gives both ends their addresses from the pool (`pool.rs`), answers the container's DNS
//! (`dns.rs`) and keeps the rules of its own nftables table (`nft.rs`) that let a container
//! out to the internet through NAT and nowhere near the host, the host's networks or another
//! container. The pair goes with the container's namespace when the container ends; the
//! table follows the running containers, so rules outlive a restart of the service and are
//! taken up again at its start (`reconcile`).

pub mod dns;
mod link;
pub mod nft;
pub mod pool;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::core::error::{Error, Result};
use nft::{LINK_PREFIX, Member};
use pool::Pool;

/// Settings of `[network]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkConfig {
    pub pool: Pool,
    /// Resolvers the service asks for containers; empty: those of `/etc/resolv.conf`.
    pub dns: Vec<SocketAddr>,
}

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
    /// Ends its resolver when dropped.
    _dns: DropGuard,
}

pub struct Networks {
    config: NetworkConfig,
    /// Running containers by workspace id; its lock orders every change of the table.
    attached: tokio::sync::Mutex<BTreeMap<String, Attached>>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::JobFailed(format!("{what}: {e}"))
}

impl Networks {
    pub fn new(config: NetworkConfig) -> Self {
        Self {
            config,
            attached: Default::default(),
        }
    }

    pub fn pool(&self) -> Pool {
        self.config.pool
    }

    fn upstreams(&self) -> Arc<Vec<SocketAddr>> {
        if !self.config.dns.is_empty() {
            return Arc::new(self.config.dns.clone());
        }
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Arc::new(dns::resolvers_of(&text))
    }

    /// Gives the running container of workspace `id` (its leader's pidfd) its addresses, its
    /// resolver and its rules. Returns the container's resolver address, for its
    /// `/etc/resolv.conf`.
    pub async fn attach(&self, id: &str, leader: BorrowedFd<'_>) -> Result<Ipv4Addr> {
        let link = link_name(id);
        let mut attached = self.attached.lock().await;
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
        let pool = self.config.pool;
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
        let cancel = CancellationToken::new();
        dns::serve(host, self.upstreams(), cancel.clone())
            .await
            .map_err(|e| failed(&format!("Cannot serve DNS on {host}:53"), e))?;
        attached.insert(
            id.to_owned(),
            Attached {
                slot,
                link: link.clone(),
                _dns: cancel.drop_guard(),
            },
        );
        if let Err(e) = self.apply(&attached).await {
            attached.remove(id);
            return Err(e);
        }
        match blocking(link::enable_forwarding).await {
            Ok(true) => info!("Turned IPv4 forwarding on for the networks of containers"),
            Ok(false) => {}
            Err(e) => {
                attached.remove(id);
                let _ = self.apply(&attached).await;
                return Err(failed(
                    "Cannot turn IPv4 forwarding on (net.ipv4.ip_forward)",
                    e,
                ));
            }
        }
        Ok(host)
    }

    /// Forgets workspace `id`'s container: its rules go, its place in the pool is free, its
    /// link (if the container left it) is removed.
    pub async fn detach(&self, id: &str) -> Result<()> {
        let mut attached = self.attached.lock().await;
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
            self.apply(&attached).await?;
        }
        Ok(())
    }

    /// At start: takes up the links of running containers of `known` workspaces (ids of
    /// container workspaces with a network of their own) with the addresses they have,
    /// removes links of no known workspace, and writes the table for what runs.
    pub async fn reconcile(&self, known: &[String]) {
        let mut attached = self.attached.lock().await;
        let links = match blocking(link::links).await {
            Ok(l) => l,
            Err(e) => {
                warn!("Cannot list the container links: {e}");
                return;
            }
        };
        let pool = self.config.pool;
        for (link, addr) in links {
            let owner = known.iter().find(|id| link_name(id) == link);
            let slot = addr.and_then(|a| pool.slot_of_host(a));
            match (owner, slot) {
                (Some(id), Some(slot)) => {
                    let (host, _) = pool.addresses(slot);
                    let cancel = CancellationToken::new();
                    if let Err(e) = dns::serve(host, self.upstreams(), cancel.clone()).await {
                        warn!("Cannot serve DNS on {host}:53 for {link}: {e}");
                    }
                    attached.insert(
                        id.clone(),
                        Attached {
                            slot,
                            link,
                            _dns: cancel.drop_guard(),
                        },
                    );
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
        if let Err(e) = self.apply(&attached).await {
            // Nothing attached: a machine without nft never had a table of ours.
            if !attached.is_empty() {
                warn!("{e}");
            }
        }
    }

    /// Writes the table for `attached`.
    async fn apply(&self, attached: &BTreeMap<String, Attached>) -> Result<()> {
        let pool = self.config.pool;
        let members: Vec<Member> = attached
            .values()
            .map(|a| Member {
                link: a.link.clone(),
                inside: pool.addresses(a.slot).1,
            })
            .collect();
        let script = nft::script(pool, &members);
        blocking(move || link::nft(&script))
            .await
            .map_err(|e| failed("Cannot write the nftables table inet agent_workspaces", e))
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
}
