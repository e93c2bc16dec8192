//! The routes: each calls one D-Bus method and answers with JSON.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;

use crate::dbus::client::args;
use crate::dbus::schema;

use super::*;

/// Every authenticated route: its path and methods. The OpenAPI document lists exactly these
/// (tested in `tests.rs`).
pub(super) fn api_routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/api/workspaces", post(create).get(list)),
        (
            "/api/workspaces/{id}",
            get(get_one).patch(update).delete(destroy),
        ),
        ("/api/workspaces/{id}/build", post(build)),
        ("/api/workspaces/{id}/rebuild", post(rebuild)),
        ("/api/workspaces/{id}/pause", post(pause)),
        (
            "/api/workspaces/{id}/snapshots",
            post(snapshots::take).get(snapshots::list),
        ),
        (
            "/api/workspaces/{id}/snapshots/{name}",
            axum::routing::delete(snapshots::delete),
        ),
        (
            "/api/workspaces/{id}/snapshots/{name}/restore",
            post(snapshots::restore),
        ),
        ("/api/workspaces/{id}/fork", post(snapshots::fork)),
        ("/api/workspaces/{id}/resume", post(resume)),
        ("/api/workspaces/{id}/exec", post(exec)),
        (
            "/api/workspaces/{id}/processes",
            post(processes::start).get(processes::list),
        ),
        (
            "/api/workspaces/{id}/processes/{pid}",
            get(processes::get_one).delete(processes::kill),
        ),
        (
            "/api/workspaces/{id}/processes/{pid}/output",
            get(processes::output),
        ),
        (
            "/api/workspaces/{id}/processes/{pid}/input",
            post(processes::input),
        ),
        (
            "/api/workspaces/{id}/processes/{pid}/signal",
            post(processes::signal),
        ),
        ("/api/workspaces/{id}/terminal", get(terminal::terminal)),
        ("/api/workspaces/{id}/ports/{port}/", proxy_methods()),
        ("/api/workspaces/{id}/ports/{port}/{*path}", proxy_methods()),
        (
            "/api/workspaces/{id}/files",
            get(files::read).put(files::write).delete(files::remove),
        ),
        ("/api/workspaces/{id}/files/list", get(files::list)),
        ("/api/workspaces/{id}/files/stat", get(files::stat)),
        ("/api/workspaces/{id}/files/mkdir", post(files::mkdir)),
        ("/api/workspaces/{id}/files/move", post(files::move_)),
        ("/api/workspaces/{id}/files/watch", get(files::watch)),
        (
            "/api/workspaces/{id}/archive",
            get(files::download).post(files::upload),
        ),
        ("/api/workspaces/{id}/init-log", get(init_log)),
        ("/api/workspaces/{id}/debug", get(debug)),
        ("/api/workspaces/{id}/rerun-init", post(rerun_init)),
        ("/api/workspaces/{id}/sync", post(sync)),
        ("/api/templates", get(templates)),
        ("/api/library", get(library)),
    ]
}

/// The port proxy takes the methods the OpenAPI document lists for it (a server inside may
/// take others; these are what browsers and DevTools use).
fn proxy_methods() -> MethodRouter<Arc<AppState>> {
    get(ports::proxy)
        .post(ports::proxy)
        .put(ports::proxy)
        .patch(ports::proxy)
        .delete(ports::proxy)
        .head(ports::proxy)
        .options(ports::proxy)
}

/// Every route of the API.
pub fn app(state: Arc<AppState>) -> Router {
    let api = api_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, route)| r.route(path, route))
        // The token is checked first: nothing of an unauthorized request's body is read.
        .layer(from_fn(read_body))
        .layer(from_fn_with_state(state.clone(), require_token));
    let api = match &state.mcp {
        Some(shared) => api.merge(mcp(shared.clone(), state.clone())),
        None => api,
    };
    let pages = PAGES
        .iter()
        .fold(Router::new(), |r, &(path, content_type, body)| {
            r.route(path, get(move || async move { page(content_type, body) }))
        });
    pages
        .route(
            "/api/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(api)
        .layer(DefaultBodyLimit::disable())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(axum::middleware::map_response(method_not_allowed))
        .layer(from_fn(limit_head))
        .with_state(state)
}

/// MCP over Streamable HTTP at `/mcp`, behind the token: one MCP session (its own
/// subscriptions) per client session, all sharing the bridge's bus connection and policy.
fn mcp(shared: Arc<crate::mcp::Shared>, state: Arc<AppState>) -> Router<Arc<AppState>> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    // A session ends after this long without an event of its own; a call waiting quietly
    // (an exec up to the largest timeout, a first build) must not outlive it.
    let longest = std::iter::once(&shared.policy)
        .chain(shared.tokens.iter().map(|t| &t.policy))
        .map(|p| p.max_timeout_secs)
        .max()
        .unwrap_or(0)
        .max(3600);
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive =
        Some(std::time::Duration::from_secs(u64::from(longest) + 300));
    let service = StreamableHttpService::new(
        move || Ok(crate::mcp::Server::new(shared.clone())),
        Arc::new(sessions),
        // The token is the check: a browser page cannot send it, so a rebound host name
        // gains nothing, and the bridge may be reached by any name its operator gives it.
        StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .with_max_request_body_bytes(super::BODY_LIMIT),
    );
    Router::new()
        .nest_service("/mcp", service)
        .layer(from_fn_with_state(state, require_mcp_token))
}

