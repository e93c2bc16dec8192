//! Authorization with polkit. The subject is always the caller (its bus name), never this
//! service. Callers with uid 0 are allowed without asking polkit, as systemd does for privileged
//! callers; everyone else is asked, with details `workspace` and `verb`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Semaphore;

use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus::message::{Flags, Header};
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use super::error::{Error, Result};

/// The polkit actions shipped in `polkit/org.agent.workspaces.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create, update, destroy, build, start/stop, rerun-init, sync, logs, debug info.
    Manage,
    /// Run commands in a container workspace.
    Exec,
    /// Run commands on the host, or choose host paths.
    ExecHost,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Self::Manage => "org.agent.workspaces.manage",
            Self::Exec => "org.agent.workspaces.exec",
            Self::ExecHost => "org.agent.workspaces.exec-host",
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

#[derive(Clone)]
pub struct Authorizer {
    dbus: DBusProxy<'static>,
    polkit: AuthorityProxy<'static>,
    checks: Arc<Semaphore>,
    uids: Arc<Mutex<HashMap<String, u32>>>,
}

impl Authorizer {
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        Ok(Self {
            dbus: DBusProxy::new(conn).await?,
            polkit: AuthorityProxy::builder(conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?,
            checks: Arc::new(Semaphore::new(MAX_CHECKS)),
            uids: Arc::default(),
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

    /// Allows the call or returns `AccessDenied` / `InteractiveAuthorizationRequired`.
    pub async fn check(
        &self,
        header: &Header<'_>,
        action: Action,
        workspace: &str,
        verb: &str,
    ) -> Result<()> {
        let sender = header
            .sender()
            .ok_or_else(|| Error::AccessDenied("The call has no sender to authorize".into()))?;
        let _turn = match self.remembered(sender) {
            Some(0) => return Ok(()),
            _ => self.checks.acquire().await,
        };
        let uid = self.uid_of(sender).await?;
        if uid == 0 {
            return Ok(());
        }
        let subject = Subject::new_for_message_header(header)
            .map_err(|e| Error::AccessDenied(format!("Cannot identify the caller: {e}")))?;
        let interactive = header
            .primary()
            .flags()
            .contains(Flags::ALLOW_INTERACTIVE_AUTH);
        let flags = if interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
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
        if result.is_authorized {
            Ok(())
        } else if result.is_challenge && !interactive {
            Err(Error::InteractiveAuthorizationRequired(format!(
                "Interactive authentication required to {verb} workspace '{workspace}' ({})",
                action.id()
            )))
        } else {
            Err(Error::AccessDenied(format!(
                "Not authorized to {verb} workspace '{workspace}' ({})",
                action.id()
            )))
        }
    }
}
