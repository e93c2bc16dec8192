//! One object per workspace, interface `org.agent.Workspaces.Workspace`: the manager's
//! methods without the workspace argument, and the workspace's public properties. Env var
//! values are never a property: only their names are.

use std::collections::HashMap;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{OwnedVariant, interface};

use super::args::Dict;
use super::context::Context;
use super::error::{Answer as Result, ForCaller};
use super::files::EntryTuple;
use crate::core::files::FileOp;
use crate::core::workspace::Workspace;

pub struct WorkspaceObject {
    id: String,
    ctx: Context,
}

impl WorkspaceObject {
    pub fn new(id: String, ctx: Context) -> Self {
        Self { id, ctx }
    }

    fn ws(&self) -> zbus::fdo::Result<Workspace> {
        self.ctx
            .manager
            .get(&self.id)
            .map_err(|e| zbus::fdo::Error::UnknownObject(e.to_string()))
    }
}

#[interface(name = "org.agent.Workspaces.Workspace", introspection_docs = false)]
impl WorkspaceObject {
    #[zbus(out_args("exit_code", "stdout", "stderr", "timed_out", "info"))]
    async fn exec(
        &self,
        #[zbus(header)] header: Header<'_>,
        command: String,
        options: Dict,
    ) -> Result<(i32, Vec<u8>, Vec<u8>, bool, HashMap<String, OwnedVariant>)> {
        self.ctx
            .exec(&header, &self.id, command, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("exit_code", "timed_out", "info"))]
    async fn exec_with_fds(
        &self,
        #[zbus(header)] header: Header<'_>,
        command: String,
        stdin: zbus::OwnedFd,
        stdout: zbus::OwnedFd,
        stderr: zbus::OwnedFd,
        options: Dict,
    ) -> Result<(i32, bool, HashMap<String, OwnedVariant>)> {
        self.ctx
            .exec_with_fds(&header, &self.id, command, stdin, stdout, stderr, options)
            .await
            .for_caller(&self.ctx)
    }

