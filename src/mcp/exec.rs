//! `exec` through `ExecWithFds`: the command writes into pipes of this server, read as it runs
//! into a head and a tail (`output.rs`), so a command's last lines are there however long its
//! output. The call has a connection of its own (`Bus::lease`): cancelling the tool call closes
//! it, and the service ends the command of a caller that left.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::ToolError;
use super::bus::{Bus, Resolved, manager_on};
use super::output::{Bounded, HeadTail};
use crate::dbus::client::{OwnedArgs, args};

/// How long output may still come after the call has answered (something the command left
/// running may hold the pipes).
const AFTER_ANSWER: Duration = Duration::from_secs(2);
const CHUNK: usize = 64 * 1024;

fn pipe() -> Result<(OwnedFd, OwnedFd), ToolError> {
    crate::dbus::client::pipe().map_err(|e| ToolError::internal(format!("cannot make a pipe: {e}")))
}

/// Reads `fd` into a head and tail of `limit` bytes until its end or `stop` (then `true`: the
/// pipe was still open).
fn reader(
    fd: OwnedFd,
    limit: usize,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<(HeadTail, bool)>, ToolError> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| ToolError::internal(format!("cannot read a pipe: {e}")))?;
    Ok(tokio::spawn(async move {
        let mut kept = HeadTail::new(limit);
        let mut buf = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                r = pipe.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return (kept, false),
                    Ok(n) => kept.push(&buf[..n]),
                },
                () = stop.cancelled() => return (kept, true),
            }
        }
    }))
}

/// What `run` returns: the reply's fields and the two streams.
pub struct Ran {
    pub exit_code: i32,
    pub timed_out: bool,
    pub stdout: Bounded,
    pub stderr: Bounded,
}

impl Ran {
    pub fn json(&self, timeout_secs: u32) -> Value {
        json!({
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "timeout_secs": timeout_secs,
            "stdout": self.stdout.text,
            "stderr": self.stderr.text,
            "stdout_bytes": self.stdout.total_bytes,
            "stderr_bytes": self.stderr.total_bytes,
            "stdout_omitted_bytes": self.stdout.omitted_bytes,
            "stderr_omitted_bytes": self.stderr.omitted_bytes,
        })
    }

    /// The result as a model reads it first.
    pub fn text(&self, timeout_secs: u32) -> String {
        let mut t = if self.timed_out {
            format!(
                "exit_code: {} (timed out: ended after {timeout_secs} s)\n",
                self.exit_code
            )
        } else {
            format!("exit_code: {}\n", self.exit_code)
        };
        for (what, b) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if b.total_bytes > 0 {
                t.push_str(&format!("--- {what} ---\n{}", b.text));
                if !b.text.ends_with('\n') {
                    t.push('\n');
                }
            }
        }
        if self.stdout.total_bytes == 0 && self.stderr.total_bytes == 0 {
            t.push_str("(no output)\n");
        }
        t
    }
}

pub async fn run(
    bus: &Bus,
    ws: &Resolved,
    command: &str,
    mut options: OwnedArgs,
    limit: usize,
    ct: &CancellationToken,
) -> Result<Ran, ToolError> {
    let stdin = options
        .remove("stdin")
        .and_then(|v| Vec::<u8>::try_from(v).ok());
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let in_r = crate::dbus::client::command_input(stdin)
        .map_err(|e| ToolError::internal(format!("the command's input: {e}")))?;
    let stop = CancellationToken::new();
    let _stop_readers = stop.clone().drop_guard();
    let out = reader(out_r, limit, stop.clone())?;
    let err = reader(err_r, limit, stop.clone())?;
    let lease = bus.lease().await.map_err(ToolError::bus)?;
    let call = async {
        let proxy = manager_on(&lease.0).await?;
        let reply = proxy
            .exec_with_fds(
                &ws.id,
                command,
                zbus::Fd::from(in_r.as_fd()),
                zbus::Fd::from(out_w.as_fd()),
                zbus::Fd::from(err_w.as_fd()),
                args(&options),
            )
            .await;
        // The readers see the end once the command, the service and this call closed theirs.
        drop((in_r, out_w, err_w));
        reply
    };
    let reply = tokio::select! {
        r = call => r,
        () = ct.cancelled() => {
            // The service ends the command of a caller that leaves the bus.
            let _ = lease.0.close().await;
            return Err(ToolError::cancelled());
        }
    };
    bus.give_back(lease);
    let (exit_code, timed_out, _) = reply.map_err(ToolError::bus)?;
    // What the pipes still hold comes for a while; then the readers stop where they are.
    let later = stop.clone();
    let deadline = tokio::spawn(async move {
        tokio::time::sleep(AFTER_ANSWER).await;
        later.cancel();
    });
    let (out, err) = (out.await, err.await);
    deadline.abort();
    let finish = |r: Result<(HeadTail, bool), tokio::task::JoinError>, what: &str| {
        let (kept, cut) = r.map_err(|e| ToolError::internal(format!("output reader: {e}")))?;
        let mut b = kept.finish(what);
        if cut {
            b.text.push_str(&format!(
                "\n[{what} was still held open {} s after the command ended, by something it \
                 left running; what came later is not shown: redirect the output of \
                 background commands to a file]\n",
                AFTER_ANSWER.as_secs()
            ));
        }
        Ok::<_, ToolError>(b)
    };
    Ok(Ran {
        exit_code,
        timed_out,
        stdout: finish(out, "stdout")?,
        stderr: finish(err, "stderr")?,
    })
}
