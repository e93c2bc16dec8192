//! Create, update, destroy: a workspace's record and files, under its operation lock.

use std::sync::Arc;

use tracing::{info, warn};

use crate::core::error::{Error, Result};
use crate::core::messages;
use crate::core::names::{DEFAULT_HOST, new_id};
use crate::core::ports::Event;
use crate::core::spec::{Changes, CreateSpec};
use crate::core::workspace::{Field, Status, Workspace, WorkspaceType};

use super::*;

impl Manager {
    pub async fn create(self: &Arc<Self>, spec: CreateSpec) -> Result<Workspace> {
        let v = self.with_template(spec)?.validate()?;
        for (key, names) in [("skills", &v.skills), ("tools", &v.tools)] {
            for n in names {
                crate::core::names::validate_library_name(&key[..key.len() - 1], n)
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
        if !ws.is_container()
            && (!ws.skills.is_empty() || !ws.tools.is_empty())
            && let Err(e) = self.install_library(&ws).await
        {
            warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "Cannot install the skills and tools of {}: {e}", ws.name);
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
    pub(super) fn reserve(&self, name: &str) -> Result<Reservation<'_>> {
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

    pub(super) async fn create_reserved(
        &self,
        v: crate::core::spec::ValidCreate,
    ) -> Result<Workspace> {
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
            egress_allow: v.egress_allow,
            egress_deny: v.egress_deny,
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
        let [allow, deny] = changes.egress()?;
        let egress_changed = allow.as_ref().is_some_and(|a| *a != ws.egress_allow)
            || deny.as_ref().is_some_and(|d| *d != ws.egress_deny);
        if let Some(allow) = allow {
            ws.egress_allow = allow;
            keys.push("egress_allow");
        }
        if let Some(deny) = deny {
            ws.egress_deny = deny;
            keys.push("egress_deny");
        }
        if egress_changed {
            fields.push(Field::Egress);
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
            if install && let Err(undo) = self.install_library(&before).await {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                          "Cannot put back the skills and tools of {}: {undo}", ws.name);
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
        if egress_changed {
            // A running container's rules change at once; a stopped one gets them at its
            // next start.
            self.ports.containers.apply_egress(&ws).await.map_err(|e| {
                Error::JobFailed(format!(
                    "Saved the new egress rules of workspace '{}', but could not apply them to the running container ({e}); they apply at its next start",
                    ws.name
                ))
            })?;
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
            e.processes.cancel();
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
        self.forget_processes(&id);
        self.reg().by_id.remove(&id);
        info!(message_id = messages::WORKSPACE_DESTROYED, workspace_id = %ws.id,
              workspace_name = %ws.name, "Destroyed workspace {} ({})", ws.name, ws.id);
        self.ports.events.emit(Event::Removed { id });
        Ok(())
    }

    pub(super) async fn remove_files(&self, ws: &Workspace) -> Result<()> {
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
    pub(super) fn remove_files_blocking(&self, ws: &Workspace) -> Result<()> {
        if ws.is_container() {
            return Ok(());
        }
        if ws.owns_path {
            self.ports.dirs.remove_tree(&ws.path)?;
        }
        self.ports.store.remove(&ws.id)
    }
}
