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

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zbus::OwnedVariant;

use super::agent::{AgentConnection, Leader};
use super::build::{BuildPlan, BuildResult};
use super::config::ContainerConfig;
use super::exec::{Command, Containment, Launch, cgroup2_mount, run_contained};
use super::systemd::{Systemd, prop};
use super::tree::Tree;
use crate::core::error::{Error, Result};
use crate::core::manager::{CONTAINER_WORKDIR, command_env};
use crate::core::ports::{
    BuildSteps, Containers, DebugInfo, DebugValue, ExecIo, ExecOutcome, ExecRequest,
};
use crate::core::workspace::{Network, Workspace};
use agent_workspaces_agent::{self as agent_proto, AGENT_PATH};

/// The init log is cut back to its last half when it grows past this.
const LOG_MAX: u64 = 4 * 1024 * 1024;
/// The service's own files inside a container: `/.agent-workspaces/init`.
const OWN_DIR: &str = ".agent-workspaces";
/// How long a started container's agent may take to answer.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent binary, next to the service's own.
pub const AGENT_FILE: &str = "agent-workspaces-agent";
/// `TasksMax=` of a container without a `tasks_max` limit: the value of systemd's own
/// `systemd-nspawn@.service`.
pub const DEFAULT_TASKS_MAX: u64 = 16384;
/// `DeviceAllow=` of systemd's own `systemd-nspawn@.service` (systemd 252), with
/// `DevicePolicy=closed`: beyond the standard pseudo devices (null, zero, full, random,
/// urandom, tty, ptmx), only these.
const DEVICE_ALLOW: [(&str, &str); 7] = [
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

/// The cached leader of one container; its lock makes lookups single-flight.
type LeaderSlot = Arc<tokio::sync::Mutex<Option<Arc<Leader>>>>;

pub struct NspawnContainers {
    systemd: Systemd,
    /// Directories are fixed for the life of the service; distros and the build timeout
    /// change on reload (`reload`).
    config: std::sync::RwLock<ContainerConfig>,
    /// `<state>/builds`: build plans and results.
    builds_dir: PathBuf,
    /// This program, which the build unit runs as `build-tree`.
    program: PathBuf,
    /// The leader of each running container, by workspace name (see `leader`).
    leaders: std::sync::Mutex<HashMap<String, LeaderSlot>>,
    /// The agent, bind-mounted read-only into every container as its payload.
    agent: PathBuf,
    output_cap: usize,
}

pub fn unit_name(name: &str) -> String {
    format!("agent-workspace-{name}.service")
}

pub fn build_unit_name(name: &str) -> String {
    // '@' is in no workspace name, so no container's unit can be named like a build unit.
    format!("agent-workspace-build@{name}.service")
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("Cannot {what} {}", path.display()), e)
}

/// Journal fields of a unit's output (`LogExtraFields=`, type `aay`), so that
/// `journalctl WORKSPACE_ID=...` includes builds and containers.
fn log_fields(ws: &Workspace) -> Vec<Vec<u8>> {
    vec![
        format!("WORKSPACE_ID={}", ws.id).into_bytes(),
        format!("WORKSPACE_NAME={}", ws.name).into_bytes(),
    ]
}

