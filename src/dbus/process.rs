//! Background processes on the bus: `StartProcess` and `ListProcesses` (on the manager and on
//! each workspace), and one object per process below its workspace
//! (`.../workspace/<id>/process/<n>`, interface `org.agent.Workspaces.Process`). Every call
//! on a process is authorized as running commands in its workspace.

use std::time::Duration;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{OwnedObjectPath, interface};

use super::args::{self, Dict};
use super::context::Context;
use super::error::{Answer as Result, Result as CoreResult};
use super::objects::workspace_path;
use crate::core::manager::ProcessInfo;
use crate::core::ports::WindowSize;

/// `(id, command, running, exit_code)`, as `ListProcesses` answers.
pub type ProcessEntry = (String, String, bool, i32);

/// `<workspace path>/process/<n>`.
pub fn process_path(workspace_id: &str, process: u32) -> OwnedObjectPath {
    let path = format!(
        "{}/process/{process}",
        workspace_path(workspace_id).as_str()
    );
    OwnedObjectPath::try_from(path).unwrap_or_else(|_| workspace_path(workspace_id))
}

/// The longest `Wait`.
const MAX_WAIT_SECS: u32 = 3600;

impl Context {
    pub async fn start_process(
        &self,
        header: &Header<'_>,
        key: &str,
        command: String,
        options: Dict,
    ) -> CoreResult<OwnedObjectPath> {
        let o = args::process_options(options)?;
        let id = self
            .authorize_exec(header, key, "start a process in")
            .await?;
        let n = self
            .manager
            .start_process(&id, command, o.env, o.cwd, o.terminal)
            .await?;
        // The object is on the bus before the caller has its path.
        self.events.flush().await;
        Ok(process_path(&id, n))
    }

    pub async fn connect_port(
        &self,
        header: &Header<'_>,
        key: &str,
        port: u16,
    ) -> CoreResult<zbus::OwnedFd> {
        let id = self
            .authorize_exec(header, key, "connect to a port of")
            .await?;
        let fd = self.manager.connect_port(&id, port).await?;
        Ok(zbus::OwnedFd::from(fd))
    }

    pub async fn list_processes(
        &self,
        header: &Header<'_>,
        key: &str,
    ) -> CoreResult<Vec<ProcessEntry>> {
        let id = self
            .authorize_exec(header, key, "list the processes of")
            .await?;
        Ok(self
            .manager
            .list_processes(&id)?
            .into_iter()
            .map(|p| (p.id.to_string(), p.command, p.running, p.exit_code))
            .collect())
    }
}

pub struct ProcessObject {
    workspace_id: String,
    process: u32,
    ctx: Context,
}

impl ProcessObject {
    pub fn new(workspace_id: String, process: u32, ctx: Context) -> Self {
        Self {
            workspace_id,
            process,
            ctx,
        }
    }

    fn info(&self) -> zbus::fdo::Result<ProcessInfo> {
        self.ctx
            .manager
            .process_info(&self.workspace_id, self.process)
            .map_err(|e| zbus::fdo::Error::UnknownObject(e.to_string()))
    }

    async fn authorize(&self, header: &Header<'_>, verb: &str) -> CoreResult<()> {
        self.ctx
            .authorize_exec(header, &self.workspace_id, verb)
            .await
            .map(drop)
    }
}

#[interface(name = "org.agent.Workspaces.Process", introspection_docs = false)]
impl ProcessObject {
    /// Output (stdout and stderr, interleaved as written) from `offset`: the bytes, the offset
    /// after them (past any output dropped from the kept megabyte), and whether the process has
    /// ended and all its output is read.
    #[zbus(out_args("data", "next_offset", "ended"))]
    async fn read_output(
        &self,
        #[zbus(header)] header: Header<'_>,
        offset: u64,
        max_bytes: u32,
    ) -> Result<(Vec<u8>, u64, bool)> {
        self.ctx
            .answer(async {
                self.authorize(&header, "read the output of a process in")
                    .await?;
                self.ctx
                    .manager
                    .read_output(&self.workspace_id, self.process, offset, max_bytes)
            })
            .await
    }

