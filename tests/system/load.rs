//! Many requests at once: commands beyond max_concurrent wait for a place, 256 commands at once
//! on one container all succeed, and 20 builds at once all reach ready.

use std::time::{Duration, Instant};

use zbus::Variant;

use super::*;

/// `count` commands `sleep 1; echo I` at once in `workspace`, spread over 8 bus connections (the
/// system bus allows a connection 128 calls in flight, and a user 256 connections); every one
/// must succeed with its own output.
async fn burst(workspace: &str, count: usize) -> Duration {
    let mut proxies = Vec::new();
    for _ in 0..8 {
        let conn = bus().await;
        proxies.push(manager(&conn).await);
    }
    let start = Instant::now();
    let calls = (0..count).map(|i| {
        let m = proxies[i % proxies.len()].clone();
        async move {
            let options = spec(vec![("timeout_secs", Variant::from(120u32))]);
            (
                i,
                m.exec(workspace, &format!("sleep 1; echo {i}"), options)
                    .await,
            )
        }
    });
    for (i, r) in futures_util::future::join_all(calls).await {
        let (code, out, err, timed_out, _) = r.unwrap_or_else(|e| panic!("exec {i}: {e}"));
        assert_eq!(
            (code, timed_out, String::from_utf8_lossy(&out).into_owned()),
            (0, false, format!("{i}\n")),
            "exec {i}: {}",
            String::from_utf8_lossy(&err)
        );
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_six_commands_at_once_all_succeed() {
    require_test_host();
    let conn = bus().await;
    let name = super::boundary::ready_container(&conn, "burst").await;
    // The default max_concurrent (64): the rest wait for a place (queue_timeout_secs = 10).
    let queued = burst(&name, 256).await;
    assert!(
        queued >= Duration::from_secs(4),
        "256 one-second commands ran 64 at a time, so in 4 rounds: {queued:?}"
    );
    burst("host", 256).await;
    // max_concurrent = 256: all at once, container and host.
    let config = "/etc/agent-workspaces/config.toml";
    let original = std::fs::read_to_string(config).unwrap_or_default();
    std::fs::write(
        config,
        format!("[exec]\nmax_concurrent = 256\n\n{original}"),
    )
    .unwrap();
    systemctl(&format!("reload {UNIT}"));
    burst(&name, 256).await;
    burst("host", 256).await;
    std::fs::write(config, original).unwrap();
    systemctl(&format!("reload {UNIT}"));
    manager(&conn).await.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_builds_at_once_all_reach_ready() {
    require_test_host();
    let conn = bus().await;
    let names = ready_containers_at_once(&conn, "many", 20).await;
    let m = manager(&conn).await;
    for name in &names {
        m.destroy_workspace(name).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_answering_while_it_removes_a_large_tree_and_copies_a_large_library() {
    require_test_host();
    // A Library skill of 20 000 files, and a host workspace directory of 200 000.
    let library = write_library();
    ok(&format!(
        "mkdir -p {lib}/skill/huge/files && echo '# Huge' > {lib}/skill/huge/SKILL.md && cd {lib}/skill/huge/files && seq 20000 | xargs touch",
        lib = library.display()
    ));
    let conn = bus().await;
    let m = manager(&conn).await;
    let big = unique("big");
    let path = m.create_workspace(named(&big)).await.unwrap();
    let dir = workspace(&conn, &path).await.path().await.unwrap();
    ok(&format!(
        "mkdir {dir}/tree && cd {dir}/tree && for i in $(seq 40); do mkdir $i && (cd $i && seq 5000 | xargs touch); done"
    ));
    let copier = unique("copier");
    m.create_workspace(named(&copier)).await.unwrap();

    // Both at once: the skill's copy (UpdateWorkspace) and the tree's removal (Destroy).
    let start = Instant::now();
    let work = {
        let (m, big, copier) = (m.clone(), big.clone(), copier.clone());
        tokio::spawn(async move {
            let skills = spec(vec![("skills", Variant::from(vec!["huge"]))]);
            tokio::join!(
                m.update_workspace(&copier, skills),
                m.destroy_workspace(&big)
            )
        })
    };
    let (mut worst, mut calls) = (Duration::ZERO, 0);
    while !work.is_finished() {
        let t = Instant::now();
        m.list_workspaces().await.unwrap();
        worst = worst.max(t.elapsed());
        calls += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (updated, destroyed) = work.await.unwrap();
    updated.unwrap();
    destroyed.unwrap();
    let took = start.elapsed();
    assert!(
        calls >= 10,
        "the work took {took:?}, too short to show whether the service answers meanwhile"
    );
    assert!(
        worst < Duration::from_millis(100),
        "ListWorkspaces took up to {worst:?} while a tree was removed and a Library entry copied ({calls} calls in {took:?})"
    );
    let copied = std::fs::read_dir(format!(
        "{}/.opencode/skill/huge/files",
        workspace(&conn, &m.get_workspace(&copier).await.unwrap())
            .await
            .path()
            .await
            .unwrap()
    ))
    .unwrap()
    .count();
    assert_eq!(copied, 20000);
    assert!(!std::path::Path::new(&dir).exists(), "the tree was removed");
    m.destroy_workspace(&copier).await.unwrap();
    std::fs::remove_dir_all(library.join("skill/huge")).unwrap();
}
