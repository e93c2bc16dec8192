//! The tool calls on files and background processes.

use std::os::fd::AsFd;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use zbus::Variant;

use super::bus::Resolved;
use super::calls::Call;
use super::{Done, ToolError};
use crate::dbus::client::{OwnedArgs, ProcessProxy, args, entry_json};

/// The longest `wait_secs` of `read_process_output`.
const MAX_WAIT_SECS: u32 = 60;

pub async fn run(call: &mut Call<'_>, tool: &'static str) -> Result<Done, ToolError> {
    let ws = call.workspace_arg().await?;
    let m = call.shared.bus.manager().await.map_err(ToolError::bus)?;
    match tool {
        "start_process" => {
            let command = call.take_str("command")?;
            let options = call.options(tool)?;
            let path = m
                .start_process(&ws.id, &command, args(&options))
                .await
                .map_err(ToolError::bus)?;
            let id = path.as_str().rsplit('/').next().unwrap_or_default();
            Ok(Done::json(
                json!({"workspace": ws.name, "process": id, "command": command}),
            ))
        }
        "list_processes" => {
            let all = m.list_processes(&ws.id).await.map_err(ToolError::bus)?;
            let list: Vec<Value> = all
                .into_iter()
                .map(|(id, command, running, exit_code)| {
                    let mut p = json!({"process": id, "command": command, "running": running});
                    if !running {
                        p["exit_code"] = json!(exit_code);
                    }
                    p
                })
                .collect();
            Ok(Done::json(json!({"workspace": ws.name, "processes": list})))
        }
        "read_process_output" => read_output(call, &ws).await,
        "write_process_input" => {
            let p = process(call, &ws).await?;
            let input = call.take_str("input")?;
            p.write_input(input.as_bytes())
                .await
                .map_err(ToolError::bus)?;
            Ok(Done::json(json!({"written_bytes": input.len()})))
        }
        "signal_process" => {
            let p = process(call, &ws).await?;
            let name = call
                .take_opt_str("signal")?
                .unwrap_or_else(|| "TERM".into());
            let number = signal_number(&name)?;
            p.signal(number).await.map_err(ToolError::bus)?;
            Ok(Done::json(json!({"signal": name, "number": number})))
        }
        "read_file" => read_file(call, &ws).await,
        "write_file" => write_file(call, &ws).await,
        "list_directory" => {
            let path = call.take_str("path")?;
            let options = call.options(tool)?;
            let (entries, truncated) = m
                .list_directory(&ws.id, &path, args(&options))
                .await
                .map_err(ToolError::bus)?;
            let entries: Vec<Value> = entries.iter().map(entry_json).collect();
            Ok(Done::json(
                json!({"path": path, "entries": entries, "truncated": truncated}),
            ))
        }
        "stat_file" => {
            let path = call.take_str("path")?;
            let options = call.options(tool)?;
            let entry = m
                .stat_file(&ws.id, &path, args(&options))
                .await
                .map_err(ToolError::bus)?;
            Ok(Done::json(entry_json(&entry)))
        }
        "make_directory" | "remove_file" => {
            let path = call.take_str("path")?;
            let options = call.options(tool)?;
            if tool == "make_directory" {
                m.make_directory(&ws.id, &path, args(&options)).await
            } else {
                m.remove_file(&ws.id, &path, args(&options)).await
            }
            .map_err(ToolError::bus)?;
            Ok(Done::json(json!({"path": path})))
        }
        "move_file" => {
            let from = call.take_str("from")?;
            let to = call.take_str("to")?;
            let options = call.options(tool)?;
            m.move_file(&ws.id, &from, &to, args(&options))
                .await
                .map_err(ToolError::bus)?;
            Ok(Done::json(json!({"from": from, "to": to})))
        }
        "copy_files" => copy(call, &ws).await,
        "watch_files" => watch(call, &ws).await,
        other => Err(ToolError::internal(format!("no call for tool '{other}'"))),
    }
}

/// The process the `process` argument names, checked to exist.
async fn process(call: &mut Call<'_>, ws: &Resolved) -> Result<ProcessProxy<'static>, ToolError> {
    let n = call.take_str("process")?;
    if n.is_empty() || n.len() > 10 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ToolError::invalid(
            "process: must be a process id (a number) as start_process gave it",
        ));
    }
    let p = ProcessProxy::builder(call.shared.bus.shared())
        .path(format!("{}/process/{n}", ws.path.as_str()))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(ToolError::bus)?;
    if let Err(e) = p.id().await {
        let e = ToolError::bus(e);
        // An object that is not there answers UnknownObject (or knows no such method).
        if !matches!(
            e.code.as_str(),
            "UnknownObject" | "UnknownMethod" | "UnknownInterface" | "UnknownProperty"
        ) {
            return Err(e);
        }
        return Err(ToolError {
            code: "NoSuchProcess".into(),
            ..ToolError::invalid(format!(
                "workspace '{}' has no process {n} (list_processes lists them)",
                ws.name
            ))
        });
    }
    Ok(p)
}