    /// Sets the size of the process's terminal (`InvalidArgs` for a process without one).
    async fn resize(&self, #[zbus(header)] header: Header<'_>, cols: u16, rows: u16) -> Result<()> {
        self.ctx
            .answer(async {
                self.authorize(&header, "resize the terminal of a process in")
                    .await?;
                self.ctx.manager.resize_process(
                    &self.workspace_id,
                    self.process,
                    WindowSize { cols, rows },
                )
            })
            .await
    }

    /// Attaches the caller to the process's terminal: a socket carrying the terminal's output
    /// (what is kept so far, then as it comes; end of file once the process has ended), and
    /// taking what the caller types.
    #[zbus(out_args("pty"))]
    async fn open_pty(&self, #[zbus(header)] header: Header<'_>) -> Result<zbus::OwnedFd> {
        self.ctx
            .answer(async {
                self.authorize(&header, "open the terminal of a process in")
                    .await?;
                self.ctx.manager.wake(&self.workspace_id).await?;
                let fd = self
                    .ctx
                    .manager
                    .open_pty(&self.workspace_id, self.process)?;
                Ok(zbus::OwnedFd::from(fd))
            })
            .await
    }

    /// Writes to the process's stdin; an empty array closes it (on a terminal: types Ctrl-D).
    async fn write_input(&self, #[zbus(header)] header: Header<'_>, data: Vec<u8>) -> Result<()> {
        self.ctx
            .answer(async {
                self.authorize(&header, "write to a process in").await?;
                self.ctx.manager.wake(&self.workspace_id).await?;
                self.ctx
                    .manager
                    .write_input(&self.workspace_id, self.process, &data)
                    .await
            })
            .await
    }

    /// Sends a signal to every process of its tree.
    async fn signal(&self, #[zbus(header)] header: Header<'_>, signal: i32) -> Result<()> {
        self.ctx
            .answer(async {
                self.authorize(&header, "signal a process in").await?;
                self.ctx.manager.wake(&self.workspace_id).await?;
                self.ctx
                    .manager
                    .signal_process(&self.workspace_id, self.process, signal)
            })
            .await
    }

    /// Waits up to `timeout_secs` (at most 3600) for the process to end.
    #[zbus(out_args("exit_code", "timed_out"))]
    async fn wait(
        &self,
        #[zbus(header)] header: Header<'_>,
        timeout_secs: u32,
    ) -> Result<(i32, bool)> {
        self.ctx
            .answer(async {
                self.authorize(&header, "wait for a process in").await?;
                if timeout_secs > MAX_WAIT_SECS {
                    return Err(crate::core::Error::invalid(
                        "timeout_secs",
                        format!("at most {MAX_WAIT_SECS}"),
                    ));
                }
                self.ctx
                    .manager
                    .wait_process(
                        &self.workspace_id,
                        self.process,
                        Duration::from_secs(timeout_secs.into()),
                    )
                    .await
            })
            .await
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn id(&self) -> String {
        self.process.to_string()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn command(&self) -> zbus::fdo::Result<String> {
        Ok(self.info()?.command)
    }

    #[zbus(property)]
    async fn running(&self) -> zbus::fdo::Result<bool> {
        Ok(self.info()?.running)
    }

    #[zbus(property)]
    async fn exit_code(&self) -> zbus::fdo::Result<i32> {
        Ok(self.info()?.exit_code)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn started_at(&self) -> zbus::fdo::Result<u64> {
        Ok(self.info()?.started_at_usec)
    }

    #[zbus(property)]
    async fn ended_at(&self) -> zbus::fdo::Result<u64> {
        Ok(self.info()?.ended_at_usec)
    }

    /// Whether it runs on a pseudo-terminal.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn pty(&self) -> zbus::fdo::Result<bool> {
        Ok(self.info()?.pty)
    }

    #[zbus(signal)]
    pub async fn process_exited(emitter: &SignalEmitter<'_>, exit_code: i32) -> zbus::Result<()>;
}
