//! The one error type, from the core to the browser: the service returns it, `dbus/error.rs`
//! gives each variant its D-Bus name (and turns a D-Bus error back into it, for the bridge and
//! `workspacectl`), and the bridge gives each its HTTP status. Every variant names what is
//! wrong; there is no catch-all.

use std::sync::Arc;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// A caller-supplied value is wrong. `field` is its key as the caller wrote it (`name`,
    /// `cwd`, `limits.memory_max`), so clients can point at it without reading the prose.
    #[error("{}", invalid_text(field, reason))]
    InvalidArgs { field: String, reason: String },
    #[error("No workspace '{0}' known")]
    NoSuchWorkspace(String),
    #[error("{0}")]
    WorkspaceExists(String),
    #[error("Workspace '{workspace}' is {status}, not ready")]
    NotReady { workspace: String, status: String },
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    LimitsExceeded(String),
    #[error("{0}")]
    JobFailed(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("Workspace '{0}' is the default host workspace and cannot be destroyed")]
    Protected(String),
    #[error("Skill '{0}' is not in the Library")]
    NoSuchSkill(String),
    #[error("Tool '{0}' is not in the Library")]
    NoSuchTool(String),
    #[error("Template '{0}' is not in the Library")]
    NoSuchTemplate(String),
    /// No snapshot of that name: the message names it and its workspace.
    #[error("{0}")]
    NoSuchSnapshot(String),
    /// A snapshot of that name exists already.
    #[error("{0}")]
    SnapshotExists(String),
    /// No such background process (never started, or forgotten): "N in workspace 'NAME'".
    #[error("No process {0}")]
    NoSuchProcess(String),
    /// The Library is unreadable, or holds a malformed file; the message says which.
    #[error("{0}")]
    Library(String),
    /// The service's own files (or a workspace's) could not be read or written: what it was
    /// doing, and the error it got (none when it came over the bus).
    #[error("{what}{}", .source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    Io {
        what: String,
        #[source]
        source: Option<IoError>,
    },
    /// A file call failed: why (`kind`), the path it is about, and the whole message (path,
    /// workspace and cause).
    #[error("{message}")]
    File {
        kind: crate::core::files::FileErrorKind,
        path: String,
        message: String,
    },
    /// polkit refused the caller.
    #[error("{0}")]
    AccessDenied(String),
    /// polkit would ask the caller for a password, but the call does not allow it.
    #[error("{0}")]
    InteractiveAuthorizationRequired(String),
    /// Any other D-Bus error, as a client of the service sees it (the service not running,
    /// say): its name and message.
    #[error("{name}: {message}")]
    Bus { name: String, message: String },
}

/// "Invalid 'FIELD': REASON" (just the reason when a D-Bus error named no field).
fn invalid_text(field: &str, reason: &str) -> String {
    if field.is_empty() {
        reason.to_owned()
    } else {
        format!("Invalid '{field}': {reason}")
    }
}

impl Error {
    /// `InvalidArgs` for the key `field`.
    pub fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::InvalidArgs {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// `Io` with its source.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source: Some(IoError(Arc::new(source))),
        }
    }

    /// `Io` for a failure that has no `std::io::Error` (a task that did not finish, say).
    pub fn io_msg(what: impl Into<String>) -> Self {
        Self::Io {
            what: what.into(),
            source: None,
        }
    }

    /// The key an `InvalidArgs` is about (none when a D-Bus error arrived without it).
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidArgs { field, .. } if !field.is_empty() => Some(field),
            _ => None,
        }
    }
}

/// The `std::io::Error` behind an `Error::Io`, shared so the error stays `Clone`; two are equal
/// when their kind and text are.
#[derive(Debug, Clone)]
pub struct IoError(pub Arc<std::io::Error>);

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl Eq for IoError {}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_key_and_keep_the_source() {
        let e = Error::invalid("limits.memory_max", "must be a number");
        assert_eq!(
            e.to_string(),
            "Invalid 'limits.memory_max': must be a number"
        );
        assert_eq!(e.field(), Some("limits.memory_max"));
        let io = Error::io(
            "Cannot write the record",
            std::io::Error::from_raw_os_error(28),
        );
        assert!(
            io.to_string()
                .starts_with("Cannot write the record: No space left"),
            "{io}"
        );
        let source = std::error::Error::source(&io).expect("the io::Error is kept");
        assert!(source.to_string().contains("No space left"));
        assert_eq!(Error::io_msg("Cannot join").to_string(), "Cannot join");
    }
}