fn signal_number(name: &str) -> Result<i32, ToolError> {
    if let Ok(n) = name.parse::<i32>() {
        return Ok(n);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| ToolError::invalid(format!("signal: '{name}' is not a signal name")))
}

async fn read_output(call: &mut Call<'_>, ws: &Resolved) -> Result<Done, ToolError> {
    let p = process(call, ws).await?;
    let offset = call.take_u64("offset")?.unwrap_or(0);
    let wait = call.take_u32("wait_secs")?.unwrap_or(0).min(MAX_WAIT_SECS);
    let limit = call.output_limit()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.into());
    let ct = call.context.ct.clone();
    let max = u32::try_from(limit).unwrap_or(u32::MAX);
    loop {
        let (data, next, ended) = p.read_output(offset, max).await.map_err(ToolError::bus)?;
        // A character cut at the end is left for the next read (the output goes on).
        let kept = whole_characters(&data, !ended).len();
        let (data, next) = (&data[..kept], next - (data.len() - kept) as u64);
        if !data.is_empty() || ended || tokio::time::Instant::now() >= deadline {
            let running = p.running().await.unwrap_or(false);
            let mut v = json!({
                "output": String::from_utf8_lossy(data),
                "next_offset": next,
                "running": running,
                "ended": ended,
            });
            if !running {
                v["exit_code"] = json!(p.exit_code().await.unwrap_or(-1));
            }
            if next > offset + data.len() as u64 {
                v["skipped_bytes"] = json!(next - offset - data.len() as u64);
            }
            return Ok(Done::json(v));
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = ct.cancelled() => return Err(ToolError::cancelled()),
        }
    }
}

async fn read_file(call: &mut Call<'_>, ws: &Resolved) -> Result<Done, ToolError> {
    let path = call.take_str("path")?;
    let limit = call.output_limit()?;
    let mut options = call.options("read_file")?;
    let offset = options
        .get("offset")
        .and_then(|v| u64::try_from(v.try_clone().ok()?).ok())
        .unwrap_or(0);
    let asked = options
        .get("length")
        .and_then(|v| u64::try_from(v.try_clone().ok()?).ok());
    // The page: what was asked, within the bound; one byte more says whether the file goes on.
    let page = asked.unwrap_or(u64::MAX).min(limit as u64) as usize;
    let length = page as u64 + 1;
    options.insert("length".into(), Variant::from(length));
    let lease = call.shared.bus.lease().await.map_err(ToolError::bus)?;
    let read = async {
        let m = super::bus::manager_on(&lease.0)
            .await
            .map_err(ToolError::bus)?;
        let fd = m
            .read_file(&ws.id, &path, args(&options))
            .await
            .map_err(ToolError::bus)?;
        let mut pipe =
            tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(fd))
                .map_err(|e| ToolError::internal(format!("cannot read the file's pipe: {e}")))?;
        let mut data = Vec::new();
        (&mut pipe)
            .take(length)
            .read_to_end(&mut data)
            .await
            .map_err(|e| ToolError::internal(format!("reading the file: {e}")))?;
        Ok::<_, ToolError>(data)
    };
    // What serves the file (a container's agent) may hold the pipe open and send nothing:
    // the read has the caller's longest timeout, then the call is given up.
    let patience = Duration::from_secs(call.policy.max_timeout_secs.into());
    let data = tokio::select! {
        r = read => r?,
        () = call.context.ct.cancelled() => {
            let _ = lease.0.close().await;
            return Err(ToolError::cancelled());
        }
        () = tokio::time::sleep(patience) => {
            let _ = lease.0.close().await;
            return Err(ToolError {
                code: "TimedOut".into(),
                ..ToolError::internal(format!(
                    "{path}: its content did not come within {} s",
                    patience.as_secs()
                ))
            });
        }
    };
    call.shared.bus.give_back(lease);
    let more = data.len() > page;
    let shown = whole_characters(&data[..data.len().min(page)], more);
    let text = String::from_utf8_lossy(shown).into_owned();
    let next = offset + shown.len() as u64;
    let mut v = json!({
        "path": path,
        "offset": offset,
        "bytes": shown.len(),
        "content": text,
        "more": more,
    });
    let mut note = String::new();
    if more {
        v["next_offset"] = json!(next);
        note = format!("\n[... the file goes on: read on with offset {next} ...]");
    }
    if std::str::from_utf8(shown).is_err() {
        v["replaced_invalid_utf8"] = json!(true);
        note.push_str("\n[the file is not valid UTF-8 text: bytes that are not were replaced]");
    }
    Ok(Done {
        text: Some(format!("{text}{note}")),
        value: v,
    })
}

/// `data` without a character cut at its end when more follows (the next read starts with
/// it); bytes that are no UTF-8 anyway are kept as they are.
fn whole_characters(data: &[u8], more: bool) -> &[u8] {
    match std::str::from_utf8(data) {
        Err(e) if more && e.error_len().is_none() && e.valid_up_to() > 0 => {
            &data[..e.valid_up_to()]
        }
        _ => data,
    }
}

