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

/// The service's cache directory, as the test host's configuration sets it.
fn cache_dir() -> String {
    let config = std::fs::read_to_string("/etc/agent-workspaces/config.toml").unwrap_or_default();
    config
        .lines()
        .find_map(|l| l.strip_prefix("cache_dir = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or("/var/cache/agent-workspaces")
        .to_owned()
}

/// The base a tree's stack is over.
fn base_of(name: &str) -> String {
    let state = std::fs::read_to_string(format!("{}/{name}/state", super::snapshots::LAYERS))
        .unwrap_or_else(|e| panic!("the stack of {name}: {e}"));
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    state["base"].as_str().unwrap().to_owned()
}

/// A base stays while any stack names it: destroying one of two workspaces over it leaves the
/// other whole and running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_under_a_recorded_layer_is_never_reclaimed() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let (a, b) = (
        ready_container_named(&conn, "over-a").await,
        ready_container_named(&conn, "over-b").await,
    );
    let base = base_of(&b);
    assert_eq!(base_of(&a), base, "one base under both");
    m.destroy_workspace(&a).await.unwrap();
    assert!(
        std::path::Path::new(&format!("{base}/etc/os-release")).exists(),
        "the base of {b} was reclaimed"
    );
    let (code, out, ..) = m
        .exec(&b, "cat /etc/os-release", no_options())
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(String::from_utf8_lossy(&out).contains("bookworm"));
    m.destroy_workspace(&b).await.unwrap();
}

/// Bases no stack names are reclaimed, the space said in the journal; a `kill -9` between the
/// steps of a reclaim leaves every base whole under its name or gone from it, and the next
/// start finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_bases_are_reclaimed_and_a_kill_in_the_middle_is_finished() {
    require_test_host();
    let bases = format!("{}/base", cache_dir());
    let planted = format!("{bases}/zz-test-unused.tree");
    ok(&format!(
        "rm -rf {planted} {planted}.reclaim; mkdir -p {planted}/usr/lib && \
         head -c 3000000 /dev/urandom > {planted}/usr/lib/big && \
         mkdir -p {bases}/zz-test-killed.tree.reclaim/etc"
    ));
    let since = ok("date '+%Y-%m-%d %H:%M:%S'").trim().to_owned();
    // The failpoint set by hand: the service may die before `systemctl restart` returns.
    let dropin = format!("/run/systemd/system/{UNIT}.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(
        format!("{dropin}/failpoint.conf"),
        "[Service]\nEnvironment=AGENT_WORKSPACES_FAILPOINT=reclaim-renamed\n",
    )
    .unwrap();
    systemctl("daemon-reload");
    let _ = sh(&format!("systemctl restart {UNIT}"));
    wait_for(
        "the service to be killed while reclaiming",
        Duration::from_secs(30),
        || (super::snapshots::deaths_at("reclaim-renamed") > 0).then_some(()),
    );
    // Whole under its name, or renamed whole: never half a base under its name.
    let size = sh(&format!("stat -c %s {planted}/usr/lib/big")).stdout;
    assert!(
        size.trim() == "3000000" || !std::path::Path::new(&planted).exists(),
        "half a base under its name: {size}"
    );
    super::snapshots::failpoint(None);
    let said = wait_for(
        "the journal to say what was reclaimed",
        Duration::from_secs(30),
        || {
            let gone = !std::path::Path::new(&planted).exists()
                && !std::path::Path::new(&format!("{planted}.reclaim")).exists()
                && !std::path::Path::new(&format!("{bases}/zz-test-killed.tree.reclaim")).exists();
            let entries = journal(&format!("-u {UNIT} --since '{since}'"));
            let said: u64 = entries
                .iter()
                .filter_map(|e| e["RECLAIMED_BYTES"].as_str()?.parse::<u64>().ok())
                .sum();
            (gone && said > 0).then_some(said)
        },
    );
    assert!(said >= 3_000_000, "the journal says {said} bytes");
    assert!(
        !ok(&format!("ls {bases}")).contains(".reclaim"),
        "a reclaim left half done"
    );
}
