//! Exec latency through D-Bus against a baseline measured in the same run. Runs inside the
//! test host against the installed service: `make bench`. Prints figures and ratios; asserts
//! nothing (targets are judged from the ratios, never by timed assertions).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agent_workspaces::dbus::client::WorkspacesProxy;

const ROUNDS: usize = 300;
/// Per-exec systemd-nspawn is slow; fewer rounds of it.
const NSPAWN_ROUNDS: usize = 40;
const WARMUP: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{label:<48} p50 {:>8.3} ms   p99 {:>8.3} ms   ({} runs)",
        p50.as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.len()
    );
    p50
}

async fn time_n<F, Fut>(rounds: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..WARMUP.min(rounds) {
        f().await;
    }
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f().await;
        out.push(t.elapsed());
    }
    out
}

async fn run_ok(argv: Vec<String>) {
    let s = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("spawn");
    assert!(s.success(), "{argv:?} failed");
}

/// Creates a debian-bookworm container workspace and waits until it is ready; returns the time.
async fn build_container(conn: &zbus::Connection, m: &WorkspacesProxy<'_>, name: &str) -> Duration {
    use zbus::Variant;
    let t = Instant::now();
    let spec: HashMap<&str, Variant<'_>> = HashMap::from([
        ("name", Variant::from(name)),
        ("workspace_type", Variant::from("container")),
        ("distro", Variant::from("debian-bookworm")),
        ("build_on_create", Variant::from(true)),
    ]);
    let path = m.create_workspace(spec).await.expect("create container");
    let ws = agent_workspaces::dbus::client::WorkspaceProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("proxy");
    loop {
        match ws.status().await.expect("status").as_str() {
            "ready" => return t.elapsed(),
            "error" => panic!(
                "build failed: {}",
                ws.error_message().await.unwrap_or_default()
            ),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A minimal client of the bridge: hyper's HTTP/1.1 connection, kept alive.
struct RestClient {
    sender: tokio::sync::Mutex<
        hyper::client::conn::http1::SendRequest<http_body_util::Full<axum::body::Bytes>>,
    >,
    token: String,
}

impl RestClient {
    async fn connect(addr: &str, token: &str) -> Self {
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

    async fn exec(&self, workspace: &str, command: &str) {
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

async fn time_async<F, Fut>(f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    time_n(ROUNDS, f).await
}

#[tokio::main]
async fn main() {
    let conn = zbus::Connection::system().await.expect("system bus");
    let m = WorkspacesProxy::new(&conn).await.expect("proxy");
    let exec = |cmd: &'static str| {
        let m = m.clone();
        async move {
            let (code, ..) = m.exec("host", cmd, HashMap::new()).await.expect("exec");
            assert_eq!(code, 0);
        }
    };

    println!("agent-workspaces exec benchmark ({ROUNDS} runs each, after {WARMUP} warm-up runs)");
    let fork_exec = time_async(|| async {
        let s = tokio::process::Command::new("/bin/bash")
            .args(["-c", "true"])
            .status()
            .await
            .expect("bash");
        assert!(s.success());
    })
    .await;
    let base = report(
        "baseline: fork+exec of bash -c true (in-process)",
        fork_exec,
    );
    let ping = time_async(|| async {
        zbus::fdo::PeerProxy::builder(&conn)
            .destination("org.agent.Workspaces")
            .path("/org/agent/Workspaces")
            .build()
            .await
            .expect("peer")
            .ping()
            .await
            .expect("ping");
    })
    .await;
    let ping = report("baseline: D-Bus round trip (Peer.Ping)", ping);
    let dbus = report(
        "Exec('host', 'true') through D-Bus",
        time_async(|| exec("true")).await,
    );
    println!(
        "ratio Exec / fork+exec p50: {:.2}x   (Exec - fork+exec - Ping: {:.3} ms of service overhead)",
        dbus.as_secs_f64() / base.as_secs_f64(),
        (dbus.as_secs_f64() - base.as_secs_f64() - ping.as_secs_f64()) * 1e3
    );

    // The same call through the REST bridge: one kept-alive HTTP/1.1 connection.
    let token = std::fs::read_to_string("/etc/agent-workspaces/api-token")
        .expect("the bridge's token (tests/bench.sh writes it)");
    let rest = RestClient::connect("127.0.0.1:7600", token.trim()).await;
    let rest_exec = report(
        "POST /api/workspaces/host/exec through the bridge",
        time_async(|| rest.exec("host", "true")).await,
    );
    // The bridge's user is not root, so each of its calls is authorized by polkit (root's are
    // not): measure that round trip too, to tell the bridge's own cost apart.
    let polkit = zbus_polkit::policykit1::AuthorityProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("polkit proxy");
    let subject = zbus_polkit::policykit1::Subject::new_for_pid(std::process::id(), None, None)
        .expect("subject");
    let details = HashMap::from([("workspace", "host"), ("verb", "exec in")]);
    let check = report(
        "baseline: polkit CheckAuthorization round trip",
        time_async(|| async {
            polkit
                .check_authorization(
                    &subject,
                    "org.agent.workspaces.exec-host",
                    &details,
                    zbus_polkit::policykit1::CheckAuthorizationFlags::empty(),
                    "",
                )
                .await
                .expect("CheckAuthorization");
        })
        .await,
    );
    println!(
        "ratio REST exec / D-Bus Exec p50: {:.2}x   (the bridge adds {:.3} ms, {:.3} ms beyond the polkit check its calls need)",
        rest_exec.as_secs_f64() / dbus.as_secs_f64(),
        (rest_exec.as_secs_f64() - dbus.as_secs_f64()) * 1e3,
        (rest_exec.as_secs_f64() - dbus.as_secs_f64() - check.as_secs_f64()) * 1e3
    );

    for clients in [1usize, 8] {
        let per_client = 100;
        let t = Instant::now();
        let client = || async {
            for _ in 0..per_client {
                exec("true").await;
            }
        };
        futures_util::future::join_all((0..clients).map(|_| client())).await;
        let rate = (clients * per_client) as f64 / t.elapsed().as_secs_f64();
        println!("throughput with {clients} concurrent clients: {rate:>8.1} execs/s");
    }

    println!();
    println!("container workspace (debian-bookworm, base tree cached)");
    let pid = std::process::id();
    let name = format!("bench-{pid}");
    let other = format!("bench-nspawn-{pid}");
    // One build varies with the disk (the tree is unpacked to /var/lib/machines): the median
    // of a few, each destroyed before the next.
    let mut builds = Vec::new();
    for i in 0..3 {
        let scratch = format!("bench-build-{pid}-{i}");
        builds.push(build_container(&conn, &m, &scratch).await);
        m.destroy_workspace(&scratch).await.expect("destroy");
    }
    builds.push(build_container(&conn, &m, &name).await);
    builds.sort();
    println!(
        "{:<48} {:>8.3} s   (median of {}; min {:.3} s, max {:.3} s)",
        "cached build: create -> ready",
        builds[builds.len() / 2].as_secs_f64(),
        builds.len(),
        builds[0].as_secs_f64(),
        builds[builds.len() - 1].as_secs_f64()
    );
    m.exec(&name, "true", HashMap::new())
        .await
        .expect("the first exec starts the container");
    let leader = String::from_utf8(
        tokio::process::Command::new("machinectl")
            .args(["show", "-p", "Leader", "--value", &name])
            .output()
            .await
            .expect("machinectl")
            .stdout,
    )
    .expect("utf8")
    .trim()
    .to_owned();
    let floor = report(
        "floor: nsenter -t <leader> -a /bin/true",
        time_async(|| {
            run_ok(
                ["nsenter", "-t", &leader, "-a", "/bin/true"]
                    .map(String::from)
                    .to_vec(),
            )
        })
        .await,
    );
    let cexec = {
        let m = m.clone();
        let name = name.clone();
        report(
            "Exec(container, 'true') through D-Bus",
            time_async(|| {
                let m = m.clone();
                let name = name.clone();
                async move {
                    let (code, ..) = m.exec(&name, "true", HashMap::new()).await.expect("exec");
                    assert_eq!(code, 0);
                }
            })
            .await,
        )
    };
    build_container(&conn, &m, &other).await;
    m.inner()
        .call::<_, _, ()>("StopWorkspace", &(other.as_str(),))
        .await
        .expect("stop");
    let tree = format!("/var/lib/machines/{other}");
    let nspawn = report(
        "baseline to beat: systemd-nspawn -D <tree> /bin/true",
        time_n(NSPAWN_ROUNDS, || {
            run_ok(
                [
                    "systemd-nspawn",
                    "-q",
                    "--register=no",
                    "-D",
                    &tree,
                    "/bin/true",
                ]
                .map(String::from)
                .to_vec(),
            )
        })
        .await,
    );
    println!(
        "ratio Exec / nsenter floor p50: {:.2}x (target: at most 3x)",
        cexec.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "ratio per-exec nspawn / Exec p50: {:.2}x (target: at least 5x)",
        nspawn.as_secs_f64() / cexec.as_secs_f64()
    );
    for clients in [1usize, 8] {
        let per_client = 50;
        let t = Instant::now();
        let client = || async {
            for _ in 0..per_client {
                let (code, ..) = m.exec(&name, "true", HashMap::new()).await.expect("exec");
                assert_eq!(code, 0);
            }
        };
        futures_util::future::join_all((0..clients).map(|_| client())).await;
        let rate = (clients * per_client) as f64 / t.elapsed().as_secs_f64();
        println!("container throughput with {clients} concurrent clients: {rate:>8.1} execs/s");
    }
    for n in [&name, &other] {
        m.destroy_workspace(n).await.expect("destroy");
    }
}