/// The systemd-nspawn command line of a container workspace. Its payload is the agent,
/// bind-mounted read-only from the host: it runs as PID 2 in the container's namespaces (its
/// own user namespace: container root is not host root; `auto` maps the tree's ownership with
/// an idmapped mount where the file system supports it, and chowns it once where not).
pub fn nspawn_argv(ws: &Workspace, tree: &Path, agent: &Path) -> Vec<String> {
    let mut argv = vec![
        "/usr/bin/systemd-nspawn".to_owned(),
        "--quiet".to_owned(),
        "--keep-unit".to_owned(),
        "--register=yes".to_owned(),
        format!("--directory={}", tree.display()),
        format!("--machine={}", ws.name),
        "--private-users=pick".to_owned(),
        "--private-users-ownership=auto".to_owned(),
        format!("--bind-ro={}:{AGENT_PATH}", agent.display()),
        "--as-pid2".to_owned(),
        "--console=pipe".to_owned(),
    ];
    if ws.network == Network::Private {
        argv.push("--private-network".to_owned());
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
) -> Vec<(String, OwnedVariant)> {
    let argv = nspawn_argv(ws, tree, agent);
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
fn limit_props(l: &crate::core::workspace::Limits) -> [(&'static str, u64); 3] {
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

impl NspawnContainers {
    pub fn new(
        systemd: Systemd,
        config: ContainerConfig,
        state_dir: &Path,
        program: PathBuf,
        output_cap: usize,
    ) -> Self {
        Self {
            systemd,
            config: std::sync::RwLock::new(config),
            builds_dir: state_dir.join("builds"),
            agent: program.with_file_name(AGENT_FILE),
            leaders: Default::default(),
            program,
            output_cap,
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
        let pid = match self.systemd.machine_leader(&ws.name).await? {
            Some(pid) => pid,
            None => {
                self.start(ws).await?;
                self.systemd
                    .machine_leader(&ws.name)
                    .await?
                    .ok_or_else(|| {
                        Error::JobFailed(format!(
                            "The container of workspace '{}' is not running",
                            ws.name
                        ))
                    })?
            }
        };
        let leader = Arc::new(Leader::open(pid).map_err(|e| {
            Error::JobFailed(format!(
                "Cannot reach the container of workspace '{}': {e}",
                ws.name
            ))
        })?);
        *cached = Some(leader.clone());
        Ok(leader)
    }

    /// Forgets the leader of a container that is stopped or removed.
    fn forget_leader(&self, name: &str) {
        self.leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
    }

    /// Appends to the init log (cut back to its last half past `LOG_MAX`), on a blocking
    /// thread: the cut rewrites megabytes.
    async fn append_to_log(&self, ws: &Workspace, text: &[u8]) {
        let path = self.log_path(ws);
        let text = text.to_vec();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                let _ = fs::create_dir_all(dir);
            }
            if fs::metadata(&path).is_ok_and(|m| m.len() > LOG_MAX) {
                if let Ok(old) = fs::read(&path) {
                    let keep = &old[old.len() - (LOG_MAX / 2) as usize..];
                    let _ = fs::write(&path, keep);
                }
            }
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&path) {
                let _ = f.write_all(&text);
            }
        })
        .await;
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
        let tree = self.tree_path(&ws.name);
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
        self.systemd
            .start_transient(&unit, container_properties(ws, &tree, &self.agent))
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
                    Some(pid) => match Leader::open(pid) {
                        Ok(l) => {
                            leader = Some(l);
                            continue;
                        }
                        Err(e) => format!("its leader is gone: {e}"),
                    },
                },
                Some(l) => match AgentConnection::connect(l).await {
                    Ok(_) => {
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
        self.systemd.stop(&build_unit_name(&ws.name)).await?;
        self.systemd.stop(&unit_name(&ws.name)).await
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
        let leader = self.leader(ws).await?;
        let conn = AgentConnection::connect(&leader).await.map_err(|e| {
            Error::JobFailed(format!(
                "The agent of workspace '{}' does not answer: {e} (StopWorkspace and StartWorkspace restart it)",
                ws.name
            ))
        })?;
        // The working directory is resolved by the agent, inside the container.
        let request = agent_proto::ExecRequest {
            command: req.command.into_bytes(),
            cwd: req.cwd.as_os_str().as_bytes().to_vec(),
            env: req
                .env
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                .collect(),
        };
        let command = Command {
            launch: Launch::Agent {
                conn,
                request,
                workspace: &ws.name,
            },
            io: req.io,
            timeout: req.timeout,
            output_cap: req.output_cap,
        };
        let containment = Containment::Cgroup(leader.payload.clone());
        run_contained(command, &containment, &cancel).await
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
        let path = self.log_path(ws);
        let text = match tokio::fs::read(&path).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("read", &path, e)),
        };
        let lines: Vec<&str> = text.lines().collect();
        let total = lines.len() as u32;
        let from = if max_lines == 0 {
            0
        } else {
            lines.len().saturating_sub(max_lines as usize)
        };
        let mut content = lines[from..].join("\n");
        if !content.is_empty() {
            content.push('\n');
        }
        Ok((content, total))
    }

    async fn append_log(&self, ws: &Workspace, line: &str) {
        self.append_to_log(ws, format!("{line}\n").as_bytes()).await;
    }

    async fn clean_orphans(&self, known: &[String]) {
        let is_known = |name: &str| known.iter().any(|k| k == name);
        if let Ok(entries) = fs::read_dir(&self.config().machines_dir) {
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if let Some(name) = file.strip_suffix(".partial") {
                    // Only a build of ours makes <name>.partial with a configured tree inside.
                    if !is_known(name) && Tree::open(&path).is_ok_and(|t| t.is_dir("workspace")) {
                        warn!(
                            "Removing {}, a half-built tree without a workspace record",
                            path.display()
                        );
                        let _ = fs::remove_dir_all(&path);
                    }
                } else if !is_known(&file) && Tree::open(&path).is_ok_and(|t| t.is_dir(OWN_DIR)) {
                    warn!(
                        "The container tree {} has no workspace record; it is left in place (remove it with: machinectl remove {file})",
                        path.display()
                    );
                }
            }
        }
        match self
            .systemd
            .units_matching("agent-workspace-*.service")
            .await
        {
            Ok(units) => {
                for (unit, description, _) in units {
                    let base = unit.strip_suffix(".service").unwrap_or(&unit);
                    let name = base
                        .strip_prefix("agent-workspace-build@")
                        .or_else(|| base.strip_prefix("agent-workspace-"))
                        .unwrap_or("");
                    let ours = description.starts_with("Agent workspace ")
                        || description.starts_with("Build of agent workspace ");
                    if !name.is_empty() && !is_known(name) && ours {
                        warn!("Stopping {unit}: it belongs to no workspace record");
                        if let Err(e) = self.systemd.stop(&unit).await {
                            warn!("Cannot stop {unit}: {e}");
                        }
                    }
                }
            }
            Err(e) => warn!("Cannot look for leftover units: {e}"),
        }
    }

    async fn debug_info(&self, ws: &Workspace) -> Result<DebugInfo> {
        use DebugValue::{Bool, List, Str, U64};
        let path = self.tree_path(&ws.name);
        let mut info = DebugInfo::new();
        info.insert("tree".into(), Str(path.display().to_string()));
        // Everything read from the tree is resolved inside it and bounded: what the container
        // planted there (links, FIFOs, devices, huge files) costs an empty field, not a hang.
        let tree = self.tree(ws).ok();
        info.insert("tree_exists".into(), Bool(tree.is_some()));
        info.insert(
            "init_script_present".into(),
            Bool(!ws.init_script.is_empty()),
        );
        let Some(tree) = tree else {
            return self.debug_units(ws, info).await;
        };
        let (tree, usage) = tokio::task::spawn_blocking(move || {
            let u = tree.disk_usage("", Duration::from_secs(3), 2_000_000);
            (tree, u)
        })
        .await
        .map_err(|e| Error::io_msg(format!("Cannot measure the tree: {e}")))?;
        info.insert("tree_size_bytes".into(), U64(usage.bytes));
        info.insert("tree_size_complete".into(), Bool(usage.complete));
        let present: Vec<String> = ["bin", "etc", "usr", "var", "tmp", "root", "workspace"]
            .into_iter()
            .filter(|d| tree.is_dir(d))
            .map(String::from)
            .collect();
        info.insert("directories".into(), List(present));
        let shell = ["bin/bash", "bin/sh"]
            .into_iter()
            .find(|s| tree.is_file(s))
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        info.insert("shell".into(), Str(shell));
        let changed = tree
            .modified(format!("{OWN_DIR}/init"))
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64);
        info.insert("init_script_changed_usec".into(), U64(changed));
        let os = ["etc/os-release", "usr/lib/os-release"]
            .into_iter()
            .find_map(|p| tree.read(p, 64 * 1024).ok())
            .unwrap_or_default();
        let pretty = String::from_utf8_lossy(&os)
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .unwrap_or("")
            .trim_matches('"')
            .chars()
            .take(256)
            .collect();
        info.insert("os_release".into(), Str(pretty));
        self.debug_units(ws, info).await
    }

    async fn remove(&self, ws: &Workspace) -> Result<()> {
        let tree = self.tree_path(&ws.name);
        let mut partial = tree.clone().into_os_string();
        partial.push(".partial");
        let dirs = [
            tree,
            PathBuf::from(partial),
            self.config().log_dir.join(&ws.id),
        ];
        // std's remove_dir_all never follows a link (it works with openat/unlinkat from the
        // directory's descriptor), so a tree full of links to the host removes only the tree.
        tokio::task::spawn_blocking(move || {
            for dir in dirs {
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
        Ok(())
    }
}

impl NspawnContainers {
    /// The part of a debug report that systemd and machined give.
    async fn debug_units(&self, ws: &Workspace, mut info: DebugInfo) -> Result<DebugInfo> {
        use DebugValue::{Bool, List, Str, U64};
        let leader = self.systemd.machine_leader(&ws.name).await?;
        info.insert(
            "machine_state".into(),
            Str(if leader.is_some() {
                "running"
            } else {
                "stopped"
            }
            .into()),
        );
        info.insert("leader".into(), U64(leader.map_or(0, u64::from)));
        let unit = unit_name(&ws.name);
        let state = self.systemd.unit_state(&unit).await?;
        info.insert("unit".into(), Str(unit));
        info.insert(
            "unit_state".into(),
            Str(state
                .as_ref()
                .map_or("not loaded".into(), |s| s.active_state.clone())),
        );
        let build_unit = build_unit_name(&ws.name);
        let build_state = self.systemd.unit_state(&build_unit).await?;
        info.insert("build_unit".into(), Str(build_unit));
        let (_, result_path) = self.plan_paths(ws);
        let build_result = match (build_state, read_result(&result_path)) {
            (Some(s), _) => format!("{} ({})", s.active_state, s.result),
            (None, Some(r)) if r.ok => "success".into(),
            (None, Some(r)) => format!("failed in step {}: {}", r.step, r.message),
            (None, None) => "not running".into(),
        };
        info.insert("build_result".into(), Str(build_result));
        // Limits are unit properties; whether the kernel enforces them depends on the cgroup
        // controllers delegated here. Say so rather than pretend.
        let controllers: Vec<String> = cgroup2_mount()
            .and_then(|m| fs::read_to_string(m.join("cgroup.controllers")).ok())
            .map(|c| c.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let l = ws.limits;
        let mut missing = Vec::new();
        for (set, controller, key) in [
            (l.memory_max.is_some(), "memory", "memory_max"),
            (l.cpu_quota_percent.is_some(), "cpu", "cpu_quota_percent"),
            (l.tasks_max.is_some(), "pids", "tasks_max"),
        ] {
            if set && !controllers.iter().any(|c| c == controller) {
                missing.push(format!("{key} is set but the {controller} controller is not available, so it is not enforced"));
            }
        }
        info.insert("memory_max".into(), U64(l.memory_max.unwrap_or(0)));
        info.insert(
            "cpu_quota_percent".into(),
            U64(l.cpu_quota_percent.map_or(0, u64::from)),
        );
        info.insert("tasks_max".into(), U64(l.tasks_max.unwrap_or(0)));
        info.insert("cgroup_controllers".into(), List(controllers));
        info.insert("limits_enforced".into(), Bool(missing.is_empty()));
        info.insert("limits_note".into(), Str(missing.join("; ")));
        let (_, lines) = self.init_log(ws, 1).await?;
        info.insert(
            "init_log".into(),
            Str(self.log_path(ws).display().to_string()),
        );
        info.insert("init_log_lines".into(), U64(u64::from(lines)));
        Ok(info)
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
            limits: Limits {
                memory_max: Some(1 << 30),
                cpu_quota_percent: Some(150),
                tasks_max: None,
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
        let p = nspawn_argv(&ws(Network::Private), Path::new("/t"), agent).join(" ");
        assert!(p.contains(" --private-network "), "{p}");
    }

    #[test]
    fn limits_become_unit_properties() {
        let props = container_properties(&ws(Network::Host), Path::new("/t"), Path::new("/a"));
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
