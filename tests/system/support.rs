//! Helpers for the system tests, which run inside the real-systemd test host (as a transient
//! unit started by `tests/system/run.sh`) against the installed service.

#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use agent_workspaces::dbus::client::{Args, WorkspaceProxy, WorkspacesProxy};
use zbus::{Connection, DBusError, Variant};

pub const UNIT: &str = "agent-workspaced.service";
pub const STATE: &str = "/var/lib/agent-workspaces";

/// Refuses to run anywhere but in the test host: these tests restart system services and
/// write polkit rules.
pub fn require_test_host() {
    assert!(
        std::env::var_os("AGENT_WORKSPACES_TESTHOST").is_some()
            && std::path::Path::new("/run/systemd/system").exists(),
        "the system tests run inside the disposable test host: use `make system-test`"
    );
}

#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a shell command and returns what it did.
pub fn sh(script: &str) -> Out {
    let o = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run /bin/sh");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn ok(script: &str) -> String {
    let o = sh(script);
    assert_eq!(o.code, 0, "`{script}` failed: {}{}", o.stdout, o.stderr);
    o.stdout
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn bus() -> Connection {
    Connection::system()
        .await
        .expect("connect to the system bus")
}

pub async fn manager(conn: &Connection) -> WorkspacesProxy<'static> {
    WorkspacesProxy::new(conn).await.expect("manager proxy")
}

pub async fn workspace(conn: &Connection, path: &zbus::OwnedObjectPath) -> WorkspaceProxy<'static> {
    WorkspaceProxy::builder(conn)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("workspace proxy")
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub fn spec<'a>(items: Vec<(&'a str, Variant<'a>)>) -> Args<'a> {
    items.into_iter().collect()
}

pub fn named(name: &str) -> Args<'_> {
    spec(vec![("name", Variant::from(name))])
}

pub fn env_variant(pairs: &[(&str, &str)]) -> Variant<'static> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Variant::from(map)
}

/// The D-Bus error name and message of a failed call.
pub fn error_of(e: &zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            (name.to_string(), msg.clone().unwrap_or_default())
        }
        zbus::Error::FDO(f) => (
            f.name().to_string(),
            f.description().unwrap_or_default().to_owned(),
        ),
        other => (format!("{other:?}"), other.to_string()),
    }
}

/// Asserts that `r` failed with `name` and a message containing `needle`.
pub fn assert_error<T: std::fmt::Debug>(r: zbus::Result<T>, name: &str, needle: &str) {
    let e = r.expect_err(&format!("expected {name}"));
    let (got, msg) = error_of(&e);
    assert_eq!(got, name, "message: {msg}");
    assert!(
        msg.contains(needle),
        "{got}: '{msg}' does not contain '{needle}'"
    );
}

pub fn systemctl(args: &str) -> String {
    ok(&format!("systemctl {args}"))
}

pub fn restart_service() {
    systemctl(&format!("restart {UNIT}"));
    assert_eq!(
        sh(&format!("systemctl is-active {UNIT}")).stdout.trim(),
        "active"
    );
}

/// Journal entries of this boot matching `matches` (journalctl field matches), as JSON objects.
pub fn journal(matches: &str) -> Vec<serde_json::Value> {
    sh(&format!("journalctl -b -o json --no-pager {matches}"))
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Is the process gone (or a zombie nobody reaped yet)?
pub fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Runs busctl as the unprivileged user `nobody`.
pub fn busctl_as_nobody(args: &str) -> Out {
    sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups busctl --system {args}"
    ))
}

pub fn no_options() -> agent_workspaces::dbus::client::Args<'static> {
    HashMap::new()
}

/// Polls a workspace's Status until it leaves `building`/`pending`; returns the final status.
pub async fn wait_built(conn: &zbus::Connection, name: &str, limit: Duration) -> String {
    let m = manager(conn).await;
    let ws = workspace(conn, &m.get_workspace(name).await.unwrap()).await;
    let start = std::time::Instant::now();
    loop {
        let status = ws.status().await.unwrap();
        if status != "building" && status != "pending" {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "{name} still {status} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A new debian-bookworm container workspace, built at its creation and ready; its name.
pub async fn ready_container_named(conn: &zbus::Connection, prefix: &str) -> String {
    let name = unique(prefix);
    manager(conn)
        .await
        .create_workspace(container_spec(
            &name,
            vec![("build_on_create", Variant::from(true))],
        ))
        .await
        .unwrap();
    assert_eq!(
        wait_built(conn, &name, Duration::from_secs(1200)).await,
        "ready"
    );
    name
}

pub fn container_spec<'a>(
    name: &'a str,
    extra: Vec<(&'a str, Variant<'a>)>,
) -> agent_workspaces::dbus::client::Args<'a> {
    let mut items = vec![
        ("name", Variant::from(name)),
        ("workspace_type", Variant::from("container")),
        ("distro", Variant::from("debian-bookworm")),
    ];
    items.extend(extra);
    spec(items)
}

/// Writes a Library at the default path: skills python-dev and web, tool lint, template
/// fullstack (and a malformed template).
pub fn write_library() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = std::path::PathBuf::from(format!("{STATE}/library"));
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "skill/python-dev/scripts",
        "skill/web",
        "tool",
        "workspace-template",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("skill/python-dev/SKILL.md"),
        "# Python development\n",
    )
    .unwrap();
    let run = root.join("skill/python-dev/scripts/run.sh");
    std::fs::write(&run, "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("skill/web/SKILL.md"), "# Web v1\n").unwrap();
    let lint = root.join("tool/lint");
    std::fs::write(&lint, "#!/bin/sh\necho lint\n").unwrap();
    std::fs::set_permissions(&lint, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        root.join("workspace-template/fullstack.json"),
        r##"{"name": "fullstack", "description": "Web and Python", "distro": "debian-bookworm",
            "skills": ["web"], "tools": ["lint"], "env_vars": {"FROM_TEMPLATE": "yes"},
            "init_script": "#!/bin/sh\necho \"$FROM_TEMPLATE\" > /workspace/template-env\n"}"##,
    )
    .unwrap();
    std::fs::write(root.join("workspace-template/broken.json"), "{\"name\": ").unwrap();
    root
}

/// `count` debian-bookworm containers created at once and built (`max_concurrent_builds`
/// raised to `count` meanwhile, then put back); each must reach ready. Their names.
pub async fn ready_containers_at_once(
    conn: &zbus::Connection,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    let config = "/etc/agent-workspaces/config.toml";
    let original = std::fs::read_to_string(config).unwrap_or_default();
    std::fs::write(
        config,
        original.replace(
            "[container]\n",
            &format!("[container]\nmax_concurrent_builds = {count}\n"),
        ),
    )
    .unwrap();
    systemctl(&format!("reload {UNIT}"));
    let m = manager(conn).await;
    let names: Vec<String> = (0..count)
        .map(|i| unique(&format!("{prefix}-{i}")))
        .collect();
    let creates = names.iter().map(|name| {
        let m = m.clone();
        async move {
            m.create_workspace(container_spec(
                name,
                vec![("build_on_create", Variant::from(true))],
            ))
            .await
        }
    });
    for r in futures_util::future::join_all(creates).await {
        r.unwrap();
    }
    for name in &names {
        let status = wait_built(conn, name, Duration::from_secs(900)).await;
        let ws = workspace(conn, &m.get_workspace(name).await.unwrap()).await;
        assert_eq!(
            status,
            "ready",
            "{name}: {}",
            ws.error_message().await.unwrap()
        );
    }
    std::fs::write(config, original).unwrap();
    systemctl(&format!("reload {UNIT}"));
    names
}
