//! Client proxies for `org.agent.Workspaces`, for the CLI, the HTTP bridge and the tests.

use std::collections::HashMap;

use zbus::{OwnedObjectPath, OwnedVariant, Variant, proxy};

/// Connects to the system bus, or to `address` when given (tests, private buses).
pub async fn bus(address: Option<&str>) -> zbus::Result<zbus::Connection> {
    match address {
        Some(a) => zbus::connection::Builder::address(a).build().await,
        None => zbus::Connection::system().await,
    }
}

/// A connection of a client of the service (`bus`) whose errors from the service carry their
/// data (`SetErrorData`), so `Error::from` gives back the variant the service sent, the key of
/// an `InvalidArgs` with it. The service is started if it is not running; one that cannot be
/// reached now still answers later calls, with their errors' messages.
pub async fn connect(address: Option<&str>) -> zbus::Result<zbus::Connection> {
    let conn = bus(address).await?;
    let asked = async { manager_on(&conn).await?.set_error_data(true).await };
    if let Err(e) = asked.await {
        tracing::debug!("Errors from the service will carry their message only: {e}");
    }
    Ok(conn)
}

/// The interface of a workspace object.
pub const WORKSPACE_IFACE: &str = "org.agent.Workspaces.Workspace";

/// A proxy of the manager that caches no properties: building it costs no bus call (a caching
/// proxy would add a match rule and a GetAll to every request).
pub async fn manager_on(conn: &zbus::Connection) -> zbus::Result<WorkspacesProxy<'static>> {
    WorkspacesProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// Every property of the workspace object at `path`, in one `GetAll`.
pub async fn workspace_properties(
    conn: &zbus::Connection,
    path: &OwnedObjectPath,
) -> zbus::Result<HashMap<String, OwnedVariant>> {
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(super::BUS_NAME)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    Ok(props
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            WORKSPACE_IFACE,
        ))
        .await?)
}

/// The id of the workspace whose object is at `path` (its last element, bus-label escaped).
pub fn workspace_id_of(path: &OwnedObjectPath) -> String {
    let escaped = path.as_str().rsplit('/').next().unwrap_or_default();
    crate::core::names::bus_label_unescape(escaped).unwrap_or_default()
}

/// A dictionary of a reply (the debug report) as JSON.
pub fn dict_json(d: &Dict) -> serde_json::Value {
    serde_json::Value::Object(
        d.iter()
            .map(|(k, v)| (k.clone(), variant_json(v)))
            .collect(),
    )
}

/// A pipe (its ends closed on exec), for what goes to the service as a descriptor.
pub fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((r.into(), w.into()))
}

/// A command's standard input for `ExecWithFds`: `/dev/null`, or a pipe that `data` is written
/// into by a task (a command that does not read it closes the pipe: not an error).
pub fn command_input(data: Option<Vec<u8>>) -> std::io::Result<std::os::fd::OwnedFd> {
    use tokio::io::AsyncWriteExt;
    let Some(data) = data else {
        return Ok(std::fs::File::open("/dev/null")?.into());
    };
    let (r, w) = pipe()?;
    let mut w = tokio::net::unix::pipe::Sender::from_owned_fd(w)?;
    tokio::spawn(async move {
        let _ = w.write_all(&data).await;
    });
    Ok(r)
}

/// What a terminal runs where no command is given (`workspacectl shell`, the REST terminal):
/// bash's login shell where there is bash, sh's elsewhere.
pub const LOGIN_SHELL: &str = "command -v bash >/dev/null && exec bash -l; exec sh -l";

