//! A workspace's files on the bus (on the manager, the workspace first, and on each workspace
//! object): `ReadFile`, `WriteFile`, `ListDirectory`, `StatFile`, `MakeDirectory`,
//! `RemoveFile`, `MoveFile`, `Download`, `Upload`, `WatchFiles`.
//!
//! Authorization: reading a container's files (read, list, stat, download, watch) is an action
//! of its own (`read-files`); changing them is as much as running a command there (`exec`: a
//! written `.bashrc` runs); every file call on a host workspace is `exec-host` (its paths may
//! be any of the host's, read and written as root).

use tokio_util::sync::CancellationToken;
use zbus::message::Header;

use super::args::{self, Dict};
use super::auth::Action;
use super::context::Context;
use super::error::{Error, Result};
use crate::core::files::{Entry, FileCall, FileOp, FileOutcome};
use crate::core::workspace::WorkspaceType;

/// `(name, type, size, mode, uid, gid, mtime_usec, target)`: one entry of `ListDirectory`, and
/// `StatFile`'s answer. `type` is `file`, `dir`, `symlink` or `other`; `target` a link's.
pub type EntryTuple = (String, String, u64, u32, u32, u32, i64, String);

pub fn entry_tuple(e: Entry) -> EntryTuple {
    (
        String::from_utf8_lossy(&e.name).into_owned(),
        e.kind.as_str().to_owned(),
        e.size,
        e.mode,
        e.uid,
        e.gid,
        e.mtime_usec,
        String::from_utf8_lossy(&e.target).into_owned(),
    )
}

impl Context {
    /// Checks the arguments, authorizes the call as reading or changing the workspace's
    /// files, and serves it.
    async fn file_call(
        &self,
        header: &Header<'_>,
        key: &str,
        op: FileOp,
        (path, target): (&str, Option<&str>),
        content: Option<zbus::OwnedFd>,
        options: Dict,
    ) -> Result<FileOutcome> {
        let req = args::file_request(op, path, target, options)?;
        let ws = self.manager.get(key)?;
        let reads = matches!(
            op,
            FileOp::Read | FileOp::List | FileOp::Stat | FileOp::Download | FileOp::Watch
        );
        let (action, verb) = match (ws.workspace_type, reads) {
            (WorkspaceType::Host, true) => (Action::ExecHost, "read the files of"),
            (WorkspaceType::Host, false) => (Action::ExecHost, "change the files of"),
            (WorkspaceType::Container, true) => (Action::ReadFiles, "read the files of"),
            (WorkspaceType::Container, false) => (Action::Exec, "change the files of"),
        };
        self.auth.check(header, action, &ws.name, verb).await?;
        let gone = match header.sender() {
            Some(sender) => self.disconnects.token_for(sender.as_str()),
            None => CancellationToken::new(),
        };
        let call = FileCall {
            req,
            content: content.map(Into::into),
        };
        self.manager.files(&ws.id, call, gone).await
    }

    /// `ReadFile`, `Download`, `WatchFiles`: the caller's end of the pipe the content comes
    /// on.
    pub async fn stream_out(
        &self,
        header: &Header<'_>,
        key: &str,
        op: FileOp,
        path: &str,
        options: Dict,
    ) -> Result<zbus::OwnedFd> {
        match self
            .file_call(header, key, op, (path, None), None, options)
            .await?
        {
            FileOutcome::Stream(fd) => Ok(zbus::OwnedFd::from(fd)),
            _ => Err(unexpected()),
        }
    }

    /// `WriteFile`, `Upload`: the content from the caller's descriptor.
    pub async fn content_in(
        &self,
        header: &Header<'_>,
        key: &str,
        op: FileOp,
        (path, content): (&str, zbus::OwnedFd),
        options: Dict,
    ) -> Result<()> {
        self.file_call(header, key, op, (path, None), Some(content), options)
            .await
            .map(drop)
    }

    pub async fn list_directory(
        &self,
        header: &Header<'_>,
        key: &str,
        path: &str,
        options: Dict,
    ) -> Result<(Vec<EntryTuple>, bool)> {
        match self
            .file_call(header, key, FileOp::List, (path, None), None, options)
            .await?
        {
            FileOutcome::Entries { entries, truncated } => {
                Ok((entries.into_iter().map(entry_tuple).collect(), truncated))
            }
            _ => Err(unexpected()),
        }
    }

    pub async fn stat_file(
        &self,
        header: &Header<'_>,
        key: &str,
        path: &str,
        options: Dict,
    ) -> Result<EntryTuple> {
        match self
            .file_call(header, key, FileOp::Stat, (path, None), None, options)
            .await?
        {
            FileOutcome::Entries { entries, .. } => entries
                .into_iter()
                .next()
                .map(entry_tuple)
                .ok_or_else(unexpected),
            _ => Err(unexpected()),
        }
    }

    /// `MakeDirectory`, `RemoveFile`, `MoveFile` (`target`): done, or why not.
    pub async fn change_files(
        &self,
        header: &Header<'_>,
        key: &str,
        op: FileOp,
        paths: (&str, Option<&str>),
        options: Dict,
    ) -> Result<()> {
        self.file_call(header, key, op, paths, None, options)
            .await
            .map(drop)
    }
}

fn unexpected() -> Error {
    Error::io_msg("The file call gave an answer of the wrong kind")
}
