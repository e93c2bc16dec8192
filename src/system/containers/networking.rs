//! A container's network of its own (`network = "internet"`), as its container starts, runs
//! and is found again at start-up: what `system/network` is given of the workspace.

use super::*;
use crate::core::egress::Egress;

impl NspawnContainers {
    /// A started container with a network of its own gets it: addresses, resolver, rules,
    /// and an `/etc/resolv.conf` naming its resolver (the service's: every query goes there,
    /// whatever the file says, but a resolver the container cannot reach would make each
    /// lookup wait for a timeout first).
    pub(super) async fn connect(&self, ws: &Workspace, leader: &Leader) -> Result<()> {
        if ws.network != Network::Internet {
            return Ok(());
        }
        let resolver = self
            .network
            .attach(&ws.id, leader.pidfd(), egress_of(ws))
            .await?;
        self.tree(ws)
            .and_then(|t| t.dir("etc", true))
            .and_then(|etc| {
                etc.write_file(
                    "resolv.conf",
                    format!("# agent-workspaces: the service answers this container's DNS\nnameserver {resolver}\n").as_bytes(),
                    0o644,
                )
            })
            .map_err(|e| {
                Error::io(
                    format!("Cannot write /etc/resolv.conf in the tree of workspace '{}'", ws.name),
                    e,
                )
            })
    }

    /// Gives a running container with a network of its own the record's egress rules.
    pub(super) async fn set_egress(&self, ws: &Workspace) -> Result<()> {
        if ws.network != Network::Internet {
            return Ok(());
        }
        self.network.set_egress(&ws.id, egress_of(ws)).await
    }

    /// At start-up: the networks of running containers of `known` workspaces taken up.
    pub(super) async fn reconcile_networks(&self, known: &[Workspace]) {
        let internet: Vec<(String, Egress)> = known
            .iter()
            .filter(|w| w.network == Network::Internet)
            .map(|w| (w.id.clone(), egress_of(w)))
            .collect();
        self.network.reconcile(&internet).await;
    }
}

/// The workspace's egress rules as the network enforces them.
fn egress_of(ws: &Workspace) -> Egress {
    Egress::of(&ws.egress_allow, &ws.egress_deny)
}
