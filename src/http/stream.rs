//! Streaming exec: `POST /api/workspaces/{id}/exec` with `Accept: text/event-stream`.
//!
//! The bridge makes pipes, hands their write ends to the service with `ExecWithFds` (the
//! command writes into them directly), and turns what it reads into server-sent events as
//! the command produces it:
//!
//! - `event: stdout` / `event: stderr`, `data:` the text as a JSON string;
//! - `event: exit`, `data: {"exit_code": N, "timed_out": B}`, last;
//! - `event: error`, `data: {"error": {"code", "message"}}`, last, when the call failed after
//!   the stream began.
//!
//! Errors found before the command starts (400, 403, 404, 409) are plain HTTP errors: the
//! response waits up to [`VERDICT_WAIT`] for the call's verdict or the first output.
//!
//! Each streaming exec has its own bus connection, owned by the response stream. When the
//! client goes away the stream is dropped, the connection closes, and the service ends the
//! command, as for any caller that leaves the bus. A client that reads slowly fills a small
//! queue, then the pipe, and then the command blocks on write: the bridge holds at most
//! [`QUEUE`] chunks per stream, and the command's timeout still applies.
//!
//! The stream's end is the command's, not the pipes': once the call has answered, what the
//! pipes still hold is sent for at most [`AFTER_ANSWER`], then `exit` follows and the pipes are
//! let go (something that outlived the command and kept them gets `EPIPE`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use zbus::Variant;

use super::{ApiError, ApiResult, AppState};
use crate::dbus::client::args;
use crate::dbus::client::{ExecFdsReply, command_input, connect, pipe};

/// How long the response waits for the call's verdict before it commits to a stream.
pub const VERDICT_WAIT: Duration = Duration::from_millis(250);
/// Largest chunk read from a pipe at once.
const CHUNK: usize = 16 * 1024;
/// Chunks held for a client that has not read them yet.
pub const QUEUE: usize = 8;
/// How long output may still come after the call has answered (the service has drained a
/// container command's output already; a host command's pipes are the command's own).
pub const AFTER_ANSWER: Duration = Duration::from_secs(2);

/// The running `ExecWithFds` call; dropping it (the client left) ends the call and closes its
/// bus connection.
struct Call(JoinHandle<zbus::Result<ExecFdsReply>>);

