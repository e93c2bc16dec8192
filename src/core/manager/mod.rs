//! The workspace manager: every operation on workspaces, over the ports. One implementation per
//! operation, whatever the transport. Invariants:
//! - a workspace is in the registry iff its record is on disk (except while being created);
//! - names are unique; the default host workspace always exists and is never destroyed;
//! - mutations of one workspace (update, destroy) are serialized by its operation lock;
//! - destroy cancels the workspace's running execs and waits for them before removing anything.

mod container;
mod exec;
mod files;
mod kept;
mod library;
mod lifecycle;
mod output;
mod pause;
mod processes;
mod recovery;
mod snapshots;
mod terminals;

pub use exec::{BASE_PATH, command_env};
pub use processes::ProcessInfo;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::error::{Error, Result};
use super::ports::{Containers, Event, Events, Executor, HostDirs, Library, Store};
use super::spec::ServiceLimits;
use super::workspace::{Field, Status, Workspace};

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
    /// Ends its background processes (destroy; not the service's shutdown where processes
    /// are kept across a restart).
    processes: CancellationToken,
    /// When it was last used (a command, a process, a file call, a port connection), for
    /// the idle pause and stop; none while its container is not known to run.
    last_used: Mutex<Option<tokio::time::Instant>>,
}

impl Entry {
    fn new(ws: Workspace, shutdown: &CancellationToken) -> Self {
        Self {
            ws,
            ops: Arc::default(),
            execs: TaskTracker::new(),
            cancel: shutdown.child_token(),
            processes: CancellationToken::new(),
            last_used: Mutex::new(None),
        }
    }

    /// Marks it used now (`Some`), or not running (`None`).
    fn used(&self, at: Option<tokio::time::Instant>) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = at;
    }

    fn last_used(&self) -> Option<tokio::time::Instant> {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
    /// Background processes, per workspace id.
    processes: processes::Processes,
    /// `DiskUsage` as last measured, per workspace id, and when.
    disk_usage: Mutex<HashMap<String, (std::time::Instant, u64)>>,
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
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
            processes: Mutex::default(),
            disk_usage: Mutex::default(),
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

    /// The operation lock and id of a workspace, looked up by id or name.
    fn ops_lock(&self, key: &str) -> Result<(String, Arc<tokio::sync::Mutex<()>>)> {
        let reg = self.reg();
        let e = reg.resolve(key)?;
        Ok((e.ws.id.clone(), e.ops.clone()))
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

    /// Cancels every running exec; used when the service stops. Background processes are
    /// kept for the next start where the executor keeps them (their output with them), and
    /// ended with the rest where it does not.
    pub fn shutdown(&self) {
        if self.ports.executor.keeps_processes() {
            self.keep_outputs();
        } else {
            for e in self.reg().by_id.values() {
                e.processes.cancel();
            }
        }
        self.shutdown.cancel();
    }
}
