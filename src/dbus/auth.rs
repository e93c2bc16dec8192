//! Authorization. `Authorizer::check` turns a decision into the D-Bus answer; the decision is an
//! `Authority`'s: polkit on the system bus (`Polkit`), a fake in the contract tests. With polkit
//! the subject is always the caller (its bus name), never this service; callers with uid 0 are
//! allowed without asking polkit, as systemd does for privileged callers; everyone else is
//! asked, with details `workspace` and `verb`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Semaphore;

use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus::message::{Flags, Header};
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use super::error::{Error, Result};

/// The polkit actions shipped in `polkit/org.agent.workspaces.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Create, update, destroy, build, start/stop, rerun-init, sync, logs, debug info.
    Manage,
    /// Run commands in a container workspace.
    Exec,
    /// Run commands on the host, or choose host paths.
    ExecHost,
    /// Read a container workspace's files (`ReadFile`, `ListDirectory`, `StatFile`,
    /// `Download`, `WatchFiles`).
    ReadFiles,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Self::Manage => "org.agent.workspaces.manage",
            Self::Exec => "org.agent.workspaces.exec",
            Self::ExecHost => "org.agent.workspaces.exec-host",
            Self::ReadFiles => "org.agent.workspaces.read-files",
        }
    }
}

/// Calls to the bus and polkit in flight at once for authorization. dbus-daemon refuses a
/// connection's 129th pending call (max_replies_per_connection), which a burst of requests
/// would otherwise reach; over this, requests wait their turn.
const MAX_CHECKS: usize = 48;
/// Callers' uids remembered (unique names are never reused on a bus); the map is emptied when
/// it grows past this.
const MAX_REMEMBERED: usize = 4096;
/// How long an authority's "yes" to one connection, for one action, workspace and verb, is
/// reused (a client such as the REST bridge sends many calls a second over one connection).
/// Only "yes" is kept: a rule that stops allowing a caller applies within this time.
pub const ALLOWED_FOR: Duration = Duration::from_secs(2);

/// One request for authorization.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub action: Action,
    pub workspace: &'a str,
    /// What the caller wants to do, in words ("exec in", "destroy").
    pub verb: &'a str,
    /// The caller allowed interactive authorization (`ALLOW_INTERACTIVE_AUTH`).
    pub interactive: bool,
}

/// What an authority answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Allowed once the caller authenticates.
    Challenge,
    Denied,
}

/// Decides whether the caller of a message may do what it asks.
#[async_trait]
pub trait Authority: Send + Sync {
    /// Errors are `AccessDenied` when the decision cannot be made.
    async fn decide(&self, header: &Header<'_>, request: Request<'_>) -> Result<Decision>;
}

#[async_trait]
impl<T: Authority + ?Sized> Authority for Arc<T> {
    async fn decide(&self, header: &Header<'_>, request: Request<'_>) -> Result<Decision> {
        (**self).decide(header, request).await
    }
}

/// Checks every call against an `Authority`.
#[derive(Clone)]
pub struct Authorizer(Arc<dyn Authority>);

impl Authorizer {
    pub fn new(authority: Arc<dyn Authority>) -> Self {
        Self(authority)
    }

    /// polkit on `conn`'s bus.
    pub async fn polkit(conn: &Connection) -> zbus::Result<Self> {
        Ok(Self::new(Arc::new(Remembering::new(
            Polkit::new(conn).await?,
        ))))
    }

    /// Allows the call or returns `AccessDenied` / `InteractiveAuthorizationRequired`.
    pub async fn check(
        &self,
        header: &Header<'_>,
        action: Action,
        workspace: &str,
        verb: &str,
    ) -> Result<()> {
        if header.sender().is_none() {
            return Err(Error::AccessDenied(
                "The call has no sender to authorize".into(),
            ));
        }
        let interactive = header
            .primary()
            .flags()
            .contains(Flags::ALLOW_INTERACTIVE_AUTH);
        let request = Request {
            action,
            workspace,
            verb,
            interactive,
        };
        match self.0.decide(header, request).await? {
            Decision::Allowed => Ok(()),
            Decision::Challenge if !interactive => {
                Err(Error::InteractiveAuthorizationRequired(format!(
                    "Interactive authentication required to {verb} workspace '{workspace}' ({})",
                    action.id()
                )))
            }
            Decision::Challenge | Decision::Denied => Err(Error::AccessDenied(format!(
                "Not authorized to {verb} workspace '{workspace}' ({})",
                action.id()
            ))),
        }
    }
}

