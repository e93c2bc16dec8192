//! `ps`, `logs` and `kill`: a workspace's background processes (`run --background` starts
//! them).

use std::io::Write;
use std::time::Duration;

use agent_workspaces::dbus::client::LOGIN_SHELL;
use agent_workspaces::dbus::client::interactive::{ProcessProxy, WorkspacesProxy};
use serde_json::json;

/// The service's error, as the service words it.
fn e(e: zbus::Error) -> String {
    agent_workspaces::core::Error::from(e).to_string()
}

async fn process(
    conn: &zbus::Connection,
    m: &WorkspacesProxy<'_>,
    workspace: &str,
    id: &str,
) -> Result<ProcessProxy<'static>, String> {
    let ws = m.get_workspace(workspace).await.map_err(e)?;
    let p = ProcessProxy::builder(conn)
        .path(format!("{}/process/{id}", ws.as_str()))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|_| format!("no process {id} in workspace '{workspace}'"))?;
    // An object that is not there: the process is not known (or was forgotten).
    p.id()
        .await
        .map_err(|_| format!("No process {id} in workspace '{workspace}'"))?;
    Ok(p)
}

pub async fn ps(m: &WorkspacesProxy<'_>, workspace: &str, json_out: bool) -> Result<(), String> {
    let all = m.list_processes(workspace).await.map_err(e)?;
    if json_out {
        let list: Vec<_> = all
            .iter()
            .map(|(id, command, running, exit_code)| {
                json!({"id": id, "command": command, "running": running, "exit_code": exit_code})
            })
            .collect();
        println!("{:#}", json!(list));
        return Ok(());
    }
    println!("{:<6} {:<8} {:<5} COMMAND", "ID", "STATE", "EXIT");
    for (id, command, running, exit_code) in all {
        let (state, exit) = if running {
            ("running", "-".to_owned())
        } else {
            ("ended", exit_code.to_string())
        };
        println!("{id:<6} {state:<8} {exit:<5} {command}");
    }
    Ok(())
}

