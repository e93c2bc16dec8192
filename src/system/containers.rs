//! Container workspaces on systemd-nspawn: built by a transient build unit, run as a transient
//! unit `agent-workspace-<name>.service` (nspawn, not booted, a stub init as PID 1 that reaps
//! zombies) registered with machined under the workspace name. Commands enter the running
//! container with nsenter from a cgroup of their own inside the container's delegated subtree,
//! so `cgroup.kill` ends all they started in there.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zbus::OwnedVariant;

use super::build::{BuildPlan, BuildResult};
use super::config::ContainerConfig;
use super::exec::{Command, Containment, cgroup2_mount, run_contained};
use super::systemd::{Systemd, prop};
use crate::core::error::{Error, Result};
use crate::core::manager::{CONTAINER_WORKDIR, command_env};
use crate::core::ports::{Containers, DebugInfo, DebugValue, ExecIo, ExecOutcome, ExecRequest};
use crate::core::workspace::{Network, Workspace};

/// The init log is cut back to its last half when it grows past this.
const LOG_MAX: u64 = 4 * 1024 * 1024;

pub struct NspawnContainers {
    systemd: Systemd,
    config: ContainerConfig,
    /// `<state>/builds`: build plans and results.
    builds_dir: PathBuf,
    /// This program, which the build unit runs as `build-tree`.
    program: PathBuf,
    output_cap: usize,
}

pub fn unit_name(name: &str) -> String {
    format!("agent-workspace-{name}.service")
}

pub fn build_unit_name(name: &str) -> String {
    format!("agent-workspace-build-{name}.service")
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("Cannot {what} {}: {e}", path.display()))
}

/// Journal fields of a unit's output (`LogExtraFields=`, type `aay`), so that
/// `journalctl WORKSPACE_ID=...` includes builds and containers.
fn log_fields(ws: &Workspace) -> Vec<Vec<u8>> {
    vec![
        format!("WORKSPACE_ID={}", ws.id).into_bytes(),
        format!("WORKSPACE_NAME={}", ws.name).into_bytes(),
    ]
}

/// The systemd-nspawn command line of a container workspace.
pub fn nspawn_argv(ws: &Workspace, tree: &Path) -> Vec<String> {
    let mut argv = vec![
        "/usr/bin/systemd-nspawn".to_owned(),
        "--quiet".to_owned(),
        "--keep-unit".to_owned(),
        "--register=yes".to_owned(),
        format!("--directory={}", tree.display()),
        format!("--machine={}", ws.name),
        "--as-pid2".to_owned(),
        "--console=pipe".to_owned(),
    ];
    if ws.network == Network::Private {
        argv.push("--private-network".to_owned());
    }
    argv.extend(["/bin/sleep".to_owned(), "infinity".to_owned()]);
    argv
}

/// Unit properties of the running container: the command line and the workspace's limits.
pub fn container_properties(ws: &Workspace, tree: &Path) -> Vec<(String, OwnedVariant)> {
    let argv = nspawn_argv(ws, tree);
    let mut props = vec![
        prop("Description", format!("Agent workspace {}", ws.name)),
        prop("Type", "notify"),
        prop("NotifyAccess", "main"),
        prop("KillMode", "mixed"),
        prop("Delegate", true),
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

/// The unit properties of `limits`; u64::MAX ("infinity") where there is none.
fn limit_props(l: &crate::core::workspace::Limits) -> [(&'static str, u64); 3] {
    [
        ("MemoryMax", l.memory_max.unwrap_or(u64::MAX)),
        (
            "CPUQuotaPerSecUSec",
            l.cpu_quota_percent
                .map_or(u64::MAX, |p| u64::from(p) * 10_000),
        ),
        ("TasksMax", l.tasks_max.unwrap_or(u64::MAX)),
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
            config,
            builds_dir: state_dir.join("builds"),
            program,
            output_cap,
        }
    }

    fn log_path(&self, ws: &Workspace) -> PathBuf {
        self.config.log_dir.join(&ws.id).join("init.log")
    }

    fn plan_paths(&self, ws: &Workspace) -> (PathBuf, PathBuf) {
        (
            self.builds_dir.join(format!("{}.json", ws.id)),
            self.builds_dir.join(format!("{}.result.json", ws.id)),
        )
    }

    fn shell_in(&self, ws: &Workspace) -> &'static str {
        if self.tree_path(&ws.name).join("bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        }
    }

    /// The leader's cgroup directory: commands get their cgroups below it.
    fn payload_cgroup(leader: u32) -> Result<PathBuf> {
        let text = fs::read_to_string(format!("/proc/{leader}/cgroup"))
            .map_err(|e| Error::JobFailed(format!("Cannot read the container's cgroup: {e}")))?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| Error::JobFailed("The container has no cgroup v2 membership".into()))?;
        let mount = cgroup2_mount()
            .ok_or_else(|| Error::JobFailed("No cgroup v2 hierarchy is mounted".into()))?;
        Ok(mount.join(rel.trim().trim_start_matches('/')))
    }

    /// The running container's leader, starting the container first if it is not running.
    /// One machined lookup on the exec path when it runs (start() would look it up again).
    async fn leader(&self, ws: &Workspace) -> Result<u32> {
        if let Some(leader) = self.systemd.machine_leader(&ws.name).await? {
            return Ok(leader);
        }
        self.start(ws).await?;
        self.systemd.machine_leader(&ws.name).await?.ok_or_else(|| {
            Error::JobFailed(format!(
                "The container of workspace '{}' is not running",
                ws.name
            ))
        })
    }

    async fn append_log(&self, ws: &Workspace, text: &[u8]) {
        let path = self.log_path(ws);
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
            let _ = f.write_all(text);
        }
    }
}

