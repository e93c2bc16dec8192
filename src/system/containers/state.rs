//! A container's state: its processes frozen (pause, and the instant of a capture), and the
//! snapshots, restores and forks of its tree (`layer/` does the layers): stopped for a
//! restore, and no start while a stopped tree's layers change.

use tracing::{info, warn};

use crate::core::ports::SnapshotInfo;
use crate::system::containers::layer::{self, Refusal};

use super::*;

/// Runs layer work (directory walks, copies) on a blocking thread.
async fn ws_blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(std::io::Error::other(format!(
            "layer work did not finish: {e}"
        )))
    })
}

/// A layer change's outcome as the service's error: refusals by their own names.
fn layered<T>(r: std::io::Result<T>, ws: &Workspace, verb: &str) -> Result<T> {
    r.map_err(|e| match Refusal::of(&e) {
        Some(Refusal::NoSnapshot(n)) => {
            Error::NoSuchSnapshot(format!("Workspace '{}' has no snapshot '{n}'", ws.name))
        }
        Some(Refusal::Exists(n)) => Error::SnapshotExists(format!(
            "Workspace '{}' has a snapshot named '{n}' already",
            ws.name
        )),
        Some(r @ Refusal::TooDeep(_)) => {
            Error::LimitsExceeded(format!("Cannot {verb} workspace '{}': {r}", ws.name))
        }
        Some(r @ Refusal::NotLayered(_)) => {
            Error::NotSupported(format!("Cannot {verb} workspace '{}': {r}", ws.name))
        }
        None => Error::io(format!("Cannot {verb} workspace '{}'", ws.name), e),
    })
}

/// Flattens under way, and the depth a workspace's next try waits for after one failed.
#[derive(Default)]
pub(super) struct Flattening {
    running: std::collections::HashSet<String>,
    floor: HashMap<String, usize>,
}

