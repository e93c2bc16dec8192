//! System tests: the installed service on a real system bus, with real systemd, polkitd and
//! journald, inside the disposable test host. Run them with `make system-test`.

mod boundary;
mod load;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use support::*;
use zbus::Variant;

const MSG_CREATED: &str = "52d12c4aa538474f87b33f983311001a";
const MSG_DESTROYED: &str = "819011e31a6147de918401f3d54b1c99";
const MSG_EXEC: &str = "67a62a897fde43ffa65994fbd1d33813";
const MSG_CORRUPT: &str = "4168556b63f447afb5dcaf1568d91b57";

fn no_options() -> agent_workspaces::dbus::client::Args<'static> {
    HashMap::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_activation_starts_the_service() {
    require_test_host();
    systemctl(&format!("stop {UNIT}"));
    assert_ne!(
        sh(&format!("systemctl is-active {UNIT}")).stdout.trim(),
        "active"
    );
    // As on a fresh install: no Library yet, which is a normal state and warns of nothing.
    let _ = std::fs::remove_dir_all(format!("{STATE}/library"));
    let invocation_before = sh(&format!("systemctl show -p InvocationID --value {UNIT}")).stdout;
    let conn = bus().await;
    let list = manager(&conn).await.list_workspaces().await.unwrap();
    let invocation = sh(&format!("systemctl show -p InvocationID --value {UNIT}")).stdout;
    assert_ne!(invocation, invocation_before, "a new start");
    let warnings: Vec<String> = journal(&format!(
        "_SYSTEMD_INVOCATION_ID={} -p warning",
        invocation.trim()
    ))
    .into_iter()
    .filter_map(|e| e["MESSAGE"].as_str().map(String::from))
    .collect();
    assert!(
        warnings.is_empty(),
        "a start without a Library warned: {warnings:?}"
    );
    assert!(
        list.iter().any(|w| w.0 == "host" && w.3 == "ready"),
        "{list:?}"
    );
    assert_eq!(
        sh(&format!("systemctl is-active {UNIT}")).stdout.trim(),
        "active"
    );
    let version = manager(&conn).await.version().await.unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

/// Interfaces of an introspection document: name -> (members, properties) in a canonical form.
fn interfaces(xml: &str) -> BTreeMap<String, BTreeSet<String>> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc =
        roxmltree::Document::parse_with_options(xml, options).expect("introspection XML parses");
    let mut out = BTreeMap::new();
    for iface in doc.descendants().filter(|n| n.has_tag_name("interface")) {
        let name = iface.attribute("name").unwrap_or_default().to_owned();
        if !name.starts_with("org.agent.") {
            continue;
        }
        let mut members = BTreeSet::new();
        for m in iface.children().filter(|n| n.is_element()) {
            let args: Vec<String> = m
                .children()
                .filter(|n| n.has_tag_name("arg"))
                .map(|a| {
                    format!(
                        "{}:{}:{}",
                        a.attribute("name").unwrap_or("-"),
                        a.attribute("type").unwrap_or("-"),
                        a.attribute("direction").unwrap_or("-")
                    )
                })
                .collect();
            let annotations: Vec<String> = m
                .children()
                .filter(|n| n.has_tag_name("annotation"))
                .map(|a| {
                    format!(
                        "{}={}",
                        a.attribute("name").unwrap_or(""),
                        a.attribute("value").unwrap_or("")
                    )
                })
                .collect();
            members.insert(format!(
                "{} {} type={} access={} args=[{}] annotations=[{}]",
                m.tag_name().name(),
                m.attribute("name").unwrap_or_default(),
                m.attribute("type").unwrap_or("-"),
                m.attribute("access").unwrap_or("-"),
                args.join(","),
                annotations.join(",")
            ));
        }
        out.insert(name, members);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_equals_the_checked_in_xml() {
    require_test_host();
    let conn = bus().await;
    let introspect = |path: &'static str| {
        let conn = conn.clone();
        async move {
            zbus::fdo::IntrospectableProxy::builder(&conn)
                .destination("org.agent.Workspaces")
                .path(path)
                .build()
                .await
                .unwrap()
                .introspect()
                .await
                .unwrap()
        }
    };
    let mut live = interfaces(&introspect("/org/agent/Workspaces").await);
    live.extend(interfaces(
        &introspect("/org/agent/Workspaces/workspace/host").await,
    ));
    let installed =
        std::fs::read_to_string("/usr/share/dbus-1/interfaces/org.agent.Workspaces.xml")
            .expect("the interface XML is installed");
    let repo =
        std::env::var("TESTHOST_REPO").expect("run by testhost.sh, which sets TESTHOST_REPO");
    let checked_in =
        std::fs::read_to_string(format!("{repo}/dbus/org.agent.Workspaces.xml")).unwrap();
    assert_eq!(installed, checked_in);
    let documented = interfaces(&checked_in);
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        ["org.agent.Workspaces", "org.agent.Workspaces.Workspace"]
    );
    for (name, members) in &documented {
        let got = live
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not served"));
        let missing: Vec<_> = members.difference(got).collect();
        let extra: Vec<_> = got.difference(members).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: documented but not served: {missing:#?}\nserved but not documented: {extra:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_get_update_destroy_with_signals_and_properties() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let mut new = m.receive_workspace_new().await.unwrap();
    let mut removed = m.receive_workspace_removed().await.unwrap();
    let name = unique("crud");
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(name.as_str())),
            ("env_vars", env_variant(&[("API_KEY", "s3cret")])),
        ]))
        .await
        .unwrap();
    let ws = workspace(&conn, &path).await;
    let id = ws.id().await.unwrap();
    let signal = new.next().await.unwrap();
    let args = signal.args().unwrap();
    assert_eq!((args.id.as_str(), &args.path), (id.as_str(), &path));
    assert!(
        path.as_str()
            .starts_with("/org/agent/Workspaces/workspace/")
    );
    assert_eq!(ws.name().await.unwrap(), name);
    assert_eq!(ws.workspace_type().await.unwrap(), "host");
    assert_eq!(ws.status().await.unwrap(), "ready");
    assert_eq!(ws.env_var_names().await.unwrap(), ["API_KEY"]);
    let dir = ws.path().await.unwrap();
    assert!(std::path::Path::new(&dir).is_dir(), "{dir} exists");

    let listed = m.list_workspaces().await.unwrap();
    assert!(listed.iter().any(|w| w.0 == id
        && w.1 == name
        && w.2 == "host"
        && w.3 == "ready"
        && w.4 == path));
    assert_eq!(m.get_workspace(&name).await.unwrap(), path);
    assert_eq!(m.get_workspace(&id).await.unwrap(), path);
    let managed = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination("org.agent.Workspaces")
        .path("/org/agent/Workspaces")
        .build()
        .await
        .unwrap()
        .get_managed_objects()
        .await
        .unwrap();
    assert!(managed.keys().any(|p| p.as_str() == path.as_str()));

    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination("org.agent.Workspaces")
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    m.update_workspace(
        &name,
        spec(vec![("env_vars", env_variant(&[("OTHER", "1")]))]),
    )
    .await
    .unwrap();
    let changed = changes.next().await.unwrap();
    let changed = changed.args().unwrap();
    assert!(changed.changed_properties().contains_key("EnvVarNames"));
    assert_eq!(ws.env_var_names().await.unwrap(), ["OTHER"]);
    let (_, out, ..) = m
        .exec(&name, "echo $OTHER-${API_KEY:-unset}", no_options())
        .await
        .unwrap();
    assert_eq!(out, b"1-unset\n");

    m.destroy_workspace(&id).await.unwrap();
    let gone = removed.next().await.unwrap();
    assert_eq!(gone.args().unwrap().id, id);
    assert_error(
        m.get_workspace(&name).await,
        "org.agent.Workspaces.Error.NoSuchWorkspace",
        &name,
    );
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the workspace directory is removed"
    );
    assert!(!std::path::Path::new(&format!("{STATE}/records/{id}.json")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_host_path_is_used_and_never_deleted() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("chosen");
    let dir = format!("/srv/{name}");
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(name.as_str())),
            ("path", Variant::from(dir.as_str())),
        ]))
        .await
        .unwrap();
    assert_eq!(workspace(&conn, &path).await.path().await.unwrap(), dir);
    let (_, out, ..) = m
        .exec(&name, "pwd; touch kept", no_options())
        .await
        .unwrap();
    assert_eq!(out, format!("{dir}\n").into_bytes());
    m.destroy_workspace(&name).await.unwrap();
    assert!(
        std::path::Path::new(&format!("{dir}/kept")).exists(),
        "a directory the caller chose survives destroy"
    );
    ok(&format!("rm -r {dir}"));
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("rel")),
            ("path", Variant::from("srv/x")),
        ]))
        .await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "'path'",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_returns_exact_streams_codes_env_cwd_and_stdin() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("exec");
    m.create_workspace(spec(vec![
        ("name", Variant::from(name.as_str())),
        (
            "env_vars",
            env_variant(&[("FROM_WS", "ws"), ("BOTH", "ws")]),
        ),
    ]))
    .await
    .unwrap();
    let dir = workspace(&conn, &m.get_workspace(&name).await.unwrap())
        .await
        .path()
        .await
        .unwrap();

    let (code, out, err, timed_out, info) = m
        .exec(
            &name,
            "printf 'out\\r\\n'; printf 'err\\n' >&2; exit 42",
            no_options(),
        )
        .await
        .unwrap();
    assert_eq!(
        (code, &out[..], &err[..], timed_out),
        (42, &b"out\r\n"[..], &b"err\n"[..], false)
    );
    assert_eq!(
        info.get("stdout_truncated")
            .map(|v| bool::try_from(v).unwrap()),
        Some(false)
    );
    assert!(u64::try_from(info.get("duration_usec").unwrap()).unwrap() > 0);

    let (code, ..) = m.exec(&name, "kill -KILL $$", no_options()).await.unwrap();
    assert_eq!(code, 128 + 9);

    let call_env = env_variant(&[("BOTH", "call"), ("ONLY_CALL", "c")]);
    let (_, out, ..) = m
        .exec(
            &name,
            "echo $FROM_WS $BOTH $ONLY_CALL; pwd; echo $HOME; echo $LANG",
            spec(vec![("env", call_env)]),
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("ws call c\n{dir}\n/root\nC.UTF-8\n")
    );

    ok(&format!("mkdir -p {dir}/sub"));
    let (_, out, ..) = m
        .exec(&name, "pwd", spec(vec![("cwd", Variant::from("sub"))]))
        .await
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("{dir}/sub\n"));
    let (_, out, ..) = m
        .exec(&name, "pwd", spec(vec![("cwd", Variant::from("/tmp"))]))
        .await
        .unwrap();
    assert_eq!(out, b"/tmp\n");

    let input: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let (code, out, ..) = m
        .exec(
            &name,
            "cat",
            spec(vec![("stdin", Variant::from(input.clone()))]),
        )
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        out == input,
        "stdin comes back byte-exact ({} bytes)",
        out.len()
    );
    let (_, out, ..) = m.exec(&name, "cat; echo end", no_options()).await.unwrap();
    assert_eq!(out, b"end\n", "no stdin option means empty stdin");

    let (code, out, err, _, info) = m
        .exec(
            &name,
            "head -c 3000000 /dev/zero; head -c 10 /dev/zero >&2",
            no_options(),
        )
        .await
        .unwrap();
    assert_eq!(
        (code, out.len(), err.len()),
        (0, 1024 * 1024, 10),
        "stdout is capped at 1 MiB"
    );
    assert!(bool::try_from(info.get("stdout_truncated").unwrap()).unwrap());
    assert!(!bool::try_from(info.get("stderr_truncated").unwrap()).unwrap());

    let (_, out, ..) = m
        .exec(&name, "cat /proc/self/cgroup", no_options())
        .await
        .unwrap();
    let cgroup = String::from_utf8(out).unwrap();
    assert!(
        cgroup.contains(&format!("/system.slice/{UNIT}/exec-")),
        "each command runs in a cgroup of its own below the service: {cgroup}"
    );
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_every_process_and_keeps_the_output() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let (code, out, err, timed_out, _) = m
        .exec(
            "host",
            "sleep 1000 & echo $!; echo started >&2; wait",
            spec(vec![("timeout_secs", Variant::from(1u32))]),
        )
        .await
        .unwrap();
    assert!(timed_out);
    assert_eq!(code, -1);
    assert_eq!(
        err, b"started\n",
        "output produced before the timeout is kept"
    );
    let pid: u32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    wait_for(
        "the background sleep to be killed",
        Duration::from_secs(5),
        || pid_gone(pid).then_some(()),
    );
    let leftovers = sh(&format!(
        "ls -d /sys/fs/cgroup/system.slice/{UNIT}/exec-* 2>/dev/null"
    ))
    .stdout;
    assert_eq!(leftovers, "", "no command cgroup is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs_on_one_workspace_all_succeed() {
    require_test_host();
    const N: usize = 16;
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("conc");
    m.create_workspace(named(&name)).await.unwrap();
    // Each command waits until all N have started: serialized execs would never get there.
    let calls = (0..N).map(|i| {
        let m = m.clone();
        let name = name.clone();
        async move {
            let cmd = format!(
                "touch started-{i}; while [ $(ls started-* | wc -l) -lt {N} ]; do sleep 0.05; done; echo {i}"
            );
            m.exec(&name, &cmd, spec(vec![("timeout_secs", Variant::from(60u32))])).await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        let (code, out, err, timed_out, _) = r.unwrap();
        assert_eq!(
            (code, timed_out),
            (0, false),
            "exec {i}: {}",
            String::from_utf8_lossy(&err)
        );
        assert_eq!(out, format!("{i}\n").into_bytes());
    }
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_cancels_its_exec() {
    require_test_host();
    let marker = format!("/tmp/{}", unique("disconnect"));
    let caller = bus().await;
    let m = manager(&caller).await;
    let cmd = format!("sleep 1000 & echo $! > {marker}; wait");
    let call = tokio::spawn(async move { m.exec("host", &cmd, HashMap::new()).await });
    let pid: u32 = wait_for("the command to start", Duration::from_secs(10), || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    });
    call.abort();
    drop(caller);
    wait_for(
        "the command of a vanished caller to be killed",
        Duration::from_secs(10),
        || pid_gone(pid).then_some(()),
    );
    let _ = std::fs::remove_file(&marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_exec_ends_the_command_first() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("busy");
    m.create_workspace(named(&name)).await.unwrap();
    let runner = m.clone();
    let n = name.clone();
    let call = tokio::spawn(async move {
        runner
            .exec(&n, "touch running; sleep 1000", HashMap::new())
            .await
    });
    let dir = workspace(&conn, &m.get_workspace(&name).await.unwrap())
        .await
        .path()
        .await
        .unwrap();
    wait_for("the command to start", Duration::from_secs(10), || {
        std::path::Path::new(&format!("{dir}/running"))
            .exists()
            .then_some(())
    });
    m.destroy_workspace(&name).await.unwrap();
    assert_error(
        call.await.unwrap(),
        "org.agent.Workspaces.Error.JobFailed",
        "destroyed",
    );
    assert_error(
        m.get_workspace(&name).await,
        "org.agent.Workspaces.Error.NoSuchWorkspace",
        &name,
    );
}

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
            "unprivileged_client_call",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_tells_a_workspace_story_without_secrets() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("journal");
    let secret = unique("secret-value");
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(name.as_str())),
            ("env_vars", env_variant(&[("TOKEN", &secret)])),
        ]))
        .await
        .unwrap();
    let id = workspace(&conn, &path).await.id().await.unwrap();
    let stdin_secret = unique("stdin-secret");
    m.exec(
        &name,
        "cat >/dev/null; exit 3",
        spec(vec![(
            "stdin",
            Variant::from(stdin_secret.as_bytes().to_vec()),
        )]),
    )
    .await
    .unwrap();
    m.destroy_workspace(&name).await.unwrap();
    let entries = wait_for("the journal entries", Duration::from_secs(10), || {
        let e = journal(&format!("WORKSPACE_ID={id}"));
        e.iter()
            .any(|e| e["MESSAGE_ID"] == MSG_DESTROYED)
            .then_some(e)
    });
    let ids: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["MESSAGE_ID"].as_str())
        .collect();
    assert_eq!(ids, [MSG_CREATED, MSG_EXEC, MSG_DESTROYED], "{entries:#?}");
    for e in &entries {
        assert_eq!(e["WORKSPACE_NAME"], name.as_str());
        assert_eq!(e["_SYSTEMD_UNIT"], UNIT);
    }
    let exec = &entries[1];
    assert_eq!(exec["EXIT_CODE"], "3");
    assert!(
        exec["DURATION_USEC"]
            .as_str()
            .is_some_and(|d| d.parse::<u64>().is_ok())
    );
    let all = sh("journalctl -b -o export --no-pager").stdout;
    assert!(!all.contains(&secret), "an env value reached the journal");
    assert!(!all.contains(&stdin_secret), "stdin reached the journal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_workspace() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let names = [unique("keep"), unique("keep")];
    for n in &names {
        m.create_workspace(spec(vec![
            ("name", Variant::from(n.as_str())),
            ("env_vars", env_variant(&[("VALUE", n)])),
        ]))
        .await
        .unwrap();
    }
    let before = m.list_workspaces().await.unwrap();
    systemctl(&format!("stop {UNIT}"));
    let stopped = systemctl(&format!("show -p Result -p ExecMainStatus {UNIT}"));
    assert_eq!(
        stopped, "Result=success\nExecMainStatus=0\n",
        "SIGTERM is a clean stop: exit 0, no stop timeout, no SIGKILL"
    );
    restart_service();
    let conn = bus().await;
    let m = manager(&conn).await;
    assert_eq!(m.list_workspaces().await.unwrap(), before);
    for n in &names {
        let (_, out, ..) = m.exec(n, "echo $VALUE", HashMap::new()).await.unwrap();
        assert_eq!(
            out,
            format!("{n}\n").into_bytes(),
            "env values survive the restart"
        );
        m.destroy_workspace(n).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_reported_and_skipped() {
    require_test_host();
    let conn = bus().await;
    let keep = unique("intact");
    manager(&conn)
        .await
        .create_workspace(named(&keep))
        .await
        .unwrap();
    let bogus = uuid::Uuid::new_v4();
    let file = format!("{STATE}/records/{bogus}.json");
    std::fs::write(&file, "{\"schema_version\": 1, \"workspace\": {\"id\": ").unwrap();
    restart_service();
    let conn = bus().await;
    let m = manager(&conn).await;
    let list = m.list_workspaces().await.unwrap();
    assert!(list.iter().any(|w| w.1 == keep) && list.iter().any(|w| w.0 == "host"));
    assert!(!list.iter().any(|w| w.0 == bogus.to_string()));
    let reported = wait_for(
        "the corrupt record to be reported",
        Duration::from_secs(10),
        || {
            let e = journal(&format!("MESSAGE_ID={MSG_CORRUPT}"));
            e.into_iter()
                .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains(&file)))
        },
    );
    assert_eq!(reported["PRIORITY"], "4", "reported as a warning");
    assert!(
        std::path::Path::new(&file).exists(),
        "the file is kept for inspection"
    );
    std::fs::remove_file(&file).unwrap();
    m.destroy_workspace(&keep).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_named_error_and_changes_nothing() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let existing = unique("exists");
    m.create_workspace(named(&existing)).await.unwrap();
    let before = m.list_workspaces().await.unwrap();
    let records = || ok(&format!("ls {STATE}/records"));
    let records_before = records();
    let invalid = "org.freedesktop.DBus.Error.InvalidArgs";

    assert_error(
        m.create_workspace(named("Bad_Name")).await,
        invalid,
        "'name'",
    );
    assert_error(m.create_workspace(HashMap::new()).await, invalid, "'name'");
    assert_error(
        m.create_workspace(named("1b4e28ba-2fa1-11d2-883f-0016d3cca427"))
            .await,
        invalid,
        "'name'",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("ok")),
            ("colour", Variant::from("red")),
        ]))
        .await,
        invalid,
        "'colour'",
    );
    assert_error(
        m.create_workspace(spec(vec![("name", Variant::from(7u32))]))
            .await,
        invalid,
        "'name'",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("ok")),
            ("workspace_type", Variant::from("container")),
            ("distro", Variant::from("gentoo")),
        ]))
        .await,
        invalid,
        "'distro'",
    );
    let big = "x".repeat(40_000);
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("ok")),
            ("env_vars", env_variant(&[("BIG", &big)])),
        ]))
        .await,
        invalid,
        "'env_vars'",
    );
    assert_error(
        m.create_workspace(named(&existing)).await,
        "org.agent.Workspaces.Error.WorkspaceExists",
        &existing,
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("ok")),
            ("workspace_type", Variant::from("container")),
        ]))
        .await,
        invalid,
        "'distro'",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("ok")),
            ("workspace_type", Variant::from("container")),
            ("distro", Variant::from("debian-bookworm")),
            ("network", Variant::from("wifi")),
        ]))
        .await,
        invalid,
        "'network'",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("ok")),
            ("memory_max", Variant::from(5u64)),
        ]))
        .await,
        invalid,
        "'memory_max'",
    );
    assert_error(
        m.update_workspace(&existing, spec(vec![("name", Variant::from("other"))]))
            .await,
        invalid,
        "'name'",
    );
    assert_error(
        m.update_workspace("missing", spec(vec![("init_script", Variant::from("x"))]))
            .await,
        "org.agent.Workspaces.Error.NoSuchWorkspace",
        "missing",
    );
    assert_error(
        m.destroy_workspace("host").await,
        "org.agent.Workspaces.Error.Protected",
        "host",
    );
    assert_error(
        m.destroy_workspace("missing").await,
        "org.agent.Workspaces.Error.NoSuchWorkspace",
        "missing",
    );
    assert_error(
        m.exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(0u32))]),
        )
        .await,
        invalid,
        "3600",
    );
    assert_error(
        m.exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(3601u32))]),
        )
        .await,
        invalid,
        "timeout_secs",
    );
    assert_error(
        m.exec(
            "host",
            "true",
            spec(vec![("cwd", Variant::from("/nonexistent"))]),
        )
        .await,
        invalid,
        "'cwd'",
    );
    assert_error(
        m.exec("missing", "true", HashMap::new()).await,
        "org.agent.Workspaces.Error.NoSuchWorkspace",
        "missing",
    );
    assert_error(
        m.build_workspace("host").await,
        "org.agent.Workspaces.Error.NotSupported",
        "host",
    );
    assert_error(
        m.get_init_log(&existing, 10).await,
        "org.agent.Workspaces.Error.NotSupported",
        &existing,
    );

    assert_eq!(m.list_workspaces().await.unwrap(), before);
    assert_eq!(
        records(),
        records_before,
        "no record was written or removed"
    );
    m.destroy_workspace(&existing).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_limits_and_a_bad_file_keeps_the_old_ones() {
    require_test_host();
    let config = "/etc/agent-workspaces/config.toml";
    std::fs::create_dir_all("/etc/agent-workspaces").unwrap();
    let original = std::fs::read_to_string(config).unwrap_or_default();
    std::fs::write(
        config,
        format!("[exec]\nmax_timeout_secs = 5\ndefault_timeout_secs = 5\n{original}"),
    )
    .unwrap();
    systemctl(&format!("reload {UNIT}"));
    let conn = bus().await;
    let m = manager(&conn).await;
    assert_error(
        m.exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(6u32))]),
        )
        .await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "1 to 5 seconds",
    );
    std::fs::write(config, "[exec]\nmax_timeout_secs = \"many\"\n").unwrap();
    // (line 2 of this file is the bad one)
    systemctl(&format!("reload {UNIT}"));
    assert_eq!(
        sh(&format!("systemctl is-active {UNIT}")).stdout.trim(),
        "active"
    );
    assert_error(
        m.exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(6u32))]),
        )
        .await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "1 to 5 seconds",
    );
    let failed = journal(&format!("_SYSTEMD_UNIT={UNIT} PRIORITY=3"));
    assert!(
        failed
            .iter()
            .any(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains("line 2"))),
        "the reload error names the line"
    );
    // A bad file at start is a clear failure, never a silent default.
    let start = sh(&format!("systemctl restart {UNIT}"));
    assert_ne!(start.code, 0);
    let status = sh(&format!("systemctl show -p StatusText --value {UNIT}")).stdout;
    assert!(status.contains("line 2"), "{status}");
    std::fs::write(config, original).unwrap();
    systemctl(&format!("reset-failed {UNIT}"));
    restart_service();
    let conn = bus().await;
    manager(&conn)
        .await
        .exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(600u32))]),
        )
        .await
        .unwrap();
}

