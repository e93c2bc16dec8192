//! The units of a container workspace: names, the nspawn command line, properties.

use std::path::Path;

use zbus::OwnedVariant;

use crate::core::workspace::{Network, Workspace};
use crate::system::systemd::prop;
use agent_workspaces_agent::AGENT_PATH;

/// `TasksMax=` of a container without a `tasks_max` limit: the value of systemd's own
/// `systemd-nspawn@.service`.
pub const DEFAULT_TASKS_MAX: u64 = 16384;
/// `DeviceAllow=` of systemd's own `systemd-nspawn@.service` (systemd 252), with
/// `DevicePolicy=closed`: beyond the standard pseudo devices (null, zero, full, random,
/// urandom, tty, ptmx), only these.
pub(super) const DEVICE_ALLOW: [(&str, &str); 7] = [
    ("/dev/net/tun", "rwm"),
    ("char-pts", "rw"),
    // nspawn itself needs loop devices for --image= and device-mapper for encrypted images;
    // workspaces use neither, but the set is kept as systemd ships it.
    ("/dev/loop-control", "rw"),
    ("block-loop", "rw"),
    ("block-blkext", "rw"),
    ("/dev/mapper/control", "rw"),
    ("block-device-mapper", "rw"),
];

pub fn unit_name(name: &str) -> String {
    format!("agent-workspace-{name}.service")
}

pub fn build_unit_name(name: &str) -> String {
    // '@' is in no workspace name, so no container's unit can be named like a build unit.
    format!("agent-workspace-build@{name}.service")
}

/// Journal fields of a unit's output (`LogExtraFields=`, type `aay`), so that
/// `journalctl WORKSPACE_ID=...` includes builds and containers.
pub(super) fn log_fields(ws: &Workspace) -> Vec<Vec<u8>> {
    vec![
        format!("WORKSPACE_ID={}", ws.id).into_bytes(),
        format!("WORKSPACE_NAME={}", ws.name).into_bytes(),
    ]
}

/// The systemd-nspawn command line of a container workspace. Its payload is the agent,
/// bind-mounted read-only from the host: it runs as PID 2 in the container's namespaces (its
/// own user namespace: container root is not host root; `auto` maps the tree's ownership with
/// an idmapped mount where the file system supports it, and chowns it once where not).
///
/// A layered tree (`layer.rs`) is owned by the container's range already: nspawn takes that
/// range and its chown finds nothing to do (an idmapped mount of an overlay is refused).
pub fn nspawn_argv(ws: &Workspace, tree: &Path, agent: &Path, layered: bool) -> Vec<String> {
    let mut argv = vec![
        "/usr/bin/systemd-nspawn".to_owned(),
        "--quiet".to_owned(),
        "--keep-unit".to_owned(),
        "--register=yes".to_owned(),
        format!("--directory={}", tree.display()),
        format!("--machine={}", ws.name),
        "--private-users=pick".to_owned(),
        format!(
            "--private-users-ownership={}",
            if layered { "chown" } else { "auto" }
        ),
        format!("--bind-ro={}:{AGENT_PATH}", agent.display()),
        "--as-pid2".to_owned(),
        "--console=pipe".to_owned(),
    ];
    match ws.network {
        Network::Host => {}
        Network::Private => argv.push("--private-network".to_owned()),
        Network::Internet => {
            // A veth pair named by the service (its host end is how the table knows the
            // container); the service configures both ends and writes /etc/resolv.conf.
            argv.push(format!(
                "--network-veth-extra={}:host0",
                crate::system::network::link_name(&ws.id)
            ));
            argv.push("--resolv-conf=off".to_owned());
        }
    }
    argv.push(AGENT_PATH.to_owned());
    argv
}

/// Unit properties of the running container: the command line, the confinement of systemd's
/// own `systemd-nspawn@.service` and the workspace's limits.
pub fn container_properties(
    ws: &Workspace,
    tree: &Path,
    agent: &Path,
    layered: bool,
) -> Vec<(String, OwnedVariant)> {
    let argv = nspawn_argv(ws, tree, agent, layered);
    let device_allow: Vec<(String, String)> = DEVICE_ALLOW
        .iter()
        .map(|(d, a)| ((*d).to_owned(), (*a).to_owned()))
        .collect();
    let mut props = vec![
        prop("Description", format!("Agent workspace {}", ws.name)),
        prop("Slice", "machine.slice"),
        prop("Type", "notify"),
        prop("NotifyAccess", "main"),
        prop("KillMode", "mixed"),
        prop("Delegate", true),
        prop("DevicePolicy", "closed"),
        prop("DeviceAllow", device_allow),
        prop("WatchdogUSec", 180_000_000u64),
        prop("CollectMode", "inactive-or-failed"),
        prop(
            "Environment",
            vec!["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1".to_owned()],
        ),
        prop("LogExtraFields", log_fields(ws)),
        prop("ExecStart", vec![(argv[0].clone(), argv.clone(), false)]),
    ];
    props.extend(
        limit_props(&ws.limits)
            .into_iter()
            .filter(|(_, v)| *v != u64::MAX)
            .map(|(k, v)| prop(k, v)),
    );
    props
}

