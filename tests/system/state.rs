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
