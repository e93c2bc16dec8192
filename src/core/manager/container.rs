//! A container's own verbs: build and rebuild (run in the background, one at a time per
//! workspace), the init script, start and stop, the init log and the debug report.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::core::error::{Error, Result};
use crate::core::ports::{Event, ExecOutcome};
use crate::core::workspace::{Field, Status, Workspace};

use super::*;

impl Manager {
    /// The workspace, if it is a container; `NotSupported` for host workspaces.
    pub fn container(&self, key: &str, verb: &str) -> Result<Workspace> {
        let ws = self.get(key)?;
        if !ws.is_container() {
            return Err(Error::NotSupported(format!(
                "Cannot {verb} workspace '{}': it is a host workspace, and only container workspaces support {verb}",
                ws.name
            )));
        }
        Ok(ws)
    }

    pub(super) fn ready_container(&self, key: &str, verb: &str) -> Result<Workspace> {
        let ws = self.container(key, verb)?;
        if ws.status != Status::Ready {
            return Err(Error::NotReady {
                workspace: ws.name,
                status: ws.status.to_string(),
            });
        }
        Ok(ws)
    }

    /// Starts building a container workspace (`rebuild`: also when it is ready) and returns
    /// once the build has started. `Busy` while a build runs.
    pub async fn build(self: &Arc<Self>, key: &str, rebuild: bool) -> Result<()> {
        let verb = if rebuild { "rebuild" } else { "build" };
        let ws = self.container(key, verb)?;
        let (id, ops) = self.ops_lock(&ws.id)?;
        let _op = ops.lock().await;
        let limits = self.limits();
        let (ws, tracker) = {
            let mut reg = self.reg();
            let building = reg
                .by_id
                .values()
                .filter(|e| e.ws.status == Status::Building)
                .count();
            let e = reg
                .by_id
                .get_mut(&id)
                .ok_or_else(|| Error::NoSuchWorkspace(key.to_owned()))?;
            match e.ws.status {
                Status::Building => {
                    return Err(Error::Busy(format!(
                        "Workspace '{}' is already building",
                        e.ws.name
                    )));
                }
                Status::Destroying => {
                    return Err(Error::NotReady {
                        workspace: e.ws.name.clone(),
                        status: e.ws.status.to_string(),
                    });
                }
                Status::Ready if !rebuild => return Ok(()),
                _ => {}
            }
            if building >= limits.builds.max_concurrent {
                return Err(Error::LimitsExceeded(format!(
                    "Too many ongoing operations: cannot build workspace '{}', {building} builds are running (max_concurrent_builds)",
                    e.ws.name
                )));
            }
            e.ws.status = Status::Building;
            e.ws.error_message.clear();
            (e.ws.clone(), e.execs.clone())
        };
        self.ports.store.save(&ws)?;
        self.ports.events.emit(Event::Changed {
            id: id.clone(),
            fields: vec![Field::Status, Field::ErrorMessage],
        });
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Building container workspace {} ({})", ws.name,
              ws.distro.map(|d| d.as_str()).unwrap_or("?"));
        let this = self.clone();
        tracker.spawn(async move { this.run_build(ws).await });
        Ok(())
    }

    pub(super) async fn run_build(&self, ws: Workspace) {
        self.run_build_from(ws, false).await
    }

    pub(super) async fn run_build_from(&self, ws: Workspace, resumed: bool) {
        let limits = self.limits();
        let containers = &self.ports.containers;
        let (steps, mut reached) = tokio::sync::mpsc::unbounded_channel::<String>();
        let result = async {
            if resumed {
                containers.wait_build(&ws).await?;
            } else {
                containers.stop(&ws).await?;
                // The build unit's steps become BuildStep as they come.
                let build = containers.build_tree(&ws, steps);
                tokio::pin!(build);
                loop {
                    tokio::select! {
                        r = &mut build => break r?,
                        Some(step) = reached.recv() => self.set_build_step(&ws.id, &step),
                    }
                }
            }
            self.set_build_step(&ws.id, "skills");
            self.install_library(&ws).await?;
            self.set_build_step(&ws.id, "start");
            containers.start(&ws).await?;
            if !ws.init_script.is_empty() {
                self.set_build_step(&ws.id, "init");
                self.init(
                    &ws,
                    Duration::from_secs(limits.builds.init_timeout_secs.into()),
                )
                .await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.finish_build(&ws.id, Status::Ready, "");
                // A rebuild starts from the base: the snapshots went with the old layers.
                self.snapshots_changed(&ws.id);
                info!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Container workspace {} is ready", ws.name);
            }
            Err(e) => {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Build of container workspace {} failed: {e}", ws.name);
                containers
                    .append_log(&ws, &format!("== build failed: {e}"))
                    .await;
                self.finish_build(&ws.id, Status::Error, &e.to_string());
            }
        }
    }

    /// Ends a build: only a workspace still `building` changes (a destroy may have begun).
    pub(super) fn finish_build(&self, id: &str, status: Status, message: &str) {
        self.set_status(id, status, message, Some(Status::Building));
    }

    /// Where the build of a workspace still `building` is: kept in the registry (not worth a
    /// disk write) and announced.
    pub(super) fn set_build_step(&self, id: &str, step: &str) {
        {
            let mut reg = self.reg();
            let Some(e) = reg.by_id.get_mut(id) else {
                return;
            };
            if e.ws.status != Status::Building || e.ws.build_step == step {
                return;
            }
            e.ws.build_step = step.to_owned();
        }
        self.ports.events.emit(Event::Changed {
            id: id.to_owned(),
            fields: vec![Field::BuildStep],
        });
    }

    pub(super) fn builds_running(&self) -> usize {
        self.reg()
            .by_id
            .values()
            .filter(|e| e.ws.status == Status::Building)
            .count()
    }

    /// Runs the init script; a failure is an error naming the exit code and the log.
    pub(super) async fn init(&self, ws: &Workspace, timeout: Duration) -> Result<ExecOutcome> {
        let outcome = self
            .ports
            .containers
            .run_init(ws, timeout, self.shutdown.child_token())
            .await?;
        if outcome.timed_out {
            return Err(Error::JobFailed(format!(
                "The init script of workspace '{}' timed out after {} s; see the init log",
                ws.name,
                timeout.as_secs()
            )));
        }
        if outcome.exit_code != 0 {
            return Err(Error::JobFailed(format!(
                "The init script of workspace '{}' failed with exit code {}; see the init log",
                ws.name, outcome.exit_code
            )));
        }
        Ok(outcome)
    }

    /// Runs the init script again in the ready container, like `exec`; never changes the
    /// workspace's status.
    pub async fn rerun_init(&self, key: &str, timeout_secs: Option<u32>) -> Result<ExecOutcome> {
        self.container(key, "rerun the init script of")?;
        self.wake(key).await?;
        let ws = self.get(key)?;
        if ws.status != Status::Ready {
            return Err(Error::NotReady {
                workspace: ws.name,
                status: ws.status.to_string(),
            });
        }
        let limits = self.limits();
        let limits = limits.builds;
        let timeout = timeout_secs.unwrap_or(limits.init_timeout_secs);
        if timeout == 0 || timeout > limits.init_timeout_secs {
            return Err(Error::invalid(
                "timeout_secs",
                format!(
                    "{timeout} is out of range: 1 to {} seconds (init_timeout_secs)",
                    limits.init_timeout_secs
                ),
            ));
        }
        self.ports
            .containers
            .run_init(
                &ws,
                Duration::from_secs(timeout.into()),
                self.shutdown.child_token(),
            )
            .await
    }

    /// Starts the container (a paused one is resumed).
    pub async fn start(&self, key: &str) -> Result<()> {
        self.container(key, "start")?;
        self.wake(key).await?;
        let ws = self.ready_container(key, "start")?;
        self.ports.containers.start(&ws).await?;
        self.mark_used(&ws.id, true);
        Ok(())
    }

    /// The workspace's container was started (`true`: idle from now) or stopped.
    pub(super) fn mark_used(&self, id: &str, running: bool) {
        if let Some(e) = self.reg().by_id.get(id) {
            e.used(running.then(tokio::time::Instant::now));
        }
    }

    /// Stops the container (a paused one is resumed first: it stops `ready`).
    pub async fn stop(&self, key: &str) -> Result<()> {
        self.container(key, "stop")?;
        self.wake(key).await?;
        let ws = self.ready_container(key, "stop")?;
        self.ports.containers.stop(&ws).await?;
        self.mark_used(&ws.id, false);
        Ok(())
    }

    pub async fn init_log(&self, key: &str, max_lines: u32) -> Result<(String, u32)> {
        let ws = self.container(key, "read the init log of")?;
        self.ports.containers.init_log(&ws, max_lines).await
    }

    /// The debug report of a container workspace: its record's state plus what the system says.
    pub async fn debug_info(&self, key: &str) -> Result<crate::core::ports::DebugInfo> {
        use crate::core::ports::DebugValue::{Str, U64};
        let ws = self.container(key, "read debug info of")?;
        let mut info = self.ports.containers.debug_info(&ws).await?;
        info.insert("status".into(), Str(ws.status.as_str().into()));
        info.insert("error_message".into(), Str(ws.error_message.clone()));
        info.insert("network".into(), Str(ws.network.as_str().into()));
        info.insert(
            "distro".into(),
            Str(ws.distro.map(|d| d.as_str()).unwrap_or_default().into()),
        );
        info.insert("created_at_usec".into(), U64(ws.created_at_usec));
        Ok(info)
    }
}
