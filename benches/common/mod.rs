//! The benchmark's HTTP pieces: a kept-alive client of the bridge, a tiny server on the
//! loopback (a dev server's stand-in) and a one-shot GET to it; timing (`timing`); the far
//! side of the network figures (`network`).

pub mod files;
pub mod network;
pub mod timing;

/// A minimal client of the bridge: hyper's HTTP/1.1 connection, kept alive.
pub struct RestClient {
    sender: tokio::sync::Mutex<
        hyper::client::conn::http1::SendRequest<http_body_util::Full<axum::body::Bytes>>,
    >,
    token: String,
}

impl RestClient {
    pub async fn connect(addr: &str, token: &str) -> Self {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("the bridge listens (agent-workspaces-http.socket)");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP handshake");
        tokio::spawn(conn);
        Self {
            sender: tokio::sync::Mutex::new(sender),
            token: token.to_owned(),
        }
    }

    pub async fn exec(&self, workspace: &str, command: &str) {
        use http_body_util::BodyExt;
        let body = serde_json::json!({ "command": command }).to_string();
        let request = hyper::Request::post(format!("/api/workspaces/{workspace}/exec"))
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {}", self.token))
            .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
            .expect("request");
        let mut sender = self.sender.lock().await;
        sender.ready().await.expect("the connection is open");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(v["exit_code"], 0, "{v}");
    }
}

impl RestClient {
    /// GET `path`, the whole answer read; its status.
    pub async fn get(&self, path: &str) -> u16 {
        use http_body_util::BodyExt;
        let request = hyper::Request::get(path)
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {}", self.token))
            .body(http_body_util::Full::new(axum::body::Bytes::new()))
            .expect("request");
        let mut sender = self.sender.lock().await;
        sender.ready().await.expect("the connection is open");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        response.into_body().collect().await.expect("body");
        status
    }
}

/// A minimal HTTP server on the loopback (what a dev server in a host workspace would be):
/// `ok` to every request, keeping the connection for the next unless asked to close it.
pub async fn tiny_http_server() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await
                    && n > 0
                {
                    let close = buf[..n]
                        .windows(17)
                        .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
                    let answer: &[u8] = if close {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if stream.write_all(answer).await.is_err() || close {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// GET / on the loopback port over a connection kept from the one before.
pub struct KeptGet(tokio::net::TcpStream);

impl KeptGet {
    pub async fn new(port: u16) -> Self {
        Self(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        )
    }

    pub async fn get(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.0
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("send");
        let mut answer = [0u8; 256];
        let mut got = 0;
        while !answer[..got].ends_with(b"ok") {
            let n = self.0.read(&mut answer[got..]).await.expect("answer");
            assert!(n > 0, "closed");
            got += n;
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
    }
}

/// GET / on the loopback port over a fresh connection (as the proxy reaches the server).
pub async fn direct_get(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.expect("answer");
    assert!(answer.starts_with(b"HTTP/1.1 200"));
}

/// Waits until a workspace is ready (after a create or a rebuild).
pub async fn wait_ready(conn: &zbus::Connection, path: zbus::OwnedObjectPath) {
    let ws = agent_workspaces::dbus::client::WorkspaceProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("proxy");
    loop {
        match ws.status().await.expect("status").as_str() {
            "ready" => return,
            "error" => panic!(
                "build failed: {}",
                ws.error_message().await.unwrap_or_default()
            ),
            _ => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
}

/// How long starting a stopped container takes: the median of 5 stops and starts.
pub async fn start_time(
    m: &agent_workspaces::dbus::client::WorkspacesProxy<'_>,
    name: &str,
) -> f64 {
    let mut starts = Vec::new();
    for _ in 0..5 {
        m.stop_workspace(name).await.expect("stop");
        let t = std::time::Instant::now();
        m.start_workspace(name).await.expect("start");
        starts.push(t.elapsed());
    }
    timing::median(starts)
}

/// A unit's memory use: its `MemoryCurrent`, or where the memory controller is not available
/// (no accounting), the proportional set size (Pss) of its processes, from their smaps.
pub fn unit_memory(unit: &str) -> Option<(u64, &'static str)> {
    let show = |p: &str| {
        std::process::Command::new("systemctl")
            .args(["show", "-p", p, "--value", unit])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    if let Ok(bytes) = show("MemoryCurrent").parse() {
        return Some((bytes, "MemoryCurrent"));
    }
    let cgroup = show("ControlGroup");
    let mut procs = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(format!("/sys/fs/cgroup{cgroup}"))];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
        let list = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        procs.extend(list.lines().map(str::to_owned));
    }
    let pss: u64 = procs
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum();
    (!procs.is_empty()).then_some((pss * 1024, "Pss of its processes"))
}

/// Creates a debian-bookworm container workspace (with `extra` spec keys) and waits until it
/// is ready; returns the time.
pub async fn build_container(
    conn: &zbus::Connection,
    m: &agent_workspaces::dbus::client::WorkspacesProxy<'_>,
    name: &str,
    extra: &[(&str, zbus::Variant<'_>)],
) -> std::time::Duration {
    use zbus::Variant;
    let t = std::time::Instant::now();
    let mut spec: std::collections::HashMap<&str, Variant<'_>> = std::collections::HashMap::from([
        ("name", Variant::from(name)),
        ("workspace_type", Variant::from("container")),
        ("distro", Variant::from("debian-bookworm")),
        ("build_on_create", Variant::from(true)),
    ]);
    for (k, v) in extra {
        spec.insert(k, v.try_clone().expect("a plain value"));
    }
    let path = m.create_workspace(spec).await.expect("create container");
    wait_ready(conn, path).await;
    t.elapsed()
}
