//! A workspace's files: what a file call asks (the agent protocol's `FileRequest`, which the
//! core checks and completes) and what comes back. Pure: the work is done by whoever serves
//! the workspace (its container's agent, or the service for a host workspace).

use std::os::fd::OwnedFd;

pub use agent_workspaces_agent::files::{
    Entry, EntryType, FileErrorKind, FileOp, FileRequest, MAX_PATH, flag,
};

use super::error::{Error, Result};

/// One file call: the request, and the caller's descriptor the content comes from (`Write`,
/// `Upload`).
#[derive(Debug)]
pub struct FileCall {
    pub req: FileRequest,
    pub content: Option<OwnedFd>,
}

/// What a file call gives back.
#[derive(Debug)]
pub enum FileOutcome {
    /// Done, with nothing to say.
    Done,
    /// `Stat` (one entry), `ListDirectory` (the entries, and whether more were left out), a
    /// `Write` (the written file).
    Entries {
        entries: Vec<Entry>,
        truncated: bool,
    },
    /// `ReadFile`, `Download`, `Watch`: the caller's end of the pipe the content comes on.
    Stream(OwnedFd),
}

/// A path as a caller gives it (`field` names its key): not empty, no NUL byte, within
/// `MAX_PATH` bytes.
pub fn check_path(field: &str, path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if path.contains('\0') {
        return Err(Error::invalid(field, "must not hold a NUL byte"));
    }
    if path.len() > MAX_PATH {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; at most {MAX_PATH}", path.len()),
        ));
    }
    Ok(())
}

/// `path` made absolute: a relative path is below `base` (the workspace's directory, or
/// `/workspace` in a container).
pub fn absolute(base: &std::path::Path, path: &[u8]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    if path.starts_with(b"/") {
        path.to_vec()
    } else {
        base.join(std::ffi::OsStr::from_bytes(path))
            .as_os_str()
            .as_bytes()
            .to_vec()
    }
}

/// The error a failed file call is, with the workspace's name.
pub fn failure(workspace: &str, kind: FileErrorKind, path: &[u8], message: &str) -> Error {
    let path = String::from_utf8_lossy(path).into_owned();
    // An error number's text, without Rust's "(os error N)".
    let message = message
        .rsplit_once(" (os error ")
        .map_or(message, |(m, _)| m);
    if kind == FileErrorKind::Invalid {
        let field = if path.is_empty() { "user" } else { "path" };
        return Error::invalid(field, format!("{message} (workspace '{workspace}')"));
    }
    let text = if path.is_empty() {
        format!("In workspace '{workspace}': {message}")
    } else {
        format!("'{path}' in workspace '{workspace}': {message}")
    };
    Error::File {
        kind,
        path,
        message: text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_and_made_absolute() {
        assert!(check_path("path", "a/b").is_ok());
        assert_eq!(check_path("path", "").unwrap_err().field(), Some("path"));
        assert_eq!(check_path("to", "a\0b").unwrap_err().field(), Some("to"));
        assert!(check_path("path", &"a".repeat(MAX_PATH + 1)).is_err());
        let base = std::path::Path::new("/workspace");
        assert_eq!(absolute(base, b"src/x"), b"/workspace/src/x");
        assert_eq!(absolute(base, b"/etc/hosts"), b"/etc/hosts");
    }

    #[test]
    fn failures_name_the_path_and_the_workspace() {
        let e = failure(
            "box",
            FileErrorKind::NotFound,
            b"/workspace/x",
            "No such file or directory (os error 2)",
        );
        assert_eq!(
            e.to_string(),
            "'/workspace/x' in workspace 'box': No such file or directory"
        );
        assert_eq!(
            failure(
                "box",
                FileErrorKind::Invalid,
                b"",
                "no user 'x' in /etc/passwd"
            )
            .field(),
            Some("user")
        );
    }
}
