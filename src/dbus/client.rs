//! Client proxies for `org.agent.Workspaces`, for the CLI, the HTTP bridge and the tests.

use std::collections::HashMap;

use zbus::{OwnedObjectPath, OwnedVariant, Variant, proxy};

/// Connects to the system bus, or to `address` when given (tests, private buses).
pub async fn connect(address: Option<&str>) -> zbus::Result<zbus::Connection> {
    match address {
        Some(a) => zbus::connection::Builder::address(a).build().await,
        None => zbus::Connection::system().await,
    }
}

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

/// `Exec` reply: exit code, stdout, stderr, timed out, info.
pub type ExecReply = (i32, Vec<u8>, Vec<u8>, bool, HashMap<String, OwnedVariant>);

/// `ExecWithFds` reply: exit code, timed out, info.
pub type ExecFdsReply = (i32, bool, HashMap<String, OwnedVariant>);

#[proxy(
    interface = "org.agent.Workspaces",
    default_service = "org.agent.Workspaces",
    default_path = "/org/agent/Workspaces"
)]
pub trait Workspaces {
    fn create_workspace(&self, spec: Args<'_>) -> zbus::Result<OwnedObjectPath>;
    fn list_workspaces(
        &self,
    ) -> zbus::Result<Vec<(String, String, String, String, OwnedObjectPath)>>;
    fn get_workspace(&self, workspace: &str) -> zbus::Result<OwnedObjectPath>;
    fn update_workspace(&self, workspace: &str, changes: Args<'_>) -> zbus::Result<()>;
    fn destroy_workspace(&self, workspace: &str) -> zbus::Result<()>;
    fn exec(&self, workspace: &str, command: &str, options: Args<'_>) -> zbus::Result<ExecReply>;
    fn exec_with_fds(
        &self,
        workspace: &str,
        command: &str,
        stdin: zbus::Fd<'_>,
        stdout: zbus::Fd<'_>,
        stderr: zbus::Fd<'_>,
        options: Args<'_>,
    ) -> zbus::Result<ExecFdsReply>;
    fn build_workspace(&self, workspace: &str) -> zbus::Result<()>;
    fn rebuild_workspace(&self, workspace: &str) -> zbus::Result<()>;
    fn start_workspace(&self, workspace: &str) -> zbus::Result<()>;
    fn stop_workspace(&self, workspace: &str) -> zbus::Result<()>;
    fn get_init_log(&self, workspace: &str, max_lines: u32) -> zbus::Result<(String, u32)>;
    fn get_debug_info(&self, workspace: &str) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn rerun_init(&self, workspace: &str, options: Args<'_>) -> zbus::Result<ExecReply>;
    fn sync_workspace(&self, workspace: &str) -> zbus::Result<()>;
    fn list_templates(&self) -> zbus::Result<Vec<(String, String, String)>>;
    fn list_library(&self) -> zbus::Result<(Vec<String>, Vec<String>)>;

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
pub trait Workspace {
    fn exec(&self, command: &str, options: Args<'_>) -> zbus::Result<ExecReply>;
    fn update(&self, changes: Args<'_>) -> zbus::Result<()>;
    fn destroy(&self) -> zbus::Result<()>;
    fn build(&self) -> zbus::Result<()>;

    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property, name = "Type")]
    fn workspace_type(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn error_message(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn build_step(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn path(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn env_var_names(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn created_at(&self) -> zbus::Result<u64>;
}
