//! The operations behind both the manager object and the per-workspace objects: validate the
//! arguments, authorize the caller, call the core, convert the result. One implementation per
//! operation, whichever object the call came in on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, OwnedVariant};

use super::args::{self, Dict};
use super::auth::{Action, Authorizer};
use super::client::{ExecFdsReply, ExecReply};
use super::error::{Answer, Error, ForCaller, Result};
use super::error_data::ErrorData;
use super::objects::{EventQueue, workspace_path};
use crate::core::Manager;
use crate::core::ports::ExecIo;
use crate::core::spec::ExecParams;
use crate::core::workspace::WorkspaceType;

/// Cancels what a caller started when it leaves the bus, and forgets its wish for error data.
#[derive(Clone, Default)]
pub struct Disconnects {
    tokens: Arc<Mutex<HashMap<String, CancellationToken>>>,
    /// The bus, asked whether a caller is still on it.
    bus: Option<zbus::fdo::DBusProxy<'static>>,
}

impl Disconnects {
    /// Watches `NameOwnerChanged` for unique names that lose their owner.
    pub async fn watch(conn: &Connection, error_data: ErrorData) -> zbus::Result<Self> {
        let proxy = zbus::fdo::DBusProxy::new(conn).await?;
        let this = Self {
            tokens: Arc::default(),
            bus: Some(proxy.clone()),
        };
        let mut lost = proxy
            .receive_name_owner_changed_with_args(&[(2, "")])
            .await?;
        let tokens = this.tokens.clone();
        tokio::spawn(async move {
            while let Some(signal) = lost.next().await {
                let Ok(args) = signal.args() else { continue };
                let name = args.name().to_string();
                if name.starts_with(':') {
                    error_data.forget(&name);
                    let token = tokens
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&name);
                    if let Some(token) = token {
                        token.cancel();
                    }
                }
            }
        });
        Ok(this)
    }

    /// Whether `name` is on the bus now (yes when it cannot be asked).
    pub(super) async fn connected(&self, name: &str) -> bool {
        let (Some(bus), Ok(name)) = (&self.bus, zbus::names::BusName::try_from(name)) else {
            return true;
        };
        bus.name_has_owner(name).await.unwrap_or(true)
    }

    pub(super) fn token_for(&self, sender: &str) -> CancellationToken {
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(sender.to_owned())
            .or_default()
            .child_token()
    }
}

#[derive(Clone)]
pub struct Context {
    pub manager: Arc<Manager>,
    pub auth: Authorizer,
    pub disconnects: Disconnects,
    pub events: EventQueue,
    pub error_data: ErrorData,
}

impl Context {
    /// A method's result as its caller gets it (`error.rs`).
    pub async fn answer<T>(&self, result: impl Future<Output = Result<T>>) -> Answer<T> {
        result.await.for_caller(self)
    }

    /// `SetErrorData`: whether the caller's errors carry their data after the message.
    /// A caller that left the bus before its call was served may have had its leaving seen
    /// first: it is looked up on the bus after it is listed, and forgotten if gone; a full list
    /// first drops the callers no longer on the bus.
    pub async fn set_error_data(&self, header: &Header<'_>, on: bool) -> Result<()> {
        let sender = header
            .sender()
            .ok_or_else(|| Error::invalid("sender", "the call names no sender"))?;
        if on && self.error_data.is_full() {
            for name in self.error_data.callers() {
                if !self.disconnects.connected(&name).await {
                    self.error_data.forget(&name);
                }
            }
        }
        self.error_data.set(sender.as_str(), on)?;
        if on && !self.disconnects.connected(sender.as_str()).await {
            self.error_data.forget(sender.as_str());
        }
        Ok(())
    }

    /// Looks the workspace up and checks that the caller may run `verb` on it.
    async fn authorize(
        &self,
        header: &Header<'_>,
        key: &str,
        action: Action,
        verb: &str,
    ) -> Result<crate::core::workspace::Workspace> {
        let ws = self.manager.get(key)?;
        self.auth.check(header, action, &ws.name, verb).await?;
        Ok(ws)
    }

    /// Authorizes running commands in the workspace `key`; returns its id.
    pub(super) async fn authorize_exec(
        &self,
        header: &Header<'_>,
        key: &str,
        verb: &str,
    ) -> Result<String> {
        let ws = self.manager.get(key)?;
        let action = match ws.workspace_type {
            WorkspaceType::Host => Action::ExecHost,
            WorkspaceType::Container => Action::Exec,
        };
        self.auth.check(header, action, &ws.name, verb).await?;
        Ok(ws.id)
    }

    pub async fn create(&self, header: &Header<'_>, spec: Dict) -> Result<OwnedObjectPath> {
        let spec = args::create_spec(spec)?;
        // What the template supplies counts: a container request may take its distro from it.
        let checked = self.manager.with_template(spec.clone())?.validate()?;
        self.auth
            .check(header, Action::Manage, &checked.name, "create")
            .await?;
        if checked.path.is_some() {
            self.auth
                .check(
                    header,
                    Action::ExecHost,
                    &checked.name,
                    "choose a host path for",
                )
                .await?;
        }
        let ws = self.manager.create(spec).await?;
        self.events.flush().await;
        Ok(workspace_path(&ws.id))
    }

