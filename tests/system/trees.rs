//! Where copy-on-write trees cannot be made (the containers' directory on overlayfs, as in a
//! container or some CI runners), the service says so once at start, with the reason and the
//! fix, and the debug report of a tree unpacked whole says why beside `tree_layered`.

use std::time::Duration;

use super::*;

const COPY_ON_WRITE_OFF: &str = "40106655bb7e4612bf0699520ecaaf0a";
const OVERLAY: &str = "/srv/aw-overlay";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_overlayfs_copy_on_write_off_is_said_and_reported() {
    require_test_host();
    let config = "/etc/agent-workspaces/config.toml";
    let original = std::fs::read_to_string(config).unwrap_or_default();
    let machines = format!("{OVERLAY}/merged");
    ok(&format!(
        "umount {machines} {OVERLAY} 2>/dev/null; rm -rf {OVERLAY}; mkdir -p {OVERLAY} && \
         mount -t tmpfs -o size=4g tmpfs {OVERLAY} && mkdir -p {OVERLAY}/lower {OVERLAY}/upper \
         {OVERLAY}/work {machines} && mount -t overlay overlay -o lowerdir={OVERLAY}/lower,\
         upperdir={OVERLAY}/upper,workdir={OVERLAY}/work {machines} && chmod 700 {machines}"
    ));
    let setting = format!("machines_dir = \"{machines}\"\n");
    let changed = if original.contains("[container]\n") {
        original.replacen("[container]\n", &format!("[container]\n{setting}"), 1)
    } else {
        format!("{original}\n[container]\n{setting}")
    };
    std::fs::write(config, changed).unwrap();
    restart_service();
    let said = wait_for(
        "the journal to say copy-on-write trees are off",
        Duration::from_secs(10),
        || {
            journal(&format!("MESSAGE_ID={COPY_ON_WRITE_OFF}"))
                .into_iter()
                .find(|e| e["REASON"].as_str().is_some_and(|r| r.contains(&machines)))
        },
    );
    assert_eq!(said["PRIORITY"], "4", "a warning: {said}");
    let reason = said["REASON"].as_str().unwrap();
    assert!(reason.contains("is on overlayfs"), "{reason}");
    let fix = said["FIX"].as_str().unwrap();
    assert!(
        fix.contains("machines_dir") && fix.contains("ext4"),
        "{fix}"
    );
    assert!(
        said["MESSAGE"]
            .as_str()
            .unwrap()
            .contains("Every create unpacks the whole base"),
        "{said}"
    );

    let conn = bus().await;
    let name = ready_container_named(&conn, "full").await;
    let m = manager(&conn).await;
    let info = m.get_debug_info(&name).await.unwrap();
    let value = |k: &str| {
        info.get(k)
            .map(|v| format!("{:?}", **v))
            .unwrap_or_else(|| panic!("no {k} in {info:?}"))
    };
    assert!(value("tree_layered").contains("false"), "{info:?}");
    let why = value("tree_layered_reason");
    assert!(
        why.contains("copy-on-write trees are off here") && why.contains("is on overlayfs"),
        "{why}"
    );
    // The probe left nothing beside the trees.
    assert!(!ok(&format!("ls -A {machines}")).contains("probe"));
    m.destroy_workspace(&name).await.unwrap();

    std::fs::write(config, original).unwrap();
    restart_service();
    ok(&format!("umount {machines} {OVERLAY} && rm -rf {OVERLAY}"));
}
