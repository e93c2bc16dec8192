//! D-Bus errors. Service errors are named `org.agent.Workspaces.Error.*`; bad arguments and
//! refusals use the standard `org.freedesktop.DBus.Error.*` names clients already handle.

use zbus::message::{Header, Message};
use zbus::names::ErrorName;

use crate::core::Error as CoreError;

pub const PREFIX: &str = "org.agent.Workspaces.Error.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusError {
    name: String,
    message: String,
}

impl BusError {
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            message: message.into(),
        }
    }

    pub fn invalid_args(message: impl Into<String>) -> Self {
        Self::new("org.freedesktop.DBus.Error.InvalidArgs", message)
    }

    pub fn access_denied(message: impl Into<String>) -> Self {
        Self::new("org.freedesktop.DBus.Error.AccessDenied", message)
    }

    pub fn interactive_authorization_required(message: impl Into<String>) -> Self {
        Self::new(
            "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
            message,
        )
    }

    pub fn error_name(&self) -> &str {
        &self.name
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

impl std::error::Error for BusError {}

impl zbus::DBusError for BusError {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name.as_str()).build(&(self.message.as_str(),))
    }

    fn name(&self) -> ErrorName<'_> {
        // Every name this type holds is one of the valid constants above or in `From<CoreError>`.
        ErrorName::try_from(self.name.as_str()).unwrap_or_else(|_| {
            ErrorName::from_static_str_unchecked("org.agent.Workspaces.Error.Internal")
        })
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

impl From<CoreError> for BusError {
    fn from(e: CoreError) -> Self {
        let message = e.to_string();
        let name = match e {
            CoreError::InvalidArgs(_) => return Self::invalid_args(message),
            CoreError::Io(_) => return Self::new("org.freedesktop.DBus.Error.IOError", message),
            CoreError::NoSuchWorkspace(_) => "NoSuchWorkspace",
            CoreError::WorkspaceExists(_) => "WorkspaceExists",
            CoreError::NotReady { .. } => "NotReady",
            CoreError::Busy(_) => "Busy",
            CoreError::LimitsExceeded(_) => "LimitsExceeded",
            CoreError::JobFailed(_) => "JobFailed",
            CoreError::NotSupported(_) => "NotSupported",
            CoreError::Protected(_) => "Protected",
            CoreError::NoSuchSkill(_) => "NoSuchSkill",
            CoreError::NoSuchTool(_) => "NoSuchTool",
            CoreError::NoSuchTemplate(_) => "NoSuchTemplate",
            CoreError::Library(_) => "LibraryError",
        };
        Self::new(format!("{PREFIX}{name}"), message)
    }
}

impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        let boxed = zbus::BoxDBusError::from(e);
        Self::new(
            boxed.name().as_str(),
            boxed.description().unwrap_or_default(),
        )
    }
}

pub type Result<T> = std::result::Result<T, BusError>;

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn core_errors_get_their_own_names() {
        let cases = [
            (
                CoreError::NoSuchWorkspace("x".into()),
                "org.agent.Workspaces.Error.NoSuchWorkspace",
            ),
            (
                CoreError::Protected("host".into()),
                "org.agent.Workspaces.Error.Protected",
            ),
            (
                CoreError::InvalidArgs("bad".into()),
                "org.freedesktop.DBus.Error.InvalidArgs",
            ),
            (
                CoreError::Io("disk".into()),
                "org.freedesktop.DBus.Error.IOError",
            ),
        ];
        for (core, want) in cases {
            let e = BusError::from(core);
            assert_eq!(e.name().as_str(), want);
            assert!(ErrorName::try_from(e.error_name()).is_ok());
        }
        assert_eq!(
            BusError::from(CoreError::NoSuchWorkspace("web".into())).message(),
            "No workspace 'web' known"
        );
    }
}
