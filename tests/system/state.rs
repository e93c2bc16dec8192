//! Workspace state: pause and resume through systemd's cgroup freezer.

use std::time::Duration;

use super::*;

/// The container unit's cgroup CPU time, in microseconds.
fn cpu_usage_usec(name: &str) -> u64 {
    let cgroup = systemctl(&format!(
        "show -p ControlGroup --value agent-workspace-{name}.service"
    ));
    let stat =
        std::fs::read_to_string(format!("/sys/fs/cgroup{}/cpu.stat", cgroup.trim())).unwrap();
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_paused_container_uses_no_cpu_and_the_next_exec_resumes_it() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "pause").await;
    let ws = workspace(&conn, &m.get_workspace(&name).await.unwrap()).await;
    m.start_process(&name, "while :; do :; done", no_options())
        .await
        .unwrap();
    let before = cpu_usage_usec(&name);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        cpu_usage_usec(&name) > before + 100_000,
        "the busy loop runs"
    );

    m.pause_workspace(&name).await.unwrap();
    assert_eq!(ws.status().await.unwrap(), "paused");
    assert_eq!(
        systemctl(&format!(
            "show -p FreezerState --value agent-workspace-{name}.service"
        ))
        .trim(),
        "frozen"
    );
    let frozen = cpu_usage_usec(&name);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        cpu_usage_usec(&name),
        frozen,
        "a paused container uses no CPU"
    );
    // The next command resumes it; the busy loop was kept and runs again.
    let (code, out, ..) = m.exec(&name, "echo resumed", no_options()).await.unwrap();
    assert_eq!((code, out.as_slice()), (0, b"resumed\n".as_slice()));
    assert_eq!(ws.status().await.unwrap(), "ready");
    let thawed = cpu_usage_usec(&name);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cpu_usage_usec(&name) > thawed + 100_000, "it runs again");

    // Pause and resume by the workspace's own object; a stopped container cannot be paused.
    ws.pause().await.unwrap();
    ws.resume().await.unwrap();
    assert_eq!(ws.status().await.unwrap(), "ready");
    m.stop_workspace(&name).await.unwrap();
    assert_error(
        m.pause_workspace(&name).await,
        "org.agent.Workspaces.Error.JobFailed",
        "not running",
    );
    assert_eq!(ws.status().await.unwrap(), "ready");
    // A paused workspace is stopped and destroyed like any other.
    m.start_workspace(&name).await.unwrap();
    m.pause_workspace(&name).await.unwrap();
    m.destroy_workspace(&name).await.unwrap();
}

const LAYERS: &str = "/var/lib/machines/.agent-workspaces-layers";

/// Runs `script` in `workspace`; its stdout, after checking it exited 0.
async fn run(
    m: &agent_workspaces::dbus::client::WorkspacesProxy<'_>,
    workspace: &str,
    script: &str,
) -> String {
    let (code, out, err, ..) = m.exec(workspace, script, no_options()).await.unwrap();
    assert_eq!(code, 0, "{script}: {}", String::from_utf8_lossy(&err));
    String::from_utf8(out).unwrap()
}

