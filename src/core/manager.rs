//! The workspace manager: every operation on workspaces, over the ports. One implementation per
//! operation, whatever the transport. Invariants:
//! - a workspace is in the registry iff its record is on disk (except while being created);
//! - names are unique; the default host workspace always exists and is never destroyed;
//! - mutations of one workspace (update, destroy) are serialized by its operation lock;
//! - destroy cancels the workspace's running execs and waits for them before removing anything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::error::{Error, Result};
use super::messages;
use super::names::{DEFAULT_HOST, new_id};
use super::ports::{
    Containers, Event, Events, ExecOutcome, ExecRequest, Executor, HostDirs, InstallTarget,
    Library, Store,
};
use super::spec::{Changes, CreateSpec, ExecLimits, ExecParams, ServiceLimits};
use super::template::{Template, merge};
use super::workspace::{Field, Status, Workspace, WorkspaceType};

/// The environment every command starts from, before the workspace's and the call's variables.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of a command: a minimal base, then the workspace's variables, then the
/// call's (later wins).
pub fn command_env(ws: &Workspace, call: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), BASE_PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    env.extend(ws.env_vars.clone());
    env.extend(call);
    env
}

/// Runs port work that touches the disk without bound (whole trees, Library copies) on
/// tokio's blocking threads, so the service keeps answering meanwhile.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::io_msg(format!("Background file work did not finish: {e}")))?
}

/// A name reserved by a create under way; released when dropped.
struct Reservation<'a> {
    manager: &'a Manager,
    name: Option<String>,
}

impl Reservation<'_> {
    /// The workspace is in the registry now (under the lock the caller holds).
    fn commit(mut self, reg: &mut Registry) {
        if let Some(name) = self.name.take() {
            reg.reserved.remove(&name);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            self.manager.reg().reserved.remove(&name);
        }
    }
}

pub struct Ports {
    pub store: Arc<dyn Store>,
    pub dirs: Arc<dyn HostDirs>,
    pub executor: Arc<dyn Executor>,
    pub containers: Arc<dyn Containers>,
    pub library: Arc<dyn Library>,
    pub events: Arc<dyn Events>,
}

/// Where a container's workspace directory is, inside the container.
pub const CONTAINER_WORKDIR: &str = "/workspace";

struct Entry {
    ws: Workspace,
    /// Serializes update and destroy of this workspace.
    ops: Arc<tokio::sync::Mutex<()>>,
    /// Running execs, so destroy can wait for them.
    execs: TaskTracker,
    /// Cancels this workspace's running execs.
    cancel: CancellationToken,
}

impl Entry {
    fn new(ws: Workspace, shutdown: &CancellationToken) -> Self {
        Self {
            ws,
            ops: Arc::default(),
            execs: TaskTracker::new(),
            cancel: shutdown.child_token(),
        }
    }
}

#[derive(Default)]
struct Registry {
    by_id: HashMap<String, Entry>,
    /// Names of workspaces being created, so two creates cannot take one name.
    reserved: HashSet<String>,
}

impl Registry {
    fn resolve(&self, key: &str) -> Result<&Entry> {
        self.by_id
            .get(key)
            .or_else(|| self.by_id.values().find(|e| e.ws.name == key))
            .ok_or_else(|| Error::NoSuchWorkspace(key.to_owned()))
    }

    fn name_taken(&self, name: &str) -> bool {
        self.reserved.contains(name) || self.by_id.values().any(|e| e.ws.name == name)
    }
}

pub struct Manager {
    ports: Ports,
    default_host_dir: PathBuf,
    limits: RwLock<ServiceLimits>,
    registry: Mutex<Registry>,
    execs_running: AtomicUsize,
    /// Woken when a command ends: commands waiting for a place look again.
    exec_slot_freed: tokio::sync::Notify,
    shutdown: CancellationToken,
    /// Container records found `destroying` at load; `reconcile` finishes them.
    unfinished_destroys: Mutex<Vec<Workspace>>,
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Decrements the global exec count however the exec ends.
/// A running command's place among the `max_concurrent`.
struct ExecSlot<'a>(&'a Manager);
impl Drop for ExecSlot<'_> {
    fn drop(&mut self) {
        self.0.execs_running.fetch_sub(1, Ordering::SeqCst);
        self.0.exec_slot_freed.notify_waiters();
    }
}

