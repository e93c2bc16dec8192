//! Paused workspaces: a container's processes frozen by the cgroup freezer (their memory kept,
//! no CPU), `paused` until `ResumeWorkspace` or the next use of the workspace (a command, a
//! background process, a terminal, a file call, a port connection) thaws them.

use tracing::info;

use crate::core::error::{Error, Result};
use crate::core::workspace::Status;

use super::*;

impl Manager {
    /// Freezes a running container workspace: `paused`. A paused one stays so.
    pub async fn pause(&self, key: &str) -> Result<()> {
        let ws = self.container(key, "pause")?;
        let (id, ops) = self.ops_lock(&ws.id)?;
        let _op = ops.lock().await;
        let ws = self.get(&id)?;
        match ws.status {
            Status::Paused => return Ok(()),
            Status::Ready => {}
            status => {
                return Err(Error::NotReady {
                    workspace: ws.name,
                    status: status.to_string(),
                });
            }
        }
        self.ports.containers.freeze(&ws, true).await?;
        self.set_status(&id, Status::Paused, "", Some(Status::Ready));
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Paused workspace {}", ws.name);
        Ok(())
    }

    /// Thaws a paused container workspace: `ready`. One that is not paused stays as it is.
    pub async fn resume(&self, key: &str) -> Result<()> {
        let ws = self.container(key, "resume")?;
        self.wake(&ws.id).await
    }

    /// Resumes the workspace if it is paused, before it is used. Never called while holding a
    /// place among its commands (a destroy holds the operation lock while it waits for them).
    pub(super) async fn wake(&self, key: &str) -> Result<()> {
        if self.get(key)?.status != Status::Paused {
            return Ok(());
        }
        let (id, ops) = self.ops_lock(key)?;
        let _op = ops.lock().await;
        let ws = self.get(&id)?;
        if ws.status != Status::Paused {
            return Ok(());
        }
        self.ports.containers.freeze(&ws, false).await?;
        self.set_status(&id, Status::Ready, "", Some(Status::Paused));
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Resumed workspace {}", ws.name);
        Ok(())
    }

    /// At start-up: a workspace recorded `paused` whose container is not frozen any more (it
    /// stopped, the machine rebooted) is `ready`; a `ready` one found frozen (the service
    /// ended while it held it still for a snapshot) is thawed.
    pub(super) async fn reconcile_paused(&self) {
        let containers: Vec<_> = self
            .list()
            .into_iter()
            .filter(|w| w.is_container() && matches!(w.status, Status::Paused | Status::Ready))
            .collect();
        for ws in containers {
            let frozen = self.ports.containers.is_frozen(&ws).await.unwrap_or(false);
            match (ws.status, frozen) {
                (Status::Paused, false) => {
                    info!(workspace_id = %ws.id, workspace_name = %ws.name,
                          "Workspace {} was paused, and its container is not frozen any more: ready", ws.name);
                    self.set_status(&ws.id, Status::Ready, "", Some(Status::Paused));
                }
                (Status::Ready, true) => {
                    info!(workspace_id = %ws.id, workspace_name = %ws.name,
                          "Workspace {} is ready, and its container was left frozen: thawing it", ws.name);
                    if let Err(e) = self.ports.containers.freeze(&ws, false).await {
                        tracing::warn!(workspace_id = %ws.id, "Cannot thaw {}: {e}", ws.name);
                    }
                }
                _ => {}
            }
        }
    }
}