/// An authority whose "yes" answers are reused for [`ALLOWED_FOR`], per caller (its unique bus
/// name, never reused on a bus), action, workspace and verb. "No" and challenges are asked
/// again every time.
pub struct Remembering<A> {
    inner: A,
    allowed: Mutex<HashMap<(String, Action, String, String), Instant>>,
}

impl<A> Remembering<A> {
    pub fn new(inner: A) -> Self {
        Self {
            inner,
            allowed: Mutex::default(),
        }
    }
}

#[async_trait]
impl<A: Authority> Authority for Remembering<A> {
    async fn decide(&self, header: &Header<'_>, request: Request<'_>) -> Result<Decision> {
        let Some(sender) = header.sender() else {
            return self.inner.decide(header, request).await;
        };
        let key = (
            sender.to_string(),
            request.action,
            request.workspace.to_owned(),
            request.verb.to_owned(),
        );
        let asked = Instant::now();
        if self
            .allowed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .is_some_and(|until| *until > asked)
        {
            return Ok(Decision::Allowed);
        }
        let decision = self.inner.decide(header, request).await?;
        if decision == Decision::Allowed {
            let mut allowed = self.allowed.lock().unwrap_or_else(PoisonError::into_inner);
            if allowed.len() >= MAX_REMEMBERED {
                allowed.retain(|_, until| *until > asked);
                if allowed.len() >= MAX_REMEMBERED {
                    allowed.clear();
                }
            }
            allowed.insert(key, asked + ALLOWED_FOR);
        }
        Ok(decision)
    }
}

/// polkit's `CheckAuthorization`, with the caller's bus name as the subject.
pub struct Polkit {
    dbus: DBusProxy<'static>,
    polkit: AuthorityProxy<'static>,
    checks: Semaphore,
    uids: Mutex<HashMap<String, u32>>,
}

impl Polkit {
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        Ok(Self {
            dbus: DBusProxy::new(conn).await?,
            polkit: AuthorityProxy::builder(conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?,
            checks: Semaphore::new(MAX_CHECKS),
            uids: Mutex::default(),
        })
    }

    /// The caller's uid: asked of the bus once per connection.
    async fn uid_of(&self, sender: &zbus::names::UniqueName<'_>) -> Result<u32> {
        if let Some(uid) = self.remembered(sender) {
            return Ok(uid);
        }
        let uid = self
            .dbus
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| Error::AccessDenied(format!("Cannot identify the caller: {e}")))?;
        let mut uids = self.uids.lock().unwrap_or_else(PoisonError::into_inner);
        if uids.len() >= MAX_REMEMBERED {
            uids.clear();
        }
        uids.insert(sender.to_string(), uid);
        Ok(uid)
    }

    fn remembered(&self, sender: &zbus::names::UniqueName<'_>) -> Option<u32> {
        self.uids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sender.as_str())
            .copied()
    }
}

#[async_trait]
impl Authority for Polkit {
    async fn decide(&self, header: &Header<'_>, request: Request<'_>) -> Result<Decision> {
        let sender = header
            .sender()
            .ok_or_else(|| Error::AccessDenied("The call has no sender to authorize".into()))?;
        let _turn = match self.remembered(sender) {
            Some(0) => return Ok(Decision::Allowed),
            _ => self.checks.acquire().await,
        };
        if self.uid_of(sender).await? == 0 {
            return Ok(Decision::Allowed);
        }
        let subject = Subject::new_for_message_header(header)
            .map_err(|e| Error::AccessDenied(format!("Cannot identify the caller: {e}")))?;
        let flags = if request.interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
        let Request {
            action,
            workspace,
            verb,
            ..
        } = request;
        let details = HashMap::from([("workspace", workspace), ("verb", verb)]);
        let result = self
            .polkit
            .check_authorization(&subject, action.id(), &details, flags, "")
            .await
            .map_err(|e| {
                Error::AccessDenied(format!(
                    "Cannot {verb} workspace '{workspace}': the authorization check failed: {e}"
                ))
            })?;
        Ok(if result.is_authorized {
            Decision::Allowed
        } else if result.is_challenge {
            Decision::Challenge
        } else {
            Decision::Denied
        })
    }
}