/// The unit properties of `limits`; u64::MAX ("infinity") where there is none, except
/// `TasksMax`, which falls back to systemd's container default.
pub(super) fn limit_props(l: &crate::core::workspace::Limits) -> [(&'static str, u64); 3] {
    [
        ("MemoryMax", l.memory_max.unwrap_or(u64::MAX)),
        (
            "CPUQuotaPerSecUSec",
            l.cpu_quota_percent
                .map_or(u64::MAX, |p| u64::from(p) * 10_000),
        ),
        ("TasksMax", l.tasks_max.unwrap_or(DEFAULT_TASKS_MAX)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::workspace::{Limits, Status, WorkspaceType};

    fn ws(network: Network) -> Workspace {
        Workspace {
            id: "1b4e28ba-2fa1-11d2-883f-0016d3cca427".into(),
            name: "box".into(),
            workspace_type: WorkspaceType::Container,
            status: Status::Ready,
            error_message: String::new(),
            path: "/var/lib/machines/box".into(),
            owns_path: true,
            distro: Some(crate::core::workspace::Distro::DebianBookworm),
            env_vars: Default::default(),
            init_script: String::new(),
            skills: vec![],
            tools: vec![],
            template: String::new(),
            created_at_usec: 0,
            network,
            egress_allow: vec![],
            egress_deny: vec![],
            limits: Limits {
                memory_max: Some(1 << 30),
                cpu_quota_percent: Some(150),
                tasks_max: None,
                ..Default::default()
            },
            build_step: String::new(),
        }
    }

    #[test]
    fn nspawn_command_line() {
        let agent = Path::new("/usr/libexec/agent-workspaces-agent");
        let a = nspawn_argv(
            &ws(Network::Host),
            Path::new("/var/lib/machines/box"),
            agent,
            false,
        )
        .join(" ");
        assert_eq!(
            a,
            "/usr/bin/systemd-nspawn --quiet --keep-unit --register=yes \
             --directory=/var/lib/machines/box --machine=box \
             --private-users=pick --private-users-ownership=auto \
             --bind-ro=/usr/libexec/agent-workspaces-agent:/run/host/agent-workspaces-agent \
             --as-pid2 --console=pipe /run/host/agent-workspaces-agent"
        );
        let p = nspawn_argv(&ws(Network::Private), Path::new("/t"), agent, false).join(" ");
        assert!(p.contains(" --private-network "), "{p}");
        let i = nspawn_argv(&ws(Network::Internet), Path::new("/t"), agent, false).join(" ");
        assert!(
            i.contains(" --network-veth-extra=aw-1b4e28ba2fa1:host0 --resolv-conf=off "),
            "{i}"
        );
        assert!(!i.contains("--private-network"), "{i}");
        let l = nspawn_argv(&ws(Network::Host), Path::new("/t"), agent, true).join(" ");
        assert!(
            l.contains(" --private-users=pick --private-users-ownership=chown "),
            "{l}"
        );
    }

    #[test]
    fn limits_become_unit_properties() {
        let props =
            container_properties(&ws(Network::Host), Path::new("/t"), Path::new("/a"), false);
        let get = |n: &str| {
            props
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.try_clone().unwrap())
        };
        assert_eq!(u64::try_from(get("MemoryMax").unwrap()).unwrap(), 1 << 30);
        assert_eq!(
            u64::try_from(get("CPUQuotaPerSecUSec").unwrap()).unwrap(),
            1_500_000
        );
        assert_eq!(
            u64::try_from(get("TasksMax").unwrap()).unwrap(),
            DEFAULT_TASKS_MAX,
            "no tasks_max: systemd's container default"
        );
        assert!(bool::try_from(get("Delegate").unwrap()).unwrap());
        let text = |n: &str| String::try_from(get(n).unwrap()).unwrap();
        assert_eq!(text("DevicePolicy"), "closed");
        assert_eq!(text("Slice"), "machine.slice");
        let allowed: Vec<(String, String)> = get("DeviceAllow").unwrap().try_into().unwrap();
        assert_eq!(allowed.len(), DEVICE_ALLOW.len());
        assert!(allowed.contains(&("char-pts".into(), "rw".into())));
        assert_eq!(unit_name("box"), "agent-workspace-box.service");
        assert_eq!(build_unit_name("box"), "agent-workspace-build@box.service");
        // A workspace named "build-box" does not share its unit with the build of "box".
        assert_ne!(unit_name("build-box"), build_unit_name("box"));
    }
}