/// The layers a workspace's stack names (its state file).
fn layers_of(name: &str) -> Vec<String> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{LAYERS}/{name}/state")).unwrap()).unwrap();
    let mut ids: Vec<String> = state["lowers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ids.extend(state["upper"].as_str().map(str::to_owned));
    for s in state["snapshots"].as_array().unwrap() {
        ids.extend(
            s["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
    }
    ids
}

fn fork_spec(name: &str) -> agent_workspaces::dbus::client::Args<'_> {
    spec(vec![("name", zbus::Variant::from(name))])
}

#[tokio::test]
async fn snapshots_forks_and_restores_keep_every_tree_its_own() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let src = ready_container_named(&conn, "snap").await;
    let ws = workspace(&conn, &m.get_workspace(&src).await.unwrap()).await;
    run(&m, &src, "mkdir -p d && head -c 3000000 /dev/urandom > d/big && echo one > a && sha256sum d/big > sum").await;
    let sum = run(&m, &src, "cat sum").await;

    // Running: the container frozen for the capture, its writable layer copied.
    m.snapshot_workspace(&src, "s1", no_options())
        .await
        .unwrap();
    assert_eq!(
        ws.status().await.unwrap(),
        "ready",
        "thawed after the capture"
    );
    run(&m, &src, "echo two > a && rm d/big").await;
    let listed = m.list_snapshots(&src).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "s1");
    assert!(listed[0].2 >= 3_000_000, "its own bytes: {}", listed[0].2);
    assert_eq!(ws.snapshots().await.unwrap(), ["s1"]);
    assert!(ws.disk_usage().await.unwrap() > 0);
    assert_error(
        m.snapshot_workspace(&src, "s1", no_options()).await,
        "org.agent.Workspaces.Error.SnapshotExists",
        "s1",
    );

    // A fork of the snapshot: its files byte for byte, its own name and machine id.
    let f1 = unique("fork");
    m.fork_workspace(&src, "s1", fork_spec(&f1)).await.unwrap();
    assert_eq!(run(&m, &f1, "cat a").await, "one\n");
    assert_eq!(run(&m, &f1, "sha256sum d/big").await, sum);
    assert_eq!(run(&m, &f1, "hostname").await.trim(), f1);
    assert_ne!(
        run(&m, &f1, "cat /etc/machine-id").await,
        run(&m, &src, "cat /etc/machine-id").await
    );
    // Its changes are its own; a sibling from the same snapshot sees none of them.
    run(&m, &f1, "echo mine > only-f1 && echo changed > a").await;
    let f2 = unique("fork");
    m.fork_workspace(&src, "s1", fork_spec(&f2)).await.unwrap();
    assert_eq!(run(&m, &f2, "cat a; ls").await, "one\na\nd\nsum\n");
    assert_eq!(run(&m, &src, "cat a; ls").await, "two\na\nd\nsum\n");

    // A fork of the source as it is now (running: its writable layer copied).
    let f3 = unique("fork");
    m.fork_workspace(&src, "", fork_spec(&f3)).await.unwrap();
    assert_eq!(run(&m, &f3, "cat a; ls d | wc -l").await, "two\n0\n");

    // Stopped: the snapshot moves the writable layer under a fresh one.
    m.stop_workspace(&src).await.unwrap();
    let before = layers_of(&src).len();
    m.snapshot_workspace(&src, "s2", no_options())
        .await
        .unwrap();
    assert!(layers_of(&src).len() > before);
    assert_eq!(run(&m, &src, "cat a").await, "two\n");

    // Restore: processes end, the tree is the snapshot's, the container runs again.
    let proc = m
        .start_process(&src, "sleep 1000", no_options())
        .await
        .unwrap();
    m.restore_workspace(&src, "s1").await.unwrap();
    assert_eq!(run(&m, &src, "cat a").await, "one\n");
    assert_eq!(run(&m, &src, "sha256sum d/big").await, sum);
    let p = super::processes::process(&conn, proc).await;
    assert!(
        !p.running().await.unwrap(),
        "the restore ended its processes"
    );
    assert_error(
        m.restore_workspace(&src, "nope").await,
        "org.agent.Workspaces.Error.NoSuchSnapshot",
        "nope",
    );

    // Deleting the snapshot, and then the source, keeps what the forks use.
    m.delete_snapshot(&src, "s1").await.unwrap();
    assert_eq!(ws.snapshots().await.unwrap(), ["s2"]);
    let f1_layers = layers_of(&f1);
    m.destroy_workspace(&src).await.unwrap();
    for id in &f1_layers {
        assert!(
            std::path::Path::new(&format!("{LAYERS}/.shared/{id}")).is_dir(),
            "{id} is kept"
        );
    }
    m.stop_workspace(&f1).await.unwrap();
    assert_eq!(
        run(&m, &f1, "cat a only-f1; sha256sum d/big").await,
        format!("changed\nmine\n{sum}")
    );

    // Host workspaces have no layers to snapshot.
    assert_error(
        m.snapshot_workspace("host", "x", no_options()).await,
        "org.agent.Workspaces.Error.NotSupported",
        "copy-on-write",
    );
    for f in [&f1, &f2, &f3] {
        m.destroy_workspace(f).await.unwrap();
    }
    // With every user gone, their layers are gone too.
    for id in &f1_layers {
        assert!(
            !std::path::Path::new(&format!("{LAYERS}/.shared/{id}")).exists(),
            "{id} is removed"
        );
    }
}

#[tokio::test]
async fn twenty_forks_of_one_workspace_at_once() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let src = ready_container_named(&conn, "many").await;
    run(&m, &src, "echo shared > s").await;
    m.snapshot_workspace(&src, "base", no_options())
        .await
        .unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("{src}-f{i}")).collect();
    let forks = names.iter().enumerate().map(|(i, n)| {
        let m = m.clone();
        let src = src.clone();
        async move {
            // Half from the snapshot, half from the source as it is.
            let snapshot = if i % 2 == 0 { "base" } else { "" };
            m.fork_workspace(&src, snapshot, fork_spec(n)).await
        }
    });
    for r in futures_util::future::join_all(forks).await {
        r.unwrap();
    }
    let outs = futures_util::future::join_all(names.iter().map(|n| {
        let m = m.clone();
        async move {
            let (code, out, ..) = m
                .exec(n, "cat s; echo $(hostname) > mine; cat mine", no_options())
                .await
                .unwrap();
            (code, String::from_utf8(out).unwrap())
        }
    }))
    .await;
    for (n, (code, out)) in names.iter().zip(outs) {
        assert_eq!((code, out), (0, format!("shared\n{n}\n")));
    }
    assert_eq!(
        run(&m, &src, "ls").await,
        "s\n",
        "the forks' files are theirs"
    );
    for n in names.iter().chain([&src]) {
        m.destroy_workspace(n).await.unwrap();
    }
}
