//! The port proxy: `/api/workspaces/{id}/ports/{port}/{path}` reaches `/{path}` on `port`
//! inside the workspace (a dev server, a browser's DevTools), behind the same token, on
//! either network, without opening the host's network. A request goes on as HTTP/1.1 over a
//! connection kept from an earlier one to the same port when there is one (`Kept`), else over
//! a new one from `ConnectPort` (made inside a container by its agent); a WebSocket (or any
//! upgrade) always gets a new one and is joined through once both sides have switched.
//!
//! What the workspace serves is not trusted to end: reaching the port, the answer's first
//! byte and every pause of a connection have a limit (`PortLimits`, set on the command line),
//! and so has the number of connections open to one workspace's ports at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;

use super::kept::Kept;
use super::*;

/// Headers that belong to one hop and are not sent on (RFC 9110, 7.6.1), besides those the
/// `Connection` header names.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn bad_gateway(message: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", message.to_string())
}

fn gateway_timeout(message: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "gateway_timeout",
        message.to_string(),
    )
}

/// The port proxy's limits.
#[derive(Debug, Clone, Copy)]
pub struct PortLimits {
    /// To reach the port (`ConnectPort` and the HTTP handshake).
    pub connect: Duration,
    /// For the server to begin its answer.
    pub first_byte: Duration,
    /// A connection with nothing sent either way for this long is closed.
    pub idle: Duration,
    /// Connections open at once to one workspace's ports.
    pub per_workspace: u64,
    /// How long a connection waits, unused, to be reused for a next request.
    pub keep: Duration,
}

impl Default for PortLimits {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(60),
            idle: Duration::from_secs(300),
            per_workspace: 64,
            keep: Duration::from_secs(4),
        }
    }
}

/// The port proxy's state: its limits, the connections open to each workspace and those kept.
pub struct PortProxy {
    limits: PortLimits,
    pub(super) open: Arc<Mutex<HashMap<String, u64>>>,
    pub(super) kept: Kept,
}

impl PortProxy {
    pub fn new(limits: PortLimits) -> Self {
        Self {
            limits,
            open: Arc::default(),
            kept: Kept::default(),
        }
    }

    /// A place for one more connection to `workspace`'s ports, held until it is dropped.
    pub(super) fn take(&self, workspace: &str) -> ApiResult<Arc<Place>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(workspace.to_owned()).or_default();
        if *n >= self.limits.per_workspace {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "limits_exceeded",
                format!(
                    "{} connections to the ports of workspace '{workspace}' are open already (at most {})",
                    *n, self.limits.per_workspace
                ),
            ));
        }
        *n += 1;
        Ok(Arc::new(Place {
            open: self.open.clone(),
            workspace: workspace.to_owned(),
        }))
    }
}

/// One connection's place among a workspace's: given back when the last holder drops it.
pub(super) struct Place {
    open: Arc<Mutex<HashMap<String, u64>>>,
    workspace: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.workspace) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.workspace);
            }
        }
    }
}

/// A connection that fails (`TimedOut`) once nothing has moved either way for `limit`; it
/// holds its workspace's place while it lives, and until it is closed. It is closed off the
/// event loop: the workspace's side may have set `SO_LINGER` on it (it came from inside), and
/// closing the last copy of such a socket waits for its peer.
pub(super) struct Idle<T: Send + 'static> {
    inner: Option<T>,
    limit: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    place: Option<Arc<Place>>,
}

impl<T: Send + 'static> Drop for Idle<T> {
    fn drop(&mut self) {
        let (inner, place) = (self.inner.take(), self.place.take());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn_blocking(move || drop((inner, place))));
        }
    }
}

impl<T: Send + 'static> Idle<T> {
    pub(super) fn new(inner: T, limit: Duration, place: Arc<Place>) -> Self {
        Self {
            inner: Some(inner),
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            place: Some(place),
        }
    }

    fn inner(&mut self) -> Pin<&mut T>
    where
        T: Unpin,
    {
        Pin::new(self.inner.as_mut().expect("held until dropped"))
    }

    fn moved(&mut self) {
        let next = tokio::time::Instant::now() + self.limit;
        self.deadline.as_mut().reset(next);
    }

    /// Pending: whether the limit has passed (then the call fails).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "nothing was sent either way within the port proxy's idle limit",
    )
}

impl<T: AsyncRead + Unpin + Send + 'static> AsyncRead for Idle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match self.inner().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin + Send + 'static> AsyncWrite for Idle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.inner().poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner().poll_shutdown(cx)
    }
}

/// Removes the hop-by-hop headers; keeps `Connection: upgrade` and `Upgrade` when `upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let kept_upgrade = headers.get(header::UPGRADE).cloned();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
    if let (true, Some(u)) = (upgrade, kept_upgrade) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u);
    }
}

/// The token stays with the bridge: neither its header nor a `bearer.` subprotocol goes on.
fn strip_token(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    let protocols: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.starts_with("bearer."))
        .map(str::to_owned)
        .collect();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if let Ok(v) = HeaderValue::from_str(&protocols.join(", "))
        && !protocols.is_empty()
    {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
}

