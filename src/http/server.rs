//! The server: its listener, connection and head/body limits and timeouts, the token check.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tracing::warn;

use super::*;

/// The token of `Authorization: Bearer TOKEN`, if the request has one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes)
        .filter(|t| !t.is_empty())
}

/// Whether `given` is the API token (compared in constant time).
fn is_api_token(state: &AppState, given: &[u8]) -> bool {
    !given.is_empty() && bool::from(given.ct_eq(state.token.as_bytes()))
}

fn unauthorized() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid 'Authorization: Bearer <token>' header is required",
    )
    .into_response()
}

pub(super) async fn require_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = bearer(&headers)
        .map(<[u8]>::to_vec)
        .or_else(|| websocket_token(&headers))
        .unwrap_or_default();
    if is_api_token(&state, &given) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

/// `/mcp`'s check: the API token, or one of the MCP-only tokens of `[mcp.tokens]` (which open
/// `/mcp` and nothing else). The token's name goes with the request, for the MCP server's
/// limits and audit.
pub(super) async fn require_mcp_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(given) = bearer(&headers) else {
        return unauthorized();
    };
    let name = if is_api_token(&state, given) {
        Some(super::TOKEN_NAME.to_owned())
    } else {
        let mcp = state.mcp.as_ref();
        mcp.and_then(|m| m.mcp_token(given)).map(|t| t.name.clone())
    };
    let Some(name) = name else {
        return unauthorized();
    };
    request.extensions_mut().insert(crate::mcp::TokenName(name));
    next.run(request).await
}

/// The token a browser's WebSocket gives, which cannot set `Authorization`: offered as the
/// subprotocol `bearer.<the token in hex>` (beside `agent-workspaces.terminal`, the one the
/// server selects), as Kubernetes takes its bearer token. Hex, because a subprotocol is a
/// plain token and base64 has characters it may not hold.
fn websocket_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let hex = offered
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("bearer."))?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A request head over [`MAX_HEADER_BYTES`] is answered 431 with the documented error body.
/// (hyper's own limit, which answers with an empty 431, is set well above it.)
pub(super) async fn limit_head(request: Request, next: Next) -> Response {
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
pub(super) const HYPER_MAX_HEADER_BYTES: usize = 256 * 1024;
pub(super) const HYPER_MAX_HEADERS: usize = 1024;
/// Time a client has to send a request head, and how long an idle kept-alive connection stays.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a whole request body; slower is answered 408.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a stop waits for running requests (streaming execs included).
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
    // hyper-util's GracefulShutdown does not take connections that may be upgraded (the
    // terminal's WebSocket): each connection is told to finish by this token instead.
    let stopping = tokio_util::sync::CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
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
        // Answers go out as they are written (a proxied answer's head, then its body).
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stopping = stopping.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stopping.cancelled() => {
                    // Finishes the request in flight, then closes.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(slot);
        });
    }
    stopping.cancel();
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        warn!("Stopping with requests still running after {SHUTDOWN_GRACE:?}");
    }
    Ok(())
}

/// Reads the whole request body within [`BODY_TIMEOUT`] and [`BODY_LIMIT`], before any
/// handler runs; handlers then take it as `Bytes`.
pub(super) async fn read_body(request: Request, next: Next) -> Response {
    use futures_util::StreamExt;
    // A file's or an archive's content streams to the service as it comes.
    if super::files::streams_body(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
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
