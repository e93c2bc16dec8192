//! Commands: a place among `max_concurrent`, the environment, the run under the workspace's
//! cancellation (destroy and shutdown end them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{info, warn};

use crate::core::error::{Error, Result};
use crate::core::messages;
use crate::core::ports::{Containers, ExecOutcome, ExecRequest, Executor};
use crate::core::spec::{ExecLimits, ExecParams};
use crate::core::workspace::{Status, Workspace};

use super::*;

/// The environment every command starts from, before the workspace's and the call's variables.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of a command: a minimal base, then the workspace's variables, then the
/// call's (later wins).
pub fn command_env(ws: &Workspace, call: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), BASE_PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    env.extend(ws.env_vars.clone());
    env.extend(call);
    env
}

/// The directory a command starts in: the workspace's (`/workspace` in a container), or `cwd`
/// below it.
pub(super) fn command_cwd(ws: &Workspace, cwd: Option<String>) -> PathBuf {
    let workdir = if ws.is_container() {
        PathBuf::from(CONTAINER_WORKDIR)
    } else {
        ws.path.clone()
    };
    match cwd {
        None => workdir,
        Some(c) => workdir.join(c),
    }
}

/// Runs a resolved command where its workspace lives: in its container, or on the host.
pub(super) async fn run_command(
    containers: &Arc<dyn Containers>,
    executor: &Arc<dyn Executor>,
    ws: &Workspace,
    request: ExecRequest,
    cancel: CancellationToken,
) -> Result<ExecOutcome> {
    if ws.is_container() {
        containers.exec(ws, request, cancel).await
    } else {
        executor.run(request, cancel).await
    }
}

/// See `Manager::ready_for_command`.
pub(super) struct CommandPlace {
    pub ws: Workspace,
    /// Held while the command (or a background process's tasks, once spawned) may run.
    pub running: TaskTrackerToken,
    /// Where a background process's tasks are spawned.
    pub tracker: TaskTracker,
    /// Fires on destroy and shutdown.
    pub cancel: CancellationToken,
    /// Fires on destroy (and on shutdown where processes are not kept).
    pub end_processes: CancellationToken,
}

/// A running command's place among the `max_concurrent`.
pub(super) struct ExecSlot<'a>(&'a Manager);
impl Drop for ExecSlot<'_> {
    fn drop(&mut self) {
        self.0.execs_running.fetch_sub(1, Ordering::SeqCst);
        self.0.exec_slot_freed.notify_waiters();
    }
}

impl Manager {
    /// A place for one more command in a ready workspace (`NotReady` otherwise), counted
    /// among its running commands from the moment it was looked up, under the registry lock:
    /// a destroy waits for it.
    pub(super) fn ready_for_command(&self, key: &str) -> Result<CommandPlace> {
        let reg = self.reg();
        let e = reg.resolve(key)?;
        // A paused workspace is resumed by `wake` before its place is asked for; one paused
        // again in between runs the command once it is resumed.
        if !matches!(e.ws.status, Status::Ready | Status::Paused) {
            return Err(Error::NotReady {
                workspace: e.ws.name.clone(),
                status: e.ws.status.to_string(),
            });
        }
        e.used(Some(tokio::time::Instant::now()));
        Ok(CommandPlace {
            ws: e.ws.clone(),
            running: e.execs.token(),
            tracker: e.execs.clone(),
            cancel: e.cancel.child_token(),
            end_processes: e.processes.child_token(),
        })
    }

