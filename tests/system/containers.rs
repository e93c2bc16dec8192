//! Container workspaces on real systemd-nspawn: build, commands, limits, restarts, broken
//! mirrors, build steps.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::Variant;

use super::*;

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

    // A plain command is started by the agent itself (agent/src/direct.rs), as bash would
    // start it: what it sees is what it sees through bash (the comment sends it to bash).
    let sorted_env = |cmd: &'static str| {
        let m = m.clone();
        let name = name.clone();
        async move {
            let (code, out, ..) = m.exec(&name, cmd, no_options()).await.unwrap();
            assert_eq!(code, 0);
            let mut lines: Vec<String> = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines
        }
    };
    let direct = sorted_env("env").await;
    assert_eq!(direct, sorted_env("env # through bash").await);
    for want in [
        "GREETING=hello",
        "PWD=/workspace",
        "SHLVL=0",
        "_=/usr/bin/env",
    ] {
        assert!(direct.iter().any(|l| l == want), "{want} in {direct:?}");
    }
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

    // A network of its own by default: the test host's loopback is not the container's
    // (tests/system/network.rs has the rest).
    assert_eq!(ws.network().await.unwrap(), "internet");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected");
    let (code, out, ..) = m.exec(&name, &probe, no_options()).await.unwrap();
    assert_eq!((code, &out[..]), (1, &b""[..]));

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

    // Stop and start: the machine goes away and comes back on first use, with its files (its
    // layer is mounted again if it was unmounted meanwhile, as after a reboot).
    m.stop_workspace(&name).await.unwrap();
    assert!(!ok("machinectl list --no-legend").contains(&name));
    ok(&format!("umount /var/lib/machines/{name}"));
    let (code, out, ..) = m
        .exec(&name, "cat /workspace/from-init", no_options())
        .await
        .unwrap();
    assert_eq!(
        (code, &out[..]),
        (0, &b"hello from init\n"[..]),
        "started again on first use"
    );

    // The agent killed from the host (kill -9): a running command gets a named error, and the
    // next command works (the container is started again).
    let leader = ok(&format!("machinectl show -p Leader --value {name}"));
    let marker = format!("/var/lib/machines/{name}/workspace/running");
    let running = {
        let m = m.clone();
        let name = name.clone();
        tokio::spawn(async move {
            m.exec(&name, "touch /workspace/running; sleep 60", no_options())
                .await
        })
    };
    let agent = wait_for("the command to start", Duration::from_secs(10), || {
        // The leader is nspawn's stub init; its one child is the agent.
        let agent = sh(&format!("pgrep -P {}", leader.trim()))
            .stdout
            .trim()
            .to_owned();
        (!agent.is_empty() && std::path::Path::new(&marker).exists()).then_some(agent)
    });
    ok(&format!("kill -9 {agent}"));
    let ended = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the running command ends with its agent")
        .unwrap();
    match ended {
        Err(zbus::Error::MethodError(name, ..)) => assert!(
            name.as_str().starts_with("org.agent.Workspaces.Error."),
            "a named error: {name}"
        ),
        other => panic!("the running command should fail with a named error: {other:?}"),
    }
    let (code, out, ..) = m
        .exec(&name, "cat /workspace/from-init", no_options())
        .await
        .unwrap();
    assert_eq!((code, &out[..]), (0, &b"hello from init\n"[..]));

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
    // A build is a mount now, over in milliseconds: it is held in its base step by the base's
    // lock (builds wait for it), so that the service is killed while the build unit runs.
    let config = std::fs::read_to_string("/etc/agent-workspaces/config.toml").unwrap();
    let cache = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("cache_dir = "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "/var/cache/agent-workspaces".into());
    let lock = ok(&format!("ls {cache}/base/debian-bookworm-*.lock | head -1"))
        .trim()
        .to_owned();
    let mut holder = std::process::Command::new("flock")
        .args(["-x", &lock, "sleep", "8"])
        .spawn()
        .unwrap();
    wait_for("the base's lock to be held", Duration::from_secs(5), || {
        (sh(&format!("flock -n {lock} true")).code != 0).then_some(())
    });
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
    holder.wait().unwrap();
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
    // Steps that last a few milliseconds (check, base, unpack of a layered tree, configure,
    // skills) may be coalesced with the next one by systemd's and the proxy's property changes;
    // start and init take time. Whatever is seen comes in the build's order.
    for step in ["start", "init"] {
        assert!(seen.iter().any(|s| s == step), "{step} not in {seen:?}");
    }
    let order = [
        "check",
        "remove-old-tree",
        "mirror",
        "bootstrap",
        "cache",
        "base",
        "unpack",
        "configure",
        "skills",
        "start",
        "init",
    ];
    let positions: Vec<usize> = seen
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            order
                .iter()
                .position(|o| o == s)
                .unwrap_or_else(|| panic!("unknown step {s} in {seen:?}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some(""));
    m.destroy_workspace(&name).await.unwrap();
}
