//! Workspace state: snapshots of a container's tree, restores, and forks (a new workspace
//! whose tree starts as another's, sharing its layers). The layers themselves are the
//! `Containers` port's; this holds the rules: which workspaces, which states, which locks.

use std::sync::Arc;

use tracing::info;

use crate::core::error::{Error, Result};
use crate::core::names::{new_id, validate_name, validate_snapshot_name};
use crate::core::ports::{Event, SnapshotInfo};
use crate::core::spec::Changes;
use crate::core::workspace::{Field, Status, Workspace};

use super::*;

/// How long a measured `DiskUsage` is answered again without measuring.
const USAGE_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

impl Manager {
    /// The container workspace a snapshot verb works on; host workspaces are refused with
    /// the reason.
    fn layered(&self, key: &str, verb: &str) -> Result<Workspace> {
        let ws = self.get(key)?;
        if !ws.is_container() {
            return Err(Error::NotSupported(format!(
                "Cannot {verb} workspace '{}': it is a host workspace, a plain directory on the host without copy-on-write layers; snapshots, restores and forks are for container workspaces",
                ws.name
            )));
        }
        Ok(ws)
    }

    /// The workspace again, under its operation lock, which must be `ready` or `paused`
    /// (a built tree).
    fn built(&self, id: &str) -> Result<Workspace> {
        let ws = self.get(id)?;
        if !matches!(ws.status, Status::Ready | Status::Paused) {
            return Err(Error::NotReady {
                workspace: ws.name,
                status: ws.status.to_string(),
            });
        }
        Ok(ws)
    }

    pub(super) fn snapshots_changed(&self, id: &str) {
        self.ports.events.emit(Event::Changed {
            id: id.to_owned(),
            fields: vec![Field::Snapshots],
        });
    }

    /// `SnapshotWorkspace`: the container's tree captured as the read-only snapshot `name`.
    pub async fn snapshot(&self, key: &str, name: &str) -> Result<()> {
        validate_snapshot_name(name).map_err(|e| Error::invalid("name", e))?;
        let ws = self.layered(key, "snapshot")?;
        let (id, ops) = self.ops_lock(&ws.id)?;
        let _op = ops.lock().await;
        let ws = self.built(&id)?;
        self.ports.containers.snapshot(&ws, name).await?;
        self.snapshots_changed(&id);
        Ok(())
    }

    /// `ListSnapshots`: the workspace's snapshots, oldest first.
    pub async fn snapshots(&self, key: &str) -> Result<Vec<SnapshotInfo>> {
        let ws = self.layered(key, "list the snapshots of")?;
        self.ports.containers.snapshots(&ws).await
    }

    /// `DeleteSnapshot`: the snapshot goes; its layers stay while a fork uses them.
    pub async fn delete_snapshot(&self, key: &str, name: &str) -> Result<()> {
        let ws = self.layered(key, "delete a snapshot of")?;
        let (id, ops) = self.ops_lock(&ws.id)?;
        let _op = ops.lock().await;
        let ws = self.get(&id)?;
        self.ports.containers.delete_snapshot(&ws, name).await?;
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Deleted snapshot {name} of workspace {}", ws.name);
        self.snapshots_changed(&id);
        Ok(())
    }

    /// `RestoreWorkspace`: the workspace's tree becomes the snapshot's. Its processes end
    /// (the container stops), and a container that ran runs again; a paused one is `ready`.
    pub async fn restore(&self, key: &str, name: &str) -> Result<()> {
        let ws = self.layered(key, "restore")?;
        let (id, ops) = self.ops_lock(&ws.id)?;
        let _op = ops.lock().await;
        let ws = self.built(&id)?;
        self.ports.containers.restore(&ws, name).await?;
        if ws.status == Status::Paused {
            self.set_status(&id, Status::Ready, "", Some(Status::Paused));
        }
        self.ports.events.emit(Event::Restored {
            id,
            snapshot: name.to_owned(),
        });
        Ok(())
    }

