//! Container workspaces on systemd-nspawn: built by a transient build unit, run as a transient
//! unit `agent-workspace-<name>.service` in `machine.slice` (nspawn, not booted, in a user
//! namespace of its own, with the device policy of systemd's own `systemd-nspawn@.service`),
//! registered with machined under the workspace name. The container's PID 2 is this project's
//! agent (nspawn's stub init is PID 1 and reaps zombies): commands are started by the agent, so
//! they are inside every part of the boundary (user namespace, capability bounding set,
//! seccomp filter), each in a cgroup of its own inside the container's delegated subtree, so
//! `cgroup.kill` ends all they started in there.
//!
//! The tree is the container's: code inside can put anything anywhere in it. Every file the
//! service reads or writes there goes through `tree::Tree`, resolved inside the tree.

pub mod build;
mod debug;
pub mod distro;
mod init_log;
pub mod layer;
pub mod leader;
mod lent;
mod networking;
mod orphans;
mod run;
mod state;
pub mod tree;
mod units;

use units::*;
pub use units::{DEFAULT_TASKS_MAX, build_unit_name, container_properties, nspawn_argv, unit_name};

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::ContainerConfig;
use super::systemd::{Systemd, prop};
use crate::core::error::{Error, Result};
use crate::core::manager::{CONTAINER_WORKDIR, command_env};
use crate::core::ports::{BuildSteps, Containers, DebugInfo, ExecIo, ExecOutcome, ExecRequest};
use crate::core::workspace::{Network, Workspace};
use crate::system::commands::agent::AgentConnection;
use crate::system::commands::cgroup::Containment;
use crate::system::commands::exec::{
    Command, Launch, NOT_STARTED, agent_request, agent_terminal, run_contained,
};
use crate::system::network::Networks;
use build::{BuildPlan, BuildResult};
use leader::Leader;
use run::agent_connection;
use tree::Tree;

/// The service's own files inside a container: `/.agent-workspaces/init`.
const OWN_DIR: &str = ".agent-workspaces";
/// How long a started container's agent may take to answer.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent binary, next to the service's own.
pub const AGENT_FILE: &str = "agent-workspaces-agent";
/// The most stdin a plain exec may have to be started again after its container ended as
/// it began (`exec`).
const RETRY_STDIN_MAX: usize = 64 * 1024;
/// The cached leader of one container; its lock makes lookups single-flight.
type LeaderSlot = Arc<tokio::sync::Mutex<Option<Arc<Leader>>>>;

pub struct NspawnContainers {
    systemd: Systemd,
    /// Directories are fixed for the life of the service; distros and the build timeout
    /// change on reload (`reload`).
    config: std::sync::RwLock<ContainerConfig>,
    /// `<state>/builds`: build plans and results.
    builds_dir: PathBuf,
    /// `<state>/agents`: each running container's agent socket, remembered (`leader.rs`).
    agents_dir: PathBuf,
    /// This program, which the build unit runs as `build-tree`.
    program: PathBuf,
    /// The leader of each running container, by workspace name (see `leader`).
    leaders: std::sync::Mutex<HashMap<String, LeaderSlot>>,
    /// The agent, bind-mounted read-only into every container as its payload.
    agent: PathBuf,
    output_cap: usize,
    /// Links, addresses, DNS and rules of containers with a network of their own.
    network: Arc<Networks>,
    /// Per workspace name: held by a start and by a change of the tree's layers while the
    /// container is stopped (which unmounts and mounts the tree), so neither sees the other
    /// half done.
    trees: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The workspaces whose layers are being flattened in the background (one at a time
    /// each; see `state.rs`).
    flattening: Arc<std::sync::Mutex<state::Flattening>>,
    /// The connections `connect_port` lent, by workspace name: their sockets' inodes, looked
    /// for in the container's TCP tables to tell whether a caller still holds one (`lent.rs`).
    lent: std::sync::Mutex<HashMap<String, Vec<u64>>>,
    /// Why copy-on-write trees cannot be made here, when they cannot (`probe_copy_on_write`).
    copy_on_write_off: std::sync::Mutex<Option<String>>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("Cannot {what} {}", path.display()), e)
}