impl Drop for Call {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn joined(
    r: Result<zbus::Result<ExecFdsReply>, tokio::task::JoinError>,
) -> zbus::Result<ExecFdsReply> {
    r.unwrap_or_else(|e| Err(zbus::Error::Failure(format!("the exec task ended: {e}"))))
}

enum Verdict {
    Pending(Call),
    Known(zbus::Result<ExecFdsReply>),
}

impl Verdict {
    async fn get(self) -> zbus::Result<ExecFdsReply> {
        match self {
            Verdict::Known(r) => r,
            Verdict::Pending(mut call) => joined((&mut call.0).await),
        }
    }
}

fn internal(e: std::io::Error) -> ApiError {
    warn!("Cannot set up the pipes of a streaming exec: {e}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the bridge's journal",
    )
}

pub(super) async fn exec(
    state: Arc<AppState>,
    id: String,
    command: String,
    options: HashMap<String, Variant<'static>>,
    stdin: Option<Vec<u8>>,
) -> ApiResult<Response> {
    let (out_r, out_w) = pipe().map_err(internal)?;
    let (err_r, err_w) = pipe().map_err(internal)?;
    let in_r: OwnedFd = command_input(stdin).map_err(internal)?;
    let conn = connect(state.bus_address.as_deref()).await?;
    let mut call = Call(tokio::spawn(async move {
        let proxy = super::manager_on(&conn).await?;
        let reply = proxy
            .exec_with_fds(
                &id,
                &command,
                zbus::Fd::from(in_r.as_fd()),
                zbus::Fd::from(out_w.as_fd()),
                zbus::Fd::from(err_w.as_fd()),
                args(&options),
            )
            .await;
        // Only now may the pipes end: the readers see end of file once the command, the
        // service and this task have all closed their ends.
        drop((in_r, out_w, err_w));
        reply
    }));
    let (tx, mut rx) = mpsc::channel(QUEUE);
    // Dropped with the stream: the forwarding ends, whatever holds the pipes.
    let stop = CancellationToken::new();
    tokio::spawn(forward(out_r, "stdout", tx.clone(), stop.clone()));
    tokio::spawn(forward(err_r, "stderr", tx, stop.clone()));

    enum Early {
        Done(zbus::Result<ExecFdsReply>),
        Output(Option<Event>),
        Waited,
    }
    let early = tokio::select! {
        biased;
        r = &mut call.0 => Early::Done(joined(r)),
        ev = rx.recv() => Early::Output(ev),
        () = tokio::time::sleep(VERDICT_WAIT) => Early::Waited,
    };
    let (first, verdict) = match early {
        Early::Done(Err(e)) => match rx.try_recv() {
            Ok(ev) => (Some(ev), Verdict::Known(Err(e))),
            // Refused before the command produced anything: a plain HTTP error.
            Err(_) => return Err(e.into()),
        },
        Early::Done(ok) => (None, Verdict::Known(ok)),
        Early::Output(ev) => (ev, Verdict::Pending(call)),
        Early::Waited => (None, Verdict::Pending(call)),
    };

    struct Stream {
        first: Option<Event>,
        rx: Option<mpsc::Receiver<Event>>,
        verdict: Option<Verdict>,
        /// Once the call has answered: until when output may still come.
        until: Option<tokio::time::Instant>,
        _stop: tokio_util::sync::DropGuard,
    }
    let start = Stream {
        first,
        rx: Some(rx),
        verdict: Some(verdict),
        until: None,
        _stop: stop.drop_guard(),
    };
    let events = futures_util::stream::unfold(start, |mut st| async move {
        if let Some(ev) = st.first.take() {
            return Some((Ok::<_, Infallible>(ev), st));
        }
        while let Some(rx) = &mut st.rx {
            let next = match (&mut st.verdict, st.until) {
                (Some(Verdict::Pending(call)), _) => tokio::select! {
                    ev = rx.recv() => ev,
                    r = &mut call.0 => {
                        st.verdict = Some(Verdict::Known(joined(r)));
                        continue;
                    }
                },
                (_, None) => {
                    st.until = Some(tokio::time::Instant::now() + AFTER_ANSWER);
                    continue;
                }
                // (Looked at before each event: output that keeps coming does not hold it off.)
                (_, Some(until)) if tokio::time::Instant::now() >= until => None,
                (_, Some(until)) => tokio::time::timeout_at(until, rx.recv())
                    .await
                    .unwrap_or(None),
            };
            match next {
                Some(ev) => return Some((Ok(ev), st)),
                None => st.rx = None,
            }
        }
        let last = match st.verdict.take()?.get().await {
            Ok((exit_code, timed_out, _)) => Event::default()
                .event("exit")
                .data(json!({"exit_code": exit_code, "timed_out": timed_out}).to_string()),
            Err(e) => {
                let e = ApiError::from(e);
                Event::default()
                    .event("error")
                    .data(json!({"error": {"code": e.code, "message": e.message}}).to_string())
            }
        };
        Some((Ok(last), st))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Reads one pipe to its end (or until `stop`), sending its text as events named `name`.
async fn forward(
    fd: OwnedFd,
    name: &'static str,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(p) => p,
        Err(e) => {
            warn!("Cannot read the {name} pipe of a streaming exec: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; CHUNK];
    let mut pending = Vec::new();
    loop {
        let n = tokio::select! {
            n = pipe.read(&mut buf) => n.unwrap_or(0),
            () = stop.cancelled() => return,
        };
        let text = if n == 0 {
            String::from_utf8_lossy(&std::mem::take(&mut pending)).into_owned()
        } else {
            pending.extend_from_slice(&buf[..n]);
            take_text(&mut pending)
        };
        if !text.is_empty() {
            let ev = Event::default()
                .event(name)
                .data(serde_json::Value::String(text).to_string());
            // The client left: stop reading, so the command sees a closed pipe.
            let sent = tokio::select! {
                r = tx.send(ev) => r.is_ok(),
                () = stop.cancelled() => false,
            };
            if !sent {
                return;
            }
        }
        if n == 0 {
            return;
        }
    }
}

/// The text in `pending`, invalid sequences replaced; an incomplete sequence at the end stays
/// in `pending` for the next read, so a character split between two reads arrives whole.
fn take_text(pending: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = pending;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[n..];
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    *pending = rest.to_vec();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_between_reads_arrive_whole() {
        let snow = "a☃b".as_bytes();
        let mut pending = snow[..2].to_vec(); // 'a' and the first byte of '☃'
        assert_eq!(take_text(&mut pending), "a");
        assert_eq!(pending.len(), 1);
        pending.extend_from_slice(&snow[2..]);
        assert_eq!(take_text(&mut pending), "☃b");
        assert!(pending.is_empty());
    }

    #[test]
    fn invalid_bytes_are_replaced_not_held() {
        let mut pending = b"x\xffy\xe2".to_vec();
        assert_eq!(take_text(&mut pending), "x\u{fffd}y");
        assert_eq!(pending, b"\xe2");
    }
}
