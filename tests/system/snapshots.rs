//! Workspace state: snapshots, restores, forks and the flatten of deep stacks, through the
//! service, with kills at each step.

use std::time::Duration;

use super::*;

pub(super) const LAYERS: &str = "/var/lib/machines/.agent-workspaces-layers";

/// Runs `script` in `workspace`; its stdout, after checking it exited 0.
pub(super) async fn run(
    m: &agent_workspaces::dbus::client::WorkspacesProxy<'_>,
    workspace: &str,
    script: &str,
) -> String {
    let (code, out, err, ..) = m.exec(workspace, script, no_options()).await.unwrap();
    assert_eq!(code, 0, "{script}: {}", String::from_utf8_lossy(&err));
    String::from_utf8(out).unwrap()
}

/// The layers a workspace's stack names (its state file).
pub(super) fn layers_of(name: &str) -> Vec<String> {
    layers_of_in(LAYERS, name)
}

/// The same, in the layers directory `layers`.
pub(super) fn layers_of_in(layers: &str, name: &str) -> Vec<String> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{layers}/{name}/state")).unwrap()).unwrap();
    let mut ids: Vec<String> = state["lowers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ids.extend(state["upper"].as_str().map(str::to_owned));
    for l in state["retired"].as_array().into_iter().flatten() {
        ids.push(l.as_str().unwrap().to_owned());
    }
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

pub(super) fn fork_spec(name: &str) -> agent_workspaces::dbus::client::Args<'_> {
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

/// The service's failpoint (see `src/failpoint.rs`): set, or cleared with `None`, and the
/// service restarted with it.
pub(super) fn failpoint(point: Option<&str>) {
    let dropin = format!("/run/systemd/system/{UNIT}.d/failpoint.conf");
    match point {
        Some(p) => {
            std::fs::create_dir_all(format!("/run/systemd/system/{UNIT}.d")).unwrap();
            std::fs::write(
                &dropin,
                format!("[Service]\nEnvironment=AGENT_WORKSPACES_FAILPOINT={p}\n"),
            )
            .unwrap();
        }
        None => {
            let _ = std::fs::remove_file(&dropin);
        }
    }
    systemctl("daemon-reload");
    restart_service();
}

/// Every layer in `.shared` is named by a state, every layer a state names is there, and no
/// layer is half made: what a start-up after a crash must leave.
pub(super) fn layers_consistent() -> Result<(), String> {
    layers_consistent_in(LAYERS)
}

/// The same, in the layers directory `layers`.
pub(super) fn layers_consistent_in(layers: &str) -> Result<(), String> {
    let mut named = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(layers).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if e.path().join("forking").exists() {
            return Err(format!("{name} is still marked as a fork under way"));
        }
        if e.path().join("state").exists() {
            named.extend(layers_of_in(layers, &name));
        }
    }
    let present: std::collections::BTreeSet<String> =
        std::fs::read_dir(format!("{layers}/.shared"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    if named == present {
        Ok(())
    } else {
        Err(format!("named {named:?}, present {present:?}"))
    }
}

/// How many times this boot's journal says the service was killed at failpoint `point`.
pub(super) fn deaths_at(point: &str) -> usize {
    let said = format!("failpoint {point}: killing the service");
    journal(&format!("-u {UNIT}"))
        .iter()
        .filter(|e| e["MESSAGE"].as_str() == Some(said.as_str()))
        .count()
}

/// Waits (20 s at most) until the layers in `layers` are consistent: the start-up's clean-up
/// after the kill at `point` runs in the background.
pub(super) async fn wait_consistent(layers: &str, point: &str) {
    let mut last = Err(String::new());
    for _ in 0..100 {
        last = layers_consistent_in(layers);
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, Ok(()), "{point}: the layers after the restart");
}

#[tokio::test]
async fn a_kill_at_each_step_leaves_the_old_state_or_the_new() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let src = ready_container_named(&conn, "crash").await;
    run(&m, &src, "echo one > a").await;
    m.snapshot_workspace(&src, "s0", no_options())
        .await
        .unwrap();
    run(&m, &src, "echo two > a").await;
    // (failpoint, the source runs, the call); after the crash `a` reads "one" or "two".
    type Call = fn(
        &agent_workspaces::dbus::client::WorkspacesProxy<'static>,
        &str,
        &str,
    ) -> futures_util::future::BoxFuture<'static, zbus::Result<()>>;
    fn snap(
        m: &agent_workspaces::dbus::client::WorkspacesProxy<'static>,
        src: &str,
        _: &str,
    ) -> futures_util::future::BoxFuture<'static, zbus::Result<()>> {
        let (m, src) = (m.clone(), src.to_owned());
        Box::pin(async move { m.snapshot_workspace(&src, "s1", no_options()).await })
    }
    fn restore(
        m: &agent_workspaces::dbus::client::WorkspacesProxy<'static>,
        src: &str,
        _: &str,
    ) -> futures_util::future::BoxFuture<'static, zbus::Result<()>> {
        let (m, src) = (m.clone(), src.to_owned());
        Box::pin(async move { m.restore_workspace(&src, "s0").await })
    }
    fn fork_now(
        m: &agent_workspaces::dbus::client::WorkspacesProxy<'static>,
        src: &str,
        f: &str,
    ) -> futures_util::future::BoxFuture<'static, zbus::Result<()>> {
        let (m, src, f) = (m.clone(), src.to_owned(), f.to_owned());
        Box::pin(async move { m.fork_workspace(&src, "", fork_spec(&f)).await.map(|_| ()) })
    }
    fn fork_s0(
        m: &agent_workspaces::dbus::client::WorkspacesProxy<'static>,
        src: &str,
        f: &str,
    ) -> futures_util::future::BoxFuture<'static, zbus::Result<()>> {
        let (m, src, f) = (m.clone(), src.to_owned(), f.to_owned());
        Box::pin(async move {
            m.fork_workspace(&src, "s0", fork_spec(&f))
                .await
                .map(|_| ())
        })
    }
    let steps: [(&str, bool, Call); 12] = [
        ("snapshot-copied", true, snap),
        ("snapshot-published", true, snap),
        ("snapshot-unmounted", false, snap),
        ("snapshot-committed", false, snap),
        ("restore-unmounted", true, restore),
        ("restore-published", true, restore),
        ("restore-committed", true, restore),
        ("fork-copied", true, fork_now),
        ("fork-source-rebased", false, fork_now),
        ("fork-committed", true, fork_s0),
        ("fork-tree-made", true, fork_s0),
        ("fork-saved", true, fork_s0),
    ];
    for (point, running, call) in steps {
        if running {
            m.start_workspace(&src).await.unwrap();
        } else {
            m.stop_workspace(&src).await.unwrap();
        }
        let f = unique("crashfork");
        failpoint(Some(point));
        let m2 = manager(&bus().await).await;
        let before = deaths_at(point);
        let r = call(&m2, &src, &f).await;
        assert!(
            r.is_err(),
            "{point}: the service was to die in the call, it answered"
        );
        // It died there, not of an error before it.
        assert_eq!(
            deaths_at(point),
            before + 1,
            "{point}: the call failed otherwise: {r:?}"
        );
        failpoint(None);
        let m = manager(&bus().await).await;
        wait_consistent(LAYERS, point).await;
        let a = run(&m, &src, "cat a").await;
        assert!(
            a == "one\n" || a == "two\n",
            "{point}: the source reads {a:?}"
        );
        let snapshots: Vec<String> = m
            .list_snapshots(&src)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert!(
            snapshots.iter().any(|s| s == "s0"),
            "{point}: {snapshots:?}"
        );
        // A fork is whole and works, or it is not there at all.
        let listed = m.list_workspaces().await.unwrap().iter().any(|w| w.1 == f);
        let tree = std::path::Path::new("/var/lib/machines").join(&f);
        if listed {
            let fa = run(&m, &f, "cat a").await;
            assert!(
                fa == "one\n" || fa == "two\n",
                "{point}: the fork reads {fa:?}"
            );
            m.destroy_workspace(&f).await.unwrap();
        } else {
            assert!(
                !tree.exists(),
                "{point}: a fork without a record left {}",
                tree.display()
            );
            assert!(
                !std::path::Path::new(&format!("{LAYERS}/{f}")).exists(),
                "{point}"
            );
        }
        // Leave the source as each step expects it: "two" again, no s1.
        if snapshots.iter().any(|s| s == "s1") {
            m.delete_snapshot(&src, "s1").await.unwrap();
        }
        run(&m, &src, "echo two > a").await;
    }
    m.destroy_workspace(&src).await.unwrap();
    assert_eq!(layers_consistent(), Ok(()));
}