impl NspawnContainers {
    pub fn new(
        systemd: Systemd,
        config: ContainerConfig,
        state_dir: &Path,
        program: PathBuf,
        output_cap: usize,
        network: Arc<Networks>,
    ) -> Self {
        Self {
            systemd,
            config: std::sync::RwLock::new(config),
            builds_dir: state_dir.join("builds"),
            agents_dir: state_dir.join("agents"),
            agent: program.with_file_name(AGENT_FILE),
            leaders: Default::default(),
            program,
            output_cap,
            network,
            trees: Default::default(),
            flattening: Default::default(),
            lent: Default::default(),
            copy_on_write_off: Default::default(),
        }
    }

    fn config(&self) -> std::sync::RwLockReadGuard<'_, ContainerConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the settings that can change while the service runs: the distros (mirror,
    /// keyring, signatures, packages) and the build timeout, for the next build. Returns the
    /// names of changed settings that only a restart applies (the directories: trees, caches
    /// and logs already live where they are).
    pub fn reload(&self, new: &ContainerConfig) -> Vec<&'static str> {
        let mut c = self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.distros = new.distros.clone();
        c.build_timeout_secs = new.build_timeout_secs;
        [
            ("container.machines_dir", c.machines_dir != new.machines_dir),
            ("container.cache_dir", c.cache_dir != new.cache_dir),
            ("container.log_dir", c.log_dir != new.log_dir),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// The workspace's tree, opened for confined access.
    fn tree(&self, ws: &Workspace) -> std::io::Result<Tree> {
        Tree::open_container(&self.tree_path(&ws.name))
    }

    fn log_path(&self, ws: &Workspace) -> PathBuf {
        self.config().log_dir.join(&ws.id).join("init.log")
    }

    fn plan_paths(&self, ws: &Workspace) -> (PathBuf, PathBuf) {
        (
            self.builds_dir.join(format!("{}.json", ws.id)),
            self.builds_dir.join(format!("{}.result.json", ws.id)),
        )
    }

    /// The running container's leader, starting the container first if it is not running.
    /// Looked up once per container start and kept (checked through its pidfd), so the exec
    /// path makes no bus call; a burst of commands waits for one lookup (the bus refuses more
    /// than 128 pending calls per connection).
    async fn leader(&self, ws: &Workspace) -> Result<Arc<Leader>> {
        let slot = self
            .leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(ws.name.clone())
            .or_default()
            .clone();
        let mut cached = slot.lock().await;
        if let Some(l) = cached.as_ref().filter(|l| l.alive()) {
            return Ok(l.clone());
        }
        *cached = None;
        let mut pid = self.systemd.machine_leader(&ws.name).await?;
        if pid.is_none() {
            self.start(ws).await?;
            pid = self.systemd.machine_leader(&ws.name).await?;
        }
        if pid.is_none() {
            // The start found the machine of a container that was ending (its agent just
            // killed) still registered, and it went a moment later: its unit's end is waited
            // for, and it is started again.
            self.systemd.stop(&unit_name(&ws.name)).await?;
            self.start(ws).await?;
            pid = self.systemd.machine_leader(&ws.name).await?;
        }
        let pid = pid.ok_or_else(|| {
            Error::JobFailed(format!(
                "The container of workspace '{}' is not running",
                ws.name
            ))
        })?;
        let leader = Arc::new(self.open_leader(ws, pid).await?);
        *cached = Some(leader.clone());
        Ok(leader)
    }

    /// The leader `pid` of the workspace's container, opened with its payload cgroup (from what
    /// systemd says of its unit) and where its agent's socket is remembered.
    async fn open_leader(&self, ws: &Workspace, pid: u32) -> Result<Leader> {
        let unit = unit_name(&ws.name);
        let cgroup = self
            .systemd
            .unit_state(&unit)
            .await?
            .map(|s| s.control_group)
            .unwrap_or_default();
        Leader::open(pid, &cgroup, self.agents_dir.join(&ws.name)).map_err(|e| {
            Error::JobFailed(format!(
                "Cannot reach the container of workspace '{}': {e}",
                ws.name
            ))
        })
    }

    /// Forgets the leader of a container that is stopped or removed, with the command cgroups
    /// kept below its payload and the record of its agent's socket.
    fn forget_leader(&self, name: &str) {
        let slot = self
            .leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        if let Some(leader) = slot.as_ref().and_then(|s| s.try_lock().ok()?.clone()) {
            crate::system::commands::cgroup::forget_kept_below(leader.payload.path());
        }
        let _ = fs::remove_file(self.agents_dir.join(name));
    }
}

#[async_trait]
impl Containers for NspawnContainers {
    fn tree_path(&self, name: &str) -> PathBuf {
        self.config().machines_dir.join(name)
    }

