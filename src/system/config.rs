//! `/etc/agent-workspaces/config.toml`. Every key is optional; a file that does not parse, an
//! unknown key or a value out of range is an error naming the line, never a silent default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::spec::{BuildLimits, ExecLimits, ServiceLimits};
use crate::core::workspace::Distro;
use crate::system::containers::distro::DistroSettings;
use crate::system::network::NetworkConfig;

pub const DEFAULT_PATH: &str = "/etc/agent-workspaces/config.toml";
/// Largest per-stream output cap: two streams must fit well inside the system bus's 32 MiB
/// message limit.
pub const OUTPUT_CAP_LIMIT: u64 = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory of the default `host` workspace. Read at start only.
    pub host_workspace_dir: Option<PathBuf>,
    /// The Library (skills, tools, templates); default `<state>/library`. Read at start only
    /// (its contents are read afresh on every use).
    pub library_path: Option<PathBuf>,
    /// [exec] and the build limits of [container]; reloadable.
    pub limits: ServiceLimits,
    pub exec_containment: ContainmentMode,
    pub container: ContainerConfig,
    /// [network]: containers' networks of their own. Read at start only.
    pub network: NetworkConfig,
}

/// Where container trees, caches and logs live, and how builds run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Container trees: `<machines_dir>/<name>` (machinectl list-images shows them).
    pub machines_dir: PathBuf,
    /// Cached base trees per distro and settings, and the package cache.
    pub cache_dir: PathBuf,
    /// Init logs: `<log_dir>/<id>/init.log`.
    pub log_dir: PathBuf,
    /// A build unit that runs longer is stopped (an unreachable mirror never hangs).
    pub build_timeout_secs: u32,
    pub distros: BTreeMap<&'static str, (Distro, DistroSettings)>,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        Self {
            machines_dir: "/var/lib/machines".into(),
            cache_dir: "/var/cache/agent-workspaces".into(),
            log_dir: "/var/log/agent-workspaces".into(),
            build_timeout_secs: 1800,
            distros: Distro::ALL
                .into_iter()
                .map(|d| (d.as_str(), (d, DistroSettings::default_for(d))))
                .collect(),
        }
    }
}

impl ContainerConfig {
    pub fn distro(&self, d: Distro) -> DistroSettings {
        self.distros
            .get(d.as_str())
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| DistroSettings::default_for(d))
    }
}

