//! Paused workspaces: a container's processes frozen by the cgroup freezer (their memory kept,
//! no CPU), `paused` until `ResumeWorkspace` or the next use of the workspace (a command, a
//! background process, a terminal, a file call, a port connection) thaws them. Idle ones
//! (none of those for `idle_pause_secs`, `idle_stop_secs`) are paused, or stopped, by
//! themselves, looked at once a second.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tracing::{info, warn};

use crate::core::error::{Error, Result};
use crate::core::workspace::Status;

use super::*;

/// What an idle workspace is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    Pause,
    Stop,
}

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

    /// Resumes the workspace if it is paused, before it is used (a command, a file call, a
    /// port connection; a process's terminal attached, typed into or signalled). Never called
    /// while holding a place among its commands (a destroy holds the operation lock while it
    /// waits for them). On every command's path: the common case is one registry look-up.
    pub async fn wake(&self, key: &str) -> Result<()> {
        if self.reg().resolve(key)?.ws.status != Status::Paused {
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

    /// At start-up, before serving (after `load`): a workspace recorded `paused` whose
    /// container is not frozen any more (it stopped, the machine rebooted) is `ready`; a
    /// `ready` one found frozen (the service ended while it held it still for a snapshot) is
    /// thawed. Before serving, so no command meets a container left frozen, and no pause made
    /// meanwhile is undone.
    pub async fn settle_frozen(&self) {
        let containers: Vec<_> = self
            .list()
            .into_iter()
            .filter(|w| w.is_container() && matches!(w.status, Status::Paused | Status::Ready))
            .collect();
        for ws in containers {
            let frozen = self.ports.containers.is_frozen(&ws).await.unwrap_or(false);
            // As it is now: the idle watch may have paused it meanwhile.
            let Ok(status) = self.get(&ws.id).map(|w| w.status) else {
                continue;
            };
            match (status, frozen) {
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

    /// Pauses or stops container workspaces idle for longer than their limits (or the
    /// service's defaults) allow, until the service stops. A workspace with a command or a
    /// background process running, or a port connection open, is in use: its idle time
    /// starts when the last one ends.
    pub async fn watch_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Workspaces found with a lent connection open: looked at each second (not only when
        // due), so their idle time starts within a second of the last one's close.
        let mut held: std::collections::HashSet<String> = std::collections::HashSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            for id in held.clone() {
                if !self.held_open(&id).await {
                    held.remove(&id);
                }
            }
            for (id, due) in self.idle_due(Instant::now()) {
                if self.held_open(&id).await {
                    held.insert(id);
                    continue;
                }
                let done = match due {
                    Idle::Pause => self.pause(&id).await,
                    Idle::Stop => self.stop(&id).await,
                };
                let ws = self.get(&id).map(|w| w.name).unwrap_or_default();
                let failed = done.is_err();
                match done {
                    Ok(()) => info!(workspace_id = %id, workspace_name = %ws,
                                    "Workspace {ws} was idle: {}",
                                    if due == Idle::Pause { "paused" } else { "stopped" }),
                    Err(e) => warn!(workspace_id = %id, workspace_name = %ws,
                                    "Workspace {ws} was idle, and could not be {}: {e}",
                                    if due == Idle::Pause { "paused" } else { "stopped" }),
                }
                // Stopped, or not running (a pause it refused): nothing to watch until it
                // is used again.
                if due == Idle::Stop || failed {
                    self.mark_used(&id, false);
                }
            }
        }
    }

    /// Whether a connection lent to a caller is still open (a use that goes on; not for a
    /// paused container: nothing goes through it until it is resumed); if so, marked used.
    async fn held_open(&self, id: &str) -> bool {
        let open = match self.get(id) {
            Ok(ws) if ws.status == Status::Ready => {
                self.ports.containers.lent_connections_open(&ws).await
            }
            _ => false,
        };
        if open {
            self.mark_used(id, true);
        }
        open
    }

    /// The workspaces due a pause or a stop at `now`; those in use are marked used.
    fn idle_due(&self, now: Instant) -> Vec<(String, Idle)> {
        let defaults = self.limits().idle;
        let reg = self.reg();
        reg.by_id
            .values()
            .filter(|e| e.ws.is_container())
            .filter_map(|e| {
                let pause = e.ws.limits.idle_pause_secs.unwrap_or(defaults.pause_secs);
                let stop = e.ws.limits.idle_stop_secs.unwrap_or(defaults.stop_secs);
                if pause == 0 && stop == 0 {
                    return None;
                }
                let last = e.last_used()?;
                if !e.execs.is_empty() {
                    e.used(Some(now));
                    return None;
                }
                let idle = now.saturating_duration_since(last);
                let after = |secs: u32| secs > 0 && idle >= Duration::from_secs(secs.into());
                match e.ws.status {
                    Status::Ready | Status::Paused if after(stop) => {
                        Some((e.ws.id.clone(), Idle::Stop))
                    }
                    Status::Ready if after(pause) => Some((e.ws.id.clone(), Idle::Pause)),
                    _ => None,
                }
            })
            .collect()
    }
}
