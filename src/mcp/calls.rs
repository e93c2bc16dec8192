//! The tool calls on workspaces, commands and state: arguments checked, the operator's policy
//! asked, one D-Bus call (or a few) made, the answer as JSON. File and process tools are in
//! `files.rs`.

use std::sync::{Mutex, PoisonError};

use rmcp::RoleServer;
use rmcp::model::ProgressNotificationParam;
use rmcp::service::RequestContext;
use serde_json::{Map, Value, json};
use zbus::Variant;

use super::bus::Resolved;
use super::{Done, Policy, Shared, ToolError, exec, files, tools};
use crate::dbus::client::{OwnedArgs, args, workspace_json};

pub struct Call<'a> {
    pub shared: &'a Shared,
    /// The operator's limits for this caller.
    pub policy: &'a Policy,
    pub args: Map<String, Value>,
    pub context: &'a RequestContext<RoleServer>,
    /// The workspace the call is about, for the audit (set as soon as it is known).
    pub workspace: &'a Mutex<Option<String>>,
}

impl Call<'_> {
    pub async fn run(mut self, tool: &'static str) -> Result<Done, ToolError> {
        // An argument the tool's schema does not name is refused, whatever the tool reads.
        if let Some(spec) = tools::spec(tool)
            && let Some(k) = self
                .args
                .keys()
                .find(|k| !spec.argument_names().any(|n| n == k.as_str()))
        {
            let mut names: Vec<&str> = spec.argument_names().collect();
            names.sort_unstable();
            return Err(ToolError::invalid(format!(
                "{k}: unknown argument of {tool}; its arguments: {}",
                names.join(", ")
            )));
        }
        match tool {
            "list_workspaces" => self.list().await,
            "get_workspace" => {
                let ws = self.workspace_arg().await?;
                self.record(&ws).await.map(Done::json)
            }
            "create_workspace" => self.create().await,
            "destroy_workspace" => {
                let ws = self.workspace_arg().await?;
                let m = self.shared.bus.manager().await.map_err(ToolError::bus)?;
                m.destroy_workspace(&ws.id).await.map_err(ToolError::bus)?;
                Ok(Done::json(json!({"destroyed": ws.name})))
            }
            "exec" => self.exec().await,
            "snapshot_workspace" => {
                let ws = self.workspace_arg().await?;
                let name = self.take_str("name")?;
                let options = self.options(tool)?;
                let m = self.shared.bus.manager().await.map_err(ToolError::bus)?;
                m.snapshot_workspace(&ws.id, &name, args(&options))
                    .await
                    .map_err(ToolError::bus)?;
                Ok(Done::json(json!({"workspace": ws.name, "snapshot": name})))
            }
            "list_snapshots" => {
                let ws = self.workspace_arg().await?;
                let m = self.shared.bus.manager().await.map_err(ToolError::bus)?;
                let all = m.list_snapshots(&ws.id).await.map_err(ToolError::bus)?;
                let list: Vec<Value> = all
                    .into_iter()
                    .map(|(name, created_usec, bytes)| {
                        json!({"name": name, "created_usec": created_usec, "bytes": bytes})
                    })
                    .collect();
                Ok(Done::json(json!({"workspace": ws.name, "snapshots": list})))
            }
            "restore_workspace" | "delete_snapshot" => {
                let ws = self.workspace_arg().await?;
                let snapshot = self.take_str("snapshot")?;
                let m = self.shared.bus.manager().await.map_err(ToolError::bus)?;
                if tool == "restore_workspace" {
                    m.restore_workspace(&ws.id, &snapshot).await
                } else {
                    m.delete_snapshot(&ws.id, &snapshot).await
                }
                .map_err(ToolError::bus)?;
                Ok(Done::json(
                    json!({"workspace": ws.name, "snapshot": snapshot}),
                ))
            }
            "fork_workspace" => self.fork().await,
            "pause_workspace" | "resume_workspace" => {
                let ws = self.workspace_arg().await?;
                let m = self.shared.bus.manager().await.map_err(ToolError::bus)?;
                if tool == "pause_workspace" {
                    m.pause_workspace(&ws.id).await
                } else {
                    m.resume_workspace(&ws.id).await
                }
                .map_err(ToolError::bus)?;
                self.record(&ws).await.map(Done::json)
            }
            other => files::run(&mut self, other).await,
        }
    }

    // --- arguments ---

    fn take(&mut self, name: &str) -> Option<Value> {
        self.args.remove(name).filter(|v| !v.is_null())
    }

    pub fn take_str(&mut self, name: &str) -> Result<String, ToolError> {
        self.take_opt_str(name)?
            .ok_or_else(|| ToolError::invalid(format!("{name}: is required")))
    }

    pub fn take_opt_str(&mut self, name: &str) -> Result<Option<String>, ToolError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ToolError::invalid(format!("{name}: must be a string"))),
        }
    }

    pub fn take_u64(&mut self, name: &str) -> Result<Option<u64>, ToolError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ToolError::invalid(format!("{name}: must be a non-negative integer"))
            }),
        }
    }

    pub fn take_u32(&mut self, name: &str) -> Result<Option<u32>, ToolError> {
        self.take_u64(name)?
            .map(|n| {
                u32::try_from(n)
                    .map_err(|_| ToolError::invalid(format!("{name}: must be below 2^32")))
            })
            .transpose()
    }

    pub fn take_bool(&mut self, name: &str) -> Result<Option<bool>, ToolError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(ToolError::invalid(format!("{name}: must be true or false"))),
        }
    }

    /// The output bound of this call: its `max_output_bytes`, within the caller's cap.
    pub fn output_limit(&mut self) -> Result<usize, ToolError> {
        let asked = self.take_u32("max_output_bytes")?;
        self.policy.output_bytes(asked).map_err(ToolError::refused)
    }

    /// What is left of the arguments, as the tool's option dictionary (its left-out keys
    /// refused as unknown), or nothing left for a tool without one.
    pub fn options(&mut self, tool: &str) -> Result<OwnedArgs, ToolError> {
        let rest = std::mem::take(&mut self.args);
        let Some((keys, except)) = tools::spec(tool).and_then(|s| s.options.as_ref()) else {
            if let Some(k) = rest.keys().next() {
                return Err(ToolError::invalid(format!("{k}: unknown argument")));
            }
            return Ok(OwnedArgs::new());
        };
        let options = keys.from_json(rest)?;
        if let Some(k) = except.iter().find(|k| options.contains_key(**k)) {
            return Err(ToolError::invalid(format!(
                "{k}: not available through MCP"
            )));
        }
        Ok(options)
    }

    // --- workspaces ---

    /// The `workspace` argument, resolved and checked against the policy.
    pub async fn workspace_arg(&mut self) -> Result<Resolved, ToolError> {
        let key = self.take_str("workspace")?;
        self.note(&key);
        let ws = self
            .shared
            .bus
            .resolve(&key)
            .await
            .map_err(ToolError::bus)?;
        self.note(&ws.name);
        self.policy
            .check_workspace(&ws.name, &ws.workspace_type)
            .map_err(ToolError::refused)?;
        Ok(ws)
    }

    fn note(&self, name: &str) {
        *self
            .workspace
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(name.to_owned());
    }

    async fn record(&self, ws: &Resolved) -> Result<Value, ToolError> {
        let props = self
            .shared
            .bus
            .properties(&ws.path)
            .await
            .map_err(ToolError::bus)?;
        Ok(workspace_json(&props))
    }

    async fn list(&mut self) -> Result<Done, ToolError> {
        self.options("list_workspaces")?;
        let shown = super::resources::shown(self.shared, self.policy).await?;
        Ok(Done::json(json!({"workspaces": shown})))
    }

    async fn create(&mut self) -> Result<Done, ToolError> {
        let wait = self.take_bool("wait")?.unwrap_or(true);
        let mut spec = self.options("create_workspace")?;
        let name = match spec.get("name") {
            Some(v) => String::try_from(v.try_clone().map_err(|_| ToolError::invalid("name"))?)
                .map_err(|_| ToolError::invalid("name: must be a string"))?,
            None => return Err(ToolError::invalid("name: is required")),
        };
        self.note(&name);
        let p = &self.policy;
        // A server that serves containers only makes containers unless told otherwise.
        let ty = match spec.get("workspace_type") {
            Some(v) => String::try_from(v.try_clone().map_err(|_| ToolError::invalid("type"))?)
                .unwrap_or_default(),
            None if !p.allow_host => {
                spec.insert("workspace_type".into(), Variant::from("container"));
                "container".into()
            }
            None if spec.contains_key("distro") => "container".into(),
            None => "host".into(),
        };
        p.check_workspace(&name, &ty).map_err(ToolError::refused)?;
        if ty == "container" {
            spec.insert("build_on_create".into(), Variant::from(true));
        }
        let m = self.shared.bus.manager().await.map_err(ToolError::bus)?;
        let path = m
            .create_workspace(args(&spec))
            .await
            .map_err(ToolError::bus)?;
        // The one this call made (by its id), whatever takes its name meanwhile.
        let ws = self
            .shared
            .bus
            .resolve(&super::bus::id_of(&path))
            .await
            .map_err(ToolError::bus)?;
        if ws.workspace_type != "container" || !wait {
            return self.record(&ws).await.map(Done::json);
        }
        self.await_build(&ws).await
    }

    /// Waits for a build to end, each new step a progress notification; a cancel destroys
    /// the workspace being built.
    async fn await_build(&self, ws: &Resolved) -> Result<Done, ToolError> {
        use futures_util::StreamExt;
        let props = zbus::fdo::PropertiesProxy::builder(self.shared.bus.shared())
            .destination(crate::dbus::BUS_NAME)
            .path(ws.path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(ToolError::bus)?;
        let mut changes = props
            .receive_properties_changed()
            .await
            .map_err(ToolError::bus)?;
        let token = self.context.meta.get_progress_token();
        let mut steps = 0u32;
        let mut last_step = String::new();
        let ct = &self.context.ct;
        loop {
            let record = self.record(ws).await?;
            let status = record["status"].as_str().unwrap_or_default().to_owned();
            let step = record["build_step"].as_str().unwrap_or_default().to_owned();
            if !step.is_empty() && step != last_step {
                steps += 1;
                last_step = step.clone();
                if let Some(token) = &token {
                    let _ = self
                        .context
                        .peer
                        .notify_progress(
                            ProgressNotificationParam::new(token.clone(), f64::from(steps))
                                .with_message(format!("workspace '{}': {step}", ws.name)),
                        )
                        .await;
                }
            }
            match status.as_str() {
                "pending" | "building" => {}
                "error" => {
                    return Err(ToolError {
                        why: super::Why::Failed,
                        code: "BuildFailed".into(),
                        message: format!(
                            "the build of workspace '{}' failed: {}; its init log is the \
                             resource workspace://{}/init-log, and rebuild by destroying and \
                             creating it again",
                            ws.name,
                            record["error_message"].as_str().unwrap_or("no message"),
                            ws.name
                        ),
                    });
                }
                _ => return Ok(Done::json(record)),
            }
            tokio::select! {
                next = changes.next() => if next.is_none() {
                    return Err(ToolError::internal("the service's signals ended"));
                },
                () = ct.cancelled() => {
                    let destroyed = match self.shared.bus.manager().await {
                        Ok(m) => m.destroy_workspace(&ws.id).await,
                        Err(e) => Err(e),
                    };
                    let what = match destroyed {
                        Ok(()) => "is destroyed".to_owned(),
                        Err(e) => format!("could not be destroyed: {}", ToolError::bus(e).message),
                    };
                    return Err(ToolError {
                        message: format!(
                            "the call was cancelled; workspace '{}', whose build it was \
                             waiting for, {what}",
                            ws.name
                        ),
                        ..ToolError::cancelled()
                    });
                }
            }
        }
    }

    async fn fork(&mut self) -> Result<Done, ToolError> {
        let source = self.workspace_arg().await?;
        let snapshot = self.take_str("snapshot")?;
        let spec = self.options("fork_workspace")?;
        let name = spec
            .get("name")
            .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
            .ok_or_else(|| ToolError::invalid("name: is required (the fork's name)"))?;
        self.policy
            .check_workspace(&name, "container")
            .map_err(ToolError::refused)?;
        let m = self.shared.bus.manager().await.map_err(ToolError::bus)?;
        let path = m
            .fork_workspace(&source.id, &snapshot, args(&spec))
            .await
            .map_err(ToolError::bus)?;
        let fork = self
            .shared
            .bus
            .resolve(&super::bus::id_of(&path))
            .await
            .map_err(ToolError::bus)?;
        self.record(&fork).await.map(Done::json)
    }

    async fn exec(&mut self) -> Result<Done, ToolError> {
        let key = self.take_str("workspace")?;
        self.note(&key);
        let command = self.take_str("command")?;
        let limit = self.output_limit()?;
        let mut options = self.options("exec")?;
        let asked = options
            .get("timeout_secs")
            .and_then(|v| u32::try_from(v.try_clone().ok()?).ok());
        let timeout = self.policy.timeout(asked).map_err(ToolError::refused)?;
        options.insert("timeout_secs".into(), Variant::from(timeout));
        // The hot path: the workspace as resolved last (checked all the same); one destroyed
        // since fails before anything runs, and is resolved afresh.
        let bus = &self.shared.bus;
        let (mut ws, mut cached) = bus.resolve_cached(&key).await.map_err(ToolError::bus)?;
        loop {
            self.note(&ws.name);
            self.policy
                .check_workspace(&ws.name, &ws.workspace_type)
                .map_err(ToolError::refused)?;
            let ran = exec::run(bus, &ws, &command, options.clone(), limit, &self.context.ct).await;
            match ran {
                Err(e) if cached && e.code == "NoSuchWorkspace" => {
                    bus.forget(&key);
                    (ws, cached) = bus.resolve_cached(&key).await.map_err(ToolError::bus)?;
                }
                Err(e) => return Err(e),
                Ok(ran) => {
                    return Ok(Done {
                        value: ran.json(timeout),
                        text: Some(ran.text(timeout)),
                    });
                }
            }
        }
    }
}
