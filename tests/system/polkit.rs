//! Authorization: an unprivileged caller against real polkitd and a rule.

use std::time::Duration;

use super::*;

/// Not a test on its own: `polkit_refuses_...` runs this test binary again as `nobody` with
/// `AW_CLIENT_CALL` set, so an unprivileged zbus client makes one call and prints the outcome.
#[tokio::test]
#[ignore = "run by polkit_refuses_an_unprivileged_caller_until_a_rule_allows_it"]
async fn unprivileged_client_call() {
    let Ok(call) = std::env::var("AW_CLIENT_CALL") else {
        return;
    };
    let name = std::env::var("AW_CLIENT_NAME").unwrap_or_default();
    let flags = match std::env::var("AW_CLIENT_INTERACTIVE").as_deref() {
        Ok("1") => zbus::proxy::MethodFlags::ALLOW_INTERACTIVE_AUTH,
        _ => zbus::proxy::MethodFlags::empty(),
    };
    let conn = bus().await;
    let m = manager(&conn).await;
    let p = m.inner();
    let result: zbus::Result<String> = match call.as_str() {
        "list" => p
            .call_with_flags::<_, _, Vec<(String, String, String, String, zbus::OwnedObjectPath)>>(
                "ListWorkspaces",
                flags,
                &(),
            )
            .await
            .map(|r| format!("{:?}", r.unwrap_or_default().len())),
        "create" => p
            .call_with_flags::<_, _, zbus::OwnedObjectPath>(
                "CreateWorkspace",
                flags,
                &(named(&name),),
            )
            .await
            .map(|r| format!("{r:?}")),
        "exec" => p
            .call_with_flags::<_, _, agent_workspaces::dbus::client::ExecReply>(
                "Exec",
                flags,
                &(name.as_str(), "id -u", no_options()),
            )
            .await
            .map(|r| {
                format!(
                    "{:?}",
                    r.map(|r| (r.0, String::from_utf8_lossy(&r.1).into_owned()))
                )
            }),
        other => panic!("unknown AW_CLIENT_CALL {other}"),
    };
    match result {
        Ok(detail) => println!("RESULT ok\t{detail}"),
        Err(e) => {
            let (name, msg) = error_of(&e);
            println!("RESULT {name}\t{msg}");
        }
    }
}

/// Runs one call as `nobody` (uid 65534) through `unprivileged_client_call`: (outcome, message).
fn call_as_nobody(call: &str, name: &str, interactive: bool) -> (String, String) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "polkit::unprivileged_client_call",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("AW_CLIENT_CALL", call)
        .env("AW_CLIENT_NAME", name)
        .env("AW_CLIENT_INTERACTIVE", if interactive { "1" } else { "0" })
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run the test binary as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "no result from the unprivileged client: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (outcome, message) = line.split_once('\t').unwrap_or((line, ""));
    (outcome.to_owned(), message.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polkit_refuses_an_unprivileged_caller_until_a_rule_allows_it() {
    require_test_host();
    let rule = "/etc/polkit-1/rules.d/50-agent-workspaces-test.rules";
    let _ = std::fs::remove_file(rule);
    let name = unique("polkit");

    // Reading is public; the bus policy lets everyone call, the service asks polkit.
    assert_eq!(call_as_nobody("list", "", false).0, "ok");
    let (outcome, msg) = call_as_nobody("create", &name, false);
    assert_eq!(
        outcome, "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
        "{msg}"
    );
    assert!(
        msg.contains("create workspace") && msg.contains("org.agent.workspaces.manage"),
        "{msg}"
    );
    // A caller that allows interaction but has no authentication agent is refused.
    let (outcome, msg) = call_as_nobody("create", &name, true);
    assert_eq!(outcome, "org.freedesktop.DBus.Error.AccessDenied", "{msg}");
    assert!(msg.contains("Not authorized to create workspace"), "{msg}");
    let (outcome, msg) = call_as_nobody("exec", "host", false);
    assert_eq!(
        outcome, "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
        "{msg}"
    );
    assert!(msg.contains("org.agent.workspaces.exec-host"), "{msg}");
    // The same through busctl, a real command-line client.
    let create = format!(
        "call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces CreateWorkspace 'a{{sv}}' 1 name s {name}"
    );
    let refused = busctl_as_nobody(&format!("--allow-interactive-authorization=no {create}"));
    assert!(
        refused
            .stderr
            .contains("Interactive authentication required to create workspace"),
        "{}",
        refused.stderr
    );
    let conn = bus().await;
    assert_error(
        manager(&conn).await.get_workspace(&name).await,
        "org.agent.Workspaces.Error.NoSuchWorkspace",
        &name,
    );

    std::fs::write(
        rule,
        "polkit.addRule(function(action, subject) {\n  if (action.id.indexOf(\"org.agent.workspaces.\") == 0 && subject.user == \"nobody\")\n    return polkit.Result.YES;\n});\n",
    )
    .unwrap();
    let created = wait_for("polkitd to load the rule", Duration::from_secs(15), || {
        let (outcome, detail) = call_as_nobody("create", &name, false);
        (outcome == "ok").then_some(detail)
    });
    assert!(
        created.contains("/org/agent/Workspaces/workspace/"),
        "{created}"
    );
    let (outcome, detail) = call_as_nobody("exec", &name, false);
    assert_eq!(outcome, "ok");
    assert!(detail.contains("(0, \"0\\n\")"), "runs as root: {detail}");
    let via_busctl = busctl_as_nobody(&format!(
        "call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces Exec 'ssa{{sv}}' {name} true 0"
    ));
    assert_eq!(via_busctl.code, 0, "{}", via_busctl.stderr);
    std::fs::remove_file(rule).unwrap();
    manager(&conn).await.destroy_workspace(&name).await.unwrap();
}