#[async_trait]
impl Containers for NspawnContainers {
    fn tree_path(&self, name: &str) -> PathBuf {
        self.config.machines_dir.join(name)
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

    async fn build_tree(&self, ws: &Workspace) -> Result<()> {
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
            settings: self.config.distro(distro),
            tree: self.tree_path(&ws.name),
            cache_dir: self.config.cache_dir.clone(),
            log: self.log_path(ws),
            result: result_path.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&plan)
            .map_err(|e| Error::Io(format!("Cannot encode the build plan: {e}")))?;
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
            prop("CollectMode", "inactive-or-failed"),
            prop(
                "RuntimeMaxUSec",
                u64::from(self.config.build_timeout_secs) * 1_000_000,
            ),
            prop("LogExtraFields", log_fields(ws)),
            prop("ExecStart", vec![(program, argv, false)]),
        ];
        info!(workspace_id = %ws.id, workspace_name = %ws.name, unit = %unit,
              "Starting {unit} to build the tree of {}", ws.name);
        let started = self.systemd.start_transient(&unit, props).await;
        let result = read_result(&result_path);
        let _ = fs::remove_file(&plan_path);
        match (started, result) {
            (Ok(()), Some(r)) if r.ok => Ok(()),
            (_, Some(r)) => Err(build_failed(ws, &r)),
            (Err(e), _) => Err(Error::JobFailed(format!(
                "Build of '{}' failed: {e} (builds are stopped after build_timeout_secs = {})",
                ws.name, self.config.build_timeout_secs
            ))),
            (Ok(()), _) => Err(Error::JobFailed(format!(
                "Build of '{}' failed: {unit} left no result",
                ws.name
            ))),
        }
    }

    async fn wait_build(&self, ws: &Workspace) -> Result<()> {
        let unit = build_unit_name(&ws.name);
        // The build unit outlives the service; poll it until it ends (it has a RuntimeMaxSec).
        while let Some(state) = self.systemd.unit_state(&unit).await? {
            if !matches!(
                state.active_state.as_str(),
                "activating" | "active" | "deactivating"
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (plan, result_path) = self.plan_paths(ws);
        let result = read_result(&result_path);
        let _ = fs::remove_file(plan);
        match result {
            Some(r) if r.ok => Ok(()),
            Some(r) => Err(build_failed(ws, &r)),
            None if self.tree_path(&ws.name).join("workspace").is_dir() => Ok(()),
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
        if !tree.join("workspace").is_dir() {
            return Err(Error::NotReady {
                workspace: ws.name.clone(),
                status: "not built".into(),
            });
        }
        let unit = unit_name(&ws.name);
        // A unit that failed before stays loaded until reset.
        self.systemd.stop(&unit).await?;
        self.systemd
            .start_transient(&unit, container_properties(ws, &tree))
            .await?;
        for _ in 0..200 {
            if self.systemd.machine_leader(&ws.name).await?.is_some() {
                info!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Started container {} ({unit})", ws.name);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(Error::JobFailed(format!(
            "{unit} started but machine '{}' did not register with machined",
            ws.name
        )))
    }

    async fn stop(&self, ws: &Workspace) -> Result<()> {
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
        let inside = req.cwd.clone();
        let rel = inside.strip_prefix("/").unwrap_or(&inside);
        // nsenter opens --wd before it enters the container: give it the directory as seen
        // from here, which is the same directory inside.
        let wd = self.tree_path(&ws.name).join(rel);
        if !wd.is_dir() {
            return Err(Error::InvalidArgs(format!(
                "Invalid 'cwd': {} is not a directory in the container",
                inside.display()
            )));
        }
        let leader = self.leader(ws).await?;
        let payload = Self::payload_cgroup(leader)?;
        let argv = vec![
            "/usr/bin/nsenter".to_owned(),
            format!("--target={leader}"),
            "--all".to_owned(),
            "--root".to_owned(),
            format!("--wd={}", wd.display()),
            "--".to_owned(),
            self.shell_in(ws).to_owned(),
            "-c".to_owned(),
            req.command,
        ];
        let command = Command {
            argv: &argv,
            env: &req.env,
            cwd: None,
            io: req.io,
            timeout: req.timeout,
            output_cap: req.output_cap,
        };
        run_contained(command, Containment::CgroupBelow(&payload), &cancel).await
    }

    async fn run_init(
        &self,
        ws: &Workspace,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<ExecOutcome> {
        let dir = self.tree_path(&ws.name).join(".agent-workspaces");
        fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
        let script = dir.join("init");
        fs::write(&script, &ws.init_script).map_err(|e| io("write", &script, e))?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", &script, e))?;
        let command = if ws.init_script.starts_with("#!") {
            "exec /.agent-workspaces/init".to_owned()
        } else {
            format!("exec {} /.agent-workspaces/init", self.shell_in(ws))
        };
        self.append_log(ws, b"== init script started\n").await;
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
        self.append_log(ws, &outcome.stdout).await;
        self.append_log(ws, &outcome.stderr).await;
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
        self.append_log(ws, end.as_bytes()).await;
        Ok(outcome)
    }

    async fn init_log(&self, ws: &Workspace, max_lines: u32) -> Result<(String, u32)> {
        let path = self.log_path(ws);
        let text = match fs::read(&path) {
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

    async fn log(&self, ws: &Workspace, line: &str) {
        self.append_log(ws, format!("{line}\n").as_bytes()).await;
    }

    async fn clean_orphans(&self, known: &[String]) {
        let is_known = |name: &str| known.iter().any(|k| k == name);
        if let Ok(entries) = fs::read_dir(&self.config.machines_dir) {
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if let Some(name) = file.strip_suffix(".partial") {
                    // Only a build of ours makes <name>.partial with a configured tree inside.
                    if !is_known(name) && path.join("workspace").is_dir() {
                        warn!(
                            "Removing {}, a half-built tree without a workspace record",
                            path.display()
                        );
                        let _ = fs::remove_dir_all(&path);
                    }
                } else if !is_known(&file) && path.join(".agent-workspaces").is_dir() {
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
                    // agent-workspace-build-x is the build unit of x, or the unit of "build-x".
                    let names = [
                        base.strip_prefix("agent-workspace-"),
                        base.strip_prefix("agent-workspace-build-"),
                    ];
                    let known_unit = names.iter().flatten().any(|n| is_known(n));
                    let name = if known_unit {
                        ""
                    } else {
                        names[0].unwrap_or("")
                    };
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
        let tree = self.tree_path(&ws.name);
        let mut info = DebugInfo::new();
        info.insert("tree".into(), Str(tree.display().to_string()));
        info.insert("tree_exists".into(), Bool(tree.is_dir()));
        let t = tree.clone();
        let size = tokio::task::spawn_blocking(move || tree_size(&t))
            .await
            .unwrap_or(0);
        info.insert("tree_size_bytes".into(), U64(size));
        let present: Vec<String> = ["bin", "etc", "usr", "var", "tmp", "root", "workspace"]
            .into_iter()
            .filter(|d| tree.join(d).is_dir())
            .map(String::from)
            .collect();
        info.insert("directories".into(), List(present));
        let shell = ["bin/bash", "bin/sh"]
            .into_iter()
            .find(|s| tree.join(s).exists())
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        info.insert("shell".into(), Str(shell));
        let script = tree.join(".agent-workspaces/init");
        info.insert(
            "init_script_present".into(),
            Bool(!ws.init_script.is_empty()),
        );
        let changed = fs::metadata(&script)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64);
        info.insert("init_script_changed_usec".into(), U64(changed));
        let os = fs::read_to_string(tree.join("etc/os-release"))
            .or_else(|_| fs::read_to_string(tree.join("usr/lib/os-release")))
            .unwrap_or_default();
        let pretty = os
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .unwrap_or("")
            .trim_matches('"')
            .to_owned();
        info.insert("os_release".into(), Str(pretty));
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

    async fn remove(&self, ws: &Workspace) -> Result<()> {
        let tree = self.tree_path(&ws.name);
        let mut partial = tree.clone().into_os_string();
        partial.push(".partial");
        for dir in [
            tree,
            PathBuf::from(partial),
            self.config.log_dir.join(&ws.id),
        ] {
            match fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &dir, e)),
            }
        }
        let (plan, result) = self.plan_paths(ws);
        let _ = fs::remove_file(plan);
        let _ = fs::remove_file(result);
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

/// Bytes of regular files below `dir`, not following symlinks. (No same-device check: on an
/// overlay file system files and directories report different devices. The container's own
/// mounts live in its mount namespace and are not seen from here.)
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
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
        }
    }

    #[test]
    fn nspawn_command_line() {
        let a = nspawn_argv(&ws(Network::Host), Path::new("/var/lib/machines/box")).join(" ");
        assert_eq!(
            a,
            "/usr/bin/systemd-nspawn --quiet --keep-unit --register=yes \
             --directory=/var/lib/machines/box --machine=box --as-pid2 --console=pipe /bin/sleep infinity"
        );
        let p = nspawn_argv(&ws(Network::Private), Path::new("/t")).join(" ");
        assert!(p.contains(" --private-network "), "{p}");
    }

    #[test]
    fn limits_become_unit_properties() {
        let props = container_properties(&ws(Network::Host), Path::new("/t"));
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
        assert!(get("TasksMax").is_none());
        assert!(bool::try_from(get("Delegate").unwrap()).unwrap());
        assert_eq!(unit_name("box"), "agent-workspace-box.service");
        assert_eq!(build_unit_name("box"), "agent-workspace-build-box.service");
    }
}
