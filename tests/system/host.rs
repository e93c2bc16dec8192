//! Host workspaces: their lifecycle, commands (streams, codes, timeouts, concurrency,
//! cancellation) and every bad input's named error.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::Variant;

use super::*;

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
    // A command's cgroup is emptied (then kept, empty, for a next command, or removed), just
    // after the answer: no process is left in any.
    let dir = format!("/sys/fs/cgroup/system.slice/{UNIT}");
    wait_for(
        "every command cgroup empty, at most 16 kept",
        Duration::from_secs(5),
        || {
            let events = sh(&format!("cat {dir}/exec-*/cgroup.events 2>/dev/null")).stdout;
            let kept = sh(&format!("ls -d {dir}/exec-* 2>/dev/null | wc -l")).stdout;
            (!events.contains("populated 1") && kept.trim().parse::<usize>().unwrap() <= 16)
                .then_some(())
        },
    );
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
