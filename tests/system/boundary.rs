//! A container workspace is a security boundary. Escape attempts from inside real containers:
//! each plants something in the container's tree (as the container's root, through Exec), has
//! the service work on that tree, and checks that the host is untouched and that the call
//! answered.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use zbus::Variant;

use super::*;

/// Host files and directories that code in a container would love to reach.
struct Sentinels {
    file: &'static str,
    dir: &'static str,
    os_release: &'static str,
}

const SENTINELS: Sentinels = Sentinels {
    file: "/etc/aw-sentinel",
    dir: "/etc/aw-sentinel-dir",
    os_release: "/etc/aw-sentinel-os-release",
};

impl Sentinels {
    fn plant(&self) {
        std::fs::write(self.file, "host file\n").unwrap();
        std::fs::set_permissions(self.file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _ = std::fs::remove_dir_all(self.dir);
        std::fs::create_dir(self.dir).unwrap();
        std::fs::set_permissions(self.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(self.os_release, "PRETTY_NAME=\"HOST SECRET\"\n").unwrap();
    }

    /// The host is as planted: same contents, modes and owners, and nothing new in the dir.
    fn assert_untouched(&self, what: &str) {
        let f = std::fs::symlink_metadata(self.file).unwrap();
        assert!(f.is_file(), "{what}: {} replaced", self.file);
        assert_eq!(
            std::fs::read_to_string(self.file).unwrap(),
            "host file\n",
            "{what}: {} written",
            self.file
        );
        assert_eq!(f.mode() & 0o7777, 0o644, "{what}: {} chmodded", self.file);
        assert_eq!((f.uid(), f.gid()), (0, 0), "{what}: {} chowned", self.file);
        let d = std::fs::symlink_metadata(self.dir).unwrap();
        assert!(
            d.is_dir() && d.mode() & 0o7777 == 0o755 && d.uid() == 0,
            "{what}: {}",
            self.dir
        );
        let entries: Vec<_> = std::fs::read_dir(self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            entries.is_empty(),
            "{what}: written into {}: {entries:?}",
            self.dir
        );
        assert_eq!(
            std::fs::read_to_string(self.os_release).unwrap(),
            "PRETTY_NAME=\"HOST SECRET\"\n"
        );
    }
}

/// Runs a shell command in the container as its root; it must succeed.
pub(super) async fn inside(
    m: &agent_workspaces::dbus::client::WorkspacesProxy<'_>,
    name: &str,
    script: &str,
) -> String {
    // From /, so that a planted /workspace does not stand in the way of the next plant.
    let options = spec(vec![
        ("timeout_secs", Variant::from(60u32)),
        ("cwd", Variant::from("/")),
    ]);
    let (code, out, err, ..) = m.exec(name, script, options).await.unwrap();
    assert_eq!(
        code,
        0,
        "`{script}` in {name}: {}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    String::from_utf8(out).unwrap()
}

/// A ready debian-bookworm container with skill "web" and tool "lint".
pub(super) async fn ready_container(conn: &zbus::Connection, prefix: &str) -> String {
    write_library();
    let m = manager(conn).await;
    let name = unique(prefix);
    let init = "#!/bin/sh\necho init-ran\n";
    m.create_workspace(container_spec(
        &name,
        vec![
            ("init_script", Variant::from(init)),
            ("skills", Variant::from(vec!["web"])),
            ("tools", Variant::from(vec!["lint"])),
        ],
    ))
    .await
    .unwrap();
    m.build_workspace(&name).await.unwrap();
    let status = wait_built(conn, &name, Duration::from_secs(1200)).await;
    let (log, _) = m.get_init_log(&name, 0).await.unwrap();
    assert_eq!(status, "ready", "init log:\n{log}");
    name
}

fn status_field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn debug_str(info: &HashMap<String, zbus::OwnedVariant>, key: &str) -> String {
    String::try_from(info[key].try_clone().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_is_confined_like_systemds_own_containers() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container(&conn, "confined").await;

    // Its own user namespace: container root is not host root.
    let map = inside(&m, &name, "cat /proc/self/uid_map").await;
    let fields: Vec<u64> = map.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields.len(), 3, "one range: {map}");
    assert_eq!(fields[0], 0);
    assert_ne!(fields[1], 0, "container root is host root: {map}");
    assert_eq!(fields[2], 65536, "{map}");
    assert_eq!(inside(&m, &name, "id -u").await, "0\n");

    // The unit is locked down like systemd-nspawn@.service, where operators look for it.
    let unit = format!("agent-workspace-{name}.service");
    let show = ok(&format!(
        "systemctl show -p DevicePolicy -p Slice -p TasksMax -p DeviceAllow {unit}"
    ));
    assert!(show.contains("DevicePolicy=closed\n"), "{show}");
    assert!(show.contains("Slice=machine.slice\n"), "{show}");
    assert!(show.contains("TasksMax=16384\n"), "{show}");
    assert!(show.contains("char-pts rw"), "{show}");
    let cgroup = ok(&format!("systemctl show -p ControlGroup --value {unit}"));
    assert_eq!(cgroup.trim(), format!("/machine.slice/{unit}"));
    assert!(ok("machinectl list --no-legend").contains(&name));

    // No block devices: mknod is refused, and the device cgroup would refuse them anyway.
    let (code, _, err, ..) = m
        .exec(&name, "mknod /tmp/disk b 8 0", no_options())
        .await
        .unwrap();
    assert_ne!(code, 0, "mknod of a block device succeeded");
    assert!(
        String::from_utf8_lossy(&err).contains("not permitted"),
        "{}",
        String::from_utf8_lossy(&err)
    );

    // A command keeps no more privilege than the container's own init: same capability
    // bounding set, same seccomp filters, same user namespace; and a cgroup of its own.
    let status = inside(
        &m,
        &name,
        "echo SELF; cat /proc/self/status; echo INIT; cat /proc/1/status; echo MAPS; cat /proc/self/uid_map /proc/1/uid_map; cat /proc/self/cgroup",
    )
    .await;
    let (me, init) = status.split_once("INIT").unwrap();
    for key in ["CapBnd", "Seccomp", "Seccomp_filters", "NoNewPrivs"] {
        assert_eq!(status_field(me, key), status_field(init, key), "{key}");
    }
    assert_eq!(status_field(me, "Seccomp"), "2", "a seccomp filter applies");
    // The same user namespace as the container's init (its map, not the host's identity).
    let maps: Vec<&str> = status
        .split_once("MAPS\n")
        .unwrap()
        .1
        .lines()
        .take(2)
        .collect();
    assert_eq!(
        maps[0], maps[1],
        "the command is in the container's user namespace"
    );
    assert_eq!(
        maps[0].split_whitespace().collect::<Vec<_>>(),
        map.split_whitespace().collect::<Vec<_>>()
    );
    assert!(
        status.lines().any(|l| l.starts_with("0::/exec-")),
        "a cgroup of its own: {status}"
    );

    // What the service puts into the tree belongs to the container's root.
    let owners = inside(
        &m,
        &name,
        "stat -c '%u:%g %n' /.agent-workspaces/init /workspace/.opencode /workspace/.opencode/skill/web/SKILL.md /workspace/.opencode/tool/lint",
    )
    .await;
    for line in owners.lines() {
        assert!(line.starts_with("0:0 "), "{owners}");
    }
    // On this file system the tree is layered (copy-on-write): an overlay whose lower layer
    // is an idmapped clone of the cached base, so the tree belongs to the container's range
    // while the base, never written, still belongs to the host's root.
    let tree = format!("/var/lib/machines/{name}");
    let range: u32 = map.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(
        std::fs::metadata(&tree).unwrap().uid(),
        range,
        "layered path"
    );
    let info = m.get_debug_info(&name).await.unwrap();
    assert!(
        bool::try_from(info["tree_layered"].try_clone().unwrap()).unwrap(),
        "the tree is an overlay"
    );
    let layer = format!("/var/lib/machines/.agent-workspaces-layers/{name}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{layer}/state")).unwrap()).unwrap();
    let base = state["base"].as_str().unwrap().to_owned();
    assert_eq!(std::fs::metadata(&base).unwrap().uid(), 0);
    assert_eq!(
        std::fs::metadata(format!("{base}/etc/passwd"))
            .unwrap()
            .uid(),
        0
    );
    inside(&m, &name, "echo planted > /etc/aw-layer-probe").await;
    assert!(
        !Path::new(&format!("{base}/etc/aw-layer-probe")).exists(),
        "the base is never written"
    );
    assert_eq!(
        std::fs::read_to_string(format!(
            "/var/lib/machines/.agent-workspaces-layers/.shared/{}/tree/etc/aw-layer-probe",
            state["upper"].as_str().unwrap()
        ))
        .unwrap(),
        "planted\n",
        "what the container writes is in its layer"
    );
    m.destroy_workspace(&name).await.unwrap();
    assert!(!Path::new(&layer).exists(), "destroy removes the layer");
    assert!(
        !Path::new(&format!(
            "/var/lib/machines/.agent-workspaces-layers/.shared/{}",
            state["upper"].as_str().unwrap()
        ))
        .exists(),
        "and its writable layer"
    );
    assert!(!Path::new(&tree).exists());
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&tree),
        "nothing stays mounted"
    );

    // Its units were awaited through systemd's JobRemoved signals, which the bus policy must
    // let through to the service (a deny for its name also stops signals broadcast to it).
    let fallbacks: Vec<String> = journal(&format!("-u {UNIT}"))
        .into_iter()
        .filter_map(|e| e["MESSAGE"].as_str().map(String::from))
        .filter(|m| m.contains("without a JobRemoved") && m.contains(&name))
        .collect();
    assert!(fallbacks.is_empty(), "{fallbacks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_links_fifos_and_files_never_lead_the_service_out_of_the_tree() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container(&conn, "escape").await;
    SENTINELS.plant();
    let rerun_init = |what: &'static str| {
        let m = m.clone();
        let name = name.clone();
        async move {
            let r = m.rerun_init(&name, no_options()).await;
            let (code, out, err, ..) = r.unwrap_or_else(|e| panic!("{what}: RerunInit: {e}"));
            // /.agent-workspaces is the service's: whatever was planted there is replaced.
            assert_eq!(
                (code, String::from_utf8_lossy(&out).into_owned()),
                (0, "init-ran\n".to_owned()),
                "{what}: {}",
                String::from_utf8_lossy(&err)
            );
            SENTINELS.assert_untouched(what);
        }
    };

    // The init script, through every kind of link and thing planted in its place.
    let init_attacks: &[(&'static str, &str)] = &[
        (
            "init -> host file (absolute)",
            "rm -rf /.agent-workspaces; mkdir /.agent-workspaces; ln -s /etc/aw-sentinel /.agent-workspaces/init",
        ),
        (
            "init -> host file (relative, ..)",
            "rm -rf /.agent-workspaces; mkdir /.agent-workspaces; ln -s ../../../../../../../etc/aw-sentinel /.agent-workspaces/init",
        ),
        (
            "init -> link chain -> host file",
            "rm -rf /.agent-workspaces /tmp/l1 /tmp/l2; mkdir /.agent-workspaces; ln -s /etc/aw-sentinel /tmp/l2; ln -s /tmp/l2 /tmp/l1; ln -s /tmp/l1 /.agent-workspaces/init",
        ),
        (
            "init -> /proc/self/root magic link",
            "rm -rf /.agent-workspaces; mkdir /.agent-workspaces; ln -s /proc/self/root/etc/aw-sentinel /.agent-workspaces/init",
        ),
        (
            "init -> /proc/1/root magic link",
            "rm -rf /.agent-workspaces; mkdir /.agent-workspaces; ln -s /proc/1/root/etc/aw-sentinel /.agent-workspaces/init",
        ),
        (
            ".agent-workspaces -> host dir",
            "rm -rf /.agent-workspaces; ln -s /etc/aw-sentinel-dir /.agent-workspaces",
        ),
        (
            ".agent-workspaces -> host dir (relative)",
            "rm -rf /.agent-workspaces; ln -s ../../../etc/aw-sentinel-dir /.agent-workspaces",
        ),
        (
            ".agent-workspaces -> /",
            "rm -rf /.agent-workspaces; ln -s / /.agent-workspaces",
        ),
        (
            ".agent-workspaces is a file",
            "rm -rf /.agent-workspaces; echo x > /.agent-workspaces",
        ),
        (
            ".agent-workspaces is a FIFO",
            "rm -rf /.agent-workspaces; mkfifo /.agent-workspaces",
        ),
        (
            "init is a FIFO",
            "rm -rf /.agent-workspaces; mkdir /.agent-workspaces; mkfifo /.agent-workspaces/init",
        ),
        (
            "init is a directory",
            "rm -rf /.agent-workspaces; mkdir -p /.agent-workspaces/init/sub; echo x > /.agent-workspaces/init/sub/f",
        ),
        (
            "init is a device node link",
            "rm -rf /.agent-workspaces; mkdir /.agent-workspaces; ln -s /dev/sda /.agent-workspaces/init",
        ),
        (
            "init is a symlink loop",
            "rm -rf /.agent-workspaces; mkdir /.agent-workspaces; ln -s init /.agent-workspaces/init2; ln -s init2 /.agent-workspaces/init",
        ),
    ];
    for (what, plant) in init_attacks {
        inside(&m, &name, plant).await;
        rerun_init(what).await;
        assert_eq!(
            inside(
                &m,
                &name,
                "stat -c '%F %u %a' /.agent-workspaces /.agent-workspaces/init"
            )
            .await,
            "directory 0 755\nregular file 0 700\n",
            "{what}"
        );
    }

    // Skills and tools: .opencode, skill/ and tool/ (and /workspace itself) as links out.
    let sync_attacks: &[(&'static str, &str, bool)] = &[
        (
            "skill/ -> host dir",
            "rm -rf /workspace/.opencode/skill; ln -s /etc/aw-sentinel-dir /workspace/.opencode/skill",
            true,
        ),
        (
            "tool/ -> host dir (relative)",
            "rm -rf /workspace/.opencode/tool; ln -s ../../../etc/aw-sentinel-dir /workspace/.opencode/tool",
            true,
        ),
        (
            "skill/web -> host dir",
            "rm -rf /workspace/.opencode/skill/web; ln -s /etc/aw-sentinel-dir /workspace/.opencode/skill/web",
            true,
        ),
        (
            "skill/ is a file",
            "rm -rf /workspace/.opencode/skill; echo x > /workspace/.opencode/skill",
            true,
        ),
        (
            "skill/ is a FIFO",
            "rm -rf /workspace/.opencode/skill; mkfifo /workspace/.opencode/skill",
            true,
        ),
        (
            ".opencode -> host dir",
            "rm -rf /workspace/.opencode; ln -s /etc/aw-sentinel-dir /workspace/.opencode",
            false,
        ),
        (
            ".opencode -> /proc/self/root/etc/aw-sentinel-dir",
            "rm -rf /workspace/.opencode; ln -s /proc/self/root/etc/aw-sentinel-dir /workspace/.opencode",
            false,
        ),
        (
            "/workspace -> host dir",
            "cd /; rm -rf /workspace; ln -s /etc/aw-sentinel-dir /workspace",
            false,
        ),
    ];
    for (what, plant, replaced) in sync_attacks {
        inside(&m, &name, plant).await;
        let r = m.sync_workspace(&name).await;
        SENTINELS.assert_untouched(what);
        if *replaced {
            r.unwrap_or_else(|e| panic!("{what}: SyncWorkspace: {e}"));
            assert_eq!(
                inside(&m, &name, "stat -c '%F %u' /workspace/.opencode/skill /workspace/.opencode/tool; cat /workspace/.opencode/skill/web/SKILL.md").await,
                "directory 0\ndirectory 0\n# Web v1\n",
                "{what}"
            );
        } else {
            // The link resolves inside the container, where it leads nowhere: a named error.
            let (err, msg) = error_of(&r.expect_err(what));
            assert_eq!(err, "org.freedesktop.DBus.Error.IOError", "{what}: {msg}");
        }
        inside(&m, &name, "rm -rf /workspace/.opencode; [ -d /workspace ] || { rm -f /workspace; mkdir /workspace; }").await;
        m.sync_workspace(&name).await.unwrap();
    }

    // The debug report reads /etc/os-release: links out, FIFOs, devices, huge files, loops.
    let os_attacks: &[(&'static str, &str)] = &[
        (
            "os-release -> host file",
            "rm -f /etc/os-release /usr/lib/os-release; ln -s /etc/aw-sentinel-os-release /etc/os-release",
        ),
        (
            "os-release -> /proc/self/root",
            "rm -f /etc/os-release; ln -s /proc/self/root/etc/aw-sentinel-os-release /etc/os-release",
        ),
        (
            "os-release is a FIFO",
            "rm -f /etc/os-release; mkfifo /etc/os-release; mkfifo /usr/lib/os-release",
        ),
        (
            "os-release -> /dev/zero",
            "rm -f /etc/os-release /usr/lib/os-release; ln -s /dev/zero /etc/os-release",
        ),
        (
            "os-release is 10 GB",
            "rm -f /etc/os-release; truncate -s 10G /etc/os-release",
        ),
        (
            "os-release is a loop",
            "rm -f /etc/os-release /etc/os-loop; ln -s os-loop /etc/os-release; ln -s os-release /etc/os-loop",
        ),
        (
            "a link to the host's root in the tree",
            "ln -sfn / /workspace/hostroot; ln -sfn /etc /workspace/hostetc",
        ),
    ];
    for (what, plant) in os_attacks {
        inside(&m, &name, plant).await;
        let start = Instant::now();
        let info = m
            .get_debug_info(&name)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: GetDebugInfo took {:?}",
            start.elapsed()
        );
        let pretty = debug_str(&info, "os_release");
        assert!(!pretty.contains("HOST"), "{what}: {pretty}");
        let size = u64::try_from(info["tree_size_bytes"].try_clone().unwrap()).unwrap();
        assert!(
            size < 2 << 30,
            "{what}: tree_size_bytes {size} counts the host or a sparse file"
        );
        SENTINELS.assert_untouched(what);
    }

    // A working directory that is a link to the host's /etc is the container's /etc.
    let (code, out, err, ..) = m
        .exec(
            &name,
            "pwd -P; cat hostname; ls aw-sentinel 2>&1 || true",
            spec(vec![("cwd", Variant::from("hostetc"))]),
        )
        .await
        .unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with(&format!("/etc\n{name}\n")), "{out}");
    assert!(
        out.contains("No such file"),
        "the host's /etc is not there: {out}"
    );
    // A missing one is a named error, and does not start anything.
    assert_error(
        m.exec(
            &name,
            "true",
            spec(vec![("cwd", Variant::from("nope/nothing"))]),
        )
        .await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "'cwd'",
    );

    // The agent's socket replaced by a link to the host's system bus: the service keeps
    // talking to the socket it found (its descriptor, not the path); a service that looks for
    // it afresh (restarted) does not follow the link, says so, and a restart of the container
    // brings the agent back.
    let (code, ..) = m
        .exec(
            &name,
            "rm -f /run/agent-workspaces/agent.sock; ln -s /run/dbus/system_bus_socket /run/agent-workspaces/agent.sock",
            no_options(),
        )
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(inside(&m, &name, "echo still").await, "still\n");
    restart_service();
    let conn = bus().await;
    let m = manager(&conn).await;
    assert_error(
        m.exec(&name, "true", no_options()).await,
        "org.agent.Workspaces.Error.JobFailed",
        "is not a socket",
    );
    m.stop_workspace(&name).await.unwrap();
    assert_eq!(inside(&m, &name, "echo back").await, "back\n");

    // Destroy removes the tree and nothing its links point to.
    inside(&m, &name, "ln -sfn /etc/aw-sentinel /workspace/file-link; ln -sfn /etc/aw-sentinel-dir /workspace/dir-link").await;
    m.destroy_workspace(&name).await.unwrap();
    assert!(!Path::new(&format!("/var/lib/machines/{name}")).exists());
    SENTINELS.assert_untouched("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_swapped_in_while_the_service_works_never_wins() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container(&conn, "race").await;
    SENTINELS.plant();
    // Inside: flip the service's paths between real ones and links to the host, as fast as a
    // shell can, until /tmp/stop appears (or 120 s pass).
    let flipper = r#"
        end=$((SECONDS + 120))
        while [ ! -e /tmp/stop ] && [ $SECONDS -lt $end ]; do
            rm -rf /.agent-workspaces; ln -s /etc/aw-sentinel-dir /.agent-workspaces
            rm -rf /.agent-workspaces; mkdir /.agent-workspaces; ln -s /etc/aw-sentinel /.agent-workspaces/init
            rm -rf /workspace/.opencode/skill; ln -s /etc/aw-sentinel-dir /workspace/.opencode/skill
            rm -rf /workspace/.opencode/tool; ln -s /etc/aw-sentinel-dir /workspace/.opencode/tool
            ln -sfn /etc/aw-sentinel-dir /workspace/.opencode/skill/web 2>/dev/null
            rm -f /etc/os-release; ln -s /etc/aw-sentinel-os-release /etc/os-release
            for d in /workspace/.opencode/.skill.*.new /workspace/.opencode/.tool.*.new; do
                [ -d "$d" ] && rm -rf "$d" && ln -s /etc/aw-sentinel-dir "$d"
            done
            n=$((n + 1))
        done
        echo $n
    "#;
    let flips = {
        let m = m.clone();
        let name = name.clone();
        tokio::spawn(async move {
            m.exec(
                &name,
                flipper,
                spec(vec![("timeout_secs", Variant::from(180u32))]),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut answered = 0;
    for round in 0..40 {
        let init = m.rerun_init(&name, no_options()).await;
        let sync = m.sync_workspace(&name).await;
        let debug = m.get_debug_info(&name).await;
        answered +=
            usize::from(init.is_ok()) + usize::from(sync.is_ok()) + usize::from(debug.is_ok());
        if let Ok(info) = debug {
            assert!(
                !debug_str(&info, "os_release").contains("HOST"),
                "round {round}"
            );
        }
        SENTINELS.assert_untouched(&format!("round {round}"));
    }
    inside(&m, &name, "touch /tmp/stop").await;
    let (code, out, ..) = flips.await.unwrap().unwrap();
    let flipped: u32 = String::from_utf8_lossy(&out).trim().parse().unwrap_or(0);
    assert_eq!(code, 0);
    assert!(flipped > 40, "the flipper ran only {flipped} rounds");
    assert!(answered > 0, "every call failed");
    SENTINELS.assert_untouched("after the race");
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_workspaces_opencode_is_not_redirected_by_a_link() {
    require_test_host();
    write_library();
    SENTINELS.plant();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("hostlinks");
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(name.as_str())),
            ("skills", Variant::from(vec!["web"])),
        ]))
        .await
        .unwrap();
    let dir = workspace(&conn, &path).await.path().await.unwrap();
    let opencode = format!("{dir}/.opencode");
    std::fs::remove_dir_all(format!("{opencode}/skill")).unwrap();
    std::os::unix::fs::symlink(SENTINELS.dir, format!("{opencode}/skill")).unwrap();
    m.sync_workspace(&name).await.unwrap();
    SENTINELS.assert_untouched("host workspace skill/ link");
    assert!(Path::new(&format!("{opencode}/skill/web/SKILL.md")).is_file());
    std::fs::remove_dir_all(&opencode).unwrap();
    std::os::unix::fs::symlink(SENTINELS.dir, &opencode).unwrap();
    let _ = m.sync_workspace(&name).await;
    SENTINELS.assert_untouched("host workspace .opencode link");
    m.destroy_workspace(&name).await.unwrap();
}
