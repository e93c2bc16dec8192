//! Workspace state: pause and resume through systemd's cgroup freezer, and idle workspaces.

use std::time::Duration;

use super::snapshots::run;
use super::*;

/// A file of the container unit's cgroup.
fn cgroup_file(name: &str, file: &str) -> String {
    let cgroup = systemctl(&format!(
        "show -p ControlGroup --value agent-workspace-{name}.service"
    ));
    std::fs::read_to_string(format!("/sys/fs/cgroup{}/{file}", cgroup.trim())).unwrap_or_default()
}

/// Whether the kernel has the container's cgroup frozen (its `cgroup.events`; systemd's own
/// `FreezerState` has been seen to disagree, and to lag on a loaded machine). Panics, saying
/// what it saw, when not.
fn assert_frozen(name: &str) {
    let events = cgroup_file(name, "cgroup.events");
    assert!(
        events.contains("frozen 1"),
        "{name}: cgroup.events {events:?}, FreezerState {}",
        systemctl(&format!(
            "show -p FreezerState --value agent-workspace-{name}.service"
        ))
        .trim()
    );
}

/// The container unit's cgroup CPU time, in microseconds.
fn cpu_usage_usec(name: &str) -> u64 {
    cgroup_file(name, "cpu.stat")
        .lines()
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
    assert_frozen(&name);
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

#[tokio::test]
async fn an_idle_container_pauses_then_stops_and_comes_back_on_use() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "idle").await;
    let ws = workspace(&conn, &m.get_workspace(&name).await.unwrap()).await;
    m.update_workspace(
        &name,
        spec(vec![
            ("idle_pause_secs", zbus::Variant::from(2u32)),
            ("idle_stop_secs", zbus::Variant::from(8u32)),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(ws.idle_pause_secs().await.unwrap(), 2);
    run(&m, &name, "true").await;
    let status = |want: &'static str| {
        let ws = ws.clone();
        async move {
            for _ in 0..100 {
                if ws.status().await.unwrap() == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    assert!(status("paused").await, "paused after 2 s unused");
    assert_frozen(&name);
    // A command resumes it; then, unused again, it is paused and then stopped.
    let used = std::time::Instant::now();
    assert_eq!(run(&m, &name, "echo back").await, "back\n");
    assert_eq!(ws.status().await.unwrap(), "ready");
    // Not before 8 s unused (the use came after `used`); then within the watch's second and a
    // loaded machine's slack.
    let is_active = || {
        sh(&format!(
            "systemctl is-active agent-workspace-{name}.service"
        ))
        .stdout
        .trim()
        .to_owned()
    };
    let stopped = wait_for("the idle stop", Duration::from_secs(30), || {
        (is_active() == "inactive").then(|| used.elapsed())
    });
    assert!(
        stopped >= Duration::from_secs(8),
        "stopped after {stopped:?}"
    );
    assert_eq!(ws.status().await.unwrap(), "ready");
    // The next command starts it again, its files where they were.
    run(&m, &name, "echo kept > f").await;
    assert_eq!(run(&m, &name, "cat f").await, "kept\n");
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test]
async fn an_open_port_connection_keeps_a_container_from_idling() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("held");
    m.create_workspace(container_spec(
        &name,
        vec![
            ("build_on_create", zbus::Variant::from(true)),
            ("network", zbus::Variant::from("private")),
            ("idle_pause_secs", zbus::Variant::from(2u32)),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(
        wait_built(&conn, &name, Duration::from_secs(1200)).await,
        "ready"
    );
    let ws = workspace(&conn, &m.get_workspace(&name).await.unwrap()).await;
    run(&m, &name, "true").await;
    // A server on the container's loopback that is not one of its processes (those keep it in
    // use anyway): a test-host process in the container's network namespace.
    let leader = ok(&format!("machinectl show -p Leader --value {name}"));
    let mut server = std::process::Command::new("nsenter")
        .args(["-t", leader.trim(), "-n", "perl", "-MIO::Socket::INET", "-e"])
        .arg(
            r#"my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die $!;
               while (my $c = $s->accept) { my $l = <$c>; print $c "got $l"; sleep 3600 }"#,
        )
        .spawn()
        .unwrap();
    let mut lent = None;
    for _ in 0..100 {
        if let Ok(fd) = m.connect_port(&name, 8080).await {
            lent = Some(fd);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lent = lent.expect("the server inside answers");
    // Held for three times the idle limit: in use all along.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            ws.status().await.unwrap(),
            "ready",
            "paused under an open connection"
        );
    }
    let mut stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(lent));
    use std::io::{Read, Write};
    stream.write_all(b"hello\n").unwrap();
    let mut got = [0u8; 10];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"got hello\n", "the connection works");
    let closed = std::time::Instant::now();
    drop(stream);
    let mut paused = None;
    for _ in 0..200 {
        if ws.status().await.unwrap() == "paused" {
            paused = Some(closed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let paused = paused.expect("paused once the connection closed");
    assert!(
        paused >= Duration::from_secs(2),
        "paused {paused:?} after the close"
    );
    let _ = server.kill();
    let _ = server.wait();
    m.destroy_workspace(&name).await.unwrap();
}
