//! A workspace's files over HTTP: each route calls one file method of the service. Bodies
//! stream both ways through pipes (the content never sits whole in the bridge): a download is
//! read from the descriptor the service answers with, an upload is written into a pipe whose
//! read end the service is given.
//!
//! An upload has a bus connection of its own: if the client's body fails half-way, the bridge
//! drops that connection, and the service (which sees its caller leave) abandons the write,
//! leaving nothing; with a `Content-Length` the service also checks the size itself.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

use super::*;
use crate::dbus::client::{OwnedArgs, args, connect, entry_json};
use crate::dbus::schema::{self, Keys, Type};

type Q = Query<HashMap<String, String>>;

/// The query's members as a dictionary of `keys`, each parsed by its type; `path` (and the
/// members `skip` names) left out.
fn options(keys: Keys, q: &HashMap<String, String>, skip: &[&str]) -> ApiResult<OwnedArgs> {
    let mut body = Map::new();
    for (k, v) in q {
        if k == "path" || skip.contains(&k.as_str()) {
            continue;
        }
        let value = match keys.get(k).map(|key| key.ty) {
            Some(Type::Bool) => match v.as_str() {
                "true" | "1" => Value::Bool(true),
                "false" | "0" => Value::Bool(false),
                _ => return Err(ApiError::invalid(k.as_str(), "must be true or false")),
            },
            Some(Type::U16 | Type::U32 | Type::U64) => v
                .parse::<u64>()
                .map(Value::from)
                .map_err(|_| ApiError::invalid(k.as_str(), "must be a non-negative integer"))?,
            _ => Value::String(v.clone()),
        };
        body.insert(k.clone(), value);
    }
    Ok(keys.from_json(body)?)
}

fn path_of(q: &HashMap<String, String>) -> ApiResult<&str> {
    let p = q
        .get("path")
        .map(String::as_str)
        .ok_or_else(|| ApiError::invalid("path", "is required"))?;
    checked("path", p)
}

/// A path as the service checks it (no NUL byte, which D-Bus cannot carry either).
fn checked<'a>(field: &str, p: &'a str) -> ApiResult<&'a str> {
    crate::core::files::check_path(field, p)?;
    Ok(p)
}

/// `GET .../files/list?path=&depth=&limit=`.
pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    let o = options(schema::LIST_DIRECTORY, &q, &[])?;
    let (entries, truncated) = manager(&state)
        .await?
        .list_directory(&id, path_of(&q)?, args(&o))
        .await?;
    let entries: Vec<Value> = entries.iter().map(entry_json).collect();
    Ok(Json(json!({ "entries": entries, "truncated": truncated })))
}

/// `GET .../files/stat?path=`.
pub(super) async fn stat(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    let o = options(schema::FILE_IDENTITY, &q, &[])?;
    let e = manager(&state)
        .await?
        .stat_file(&id, path_of(&q)?, args(&o))
        .await?;
    Ok(Json(entry_json(&e)))
}

