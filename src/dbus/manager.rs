//! The manager object `/org/agent/Workspaces`, interface `org.agent.Workspaces`. Methods that
//! take `s workspace` accept the id or the name, and run the same code as the per-workspace
//! object's method.

use std::collections::HashMap;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{OwnedObjectPath, OwnedVariant, interface};

use super::args::Dict;
use super::context::Context;
use super::error::{Answer as Result, ForCaller};
use super::files::EntryTuple;
use super::process::ProcessEntry;
use crate::core::files::FileOp;

pub const BUS_NAME: &str = "org.agent.Workspaces";
pub const MANAGER_PATH: &str = "/org/agent/Workspaces";

pub struct ManagerObject {
    ctx: Context,
}

impl ManagerObject {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

#[interface(name = "org.agent.Workspaces", introspection_docs = false)]
impl ManagerObject {
    #[zbus(out_args("path"))]
    async fn create_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        spec: Dict,
    ) -> Result<OwnedObjectPath> {
        self.ctx.create(&header, spec).await.for_caller(&self.ctx)
    }

    #[zbus(out_args("workspaces"))]
    async fn list_workspaces(&self) -> Vec<(String, String, String, String, OwnedObjectPath)> {
        self.ctx.list()
    }

    #[zbus(out_args("path"))]
    async fn get_workspace(&self, workspace: &str) -> Result<OwnedObjectPath> {
        self.ctx.get(workspace).for_caller(&self.ctx)
    }