/// A D-Bus value as JSON, for the bridge and the CLI.
pub fn variant_json(v: &Variant<'_>) -> serde_json::Value {
    use serde_json::{Value, json};
    match v {
        Variant::Str(s) => Value::String(s.to_string()),
        Variant::Bool(b) => Value::Bool(*b),
        Variant::U8(n) => json!(n),
        Variant::U16(n) => json!(n),
        Variant::U32(n) => json!(n),
        Variant::U64(n) => json!(n),
        Variant::I16(n) => json!(n),
        Variant::I32(n) => json!(n),
        Variant::I64(n) => json!(n),
        Variant::F64(n) => json!(n),
        Variant::ObjectPath(p) => Value::String(p.to_string()),
        Variant::Array(a) => Value::Array(a.iter().map(variant_json).collect()),
        Variant::Variant(inner) => variant_json(inner),
        other => Value::String(format!("{other:?}")),
    }
}

/// Options and specs as sent: `a{sv}`.
pub type Args<'a> = HashMap<&'a str, Variant<'a>>;

/// Options and specs as built (the bridge's and `workspacectl`'s conversions).
pub type OwnedArgs = HashMap<String, Variant<'static>>;

/// `OwnedArgs` as the proxies take them.
pub fn args(d: &OwnedArgs) -> Args<'_> {
    d.iter()
        // Plain values hold no file descriptors, so cloning cannot fail.
        .filter_map(|(k, v)| v.try_clone().ok().map(|v| (k.as_str(), v)))
        .collect()
}

/// `Exec` reply: exit code, stdout, stderr, timed out, info.
pub type ExecReply = (i32, Vec<u8>, Vec<u8>, bool, HashMap<String, OwnedVariant>);

/// `ExecWithFds` reply: exit code, timed out, info.
pub type ExecFdsReply = (i32, bool, HashMap<String, OwnedVariant>);

/// `ListWorkspaces` entry: id, name, type, status, object path.
pub type WorkspaceEntry = (String, String, String, String, OwnedObjectPath);

/// A dictionary in a reply: `a{sv}`.
pub type Dict = HashMap<String, OwnedVariant>;

/// A workspace object's properties as JSON: the REST bridge's workspace object, and MCP's.
pub fn workspace_json(all: &HashMap<String, OwnedVariant>) -> serde_json::Value {
    let field = |k: &str| {
        all.get(k)
            .map(|v| variant_json(v))
            .unwrap_or(serde_json::Value::Null)
    };
    serde_json::json!({
        "id": field("Id"),
        "name": field("Name"),
        "workspace_type": field("Type"),
        "status": field("Status"),
        "error_message": field("ErrorMessage"),
        "build_step": field("BuildStep"),
        "path": field("Path"),
        "distro": field("Distro"),
        "env_var_names": field("EnvVarNames"),
        "skills": field("Skills"),
        "tools": field("Tools"),
        "template": field("Template"),
        "created_at": field("CreatedAt"),
        "machine_name": field("MachineName"),
        "network": field("Network"),
        "egress": {
            "allow": field("EgressAllow"),
            "deny": field("EgressDeny"),
        },
        "limits": {
            "memory_max": field("MemoryMax"),
            "cpu_quota_percent": field("CPUQuotaPercent"),
            "tasks_max": field("TasksMax"),
            "idle_pause_secs": field("IdlePauseSecs"),
            "idle_stop_secs": field("IdleStopSecs"),
        },
        "snapshots": field("Snapshots"),
        "disk_usage": field("DiskUsage"),
    })
}

pub use super::files::EntryTuple;

/// A file entry (`ListDirectory`, `StatFile`) as JSON, for the bridge and the CLI: `target`
/// only for a link.
pub fn entry_json(e: &EntryTuple) -> serde_json::Value {
    let (name, kind, size, mode, uid, gid, mtime_usec, target) = e;
    let mut v = serde_json::json!({
        "name": name, "type": kind, "size": size, "mode": mode, "uid": uid, "gid": gid,
        "mtime_usec": mtime_usec,
    });
    if kind == "symlink" {
        v["target"] = serde_json::Value::String(target.clone());
    }
    v
}
pub use super::process::ProcessEntry;

