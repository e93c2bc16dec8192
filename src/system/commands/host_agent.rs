//! The host agent: `agent-workspaces-agent` run on the host as a unit of its own,
//! `agent-workspaces-host-agent.service` (transient, started by the service when a host
//! workspace first starts a background process). Background processes of host workspaces are
//! started by it, in cgroups below its unit's, exactly as a container's agent starts a
//! container's: so they are not in the service's unit, and a restart of the service (which
//! ends everything in its own cgroup) leaves them running; the agent, their parent, reports
//! each one's exit on the connection the service keeps (`keep.rs`). Plain `Exec`s stay the
//! service's own children: they end with the call, and with the service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::core::error::{Error, Result};
use crate::system::commands::agent::AgentConnection;
use crate::system::commands::cgroup::{CgroupParent, cgroup2_mount};
use crate::system::systemd::{Systemd, prop};

pub const UNIT: &str = "agent-workspaces-host-agent.service";
/// Its slice, set on the unit: where its cgroup is found at start (`end_unclaimed`) before
/// systemd can be asked.
const SLICE: &str = "system.slice";
/// Its socket (the agent makes the directory, mode 0700).
pub const SOCKET: &str = "/run/agent-workspaces-host-agent/agent.sock";
/// How long a started agent may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HostAgent {
    systemd: Systemd,
    /// The agent binary.
    program: PathBuf,
    /// One start at a time; the cgroup of the agent's unit once it is known to run (the
    /// next connection then makes no bus call).
    starting: tokio::sync::Mutex<Option<Arc<CgroupParent>>>,
}

impl HostAgent {
    pub fn new(systemd: Systemd, program: PathBuf) -> Self {
        Self {
            systemd,
            program,
            starting: tokio::sync::Mutex::new(None),
        }
    }

    /// The agent's unit's cgroup, the agent started first if it does not run, and a
    /// connection to it.
    pub async fn connect(&self) -> Result<(Arc<CgroupParent>, AgentConnection)> {
        let known = self.starting.lock().await.clone();
        if let Some(cgroup) = known {
            // Where that fails, the agent stopped since: looked at again, started again.
            if let Ok(conn) = AgentConnection::connect_path(Path::new(SOCKET)).await {
                return Ok((cgroup, conn));
            }
        }
        let mut known = self.starting.lock().await;
        let cgroup = match self.running_cgroup().await? {
            Some(cg) => cg,
            None => {
                if !self.program.is_file() {
                    return Err(Error::JobFailed(format!(
                        "Cannot start the host agent: {} is missing (reinstall agent-workspaces)",
                        self.program.display()
                    )));
                }
                // A unit that failed before stays loaded until reset.
                self.systemd.stop(UNIT).await?;
                self.systemd
                    .start_transient(UNIT, self.properties())
                    .await?;
                self.running_cgroup().await?.ok_or_else(|| {
                    Error::JobFailed(format!("{UNIT} ended as soon as it started"))
                })?
            }
        };
        // Started a moment ago, the agent may not listen yet.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            match AgentConnection::connect_path(Path::new(SOCKET)).await {
                Ok(conn) => {
                    *known = Some(cgroup.clone());
                    return Ok((cgroup, conn));
                }
                Err(e) if tokio::time::Instant::now() + pause >= deadline => {
                    return Err(Error::JobFailed(format!(
                        "The host agent ({UNIT}) does not answer on {SOCKET}: {e}"
                    )));
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// The cgroup of the agent's unit while it runs. The agent sees the host's whole
    /// hierarchy: a command's cgroup is named to it by its path from the root.
    async fn running_cgroup(&self) -> Result<Option<Arc<CgroupParent>>> {
        let Some(state) = self.systemd.unit_state(UNIT).await? else {
            return Ok(None);
        };
        if !matches!(state.active_state.as_str(), "active" | "reloading")
            || state.control_group.is_empty()
        {
            return Ok(None);
        }
        let mount = cgroup2_mount()
            .ok_or_else(|| Error::JobFailed("No cgroup v2 hierarchy is mounted".into()))?;
        let path = mount.join(state.control_group.trim_start_matches('/'));
        let parent = CgroupParent::open(&path, Some(PathBuf::from(&state.control_group)), None)
            .map_err(|e| Error::io(format!("Cannot open {}", path.display()), e))?;
        Ok(Some(parent))
    }

    fn properties(&self) -> Vec<(String, zbus::OwnedVariant)> {
        let program = self.program.to_string_lossy().into_owned();
        let argv = vec![program.clone(), "--socket".to_owned(), SOCKET.to_owned()];
        vec![
            prop(
                "Description",
                "agent-workspaces host agent (background processes of host workspaces)",
            ),
            prop("ExecStart", vec![(program, argv, false)]),
            prop("Slice", SLICE),
            // Its processes get cgroups of their own below the unit's.
            prop("Delegate", true),
            // Killed by the OOM killer, one process must not take the rest down.
            prop("OOMPolicy", "continue"),
        ]
    }
}

/// Ends the processes of the host agent's that no kept process claims: left by a run of the
/// service whose descriptors systemd let go (`systemctl stop`, then start), nothing could
/// read their output or report their end any more. At start, before any process is started.
pub fn end_unclaimed(claimed: &[u64]) {
    let Some(mount) = cgroup2_mount() else { return };
    let unit = mount.join(SLICE).join(UNIT);
    let Ok(entries) = std::fs::read_dir(&unit) else {
        return;
    };
    let mut ended = 0;
    for dir in entries.flatten().map(|e| e.path()) {
        let is_command = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("exec-"));
        let id = std::fs::symlink_metadata(&dir).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        if is_command && dir.is_dir() && !id.is_ok_and(|id| claimed.contains(&id)) {
            if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                ended += 1;
            }
            // Removed once empty; a busy one is left for the next start.
            let dir = dir.clone();
            std::thread::spawn(move || {
                for _ in 0..250 {
                    if std::fs::remove_dir(&dir).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    }
    if ended > 0 {
        tracing::warn!(
            "Ended the processes of {ended} background commands of the host agent that no kept process claims (the service was stopped, and systemd let their streams go)"
        );
    }
}