    async fn update_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        changes: Dict,
    ) -> Result<()> {
        self.ctx
            .update(&header, workspace, changes)
            .await
            .for_caller(&self.ctx)
    }

    async fn destroy_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .destroy(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("exit_code", "stdout", "stderr", "timed_out", "info"))]
    async fn exec(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        command: String,
        options: Dict,
    ) -> Result<(i32, Vec<u8>, Vec<u8>, bool, HashMap<String, OwnedVariant>)> {
        self.ctx
            .exec(&header, workspace, command, options)
            .await
            .for_caller(&self.ctx)
    }

    /// `Exec` with the caller's own descriptors as the command's stdin, stdout and stderr:
    /// output reaches the caller as it is produced, and nothing is collected.
    #[zbus(out_args("exit_code", "timed_out", "info"))]
    #[allow(clippy::too_many_arguments)]
    async fn exec_with_fds(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        command: String,
        stdin: zbus::OwnedFd,
        stdout: zbus::OwnedFd,
        stderr: zbus::OwnedFd,
        options: Dict,
    ) -> Result<(i32, bool, HashMap<String, OwnedVariant>)> {
        self.ctx
            .exec_with_fds(&header, workspace, command, stdin, stdout, stderr, options)
            .await
            .for_caller(&self.ctx)
    }

    /// Starts a command that outlives the call; its object's path.
    #[zbus(out_args("process"))]
    async fn start_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        command: String,
        options: Dict,
    ) -> Result<OwnedObjectPath> {
        self.ctx
            .start_process(&header, workspace, command, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("processes"))]
    async fn list_processes(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<Vec<ProcessEntry>> {
        self.ctx
            .list_processes(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    /// A TCP connection to a port inside the workspace.
    #[zbus(out_args("connection"))]
    async fn connect_port(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        port: u16,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .connect_port(&header, workspace, port)
            .await
            .for_caller(&self.ctx)
    }

    /// A file's content, from `offset` for `length` bytes (options), on a pipe the caller
    /// reads.
    #[zbus(out_args("content"))]
    async fn read_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        options: Dict,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .stream_out(&header, workspace, FileOp::Read, path, options)
            .await
            .for_caller(&self.ctx)
    }

    /// Writes a file from the caller's descriptor, whole or not at all.
    async fn write_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        content: zbus::OwnedFd,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .content_in(&header, workspace, FileOp::Write, (path, content), options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("entries", "truncated"))]
    async fn list_directory(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        options: Dict,
    ) -> Result<(Vec<EntryTuple>, bool)> {
        self.ctx
            .list_directory(&header, workspace, path, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("entry"))]
    async fn stat_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        options: Dict,
    ) -> Result<EntryTuple> {
        self.ctx
            .stat_file(&header, workspace, path, options)
            .await
            .for_caller(&self.ctx)
    }

    async fn make_directory(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .answer(async {
                let op = FileOp::MakeDirectory;
                self.ctx
                    .change_files(&header, workspace, op, (path, None), options)
                    .await
            })
            .await
    }

    async fn remove_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .answer(async {
                let op = FileOp::Remove;
                self.ctx
                    .change_files(&header, workspace, op, (path, None), options)
                    .await
            })
            .await
    }

    async fn move_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        from: &str,
        to: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .answer(async {
                let op = FileOp::Move;
                self.ctx
                    .change_files(&header, workspace, op, (from, Some(to)), options)
                    .await
            })
            .await
    }

    /// A directory (or a file) as a tar stream the caller reads.
    #[zbus(out_args("archive"))]
    async fn download(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        options: Dict,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .stream_out(&header, workspace, FileOp::Download, path, options)
            .await
            .for_caller(&self.ctx)
    }

    /// A tar stream from the caller's descriptor, unpacked into the directory `path`.
    async fn upload(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        archive: zbus::OwnedFd,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .content_in(&header, workspace, FileOp::Upload, (path, archive), options)
            .await
            .for_caller(&self.ctx)
    }

    /// Changes below `path`, as lines of JSON on a pipe, until the caller closes it.
    #[zbus(out_args("events"))]
    async fn watch_files(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        path: &str,
        options: Dict,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .stream_out(&header, workspace, FileOp::Watch, path, options)
            .await
            .for_caller(&self.ctx)
    }

    async fn build_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .build(&header, workspace, false)
            .await
            .for_caller(&self.ctx)
    }

    async fn rebuild_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .build(&header, workspace, true)
            .await
            .for_caller(&self.ctx)
    }

    async fn start_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .start(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    async fn stop_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .stop(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    async fn snapshot_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        name: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .snapshot(&header, workspace, name, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("snapshots"))]
    async fn list_snapshots(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<Vec<(String, u64, u64)>> {
        self.ctx
            .list_snapshots(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    async fn delete_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        name: &str,
    ) -> Result<()> {
        self.ctx
            .delete_snapshot(&header, workspace, name)
            .await
            .for_caller(&self.ctx)
    }

    async fn restore_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        snapshot: &str,
    ) -> Result<()> {
        self.ctx
            .restore(&header, workspace, snapshot)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("workspace"))]
    async fn fork_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        source: &str,
        snapshot: &str,
        spec: Dict,
    ) -> Result<OwnedObjectPath> {
        self.ctx
            .fork(&header, source, snapshot, spec)
            .await
            .for_caller(&self.ctx)
    }

    async fn pause_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .pause(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    async fn resume_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .resume(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("content", "total_lines"))]
    async fn get_init_log(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        max_lines: u32,
    ) -> Result<(String, u32)> {
        self.ctx
            .init_log(&header, workspace, max_lines)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("info"))]
    async fn get_debug_info(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<HashMap<String, OwnedVariant>> {
        self.ctx
            .debug_info(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("exit_code", "stdout", "stderr", "timed_out", "info"))]
    async fn rerun_init(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
        options: Dict,
    ) -> Result<(i32, Vec<u8>, Vec<u8>, bool, HashMap<String, OwnedVariant>)> {
        self.ctx
            .rerun_init(&header, workspace, options)
            .await
            .for_caller(&self.ctx)
    }

    async fn sync_workspace(
        &self,
        #[zbus(header)] header: Header<'_>,
        workspace: &str,
    ) -> Result<()> {
        self.ctx
            .sync(&header, workspace)
            .await
            .for_caller(&self.ctx)
    }

    /// The Library's skills and tools, by name (what `skills` and `tools` may name).
    #[zbus(out_args("skills", "tools"))]
    async fn list_library(&self) -> Result<(Vec<String>, Vec<String>)> {
        self.ctx.list_library().await.for_caller(&self.ctx)
    }

    #[zbus(out_args("templates"))]
    async fn list_templates(&self) -> Result<Vec<(String, String, String)>> {
        self.ctx.list_templates().await.for_caller(&self.ctx)
    }

    #[zbus(out_args("template"))]
    async fn get_template(&self, name: &str) -> Result<HashMap<String, OwnedVariant>> {
        self.ctx.get_template(name).await.for_caller(&self.ctx)
    }

    /// Whether the caller's errors carry their data after the message (the key of an
    /// `InvalidArgs`, say) from now on, until it leaves the bus. Without, an error's body is
    /// its message alone, which every client library reads.
    async fn set_error_data(&self, #[zbus(header)] header: Header<'_>, enable: bool) -> Result<()> {
        self.ctx
            .answer(self.ctx.set_error_data(&header, enable))
            .await
    }

    #[zbus(property)]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    #[zbus(signal)]
    pub async fn workspace_new(
        emitter: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn workspace_removed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
    ) -> zbus::Result<()>;
}