async fn write_file(call: &mut Call<'_>, ws: &Resolved) -> Result<Done, ToolError> {
    let path = call.take_str("path")?;
    let content = call.take_str("content")?;
    let mut options = call.options("write_file")?;
    options.insert("size".into(), Variant::from(content.len() as u64));
    let n = content.len();
    // Fed by a task of its own until the service has read it all (or stops reading).
    let r = crate::dbus::client::command_input(Some(content.into_bytes()))
        .map_err(|e| ToolError::internal(format!("the content's pipe: {e}")))?;
    let m = call.shared.bus.manager().await.map_err(ToolError::bus)?;
    let done = m
        .write_file(&ws.id, &path, zbus::Fd::from(r.as_fd()), args(&options))
        .await;
    drop(r);
    done.map_err(ToolError::bus)?;
    Ok(Done::json(json!({"path": path, "written_bytes": n})))
}

/// Download from one workspace straight into Upload of another: the archive's pipe passes
/// through this server untouched.
async fn copy(call: &mut Call<'_>, from: &Resolved) -> Result<Done, ToolError> {
    let path = call.take_str("path")?;
    let to_key = call.take_str("to_workspace")?;
    let to_path = call.take_str("to_path")?;
    let to = call
        .shared
        .bus
        .resolve(&to_key)
        .await
        .map_err(ToolError::bus)?;
    call.policy
        .check_workspace(&to.name, &to.workspace_type)
        .map_err(ToolError::refused)?;
    let lease = call.shared.bus.lease().await.map_err(ToolError::bus)?;
    let copied = async {
        let m = super::bus::manager_on(&lease.0).await?;
        let archive = m.download(&from.id, &path, args(&OwnedArgs::new())).await?;
        m.upload(
            &to.id,
            &to_path,
            zbus::Fd::from(archive.as_fd()),
            args(&OwnedArgs::new()),
        )
        .await
    };
    let r = tokio::select! {
        r = copied => r,
        () = call.context.ct.cancelled() => {
            let _ = lease.0.close().await;
            return Err(ToolError::cancelled());
        }
    };
    call.shared.bus.give_back(lease);
    r.map_err(ToolError::bus)?;
    Ok(Done::json(json!({
        "from": {"workspace": from.name, "path": path},
        "to": {"workspace": to.name, "path": to_path},
    })))
}

/// How long more changes are gathered after the first.
const GATHER: Duration = Duration::from_millis(200);

async fn watch(call: &mut Call<'_>, ws: &Resolved) -> Result<Done, ToolError> {
    let path = call.take_str("path")?;
    let wait = call.take_u32("wait_secs")?.unwrap_or(10).min(MAX_WAIT_SECS);
    let max = call.take_u32("max_events")?.unwrap_or(100).clamp(1, 1000) as usize;
    let lease = call.shared.bus.lease().await.map_err(ToolError::bus)?;
    let m = super::bus::manager_on(&lease.0)
        .await
        .map_err(ToolError::bus)?;
    let fd = m
        .watch_files(&ws.id, &path, args(&OwnedArgs::new()))
        .await
        .map_err(ToolError::bus)?;
    call.shared.bus.give_back(lease);
    // Closing the pipe ends the watch.
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(fd))
        .map_err(|e| ToolError::internal(format!("cannot read the watch: {e}")))?;
    let mut lines = tokio::io::BufReader::new(pipe).lines();
    let mut events: Vec<Value> = Vec::new();
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(wait.into());
    let ct = call.context.ct.clone();
    while events.len() < max {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(l)) => {
                    if events.is_empty() {
                        deadline = tokio::time::Instant::now() + GATHER;
                    }
                    events.push(serde_json::from_str(&l).unwrap_or(Value::String(l)));
                }
                // The watch ended (the workspace stopped, say): what came is the answer.
                Ok(None) | Err(_) => break,
            },
            () = tokio::time::sleep_until(deadline) => break,
            () = ct.cancelled() => return Err(ToolError::cancelled()),
        }
    }
    Ok(Done::json(json!({
        "path": path,
        "changes": events,
        "waited_secs": wait,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_at_a_page_end_waits_for_the_next_page() {
        let text = "aé".as_bytes(); // 'a', then two bytes
        assert_eq!(whole_characters(&text[..2], true), b"a");
        assert_eq!(
            whole_characters(&text[..2], false),
            &text[..2],
            "the end: as it is"
        );
        assert_eq!(whole_characters(text, true), text);
        let binary = [0xffu8, 0xfe, 0x00];
        assert_eq!(
            whole_characters(&binary, true),
            &binary,
            "no text: as it is"
        );
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("TERM").unwrap(), 15);
        assert_eq!(signal_number("sigkill").unwrap(), 9);
        assert_eq!(signal_number("2").unwrap(), 2);
        assert!(signal_number("NOPE").is_err());
    }
}