/// Polls a workspace's Status until it leaves `building`/`pending`; returns the final status.
async fn wait_built(conn: &zbus::Connection, name: &str, limit: Duration) -> String {
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

fn container_spec<'a>(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_container_builds_runs_commands_and_is_destroyed() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("box");
    let init =
        "#!/bin/sh\nset -e\necho \"$GREETING from init\" > /workspace/from-init\necho init-ran\n";
    let path = m
        .create_workspace(container_spec(
            &name,
            vec![
                ("env_vars", env_variant(&[("GREETING", "hello")])),
                ("init_script", Variant::from(init)),
            ],
        ))
        .await
        .unwrap();
    let ws = workspace(&conn, &path).await;
    assert_eq!(ws.status().await.unwrap(), "pending");
    m.build_workspace(&name).await.unwrap();
    assert_error(
        m.build_workspace(&name).await,
        "org.agent.Workspaces.Error.Busy",
        &name,
    );
    let status = wait_built(&conn, &name, Duration::from_secs(1200)).await;
    let (log, _) = m.get_init_log(&name, 0).await.unwrap();
    assert_eq!(
        status,
        "ready",
        "error: {}\ninit log:\n{log}",
        ws.error_message().await.unwrap()
    );
    assert!(
        log.contains("== step unpack") && log.contains("init-ran"),
        "{log}"
    );

    let (code, out, err, ..) = m
        .exec(
            &name,
            "cat /workspace/from-init; echo $GREETING; pwd; grep VERSION_CODENAME /etc/os-release; echo oops >&2",
            no_options(),
        )
        .await
        .unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "hello from init\nhello\n/workspace\nVERSION_CODENAME=bookworm\n"
    );
    assert_eq!(err, b"oops\n", "stderr separate, no terminal in between");
    assert!(
        ok("machinectl list --no-legend").contains(&name),
        "machinectl list shows it"
    );
    assert!(ok("machinectl list-images --no-legend").contains(&name));
    let unit = format!("agent-workspace-{name}.service");
    assert_eq!(
        sh(&format!("systemctl is-active {unit}")).stdout.trim(),
        "active"
    );

    // Output larger than a pipe buffer comes back whole, without blocking.
    let (_, out, ..) = m
        .exec(&name, "head -c 200000 /dev/zero", no_options())
        .await
        .unwrap();
    assert_eq!(out.len(), 200_000);

    // 32 concurrent execs: each waits until all have started.
    const N: usize = 32;
    let calls = (0..N).map(|i| {
        let m = m.clone();
        let name = name.clone();
        async move {
            let cmd = format!(
                "touch /workspace/c-{i}; while [ $(ls /workspace | grep -c '^c-') -lt {N} ]; do sleep 0.05; done; echo {i}"
            );
            m.exec(&name, &cmd, spec(vec![("timeout_secs", Variant::from(120u32))])).await
        }
    });
    for (i, r) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        let (code, out, err, timed_out, _) = r.unwrap();
        assert_eq!(
            (code, timed_out),
            (0, false),
            "exec {i}: {}",
            String::from_utf8_lossy(&err)
        );
        assert_eq!(out, format!("{i}\n").into_bytes());
    }

    // A timeout leaves no process behind in the container, and the workspace keeps working.
    let (code, out, _, timed_out, _) = m
        .exec(
            &name,
            "sleep 1000 & echo started; wait",
            spec(vec![("timeout_secs", Variant::from(1u32))]),
        )
        .await
        .unwrap();
    assert_eq!((code, timed_out, &out[..]), (-1, true, &b"started\n"[..]));
    let count = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep 1000' || true";
    let (_, out, ..) = m.exec(&name, count, no_options()).await.unwrap();
    assert_eq!(out, b"0\n", "the timed-out command's sleep is gone");

    // The container shares the test host's network: a loopback listener is reachable.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected");
    let (code, out, ..) = m.exec(&name, &probe, no_options()).await.unwrap();
    assert_eq!((code, &out[..]), (0, &b"connected\n"[..]));

    // Rerun the init script without a rebuild; the log grows, the status stays ready.
    let (_, before) = m.get_init_log(&name, 1).await.unwrap();
    let (code, out, ..) = m.rerun_init(&name, no_options()).await.unwrap();
    assert_eq!((code, &out[..]), (0, &b"init-ran\n"[..]));
    let (_, after) = m.get_init_log(&name, 1).await.unwrap();
    assert!(
        after > before,
        "rerun-init adds to the init log ({before} -> {after} lines)"
    );
    assert_eq!(ws.status().await.unwrap(), "ready");

    // The journal has the workspace's build and init output under its id.
    let id = ws.id().await.unwrap();
    let story = wait_for(
        "the init output in the journal",
        Duration::from_secs(10),
        || {
            let text = sh(&format!(
                "journalctl -b -o cat --no-pager WORKSPACE_ID={id}"
            ))
            .stdout;
            (text.contains("init: init-ran") && text.contains("== step unpack")).then_some(text)
        },
    );
    assert!(story.contains("Created container workspace"), "{story}");

    // Stop and start: the machine goes away and comes back on first use.
    m.stop_workspace(&name).await.unwrap();
    assert!(!ok("machinectl list --no-legend").contains(&name));
    let (code, out, ..) = m
        .exec(&name, "cat /workspace/from-init", no_options())
        .await
        .unwrap();
    assert_eq!(
        (code, &out[..]),
        (0, &b"hello from init\n"[..]),
        "started again on first use"
    );

    // Rebuild starts from a fresh tree and runs the init script again.
    m.exec(&name, "touch /workspace/before-rebuild", no_options())
        .await
        .unwrap();
    m.rebuild_workspace(&name).await.unwrap();
    assert_eq!(
        wait_built(&conn, &name, Duration::from_secs(300)).await,
        "ready"
    );
    let (_, out, ..) = m
        .exec(&name, "ls /workspace | grep -v '^c-'", no_options())
        .await
        .unwrap();
    assert_eq!(
        out, b"from-init\n",
        "a fresh tree, with the init script's file again"
    );

    // A private network has only lo, and the loopback listener is out of reach.
    let private = unique("private");
    m.create_workspace(container_spec(
        &private,
        vec![
            ("network", Variant::from("private")),
            ("build_on_create", Variant::from(true)),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(
        wait_built(&conn, &private, Duration::from_secs(300)).await,
        "ready"
    );
    let (_, out, ..) = m
        .exec(
            &private,
            "ls /sys/class/net; awk 'NR > 1' /proc/net/route | wc -l",
            no_options(),
        )
        .await
        .unwrap();
    assert_eq!(out, b"lo\n0\n", "only lo, and no routes");
    let (code, ..) = m.exec(&private, &probe, no_options()).await.unwrap();
    assert_ne!(
        code, 0,
        "the test host's loopback listener is unreachable from a private network"
    );
    drop(listener);

    // A failing init script: status error, a message naming the exit code, the log kept.
    let failing = unique("failing");
    m.create_workspace(container_spec(
        &failing,
        vec![("init_script", Variant::from("echo about-to-fail\nexit 3\n"))],
    ))
    .await
    .unwrap();
    m.build_workspace(&failing).await.unwrap();
    assert_eq!(
        wait_built(&conn, &failing, Duration::from_secs(300)).await,
        "error"
    );
    let failed = workspace(&conn, &m.get_workspace(&failing).await.unwrap()).await;
    let message = failed.error_message().await.unwrap();
    assert!(message.contains("exit code 3"), "{message}");
    let (log, _) = m.get_init_log(&failing, 0).await.unwrap();
    assert!(log.contains("about-to-fail"), "{log}");

    // Destroy leaves no unit, machine, tree or record behind.
    let mut ids = Vec::new();
    for n in [&name, &private, &failing] {
        let w = workspace(&conn, &m.get_workspace(n).await.unwrap()).await;
        ids.push(w.id().await.unwrap());
        m.destroy_workspace(n).await.unwrap();
    }
    for (n, id) in [&name, &private, &failing].into_iter().zip(ids) {
        assert_eq!(
            ok(&format!(
                "systemctl list-units --all --no-legend 'agent-workspace*{n}*'"
            )),
            ""
        );
        assert!(!ok("machinectl list --no-legend").contains(n.as_str()));
        assert!(!std::path::Path::new(&format!("/var/lib/machines/{n}")).exists());
        assert!(!std::path::Path::new(&format!("{STATE}/records/{id}.json")).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_survive_restarts_and_a_daemon_killed_mid_build() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let steady = unique("steady");
    m.create_workspace(container_spec(
        &steady,
        vec![
            ("build_on_create", Variant::from(true)),
            ("memory_max", Variant::from(1u64 << 30)),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(
        wait_built(&conn, &steady, Duration::from_secs(600)).await,
        "ready"
    );
    let unit = format!("agent-workspace-{steady}.service");
    assert_eq!(
        systemctl(&format!("show -p MemoryMax --value {unit}")).trim(),
        "1073741824"
    );

    // The debug report.
    let info = m.get_debug_info(&steady).await.unwrap();
    let s = |k: &str| String::try_from(info[k].try_clone().unwrap()).unwrap();
    let b = |k: &str| bool::try_from(&info[k]).unwrap();
    let u = |k: &str| u64::try_from(&info[k]).unwrap();
    assert_eq!(s("status"), "ready");
    assert_eq!(s("tree"), format!("/var/lib/machines/{steady}"));
    assert!(
        b("tree_exists") && u("tree_size_bytes") > 50_000_000,
        "{}",
        u("tree_size_bytes")
    );
    assert!(
        s("os_release").contains("Debian GNU/Linux 12"),
        "{}",
        s("os_release")
    );
    assert_eq!(s("shell"), "/bin/bash");
    assert_eq!(
        (s("machine_state"), s("unit_state")),
        ("running".into(), "active".into())
    );
    assert!(u("leader") > 1);
    let controllers =
        Vec::<String>::try_from(info["cgroup_controllers"].try_clone().unwrap()).unwrap();
    assert_eq!(u("memory_max"), 1 << 30);
    if controllers.iter().any(|c| c == "memory") {
        assert!(b("limits_enforced"));
    } else {
        assert!(
            !b("limits_enforced") && s("limits_note").contains("memory controller"),
            "{}",
            s("limits_note")
        );
    }
    let dirs = Vec::<String>::try_from(info["directories"].try_clone().unwrap()).unwrap();
    assert!(dirs.contains(&"workspace".to_string()) && dirs.contains(&"etc".to_string()));

    // A restart of the service keeps the container running.
    let leader = u("leader");
    restart_service();
    let conn = bus().await;
    let m = manager(&conn).await;
    assert_eq!(
        sh(&format!("systemctl is-active {unit}")).stdout.trim(),
        "active"
    );
    let (code, out, ..) = m
        .exec(&steady, "echo still-here", HashMap::new())
        .await
        .unwrap();
    assert_eq!((code, &out[..]), (0, &b"still-here\n"[..]));
    let now = ok(&format!("machinectl show -p Leader --value {steady}"));
    assert_eq!(
        now.trim(),
        leader.to_string(),
        "the same container, not a new one"
    );

    // kill -9 of the service while a build unit runs: the build is picked up after the restart.
    let killed = unique("killed");
    let init = "echo started-init\nsleep 1\necho finished-init\n";
    m.create_workspace(container_spec(
        &killed,
        vec![("init_script", Variant::from(init))],
    ))
    .await
    .unwrap();
    m.build_workspace(&killed).await.unwrap();
    let build_unit = format!("agent-workspace-build@{killed}.service");
    wait_for("the build unit to run", Duration::from_secs(60), || {
        let state = sh(&format!("systemctl is-active {build_unit}")).stdout;
        matches!(state.trim(), "active" | "activating").then_some(())
    });
    systemctl(&format!("kill --signal=KILL {UNIT}"));
    wait_for(
        "systemd to restart the killed service",
        Duration::from_secs(30),
        || {
            let active = sh(&format!("systemctl show -p ActiveState --value {UNIT}")).stdout;
            let restarts = sh(&format!("systemctl show -p NRestarts --value {UNIT}")).stdout;
            (active.trim() == "active" && restarts.trim() != "0").then_some(())
        },
    );
    let conn = bus().await;
    let m = manager(&conn).await;
    assert_eq!(
        wait_built(&conn, &killed, Duration::from_secs(300)).await,
        "ready"
    );
    let (log, _) = m.get_init_log(&killed, 0).await.unwrap();
    assert!(log.contains("finished-init"), "{log}");
    let journal_text = sh(&format!("journalctl -b -u {UNIT} --no-pager")).stdout;
    assert!(
        journal_text.contains(&format!("Resuming the build of {killed}")),
        "reconciled after the restart"
    );

    for n in [&steady, &killed] {
        m.destroy_workspace(n).await.unwrap();
        assert_eq!(
            sh(&format!("systemctl is-active agent-workspace-{n}.service"))
                .stdout
                .trim(),
            "inactive"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_mirrors_and_missing_keyrings_fail_clearly_and_quickly() {
    require_test_host();
    let config = "/etc/agent-workspaces/config.toml";
    let original = std::fs::read_to_string(config).unwrap_or_default();
    // Port 9 on the test host's loopback: nothing listens, so the probe is refused at once.
    // Applied by a reload: distro settings take effect for the next build without a restart.
    std::fs::write(
        config,
        format!("{original}\n[distro.debian-bookworm]\nmirror = \"http://127.0.0.1:9/debian\"\n"),
    )
    .unwrap();
    systemctl(&format!("reload {UNIT}"));
    let conn = bus().await;
    let m = manager(&conn).await;
    let offline = unique("offline");
    let keyless = unique("keyless");
    let no_wget = unique("no-wget");
    m.create_workspace(container_spec(&offline, vec![]))
        .await
        .unwrap();
    m.create_workspace(container_spec(&no_wget, vec![]))
        .await
        .unwrap();
    let mut noble = container_spec(&keyless, vec![]);
    noble.insert("distro", Variant::from("ubuntu-noble"));
    m.create_workspace(noble).await.unwrap();
    // A missing program is named, with its package: not mistaken for a mirror that is down.
    ok("mv /usr/bin/wget /usr/bin/wget.hidden");
    m.build_workspace(&no_wget).await.unwrap();
    let status = wait_built(&conn, &no_wget, Duration::from_secs(120)).await;
    ok("mv /usr/bin/wget.hidden /usr/bin/wget");
    assert_eq!(status, "error");
    let ws = workspace(&conn, &m.get_workspace(&no_wget).await.unwrap()).await;
    let message = ws.error_message().await.unwrap();
    assert!(
        message.contains("step 'bootstrap': 'wget' is not installed (apt-get install wget)"),
        "{message}"
    );
    m.destroy_workspace(&no_wget).await.unwrap();
    for (name, needle) in [
        (
            &offline,
            "step 'mirror': the mirror does not answer: http://127.0.0.1:9/debian/dists/bookworm/Release",
        ),
        (&keyless, "step 'check'"),
    ] {
        m.build_workspace(name).await.unwrap();
        assert_eq!(
            wait_built(&conn, name, Duration::from_secs(120)).await,
            "error"
        );
        let ws = workspace(&conn, &m.get_workspace(name).await.unwrap()).await;
        let message = ws.error_message().await.unwrap();
        assert!(message.contains(needle), "{name}: {message}");
        m.destroy_workspace(name).await.unwrap();
    }
    // A setting only a restart applies is named in the journal at the reload.
    std::fs::write(
        config,
        original.replace(
            "[container]\n",
            "[container]\nlog_dir = \"/var/log/elsewhere\"\n",
        ),
    )
    .unwrap();
    systemctl(&format!("reload {UNIT}"));
    let named = wait_for("the reload's warning", Duration::from_secs(10), || {
        journal(&format!("-u {UNIT}"))
            .into_iter()
            .filter_map(|e| e["MESSAGE"].as_str().map(String::from))
            .find(|m| m.contains("container.log_dir changed") && m.contains("next restart"))
    });
    assert!(
        named.contains("systemctl restart agent-workspaced"),
        "{named}"
    );
    std::fs::write(config, original).unwrap();
    restart_service();
}

/// Writes a Library at the default path: skills python-dev and web, tool lint, template
/// fullstack (and a malformed template).
fn write_library() -> std::path::PathBuf {
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

fn mode_of(path: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_gives_workspaces_their_skills_tools_and_templates() {
    require_test_host();
    let library = write_library();
    let conn = bus().await;
    let m = manager(&conn).await;

    // A host workspace gets exactly its skills and tools, with their modes.
    let name = unique("lib");
    let skills = Variant::from(vec!["python-dev", "web"]);
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(name.as_str())),
            ("skills", skills),
            ("tools", Variant::from(vec!["lint"])),
        ]))
        .await
        .unwrap();
    let ws = workspace(&conn, &path).await;
    let dir = ws.path().await.unwrap();
    assert_eq!(
        ok(&format!("ls {dir}/.opencode/skill")),
        "python-dev\nweb\n"
    );
    assert_eq!(ok(&format!("ls {dir}/.opencode/tool")), "lint\n");
    assert_eq!(
        mode_of(&format!("{dir}/.opencode/skill/python-dev/scripts/run.sh")),
        0o755
    );
    assert_eq!(mode_of(&format!("{dir}/.opencode/tool/lint")), 0o755);

    // Removing a skill from the list and syncing removes it; Sync reads the Library afresh.
    m.update_workspace(&name, spec(vec![("skills", Variant::from(vec!["web"]))]))
        .await
        .unwrap();
    std::fs::write(library.join("skill/web/SKILL.md"), "# Web v2\n").unwrap();
    m.sync_workspace(&name).await.unwrap();
    assert_eq!(ok(&format!("ls {dir}/.opencode/skill")), "web\n");
    assert_eq!(
        ok(&format!("cat {dir}/.opencode/skill/web/SKILL.md")),
        "# Web v2\n"
    );

    // The default host workspace gets every skill of the Library.
    m.sync_workspace("host").await.unwrap();
    assert_eq!(
        ok(&format!("ls {STATE}/host/.opencode/skill")),
        "python-dev\nweb\n"
    );

    // Names that leave the Library or the workspace, and unknown entries: refused, no change.
    let before = m.list_workspaces().await.unwrap();
    let invalid = "org.freedesktop.DBus.Error.InvalidArgs";
    for bad in ["../../etc", "/etc", "..", ".hidden"] {
        assert_error(
            m.create_workspace(spec(vec![
                ("name", Variant::from("escape")),
                ("skills", Variant::from(vec![bad])),
            ]))
            .await,
            invalid,
            "'skills'",
        );
    }
    assert_error(
        m.update_workspace(
            &name,
            spec(vec![("tools", Variant::from(vec!["../tool/lint"]))]),
        )
        .await,
        invalid,
        "'tools'",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("unknown")),
            ("skills", Variant::from(vec!["nope"])),
        ]))
        .await,
        "org.agent.Workspaces.Error.NoSuchSkill",
        "nope",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("unknown")),
            ("template", Variant::from("nope")),
        ]))
        .await,
        "org.agent.Workspaces.Error.NoSuchTemplate",
        "nope",
    );
    assert_eq!(m.list_workspaces().await.unwrap(), before);
    assert_eq!(
        ok(&format!("ls {dir}/.opencode/tool")),
        "lint\n",
        "unchanged"
    );

    // Templates: the malformed one is left out of the list and reported when asked for.
    let templates = m.list_templates().await.unwrap();
    assert_eq!(
        templates,
        [(
            "fullstack".to_string(),
            "Web and Python".to_string(),
            "debian-bookworm".to_string()
        )]
    );
    let t = m.get_template("fullstack").await.unwrap();
    assert_eq!(
        Vec::<String>::try_from(t["env_var_names"].try_clone().unwrap()).unwrap(),
        ["FROM_TEMPLATE"],
        "names only, no values"
    );
    let broken = m.get_template("broken").await;
    assert_error(
        broken,
        "org.agent.Workspaces.Error.LibraryError",
        "malformed template 'broken'",
    );

    // A container created from the template builds at once with its init script, merged env,
    // skills and tools.
    let boxed = unique("tpl");
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(boxed.as_str())),
            ("template", Variant::from("fullstack")),
            ("env_vars", env_variant(&[("MINE", "1")])),
            ("skills", Variant::from(vec!["python-dev"])),
        ]))
        .await
        .unwrap();
    assert_eq!(
        wait_built(&conn, &boxed, Duration::from_secs(600)).await,
        "ready"
    );
    let from_template = workspace(&conn, &path).await;
    assert_eq!(from_template.workspace_type().await.unwrap(), "container");
    let template_prop: String = from_template
        .inner()
        .get_property("Template")
        .await
        .unwrap();
    assert_eq!(template_prop, "fullstack");
    let (code, out, err, ..) = m
        .exec(
            &boxed,
            "cat /workspace/template-env; echo $MINE $FROM_TEMPLATE; ls /workspace/.opencode/skill /workspace/.opencode/tool",
            no_options(),
        )
        .await
        .unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "yes\n1 yes\n/workspace/.opencode/skill:\npython-dev\nweb\n\n/workspace/.opencode/tool:\nlint\n"
    );

    for n in [&name, &boxed] {
        m.destroy_workspace(n).await.unwrap();
    }
    std::fs::remove_dir_all(&library).unwrap();
}

