//! Background processes over REST: each route calls `StartProcess`, `ListProcesses` or a method
//! of the process's object (`org.agent.Workspaces.Process`), and answers with JSON.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::dbus::client::{ProcessProxy, args, variant_json};
use crate::dbus::schema;

use super::*;

/// The path of process `n` of workspace `id`.
async fn process_path(state: &AppState, id: &str, n: &str) -> ApiResult<(u32, String)> {
    let n: u32 = n
        .parse()
        .map_err(|_| ApiError::invalid("pid", "must be a process number"))?;
    let ws = manager(state).await?.get_workspace(id).await?;
    Ok((n, format!("{}/process/{n}", ws.as_str())))
}

/// The process at `path` as JSON: all its properties in one `GetAll`, which is also the check
/// that it exists (`NoSuchProcess`, as `what`, when it is not known).
async fn process_json(state: &AppState, path: &str, what: &str) -> ApiResult<Value> {
    let props = zbus::fdo::PropertiesProxy::builder(&state.conn)
        .destination("org.agent.Workspaces")
        .path(path.to_owned())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            "org.agent.Workspaces.Process",
        ))
        .await
        .map_err(|e| match e {
            // An object that is not there answers UnknownObject: the process is not known.
            zbus::fdo::Error::UnknownObject(_) => {
                ApiError::from(crate::core::Error::NoSuchProcess(what.to_owned()))
            }
            other => ApiError::from(zbus::Error::from(other)),
        })?;
    let get = |name: &str| {
        props
            .get(name)
            .map(|v| variant_json(v))
            .unwrap_or(Value::Null)
    };
    Ok(json!({
        "id": get("Id"),
        "command": get("Command"),
        "running": get("Running"),
        "exit_code": get("ExitCode"),
        "started_at": get("StartedAt"),
        "ended_at": get("EndedAt"),
        "pty": get("Pty"),
    }))
}

/// Process `n` of workspace `id`, checked to exist (`NoSuchProcess` otherwise).
async fn process(state: &AppState, id: &str, n: &str) -> ApiResult<ProcessProxy<'static>> {
    let (n, path) = process_path(state, id, n).await?;
    let p = ProcessProxy::builder(&state.conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    // An object that is not there answers UnknownObject: the process is not known.
    if p.id().await.is_err() {
        return Err(crate::core::Error::NoSuchProcess(format!("{n} in workspace '{id}'")).into());
    }
    Ok(p)
}

pub(super) async fn start(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut fields = body_json(body)?;
    let command = match fields.remove("command") {
        Some(Value::String(c)) => c,
        Some(_) => return Err(ApiError::invalid("command", "must be a string")),
        None => return Err(ApiError::invalid("command", "is required")),
    };
    let options = schema::START_PROCESS.from_json(fields)?;
    let path = manager(&state)
        .await?
        .start_process(&id, &command, args(&options))
        .await?;
    let n = path.as_str().rsplit('/').next().unwrap_or_default();
    let what = format!("{n} in workspace '{id}'");
    Ok((
        StatusCode::CREATED,
        Json(process_json(&state, path.as_str(), &what).await?),
    ))
}

pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let all = manager(&state).await?.list_processes(&id).await?;
    Ok(Json(Value::Array(
        all.into_iter()
            .map(|(id, command, running, exit_code)| {
                json!({"id": id, "command": command, "running": running, "exit_code": exit_code})
            })
            .collect(),
    )))
}

