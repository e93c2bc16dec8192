//! Start-up: records loaded from the store, interrupted work (creates, builds, destroys)
//! found and finished or marked failed.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::core::error::Result;
use crate::core::messages;
use crate::core::names::DEFAULT_HOST;
use crate::core::workspace::{Status, Workspace, WorkspaceType};

use super::*;

impl Manager {
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
                egress_allow: Vec::new(),
                egress_deny: Vec::new(),
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
        let known: Vec<Workspace> = self
            .reg()
            .by_id
            .values()
            .filter(|e| e.ws.is_container())
            .map(|e| e.ws.clone())
            .collect();
        let this = self.clone();
        // Containers running now are idle from now on.
        for e in self.reg().by_id.values() {
            if e.ws.is_container() && matches!(e.ws.status, Status::Ready | Status::Paused) {
                e.used(Some(tokio::time::Instant::now()));
            }
        }
        let live = self.clone();
        let taken: crate::core::ports::NameTaken =
            Arc::new(move |name| live.reg().name_taken(name));
        tokio::spawn(async move { this.ports.containers.clean_orphans(&known, taken).await });
        tokio::spawn(self.clone().watch_idle());
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
}
