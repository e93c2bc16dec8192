//! Authorization with polkit. The subject is always the caller (its bus name), never this
//! service. Callers with uid 0 are allowed without asking polkit, as systemd does for privileged
//! callers; everyone else is asked, with details `workspace` and `verb`.

use std::collections::HashMap;

use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus::message::{Flags, Header};
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use super::error::{BusError, Result};

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

#[derive(Clone)]
pub struct Authorizer {
    dbus: DBusProxy<'static>,
    polkit: AuthorityProxy<'static>,
}

impl Authorizer {
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        Ok(Self {
            dbus: DBusProxy::new(conn).await?,
            polkit: AuthorityProxy::builder(conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?,
        })
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
            .ok_or_else(|| BusError::access_denied("The call has no sender to authorize"))?;
        let uid = self
            .dbus
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| BusError::access_denied(format!("Cannot identify the caller: {e}")))?;
        if uid == 0 {
            return Ok(());
        }
        let subject = Subject::new_for_message_header(header)
            .map_err(|e| BusError::access_denied(format!("Cannot identify the caller: {e}")))?;
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
                BusError::access_denied(format!(
                    "Cannot {verb} workspace '{workspace}': the authorization check failed: {e}"
                ))
            })?;
        if result.is_authorized {
            Ok(())
        } else if result.is_challenge && !interactive {
            Err(BusError::interactive_authorization_required(format!(
                "Interactive authentication required to {verb} workspace '{workspace}' ({})",
                action.id()
            )))
        } else {
            Err(BusError::access_denied(format!(
                "Not authorized to {verb} workspace '{workspace}' ({})",
                action.id()
            )))
        }
    }
}
