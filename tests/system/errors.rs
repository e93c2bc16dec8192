//! Errors as every client library reads them: GLib (`gdbus`, and Python through
//! `gi.repository.Gio`, as every GNOME program does), sd-bus (`busctl`) and dbus-python. GLib
//! takes an error's message only from a body of exactly one string, so the service sends just
//! that unless a caller asked for the data (`SetErrorData`).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

use agent_workspaces::dbus::ErrorData;
use agent_workspaces::dbus::error::{Reply, one_of_each};
use serde_json::Value;

use super::*;

fn repo() -> String {
    std::env::var("TESTHOST_REPO").expect("run by testhost.sh, which sets TESTHOST_REPO")
}

/// What Gio and dbus-python made of each failing call (`error_clients.py`).
fn python_clients(args: &str) -> Value {
    let out = sh(&format!(
        "python3 {}/tests/system/error_clients.py {args}",
        repo()
    ));
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", out.stdout, out.stderr))
}

/// `gdbus call ... METHOD ARGS`: the error gdbus printed, which must name `name`.
fn gdbus(bus: &str, dest: &str, path: &str, method: &str, args: &str) -> String {
    let out = sh(&format!(
        "gdbus call {bus} --dest {dest} --object-path {path} --method {method} {args}"
    ));
    assert_ne!(out.code, 0, "{method} {args} did not fail: {}", out.stdout);
    out.stderr
}

/// `busctl call ...`: the message busctl printed.
fn busctl(bus: &str, dest: &str, path: &str, iface: &str, call: &str) -> String {
    let out = sh(&format!("busctl {bus} call {dest} {path} {iface} {call}"));
    assert_ne!(out.code, 0, "{call} did not fail: {}", out.stdout);
    out.stderr.trim().to_owned()
}

struct Failing(Vec<agent_workspaces::core::Error>);

#[zbus::interface(name = "org.agent.Test")]
impl Failing {
    async fn fail(&self, i: u32) -> std::result::Result<(), Reply> {
        Err(Reply::new(self.0[i as usize].clone(), ErrorData::default()))
    }
}

/// A message bus of the test's own, so any name can be called.
struct SessionBus(Child, String);

impl SessionBus {
    fn start() -> Self {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run dbus-daemon");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        Self(child, line.trim().to_owned())
    }
}

impl Drop for SessionBus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every error name the service sends, replied as the service replies, reaches each of the
/// four client libraries with its name and whole message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_name_reads_whole_in_every_client_library() {
    require_test_host();
    let bus = SessionBus::start();
    let errors = one_of_each();
    let conn = zbus::connection::Builder::address(bus.1.as_str())
        .serve_at("/t", Failing(errors.clone()))
        .build()
        .await
        .unwrap();
    let dest = conn.unique_name().unwrap().to_string();
    let address = format!("--address={}", bus.1);
    let python = python_clients(&format!("'{}' {dest} count {}", bus.1, errors.len()));
    for (i, e) in errors.iter().enumerate() {
        let name = zbus::DBusError::name(e).to_string();
        let message = e.to_string();
        let printed = gdbus(
            &format!("--address '{}'", bus.1),
            &dest,
            "/t",
            "org.agent.Test.Fail",
            &format!("'uint32 {i}'"),
        );
        assert!(
            printed.contains(&format!("GDBus.Error:{name}: {message}")),
            "gdbus, {name}: {printed}"
        );
        let printed = busctl(
            &address,
            &dest,
            "/t",
            "org.agent.Test",
            &format!("Fail u {i}"),
        );
        // sd-bus shows "Access denied" for that one name, whatever its message.
        let shown = if name == "org.freedesktop.DBus.Error.AccessDenied" {
            "Access denied"
        } else {
            &message
        };
        assert!(printed.contains(shown), "busctl, {name}: {printed}");
        for library in ["gio", "dbus"] {
            assert_eq!(
                python[i.to_string()][library],
                serde_json::json!([name, message]),
                "{library}"
            );
        }
    }
}

/// The service's own errors, provoked for real, read the same from the four libraries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_errors_read_whole_in_every_client_library() {
    require_test_host();
    let workspaces = "org.agent.Workspaces";
    // case: name, message (its start), the call as gdbus and busctl write it.
    let cases: HashMap<&str, (&str, &str, &str, &str)> = HashMap::from([
        (
            "no-such-skill",
            (
                "org.agent.Workspaces.Error.NoSuchSkill",
                "Skill 'nosuch' is not in the Library",
                "UpdateWorkspace host \"{'skills': <['nosuch']>}\"",
                "UpdateWorkspace sa{sv} host 1 skills as 1 nosuch",
            ),
        ),
        (
            "invalid-name",
            (
                "org.freedesktop.DBus.Error.InvalidArgs",
                "Invalid 'name': ",
                "CreateWorkspace \"{'name': <'Bad_Name'>}\"",
                "CreateWorkspace a{sv} 1 name s Bad_Name",
            ),
        ),
        (
            "unknown-key",
            (
                "org.freedesktop.DBus.Error.InvalidArgs",
                "Invalid 'colour': unknown key",
                "CreateWorkspace \"{'name': <'errors-x'>, 'colour': <'red'>}\"",
                "CreateWorkspace a{sv} 2 name s errors-x colour s red",
            ),
        ),
        (
            "no-such-workspace",
            (
                "org.agent.Workspaces.Error.NoSuchWorkspace",
                "No workspace 'nosuch-ws' known",
                "GetWorkspace nosuch-ws",
                "GetWorkspace s nosuch-ws",
            ),
        ),
        (
            "protected",
            (
                "org.agent.Workspaces.Error.Protected",
                "Workspace 'host' is the default host workspace and cannot be destroyed",
                "DestroyWorkspace host",
                "DestroyWorkspace s host",
            ),
        ),
        (
            "file-not-found",
            (
                "org.agent.Workspaces.Error.FileNotFound",
                "'/nonexistent/ü x' in workspace 'host'",
                "StatFile host '/nonexistent/ü x' '{}'",
                "StatFile ssa{sv} host '/nonexistent/ü x' 0",
            ),
        ),
    ]);
    let python = python_clients(&format!("system {workspaces} service"));
    for (case, (name, message, gdbus_call, busctl_call)) in &cases {
        let printed = gdbus(
            "--system",
            workspaces,
            "/org/agent/Workspaces",
            &format!("{workspaces}.{gdbus_call}"),
            "",
        );
        assert!(
            printed.contains(&format!("GDBus.Error:{name}: {message}")),
            "gdbus, {case}: {printed}"
        );
        let printed = busctl(
            "--system",
            workspaces,
            "/org/agent/Workspaces",
            workspaces,
            busctl_call,
        );
        assert!(
            printed.starts_with(&format!("Call failed: {message}")),
            "busctl, {case}: {printed}"
        );
        for library in ["gio", "dbus"] {
            let got = &python[case][library];
            assert_eq!(got[0], *name, "{library}, {case}: {got}");
            assert!(
                got[1].as_str().unwrap().starts_with(message),
                "{library}, {case}: {got}"
            );
        }
    }
    assert_eq!(python.as_object().unwrap().len(), cases.len());
    // Nothing was made by the refused calls.
    assert!(
        !ok("busctl --system call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces ListWorkspaces")
            .contains("errors-x")
    );
}
