//! Deep stacks: the flatten in the background, with kills in it and a full disk under it.

use std::time::Duration;

use super::snapshots::{
    LAYERS, deaths_at, failpoint, fork_spec, layers_consistent, layers_consistent_in, run,
    wait_consistent,
};
use super::*;

/// The state's read-only layers and the layers a flatten retired.
fn stack_of(name: &str) -> (Vec<String>, Vec<String>) {
    stack_of_in(LAYERS, name)
}

/// The same, in the layers directory `layers`.
fn stack_of_in(layers: &str, name: &str) -> (Vec<String>, Vec<String>) {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{layers}/{name}/state")).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<String> {
        state[key]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    (ids("lowers"), ids("retired"))
}

#[tokio::test]
async fn a_deep_stack_is_flattened_in_the_background_and_reads_the_same() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "deep").await;
    let flatten_at = agent_workspaces::system::containers::layer::FLATTEN_AT;
    // Each stopped snapshot stacks the writable layer as a read-only one: files added,
    // changed and removed, directories replaced, so whiteouts and opaque directories are in
    // the layers to merge.
    let view = "find . | sort; cat log; cat d*/x/*";
    let mut seen = Vec::new();
    // The service is killed in the flatten the 17th snapshot starts, then in the one the
    // 18th starts (before and after its layer is published): each time the stack stays as
    // it was, nothing half made is left, and the next flatten does it.
    let kills = ["flatten-merged", "flatten-published"];
    for i in 0..flatten_at + kills.len() + 1 {
        run(
            &m,
            &name,
            &format!(
                "echo {i} > f{i} && echo {i} >> log && rm -f f{} && rm -rf d{} && mkdir -p d{i}/x && echo {i} > d{i}/x/v",
                i.saturating_sub(2),
                i.saturating_sub(1)
            ),
        )
        .await;
        m.stop_workspace(&name).await.unwrap();
        let kill = i.checked_sub(flatten_at).and_then(|k| kills.get(k));
        let Some(point) = kill else {
            m.snapshot_workspace(&name, &format!("s{i}"), no_options())
                .await
                .unwrap();
            seen.push(run(&m, &name, view).await);
            continue;
        };
        failpoint(Some(point));
        let before = deaths_at(point);
        // Committed before the flatten starts: the reply may come before the kill or not.
        let _ = manager(&bus().await)
            .await
            .snapshot_workspace(&name, &format!("s{i}"), no_options())
            .await;
        wait_for(point, Duration::from_secs(60), || {
            (deaths_at(point) > before).then_some(())
        });
        failpoint(None);
        wait_consistent(LAYERS, point).await;
        assert_eq!(
            stack_of(&name).0.len(),
            i + 1,
            "{point}: the stack as it was"
        );
        seen.push(run(&m, &name, view).await);
        assert!(
            seen[i].contains(&format!("./f{i}\n")),
            "{point}: {}",
            seen[i]
        );
    }
    let last = seen.last().unwrap().clone();
    let n = seen.len() - 1;
    assert!(
        last.contains(&format!("./f{n}\n"))
            && !last.contains(&format!("./f{}\n", n - 2))
            && last.contains(&format!("./d{n}/x/v")),
        "{last}"
    );
    // In the background: the stack becomes one layer, and the running tree keeps reading the
    // old ones (retired) until it is mounted again.
    let (lowers, retired) = wait_for("the flatten", Duration::from_secs(60), || {
        let (lowers, retired) = stack_of(&name);
        (lowers.len() < flatten_at).then_some((lowers, retired))
    });
    assert_eq!(lowers.len(), 1, "one range, one layer: {lowers:?}");
    assert_eq!(retired.len(), n + 1, "{retired:?}");
    let said = journal(&format!("WORKSPACE_NAME={name}"));
    assert!(
        said.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!(
                "Flattened the layers of workspace {name} from {} to 1",
                n + 1
            )))),
        "the journal says it"
    );
    assert_eq!(run(&m, &name, view).await, last, "the running tree");
    // Mounted again (a stopped snapshot unmounts and mounts it): the flattened stack itself.
    m.stop_workspace(&name).await.unwrap();
    m.snapshot_workspace(&name, "after", no_options())
        .await
        .unwrap();
    assert_eq!(stack_of(&name).1, Vec::<String>::new(), "nothing retired");
    assert_eq!(run(&m, &name, view).await, last, "the flattened stack");
    // Earlier snapshots keep their layers and read as they did.
    m.restore_workspace(&name, "s3").await.unwrap();
    assert_eq!(run(&m, &name, view).await, seen[3]);
    let fork = unique("deepfork");
    m.fork_workspace(&name, &format!("s{n}"), fork_spec(&fork))
        .await
        .unwrap();
    assert_eq!(run(&m, &fork, view).await, last);
    m.destroy_workspace(&fork).await.unwrap();
    m.destroy_workspace(&name).await.unwrap();
    layers_consistent().unwrap();
}

