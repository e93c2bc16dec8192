//! The port proxy: `/api/workspaces/{id}/ports/{port}/{path}` reaches `/{path}` on `port`
//! inside the workspace (a dev server, a browser's DevTools), behind the same token, on
//! either network, without opening the host's network. Each request gets a connection from
//! `ConnectPort` (made inside a container by its agent) and is sent on as HTTP/1.1; a
//! WebSocket (or any upgrade) is joined through once both sides have switched.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;

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
        .and_then(|()| tokio::net::TcpStream::from_std(tcp))
        .map_err(bad_gateway)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(bad_gateway)?;
    tokio::spawn(conn.with_upgrades());

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
    let mut response = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(bad_gateway)?;

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
}
