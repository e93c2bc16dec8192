//! A file call served through an agent connection: a container's agent (inside it, in its own
//! view of the tree), or, for a host workspace, the service's own file thread, connected to the
//! service as an agent would be (`local`): one code path for both, the agent crate's
//! `fileserve`.
//!
//! Content never crosses the boundary on a caller's descriptor: what streams out goes into a
//! pipe the service made, whose read end is the caller's (the service copies nothing); what
//! streams in is copied by the service from the caller's descriptor into a pipe the agent
//! reads (`relay::inflow`), and the agent is told whether it came whole before it puts anything
//! in place. Every wait on the agent has an end.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_workspaces_agent::files::{ABORT, COMMIT, FileOp, FileReply};
use tokio_util::sync::CancellationToken;

use super::agent::AgentConnection;
use super::pipes::content_pipe;
use super::relay::inflow;
use crate::core::files::{FileCall, FileOutcome, failure};
use crate::core::{Error, Result};

/// How long an agent may take to answer a file request (a removal of a large tree, a listing
/// of a deep one take the longest).
const ANSWER: Duration = Duration::from_secs(600);
/// How long the content of a write may stand still before the write is given up.
const STALL: Duration = agent_workspaces_agent::fileserve::io::STALL;

/// Serves `call` through `conn`, for the workspace named `workspace`.
pub async fn call(
    mut conn: AgentConnection,
    call: FileCall,
    workspace: &str,
    cancel: &CancellationToken,
) -> Result<FileOutcome> {
    let FileCall { req, content } = call;
    let lost = |e: std::io::Error| {
        Error::JobFailed(format!(
            "The agent of workspace '{workspace}' did not answer a file request: {e}"
        ))
    };
    let answer = |reply: Option<FileReply>| match reply {
        Some(FileReply::Failed {
            kind,
            path,
            message,
        }) => Err(failure(workspace, kind, &path, &message)),
        Some(FileReply::Done { entries, truncated }) => Ok((entries, truncated)),
        None => Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
    };
    let cancelled = || {
        Error::JobFailed(format!(
            "The file request in workspace '{workspace}' was cancelled: the caller disconnected"
        ))
    };
    if req.op.streams_out() {
        let (read, write) = content_pipe().map_err(|e| Error::io("Cannot make a pipe", e))?;
        let reply = tokio::select! {
            r = conn.file_request(&req, Some(write.as_fd()), ANSWER) => r.map_err(lost)?,
            () = cancel.cancelled() => return Err(cancelled()),
        };
        drop(write);
        answer(reply)?;
        return Ok(FileOutcome::Stream(read));
    }
    if req.op.streams_in() {
        let content = content
            .ok_or_else(|| Error::invalid("content", "a descriptor to read the content from"))?;
        let (read, relay) =
            inflow(content).map_err(|e| Error::io("Cannot relay the content", e))?;
        let reply = tokio::select! {
            r = conn.file_request(&req, Some(read.as_fd()), ANSWER) => r.map_err(lost)?,
            () = cancel.cancelled() => return Err(cancelled()),
        };
        drop(read);
        // A refusal stops the relay (dropped with it).
        answer(reply)?;
        let whole = relay.finish(cancel, STALL).await;
        // The agent reads to the pipe's end, then this: it acts on it before it answers. (An
        // agent that failed first may have answered and gone: its answer is read all the same.)
        let told = conn.control(&[if whole { COMMIT } else { ABORT }]).await;
        let reply = conn.file_reply(ANSWER).await;
        let (entries, truncated) = match (told, reply) {
            (_, Ok(Some(r))) => answer(Some(r))?,
            (Err(e), _) => return Err(lost(e)),
            (Ok(()), r) => answer(r.map_err(lost)?)?,
        };
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        return Ok(FileOutcome::Entries { entries, truncated });
    }
    let reply = tokio::select! {
        r = conn.file_request(&req, None, ANSWER) => r.map_err(lost)?,
        () = cancel.cancelled() => return Err(cancelled()),
    };
    // Answered: the agent waits for the next request on this connection.
    conn.recycle();
    let (entries, truncated) = answer(reply)?;
    Ok(match req.op {
        FileOp::Stat | FileOp::List => FileOutcome::Entries { entries, truncated },
        _ => FileOutcome::Done,
    })
}

/// Watches of host workspaces at once, at most: each holds a thread and an inotify instance
/// of the service (root's instances are shared with the rest of the host).
const MAX_HOST_WATCHES: usize = 64;
static HOST_WATCHES: AtomicUsize = AtomicUsize::new(0);

/// The service's own file thread for one call on a host workspace, and the connection to it
/// (it serves as the agent does, with the service's credentials: a host workspace has the
/// host's files).
pub fn local(op: FileOp) -> Result<AgentConnection> {
    let watch = op == FileOp::Watch;
    if watch && HOST_WATCHES.fetch_add(1, Ordering::SeqCst) >= MAX_HOST_WATCHES {
        HOST_WATCHES.fetch_sub(1, Ordering::SeqCst);
        return Err(Error::LimitsExceeded(format!(
            "Too many watches of host workspaces: {MAX_HOST_WATCHES} at once at most"
        )));
    }
    let started = (|| {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let conn = AgentConnection::from_fd(OwnedFd::from(ours))?;
        std::thread::Builder::new()
            .name("files".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                agent_workspaces_agent::fileserve::serve_connection(theirs);
                if watch {
                    HOST_WATCHES.fetch_sub(1, Ordering::SeqCst);
                }
            })?;
        Ok::<_, std::io::Error>(conn)
    })();
    started.map_err(|e| {
        // No thread started: it counts no watch.
        if watch {
            HOST_WATCHES.fetch_sub(1, Ordering::SeqCst);
        }
        Error::io("Cannot start a thread for a file call", e)
    })
}