    /// `ForkWorkspace`: a new container workspace `name` whose tree starts as the source's
    /// snapshot `snapshot`, or as the source is now when it is empty, sharing its layers;
    /// ready without a build. It takes the source's settings, changed by `changes` (network,
    /// egress, limits, env_vars, init_script); its id, machine id and host name are its own.
    pub async fn fork(
        self: &Arc<Self>,
        source: &str,
        snapshot: &str,
        name: &str,
        changes: Changes,
    ) -> Result<Workspace> {
        validate_name(name).map_err(|e| Error::invalid("name", e))?;
        if !snapshot.is_empty() {
            validate_snapshot_name(snapshot).map_err(|e| Error::invalid("snapshot", e))?;
        }
        changes.validate()?;
        for (key, set) in [
            ("skills", changes.skills.is_some()),
            ("tools", changes.tools.is_some()),
        ] {
            if set {
                return Err(Error::invalid(
                    key,
                    "a fork has its source's skills and tools: change them with UpdateWorkspace once it exists",
                ));
            }
        }
        let src = self.layered(source, "fork")?;
        let reservation = self.reserve(name)?;
        let (sid, ops) = self.ops_lock(&src.id)?;
        let _op = ops.lock().await;
        let src = self.built(&sid)?;
        let mut ws = Workspace {
            id: new_id(),
            name: name.to_owned(),
            status: Status::Ready,
            error_message: String::new(),
            path: self.ports.containers.tree_path(name),
            owns_path: true,
            created_at_usec: now_usec(),
            build_step: String::new(),
            ..src.clone()
        };
        if let Some(network) = changes.network()? {
            ws.network = network;
        }
        let [allow, deny] = changes.egress()?;
        if let Some(allow) = allow {
            ws.egress_allow = allow;
        }
        if let Some(deny) = deny {
            ws.egress_deny = deny;
        }
        ws.limits = changes.apply_limits(ws.limits);
        if let Some(env) = changes.env_vars {
            ws.env_vars = env;
        }
        if let Some(script) = changes.init_script {
            ws.init_script = script;
        }
        let started = std::time::Instant::now();
        self.ports.containers.fork_tree(&src, snapshot, &ws).await?;
        crate::failpoint::hit("fork-tree-made");
        if let Err(e) = self.ports.store.save(&ws) {
            let _ = self.ports.containers.remove(&ws).await;
            return Err(e);
        }
        crate::failpoint::hit("fork-saved");
        if let Err(e) = self.ports.containers.fork_done(&ws).await {
            tracing::warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                           "Cannot mark the fork {} done (a restart would finish it): {e}", ws.name);
        }
        {
            let mut reg = self.reg();
            reg.by_id
                .insert(ws.id.clone(), Entry::new(ws.clone(), &self.shutdown));
            reservation.commit(&mut reg);
        }
        info!(message_id = crate::core::messages::WORKSPACE_CREATED, workspace_id = %ws.id,
              workspace_name = %ws.name, workspace_type = ws.workspace_type.as_str(),
              workspace_path = %ws.path.display(),
              "Forked workspace {} from {}{} in {:.3} s", ws.name, src.name,
              if snapshot.is_empty() { String::new() } else { format!("'s snapshot {snapshot}") },
              started.elapsed().as_secs_f64());
        self.ports.events.emit(Event::Added { id: ws.id.clone() });
        Ok(ws)
    }

    /// The bytes of a container workspace's own writable layer (0 for a host workspace), as
    /// measured at most `USAGE_FRESH` ago: a listing of every workspace reads it for each, and
    /// measuring walks the layer.
    pub async fn disk_usage(&self, key: &str) -> Result<u64> {
        let ws = self.get(key)?;
        if !ws.is_container() || !matches!(ws.status, Status::Ready | Status::Paused) {
            return Ok(0);
        }
        let cached = self.usage().get(&ws.id).copied();
        if let Some((at, bytes)) = cached
            && at.elapsed() < USAGE_FRESH
        {
            return Ok(bytes);
        }
        let bytes = self.ports.containers.disk_usage(&ws).await?;
        let mut usage = self.usage();
        if usage.len() > 4096 {
            usage.retain(|_, (at, _)| at.elapsed() < USAGE_FRESH);
        }
        usage.insert(ws.id, (std::time::Instant::now(), bytes));
        Ok(bytes)
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, HashMap<String, (std::time::Instant, u64)>> {
        self.disk_usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
