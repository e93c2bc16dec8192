//! The REST bridge: HTTP in front of the D-Bus API, so authorization, validation and logs stay
//! in the service. The only module that knows HTTP. Every route calls one D-Bus method; errors
//! come back as `{"error": {"code", "message"}}` with a status that fits the D-Bus error name.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;
use tracing::{info, warn};
use zbus::OwnedVariant;

use crate::core::Error;
use crate::dbus::client::{WorkspacesProxy, args, variant_json};
use crate::dbus::schema;

mod stream;

/// Largest request body accepted (an exec's stdin travels in it).
pub const BODY_LIMIT: usize = 16 * 1024 * 1024;

pub struct AppState {
    pub conn: zbus::Connection,
    /// Where `conn` goes (None: the system bus); streaming execs open their own connection.
    pub bus_address: Option<String>,
    pub token: String,
}

/// A client-facing error: a stable code and a message; details go to the journal.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// For a bad input: the request field it is about (`name`, `limits.memory_max`).
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 400 about the request field `field`, worded as the service words it.
    fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::invalid(field, reason).into()
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            error["field"] = Value::String(field);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

/// Each error of the service, as an HTTP status and a stable code.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::InvalidArgs { .. } => (StatusCode::BAD_REQUEST, "invalid_argument"),
            Error::NoSuchWorkspace(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::NoSuchSkill(_) => (StatusCode::BAD_REQUEST, "no_such_skill"),
            Error::NoSuchTool(_) => (StatusCode::BAD_REQUEST, "no_such_tool"),
            Error::NoSuchTemplate(_) => (StatusCode::BAD_REQUEST, "no_such_template"),
            Error::WorkspaceExists(_) => (StatusCode::CONFLICT, "exists"),
            Error::Busy(_) => (StatusCode::CONFLICT, "busy"),
            Error::NotReady { .. } => (StatusCode::CONFLICT, "not_ready"),
            Error::Protected(_) => (StatusCode::CONFLICT, "protected"),
            Error::LimitsExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "limits_exceeded"),
            Error::NotSupported(_) => (StatusCode::BAD_REQUEST, "not_supported"),
            Error::JobFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "job_failed"),
            Error::Library(_) => (StatusCode::INTERNAL_SERVER_ERROR, "library_error"),
            Error::AccessDenied(_) | Error::InteractiveAuthorizationRequired(_) => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            Error::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "io_error"),
            Error::Bus { name, message } => {
                let short = name.rsplit('.').next().unwrap_or("");
                return if matches!(
                    short,
                    "ServiceUnknown"
                        | "NameHasNoOwner"
                        | "NoReply"
                        | "Disconnected"
                        | "ChildExited"
                ) || name == "org.freedesktop.zbus.Error"
                {
                    warn!("The service is unreachable: {name}: {message}");
                    Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the workspace service is unreachable",
                    )
                } else {
                    warn!("D-Bus call failed: {name}: {message}");
                    Self::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error; see the service's journal",
                    )
                };
            }
        };
        Self {
            field: e.field().map(String::from),
            ..Self::new(status, code, e.to_string())
        }
    }
}

impl From<zbus::Error> for ApiError {
    fn from(e: zbus::Error) -> Self {
        Error::from(e).into()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn require_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(state.token.as_bytes())) && !given.is_empty() {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid 'Authorization: Bearer <token>' header is required",
        )
        .into_response()
    }
}

/// The OpenAPI document of this API, served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("../../http/openapi.json");

/// The dashboard: static pages built into the binary, served without a token (they hold no
/// data; everything they show comes from the API, with the token the user signs in with).
const PAGES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "/app.css",
        "text/css; charset=utf-8",
        include_str!("../../web/app.css"),
    ),
];

/// The pages load nothing from elsewhere, and the browser is told to refuse anything else.
const PAGE_POLICY: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Every authenticated route: its path and methods. The OpenAPI document lists exactly these
/// (tested below).
fn api_routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/api/workspaces", post(create).get(list)),
        (
            "/api/workspaces/{id}",
            get(get_one).patch(update).delete(destroy),
        ),
        ("/api/workspaces/{id}/build", post(build)),
        ("/api/workspaces/{id}/rebuild", post(rebuild)),
        ("/api/workspaces/{id}/exec", post(exec)),
        ("/api/workspaces/{id}/init-log", get(init_log)),
        ("/api/workspaces/{id}/debug", get(debug)),
        ("/api/workspaces/{id}/rerun-init", post(rerun_init)),
        ("/api/workspaces/{id}/sync", post(sync)),
        ("/api/templates", get(templates)),
        ("/api/library", get(library)),
    ]
}