pub(super) async fn get_one(
    State(state): State<Arc<AppState>>,
    Path((id, n)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (n, path) = process_path(&state, &id, &n).await?;
    let what = format!("{n} in workspace '{id}'");
    Ok(Json(process_json(&state, &path, &what).await?))
}

/// Ends the process: SIGKILL to its whole tree (nothing when it has ended already).
pub(super) async fn kill(
    State(state): State<Arc<AppState>>,
    Path((id, n)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let p = process(&state, &id, &n).await?;
    if p.running().await? {
        match p.signal(9).await {
            // Ended meanwhile.
            Err(zbus::Error::MethodError(name, ..))
                if name.as_str() == "org.agent.Workspaces.Error.JobFailed" => {}
            other => other?,
        }
        p.wait(30).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub(super) struct OutputQuery {
    offset: Option<u64>,
    max_bytes: Option<u32>,
}

/// How often a followed output is read again while nothing new has come.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// How long a follower that has caught up waits before it reads again: output that trickles
/// in is sent in batches, not a round trip to the service per write.
const FOLLOW_BATCH: std::time::Duration = std::time::Duration::from_millis(50);
/// The most read at once by a follower.
const FOLLOW_READ: u32 = 256 * 1024;

/// Output from `offset` as text. A character cut by the end of what is kept so far is left
/// for the next read (`next_offset` before it), so text arrives whole; invalid bytes are
/// replaced. With `Accept: text/event-stream`, a stream that follows the output: `output`
/// events (the text as a JSON string), then `exit` (`{"exit_code": N}`) once it has ended
/// and all is sent.
pub(super) async fn output(
    State(state): State<Arc<AppState>>,
    Path((id, n)): Path<(String, String)>,
    Query(q): Query<OutputQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let p = process(&state, &id, &n).await?;
    let offset = q.offset.unwrap_or(0);
    if super::routes::wants_event_stream(&headers) {
        return Ok(follow(p, offset).into_response());
    }
    let (mut data, mut next, ended) = p.read_output(offset, q.max_bytes.unwrap_or(65536)).await?;
    if !ended {
        let cut = incomplete_tail(&data);
        data.truncate(data.len() - cut);
        next -= cut as u64;
    }
    Ok(Json(json!({
        "data": String::from_utf8_lossy(&data),
        "next_offset": next,
        "ended": ended,
    }))
    .into_response())
}

/// The output from `offset` as server-sent events, until the process has ended and all of it
/// is sent (or the client leaves: the stream is dropped).
fn follow(
    p: ProcessProxy<'static>,
    offset: u64,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    struct Follow {
        p: ProcessProxy<'static>,
        offset: u64,
        done: bool,
        /// The last read had caught up (it was not full).
        caught_up: bool,
    }
    let events = futures_util::stream::unfold(
        Follow {
            p,
            offset,
            done: false,
            caught_up: false,
        },
        |mut st| async move {
            if st.done {
                return None;
            }
            if std::mem::take(&mut st.caught_up) {
                tokio::time::sleep(FOLLOW_BATCH).await;
            }
            loop {
                let read = st.p.read_output(st.offset, FOLLOW_READ).await;
                let event = match read {
                    Err(e) => {
                        let e = ApiError::from(e);
                        st.done = true;
                        Event::default().event("error").data(
                            json!({"error": {"code": e.code, "message": e.message}}).to_string(),
                        )
                    }
                    Ok((mut data, next, ended)) => {
                        let cut = if ended { 0 } else { incomplete_tail(&data) };
                        data.truncate(data.len() - cut);
                        st.offset = next - cut as u64;
                        if !data.is_empty() {
                            // (A character cut at the end of a full read is left for the next.)
                            st.caught_up = data.len() + 4 < FOLLOW_READ as usize;
                            Event::default().event("output").data(
                                Value::String(String::from_utf8_lossy(&data).into_owned())
                                    .to_string(),
                            )
                        } else if ended {
                            st.done = true;
                            let code = st.p.exit_code().await.unwrap_or(-1);
                            Event::default()
                                .event("exit")
                                .data(json!({"exit_code": code}).to_string())
                        } else {
                            tokio::time::sleep(FOLLOW_POLL).await;
                            continue;
                        }
                    }
                };
                return Some((Ok(event), st));
            }
        },
    );
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// How many bytes at the end of `data` begin a UTF-8 character that is not complete yet.
fn incomplete_tail(data: &[u8]) -> usize {
    for back in 1..=3.min(data.len()) {
        let b = data[data.len() - back];
        let width = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            // A continuation byte: look further back for its start.
            0x80..=0xBF => continue,
            _ => return 0,
        };
        return if width > back { back } else { 0 };
    }
    0
}

pub(super) async fn input(
    State(state): State<Arc<AppState>>,
    Path((id, n)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let mut fields = body_json(body)?;
    let data = match fields.remove("data") {
        Some(Value::String(d)) => d,
        Some(_) => return Err(ApiError::invalid("data", "must be a string")),
        None => return Err(ApiError::invalid("data", "is required")),
    };
    if let Some(k) = fields.keys().next() {
        return Err(ApiError::invalid(
            k.as_str(),
            "unknown key; known keys: data",
        ));
    }
    process(&state, &id, &n)
        .await?
        .write_input(data.as_bytes())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn signal(
    State(state): State<Arc<AppState>>,
    Path((id, n)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let mut fields = body_json(body)?;
    let signal = match fields.remove("signal") {
        Some(Value::Number(s)) => s
            .as_i64()
            .and_then(|s| i32::try_from(s).ok())
            .ok_or_else(|| ApiError::invalid("signal", "must be a signal number"))?,
        Some(_) => return Err(ApiError::invalid("signal", "must be a signal number")),
        None => return Err(ApiError::invalid("signal", "is required")),
    };
    if let Some(k) = fields.keys().next() {
        return Err(ApiError::invalid(
            k.as_str(),
            "unknown key; known keys: signal",
        ));
    }
    process(&state, &id, &n).await?.signal(signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::incomplete_tail;

    #[test]
    fn a_cut_character_waits_for_its_other_bytes() {
        let text = "aé€😀".as_bytes();
        assert_eq!(incomplete_tail(text), 0);
        assert_eq!(incomplete_tail(&text[..2]), 1, "the first byte of é");
        assert_eq!(incomplete_tail(&text[..5]), 2, "two bytes of €");
        assert_eq!(incomplete_tail(&text[..8]), 2, "two bytes of 😀");
        assert_eq!(incomplete_tail(&text[..9]), 3);
        assert_eq!(incomplete_tail(b"ab\xff"), 0, "invalid bytes are not held");
        assert_eq!(incomplete_tail(b""), 0);
    }
}
