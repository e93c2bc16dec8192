//! The service's errors: each one names what is wrong. The D-Bus and HTTP layers map them to
//! their own names and status codes; there is no catch-all.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// A caller-supplied value is wrong; the message names the key.
    #[error("{0}")]
    InvalidArgs(String),
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
    /// The Library is missing, unreadable, or holds a malformed file; the message says which.
    #[error("{0}")]
    Library(String),
    /// The service's own files could not be read or written.
    #[error("{0}")]
    Io(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