    /// A file's content, from `offset` for `length` bytes (options), on a pipe the caller
    /// reads.
    #[zbus(out_args("content"))]
    async fn read_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        options: Dict,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .stream_out(&header, &self.id, FileOp::Read, path, options)
            .await
            .for_caller(&self.ctx)
    }

    /// Writes a file from the caller's descriptor, whole or not at all.
    async fn write_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        content: zbus::OwnedFd,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .content_in(&header, &self.id, FileOp::Write, (path, content), options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("entries", "truncated"))]
    async fn list_directory(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        options: Dict,
    ) -> Result<(Vec<EntryTuple>, bool)> {
        self.ctx
            .list_directory(&header, &self.id, path, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("entry"))]
    async fn stat_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        options: Dict,
    ) -> Result<EntryTuple> {
        self.ctx
            .stat_file(&header, &self.id, path, options)
            .await
            .for_caller(&self.ctx)
    }

    async fn make_directory(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .answer(async {
                let op = FileOp::MakeDirectory;
                self.ctx
                    .change_files(&header, &self.id, op, (path, None), options)
                    .await
            })
            .await
    }

    async fn remove_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .answer(async {
                let op = FileOp::Remove;
                self.ctx
                    .change_files(&header, &self.id, op, (path, None), options)
                    .await
            })
            .await
    }

    async fn move_file(
        &self,
        #[zbus(header)] header: Header<'_>,
        from: &str,
        to: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .answer(async {
                let op = FileOp::Move;
                self.ctx
                    .change_files(&header, &self.id, op, (from, Some(to)), options)
                    .await
            })
            .await
    }

    /// A directory (or a file) as a tar stream the caller reads.
    #[zbus(out_args("archive"))]
    async fn download(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        options: Dict,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .stream_out(&header, &self.id, FileOp::Download, path, options)
            .await
            .for_caller(&self.ctx)
    }

    /// A tar stream from the caller's descriptor, unpacked into the directory `path`.
    async fn upload(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        archive: zbus::OwnedFd,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .content_in(&header, &self.id, FileOp::Upload, (path, archive), options)
            .await
            .for_caller(&self.ctx)
    }

    /// Changes below `path`, as lines of JSON on a pipe, until the caller closes it.
    #[zbus(out_args("events"))]
    async fn watch_files(
        &self,
        #[zbus(header)] header: Header<'_>,
        path: &str,
        options: Dict,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .stream_out(&header, &self.id, FileOp::Watch, path, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("process"))]
    async fn start_process(
        &self,
        #[zbus(header)] header: Header<'_>,
        command: String,
        options: Dict,
    ) -> Result<zbus::OwnedObjectPath> {
        self.ctx
            .start_process(&header, &self.id, command, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("processes"))]
    async fn list_processes(
        &self,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<Vec<super::process::ProcessEntry>> {
        self.ctx
            .list_processes(&header, &self.id)
            .await
            .for_caller(&self.ctx)
    }

    /// A TCP connection to a port inside the workspace.
    #[zbus(out_args("connection"))]
    async fn connect_port(
        &self,
        #[zbus(header)] header: Header<'_>,
        port: u16,
    ) -> Result<zbus::OwnedFd> {
        self.ctx
            .connect_port(&header, &self.id, port)
            .await
            .for_caller(&self.ctx)
    }

    async fn update(&self, #[zbus(header)] header: Header<'_>, changes: Dict) -> Result<()> {
        self.ctx
            .update(&header, &self.id, changes)
            .await
            .for_caller(&self.ctx)
    }

    async fn destroy(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx
            .destroy(&header, &self.id)
            .await
            .for_caller(&self.ctx)
    }

    async fn build(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx
            .build(&header, &self.id, false)
            .await
            .for_caller(&self.ctx)
    }

    async fn rebuild(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx
            .build(&header, &self.id, true)
            .await
            .for_caller(&self.ctx)
    }

    async fn start(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx
            .start(&header, &self.id)
            .await
            .for_caller(&self.ctx)
    }

    async fn stop(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx.stop(&header, &self.id).await.for_caller(&self.ctx)
    }

    async fn snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        name: &str,
        options: Dict,
    ) -> Result<()> {
        self.ctx
            .snapshot(&header, &self.id, name, options)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("snapshots"))]
    async fn list_snapshots(
        &self,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<Vec<(String, u64, u64)>> {
        self.ctx
            .list_snapshots(&header, &self.id)
            .await
            .for_caller(&self.ctx)
    }

    async fn delete_snapshot(&self, #[zbus(header)] header: Header<'_>, name: &str) -> Result<()> {
        self.ctx
            .delete_snapshot(&header, &self.id, name)
            .await
            .for_caller(&self.ctx)
    }

    async fn restore(&self, #[zbus(header)] header: Header<'_>, snapshot: &str) -> Result<()> {
        self.ctx
            .restore(&header, &self.id, snapshot)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("workspace"))]
    async fn fork(
        &self,
        #[zbus(header)] header: Header<'_>,
        snapshot: &str,
        spec: Dict,
    ) -> Result<zbus::OwnedObjectPath> {
        self.ctx
            .fork(&header, &self.id, snapshot, spec)
            .await
            .for_caller(&self.ctx)
    }

    async fn pause(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx
            .pause(&header, &self.id)
            .await
            .for_caller(&self.ctx)
    }

    async fn resume(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx
            .resume(&header, &self.id)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("content", "total_lines"))]
    async fn get_init_log(
        &self,
        #[zbus(header)] header: Header<'_>,
        max_lines: u32,
    ) -> Result<(String, u32)> {
        self.ctx
            .init_log(&header, &self.id, max_lines)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("info"))]
    async fn get_debug_info(
        &self,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<HashMap<String, OwnedVariant>> {
        self.ctx
            .debug_info(&header, &self.id)
            .await
            .for_caller(&self.ctx)
    }

    #[zbus(out_args("exit_code", "stdout", "stderr", "timed_out", "info"))]
    async fn rerun_init(
        &self,
        #[zbus(header)] header: Header<'_>,
        options: Dict,
    ) -> Result<(i32, Vec<u8>, Vec<u8>, bool, HashMap<String, OwnedVariant>)> {
        self.ctx
            .rerun_init(&header, &self.id, options)
            .await
            .for_caller(&self.ctx)
    }

    async fn sync(&self, #[zbus(header)] header: Header<'_>) -> Result<()> {
        self.ctx.sync(&header, &self.id).await.for_caller(&self.ctx)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn id(&self) -> String {
        self.id.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn name(&self) -> zbus::fdo::Result<String> {
        Ok(self.ws()?.name)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn r#type(&self) -> zbus::fdo::Result<String> {
        Ok(self.ws()?.workspace_type.as_str().to_owned())
    }

    #[zbus(property)]
    async fn status(&self) -> zbus::fdo::Result<String> {
        Ok(self.ws()?.status.as_str().to_owned())
    }

    #[zbus(property)]
    async fn error_message(&self) -> zbus::fdo::Result<String> {
        Ok(self.ws()?.error_message)
    }

    /// Where a build is (`unpack`, `init`, ...); empty when none runs.
    #[zbus(property)]
    async fn build_step(&self) -> zbus::fdo::Result<String> {
        Ok(self.ws()?.build_step)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn path(&self) -> zbus::fdo::Result<String> {
        Ok(self.ws()?.path.display().to_string())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn distro(&self) -> zbus::fdo::Result<String> {
        Ok(self
            .ws()?
            .distro
            .map(|d| d.as_str())
            .unwrap_or_default()
            .to_owned())
    }

    #[zbus(property)]
    async fn env_var_names(&self) -> zbus::fdo::Result<Vec<String>> {
        Ok(self.ws()?.env_vars.into_keys().collect())
    }

    #[zbus(property)]
    async fn skills(&self) -> zbus::fdo::Result<Vec<String>> {
        Ok(self.ws()?.skills)
    }

    #[zbus(property)]
    async fn tools(&self) -> zbus::fdo::Result<Vec<String>> {
        Ok(self.ws()?.tools)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn template(&self) -> zbus::fdo::Result<String> {
        Ok(self.ws()?.template)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn created_at(&self) -> zbus::fdo::Result<u64> {
        Ok(self.ws()?.created_at_usec)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn machine_name(&self) -> zbus::fdo::Result<String> {
        // Containers register with machined under their workspace name; host workspaces have none.
        let ws = self.ws()?;
        Ok(match ws.workspace_type {
            crate::core::workspace::WorkspaceType::Container => ws.name,
            crate::core::workspace::WorkspaceType::Host => String::new(),
        })
    }

    #[zbus(property)]
    async fn memory_max(&self) -> zbus::fdo::Result<u64> {
        Ok(self.ws()?.limits.memory_max.unwrap_or(0))
    }

    #[zbus(property, name = "CPUQuotaPercent")]
    async fn cpu_quota_percent(&self) -> zbus::fdo::Result<u32> {
        Ok(self.ws()?.limits.cpu_quota_percent.unwrap_or(0))
    }

    #[zbus(property)]
    async fn tasks_max(&self) -> zbus::fdo::Result<u64> {
        Ok(self.ws()?.limits.tasks_max.unwrap_or(0))
    }

    /// Seconds without use before the container is paused (its own, or the service's
    /// default; 0: never).
    #[zbus(property)]
    async fn idle_pause_secs(&self) -> zbus::fdo::Result<u32> {
        let ws = self.ws()?;
        let default = self.ctx.manager.limits().idle.pause_secs;
        Ok(if ws.is_container() {
            ws.limits.idle_pause_secs.unwrap_or(default)
        } else {
            0
        })
    }

    /// Seconds without use before the container is stopped (as `IdlePauseSecs`).
    #[zbus(property)]
    async fn idle_stop_secs(&self) -> zbus::fdo::Result<u32> {
        let ws = self.ws()?;
        let default = self.ctx.manager.limits().idle.stop_secs;
        Ok(if ws.is_container() {
            ws.limits.idle_stop_secs.unwrap_or(default)
        } else {
            0
        })
    }

    #[zbus(property)]
    async fn network(&self) -> zbus::fdo::Result<String> {
        // A host workspace's commands run in the host's own network: `host`, as a container
        // given that network says.
        Ok(self.ws()?.network.as_str().to_owned())
    }

    /// Egress rules: with entries, only what they name is reachable (`internet` network).
    #[zbus(property)]
    async fn egress_allow(&self) -> zbus::fdo::Result<Vec<String>> {
        Ok(self.ws()?.egress_allow.clone())
    }

    /// Egress rules: what they name is not reachable (`internet` network).
    #[zbus(property)]
    async fn egress_deny(&self) -> zbus::fdo::Result<Vec<String>> {
        Ok(self.ws()?.egress_deny.clone())
    }

    /// The names of its snapshots, oldest first (none for a host workspace).
    #[zbus(property)]
    async fn snapshots(&self) -> zbus::fdo::Result<Vec<String>> {
        let ws = self.ws()?;
        if !ws.is_container() {
            return Ok(Vec::new());
        }
        self.ctx
            .manager
            .snapshots(&self.id)
            .await
            .map(|all| all.into_iter().map(|s| s.name).collect())
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    /// The bytes of its own writable layer (what it changed over the layers it shares).
    #[zbus(property(emits_changed_signal = "false"))]
    async fn disk_usage(&self) -> zbus::fdo::Result<u64> {
        self.ctx
            .manager
            .disk_usage(&self.id)
            .await
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    /// Its tree became snapshot `snapshot`'s (`RestoreWorkspace`, `Restore`): its files
    /// changed all at once, and its processes ended.
    #[zbus(signal)]
    pub async fn restored(emitter: &SignalEmitter<'_>, snapshot: &str) -> zbus::Result<()>;
}