fn now_usec() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl NspawnContainers {
    /// Freezes or thaws the container unit (see `Containers::freeze`). What counts is the
    /// kernel's word (`cgroup.events` of the unit's cgroup), not systemd's `FreezerState`: the
    /// system tests saw the two disagree (a unit frozen by a service killed mid-snapshot,
    /// then a daemon-reload: `FreezerState=running` over a frozen cgroup, and `ThawUnit` a
    /// no-op), so each request is checked and, where systemd did nothing, made again.
    pub(super) async fn freeze_unit(&self, ws: &Workspace, freeze: bool) -> Result<()> {
        let unit = unit_name(&ws.name);
        // One look-up of the unit: whether it runs, and its cgroup, read each time below.
        let cgroup = match self.systemd.unit_state(&unit).await? {
            Some(s) if s.active_state == "active" => s.control_group,
            _ if freeze => {
                return Err(Error::JobFailed(format!(
                    "Cannot pause workspace '{}': its container is not running (a stopped workspace uses no CPU or memory already)",
                    ws.name
                )));
            }
            _ => return Ok(()),
        };
        for attempt in 0..3 {
            if cgroup_frozen(&cgroup).await == freeze {
                return Ok(());
            }
            if attempt > 0 {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "{unit} is {} after {}; asking again", if freeze { "not frozen" } else { "still frozen" },
                      if freeze { "FreezeUnit" } else { "ThawUnit" });
                // systemd's own state may say it is done already: the other request first
                // puts it back in step.
                let _ = self.systemd.freeze(&unit, !freeze).await;
            }
            self.systemd.freeze(&unit, freeze).await?;
        }
        if cgroup_frozen(&cgroup).await == freeze {
            return Ok(());
        }
        Err(Error::JobFailed(format!(
            "Cannot {} workspace '{}': systemd did not {} {unit}",
            if freeze { "pause" } else { "resume" },
            ws.name,
            if freeze { "freeze" } else { "thaw" }
        )))
    }

    /// Whether the unit's cgroup is frozen, as the kernel says.
    pub(super) async fn unit_frozen(&self, ws: &Workspace) -> Result<bool> {
        Ok(match self.systemd.unit_state(&unit_name(&ws.name)).await? {
            Some(s) => cgroup_frozen(&s.control_group).await,
            None => false,
        })
    }

    pub(super) async fn finish_fork(&self, fork: &Workspace) -> Result<()> {
        let tree = self.tree_path(&fork.name);
        layered(
            ws_blocking(move || layer::fork_done(&tree)).await,
            fork,
            "fork",
        )
    }

    pub(super) async fn layer_usage(&self, ws: &Workspace) -> Result<u64> {
        let tree = self.tree_path(&ws.name);
        layered(
            ws_blocking(move || layer::disk_usage(&tree)).await,
            ws,
            "measure",
        )
    }

    /// The lock of a workspace's tree (see `trees`).
    pub(super) async fn tree_lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .trees
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Whether the container runs; if it does and is not frozen already, it is frozen, and
    /// the returned guard is true: the caller thaws it.
    async fn hold_still(&self, ws: &Workspace) -> Result<(bool, bool)> {
        if self.systemd.machine_leader(&ws.name).await?.is_none() {
            return Ok((false, false));
        }
        if self.is_frozen(ws).await? {
            return Ok((true, false));
        }
        self.systemd.freeze(&unit_name(&ws.name), true).await?;
        Ok((true, true))
    }

    async fn let_go(&self, ws: &Workspace, froze: bool) {
        if froze && let Err(e) = self.systemd.freeze(&unit_name(&ws.name), false).await {
            warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                  "Cannot thaw {} after a snapshot: {e}", ws.name);
        }
    }

    pub(super) async fn take_snapshot(&self, ws: &Workspace, name: &str) -> Result<()> {
        let _tree = self.tree_lock(&ws.name).await;
        let (running, froze) = self.hold_still(ws).await?;
        let tree = self.tree_path(&ws.name);
        let (n, now) = (name.to_owned(), now_usec());
        let started = std::time::Instant::now();
        let made = ws_blocking(move || layer::snapshot(&tree, &n, running, now)).await;
        self.let_go(ws, froze).await;
        layered(made, ws, "snapshot")?;
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Took snapshot {name} of workspace {} in {:.3} s ({})", ws.name,
              started.elapsed().as_secs_f64(),
              if running { "running: its writable layer copied" } else { "stopped" });
        self.flatten_later(ws);
        Ok(())
    }

    /// The workspace is gone: one made later under its name starts with no flatten floor.
    pub(super) fn forget_flatten(&self, name: &str) {
        self.flattening
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .floor
            .remove(name);
    }

    /// Past `layer::FLATTEN_AT` read-only layers, the tree's stack is flattened in the
    /// background (a blocking task; one at a time per workspace); the journal says what it
    /// did, or why it could not (the stack then stays as deep as it was, and the next try
    /// waits until it is deeper, by `FLATTEN_RETRY` layers unless the disk was full: a
    /// failure that would come again, a file with too many links, is not paid for at every
    /// snapshot).
    fn flatten_later(&self, ws: &Workspace) {
        const FLATTEN_RETRY: usize = 8;
        let tree = self.tree_path(&ws.name);
        let floor = {
            let mut busy = self
                .flattening
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if busy.running.contains(&ws.name) {
                return;
            }
            busy.running.insert(ws.name.clone());
            busy.floor.get(&ws.name).copied().unwrap_or(0)
        };
        let busy = self.flattening.clone();
        let (id, name) = (ws.id.clone(), ws.name.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let done = ws_blocking(move || {
                let r = layer::flatten_if_deep(&tree, floor);
                // How deep it stayed, for the next try's floor.
                let depth = if r.is_err() {
                    layer::depth(&tree).unwrap_or(0)
                } else {
                    0
                };
                Ok((r, depth))
            })
            .await;
            let mut b = busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            b.running.remove(&name);
            match done {
                Ok((Ok(Some(f)), _)) => {
                    b.floor.remove(&name);
                    info!(workspace_id = %id, workspace_name = %name,
                    "Flattened the layers of workspace {name} from {} to {} in {:.3} s",
                    f.before, f.after, started.elapsed().as_secs_f64());
                }
                Ok((Ok(None), _)) => {}
                Ok((Err(e), depth)) => {
                    // A full disk may have room at the next snapshot; anything else would fail
                    // again the same way.
                    let next = if e.kind() == std::io::ErrorKind::StorageFull {
                        depth
                    } else {
                        depth + FLATTEN_RETRY
                    };
                    b.floor.insert(name.clone(), next);
                    warn!(workspace_id = %id, workspace_name = %name,
                    "Cannot flatten the layers of workspace {name}: {e}; its stack stays as it was ({depth} layers; tried again past {next}; past {} snapshots and forks are refused)",
                    layer::MAX_LOWERS);
                }
                Err(e) => warn!(workspace_id = %id, workspace_name = %name,
                    "Cannot flatten the layers of workspace {name}: {e}"),
            }
        });
    }

    pub(super) async fn list_snapshots(&self, ws: &Workspace) -> Result<Vec<SnapshotInfo>> {
        let tree = self.tree_path(&ws.name);
        layered(
            ws_blocking(move || layer::snapshots(&tree)).await,
            ws,
            "list the snapshots of",
        )
    }

    pub(super) async fn remove_snapshot(&self, ws: &Workspace, name: &str) -> Result<()> {
        let tree = self.tree_path(&ws.name);
        let n = name.to_owned();
        layered(
            ws_blocking(move || layer::delete_snapshot(&tree, &n)).await,
            ws,
            "delete a snapshot of",
        )
    }

    pub(super) async fn restore_snapshot(&self, ws: &Workspace, name: &str) -> Result<()> {
        let running = self.systemd.machine_leader(&ws.name).await?.is_some();
        // Refused before anything stops when there is no such snapshot.
        if !self
            .list_snapshots(ws)
            .await?
            .iter()
            .any(|s| s.name == name)
        {
            return Err(Error::NoSuchSnapshot(format!(
                "Workspace '{}' has no snapshot '{name}'",
                ws.name
            )));
        }
        {
            // No start while the tree changes; one that came before the lock is stopped here.
            let _tree = self.tree_lock(&ws.name).await;
            if self.systemd.machine_leader(&ws.name).await?.is_some() {
                self.stop(ws).await?;
            }
            let tree = self.tree_path(&ws.name);
            let n = name.to_owned();
            layered(
                ws_blocking(move || layer::restore(&tree, &n)).await,
                ws,
                "restore",
            )?;
        }
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Restored workspace {} to its snapshot {name}", ws.name);
        self.flatten_later(ws);
        if running {
            self.start(ws).await?;
        }
        Ok(())
    }

    pub(super) async fn make_fork(
        &self,
        source: &Workspace,
        snapshot: &str,
        fork: &Workspace,
    ) -> Result<()> {
        self.check_name_free(&fork.name).await?;
        let _tree = self.tree_lock(&source.name).await;
        let (running, froze) = if snapshot.is_empty() {
            self.hold_still(source).await?
        } else {
            (false, false)
        };
        let (from, to) = (self.tree_path(&source.name), self.tree_path(&fork.name));
        let snap = (!snapshot.is_empty()).then(|| snapshot.to_owned());
        let made = ws_blocking(move || layer::fork(&from, snap.as_deref(), running, &to)).await;
        self.let_go(source, froze).await;
        layered(made, source, "fork")?;
        // Its own host name and machine id, like a tree built afresh.
        let to = self.tree_path(&fork.name);
        let name = fork.name.clone();
        let configured = ws_blocking(move || {
            let r = build::configure(&to, &name);
            if r.is_err() {
                let _ = layer::remove(&to);
            }
            r
        })
        .await;
        layered(configured, fork, "configure the fork")?;
        self.flatten_later(source);
        self.flatten_later(fork);
        Ok(())
    }
}

/// Whether the cgroup (a unit's `ControlGroup`) is frozen: `frozen 1` in its `cgroup.events`.
/// No such cgroup (the unit ended, or none given): not frozen.
async fn cgroup_frozen(cgroup: &str) -> bool {
    let cgroup = cgroup.trim_start_matches('/');
    if cgroup.is_empty() {
        return false;
    }
    let events = Path::new("/sys/fs/cgroup")
        .join(cgroup)
        .join("cgroup.events");
    tokio::fs::read_to_string(events)
        .await
        .is_ok_and(|text| text.lines().any(|l| l.trim() == "frozen 1"))
}