impl Manager {
    pub fn new(ports: Ports, default_host_dir: PathBuf, limits: ServiceLimits) -> Self {
        Self {
            ports,
            default_host_dir,
            limits: RwLock::new(limits),
            registry: Mutex::default(),
            execs_running: AtomicUsize::new(0),
            exec_slot_freed: tokio::sync::Notify::new(),
            shutdown: CancellationToken::new(),
            unfinished_destroys: Mutex::default(),
        }
    }

    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        // No code panics while holding the lock; a poisoned lock still holds consistent data.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn limits(&self) -> ServiceLimits {
        *self.limits.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_limits(&self, limits: ServiceLimits) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = limits;
    }

    /// Loads the stored records, finishes destroys a crash interrupted, and makes sure the
    /// default host workspace exists. Call once, before serving.
    pub fn load(&self) -> Result<()> {
        let mut loaded = Vec::new();
        for ws in self.ports.store.load_all() {
            if ws.status == Status::Destroying {
                info!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Finishing the destroy of workspace {} interrupted by a restart", ws.name);
                if ws.is_container() {
                    self.unfinished_destroys
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(ws);
                } else {
                    self.remove_files_blocking(&ws)?;
                }
                continue;
            }
            loaded.push(ws);
        }
        let mut reg = self.reg();
        for ws in loaded {
            if reg.name_taken(&ws.name) {
                warn!(message_id = messages::RECORD_CORRUPT, workspace_id = %ws.id,
                      workspace_name = %ws.name,
                      "Skipping record {}: its name '{}' is already used by another record", ws.id, ws.name);
                continue;
            }
            let entry = Entry::new(ws, &self.shutdown);
            reg.by_id.insert(entry.ws.id.clone(), entry);
        }
        let host = match reg.by_id.get(DEFAULT_HOST) {
            Some(e) if e.ws.path == self.default_host_dir => None,
            Some(e) => Some(Workspace {
                path: self.default_host_dir.clone(),
                ..e.ws.clone()
            }),
            None => Some(Workspace {
                id: DEFAULT_HOST.into(),
                name: DEFAULT_HOST.into(),
                workspace_type: WorkspaceType::Host,
                status: Status::Ready,
                error_message: String::new(),
                path: self.default_host_dir.clone(),
                owns_path: false,
                distro: None,
                env_vars: BTreeMap::new(),
                init_script: String::new(),
                skills: Vec::new(),
                tools: Vec::new(),
                template: String::new(),
                created_at_usec: now_usec(),
                network: Default::default(),
                limits: Default::default(),
                build_step: String::new(),
            }),
        };
        if let Some(host) = host {
            self.ports.store.save(&host)?;
            let entry = Entry::new(host, &self.shutdown);
            reg.by_id.insert(DEFAULT_HOST.into(), entry);
        }
        drop(reg);
        self.ports.dirs.ensure(&self.default_host_dir)?;
        if let Ok(host) = self.get(DEFAULT_HOST) {
            // Before serving, so nothing waits on the runtime meanwhile.
            let skills = self.ports.library.skills();
            let installed = skills.and_then(|skills| {
                self.ports
                    .library
                    .install(&self.install_target(&host), &skills, &[])
            });
            if let Err(e) = installed {
                warn!(
                    workspace_id = DEFAULT_HOST,
                    "Cannot give the host workspace the Library's skills: {e}"
                );
            }
        }
        Ok(())
    }

    /// Every workspace, the default host workspace first, then by creation time.
    pub fn list(&self) -> Vec<Workspace> {
        let mut all: Vec<_> = self.reg().by_id.values().map(|e| e.ws.clone()).collect();
        all.sort_by_key(|w| (!w.is_default_host(), w.created_at_usec, w.id.clone()));
        all
    }

    /// Looks a workspace up by id or name.
    pub fn get(&self, key: &str) -> Result<Workspace> {
        self.reg().resolve(key).map(|e| e.ws.clone())
    }

    /// The request merged over its template, if it names one: what `create` validates.
    pub fn with_template(&self, spec: CreateSpec) -> Result<CreateSpec> {
        match spec.template.as_deref() {
            None | Some("") => Ok(spec),
            Some(name) => {
                super::names::validate_library_name("template", name)
                    .map_err(|e| Error::invalid("template", e))?;
                let t = self.ports.library.template(name)?;
                Ok(merge(&t, spec))
            }
        }
    }

    pub async fn create(self: &Arc<Self>, spec: CreateSpec) -> Result<Workspace> {
        let v = self.with_template(spec)?.validate()?;
        for (key, names) in [("skills", &v.skills), ("tools", &v.tools)] {
            for n in names {
                super::names::validate_library_name(&key[..key.len() - 1], n)
                    .map_err(|e| Error::invalid(key, e))?;
            }
        }
        if !v.skills.is_empty() || !v.tools.is_empty() {
            self.check_library(&v.skills, &v.tools).await?;
        }
        let reservation = self.reserve(&v.name)?;
        let build_now = v.build_on_create;
        if build_now && self.builds_running() >= self.limits().builds.max_concurrent {
            return Err(Error::LimitsExceeded(format!(
                "Too many ongoing operations: cannot build workspace '{}' now (max_concurrent_builds); nothing was created",
                v.name
            )));
        }
        let ws = self.create_reserved(v).await?;
        {
            let mut reg = self.reg();
            reg.by_id
                .insert(ws.id.clone(), Entry::new(ws.clone(), &self.shutdown));
            reservation.commit(&mut reg);
        }
        info!(message_id = messages::WORKSPACE_CREATED, workspace_id = %ws.id,
              workspace_name = %ws.name, workspace_type = ws.workspace_type.as_str(),
              workspace_path = %ws.path.display(),
              "Created {} workspace {} ({})", ws.workspace_type.as_str(), ws.name, ws.id);
        self.ports.events.emit(Event::Added { id: ws.id.clone() });
        if !ws.is_container() && (!ws.skills.is_empty() || !ws.tools.is_empty()) {
            if let Err(e) = self.install_library(&ws).await {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Cannot install the skills and tools of {}: {e}", ws.name);
            }
        }
        if build_now {
            // The workspace exists now: a build that cannot start leaves it pending, it does
            // not fail the create.
            if let Err(e) = self.build(&ws.id, false).await {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Created {} but could not start its build: {e}", ws.name);
            }
            return self.get(&ws.id);
        }
        Ok(ws)
    }

    /// Reserves a name for a create under way: until the guard is committed (the record is in
    /// the registry) or dropped (the create failed, on any path), no other create takes it.
    fn reserve(&self, name: &str) -> Result<Reservation<'_>> {
        let mut reg = self.reg();
        if reg.name_taken(name) {
            return Err(Error::WorkspaceExists(format!(
                "Workspace '{name}' already exists"
            )));
        }
        reg.reserved.insert(name.to_owned());
        Ok(Reservation {
            manager: self,
            name: Some(name.to_owned()),
        })
    }

    async fn create_reserved(&self, v: super::spec::ValidCreate) -> Result<Workspace> {
        let id = new_id();
        let container = v.workspace_type == WorkspaceType::Container;
        let (path, owns_path) = match v.path {
            Some(p) => (p, false),
            None if container => (self.ports.containers.tree_path(&v.name), true),
            None => (self.ports.dirs.default_dir(&id), true),
        };
        if container {
            self.ports.containers.check_name_free(&v.name).await?;
        } else {
            self.ports.dirs.ensure(&path)?;
        }
        let ws = Workspace {
            id,
            name: v.name,
            workspace_type: v.workspace_type,
            status: if container {
                Status::Pending
            } else {
                Status::Ready
            },
            error_message: String::new(),
            path,
            owns_path,
            distro: v.distro,
            env_vars: v.env_vars,
            init_script: v.init_script,
            skills: v.skills,
            tools: v.tools,
            template: v.template,
            created_at_usec: now_usec(),
            network: v.network,
            limits: v.limits,
            build_step: String::new(),
        };
        if let Err(e) = self.ports.store.save(&ws) {
            if ws.owns_path && !container {
                let _ = self.ports.dirs.remove_tree(&ws.path);
            }
            return Err(e);
        }
        Ok(ws)
    }

    /// The operation lock and id of a workspace, looked up by id or name.
    fn ops_lock(&self, key: &str) -> Result<(String, Arc<tokio::sync::Mutex<()>>)> {
        let reg = self.reg();
        let e = reg.resolve(key)?;
        Ok((e.ws.id.clone(), e.ops.clone()))
    }

    pub async fn update(&self, key: &str, changes: Changes) -> Result<Workspace> {
        changes.validate()?;
        let (id, ops) = self.ops_lock(key)?;
        let _op = ops.lock().await;
        let mut ws = self
            .reg()
            .by_id
            .get(&id)
            .map(|e| e.ws.clone())
            .ok_or_else(|| Error::NoSuchWorkspace(key.to_owned()))?;
        if ws.status == Status::Destroying {
            return Err(Error::NotReady {
                workspace: ws.name,
                status: Status::Destroying.to_string(),
            });
        }
        let before = ws.clone();
        let mut fields = Vec::new();
        let mut keys = Vec::new();
        if let (Some(key), false) = (changes.container_keys().first(), ws.is_container()) {
            return Err(Error::invalid(*key, "only container workspaces take it"));
        }
        if let Some(network) = changes.network()? {
            if network != ws.network {
                fields.push(Field::Network);
            }
            ws.network = network;
            keys.push("network");
        }
        let new_limits = changes.apply_limits(ws.limits);
        let limits_changed = new_limits != ws.limits;
        if limits_changed {
            fields.push(Field::Limits);
            ws.limits = new_limits;
            keys.push("limits");
        }
        if let Some(env) = changes.env_vars {
            if env.keys().ne(ws.env_vars.keys()) {
                fields.push(Field::EnvVarNames);
            }
            ws.env_vars = env;
            keys.push("env_vars");
        }
        if let Some(script) = changes.init_script {
            ws.init_script = script;
            keys.push("init_script");
        }
        let library_changed = changes.skills.is_some() || changes.tools.is_some();
        if let Some(skills) = changes.skills {
            if skills != ws.skills {
                fields.push(Field::Skills);
            }
            ws.skills = skills;
            keys.push("skills");
        }
        if let Some(tools) = changes.tools {
            if tools != ws.tools {
                fields.push(Field::Tools);
            }
            ws.tools = tools;
            keys.push("tools");
        }
        // The record and the disk never disagree: the install (all or nothing) comes first, and
        // a record that cannot be saved puts the previous skills and tools back.
        let install = library_changed && self.library_dir_exists(&ws);
        if library_changed {
            self.check_library(&ws.skills, &ws.tools).await?;
        }
        if install {
            self.install_library(&ws).await?;
        }
        if let Err(e) = self.ports.store.save(&ws) {
            if install {
                if let Err(undo) = self.install_library(&before).await {
                    warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                          "Cannot put back the skills and tools of {}: {undo}", ws.name);
                }
            }
            return Err(e);
        }
        if let Some(e) = self.reg().by_id.get_mut(&id) {
            e.ws = ws.clone();
        }
        info!(message_id = messages::WORKSPACE_UPDATED, workspace_id = %ws.id,
              workspace_name = %ws.name, changed = keys.join(","),
              "Updated workspace {}: {}", ws.name, keys.join(", "));
        if !fields.is_empty() {
            self.ports.events.emit(Event::Changed { id, fields });
        }
        if limits_changed {
            // A running container gets them at once; a stopped one at its next start.
            self.ports.containers.apply_limits(&ws).await.map_err(|e| {
                Error::JobFailed(format!(
                    "Saved the new limits of workspace '{}', but could not apply them to the running container ({e}); they apply at its next start",
                    ws.name
                ))
            })?;
        }
        Ok(ws)
    }

    pub async fn destroy(&self, key: &str) -> Result<()> {
        let (id, ops) = self.ops_lock(key)?;
        if id == DEFAULT_HOST {
            return Err(Error::Protected(DEFAULT_HOST.into()));
        }
        let _op = ops.lock().await;
        let (ws, execs, cancel) = {
            let mut reg = self.reg();
            let e = reg
                .by_id
                .get_mut(&id)
                .ok_or_else(|| Error::NoSuchWorkspace(key.to_owned()))?;
            e.ws.status = Status::Destroying;
            (e.ws.clone(), e.execs.clone(), e.cancel.clone())
        };
        // Persisted first, so a crash from here on finishes the destroy at the next start.
        self.ports.store.save(&ws)?;
        self.ports.events.emit(Event::Changed {
            id: id.clone(),
            fields: vec![Field::Status],
        });
        cancel.cancel();
        if ws.is_container() {
            // Ends a running build and the container, and with it every command inside.
            if let Err(e) = self.ports.containers.stop(&ws).await {
                self.set_error(&id, &e.to_string());
                return Err(e);
            }
        }
        execs.close();
        execs.wait().await;
        if let Err(e) = self.remove_files(&ws).await {
            self.set_error(&id, &e.to_string());
            return Err(e);
        }
        self.reg().by_id.remove(&id);
        info!(message_id = messages::WORKSPACE_DESTROYED, workspace_id = %ws.id,
              workspace_name = %ws.name, "Destroyed workspace {} ({})", ws.name, ws.id);
        self.ports.events.emit(Event::Removed { id });
        Ok(())
    }

    async fn remove_files(&self, ws: &Workspace) -> Result<()> {
        if ws.is_container() {
            self.ports.containers.remove(ws).await?;
            return self.ports.store.remove(&ws.id);
        }
        // A workspace directory can be a tree of any size: removed on a blocking thread.
        let (dirs, store, ws) = (
            self.ports.dirs.clone(),
            self.ports.store.clone(),
            ws.clone(),
        );
        blocking(move || {
            if ws.owns_path {
                dirs.remove_tree(&ws.path)?;
            }
            store.remove(&ws.id)
        })
        .await
    }

    /// At load: host directories only; an interrupted container destroy is finished by
    /// `reconcile`, which can talk to systemd.
    fn remove_files_blocking(&self, ws: &Workspace) -> Result<()> {
        if ws.is_container() {
            return Ok(());
        }
        if ws.owns_path {
            self.ports.dirs.remove_tree(&ws.path)?;
        }
        self.ports.store.remove(&ws.id)
    }

    fn set_error(&self, id: &str, message: &str) {
        self.set_status(id, Status::Error, message, None);
    }

    /// Sets status and error message, persists and announces them; with `only_from`, only a
    /// workspace in that status changes.
    fn set_status(&self, id: &str, status: Status, message: &str, only_from: Option<Status>) {
        let ws = {
            let mut reg = self.reg();
            let Some(e) = reg.by_id.get_mut(id) else {
                return;
            };
            if only_from.is_some_and(|s| s != e.ws.status) {
                return;
            }
            e.ws.status = status;
            e.ws.error_message = message.to_owned();
            // A step belongs to a build; any other status ends it.
            if status != Status::Building {
                e.ws.build_step.clear();
            }
            e.ws.clone()
        };
        if let Err(e) = self.ports.store.save(&ws) {
            warn!(workspace_id = %ws.id, "Could not save the state of {}: {e}", ws.name);
        }
        self.ports.events.emit(Event::Changed {
            id: id.to_owned(),
            fields: vec![Field::Status, Field::ErrorMessage, Field::BuildStep],
        });
    }

    /// Runs a command in a workspace. `caller_gone` fires when the caller disconnects; the
    /// command is then killed.
    pub async fn exec(
        &self,
        key: &str,
        params: ExecParams,
        caller_gone: CancellationToken,
    ) -> Result<ExecOutcome> {
        let limits = self.limits().exec;
        let timeout_secs = params.validate(&limits)?;
        let (ws, _running_exec, cancel) = {
            let reg = self.reg();
            let e = reg.resolve(key)?;
            if e.ws.status != Status::Ready {
                return Err(Error::NotReady {
                    workspace: e.ws.name.clone(),
                    status: e.ws.status.to_string(),
                });
            }
            (e.ws.clone(), e.execs.token(), e.cancel.child_token())
        };
        let _slot = self.exec_slot(&ws.name, &limits, &caller_gone).await?;
        let env = command_env(&ws, params.env);
        let workdir = if ws.is_container() {
            PathBuf::from(CONTAINER_WORKDIR)
        } else {
            ws.path.clone()
        };
        let cwd = match params.cwd {
            None => workdir,
            Some(c) => workdir.join(c),
        };
        let request = ExecRequest {
            workspace_id: ws.id.clone(),
            command: params.command,
            env,
            cwd,
            io: params.io,
            timeout: Duration::from_secs(timeout_secs.into()),
            output_cap: limits.max_output_bytes,
        };
        let run = async {
            if ws.is_container() {
                self.ports
                    .containers
                    .exec(&ws, request, cancel.clone())
                    .await
            } else {
                self.ports.executor.run(request, cancel.clone()).await
            }
        };
        tokio::pin!(run);
        let outcome = tokio::select! {
            r = &mut run => r,
            () = caller_gone.cancelled() => { cancel.cancel(); run.await }
        }?;
        if cancel.is_cancelled() && !outcome.timed_out {
            let why = if caller_gone.is_cancelled() {
                "the caller disconnected"
            } else if self.shutdown.is_cancelled() {
                "the service is stopping"
            } else {
                "the workspace is being destroyed"
            };
            warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                  "Command in workspace {} was killed: {why}", ws.name);
            return Err(Error::JobFailed(format!(
                "Command in workspace '{}' was killed: {why}",
                ws.name
            )));
        }
        info!(message_id = messages::EXEC_FINISHED, workspace_id = %ws.id,
              workspace_name = %ws.name, exit_code = outcome.exit_code,
              timed_out = outcome.timed_out, duration_usec = outcome.duration.as_micros() as u64,
              "Command in workspace {} finished: exit code {}{} after {:.3}s",
              ws.name, outcome.exit_code, if outcome.timed_out { " (timed out)" } else { "" },
              outcome.duration.as_secs_f64());
        Ok(outcome)
    }

    /// A place for one more command: at once while fewer than `max_concurrent` run; else it
    /// waits, up to `queue_timeout_secs`, for one to end (or the caller to leave), and then
    /// it is `LimitsExceeded`.
    async fn exec_slot(
        &self,
        workspace: &str,
        limits: &ExecLimits,
        caller_gone: &CancellationToken,
    ) -> Result<ExecSlot<'_>> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(limits.queue_timeout_secs.into());
        loop {
            // Registered before the count is looked at, so an end in between is not missed.
            let freed = self.exec_slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.execs_running.fetch_add(1, Ordering::SeqCst) < limits.max_concurrent {
                return Ok(ExecSlot(self));
            }
            self.execs_running.fetch_sub(1, Ordering::SeqCst);
            tokio::select! {
                () = &mut freed => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Error::LimitsExceeded(format!(
                        "Too many ongoing operations: cannot run a command in workspace '{workspace}': {} commands are running (max_concurrent), and none ended within {} s (queue_timeout_secs)",
                        limits.max_concurrent, limits.queue_timeout_secs
                    )));
                }
                () = caller_gone.cancelled() => {
                    return Err(Error::JobFailed(format!(
                        "Command in workspace '{workspace}' was not run: the caller disconnected while it waited for a place"
                    )));
                }
                () = self.shutdown.cancelled() => {
                    return Err(Error::JobFailed(format!(
                        "Command in workspace '{workspace}' was not run: the service is stopping"
                    )));
                }
            }
        }
    }

    /// Where a workspace's `.opencode/` goes.
    fn install_target(&self, ws: &Workspace) -> InstallTarget {
        if ws.is_container() {
            InstallTarget {
                root: self.ports.containers.tree_path(&ws.name),
                dir: CONTAINER_WORKDIR.trim_start_matches('/').into(),
                container: true,
            }
        } else {
            InstallTarget {
                root: ws.path.clone(),
                dir: PathBuf::new(),
                container: false,
            }
        }
    }

    /// A container's workspace directory exists once it is built.
    fn library_dir_exists(&self, ws: &Workspace) -> bool {
        !ws.is_container() || self.ports.containers.is_built(ws)
    }

    /// Copies the workspace's skills and tools (the default host workspace: every skill), on a
    /// blocking thread: a Library entry can be thousands of files.
    async fn install_library(&self, ws: &Workspace) -> Result<()> {
        let library = self.ports.library.clone();
        let target = self.install_target(ws);
        let (every_skill, skills, tools) =
            (ws.is_default_host(), ws.skills.clone(), ws.tools.clone());
        blocking(move || {
            let skills = if every_skill {
                library.skills()?
            } else {
                skills
            };
            library.install(&target, &skills, &tools)
        })
        .await
    }

    /// `Library::check` on a blocking thread (it reads every file of the entries).
    async fn check_library(&self, skills: &[String], tools: &[String]) -> Result<()> {
        let library = self.ports.library.clone();
        let (skills, tools) = (skills.to_vec(), tools.to_vec());
        blocking(move || library.check(&skills, &tools)).await
    }

    /// `SyncWorkspace`: copies the skills and tools again from the Library as it is now.
    pub async fn sync(&self, key: &str) -> Result<()> {
        let ws = self.get(key)?;
        if !self.library_dir_exists(&ws) {
            // A built container whose /workspace is gone (its own code removed or replaced it).
            if ws.status == Status::Ready {
                return Err(Error::io_msg(format!(
                    "Cannot install skills and tools into workspace '{}': /workspace is not a directory in its tree",
                    ws.name
                )));
            }
            return Err(Error::NotReady {
                workspace: ws.name,
                status: ws.status.to_string(),
            });
        }
        self.install_library(&ws).await?;
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Synced skills and tools of {} from the Library", ws.name);
        Ok(())
    }

    /// The Library's skills and tools, by name (those that can be installed).
    pub async fn library(&self) -> Result<(Vec<String>, Vec<String>)> {
        let library = self.ports.library.clone();
        blocking(move || Ok((library.skills()?, library.tools()?))).await
    }

    pub async fn templates(&self) -> Result<Vec<Template>> {
        let library = self.ports.library.clone();
        blocking(move || library.templates()).await
    }

    pub async fn template(&self, name: &str) -> Result<Template> {
        super::names::validate_library_name("template", name)
            .map_err(|e| Error::invalid("name", e))?;
        let library = self.ports.library.clone();
        let name = name.to_owned();
        blocking(move || library.template(&name)).await
    }

    /// The workspace, if it is a container; `NotSupported` for host workspaces.
    pub fn container(&self, key: &str, verb: &str) -> Result<Workspace> {
        let ws = self.get(key)?;
        if !ws.is_container() {
            return Err(Error::NotSupported(format!(
                "Cannot {verb} workspace '{}': it is a host workspace, and only container workspaces support {verb}",
                ws.name
            )));
        }
        Ok(ws)
    }

    /// Starts building a container workspace (`rebuild`: also when it is ready) and returns
    /// once the build has started. `Busy` while a build runs.
    pub async fn build(self: &Arc<Self>, key: &str, rebuild: bool) -> Result<()> {
        let verb = if rebuild { "rebuild" } else { "build" };
        let ws = self.container(key, verb)?;
        let (id, ops) = self.ops_lock(&ws.id)?;
        let _op = ops.lock().await;
        let limits = self.limits();
        let (ws, tracker) = {
            let mut reg = self.reg();
            let building = reg
                .by_id
                .values()
                .filter(|e| e.ws.status == Status::Building)
                .count();
            let e = reg
                .by_id
                .get_mut(&id)
                .ok_or_else(|| Error::NoSuchWorkspace(key.to_owned()))?;
            match e.ws.status {
                Status::Building => {
                    return Err(Error::Busy(format!(
                        "Workspace '{}' is already building",
                        e.ws.name
                    )));
                }
                Status::Destroying => {
                    return Err(Error::NotReady {
                        workspace: e.ws.name.clone(),
                        status: e.ws.status.to_string(),
                    });
                }
                Status::Ready if !rebuild => return Ok(()),
                _ => {}
            }
            if building >= limits.builds.max_concurrent {
                return Err(Error::LimitsExceeded(format!(
                    "Too many ongoing operations: cannot build workspace '{}', {building} builds are running (max_concurrent_builds)",
                    e.ws.name
                )));
            }
            e.ws.status = Status::Building;
            e.ws.error_message.clear();
            (e.ws.clone(), e.execs.clone())
        };
        self.ports.store.save(&ws)?;
        self.ports.events.emit(Event::Changed {
            id: id.clone(),
            fields: vec![Field::Status, Field::ErrorMessage],
        });
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Building container workspace {} ({})", ws.name,
              ws.distro.map(|d| d.as_str()).unwrap_or("?"));
        let this = self.clone();
        tracker.spawn(async move { this.run_build(ws).await });
        Ok(())
    }

    /// After `load`: picks up what a restart interrupted. Builds still running in their units
    /// are awaited and finished; interrupted container destroys are completed. Nothing stays
    /// `building` or `destroying` for good.
    pub fn reconcile(self: &Arc<Self>) {
        let pending: Vec<(Workspace, TaskTracker)> = self
            .reg()
            .by_id
            .values()
            .filter(|e| e.ws.is_container() && e.ws.status == Status::Building)
            .map(|e| (e.ws.clone(), e.execs.clone()))
            .collect();
        let known: Vec<String> = self
            .reg()
            .by_id
            .values()
            .filter(|e| e.ws.is_container())
            .map(|e| e.ws.name.clone())
            .collect();
        let this = self.clone();
        tokio::spawn(async move { this.ports.containers.clean_orphans(&known).await });
        for (ws, tracker) in pending {
            info!(workspace_id = %ws.id, workspace_name = %ws.name,
                  "Resuming the build of {} after a restart", ws.name);
            let this = self.clone();
            tracker.spawn(async move { this.run_build_from(ws, true).await });
        }
        for ws in std::mem::take(
            &mut *self
                .unfinished_destroys
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            let this = self.clone();
            tokio::spawn(async move {
                let containers = &this.ports.containers;
                let done = async {
                    containers.stop(&ws).await?;
                    containers.remove(&ws).await?;
                    this.ports.store.remove(&ws.id)
                }
                .await;
                match done {
                    Ok(()) => {
                        info!(message_id = messages::WORKSPACE_DESTROYED, workspace_id = %ws.id,
                                    workspace_name = %ws.name, "Destroyed workspace {} ({})", ws.name, ws.id)
                    }
                    Err(e) => {
                        warn!(workspace_id = %ws.id, "Cannot finish destroying {}: {e}", ws.name)
                    }
                }
            });
        }
    }

    async fn run_build(&self, ws: Workspace) {
        self.run_build_from(ws, false).await
    }

    async fn run_build_from(&self, ws: Workspace, resumed: bool) {
        let limits = self.limits();
        let containers = &self.ports.containers;
        let (steps, mut reached) = tokio::sync::mpsc::unbounded_channel::<String>();
        let result = async {
            if resumed {
                containers.wait_build(&ws).await?;
            } else {
                containers.stop(&ws).await?;
                // The build unit's steps become BuildStep as they come.
                let build = containers.build_tree(&ws, steps);
                tokio::pin!(build);
                loop {
                    tokio::select! {
                        r = &mut build => break r?,
                        Some(step) = reached.recv() => self.set_build_step(&ws.id, &step),
                    }
                }
            }
            self.set_build_step(&ws.id, "skills");
            self.install_library(&ws).await?;
            self.set_build_step(&ws.id, "start");
            containers.start(&ws).await?;
            if !ws.init_script.is_empty() {
                self.set_build_step(&ws.id, "init");
                self.init(
                    &ws,
                    Duration::from_secs(limits.builds.init_timeout_secs.into()),
                )
                .await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.finish_build(&ws.id, Status::Ready, "");
                info!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Container workspace {} is ready", ws.name);
            }
            Err(e) => {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Build of container workspace {} failed: {e}", ws.name);
                containers
                    .append_log(&ws, &format!("== build failed: {e}"))
                    .await;
                self.finish_build(&ws.id, Status::Error, &e.to_string());
            }
        }
    }

    /// Ends a build: only a workspace still `building` changes (a destroy may have begun).
    fn finish_build(&self, id: &str, status: Status, message: &str) {
        self.set_status(id, status, message, Some(Status::Building));
    }

    /// Where the build of a workspace still `building` is: kept in the registry (not worth a
    /// disk write) and announced.
    fn set_build_step(&self, id: &str, step: &str) {
        {
            let mut reg = self.reg();
            let Some(e) = reg.by_id.get_mut(id) else {
                return;
            };
            if e.ws.status != Status::Building || e.ws.build_step == step {
                return;
            }
            e.ws.build_step = step.to_owned();
        }
        self.ports.events.emit(Event::Changed {
            id: id.to_owned(),
            fields: vec![Field::BuildStep],
        });
    }

    /// Runs the init script; a failure is an error naming the exit code and the log.
    async fn init(&self, ws: &Workspace, timeout: Duration) -> Result<ExecOutcome> {
        let outcome = self
            .ports
            .containers
            .run_init(ws, timeout, self.shutdown.child_token())
            .await?;
        if outcome.timed_out {
            return Err(Error::JobFailed(format!(
                "The init script of workspace '{}' timed out after {} s; see the init log",
                ws.name,
                timeout.as_secs()
            )));
        }
        if outcome.exit_code != 0 {
            return Err(Error::JobFailed(format!(
                "The init script of workspace '{}' failed with exit code {}; see the init log",
                ws.name, outcome.exit_code
            )));
        }
        Ok(outcome)
    }

    /// Runs the init script again in the ready container, like `exec`; never changes the
    /// workspace's status.
    pub async fn rerun_init(&self, key: &str, timeout_secs: Option<u32>) -> Result<ExecOutcome> {
        let ws = self.container(key, "rerun the init script of")?;
        if ws.status != Status::Ready {
            return Err(Error::NotReady {
                workspace: ws.name,
                status: ws.status.to_string(),
            });
        }
        let limits = self.limits();
        let limits = limits.builds;
        let timeout = timeout_secs.unwrap_or(limits.init_timeout_secs);
        if timeout == 0 || timeout > limits.init_timeout_secs {
            return Err(Error::invalid(
                "timeout_secs",
                format!(
                    "{timeout} is out of range: 1 to {} seconds (init_timeout_secs)",
                    limits.init_timeout_secs
                ),
            ));
        }
        self.ports
            .containers
            .run_init(
                &ws,
                Duration::from_secs(timeout.into()),
                self.shutdown.child_token(),
            )
            .await
    }

    pub async fn start(&self, key: &str) -> Result<()> {
        let ws = self.ready_container(key, "start")?;
        self.ports.containers.start(&ws).await
    }

    pub async fn stop(&self, key: &str) -> Result<()> {
        let ws = self.ready_container(key, "stop")?;
        self.ports.containers.stop(&ws).await
    }

    pub async fn init_log(&self, key: &str, max_lines: u32) -> Result<(String, u32)> {
        let ws = self.container(key, "read the init log of")?;
        self.ports.containers.init_log(&ws, max_lines).await
    }

    /// The debug report of a container workspace: its record's state plus what the system says.
    pub async fn debug_info(&self, key: &str) -> Result<super::ports::DebugInfo> {
        use super::ports::DebugValue::{Str, U64};
        let ws = self.container(key, "read debug info of")?;
        let mut info = self.ports.containers.debug_info(&ws).await?;
        info.insert("status".into(), Str(ws.status.as_str().into()));
        info.insert("error_message".into(), Str(ws.error_message.clone()));
        info.insert("network".into(), Str(ws.network.as_str().into()));
        info.insert(
            "distro".into(),
            Str(ws.distro.map(|d| d.as_str()).unwrap_or_default().into()),
        );
        info.insert("created_at_usec".into(), U64(ws.created_at_usec));
        Ok(info)
    }

    fn ready_container(&self, key: &str, verb: &str) -> Result<Workspace> {
        let ws = self.container(key, verb)?;
        if ws.status != Status::Ready {
            return Err(Error::NotReady {
                workspace: ws.name,
                status: ws.status.to_string(),
            });
        }
        Ok(ws)
    }

    /// Cancels every running exec; used when the service stops.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Manager {
    fn builds_running(&self) -> usize {
        self.reg()
            .by_id
            .values()
            .filter(|e| e.ws.status == Status::Building)
            .count()
    }

    /// Commands running now, in every workspace.
    pub fn running_execs(&self) -> usize {
        self.execs_running.load(Ordering::SeqCst)
    }
}