pub(super) async fn proxy(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    mut request: Request,
) -> ApiResult<Response> {
    let id = params.get("id").cloned().unwrap_or_default();
    let port: u16 = params
        .get("port")
        .and_then(|p| p.parse().ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| ApiError::invalid("port", "must be 1 to 65535"))?;
    let prefix = format!("/api/workspaces/{id}/ports/{port}");
    let rest = params.get("path").map(String::as_str).unwrap_or("");
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri: Uri = format!("/{rest}{query}")
        .parse()
        .map_err(|e| ApiError::invalid("path", e))?;

    let limits = state.ports.limits;
    let upgrade = request.headers().contains_key(header::UPGRADE);
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    parts.uri = uri;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    strip_token(&mut parts.headers);
    // As a browser inside would ask (DevTools accepts only a local Host).
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&format!("localhost:{port}")).map_err(bad_gateway)?,
    );
    if let Ok(v) = HeaderValue::from_str(&prefix) {
        parts.headers.insert("x-forwarded-prefix", v);
    }
    let no_answer = || {
        gateway_timeout(format!(
            "the server on port {port} in workspace '{id}' did not answer within {} s",
            limits.first_byte.as_secs()
        ))
    };
    // A request without a body that a kept connection lost on its way (the server closed the
    // connection as it was sent) is sent again on a new one.
    let again = (!upgrade
        && matches!(
            parts.method,
            axum::http::Method::GET | axum::http::Method::HEAD
        )
        && hyper::body::Body::size_hint(&body).exact() == Some(0))
    .then(|| parts.clone());
    let mut pending = Some(Request::from_parts(parts, body));
    let key = (id.clone(), port);

    // A kept connection first (never for an upgrade, which takes its connection away); a
    // request one could not take (closed meanwhile) goes to the next, then to a new one.
    let mut answered = None;
    while !upgrade && let Some(mut sender) = state.ports.kept.take(&key, limits.keep) {
        let Some(request) = pending.take() else {
            break;
        };
        match tokio::time::timeout(limits.first_byte, sender.try_send_request(request)).await {
            Err(_) => return Err(no_answer()),
            Ok(Ok(response)) => {
                answered = Some((sender, response));
                break;
            }
            Ok(Err(mut e)) => {
                pending = Some(match (e.take_message(), &again) {
                    (Some(unsent), _) => unsent,
                    (None, Some(head)) => Request::from_parts(head.clone(), Body::empty()),
                    (None, None) => return Err(bad_gateway(e.into_error())),
                });
            }
        }
    }
    let (sender, mut response) = match answered {
        Some(answered) => answered,
        None => {
            let place = state.ports.take(&id)?;
            let reach = async {
                let fd = manager(&state)
                    .await?
                    .connect_port(&id, port)
                    .await
                    .map_err(|e| match crate::core::Error::from(e) {
                        crate::core::Error::JobFailed(m) => bad_gateway(m),
                        other => other.into(),
                    })?;
                let tcp = std::net::TcpStream::from(std::os::fd::OwnedFd::from(fd));
                let tcp = tcp
                    .set_nonblocking(true)
                    .and_then(|()| tcp.set_nodelay(true))
                    .and_then(|()| tokio::net::TcpStream::from_std(tcp))
                    .map_err(bad_gateway)?;
                let tcp = Idle::new(tcp, limits.idle, place);
                hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(bad_gateway)
            };
            let (mut sender, conn) =
                tokio::time::timeout(limits.connect, reach)
                    .await
                    .map_err(|_| {
                        gateway_timeout(format!(
                            "port {port} in workspace '{id}' was not reached within {} s",
                            limits.connect.as_secs()
                        ))
                    })??;
            tokio::spawn(conn.with_upgrades());
            let request = pending.take().expect("sent on no kept connection");
            let response = tokio::time::timeout(limits.first_byte, sender.send_request(request))
                .await
                .map_err(|_| no_answer())?
                .map_err(bad_gateway)?;
            (sender, response)
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_side
    {
        let server_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(client), Ok(server)) = tokio::join!(client_side, server_side) {
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(server),
                )
                .await;
            }
        });
    } else {
        strip_hop_by_hop(response.headers_mut(), false);
        if !upgrade && !limits.keep.is_zero() {
            // Kept for the next request once this answer has been read whole.
            state
                .ports
                .kept
                .give_back(key, sender, limits.idle, limits.keep);
        }
    }
    // A redirect to a path of the server inside stays below the prefix.
    if let Some(location) = response
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .filter(|l| l.starts_with('/') && !l.starts_with("//"))
        .and_then(|l| HeaderValue::from_str(&format!("{prefix}{l}")).ok())
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_token_stay_here() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, bearer.736563726574"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        strip_token(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "sec-websocket-protocol"]);
        assert_eq!(h[header::SEC_WEBSOCKET_PROTOCOL], "chat");

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("bearer.00"),
        );
        strip_hop_by_hop(&mut h, true);
        strip_token(&mut h);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(!h.contains_key(header::SEC_WEBSOCKET_PROTOCOL));
    }

    #[test]
    fn connections_to_one_workspace_are_capped_and_given_back() {
        let proxy = PortProxy::new(PortLimits {
            per_workspace: 2,
            ..PortLimits::default()
        });
        let a = proxy.take("box").unwrap();
        let b = proxy.take("box").unwrap();
        let e = proxy.take("box").err().unwrap();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::TOO_MANY_REQUESTS, "limits_exceeded")
        );
        // Another workspace has places of its own.
        let _other = proxy.take("web").unwrap();
        drop(a);
        let _c = proxy.take("box").unwrap();
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stays_silent_is_cut_at_the_idle_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let proxy = PortProxy::new(PortLimits::default());
        let (near, mut far) = tokio::io::duplex(64);
        let mut conn = Idle::new(near, Duration::from_secs(30), proxy.take("box").unwrap());
        // Traffic either way keeps it open past the limit.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            far.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).await.unwrap();
            conn.write_all(b"y").await.unwrap();
            far.read_exact(&mut b).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        let mut b = [0u8; 1];
        let e = conn.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        // Its place is given back once it is closed (off the event loop).
        drop(conn);
        let given_back = async {
            while !proxy.open.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), given_back)
            .await
            .expect("the place given back");
    }
}