const TOKEN: &str = "test-token-0123456789abcdef";

/// Runs curl against the socket-activated bridge; returns (HTTP status, body as JSON or text).
fn curl(method: &str, path: &str, token: Option<&str>, args: &str) -> (u16, serde_json::Value) {
    let auth = token.map_or(String::new(), |t| format!("-H 'Authorization: Bearer {t}'"));
    let out = sh(&format!(
        "curl -sS -o /tmp/aw-body -w '%{{http_code}}' -X {method} {auth} {args} 'http://127.0.0.1:7600{path}'"
    ));
    let status: u16 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl: {}{}", out.stdout, out.stderr));
    let body = std::fs::read_to_string("/tmp/aw-body").unwrap_or_default();
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, json)
}

/// Sets up the bridge as an operator would: its user, the token, the socket.
fn bridge_socket_up() {
    ok("systemd-sysusers");
    std::fs::write("/etc/agent-workspaces/api-token", format!("{TOKEN}\n")).unwrap();
    ok("chmod 600 /etc/agent-workspaces/api-token");
    systemctl("start agent-workspaces-http.socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_bridge_serves_the_documented_calls() {
    require_test_host();
    let library = write_library();
    bridge_socket_up();
    let bridge = "agent-workspaces-http.service";
    assert_ne!(
        sh(&format!("systemctl is-active {bridge}")).stdout.trim(),
        "active"
    );

    // No token, a wrong token: 401, nothing done.
    let (status, body) = curl("GET", "/api/workspaces", None, "");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(
        sh(&format!("systemctl is-active {bridge}")).stdout.trim(),
        "active",
        "socket-activated"
    );
    let (status, _) = curl(
        "POST",
        "/api/workspaces",
        Some("wrong-token-000000000"),
        "-d '{\"name\": \"nope\"}'",
    );
    assert_eq!(status, 401);

    // The documented examples (host and token replaced).
    let name = unique("python-project");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!(
            "-H 'Content-Type: application/json' -d '{{\"name\": \"{name}\", \"workspace_type\": \"container\", \"distro\": \"ubuntu-noble\", \"skills\": [\"python-dev\"], \"init_script\": \"#!/bin/bash\\napt install -y python3 python3-pip\"}}'"
        ),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["status"].as_str()),
        (Some(name.as_str()), Some("pending"))
    );
    assert_eq!(body["skills"], serde_json::json!(["python-dev"]));

    let project = unique("my-project");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!("-d '{{\"name\": \"{project}\", \"template\": \"fullstack\"}}'"),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["template"], "fullstack");
    // A container request may take its distro from the template (the dashboard sends this).
    let explicit = unique("explicit");
    let (status, created) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!(
            "-d '{{\"name\": \"{explicit}\", \"workspace_type\": \"container\", \"template\": \"fullstack\", \"build_on_create\": false}}'"
        ),
    );
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (created["distro"].as_str(), created["status"].as_str()),
        (Some("debian-bookworm"), Some("pending"))
    );
    let (status, _) = curl(
        "DELETE",
        &format!("/api/workspaces/{explicit}"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 204);
    let id = body["id"].as_str().unwrap().to_owned();
    let ready = wait_for(
        "the template workspace to build",
        Duration::from_secs(600),
        || {
            let (_, body) = curl("GET", &format!("/api/workspaces/{id}"), Some(TOKEN), "");
            (body["status"] != "building").then_some(body)
        },
    );
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["error_message"], "");

    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{id}/exec"),
        Some(TOKEN),
        "-d '{\"command\": \"cat /workspace/template-env; echo oops >&2; exit 3\"}'",
    );
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"exit_code": 3, "stdout": "yes\n", "stderr": "oops\n", "timed_out": false})
    );
    let (status, body) = curl(
        "GET",
        &format!("/api/workspaces/{project}/init-log"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200);
    assert!(
        body["content"]
            .as_str()
            .unwrap()
            .contains("== init script finished: exit code 0"),
        "{body}"
    );
    let (status, body) = curl(
        "GET",
        &format!("/api/workspaces/{id}/debug"),
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ready")),
        "{body}"
    );
    assert_eq!(body["machine_state"], "running");
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{id}/rerun-init"),
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (status, body["exit_code"].as_i64()),
        (200, Some(0)),
        "{body}"
    );
    let (status, body) = curl("GET", "/api/templates", Some(TOKEN), "");
    assert_eq!(status, 200);
    assert_eq!(body[0]["name"], "fullstack");

    // PATCH: limits reach the running container's unit at once (0 removes one); the network
    // applies at the next start.
    let unit = format!("agent-workspace-{project}.service");
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"limits\": {\"memory_max\": 536870912, \"tasks_max\": 200}, \"env_vars\": {\"NEW\": \"1\"}}'",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["limits"],
        serde_json::json!({"memory_max": 536870912u64, "cpu_quota_percent": 0, "tasks_max": 200})
    );
    assert_eq!(body["env_var_names"], serde_json::json!(["NEW"]));
    assert_eq!(
        systemctl(&format!("show -p MemoryMax -p TasksMax --value {unit}")),
        "536870912\n200\n"
    );
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"limits\": {\"memory_max\": 0}, \"network\": \"private\"}'",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["limits"]["memory_max"].as_u64(),
            body["network"].as_str()
        ),
        (Some(0), Some("private"))
    );
    assert_eq!(
        systemctl(&format!("show -p MemoryMax -p TasksMax --value {unit}")),
        "infinity\n200\n"
    );
    let net = |expect: &str| {
        let (_, body) = curl(
            "POST",
            &format!("/api/workspaces/{id}/exec"),
            Some(TOKEN),
            "-d '{\"command\": \"echo $(ls /sys/class/net)\"}'",
        );
        assert_eq!(body["exit_code"], 0, "{body}");
        let got = body["stdout"].as_str().unwrap().to_owned();
        assert_eq!(got == "lo\n", expect == "lo", "{expect}: {got}");
    };
    net("the host's interfaces until the next start");
    ok(&format!(
        "busctl call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces StopWorkspace s {project}"
    ));
    net("lo");
    let (status, body) = curl(
        "PATCH",
        "/api/workspaces/host",
        Some(TOKEN),
        "-d '{\"network\": \"private\"}'",
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'network'"),
        "{body}"
    );
    // The key came from the service over D-Bus as data, not parsed from the message.
    assert_eq!(body["error"]["field"], "network", "{body}");
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"limits\": {\"memory\": 5}}'",
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'limits.memory'"),
        "{body}"
    );
    assert_eq!(body["error"]["field"], "limits.memory", "{body}");

    // The OpenAPI document, without a token: the checked-in file.
    let (status, doc) = curl("GET", "/api/openapi.json", None, "");
    assert_eq!(status, 200);
    let repo = std::env::var("TESTHOST_REPO").unwrap();
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{repo}/http/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc, checked_in);

    // The list has both, with their status.
    let (status, list) = curl("GET", "/api/workspaces", Some(TOKEN), "");
    assert_eq!(status, 200);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{project} not listed: {list}"));
    assert_eq!(
        (listed["name"].as_str(), listed["status"].as_str()),
        (Some(project.as_str()), Some("ready"))
    );
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == name.as_str())
    );

    // The documented python3 example, in a Debian container whose init script installs it
    // as the documented one does (the Ubuntu archive is out of reach here).
    let py = unique("python-bookworm");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!(
            "-d '{{\"name\": \"{py}\", \"workspace_type\": \"container\", \"distro\": \"debian-bookworm\", \"init_script\": \"#!/bin/bash\\napt install -y python3\"}}'"
        ),
    );
    assert_eq!(status, 201, "{body}");
    if body["status"] == "pending" {
        let (status, body) = curl(
            "POST",
            &format!("/api/workspaces/{py}/build"),
            Some(TOKEN),
            "",
        );
        assert_eq!(status, 202, "{body}");
    }
    let built = wait_for(
        "the python workspace to build",
        Duration::from_secs(600),
        || {
            let (_, body) = curl("GET", &format!("/api/workspaces/{py}"), Some(TOKEN), "");
            (body["status"] != "building" && body["status"] != "pending").then_some(body)
        },
    );
    assert_eq!(built["status"], "ready", "{built}");
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{py}/exec"),
        Some(TOKEN),
        "-d '{\"command\": \"python3 --version\"}'",
    );
    assert_eq!(status, 200, "{body}");
    let version = body["stdout"].as_str().unwrap();
    assert!(
        version.starts_with("Python 3.") && version.ends_with('\n') && version.lines().count() == 1,
        "{body}"
    );
    assert_eq!(
        body,
        serde_json::json!({"exit_code": 0, "stdout": version, "stderr": "", "timed_out": false})
    );
    let (status, _) = curl("DELETE", &format!("/api/workspaces/{py}"), Some(TOKEN), "");
    assert_eq!(status, 204);

    // Errors: 400 naming the field, 404, 409, 413.
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        "-d '{\"name\": \"Bad Name\"}'",
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'name'"),
        "{body}"
    );
    let (status, body) = curl("POST", "/api/workspaces", Some(TOKEN), "-d '{\"name\": 5}'");
    assert_eq!(status, 400, "{body}");
    let (status, body) = curl("GET", "/api/workspaces/no-such-one", Some(TOKEN), "");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!("-d '{{\"name\": \"{project}\"}}'"),
    );
    assert_eq!(status, 409);
    ok("head -c 17000000 /dev/zero > /tmp/aw-big");
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{id}/exec"),
        Some(TOKEN),
        "--data-binary @/tmp/aw-big",
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("too_large"))
    );

    // Without the shipped polkit rule the service refuses the bridge's user: 403.
    let rule = "/usr/share/polkit-1/rules.d/50-agent-workspaces-http.rules";
    let saved = std::fs::read_to_string(rule).unwrap();
    std::fs::remove_file(rule).unwrap();
    let refused = wait_for("polkitd to drop the rule", Duration::from_secs(15), || {
        let (status, body) = curl(
            "POST",
            "/api/workspaces",
            Some(TOKEN),
            "-d '{\"name\": \"refused\"}'",
        );
        (status == 403).then_some(body)
    });
    assert_eq!(refused["error"]["code"], "forbidden");
    std::fs::write(rule, saved).unwrap();
    wait_for(
        "polkitd to load the rule again",
        Duration::from_secs(15),
        || {
            let (status, _) = curl(
                "DELETE",
                &format!("/api/workspaces/{name}"),
                Some(TOKEN),
                "",
            );
            (status == 204).then_some(())
        },
    );

    let (status, _) = curl("DELETE", &format!("/api/workspaces/{id}"), Some(TOKEN), "");
    assert_eq!(status, 204);
    let (status, _) = curl("GET", &format!("/api/workspaces/{id}"), Some(TOKEN), "");
    assert_eq!(status, 404);
    // In case a create slipped through before polkitd dropped the rule.
    curl("DELETE", "/api/workspaces/refused", Some(TOKEN), "");
    std::fs::remove_dir_all(&library).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspacectl_round_trips_and_propagates_exit_codes() {
    require_test_host();
    let name = unique("ctl");
    ok(&format!("workspacectl create {name} --env GREETING=hi"));
    assert!(ok("workspacectl list").contains(&name));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl status {name} --json"))).unwrap();
    assert_eq!(
        (status["Status"].as_str(), status["Type"].as_str()),
        (Some("ready"), Some("host"))
    );
    let run = sh(&format!(
        "workspacectl exec {name} -- sh -c 'echo $GREETING; echo err >&2; exit 7'"
    ));
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (7, "hi\n", "err\n")
    );
    let quoted = sh(&format!(
        "workspacectl exec {name} -- printf '%s|' 'a b' \"it's\""
    ));
    assert_eq!(
        quoted.stdout, "a b|it's|",
        "arguments keep their boundaries"
    );
    let timeout = sh(&format!("workspacectl exec {name} --timeout 1 -- sleep 30"));
    assert_eq!(timeout.code, 124);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl --json exec {name} -- echo x"))).unwrap();
    assert_eq!(json["stdout"], "x\n");
    let refused = sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups workspacectl destroy {name}"
    ));
    assert_eq!(refused.code, 1);
    assert!(
        refused
            .stderr
            .contains("Not authorized to destroy workspace"),
        "{}",
        refused.stderr
    );
    let bad = sh(&format!("workspacectl build {name}"));
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("only container workspaces"),
        "{}",
        bad.stderr
    );
    ok(&format!("workspacectl destroy {name}"));
    let gone = sh(&format!("workspacectl status {name}"));
    assert_eq!(gone.code, 1);
    assert!(
        gone.stderr
            .contains(&format!("No workspace '{name}' known")),
        "{}",
        gone.stderr
    );
}