/// How host commands are contained (`[exec] isolation`): resolved into an
/// [`cgroup::Containment`](crate::system::commands::cgroup::Containment) once the service knows its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainmentMode {
    Cgroup,
    ProcessGroup,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    host_workspace_dir: Option<PathBuf>,
    library_path: Option<PathBuf>,
    #[serde(default)]
    exec: ExecSection,
    #[serde(default)]
    container: ContainerSection,
    #[serde(default)]
    distro: BTreeMap<String, DistroSection>,
    #[serde(default)]
    network: NetworkSection,
    /// `[mcp]`: read by the MCP servers (`agent-workspaces-mcp`, the bridge's `/mcp`); checked
    /// here too, so a mistake in it is found when the service reloads.
    #[serde(default)]
    #[allow(dead_code)]
    mcp: crate::mcp::Section,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NetworkSection {
    pool: Option<String>,
    dns: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ContainerSection {
    machines_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    max_concurrent_builds: Option<u32>,
    build_timeout_secs: Option<u32>,
    init_timeout_secs: Option<u32>,
    idle_pause_secs: Option<u32>,
    idle_stop_secs: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DistroSection {
    mirror: Option<String>,
    keyring: Option<PathBuf>,
    verify_signatures: Option<bool>,
    packages: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExecSection {
    default_timeout_secs: Option<u32>,
    max_timeout_secs: Option<u32>,
    max_output_bytes: Option<u64>,
    max_concurrent: Option<u32>,
    queue_timeout_secs: Option<u32>,
    isolation: Option<ContainmentMode>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host_workspace_dir: None,
            library_path: None,
            limits: ServiceLimits::default(),
            exec_containment: ContainmentMode::Cgroup,
            container: ContainerConfig::default(),
            network: NetworkConfig::default(),
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let d = ExecLimits::default();
        let e = file.exec;
        let exec = ExecLimits {
            default_timeout_secs: e.default_timeout_secs.unwrap_or(d.default_timeout_secs),
            max_timeout_secs: e.max_timeout_secs.unwrap_or(d.max_timeout_secs),
            max_output_bytes: e.max_output_bytes.unwrap_or(d.max_output_bytes as u64) as usize,
            max_concurrent: e.max_concurrent.unwrap_or(d.max_concurrent as u32) as usize,
            queue_timeout_secs: e.queue_timeout_secs.unwrap_or(d.queue_timeout_secs),
        };
        let b = BuildLimits::default();
        let builds = BuildLimits {
            max_concurrent: file
                .container
                .max_concurrent_builds
                .unwrap_or(b.max_concurrent as u32) as usize,
            init_timeout_secs: file
                .container
                .init_timeout_secs
                .unwrap_or(b.init_timeout_secs),
        };
        if builds.max_concurrent == 0 || builds.init_timeout_secs == 0 {
            return Err(
                "container.max_concurrent_builds and container.init_timeout_secs must be at least 1"
                    .into(),
            );
        }
        let idle = crate::core::spec::IdleLimits {
            pause_secs: file.container.idle_pause_secs.unwrap_or(0),
            stop_secs: file.container.idle_stop_secs.unwrap_or(0),
        };
        let mut container = ContainerConfig::default();
        let c = file.container;
        for (dir, field) in [
            (c.machines_dir, &mut container.machines_dir),
            (c.cache_dir, &mut container.cache_dir),
            (c.log_dir, &mut container.log_dir),
        ] {
            if let Some(dir) = dir {
                if !dir.is_absolute() {
                    return Err(format!(
                        "container directories must be absolute paths, got {}",
                        dir.display()
                    ));
                }
                *field = dir;
            }
        }
        if let Some(t) = c.build_timeout_secs {
            if t == 0 {
                return Err("container.build_timeout_secs must be at least 1".into());
            }
            container.build_timeout_secs = t;
        }
        for (name, section) in file.distro {
            let (distro, settings) = container
                .distros
                .values_mut()
                .find(|(d, _)| d.as_str() == name)
                .ok_or_else(|| format!("[distro.{name}]: unknown distro"))?;
            let _ = distro;
            if let Some(m) = section.mirror {
                settings.mirror = m;
            }
            if let Some(k) = section.keyring {
                settings.keyring = Some(k);
            }
            if let Some(v) = section.verify_signatures {
                settings.verify_signatures = v;
            }
            if let Some(p) = section.packages {
                settings.packages = p;
            }
        }
        if exec.max_timeout_secs == 0 {
            return Err("exec.max_timeout_secs must be at least 1".into());
        }
        if exec.default_timeout_secs == 0 || exec.default_timeout_secs > exec.max_timeout_secs {
            return Err(format!(
                "exec.default_timeout_secs must be between 1 and exec.max_timeout_secs ({})",
                exec.max_timeout_secs
            ));
        }
        if exec.max_output_bytes as u64 > OUTPUT_CAP_LIMIT {
            return Err(format!(
                "exec.max_output_bytes must be at most {OUTPUT_CAP_LIMIT}"
            ));
        }
        if exec.max_concurrent == 0 {
            return Err("exec.max_concurrent must be at least 1".into());
        }
        if let Some(dir) = &file.host_workspace_dir
            && !dir.is_absolute()
        {
            return Err("host_workspace_dir must be an absolute path".into());
        }
        if let Some(dir) = &file.library_path
            && !dir.is_absolute()
        {
            return Err("library_path must be an absolute path".into());
        }
        let mut network = NetworkConfig::default();
        if let Some(pool) = file.network.pool {
            network.pool = pool.parse().map_err(|e| format!("network.pool: {e}"))?;
        }
        for addr in file.network.dns.unwrap_or_default() {
            let ip: std::net::IpAddr = addr
                .parse()
                .map_err(|_| format!("network.dns: '{addr}' is not an IP address"))?;
            network.dns.push(std::net::SocketAddr::new(ip, 53));
        }
        Ok(Self {
            network,
            library_path: file.library_path,
            host_workspace_dir: file.host_workspace_dir,
            limits: ServiceLimits { exec, builds, idle },
            exec_containment: e.isolation.unwrap_or(ContainmentMode::Cgroup),
            container,
        })
    }

    /// Reads the file; a missing file is the defaults (every key is optional).
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mcp_section_is_checked_here_too() {
        Config::parse("[mcp]\nworkspaces = [\"box\"]\nallow_host = false\n").unwrap();
        let e = Config::parse("[mcp]\nallow_hosts = true\n").unwrap_err();
        assert!(e.contains("allow_hosts"), "{e}");
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn reads_every_key() {
        let c = Config::parse(
            "host_workspace_dir = \"/srv/host\"\n[exec]\ndefault_timeout_secs = 10\nmax_timeout_secs = 20\n\
             max_output_bytes = 4096\nmax_concurrent = 3\nisolation = \"process-group\"\n",
        )
        .unwrap();
        assert_eq!(
            c.host_workspace_dir.as_deref(),
            Some(Path::new("/srv/host"))
        );
        assert_eq!(
            c.limits.exec,
            ExecLimits {
                default_timeout_secs: 10,
                max_timeout_secs: 20,
                max_output_bytes: 4096,
                max_concurrent: 3,
                ..ExecLimits::default()
            }
        );
        assert_eq!(c.exec_containment, ContainmentMode::ProcessGroup);
    }

    #[test]
    fn errors_name_the_line() {
        let e = Config::parse("[exec]\nmax_timeout_secs = 10\nbogus = 1\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        let e = Config::parse("[exec]\nmax_timeout_secs = \"ten\"\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn container_and_distro_sections() {
        let c = Config::parse(
            "[container]\ncache_dir = \"/srv/cache\"\nmax_concurrent_builds = 1\n\
             [distro.arch-linux]\nverify_signatures = false\nmirror = \"http://127.0.0.1/arch\"\n",
        )
        .unwrap();
        assert_eq!(c.container.cache_dir, Path::new("/srv/cache"));
        assert_eq!(c.limits.builds.max_concurrent, 1);
        let arch = c.container.distro(Distro::ArchLinux);
        assert!(!arch.verify_signatures);
        assert_eq!(arch.mirror, "http://127.0.0.1/arch");
        assert!(c.container.distro(Distro::DebianBookworm).verify_signatures);
        let e = Config::parse("[distro.gentoo]\nmirror = \"x\"\n").unwrap_err();
        assert!(e.contains("gentoo"), "{e}");
    }

    #[test]
    fn network_section() {
        let c =
            Config::parse("[network]\npool = \"10.99.0.0/24\"\ndns = [\"10.0.2.3\"]\n").unwrap();
        assert_eq!(c.network.pool.to_string(), "10.99.0.0/24");
        assert_eq!(c.network.dns, vec!["10.0.2.3:53".parse().unwrap()]);
        for (text, says) in [
            ("[network]\npool = \"10.99.0.1/24\"", "network.pool"),
            ("[network]\ndns = [\"resolver\"]", "network.dns"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn refuses_out_of_range_values() {
        for text in [
            "[exec]\nmax_timeout_secs = 0",
            "[exec]\ndefault_timeout_secs = 100\nmax_timeout_secs = 10",
            "[exec]\nmax_output_bytes = 100000000",
            "[exec]\nmax_concurrent = 0",
            "host_workspace_dir = \"relative\"",
        ] {
            assert!(Config::parse(text).is_err(), "{text}");
        }
    }
}