/// axum answers a method a route does not take with an empty 405: give it the documented
/// error body (keeping its `Allow` header).
pub(super) async fn method_not_allowed(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        match &allow {
            Some(a) => format!("this endpoint takes {}", a.to_str().unwrap_or_default()),
            None => "this endpoint does not take this method".into(),
        },
    )
    .into_response();
    if let Some(a) = allow {
        error.headers_mut().insert(header::ALLOW, a);
    }
    error
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let spec = schema::CREATE.from_json(body_json(body)?)?;
    let path = manager(&state).await?.create_workspace(args(&spec)).await?;
    let id = crate::dbus::client::workspace_id_of(&path);
    info!(workspace_id = %id, "REST: created workspace");
    Ok((
        StatusCode::CREATED,
        Json(workspace_json(&state, &id).await?),
    ))
}

/// Every workspace in one bus call (the ObjectManager's), oldest first.
pub(super) async fn list(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let objects = zbus::fdo::ObjectManagerProxy::builder(&state.conn)
        .destination(crate::dbus::BUS_NAME)
        .path(crate::dbus::MANAGER_PATH)
        .build()
        .await?
        .get_managed_objects()
        .await
        .map_err(zbus::Error::from)?;
    let mut all: Vec<Value> = objects
        .values()
        .filter_map(|ifaces| {
            ifaces
                .iter()
                .find(|(name, _)| name.as_str() == WORKSPACE_IFACE)
                .map(|(_, props)| workspace_from(props))
        })
        .collect();
    all.sort_by_key(|w| {
        (
            w["created_at"].as_u64(),
            w["name"].as_str().map(str::to_owned),
        )
    });
    Ok(Json(Value::Array(all)))
}

pub(super) async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(workspace_json(&state, &id).await?))
}

pub(super) async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let changes = schema::CHANGES.from_json(body_json(body)?)?;
    manager(&state)
        .await?
        .update_workspace(&id, args(&changes))
        .await?;
    Ok(Json(workspace_json(&state, &id).await?))
}

pub(super) async fn destroy(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    manager(&state).await?.destroy_workspace(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn build(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    manager(&state).await?.build_workspace(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(workspace_json(&state, &id).await?),
    ))
}

pub(super) async fn rebuild(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    manager(&state).await?.rebuild_workspace(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(workspace_json(&state, &id).await?),
    ))
}

pub(super) async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    manager(&state).await?.pause_workspace(&id).await?;
    Ok(Json(workspace_json(&state, &id).await?))
}

pub(super) async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    manager(&state).await?.resume_workspace(&id).await?;
    Ok(Json(workspace_json(&state, &id).await?))
}

pub(super) async fn exec(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let mut fields = body_json(body)?;
    let command = match fields.remove("command") {
        Some(Value::String(c)) => c,
        Some(_) => return Err(ApiError::invalid("command", "must be a string")),
        None => return Err(ApiError::invalid("command", "is required")),
    };
    let mut options = schema::EXEC.from_json(fields)?;
    if wants_event_stream(&headers) {
        // Streamed, the command runs with ExecWithFds: stdin goes through a pipe.
        let stdin = options
            .remove("stdin")
            .and_then(|v| Vec::<u8>::try_from(v).ok());
        return stream::exec(state, id, command, options, stdin).await;
    }
    let reply = manager(&state)
        .await?
        .exec(&id, &command, args(&options))
        .await?;
    Ok(exec_json(reply).into_response())
}

/// Whether the client asked for server-sent events (`Accept: text/event-stream`).
pub(super) fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.split(';').next().unwrap_or("").trim() == "text/event-stream")
}

#[derive(Deserialize)]
pub(super) struct LogQuery {
    max_lines: Option<u32>,
}

pub(super) async fn init_log(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Json<Value>> {
    let (content, total) = manager(&state)
        .await?
        .get_init_log(&id, q.max_lines.unwrap_or(0))
        .await?;
    Ok(Json(json!({"content": content, "total_lines": total})))
}

pub(super) async fn debug(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let info = manager(&state).await?.get_debug_info(&id).await?;
    Ok(Json(crate::dbus::client::dict_json(&info)))
}

pub(super) async fn rerun_init(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let options = schema::RERUN_INIT.from_json(body_json(body)?)?;
    let reply = manager(&state)
        .await?
        .rerun_init(&id, args(&options))
        .await?;
    Ok(exec_json(reply))
}

pub(super) async fn sync(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    manager(&state).await?.sync_workspace(&id).await?;
    Ok(Json(workspace_json(&state, &id).await?))
}

pub(super) async fn library(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let (skills, tools) = manager(&state).await?.list_library().await?;
    Ok(Json(json!({"skills": skills, "tools": tools})))
}

pub(super) async fn templates(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let all = manager(&state).await?.list_templates().await?;
    Ok(Json(Value::Array(
        all.into_iter()
            .map(|(name, description, distro)| {
                json!({"name": name, "description": description, "distro": distro})
            })
            .collect(),
    )))
}