/// Sends `request` as it is on a new connection to the bridge, then returns all the bridge
/// answers until it closes the connection; fails if it has not within 90 seconds.
fn raw_http(request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect("127.0.0.1:7600").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!(
            "the bridge kept the connection open: {e}; so far: {}",
            String::from_utf8_lossy(&out)
        );
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts a streaming exec with curl; its stdout is the event stream.
fn sse_exec(workspace: &str, body: &str) -> std::process::Child {
    std::process::Command::new("curl")
        .args(["-sS", "-N", "-X", "POST"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["-H", "Accept: text/event-stream", "-d", body])
        .arg(format!(
            "http://127.0.0.1:7600/api/workspaces/{workspace}/exec"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The next server-sent event: (name, data as JSON); None at the end of the stream.
fn next_event(r: &mut impl std::io::BufRead) -> Option<(String, serde_json::Value)> {
    let (mut name, mut data) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            return None;
        }
        let line = line.trim_end_matches('\n');
        if line.is_empty() {
            if !data.is_empty() {
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
        } else if let Some(v) = line.strip_prefix("event:") {
            name = v.trim_start().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_bridge_streams_exec_and_bounds_slow_clients() {
    require_test_host();
    bridge_socket_up();
    let ws = unique("stream");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!("-d '{{\"name\": \"{ws}\"}}'"),
    );
    assert_eq!(status, 201, "{body}");

    // The first line arrives while the command still runs: it waits for a file that is made
    // only after that line was read here.
    let go = format!("/var/tmp/{ws}-go");
    let mut curl_sse = sse_exec(
        &ws,
        &format!(
            r#"{{"command": "echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second >&2; printf 'no newline'; exit 5"}}"#
        ),
    );
    let mut events = std::io::BufReader::new(curl_sse.stdout.take().unwrap());
    let first = next_event(&mut events).expect("a first event");
    assert_eq!(first, ("stdout".to_owned(), serde_json::json!("first\n")));
    assert!(
        curl_sse.try_wait().unwrap().is_none(),
        "the stream is still open"
    );
    std::fs::write(&go, "").unwrap();
    let mut rest = Vec::new();
    while let Some(ev) = next_event(&mut events) {
        rest.push(ev);
    }
    assert!(curl_sse.wait().unwrap().success());
    let text = |stream: &str| -> String {
        rest.iter()
            .filter(|(n, _)| n == stream)
            .map(|(_, d)| d.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(text("stderr"), "second\n");
    assert_eq!(text("stdout"), "no newline");
    assert_eq!(
        rest.last().unwrap(),
        &(
            "exit".to_owned(),
            serde_json::json!({"exit_code": 5, "timed_out": false})
        )
    );
    std::fs::remove_file(&go).unwrap();

    // stdin, cwd and env reach a streamed command; a timeout is the last event.
    let mut c = sse_exec(
        &ws,
        r#"{"command": "cat; echo \"$K\"", "stdin": "in\n", "env": {"K": "v"}}"#,
    );
    let mut r = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut all = Vec::new();
    while let Some(ev) = next_event(&mut r) {
        all.push(ev);
    }
    c.wait().unwrap();
    let out: String = all
        .iter()
        .filter(|(n, _)| n == "stdout")
        .map(|(_, d)| d.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(out, "in\nv\n");
    let mut c = sse_exec(&ws, r#"{"command": "sleep 30", "timeout_secs": 1}"#);
    let mut r = std::io::BufReader::new(c.stdout.take().unwrap());
    let last = std::iter::from_fn(|| next_event(&mut r)).last();
    c.wait().unwrap();
    assert_eq!(
        last,
        Some((
            "exit".to_owned(),
            serde_json::json!({"exit_code": -1, "timed_out": true})
        ))
    );

    // Refusals before the command starts are plain HTTP errors.
    let (status, body) = curl(
        "POST",
        "/api/workspaces/no-such-one/exec",
        Some(TOKEN),
        "-H 'Accept: text/event-stream' -d '{\"command\": \"true\"}'",
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{ws}/exec"),
        Some(TOKEN),
        "-H 'Accept: text/event-stream' -d '{\"command\": \"true\", \"cwd\": \"/no/such/dir\"}'",
    );
    assert_eq!(status, 400, "{body}");

    // A client that leaves mid-stream ends its command.
    let mut c = sse_exec(&ws, r#"{"command": "echo $$; exec sleep 1000"}"#);
    let mut r = std::io::BufReader::new(c.stdout.take().unwrap());
    let (_, pid) = next_event(&mut r).unwrap();
    let pid: u32 = pid.as_str().unwrap().trim().parse().unwrap();
    assert!(!pid_gone(pid), "the command runs");
    c.kill().unwrap();
    c.wait().unwrap();
    wait_for(
        "the abandoned command to end",
        Duration::from_secs(15),
        || pid_gone(pid).then_some(()),
    );

    // Oversized heads are refused; a client that sends a head or a body too slowly is cut off.
    let big = sh(&format!(
        "curl -sS -w ' %{{http_code}}' -H 'Authorization: Bearer {TOKEN}' -H \"X-Big: $(head -c 20000 /dev/zero | tr '\\0' a)\" http://127.0.0.1:7600/api/templates"
    ));
    let (body, code) = big.stdout.trim().rsplit_once(' ').unwrap();
    assert_eq!(code, "431", "{}", big.stderr);
    let error: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(error["error"]["code"], "header_too_large");
    // A method a path does not take: 405 with the documented body and Allow.
    let wrong = sh(&format!(
        "curl -sS -i -X PUT -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7600/api/templates"
    ));
    assert!(wrong.stdout.starts_with("HTTP/1.1 405"), "{}", wrong.stdout);
    assert!(
        wrong.stdout.to_lowercase().contains("\nallow: get"),
        "{}",
        wrong.stdout
    );
    assert!(
        wrong.stdout.contains("\"method_not_allowed\""),
        "{}",
        wrong.stdout
    );
    let slow_head = raw_http(b"GET /api/templates HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(slow_head, "", "closed without an answer");
    let slow_body = raw_http(
        format!(
            "POST /api/workspaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"na"
        )
        .as_bytes(),
    );
    assert!(slow_body.starts_with("HTTP/1.1 408"), "{slow_body}");
    assert!(slow_body.contains("\"code\":\"timeout\""), "{slow_body}");

    let (status, _) = curl("DELETE", &format!("/api/workspaces/{ws}"), Some(TOKEN), "");
    assert_eq!(status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspacectl_streams_live_and_drives_a_container_through_every_verb() {
    require_test_host();
    let library = write_library();
    let host = unique("ctl-live");
    ok(&format!("workspacectl create {host}"));
    // Output appears while the command runs: it waits for a file made only after the first
    // line was read here.
    let go = format!("/var/tmp/{host}-go");
    let mut child = std::process::Command::new("workspacectl")
        .args(["exec", &host, "--", "sh", "-c"])
        .arg(format!(
            "echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second; exit 9"
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "first\n");
    assert!(child.try_wait().unwrap().is_none(), "still running");
    std::fs::write(&go, "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "second\n");
    assert_eq!(child.wait().unwrap().code(), Some(9));
    std::fs::remove_file(&go).unwrap();
    // The command reads workspacectl's own stdin.
    let piped = sh(&format!(
        "printf 'typed\\n' | workspacectl exec {host} -- tr a-z A-Z"
    ));
    assert_eq!((piped.code, piped.stdout.as_str()), (0, "TYPED\n"));
    ok(&format!("workspacectl destroy {host}"));

    // A container through every verb.
    let name = unique("ctl-box");
    std::fs::write(
        "/var/tmp/ctl-init",
        "#!/bin/sh\necho \"init ran $GREETING\"\n",
    )
    .unwrap();
    ok(&format!(
        "workspacectl create {name} --type container --distro debian-bookworm --env GREETING=hi --skill web --init-script /var/tmp/ctl-init"
    ));
    let status = |name: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&format!("workspacectl --json status {name}"))).unwrap()
    };
    assert_eq!(status(&name)["Status"], "pending");
    ok(&format!("workspacectl build {name}"));
    let wait_ready = |what: &str| {
        let s = wait_for(what, Duration::from_secs(600), || {
            let s = status(&name);
            (s["Status"] != "building" && s["Status"] != "pending").then_some(s)
        });
        assert_eq!(s["Status"], "ready", "{s}");
    };
    wait_ready("the container to build");
    let run = sh(&format!(
        "workspacectl exec {name} -- sh -c 'cat /etc/debian_version >/dev/null; echo $GREETING; exit 3'"
    ));
    assert_eq!((run.code, run.stdout.as_str()), (3, "hi\n"));
    let log = ok(&format!("workspacectl init-log {name}"));
    assert!(log.contains("init ran hi"), "{log}");
    let log: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl --json init-log {name} -n 1"))).unwrap();
    assert!(log["total_lines"].as_u64().unwrap() > 1, "{log}");
    let debug: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl --json debug {name}"))).unwrap();
    assert_eq!(debug["machine_state"], "running", "{debug}");
    let rerun = sh(&format!("workspacectl rerun-init {name}"));
    assert_eq!((rerun.code, rerun.stdout.as_str()), (0, "init ran hi\n"));
    let skills = ok(&format!(
        "workspacectl exec {name} -- ls /workspace/.opencode/skill"
    ));
    assert_eq!(skills, "web\n");
    std::fs::write(library.join("skill/web/SKILL.md"), "# Web v2\n").unwrap();
    ok(&format!("workspacectl sync {name}"));
    let skill = ok(&format!(
        "workspacectl exec {name} -- cat /workspace/.opencode/skill/web/SKILL.md"
    ));
    assert_eq!(skill, "# Web v2\n");
    let templates: serde_json::Value =
        serde_json::from_str(&ok("workspacectl --json templates")).unwrap();
    assert_eq!(templates[0]["name"], "fullstack", "{templates}");
    assert!(ok("workspacectl templates").contains("fullstack"));
    ok(&format!(
        "workspacectl exec {name} -- touch /workspace/old-tree"
    ));
    ok(&format!("workspacectl rebuild {name}"));
    wait_ready("the container to rebuild");
    let fresh = sh(&format!(
        "workspacectl exec {name} -- test -e /workspace/old-tree"
    ));
    assert_eq!(fresh.code, 1, "the rebuilt tree is fresh");

    // Every key of the API has its option: an update with limits and new env vars, a command
    // with its own directory and variables.
    ok(&format!(
        "workspacectl update {name} --memory-max 536870912 --tasks-max 300 --env NEW=1"
    ));
    let s = status(&name);
    assert_eq!(
        (&s["MemoryMax"], &s["TasksMax"], &s["EnvVarNames"]),
        (
            &serde_json::json!(536870912),
            &serde_json::json!(300),
            &serde_json::json!(["NEW"])
        )
    );
    let out = ok(&format!(
        "workspacectl exec {name} --cwd .opencode --env X=2 -- sh -c 'pwd; echo $NEW$X'"
    ));
    assert_eq!(out, "/workspace/.opencode\n12\n");
    // The limits reach the running unit (whether the kernel enforces memory depends on the
    // host's delegated controllers; DebugInfo's limits_enforced says so, tested elsewhere).
    assert_eq!(
        systemctl(&format!(
            "show -p MemoryMax -p TasksMax --value agent-workspace-{name}.service"
        )),
        "536870912\n300\n"
    );
    let bad = sh(&format!("workspacectl update {name} --env NOEQUALS"));
    assert!(bad.code == 1 && bad.stderr.contains("KEY=VALUE"), "{bad:?}");
    ok(&format!("workspacectl stop {name}"));
    assert!(!ok("machinectl list --no-legend").contains(&name));
    ok(&format!("workspacectl start {name}"));
    assert!(ok("machinectl list --no-legend").contains(&name));
    assert!(ok("workspacectl library").contains("web"));
    let t: serde_json::Value =
        serde_json::from_str(&ok("workspacectl --json template fullstack")).unwrap();
    assert_eq!(t["env_var_names"], serde_json::json!(["FROM_TEMPLATE"]));

    ok(&format!("workspacectl destroy {name}"));
    assert_eq!(sh(&format!("workspacectl status {name}")).code, 1);
    std::fs::remove_dir_all(&library).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_reports_its_steps_in_build_step() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("steps");
    let path = m
        .create_workspace(container_spec(
            &name,
            vec![("init_script", Variant::from("#!/bin/sh\nsleep 0.5\n"))],
        ))
        .await
        .unwrap();
    // Property changes, as a client watching the workspace sees them.
    let ws = agent_workspaces::dbus::client::WorkspaceProxy::builder(&conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut changes = ws.receive_build_step_changed().await;
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(change) = changes.next().await {
            let step = change.get().await.unwrap();
            let done = step.is_empty() && !seen.is_empty();
            seen.push(step);
            if done {
                break;
            }
        }
        seen
    });
    m.build_workspace(&name).await.unwrap();
    assert_eq!(
        wait_built(&conn, &name, Duration::from_secs(600)).await,
        "ready"
    );
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("BuildStep went back to empty")
        .unwrap();
    // Steps that last a few milliseconds (check, skills) may be coalesced with the next one by
    // systemd's and the proxy's property changes; these take time.
    for step in ["unpack", "start", "init"] {
        assert!(seen.iter().any(|s| s == step), "{step} not in {seen:?}");
    }
    let order = |s: &str| seen.iter().position(|x| x == s).unwrap();
    assert!(
        order("unpack") < order("start") && order("start") < order("init"),
        "{seen:?}"
    );
    assert_eq!(seen.last().map(String::as_str), Some(""));
    m.destroy_workspace(&name).await.unwrap();
}