/// Every route of the API.
pub fn app(state: Arc<AppState>) -> Router {
    let api = api_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, route)| r.route(path, route))
        // The token is checked first: nothing of an unauthorized request's body is read.
        .layer(from_fn(read_body))
        .layer(from_fn_with_state(state.clone(), require_token));
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

/// axum answers a method a route does not take with an empty 405: give it the documented
/// error body (keeping its `Allow` header).
async fn method_not_allowed(response: Response) -> Response {
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

/// A request head over [`MAX_HEADER_BYTES`] is answered 431 with the documented error body.
/// (hyper's own limit, which answers with an empty 431, is set well above it.)
async fn limit_head(request: Request, next: Next) -> Response {
    let size = request.method().as_str().len()
        + request.uri().to_string().len()
        + request
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if size > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
            format!("the request head is larger than {MAX_HEADER_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Largest request head (request line and headers); more is answered 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// hyper's hard limit on a head, and on the number of headers: beyond these it answers an
/// empty 431 itself, so they sit well above what `limit_head` answers properly.
const HYPER_MAX_HEADER_BYTES: usize = 256 * 1024;
const HYPER_MAX_HEADERS: usize = 1024;
/// Time a client has to send a request head, and how long an idle kept-alive connection stays.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a whole request body; slower is answered 408.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a stop waits for running requests (streaming execs included).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` completes. Plain HTTP/1.1 with the limits
/// above, so that slow or idle clients cannot pin the bridge.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = app(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(HYPER_MAX_HEADER_BYTES)
        .max_headers(HYPER_MAX_HEADERS);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    warn!("Cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("Stopping with requests still running after {SHUTDOWN_GRACE:?}");
    }
    Ok(())
}

/// Reads the whole request body within [`BODY_TIMEOUT`] and [`BODY_LIMIT`], before any
/// handler runs; handlers then take it as `Bytes`.
async fn read_body(request: Request, next: Next) -> Response {
    use futures_util::StreamExt;
    let (parts, body) = request.into_parts();
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is larger than {BODY_LIMIT} bytes"),
        )
        .into_response()
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return too_large();
    }
    let read = async {
        let mut data = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("cannot read the request body: {e}")).into_response()
            })?;
            if bytes.len() + chunk.len() > BODY_LIMIT {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(response)) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )
        .into_response(),
    }
}

async fn manager(state: &AppState) -> ApiResult<WorkspacesProxy<'static>> {
    Ok(manager_on(&state.conn).await?)
}

/// A proxy of the manager that caches no properties: building it costs no bus call (a caching
/// proxy would add a match rule and a GetAll to every request).
async fn manager_on(conn: &zbus::Connection) -> zbus::Result<WorkspacesProxy<'static>> {
    WorkspacesProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// A request body as JSON, whatever Content-Type the client sent (curl -d sends a form type).
fn body_json(bytes: Bytes) -> ApiResult<Map<String, Value>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

const WORKSPACE_IFACE: &str = "org.agent.Workspaces.Workspace";

/// The workspace as JSON, from its object's properties.
async fn workspace_json(state: &AppState, key: &str) -> ApiResult<Value> {
    let path = manager(state).await?.get_workspace(key).await?;
    let props = zbus::fdo::PropertiesProxy::builder(&state.conn)
        .destination(crate::dbus::BUS_NAME)
        .path(path)
        .build()
        .await?;
    let all = props
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            WORKSPACE_IFACE,
        ))
        .await
        .map_err(zbus::Error::from)?;
    Ok(workspace_from(&all))
}

/// The REST form of a workspace object's properties.
fn workspace_from(all: &HashMap<String, OwnedVariant>) -> Value {
    let field = |k: &str| all.get(k).map(|v| variant_json(v)).unwrap_or(Value::Null);
    json!({
        "id": field("Id"),
        "name": field("Name"),
        "workspace_type": field("Type"),
        "status": field("Status"),
        "error_message": field("ErrorMessage"),
        "build_step": field("BuildStep"),
        "path": field("Path"),
        "distro": field("Distro"),
        "env_var_names": field("EnvVarNames"),
        "skills": field("Skills"),
        "tools": field("Tools"),
        "template": field("Template"),
        "created_at": field("CreatedAt"),
        "machine_name": field("MachineName"),
        "network": field("Network"),
        "limits": {
            "memory_max": field("MemoryMax"),
            "cpu_quota_percent": field("CPUQuotaPercent"),
            "tasks_max": field("TasksMax"),
        },
    })
}

async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let spec = schema::CREATE.from_json(body_json(body)?)?;
    let path = manager(&state).await?.create_workspace(args(&spec)).await?;
    let id = path.as_str().rsplit('/').next().unwrap_or_default();
    let id = crate::core::names::bus_label_unescape(id).unwrap_or_default();
    info!(workspace_id = %id, "REST: created workspace");
    Ok((
        StatusCode::CREATED,
        Json(workspace_json(&state, &id).await?),
    ))
}

