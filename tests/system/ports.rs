//! The port proxy (`/api/workspaces/{id}/ports/{port}/...` over `ConnectPort`): HTTP and
//! WebSocket to a server on a host workspace's loopback and inside a private-network
//! container, behind the token, which is not sent on.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use zbus::Variant;

use super::rest::{TOKEN, bridge_socket_up, curl};
use super::*;

/// A small server on the test host's loopback: `/ws` echoes WebSocket messages; `/go`
/// redirects to `/target`; anything else answers with what it was asked (request line, Host,
/// whether a token came along).
async fn serve_on_loopback() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let n = stream.peek(&mut head).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]).into_owned();
                if head.starts_with("GET /ws ") {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                let mut buf = vec![0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let line = head.lines().next().unwrap_or_default().to_owned();
                let host = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("host: ")
                            .or_else(|| l.strip_prefix("Host: "))
                    })
                    .unwrap_or_default()
                    .to_owned();
                let token = head.to_ascii_lowercase().contains("authorization");
                let answer = if line.starts_with("GET /go ") {
                    "HTTP/1.1 302 Found\r\nLocation: /target\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                } else {
                    let body = format!("{line} host={host} token={token}");
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

async fn websocket_echo(path: &str) {
    let mut req = format!("ws://127.0.0.1:7600{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text("ping through the proxy"))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the echo within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        echoed.into_text().unwrap().as_str(),
        "ping through the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_proxy_reaches_a_host_workspace_s_loopback() {
    require_test_host();
    bridge_socket_up();
    let port = serve_on_loopback().await;
    let base = format!("/api/workspaces/host/ports/{port}");
    let (status, body) = curl("GET", &format!("{base}/hello?x=1"), Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body.as_str().unwrap(),
        format!("GET /hello?x=1 HTTP/1.1 host=localhost:{port} token=false")
    );
    let (status, body) = curl("POST", &format!("{base}/"), Some(TOKEN), "-d x=1");
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            Some(format!("POST / HTTP/1.1 host=localhost:{port} token=false").as_str())
        )
    );
    // A redirect stays below the prefix.
    let out = sh(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}} %{{redirect_url}}' -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7600{base}/go"
    ));
    assert_eq!(
        out.stdout,
        format!("302 http://127.0.0.1:7600{base}/target")
    );
    websocket_echo(&format!("{base}/ws")).await;
    // The token is needed; a port where nothing listens is a bad gateway.
    assert_eq!(curl("GET", &format!("{base}/"), None, "").0, 401);
    let (status, body) = curl("GET", "/api/workspaces/host/ports/1/", Some(TOKEN), "");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("bad_gateway")),
        "{body}"
    );
    let (status, body) = curl("GET", "/api/workspaces/host/ports/0/", Some(TOKEN), "");
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("port")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_proxy_reaches_inside_a_private_network_container() {
    require_test_host();
    bridge_socket_up();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("ports");
    m.create_workspace(container_spec(
        &name,
        vec![
            ("build_on_create", Variant::from(true)),
            ("network", Variant::from("private")),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(
        wait_built(&conn, &name, Duration::from_secs(1200)).await,
        "ready"
    );
    // A server inside, on the container's own loopback (perl is in every Debian tree).
    let server = r#"perl -MIO::Socket::INET -e '
        my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die $!;
        print "listening\n"; $| = 1;
        while (my $c = $s->accept) { my $l = <$c>; $l =~ s/\r?\n$//;
          my $b = "inside: $l"; print $c "HTTP/1.1 200 OK\r\nContent-Length: " . length($b) . "\r\nConnection: close\r\n\r\n$b"; close $c }'"#;
    m.start_process(&name, server, no_options()).await.unwrap();
    let path = format!("/api/workspaces/{name}/ports/8080/page?q=2");
    let body = wait_for("the server inside", Duration::from_secs(20), || {
        let (status, body) = curl("GET", &path, Some(TOKEN), "");
        (status == 200).then_some(body)
    });
    assert_eq!(body.as_str(), Some("inside: GET /page?q=2 HTTP/1.1"));
    // The host's own loopback is not the container's: nothing of the host is reached there.
    let host_port = serve_on_loopback().await;
    let (status, _) = curl(
        "GET",
        &format!("/api/workspaces/{name}/ports/{host_port}/"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 502);
    m.destroy_workspace(&name).await.unwrap();
}

/// A keep-alive server on the test host's loopback: answers every request on a connection
/// with the number of that connection and how many have been closed so far.
async fn serve_keep_alive() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let closed = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            n += 1;
            let closed = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(got) = stream.read(&mut buf).await
                    && got > 0
                {
                    let body = format!("connection {n}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        break;
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (port, closed)
}

/// Requests to one port reuse a connection kept from the one before, instead of a new one
/// (and a `ConnectPort`) each; a kept connection is closed when it has waited its time and
/// when a workspace's status changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_proxy_keeps_connections_alive_and_cuts_them() {
    use std::sync::atomic::Ordering;
    require_test_host();
    bridge_socket_up();
    let (port, closed) = serve_keep_alive().await;
    let path = format!("/api/workspaces/host/ports/{port}/");
    let get = || {
        let (status, body) = curl("GET", &path, Some(TOKEN), "");
        assert_eq!(status, 200, "{body}");
        body.as_str().unwrap().to_owned()
    };
    for _ in 0..5 {
        assert_eq!(get(), "connection 1", "one connection for every request");
    }
    // Unused for longer than it is kept (4 s): closed, and the next request opens another.
    wait_for(
        "the kept connection closed",
        Duration::from_secs(10),
        || (closed.load(Ordering::SeqCst) == 1).then_some(()),
    );
    assert_eq!(get(), "connection 2");
    assert_eq!(get(), "connection 2");
    // A workspace's status changes (a build begins): every kept connection is closed.
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("cut");
    m.create_workspace(container_spec(&name, vec![]))
        .await
        .unwrap();
    m.build_workspace(&name).await.unwrap();
    wait_for("the kept connection cut", Duration::from_secs(3), || {
        (closed.load(Ordering::SeqCst) == 2).then_some(())
    });
    assert_eq!(get(), "connection 3");
    assert_eq!(
        wait_built(&conn, &name, Duration::from_secs(1200)).await,
        "ready"
    );
    m.destroy_workspace(&name).await.unwrap();
}
