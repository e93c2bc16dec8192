//! `ps`, `logs` and `kill`: a workspace's background processes (`run --background` starts
//! them).

use std::io::Write;
use std::time::Duration;

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