/// Every workspace in one bus call (the ObjectManager's), oldest first.
async fn list(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
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

async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(workspace_json(&state, &id).await?))
}

async fn update(
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

async fn destroy(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    manager(&state).await?.destroy_workspace(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn build(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    manager(&state).await?.build_workspace(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(workspace_json(&state, &id).await?),
    ))
}

async fn rebuild(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    manager(&state).await?.rebuild_workspace(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(workspace_json(&state, &id).await?),
    ))
}

fn exec_json(reply: crate::dbus::client::ExecReply) -> Json<Value> {
    let (exit_code, stdout, stderr, timed_out, _) = reply;
    Json(json!({
        "exit_code": exit_code,
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
        "timed_out": timed_out,
    }))
}

async fn exec(
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
fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.split(';').next().unwrap_or("").trim() == "text/event-stream")
}

#[derive(Deserialize)]
struct LogQuery {
    max_lines: Option<u32>,
}

async fn init_log(
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

async fn debug(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let info = manager(&state).await?.get_debug_info(&id).await?;
    let map: Map<String, Value> = info
        .iter()
        .map(|(k, v)| (k.clone(), variant_json(v)))
        .collect();
    Ok(Json(Value::Object(map)))
}

async fn rerun_init(
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

async fn sync(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    manager(&state).await?.sync_workspace(&id).await?;
    Ok(Json(workspace_json(&state, &id).await?))
}

async fn library(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let (skills, tools) = manager(&state).await?.list_library().await?;
    Ok(Json(json!({"skills": skills, "tools": tools})))
}

async fn templates(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let all = manager(&state).await?.list_templates().await?;
    Ok(Json(Value::Array(
        all.into_iter()
            .map(|(name, description, distro)| {
                json!({"name": name, "description": description, "distro": distro})
            })
            .collect(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses_and_invalid_args_name_the_field() {
        for (e, status) in [
            (Error::NoSuchWorkspace("w".into()), 404),
            (Error::WorkspaceExists("w".into()), 409),
            (Error::Busy("w".into()), 409),
            (Error::invalid("limits.memory_max", "bad"), 400),
            (Error::AccessDenied("no".into()), 403),
            (Error::InteractiveAuthorizationRequired("ask".into()), 403),
            (
                Error::Bus {
                    name: "org.freedesktop.DBus.Error.ServiceUnknown".into(),
                    message: "gone".into(),
                },
                503,
            ),
            (Error::io_msg("disk"), 500),
            (Error::LimitsExceeded("many".into()), 429),
        ] {
            assert_eq!(ApiError::from(e.clone()).status.as_u16(), status, "{e:?}");
        }
        let a = ApiError::from(Error::invalid("limits.memory_max", "bad"));
        assert_eq!(a.field.as_deref(), Some("limits.memory_max"));
        assert_eq!(a.message, "Invalid 'limits.memory_max': bad");
        assert_eq!(
            ApiError::from(Error::NoSuchWorkspace("w".into())).field,
            None
        );
    }

    /// The router over a peer-to-peer bus with nobody behind it: handlers run and their calls
    /// fail, which is all these tests need. Keep the returned peer alive.
    async fn test_app() -> (Router, String, zbus::Connection) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let guid = zbus::Guid::generate();
        let (server, conn) = tokio::join!(
            zbus::connection::Builder::unix_stream(a)
                .server(guid)
                .p2p()
                .build(),
            zbus::connection::Builder::unix_stream(b).p2p().build(),
        );
        let (server, conn) = (server.unwrap(), conn.unwrap());
        // Serving objects makes the peer answer every call (with UnknownObject).
        let _ = server.object_server();
        let token = "t".repeat(16);
        let state = AppState {
            conn,
            bus_address: None,
            token: token.clone(),
        };
        (app(Arc::new(state)), token, server)
    }

    #[tokio::test]
    async fn pages_need_no_token_and_load_nothing_from_elsewhere() {
        use axum::body::Body;
        use tower::ServiceExt;
        let (app, _, _peer) = test_app().await;
        let get = |uri: &str| axum::http::Request::get(uri).body(Body::empty()).unwrap();
        for (path, content_type, _) in PAGES {
            let r = app.clone().oneshot(get(path)).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], *content_type);
            let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap();
            assert!(csp.starts_with("default-src 'self'"), "{csp}");
        }
        let r = app.clone().oneshot(get("/api/openapi.json")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // The pages name no other origin: no fonts, scripts or styles from elsewhere.
        for (path, _, body) in PAGES {
            for foreign in ["http://", "https://", "//fonts", "@import"] {
                assert!(!body.contains(foreign), "{path} contains {foreign}");
            }
        }
        // The API itself still needs the token.
        let r = app.oneshot(get("/api/templates")).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }

    /// The request bodies of the OpenAPI document are the schema's dictionaries: the same
    /// members (limits inside `limits`), each of the schema's JSON type.
    #[test]
    fn the_openapi_request_bodies_are_the_schema() {
        use crate::dbus::schema::{self, Json, Keys};
        use std::collections::BTreeMap;

        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let schemas = &doc["components"]["schemas"];
        let documented = |name: &str, but: &[&str]| -> BTreeMap<String, String> {
            let props = schemas[name]["properties"].as_object().unwrap();
            assert_eq!(schemas[name]["additionalProperties"], false, "{name}");
            props
                .iter()
                .filter(|(k, _)| !but.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v["type"].as_str().unwrap_or("$ref").to_owned()))
                .collect()
        };
        let wanted = |keys: Keys, place: Json| -> BTreeMap<String, String> {
            let mut out: BTreeMap<String, String> = keys
                .keys
                .iter()
                .filter(|k| k.json == place)
                .map(|k| (k.name.to_owned(), k.ty.json_type().to_owned()))
                .collect();
            if place == Json::Member && keys.keys.iter().any(|k| k.json == Json::Limit) {
                out.insert(schema::LIMITS.to_owned(), "$ref".to_owned());
            }
            out
        };
        assert_eq!(
            documented("CreateWorkspace", &[]),
            wanted(schema::CREATE, Json::Member)
        );
        assert_eq!(
            documented("UpdateWorkspace", &[]),
            wanted(schema::CHANGES, Json::Member)
        );
        assert_eq!(
            documented("Limits", &[]),
            wanted(schema::CREATE, Json::Limit)
        );
        assert_eq!(
            documented("Limits", &[]),
            wanted(schema::CHANGES, Json::Limit)
        );
        assert_eq!(
            documented("ExecRequest", &["command"]),
            wanted(schema::EXEC, Json::Member)
        );
        assert_eq!(
            documented("RerunInitRequest", &[]),
            wanted(schema::RERUN_INIT, Json::Member)
        );
        // The distros the document offers (and the dashboard lists) are the core's.
        let distros: Vec<&str> = schemas["CreateWorkspace"]["properties"]["distro"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["const"].as_str().unwrap())
            .collect();
        assert_eq!(distros, crate::core::workspace::Distro::NAMES);
    }

    /// The OpenAPI document and the router agree: the same paths, and on each path exactly
    /// the documented methods are routed (the others get 405).
    #[tokio::test]
    async fn the_openapi_document_lists_exactly_the_routes() {
        use axum::body::Body;
        use axum::http::Method;
        use std::collections::BTreeSet;
        use tower::ServiceExt;

        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut routed: BTreeSet<&str> = api_routes().into_iter().map(|(p, _)| p).collect();
        routed.insert("/api/openapi.json");
        assert_eq!(
            paths.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            routed
        );

        let (app, token, _peer) = test_app().await;
        for (path, item) in paths {
            let documented: BTreeSet<String> = item
                .as_object()
                .unwrap()
                .keys()
                .map(|m| m.to_uppercase())
                .collect();
            let uri = path.replace("{id}", "some-workspace");
            for method in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ] {
                let request = axum::http::Request::builder()
                    .method(method.clone())
                    .uri(&uri)
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .body(Body::from("{}"))
                    .unwrap();
                let response = app.clone().oneshot(request).await.unwrap();
                let status = response.status();
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    assert!(response.headers().contains_key(header::ALLOW));
                    let body = axum::body::to_bytes(response.into_body(), 4096)
                        .await
                        .unwrap();
                    let error: Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(
                        error["error"]["code"], "method_not_allowed",
                        "{method} {path}"
                    );
                }
                let want_routed = documented.contains(method.as_str());
                assert_eq!(
                    status != StatusCode::METHOD_NOT_ALLOWED && status != StatusCode::NOT_FOUND,
                    want_routed,
                    "{method} {path}: {status}"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_head_is_431_with_the_documented_body() {
        use axum::body::Body;
        use tower::ServiceExt;
        let (app, token, _peer) = test_app().await;
        let request = axum::http::Request::builder()
            .uri("/api/templates")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header("x-big", "a".repeat(MAX_HEADER_BYTES))
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "header_too_large");
    }

    #[test]
    fn bodies_are_json_whatever_the_content_type() {
        let m = body_json(Bytes::from_static(br#"{"command": "true"}"#)).unwrap();
        assert_eq!(m["command"], "true");
        assert!(body_json(Bytes::from_static(b"[1]")).is_err());
        assert!(body_json(Bytes::from_static(b"  ")).unwrap().is_empty());
    }
}