/// Prints the output from its first kept byte; with `follow`, until the process ends.
pub async fn logs(
    conn: &zbus::Connection,
    m: &WorkspacesProxy<'_>,
    workspace: &str,
    id: &str,
    follow: bool,
) -> Result<(), String> {
    let p = process(conn, m, workspace, id).await?;
    let mut offset = 0;
    let mut out = std::io::stdout().lock();
    loop {
        let (data, next, ended) = p.read_output(offset, 1024 * 1024).await.map_err(e)?;
        out.write_all(&data)
            .and_then(|()| out.flush())
            .map_err(|err| format!("cannot write: {err}"))?;
        let caught_up = next == offset || data.is_empty();
        offset = next;
        if ended || (!follow && caught_up) {
            return Ok(());
        }
        if caught_up {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub async fn kill(
    conn: &zbus::Connection,
    m: &WorkspacesProxy<'_>,
    workspace: &str,
    id: &str,
    signal: i32,
) -> Result<(), String> {
    process(conn, m, workspace, id)
        .await?
        .signal(signal)
        .await
        .map_err(e)
}

/// Puts this terminal in raw mode (every key goes to the workspace's terminal as typed) until
/// dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let ok = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        Self(ok.is_ok().then_some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// This terminal's size, if stdin is one.
fn window_size() -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdin()).ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// An interactive shell (or `command`) on a terminal in the workspace, this terminal attached
/// to it: keys go there as typed, its output comes here, and a change of this terminal's size
/// follows. Ends when the process ends; its exit code.
pub async fn shell(
    conn: &zbus::Connection,
    m: &WorkspacesProxy<'_>,
    workspace: &str,
    command: Option<String>,
    mut options: agent_workspaces::dbus::client::OwnedArgs,
) -> Result<i32, String> {
    use std::io::IsTerminal;
    use zbus::Variant;

    let tty = std::io::stdin().is_terminal();
    let (cols, rows) = window_size().unwrap_or((80, 24));
    options.insert("pty".into(), Variant::from(true));
    options.insert("cols".into(), Variant::from(cols));
    options.insert("rows".into(), Variant::from(rows));
    let command = command.unwrap_or_else(|| LOGIN_SHELL.to_owned());
    let path = m
        .start_process(
            workspace,
            &command,
            agent_workspaces::dbus::client::args(&options),
        )
        .await
        .map_err(e)?;
    let p = ProcessProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|err| err.to_string())?;
    attached(&p, tty).await
}

/// Attaches this terminal to a background process's terminal until the process ends (its exit
/// code) or this command is ended.
pub async fn attach(
    conn: &zbus::Connection,
    m: &WorkspacesProxy<'_>,
    workspace: &str,
    id: &str,
) -> Result<i32, String> {
    use std::io::IsTerminal;
    let p = process(conn, m, workspace, id).await?;
    if !p.pty().await.map_err(e)? {
        return Err(format!(
            "Process {id} has no terminal (start it with run --background --pty)"
        ));
    }
    if let Some((cols, rows)) = window_size() {
        p.resize(cols, rows).await.map_err(e)?;
    }
    attached(&p, std::io::stdin().is_terminal()).await
}

/// Ctrl-]: pressed three times within a second, it detaches (as in `machinectl shell`).
const DETACH_KEY: u8 = 0x1d;

/// This terminal attached to the process's: see `shell`. The exit code once the process has
/// ended; on detach (Ctrl-] three times), 0 and the process goes on.
async fn attached(p: &ProcessProxy<'_>, tty: bool) -> Result<i32, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fd = p.open_pty().await.map_err(e)?;
    let stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
    stream
        .set_nonblocking(true)
        .map_err(|err| err.to_string())?;
    let (mut from_terminal, mut to_terminal) = tokio::net::UnixStream::from_std(stream)
        .map_err(|err| err.to_string())?
        .into_split();
    let raw = tty.then(RawMode::enter);
    if tty {
        eprint!("Attached. Press Ctrl-] three times within 1 s to detach.\r\n");
    }

    // What is typed goes there; at the end of this side's input, the terminal's end-of-file
    // character (the shell then ends as at Ctrl-D). `None`: detach.
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        let mut presses: Vec<std::time::Instant> = Vec::new();
        loop {
            let msg = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = keys_tx.blocking_send(Some(b"\x04".to_vec()));
                    return;
                }
                Ok(n) => {
                    if tty {
                        let now = std::time::Instant::now();
                        for _ in buf[..n].iter().filter(|&&b| b == DETACH_KEY) {
                            presses.push(now);
                        }
                        presses.retain(|t| now.duration_since(*t) < Duration::from_secs(1));
                    }
                    if presses.len() >= 3 {
                        None
                    } else {
                        Some(buf[..n].to_vec())
                    }
                }
            };
            let detach = msg.is_none();
            if keys_tx.blocking_send(msg).is_err() || detach {
                return;
            }
        }
    });
    let typing = async {
        loop {
            match keys.recv().await {
                Some(Some(k)) => {
                    if to_terminal.write_all(&k).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                // Ctrl-] three times.
                Some(None) => return,
                // This side's input ended (typed as Ctrl-D): the output goes on.
                None => std::future::pending::<()>().await,
            }
        }
    };
    let resizing = async {
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return std::future::pending().await;
        };
        while winch.recv().await.is_some() {
            if let Some((cols, rows)) = window_size() {
                let _ = p.resize(cols, rows).await;
            }
        }
        std::future::pending::<()>().await;
    };
    let showing = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_terminal.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // A terminal's output: written as it comes (blocking is fine here).
                    let mut out = std::io::stdout().lock();
                    if out.write_all(&buf[..n]).is_err() || out.flush().is_err() {
                        return;
                    }
                }
            }
        }
    };
    let detached = tokio::select! {
        () = showing => false,
        () = typing => true,
        () = resizing => false,
    };
    drop(raw);
    if detached {
        eprintln!("\r\nDetached; the process goes on (workspacectl attach to come back).");
        return Ok(0);
    }
    // The terminal's output ends when the process has ended.
    let (code, _) = p.wait(60).await.map_err(e)?;
    Ok(code)
}
