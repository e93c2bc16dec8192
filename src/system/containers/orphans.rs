//! At start-up: trees, half-built trees and units of ours that no workspace record owns; at
//! start-up and after each destroy, unpacked bases no tree uses any more.

use std::fs;

use tracing::{info, warn};

use crate::core::ports::NameTaken;
use crate::system::containers::layer;
use crate::system::containers::tree::Tree;

use super::*;

impl NspawnContainers {
    /// `known`: the workspaces at start; `taken`, asked when something looks left over: a
    /// workspace created since (its build unit, its half-built tree) is not left over.
    pub(super) async fn remove_orphans(&self, known: &[String], taken: NameTaken) {
        let is_known = |name: &str| known.iter().any(|k| k == name) || taken(name);
        // A directory scan and whole trees removed: on a blocking thread.
        let machines = self.config().machines_dir.clone();
        let names = known.to_vec();
        let live = taken.clone();
        let _ = tokio::task::spawn_blocking(move || remove_orphan_trees(&machines, &names, &live))
            .await;
        match self
            .systemd
            .units_matching("agent-workspace-*.service")
            .await
        {
            Ok(units) => {
                for (unit, description, _) in units {
                    let base = unit.strip_suffix(".service").unwrap_or(&unit);
                    let name = base
                        .strip_prefix("agent-workspace-build@")
                        .or_else(|| base.strip_prefix("agent-workspace-"))
                        .unwrap_or("");
                    let ours = description.starts_with("Agent workspace ")
                        || description.starts_with("Build of agent workspace ");
                    if !name.is_empty() && !is_known(name) && ours {
                        warn!("Stopping {unit}: it belongs to no workspace record");
                        if let Err(e) = self.systemd.stop(&unit).await {
                            warn!("Cannot stop {unit}: {e}");
                        }
                    }
                }
            }
            Err(e) => warn!("Cannot look for leftover units: {e}"),
        }
        self.reclaim_bases().await;
    }

    /// Removes the unpacked bases in the cache that no tree's stack names and no build holds
    /// (`layer::reclaim_bases`), and says how much space that gave back.
    pub(super) async fn reclaim_bases(&self) {
        let (machines, bases) = {
            let c = self.config();
            (c.machines_dir.clone(), c.cache_dir.join("base"))
        };
        let done = tokio::task::spawn_blocking(move || {
            layer::reclaim_bases(&machines, &bases, || {
                crate::failpoint::hit("reclaim-renamed");
            })
        })
        .await;
        match done {
            Ok(Ok(done)) if !done.bases.is_empty() => {
                let names: Vec<String> =
                    done.bases.iter().map(|p| p.display().to_string()).collect();
                info!(
                    reclaimed_bytes = done.bytes,
                    "Reclaimed {} MiB of unpacked base trees no workspace uses: {}",
                    done.bytes.div_ceil(1 << 20),
                    names.join(", ")
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("Cannot reclaim unused base trees: {e}"),
            Err(e) => warn!("Cannot reclaim unused base trees: {e}"),
        }
    }
}

/// Mounts the layered trees of known workspaces again (after a reboot); removes half-built
/// trees of ours without a record; names the finished ones (left in place: a record lost by
/// hand should not cost a tree).
fn remove_orphan_trees(machines: &Path, known: &[String], taken: &NameTaken) {
    let is_known = |name: &str| known.iter().any(|k| k == name) || taken(name);
    // Forks a restart interrupted before their record was saved are undone; layers nothing
    // uses (a change a crash ended) go.
    if let Err(e) = layer::finish_forks(machines, known) {
        warn!("Cannot finish the forks and layers a restart interrupted: {e}");
    }
    for name in known {
        let tree = machines.join(name);
        if let Err(e) = layer::ensure_mounted(&tree) {
            warn!("Cannot mount the layered tree {}: {e}", tree.display());
        }
    }
    if let Ok(entries) = fs::read_dir(layer::layers_dir(machines)) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !is_known(&name) {
                warn!(
                    "The layer {} has no workspace record; it is left in place",
                    e.path().display()
                );
            }
        }
    }
    if let Ok(entries) = fs::read_dir(machines) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if let Some(name) = file.strip_suffix(".partial") {
                // Only a build of ours makes <name>.partial with a configured tree inside.
                if !is_known(name) && Tree::open(&path).is_ok_and(|t| t.is_dir("workspace")) {
                    warn!(
                        "Removing {}, a half-built tree without a workspace record",
                        path.display()
                    );
                    let _ = fs::remove_dir_all(&path);
                }
            } else if !is_known(&file) && Tree::open(&path).is_ok_and(|t| t.is_dir(OWN_DIR)) {
                warn!(
                    "The container tree {} has no workspace record; it is left in place (remove it with: machinectl remove {file})",
                    path.display()
                );
            }
        }
    }
}