    pub fn list(&self) -> Vec<(String, String, String, String, OwnedObjectPath)> {
        self.manager
            .list()
            .into_iter()
            .map(|w| {
                let path = workspace_path(&w.id);
                (
                    w.id,
                    w.name,
                    w.workspace_type.as_str().to_owned(),
                    w.status.as_str().to_owned(),
                    path,
                )
            })
            .collect()
    }

    pub fn get(&self, key: &str) -> Result<OwnedObjectPath> {
        Ok(workspace_path(&self.manager.get(key)?.id))
    }

    pub async fn update(&self, header: &Header<'_>, key: &str, changes: Dict) -> Result<()> {
        let changes = args::changes(changes)?;
        changes.validate()?;
        self.authorize(header, key, Action::Manage, "update")
            .await?;
        self.manager.update(key, changes).await?;
        self.events.flush().await;
        Ok(())
    }

    pub async fn destroy(&self, header: &Header<'_>, key: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "destroy")
            .await?;
        self.manager.destroy(key).await?;
        self.events.flush().await;
        Ok(())
    }

    pub async fn exec(
        &self,
        header: &Header<'_>,
        key: &str,
        command: String,
        options: Dict,
    ) -> Result<ExecReply> {
        let params = args::exec_params(command, options)?;
        Ok(exec_reply(self.run(header, key, params).await?))
    }

    /// `Exec` with the caller's descriptors as the command's stdin, stdout and stderr.
    #[allow(clippy::too_many_arguments)]
    pub async fn exec_with_fds(
        &self,
        header: &Header<'_>,
        key: &str,
        command: String,
        stdin: zbus::OwnedFd,
        stdout: zbus::OwnedFd,
        stderr: zbus::OwnedFd,
        options: Dict,
    ) -> Result<ExecFdsReply> {
        let io = ExecIo::Lend {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
        };
        let params = args::exec_fds_params(command, options, io)?;
        let o = self.run(header, key, params).await?;
        let info = HashMap::from([duration_info(&o)]);
        Ok((o.exit_code, o.timed_out, info))
    }

    async fn run(
        &self,
        header: &Header<'_>,
        key: &str,
        params: ExecParams,
    ) -> Result<crate::core::ports::ExecOutcome> {
        params.validate(&self.manager.limits().exec)?;
        let id = self.authorize_exec(header, key, "exec in").await?;
        let gone = match header.sender() {
            Some(sender) => self.disconnects.token_for(sender.as_str()),
            None => CancellationToken::new(),
        };
        self.manager.exec(&id, params, gone).await
    }