/// `DELETE .../files?path=&recursive=`.
pub(super) async fn remove(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
) -> ApiResult<StatusCode> {
    let o = options(schema::REMOVE_FILE, &q, &[])?;
    manager(&state)
        .await?
        .remove_file(&id, path_of(&q)?, args(&o))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn member(body: &mut Map<String, Value>, key: &str) -> ApiResult<String> {
    match body.remove(key) {
        Some(Value::String(s)) => checked(key, &s).map(str::to_owned),
        Some(_) => Err(ApiError::invalid(key, "must be a string")),
        None => Err(ApiError::invalid(key, "is required")),
    }
}

/// `POST .../files/mkdir` with `{"path", "parents", "mode"}`.
pub(super) async fn mkdir(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let mut body = body_json(body)?;
    let path = member(&mut body, "path")?;
    let o = schema::MAKE_DIRECTORY.from_json(body)?;
    manager(&state)
        .await?
        .make_directory(&id, &path, args(&o))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../files/move` with `{"from", "to", "replace", "create_parents"}`.
pub(super) async fn move_(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let mut body = body_json(body)?;
    let (from, to) = (member(&mut body, "from")?, member(&mut body, "to")?);
    let o = schema::MOVE_FILE.from_json(body)?;
    manager(&state)
        .await?
        .move_file(&id, &from, &to, args(&o))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A descriptor's content as a response body, read as it comes.
fn body_of(fd: OwnedFd) -> ApiResult<Body> {
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", e.to_string()))?;
    Ok(Body::from_stream(
        tokio_util::io::ReaderStream::with_capacity(pipe, 256 * 1024),
    ))
}

/// The Content-Type of a file name, by its extension.
fn content_type(path: &str) -> &'static str {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "md" | "rs" | "py" | "sh" | "toml" | "yaml" | "yml" | "c" | "h" | "go" | "ts"
        | "log" | "ini" | "cfg" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        _ => "application/octet-stream",
    }
}

/// One `Range: bytes=A-B` (or `A-`, or `-N`) over a file of `size` bytes: offset and length;
/// `None` when there is none, an error when it cannot be served.
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let spec = v.strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(()); // one range only
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (a, "") => (a.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (a, b) => (
            a.parse().map_err(|_| ())?,
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1)),
        ),
    };
    if start >= size || end < start {
        return Err(());
    }
    Ok(Some((start, end - start + 1)))
}

/// `GET .../files?path=`: the content; `Range` (one), `ETag` (from the modification time and
/// size) with `If-None-Match`, `Content-Type` by extension.
pub(super) async fn read(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let path = path_of(&q)?;
    let o = options(schema::FILE_IDENTITY, &q, &[])?;
    let m = manager(&state).await?;
    // The entry first: its size and time for the headers (a link is followed by the read, so
    // a link's entry is not the file's: no ETag then).
    let e = m.stat_file(&id, path, args(&o)).await?;
    if e.1 == "dir" {
        return Err(crate::core::Error::File {
            kind: crate::core::files::FileErrorKind::IsADirectory,
            path: path.to_owned(),
            message: format!("'{path}' is a directory"),
        }
        .into());
    }
    let (size, etag) = (
        e.2,
        (e.1 == "file").then(|| format!("\"{:x}-{:x}\"", e.6, e.2)),
    );
    if let (Some(tag), Some(inm)) = (&etag, headers.get(header::IF_NONE_MATCH))
        && inm
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag.clone())]).into_response());
    }
    let r = if e.1 == "file" {
        range(&headers, size)
    } else {
        Ok(None)
    };
    let Ok(r) = r else {
        return Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{size}"))],
        )
            .into_response());
    };
    let mut read_opts = o.clone();
    if let Some((offset, length)) = r {
        read_opts.insert("offset".into(), zbus::Variant::from(offset));
        read_opts.insert("length".into(), zbus::Variant::from(length));
    }
    let fd = m.read_file(&id, path, args(&read_opts)).await?;
    let mut response = Response::new(body_of(fd.into())?);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert(header::ETAG, tag);
    }
    if let Some((offset, length)) = r {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let cr = format!("bytes {offset}-{}/{size}", offset + length - 1);
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&cr).expect("ascii"),
        );
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    } else if e.1 == "file" {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(response)
}

/// How long the pipe of a failed upload is held open: the service sees the caller leave
/// first, and abandons the write (an end of file would be taken for the content's end).
const HOLD_FAILED: Duration = Duration::from_secs(10);

/// Streams the request body into a pipe; the pipe's read end for the service, and what tells
/// the body failed.
fn body_into_pipe(body: Body, gunzip: bool) -> ApiResult<(OwnedFd, Failed)> {
    let internal = |e: std::io::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", e.to_string())
    };
    let (r, w) = std::io::pipe().map_err(internal)?;
    let (failed_tx, failed) = tokio::sync::mpsc::unbounded_channel();
    let w: OwnedFd = w.into();
    if gunzip {
        // The body into a second pipe, unpacked by a thread into the first.
        let (gz_r, gz_w) = std::io::pipe().map_err(internal)?;
        let gz_w: OwnedFd = gz_w.into();
        let gz_failed = failed_tx.clone();
        std::thread::Builder::new()
            .name("gunzip".into())
            .spawn(move || {
                let mut dec = flate2::read::MultiGzDecoder::new(gz_r);
                let mut out = std::fs::File::from(w);
                if let Err(e) = std::io::copy(&mut dec, &mut out) {
                    // Not gzip, or cut: said (the call is dropped), and the pipe held, so the
                    // service does not take it for whole.
                    let _ = gz_failed.send(format!("the body is not whole gzip: {e}"));
                    std::thread::sleep(HOLD_FAILED);
                }
            })
            .map_err(internal)?;
        tokio::spawn(feed(body, gz_w, failed_tx));
    } else {
        tokio::spawn(feed(body, w, failed_tx));
    }
    Ok((r.into(), failed))
}

/// Where a failed body says so.
type Failed = tokio::sync::mpsc::UnboundedReceiver<String>;

async fn feed(body: Body, w: OwnedFd, failed: tokio::sync::mpsc::UnboundedSender<String>) {
    let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(w) else {
        let _ = failed.send("cannot write to the pipe".into());
        return;
    };
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let sent = match chunk {
            Ok(c) => pipe.write_all(&c).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the request body failed: {e}")),
        };
        if let Err(e) = sent {
            let _ = failed.send(e);
            tokio::time::sleep(HOLD_FAILED).await;
            return;
        }
    }
}

/// Runs a call that takes the pipe's read end on a bus connection of its own, which is
/// dropped (so the service abandons the write) if the body fails first.
async fn upload_call<F, Fut>(
    state: &AppState,
    body: Body,
    gunzip: bool,
    call: F,
) -> ApiResult<StatusCode>
where
    F: FnOnce(crate::dbus::client::WorkspacesProxy<'static>, OwnedFd) -> Fut,
    Fut: std::future::Future<Output = zbus::Result<()>>,
{
    let conn = connect(state.bus_address.as_deref())
        .await
        .map_err(crate::core::Error::from)?;
    let m = manager_on(&conn).await.map_err(crate::core::Error::from)?;
    let (read, mut failed) = body_into_pipe(body, gunzip)?;
    tokio::select! {
        r = call(m, read) => { r?; Ok(StatusCode::NO_CONTENT) }
        Some(why) = failed.recv() => {
            drop(conn);
            Err(ApiError::bad_request(format!("{why}; nothing was written")))
        }
    }
}

/// `PUT .../files?path=&mode=&create_parents=&append=&exclusive=`: the body, streamed to the
/// file, put in place whole.
pub(super) async fn write(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let path = path_of(&q)?.to_owned();
    let mut o = options(schema::WRITE_FILE, &q, &[])?;
    if let Some(n) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        o.entry("size".into()).or_insert(zbus::Variant::from(n));
    }
    upload_call(&state, body, false, |m, read| async move {
        m.write_file(&id, &path, zbus::Fd::from(read.as_fd()), args(&o))
            .await
    })
    .await
}

/// `POST .../archive?path=&gzip=`: a tar (gzip with `gzip=true` or `Content-Encoding: gzip`)
/// unpacked into the directory.
pub(super) async fn upload(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let path = path_of(&q)?.to_owned();
    let gzip = q.get("gzip").is_some_and(|v| v == "true" || v == "1")
        || headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v == "gzip");
    let o = options(schema::FILE_IDENTITY, &q, &["gzip"])?;
    upload_call(&state, body, gzip, |m, read| async move {
        m.upload(&id, &path, zbus::Fd::from(read.as_fd()), args(&o))
            .await
    })
    .await
}

/// `GET .../archive?path=&gzip=`: the directory (or file) as a tar stream.
pub(super) async fn download(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
) -> ApiResult<Response> {
    let path = path_of(&q)?;
    let gzip = q.get("gzip").is_some_and(|v| v == "true" || v == "1");
    let o = options(schema::FILE_IDENTITY, &q, &["gzip"])?;
    let fd: OwnedFd = manager(&state)
        .await?
        .download(&id, path, args(&o))
        .await?
        .into();
    let base = path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty() && *b != ".")
        .unwrap_or("workspace");
    let base: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    let (fd, name, ty) = if gzip {
        let internal = |e: std::io::Error| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", e.to_string())
        };
        let (r, w) = std::io::pipe().map_err(internal)?;
        std::thread::Builder::new()
            .name("gzip".into())
            .spawn(move || {
                let mut enc = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
                let mut from = std::fs::File::from(fd);
                // A client that leaves ends the copy (its pipe breaks).
                if std::io::copy(&mut from, &mut enc).is_ok() {
                    let _ = enc.finish();
                }
            })
            .map_err(internal)?;
        (
            OwnedFd::from(r),
            format!("{base}.tar.gz"),
            "application/gzip",
        )
    } else {
        (fd, format!("{base}.tar"), "application/x-tar")
    };
    let mut response = Response::new(body_of(fd)?);
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ty));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// `GET .../files/watch?path=&limit=`: server-sent events, one per change (`event:` its kind,
/// `data:` the JSON line), until the client leaves.
pub(super) async fn watch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Q,
) -> ApiResult<Response> {
    let o = options(schema::WATCH_FILES, &q, &[])?;
    let fd: OwnedFd = manager(&state)
        .await?
        .watch_files(&id, path_of(&q)?, args(&o))
        .await?
        .into();
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", e.to_string()))?;
    let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(pipe));
    let events = futures_util::stream::unfold(lines, |mut lines| async move {
        let line = lines.next_line().await.ok()??;
        let kind = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["event"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "change".into());
        Some((
            Ok::<_, Infallible>(Event::default().event(kind).data(line)),
            lines,
        ))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Routes whose request body streams to the service rather than being read first.
pub(super) fn streams_body(method: &axum::http::Method, path: &str) -> bool {
    (method == axum::http::Method::PUT && path.ends_with("/files"))
        || (method == axum::http::Method::POST && path.ends_with("/archive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_types() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(range(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(range(&h("bytes=2-5"), 10), Ok(Some((2, 4))));
        assert_eq!(range(&h("bytes=7-"), 10), Ok(Some((7, 3))));
        assert_eq!(range(&h("bytes=-4"), 10), Ok(Some((6, 4))));
        assert_eq!(range(&h("bytes=5-100"), 10), Ok(Some((5, 5))));
        assert!(range(&h("bytes=10-"), 10).is_err());
        assert!(range(&h("bytes=1-2,4-5"), 10).is_err());
        assert!(range(&h("items=1-2"), 10).is_err());
        assert_eq!(content_type("a/b.RS"), "text/plain; charset=utf-8");
        assert_eq!(content_type("x.png"), "image/png");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert!(streams_body(
            &axum::http::Method::PUT,
            "/api/workspaces/x/files"
        ));
        assert!(!streams_body(
            &axum::http::Method::GET,
            "/api/workspaces/x/files"
        ));
    }
}