    fn is_built(&self, ws: &Workspace) -> bool {
        self.tree(ws).is_ok_and(|t| t.is_dir("workspace"))
    }

    async fn check_name_free(&self, name: &str) -> Result<()> {
        let tree = self.tree_path(name);
        if tree.exists() {
            return Err(Error::WorkspaceExists(format!(
                "Cannot create workspace '{name}': the machine image {} exists already",
                tree.display()
            )));
        }
        if self.systemd.machine_or_image_exists(name).await? {
            return Err(Error::WorkspaceExists(format!(
                "Cannot create workspace '{name}': a machine or image '{name}' is known to machined"
            )));
        }
        Ok(())
    }

    async fn build_tree(&self, ws: &Workspace, steps: BuildSteps) -> Result<()> {
        let distro = ws
            .distro
            .ok_or_else(|| Error::JobFailed(format!("Workspace '{}' has no distro", ws.name)))?;
        fs::create_dir_all(&self.builds_dir).map_err(|e| io("create", &self.builds_dir, e))?;
        let (plan_path, result_path) = self.plan_paths(ws);
        let _ = fs::remove_file(&result_path);
        let plan = BuildPlan {
            workspace_id: ws.id.clone(),
            name: ws.name.clone(),
            distro,
            settings: self.config().distro(distro),
            tree: self.tree_path(&ws.name),
            cache_dir: self.config().cache_dir.clone(),
            log: self.log_path(ws),
            result: result_path.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&plan)
            .map_err(|e| Error::io("Cannot encode the build plan", e.into()))?;
        fs::write(&plan_path, bytes).map_err(|e| io("write", &plan_path, e))?;
        let unit = build_unit_name(&ws.name);
        let program = self.program.display().to_string();
        let argv = vec![
            program.clone(),
            "build-tree".to_owned(),
            plan_path.display().to_string(),
        ];
        let props = vec![
            prop(
                "Description",
                format!("Build of agent workspace {}", ws.name),
            ),
            prop("Type", "oneshot"),
            // build-tree says each step with STATUS=, which becomes the workspace's BuildStep.
            prop("NotifyAccess", "main"),
            prop("CollectMode", "inactive-or-failed"),
            // A oneshot's whole run is its start: the start timeout bounds the build.
            prop(
                "TimeoutStartUSec",
                u64::from(self.config().build_timeout_secs) * 1_000_000,
            ),
            prop("LogExtraFields", log_fields(ws)),
            prop("ExecStart", vec![(program, argv, false)]),
        ];
        info!(workspace_id = %ws.id, workspace_name = %ws.name, unit = %unit,
              "Starting {unit} to build the tree of {}", ws.name);
        let status = self.systemd.watch_status(&unit).await?;
        let forward = tokio::spawn(async move {
            tokio::pin!(status);
            while let Some(step) = status.next().await {
                if steps.send(step).is_err() {
                    break;
                }
            }
        });
        let started = self.systemd.start_transient(&unit, props).await;
        forward.abort();
        let result = read_result(&result_path);
        let _ = fs::remove_file(&plan_path);
        match (started, result) {
            (Ok(()), Some(r)) if r.ok => Ok(()),
            (_, Some(r)) => Err(build_failed(ws, &r)),
            (Err(e), _) => Err(Error::JobFailed(format!(
                "Build of '{}' failed: {e} (builds are stopped after build_timeout_secs = {})",
                ws.name,
                self.config().build_timeout_secs
            ))),
            (Ok(()), _) => Err(Error::JobFailed(format!(
                "Build of '{}' failed: {unit} left no result",
                ws.name
            ))),
        }
    }

