//! The terminal: `GET /api/workspaces/{id}/terminal` upgrades to a WebSocket carrying a login
//! shell (or `?command=`) on a pseudo-terminal of the workspace: a background process started
//! with `pty` and attached with `OpenPty`. Binary frames carry the terminal's bytes both ways;
//! a text frame `{"cols": C, "rows": R}` resizes it (any other text is typed). When the shell
//! ends, a text frame `{"exit_code": N}` and a normal close; when the client goes first, the
//! shell is hung up (`SIGHUP`), as closing a terminal window does.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dbus::client::{LOGIN_SHELL, ProcessProxy, args};
use crate::dbus::schema;

use super::*;

/// The subprotocol the server selects (a browser offers it beside `bearer.<token in hex>`).
pub const PROTOCOL: &str = "agent-workspaces.terminal";
const SIGHUP: i32 = 1;

#[derive(Deserialize)]
pub(super) struct TerminalQuery {
    cols: Option<u64>,
    rows: Option<u64>,
    command: Option<String>,
}

#[derive(Deserialize)]
struct Size {
    cols: u16,
    rows: u16,
}

pub(super) async fn terminal(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<TerminalQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("this endpoint is a WebSocket ({e})"),
        )
    })?;
    let mut options = Map::new();
    options.insert("pty".into(), Value::Bool(true));
    for (name, value) in [("cols", q.cols), ("rows", q.rows)] {
        if let Some(v) = value {
            options.insert(name.into(), json!(v));
        }
    }
    let options = schema::START_PROCESS.from_json(options)?;
    let command = q.command.unwrap_or_else(|| LOGIN_SHELL.to_owned());
    let path = manager(&state)
        .await?
        .start_process(&id, &command, args(&options))
        .await?;
    let p = ProcessProxy::builder(&state.conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let fd = match p.open_pty().await {
        Ok(fd) => fd,
        Err(e) => {
            let _ = p.signal(SIGHUP).await;
            return Err(e.into());
        }
    };
    let hangup = p.clone();
    Ok(upgrade
        .protocols([PROTOCOL])
        .on_failed_upgrade(move |_| {
            tokio::spawn(async move {
                let _ = hangup.signal(SIGHUP).await;
            });
        })
        .on_upgrade(move |socket| session(socket, p, fd)))
}

/// The WebSocket and the terminal, joined until one of them ends.
async fn session(socket: WebSocket, p: ProcessProxy<'static>, fd: zbus::OwnedFd) {
    let stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream));
    let Ok(stream) = stream else {
        let _ = p.signal(SIGHUP).await;
        return;
    };
    let (mut from_pty, mut to_pty) = stream.into_split();
    let (mut sink, mut source) = socket.split();
    let ended = {
        let to_client = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match from_pty.read(&mut buf).await {
                    // The process has ended and all it wrote is sent.
                    Ok(0) | Err(_) => return true,
                    Ok(n) => {
                        let frame = Message::Binary(buf[..n].to_vec().into());
                        if sink.send(frame).await.is_err() {
                            return false;
                        }
                    }
                }
            }
        };
        let from_client = async {
            while let Some(Ok(msg)) = source.next().await {
                let typed = match msg {
                    Message::Binary(b) => b.to_vec(),
                    Message::Text(t) => match serde_json::from_str::<Size>(t.as_str()) {
                        Ok(size) => {
                            let _ = p.resize(size.cols, size.rows).await;
                            continue;
                        }
                        Err(_) => t.as_str().as_bytes().to_vec(),
                    },
                    Message::Close(_) => break,
                    _ => continue,
                };
                if to_pty.write_all(&typed).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            ended = to_client => ended,
            () = from_client => false,
        }
    };
    if ended {
        let (code, _) = p.wait(10).await.unwrap_or((-1, true));
        let exit = json!({ "exit_code": code }).to_string();
        let _ = sink.send(Message::Text(exit.into())).await;
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "".into(),
            })))
            .await;
    } else {
        // The client went away first: hang the terminal up.
        let _ = p.signal(SIGHUP).await;
    }
}