    pub async fn debug_info(
        &self,
        header: &Header<'_>,
        key: &str,
    ) -> Result<HashMap<String, OwnedVariant>> {
        use crate::core::ports::DebugValue;
        self.authorize(header, key, Action::Manage, "read debug info of")
            .await?;
        let info = self.manager.debug_info(key).await?;
        Ok(info
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    DebugValue::Str(s) => OwnedVariant::try_from(zbus::Variant::from(s)),
                    DebugValue::U64(n) => Ok(OwnedVariant::from(n)),
                    DebugValue::Bool(b) => Ok(OwnedVariant::from(b)),
                    DebugValue::List(l) => OwnedVariant::try_from(zbus::Variant::from(l)),
                };
                // Plain strings, numbers and lists always convert (no file descriptors).
                (k, v.unwrap_or_else(|_| OwnedVariant::from(false)))
            })
            .collect())
    }

    pub async fn build(&self, header: &Header<'_>, key: &str, rebuild: bool) -> Result<()> {
        let verb = if rebuild { "rebuild" } else { "build" };
        self.authorize(header, key, Action::Manage, verb).await?;
        self.manager.build(key, rebuild).await?;
        self.events.flush().await;
        Ok(())
    }

    pub async fn start(&self, header: &Header<'_>, key: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "start").await?;
        self.manager.start(key).await
    }

    pub async fn stop(&self, header: &Header<'_>, key: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "stop").await?;
        self.manager.stop(key).await
    }

    pub async fn snapshot(
        &self,
        header: &Header<'_>,
        key: &str,
        name: &str,
        options: Dict,
    ) -> Result<()> {
        args::snapshot_options(options)?;
        self.authorize(header, key, Action::Manage, "snapshot")
            .await?;
        self.manager.snapshot(key, name).await?;
        self.events.flush().await;
        Ok(())
    }

    pub async fn list_snapshots(
        &self,
        header: &Header<'_>,
        key: &str,
    ) -> Result<Vec<(String, u64, u64)>> {
        self.authorize(header, key, Action::Manage, "list the snapshots of")
            .await?;
        Ok(self
            .manager
            .snapshots(key)
            .await?
            .into_iter()
            .map(|s| (s.name, s.created_usec, s.bytes))
            .collect())
    }

    pub async fn delete_snapshot(&self, header: &Header<'_>, key: &str, name: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "delete a snapshot of")
            .await?;
        self.manager.delete_snapshot(key, name).await?;
        self.events.flush().await;
        Ok(())
    }

    pub async fn restore(&self, header: &Header<'_>, key: &str, snapshot: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "restore")
            .await?;
        self.manager.restore(key, snapshot).await?;
        self.events.flush().await;
        Ok(())
    }

    pub async fn fork(
        &self,
        header: &Header<'_>,
        key: &str,
        snapshot: &str,
        spec: Dict,
    ) -> Result<OwnedObjectPath> {
        let (name, changes) = args::fork_spec(spec)?;
        self.authorize(header, key, Action::Manage, "fork").await?;
        self.auth
            .check(header, Action::Manage, &name, "create")
            .await?;
        let ws = self.manager.fork(key, snapshot, &name, changes).await?;
        self.events.flush().await;
        Ok(workspace_path(&ws.id))
    }

    pub async fn pause(&self, header: &Header<'_>, key: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "pause").await?;
        self.manager.pause(key).await
    }

    pub async fn resume(&self, header: &Header<'_>, key: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "resume")
            .await?;
        self.manager.resume(key).await
    }

    pub async fn init_log(
        &self,
        header: &Header<'_>,
        key: &str,
        max_lines: u32,
    ) -> Result<(String, u32)> {
        self.authorize(header, key, Action::Manage, "read the init log of")
            .await?;
        self.manager.init_log(key, max_lines).await
    }

    pub async fn rerun_init(
        &self,
        header: &Header<'_>,
        key: &str,
        options: Dict,
    ) -> Result<ExecReply> {
        let timeout = args::rerun_options(options)?;
        self.authorize(header, key, Action::Manage, "rerun the init script of")
            .await?;
        Ok(exec_reply(self.manager.rerun_init(key, timeout).await?))
    }

    pub async fn sync(&self, header: &Header<'_>, key: &str) -> Result<()> {
        self.authorize(header, key, Action::Manage, "sync").await?;
        self.manager.sync(key).await
    }

    pub async fn list_library(&self) -> Result<(Vec<String>, Vec<String>)> {
        self.manager.library().await
    }

    pub async fn list_templates(&self) -> Result<Vec<(String, String, String)>> {
        Ok(self
            .manager
            .templates()
            .await?
            .into_iter()
            .map(|t| (t.name, t.description, t.distro.unwrap_or_default()))
            .collect())
    }

    /// A template as `a{sv}`; env var names only, never values.
    pub async fn get_template(&self, name: &str) -> Result<HashMap<String, OwnedVariant>> {
        let t = self.manager.template(name).await?;
        let s = |v: String| OwnedVariant::try_from(zbus::Variant::from(v));
        let l = |v: Vec<String>| OwnedVariant::try_from(zbus::Variant::from(v));
        let mut out = vec![
            ("name", s(t.name)),
            ("description", s(t.description)),
            ("distro", s(t.distro.unwrap_or_default())),
            (
                "workspace_type",
                s(t.workspace_type.unwrap_or_else(|| "container".into())),
            ),
            ("skills", l(t.skills)),
            ("tools", l(t.tools)),
            ("env_var_names", l(t.env_vars.into_keys().collect())),
            ("init_script", s(t.init_script.unwrap_or_default())),
        ];
        if let Some(n) = t.network {
            out.push(("network", s(n)));
        }
        if let Some(a) = t.egress_allow {
            out.push(("egress_allow", l(a)));
        }
        if let Some(d) = t.egress_deny {
            out.push(("egress_deny", l(d)));
        }
        let mut map: HashMap<String, OwnedVariant> = HashMap::new();
        for (k, v) in out {
            map.insert(k.to_owned(), v.map_err(Error::from)?);
        }
        for (k, v) in [("memory_max", t.memory_max), ("tasks_max", t.tasks_max)] {
            if let Some(v) = v {
                map.insert(k.to_owned(), OwnedVariant::from(v));
            }
        }
        if let Some(c) = t.cpu_quota_percent {
            map.insert("cpu_quota_percent".to_owned(), OwnedVariant::from(c));
        }
        Ok(map)
    }
}

fn exec_reply(o: crate::core::ports::ExecOutcome) -> ExecReply {
    let info = HashMap::from([
        (
            "stdout_truncated".to_owned(),
            OwnedVariant::from(o.stdout_truncated),
        ),
        (
            "stderr_truncated".to_owned(),
            OwnedVariant::from(o.stderr_truncated),
        ),
        duration_info(&o),
    ]);
    (o.exit_code, o.stdout, o.stderr, o.timed_out, info)
}

fn duration_info(o: &crate::core::ports::ExecOutcome) -> (String, OwnedVariant) {
    (
        "duration_usec".to_owned(),
        OwnedVariant::from(o.duration.as_micros() as u64),
    )
}