    /// Runs a command in a workspace. `caller_gone` fires when the caller disconnects; the
    /// command is then killed.
    pub async fn exec(
        &self,
        key: &str,
        params: ExecParams,
        caller_gone: CancellationToken,
    ) -> Result<ExecOutcome> {
        let limits = self.limits().exec;
        let timeout_secs = params.validate(&limits)?;
        self.wake(key).await?;
        let CommandPlace {
            ws,
            running: _running,
            cancel,
            ..
        } = self.ready_for_command(key)?;
        let _slot = self.exec_slot(&ws.name, &limits, &caller_gone).await?;
        let request = ExecRequest {
            workspace_id: ws.id.clone(),
            command: params.command,
            env: command_env(&ws, params.env),
            cwd: command_cwd(&ws, params.cwd),
            io: params.io,
            timeout: Duration::from_secs(timeout_secs.into()),
            output_cap: limits.max_output_bytes,
            signals: None,
            terminal: false,
            keep: None,
        };
        let run = run_command(
            &self.ports.containers,
            &self.ports.executor,
            &ws,
            request,
            cancel.clone(),
        );
        tokio::pin!(run);
        let outcome = tokio::select! {
            r = &mut run => r,
            () = caller_gone.cancelled() => { cancel.cancel(); run.await }
        }?;
        if cancel.is_cancelled() && !outcome.timed_out {
            let why = if caller_gone.is_cancelled() {
                "the caller disconnected"
            } else if self.shutdown.is_cancelled() {
                "the service is stopping"
            } else {
                "the workspace is being destroyed"
            };
            warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                  "Command in workspace {} was killed: {why}", ws.name);
            return Err(Error::JobFailed(format!(
                "Command in workspace '{}' was killed: {why}",
                ws.name
            )));
        }
        // Logged just after the answer goes out (the task runs when this one next yields):
        // a journal entry costs more than the rest of the answer, and the caller need not
        // wait for it.
        let (exit_code, timed_out, duration) =
            (outcome.exit_code, outcome.timed_out, outcome.duration);
        let (id, name) = (ws.id.clone(), ws.name.clone());
        tokio::spawn(async move {
            info!(message_id = messages::EXEC_FINISHED, workspace_id = %id,
                  workspace_name = %name, exit_code, timed_out,
                  duration_usec = duration.as_micros() as u64,
                  "Command in workspace {name} finished: exit code {exit_code}{} after {:.3}s",
                  if timed_out { " (timed out)" } else { "" },
                  duration.as_secs_f64());
        });
        Ok(outcome)
    }

    /// A TCP connection to `port` inside the workspace (the host's loopback for a host
    /// workspace, the container's for a container), for a caller to talk to what listens
    /// there: a dev server, a browser's DevTools.
    pub async fn connect_port(&self, key: &str, port: u16) -> Result<std::os::fd::OwnedFd> {
        if port == 0 {
            return Err(Error::invalid("port", "must be 1 to 65535"));
        }
        self.wake(key).await?;
        let CommandPlace {
            ws,
            running: _running,
            ..
        } = self.ready_for_command(key)?;
        if ws.is_container() {
            self.ports.containers.connect_port(&ws, port).await
        } else {
            self.ports.executor.connect_port(port).await
        }
    }

    /// A place for one more command: at once while fewer than `max_concurrent` run; else it
    /// waits, up to `queue_timeout_secs`, for one to end (or the caller to leave), and then
    /// it is `LimitsExceeded`.
    pub(super) async fn exec_slot(
        &self,
        workspace: &str,
        limits: &ExecLimits,
        caller_gone: &CancellationToken,
    ) -> Result<ExecSlot<'_>> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(limits.queue_timeout_secs.into());
        loop {
            // Registered before the count is looked at, so an end in between is not missed.
            let freed = self.exec_slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.execs_running.fetch_add(1, Ordering::SeqCst) < limits.max_concurrent {
                return Ok(ExecSlot(self));
            }
            self.execs_running.fetch_sub(1, Ordering::SeqCst);
            tokio::select! {
                () = &mut freed => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Error::LimitsExceeded(format!(
                        "Too many ongoing operations: cannot run a command in workspace '{workspace}': {} commands are running (max_concurrent), and none ended within {} s (queue_timeout_secs)",
                        limits.max_concurrent, limits.queue_timeout_secs
                    )));
                }
                () = caller_gone.cancelled() => {
                    return Err(Error::JobFailed(format!(
                        "Command in workspace '{workspace}' was not run: the caller disconnected while it waited for a place"
                    )));
                }
                () = self.shutdown.cancelled() => {
                    return Err(Error::JobFailed(format!(
                        "Command in workspace '{workspace}' was not run: the service is stopping"
                    )));
                }
            }
        }
    }

    /// Commands running now, in every workspace.
    pub fn running_execs(&self) -> usize {
        self.execs_running.load(Ordering::SeqCst)
    }
}
