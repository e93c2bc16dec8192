//! Who owns a container's tree where it cannot be layered: trees unpacked whole are chowned to
//! the container's range (the layered and idmapped path is checked in `boundary.rs`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::boundary::{inside, ready_container};
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_idmapped_mounts_are_missing_the_tree_is_chowned_to_the_containers_range() {
    require_test_host();
    // The test host's own overlay has no idmapped mounts: trees there take the chown path.
    let config = "/etc/agent-workspaces/config.toml";
    let original = std::fs::read_to_string(config).unwrap_or_default();
    let overlay = "/var/lib/aw-overlay-machines";
    std::fs::create_dir_all(overlay).unwrap();
    std::fs::write(
        config,
        original.replace(
            "[container]\n",
            &format!("[container]\nmachines_dir = \"{overlay}\"\n"),
        ),
    )
    .unwrap();
    restart_service();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container(&conn, "chowned").await;
    let tree = format!("{overlay}/{name}");
    let root_uid = std::fs::metadata(&tree).unwrap().uid();
    let map = inside(&m, &name, "cat /proc/self/uid_map").await;
    let base: u32 = map.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(root_uid, 0, "the tree was not chowned");
    assert_eq!(
        root_uid, base,
        "the tree belongs to the container's range: {map}"
    );
    // What the service put there belongs to that range's root, on disk and inside.
    for file in [
        ".agent-workspaces/init",
        "workspace/.opencode/skill/web/SKILL.md",
        "workspace/.opencode/tool/lint",
    ] {
        let meta = std::fs::metadata(format!("{tree}/{file}")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (base, base), "{file}");
    }
    assert_eq!(
        inside(&m, &name, "stat -c %u /.agent-workspaces/init; touch /workspace/.opencode/skill/new && echo writable").await,
        "0\nwritable\n"
    );
    // After a stop and a start the range is the same, and exec works.
    m.stop_workspace(&name).await.unwrap();
    m.start_workspace(&name).await.unwrap();
    assert_eq!(inside(&m, &name, "cat /proc/self/uid_map").await, map);
    m.destroy_workspace(&name).await.unwrap();
    assert!(!Path::new(&tree).exists());
    std::fs::write(config, original).unwrap();
    restart_service();
}