    async fn wait_build(&self, ws: &Workspace) -> Result<()> {
        // The build unit outlives the service; it ends by itself (it has a RuntimeMaxSec).
        self.systemd
            .wait_until_stopped(&build_unit_name(&ws.name))
            .await?;
        let (plan, result_path) = self.plan_paths(ws);
        let result = read_result(&result_path);
        let _ = fs::remove_file(plan);
        match result {
            Some(r) if r.ok => Ok(()),
            Some(r) => Err(build_failed(ws, &r)),
            None if self.is_built(ws) => Ok(()),
            None => Err(Error::JobFailed(format!(
                "The build of '{}' was interrupted; run RebuildWorkspace",
                ws.name
            ))),
        }
    }

    async fn start(&self, ws: &Workspace) -> Result<()> {
        if self.systemd.machine_leader(&ws.name).await?.is_some() {
            return Ok(());
        }
        let _tree = self.tree_lock(&ws.name).await;
        if self.systemd.machine_leader(&ws.name).await?.is_some() {
            return Ok(());
        }
        let tree = self.tree_path(&ws.name);
        // A layered tree is mounted again after a reboot.
        let path = tree.clone();
        tokio::task::spawn_blocking(move || layer::ensure_mounted(&path))
            .await
            .map_err(|e| Error::io_msg(format!("Cannot mount the tree: {e}")))?
            .map_err(|e| io("mount the layered tree", &tree, e))?;
        if !self.is_built(ws) {
            return Err(Error::NotReady {
                workspace: ws.name.clone(),
                status: "not built".into(),
            });
        }
        // Never a container without its agent (and so without the boundary the agent is in).
        if !self.agent.is_file() {
            return Err(Error::JobFailed(format!(
                "Cannot start workspace '{}': the container agent {} is missing (reinstall agent-workspaces)",
                ws.name,
                self.agent.display()
            )));
        }
        let unit = unit_name(&ws.name);
        // A unit that failed before stays loaded until reset.
        self.systemd.stop(&unit).await?;
        let layered = layer::has_layer(&tree);
        self.systemd
            .start_transient(&unit, container_properties(ws, &tree, &self.agent, layered))
            .await?;
        // The container is up when its agent answers. (nspawn's --notify-ready=yes cannot say
        // so: it takes READY=1 only from the container's PID 1, here nspawn's own stub init.)
        // nspawn registers the machine before it tells systemd it is ready, so the leader is
        // known once the start job is done. What is left to wait for is the agent binding its
        // socket, a few milliseconds: tried again with a growing pause (a local connect; the
        // bus is asked again only while machined does not know the machine).
        let deadline = tokio::time::Instant::now() + AGENT_START_TIMEOUT;
        let mut leader = None;
        let mut pause = Duration::from_millis(1);
        let why = loop {
            let why = match &leader {
                None => match self.systemd.machine_leader(&ws.name).await? {
                    None => format!("machine '{}' did not register with machined", ws.name),
                    Some(pid) => match self.open_leader(ws, pid).await {
                        Ok(l) => {
                            leader = Some(l);
                            continue;
                        }
                        Err(e) => format!("its leader cannot be reached: {e}"),
                    },
                },
                Some(l) => match agent_connection(l).await {
                    Ok(_) => {
                        if let Err(e) = self.connect(ws, l).await {
                            let _ = self.systemd.stop(&unit).await;
                            let _ = self.network.detach(&ws.id).await;
                            return Err(e);
                        }
                        info!(workspace_id = %ws.id, workspace_name = %ws.name,
                              "Started container {} ({unit})", ws.name);
                        return Ok(());
                    }
                    Err(e) => format!("its agent does not answer: {e}"),
                },
            };
            if tokio::time::Instant::now() + pause >= deadline {
                break why;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        let _ = self.systemd.stop(&unit).await;
        Err(Error::JobFailed(format!(
            "{unit} started but {why} within {} s; it was stopped",
            AGENT_START_TIMEOUT.as_secs()
        )))
    }

    async fn stop(&self, ws: &Workspace) -> Result<()> {
        self.forget_leader(&ws.name);
        self.forget_lent(&ws.name);
        // A frozen container is thawed first: its processes could not act on the stop's
        // SIGTERM, and the stop would wait its whole timeout for them.
        self.freeze(ws, false).await?;
        self.systemd.stop(&build_unit_name(&ws.name)).await?;
        self.systemd.stop(&unit_name(&ws.name)).await?;
        self.network.detach(&ws.id).await
    }

    async fn apply_egress(&self, ws: &Workspace) -> Result<()> {
        self.set_egress(ws).await
    }

    async fn freeze(&self, ws: &Workspace, freeze: bool) -> Result<()> {
        self.freeze_unit(ws, freeze).await
    }

    async fn is_frozen(&self, ws: &Workspace) -> Result<bool> {
        self.unit_frozen(ws).await
    }

    async fn apply_limits(&self, ws: &Workspace) -> Result<()> {
        let unit = unit_name(&ws.name);
        let running = self.systemd.unit_state(&unit).await?;
        if running.is_none_or(|s| s.active_state != "active") {
            return Ok(());
        }
        let props = limit_props(&ws.limits)
            .into_iter()
            .map(|(k, v)| prop(k, v))
            .collect();
        self.systemd.set_unit_properties(&unit, props).await
    }

    async fn exec(
        &self,
        ws: &Workspace,
        req: ExecRequest,
        cancel: CancellationToken,
    ) -> Result<ExecOutcome> {
        self.exec_retried(ws, req, cancel).await
    }

    async fn connect_port(&self, ws: &Workspace, port: u16) -> Result<std::os::fd::OwnedFd> {
        let leader = self.leader(ws).await?;
        let fd = lent::connect_inside(&leader, port).await.map_err(|e| {
            Error::JobFailed(format!(
                "Cannot connect to port {port} in workspace '{}': {e}",
                ws.name
            ))
        })?;
        self.lend(ws, &fd);
        Ok(fd)
    }

    async fn lent_connections_open(&self, ws: &Workspace) -> bool {
        self.lent_open(ws).await
    }

    async fn files(
        &self,
        ws: &Workspace,
        call: crate::core::files::FileCall,
        cancel: CancellationToken,
    ) -> Result<crate::core::files::FileOutcome> {
        let (_leader, conn) = self.agent_of(ws).await?;
        crate::system::commands::files::call(conn, call, &ws.name, &cancel).await
    }

    async fn run_init(
        &self,
        ws: &Workspace,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<ExecOutcome> {
        // /.agent-workspaces is the service's: whatever the container put there instead is
        // replaced, and the script belongs to the container's root.
        self.tree(ws)
            .and_then(|t| t.dir("", false))
            .and_then(|root| root.own_dir(OWN_DIR, 0o755))
            .and_then(|dir| dir.write_file("init", ws.init_script.as_bytes(), 0o700))
            .map_err(|e| {
                Error::io(
                    format!(
                        "Cannot write the init script of workspace '{}' to /{OWN_DIR}/init in its tree",
                        ws.name
                    ),
                    e,
                )
            })?;
        let command = if ws.init_script.starts_with("#!") {
            format!("exec /{OWN_DIR}/init")
        } else {
            // The shell the agent runs commands with: bash where there is one.
            format!("exec \"${{BASH:-/bin/sh}}\" /{OWN_DIR}/init")
        };
        self.append_to_log(ws, b"== init script started\n").await;
        let req = ExecRequest {
            workspace_id: ws.id.clone(),
            command,
            env: command_env(ws, Default::default()),
            cwd: CONTAINER_WORKDIR.into(),
            io: ExecIo::default(),
            timeout,
            output_cap: self.output_cap,
            signals: None,
            terminal: false,
            keep: None,
        };
        let outcome = self.exec(ws, req, cancel).await?;
        self.append_to_log(ws, &outcome.stdout).await;
        self.append_to_log(ws, &outcome.stderr).await;
        for line in String::from_utf8_lossy(&outcome.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&outcome.stderr).lines())
        {
            info!(workspace_id = %ws.id, workspace_name = %ws.name, "init: {line}");
        }
        let end = format!(
            "== init script finished: exit code {}{} after {:.1} s\n",
            outcome.exit_code,
            if outcome.timed_out {
                " (timed out)"
            } else {
                ""
            },
            outcome.duration.as_secs_f64()
        );
        self.append_to_log(ws, end.as_bytes()).await;
        Ok(outcome)
    }

    async fn init_log(&self, ws: &Workspace, max_lines: u32) -> Result<(String, u32)> {
        self.read_log(ws, max_lines).await
    }

    async fn append_log(&self, ws: &Workspace, line: &str) {
        self.append_to_log(ws, format!("{line}\n").as_bytes()).await;
    }

    async fn clean_orphans(&self, known: &[Workspace], taken: crate::core::ports::NameTaken) {
        self.reconcile_networks(known).await;
        let names: Vec<String> = known.iter().map(|w| w.name.clone()).collect();
        self.remove_orphans(&names, taken).await
    }

    async fn debug_info(&self, ws: &Workspace) -> Result<DebugInfo> {
        self.debug_report(ws).await
    }

    async fn snapshot(&self, ws: &Workspace, name: &str) -> Result<()> {
        self.take_snapshot(ws, name).await
    }

    async fn snapshots(&self, ws: &Workspace) -> Result<Vec<crate::core::ports::SnapshotInfo>> {
        self.list_snapshots(ws).await
    }

    async fn delete_snapshot(&self, ws: &Workspace, name: &str) -> Result<()> {
        self.remove_snapshot(ws, name).await
    }

    async fn restore(&self, ws: &Workspace, name: &str) -> Result<()> {
        self.restore_snapshot(ws, name).await
    }

    async fn fork_tree(&self, source: &Workspace, snapshot: &str, fork: &Workspace) -> Result<()> {
        self.make_fork(source, snapshot, fork).await
    }

    async fn fork_done(&self, fork: &Workspace) -> Result<()> {
        self.finish_fork(fork).await
    }

    async fn disk_usage(&self, ws: &Workspace) -> Result<u64> {
        self.layer_usage(ws).await
    }

    async fn remove(&self, ws: &Workspace) -> Result<()> {
        self.forget_lent(&ws.name);
        self.forget_flatten(&ws.name);
        self.network.detach(&ws.id).await?;
        let tree = self.tree_path(&ws.name);
        let mut partial = tree.clone().into_os_string();
        partial.push(".partial");
        let others = [PathBuf::from(partial), self.config().log_dir.join(&ws.id)];
        // std's remove_dir_all never follows a link (it works with openat/unlinkat from the
        // directory's descriptor), so a tree full of links to the host removes only the tree.
        // The tree goes with its layer (a layered tree is unmounted first).
        tokio::task::spawn_blocking(move || {
            layer::remove(&tree).map_err(|e| io("remove", &tree, e))?;
            for dir in others {
                match fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("remove", &dir, e)),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::io_msg(format!("Cannot remove the tree: {e}")))??;
        let (plan, result) = self.plan_paths(ws);
        let _ = fs::remove_file(plan);
        let _ = fs::remove_file(result);
        self.reclaim_bases().await;
        Ok(())
    }
}

/// The outcome a build unit left, if any.
fn read_result(path: &Path) -> Option<BuildResult> {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn build_failed(ws: &Workspace, r: &BuildResult) -> Error {
    Error::JobFailed(format!(
        "Build of '{}' failed in step '{}': {}",
        ws.name, r.step, r.message
    ))
}