/// The service's trees on a file system of their own (`machines_dir`), until dropped.
struct MachinesDir {
    dir: String,
    original: String,
}

impl MachinesDir {
    /// A tmpfs of the test host with `inodes` inodes at most, mounted at `dir`.
    fn small_tmpfs(dir: &str, inodes: u64) -> Self {
        let config = "/etc/agent-workspaces/config.toml";
        let original = std::fs::read_to_string(config).unwrap_or_default();
        std::fs::create_dir_all(dir).unwrap();
        ok(&format!(
            "mount -t tmpfs -o size=1g,nr_inodes={inodes},mode=0755 aw-small {dir}"
        ));
        std::fs::write(
            config,
            original.replace(
                "[container]\n",
                &format!("[container]\nmachines_dir = \"{dir}\"\n"),
            ),
        )
        .unwrap();
        restart_service();
        Self {
            dir: dir.to_owned(),
            original,
        }
    }
}

impl Drop for MachinesDir {
    fn drop(&mut self) {
        let _ = std::fs::write("/etc/agent-workspaces/config.toml", &self.original);
        let _ = sh(&format!("systemctl restart {UNIT}"));
        let _ = sh(&format!("umount -l {}", self.dir));
    }
}

/// Files made in `dir` until the file system says it is full (no inode left); their paths.
fn fill_inodes(dir: &str) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut made = Vec::new();
    loop {
        let path = format!("{dir}/{}", made.len());
        match std::fs::File::create(&path) {
            Ok(_) => made.push(path),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "{path}: {e}");
                return made;
            }
        }
    }
}

#[tokio::test]
async fn a_full_disk_during_a_flatten_leaves_the_stack_as_it_was() {
    require_test_host();
    let small = MachinesDir::small_tmpfs("/var/lib/aw-small-machines", 200_000);
    let layers = format!("{}/.agent-workspaces-layers", small.dir);
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "full").await;
    assert!(
        std::path::Path::new(&format!("{layers}/{name}/state")).is_file(),
        "a layered tree on the tmpfs"
    );
    let flatten_at = agent_workspaces::system::containers::layer::FLATTEN_AT;
    // As deep as a stack gets without a flatten, each layer with directories of its own.
    for i in 0..flatten_at {
        run(
            &m,
            &name,
            &format!("mkdir -p d{i}/a/b/c && echo {i} > d{i}/a/b/c/f"),
        )
        .await;
        m.stop_workspace(&name).await.unwrap();
        m.snapshot_workspace(&name, &format!("s{i}"), no_options())
            .await
            .unwrap();
    }
    run(&m, &name, "echo last > last").await;
    m.stop_workspace(&name).await.unwrap();
    // The file system full but for 30 inodes: the next snapshot (a new layer, and the mount
    // points of its layers while they are mounted) fits; the flatten it starts (a directory
    // for each of the 60 and more its layers hold) does not.
    let mut filler = fill_inodes(&format!("{}/filler", small.dir));
    for path in filler.split_off(filler.len() - 30) {
        std::fs::remove_file(path).unwrap();
    }
    m.snapshot_workspace(&name, "full", no_options())
        .await
        .unwrap();
    let said = wait_for("the flatten's failure", Duration::from_secs(60), || {
        journal(&format!("WORKSPACE_NAME={name}"))
            .iter()
            .filter_map(|e| e["MESSAGE"].as_str().map(str::to_owned))
            .find(|m| m.starts_with(&format!("Cannot flatten the layers of workspace {name}")))
    });
    assert!(said.contains("No space left on device"), "{said}");
    assert_eq!(
        stack_of_in(&layers, &name).0.len(),
        flatten_at + 1,
        "the stack as it was"
    );
    assert_eq!(layers_consistent_in(&layers), Ok(()), "nothing half made");
    // Room again: the next snapshot's flatten goes through, and the tree reads the same.
    for path in filler {
        std::fs::remove_file(path).unwrap();
    }
    run(&m, &name, "echo more > more").await;
    m.stop_workspace(&name).await.unwrap();
    m.snapshot_workspace(&name, "room", no_options())
        .await
        .unwrap();
    wait_for("the flatten", Duration::from_secs(60), || {
        (stack_of_in(&layers, &name).0.len() == 1).then_some(())
    });
    assert_eq!(
        run(&m, &name, "cat d3/a/b/c/f d15/a/b/c/f last more").await,
        "3\n15\nlast\nmore\n"
    );
    m.destroy_workspace(&name).await.unwrap();
    assert_eq!(layers_consistent_in(&layers), Ok(()));
    drop(small);
}