/// Both proxies of each interface are generated from one list of methods: `WorkspacesProxy` and
/// `WorkspaceProxy` for programs that answer machines (the bridge, the tests), and those of
/// `interactive` for `workspacectl`, whose calls allow polkit to ask the user
/// (`ALLOW_INTERACTIVE_AUTH`, as `busctl` and `machinectl` send). The contract tests check that
/// together they call every method of `dbus/org.agent.Workspaces.xml` with the served signature.
macro_rules! proxies {
    ($manager:ident, $workspace:ident $(, $flag:ident)?) => {
        #[proxy(
            interface = "org.agent.Workspaces",
            default_service = "org.agent.Workspaces",
            default_path = "/org/agent/Workspaces"
        )]
        pub trait $manager {
            #[zbus($($flag)?)]
            fn create_workspace(&self, spec: Args<'_>) -> zbus::Result<OwnedObjectPath>;
            fn list_workspaces(&self) -> zbus::Result<Vec<WorkspaceEntry>>;
            fn get_workspace(&self, workspace: &str) -> zbus::Result<OwnedObjectPath>;
            #[zbus($($flag)?)]
            fn update_workspace(&self, workspace: &str, changes: Args<'_>) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn destroy_workspace(&self, workspace: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn exec(&self, workspace: &str, command: &str, options: Args<'_>)
                -> zbus::Result<ExecReply>;
            #[zbus($($flag)?)]
            fn exec_with_fds(
                &self,
                workspace: &str,
                command: &str,
                stdin: zbus::Fd<'_>,
                stdout: zbus::Fd<'_>,
                stderr: zbus::Fd<'_>,
                options: Args<'_>,
            ) -> zbus::Result<ExecFdsReply>;
            #[zbus($($flag)?)]
            fn start_process(&self, workspace: &str, command: &str, options: Args<'_>)
                -> zbus::Result<OwnedObjectPath>;
            #[zbus($($flag)?)]
            fn list_processes(&self, workspace: &str) -> zbus::Result<Vec<ProcessEntry>>;
            #[zbus($($flag)?)]
            fn connect_port(&self, workspace: &str, port: u16) -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn read_file(&self, workspace: &str, path: &str, options: Args<'_>)
                -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn write_file(
                &self,
                workspace: &str,
                path: &str,
                content: zbus::Fd<'_>,
                options: Args<'_>,
            ) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn list_directory(&self, workspace: &str, path: &str, options: Args<'_>)
                -> zbus::Result<(Vec<EntryTuple>, bool)>;
            #[zbus($($flag)?)]
            fn stat_file(&self, workspace: &str, path: &str, options: Args<'_>)
                -> zbus::Result<EntryTuple>;
            #[zbus($($flag)?)]
            fn make_directory(&self, workspace: &str, path: &str, options: Args<'_>)
                -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn remove_file(&self, workspace: &str, path: &str, options: Args<'_>)
                -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn move_file(&self, workspace: &str, from: &str, to: &str, options: Args<'_>)
                -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn download(&self, workspace: &str, path: &str, options: Args<'_>)
                -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn upload(
                &self,
                workspace: &str,
                path: &str,
                archive: zbus::Fd<'_>,
                options: Args<'_>,
            ) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn watch_files(&self, workspace: &str, path: &str, options: Args<'_>)
                -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn build_workspace(&self, workspace: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn rebuild_workspace(&self, workspace: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn start_workspace(&self, workspace: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn stop_workspace(&self, workspace: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn pause_workspace(&self, workspace: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn snapshot_workspace(&self, workspace: &str, name: &str, options: Args<'_>)
                -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn list_snapshots(&self, workspace: &str) -> zbus::Result<Vec<(String, u64, u64)>>;
            #[zbus($($flag)?)]
            fn delete_snapshot(&self, workspace: &str, name: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn restore_workspace(&self, workspace: &str, snapshot: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn fork_workspace(&self, source: &str, snapshot: &str, spec: Args<'_>)
                -> zbus::Result<OwnedObjectPath>;
            #[zbus($($flag)?)]
            fn resume_workspace(&self, workspace: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn get_init_log(&self, workspace: &str, max_lines: u32) -> zbus::Result<(String, u32)>;
            #[zbus($($flag)?)]
            fn get_debug_info(&self, workspace: &str) -> zbus::Result<Dict>;
            #[zbus($($flag)?)]
            fn rerun_init(&self, workspace: &str, options: Args<'_>) -> zbus::Result<ExecReply>;
            #[zbus($($flag)?)]
            fn sync_workspace(&self, workspace: &str) -> zbus::Result<()>;
            fn list_library(&self) -> zbus::Result<(Vec<String>, Vec<String>)>;
            fn list_templates(&self) -> zbus::Result<Vec<(String, String, String)>>;
            fn get_template(&self, name: &str) -> zbus::Result<Dict>;

            fn set_error_data(&self, enable: bool) -> zbus::Result<()>;

            #[zbus(property)]
            fn version(&self) -> zbus::Result<String>;

            #[zbus(signal)]
            fn workspace_new(&self, id: String, path: OwnedObjectPath) -> zbus::Result<()>;
            #[zbus(signal)]
            fn workspace_removed(&self, id: String, path: OwnedObjectPath) -> zbus::Result<()>;
        }

        #[proxy(
            interface = "org.agent.Workspaces.Workspace",
            default_service = "org.agent.Workspaces"
        )]
        pub trait $workspace {
            #[zbus($($flag)?)]
            fn exec(&self, command: &str, options: Args<'_>) -> zbus::Result<ExecReply>;
            #[zbus($($flag)?)]
            fn exec_with_fds(
                &self,
                command: &str,
                stdin: zbus::Fd<'_>,
                stdout: zbus::Fd<'_>,
                stderr: zbus::Fd<'_>,
                options: Args<'_>,
            ) -> zbus::Result<ExecFdsReply>;
            #[zbus($($flag)?)]
            fn start_process(&self, command: &str, options: Args<'_>)
                -> zbus::Result<OwnedObjectPath>;
            #[zbus($($flag)?)]
            fn list_processes(&self) -> zbus::Result<Vec<ProcessEntry>>;
            #[zbus($($flag)?)]
            fn connect_port(&self, port: u16) -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn read_file(&self, path: &str, options: Args<'_>)
                -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn write_file(
                &self,
                path: &str,
                content: zbus::Fd<'_>,
                options: Args<'_>,
            ) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn list_directory(&self, path: &str, options: Args<'_>)
                -> zbus::Result<(Vec<EntryTuple>, bool)>;
            #[zbus($($flag)?)]
            fn stat_file(&self, path: &str, options: Args<'_>)
                -> zbus::Result<EntryTuple>;
            #[zbus($($flag)?)]
            fn make_directory(&self, path: &str, options: Args<'_>)
                -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn remove_file(&self, path: &str, options: Args<'_>)
                -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn move_file(&self, from: &str, to: &str, options: Args<'_>)
                -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn download(&self, path: &str, options: Args<'_>)
                -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn upload(
                &self,
                path: &str,
                archive: zbus::Fd<'_>,
                options: Args<'_>,
            ) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn watch_files(&self, path: &str, options: Args<'_>)
                -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn update(&self, changes: Args<'_>) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn destroy(&self) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn build(&self) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn rebuild(&self) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn start(&self) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn stop(&self) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn pause(&self) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn snapshot(&self, name: &str, options: Args<'_>) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn list_snapshots(&self) -> zbus::Result<Vec<(String, u64, u64)>>;
            #[zbus($($flag)?)]
            fn delete_snapshot(&self, name: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn restore(&self, snapshot: &str) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn fork(&self, snapshot: &str, spec: Args<'_>) -> zbus::Result<OwnedObjectPath>;
            #[zbus($($flag)?)]
            fn resume(&self) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn get_init_log(&self, max_lines: u32) -> zbus::Result<(String, u32)>;
            #[zbus($($flag)?)]
            fn get_debug_info(&self) -> zbus::Result<Dict>;
            #[zbus($($flag)?)]
            fn rerun_init(&self, options: Args<'_>) -> zbus::Result<ExecReply>;
            #[zbus($($flag)?)]
            fn sync(&self) -> zbus::Result<()>;

            #[zbus(property, name = "BuildStep")]
            fn build_step(&self) -> zbus::Result<String>;
            #[zbus(property, name = "CPUQuotaPercent")]
            fn cpu_quota_percent(&self) -> zbus::Result<u32>;
            #[zbus(property)]
            fn created_at(&self) -> zbus::Result<u64>;
            #[zbus(property)]
            fn distro(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn env_var_names(&self) -> zbus::Result<Vec<String>>;
            #[zbus(property)]
            fn error_message(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn id(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn idle_pause_secs(&self) -> zbus::Result<u32>;
            #[zbus(property)]
            fn idle_stop_secs(&self) -> zbus::Result<u32>;
            #[zbus(property)]
            fn machine_name(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn memory_max(&self) -> zbus::Result<u64>;
            #[zbus(property)]
            fn name(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn network(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn egress_allow(&self) -> zbus::Result<Vec<String>>;
            #[zbus(property)]
            fn egress_deny(&self) -> zbus::Result<Vec<String>>;
            #[zbus(property)]
            fn path(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn skills(&self) -> zbus::Result<Vec<String>>;
            #[zbus(property)]
            fn snapshots(&self) -> zbus::Result<Vec<String>>;
            #[zbus(property)]
            fn disk_usage(&self) -> zbus::Result<u64>;

            #[zbus(signal)]
            fn restored(&self, snapshot: String) -> zbus::Result<()>;
            #[zbus(property)]
            fn status(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn tasks_max(&self) -> zbus::Result<u64>;
            #[zbus(property)]
            fn template(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn tools(&self) -> zbus::Result<Vec<String>>;
            #[zbus(property, name = "Type")]
            fn workspace_type(&self) -> zbus::Result<String>;
        }
    };
}

proxies!(Workspaces, Workspace);

/// A background process (`StartProcess` gives its path); generated twice, as the others.
macro_rules! process_proxy {
    ($process:ident $(, $flag:ident)?) => {
        #[proxy(
            interface = "org.agent.Workspaces.Process",
            default_service = "org.agent.Workspaces"
        )]
        pub trait $process {
            #[zbus($($flag)?)]
            fn read_output(&self, offset: u64, max_bytes: u32)
                -> zbus::Result<(Vec<u8>, u64, bool)>;
            #[zbus($($flag)?)]
            fn resize(&self, cols: u16, rows: u16) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn open_pty(&self) -> zbus::Result<zbus::OwnedFd>;
            #[zbus($($flag)?)]
            fn write_input(&self, data: &[u8]) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn signal(&self, signal: i32) -> zbus::Result<()>;
            #[zbus($($flag)?)]
            fn wait(&self, timeout_secs: u32) -> zbus::Result<(i32, bool)>;

            #[zbus(property)]
            fn id(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn command(&self) -> zbus::Result<String>;
            #[zbus(property)]
            fn running(&self) -> zbus::Result<bool>;
            #[zbus(property)]
            fn exit_code(&self) -> zbus::Result<i32>;
            #[zbus(property)]
            fn started_at(&self) -> zbus::Result<u64>;
            #[zbus(property)]
            fn ended_at(&self) -> zbus::Result<u64>;
            #[zbus(property)]
            fn pty(&self) -> zbus::Result<bool>;

            #[zbus(signal)]
            fn process_exited(&self, exit_code: i32) -> zbus::Result<()>;
        }
    };
}

process_proxy!(Process);

/// The same proxies, whose calls allow interactive authorization.
pub mod interactive {
    use super::*;

    proxies!(Workspaces, Workspace, allow_interactive_auth);
    process_proxy!(Process, allow_interactive_auth);
}
