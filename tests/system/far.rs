//! What the network tests share: a "far side" (the internet of the tests: a web server in a
//! network namespace of the test host, on documentation addresses, and a DNS server for its
//! names) and probes from inside a container.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_workspaces::dbus::client::WorkspacesProxy;
use zbus::Variant;

use super::*;

/// A web server in a network namespace of its own, reached from the test host through a veth
/// pair: "the internet" for these tests.
pub struct Far {
    pub addr: Ipv4Addr,
    /// A second address of the far side's web server.
    pub addr2: Ipv4Addr,
    /// The test host's end of the far side's link; the far side's DNS server listens there.
    pub near: Ipv4Addr,
    /// UDP datagrams that reached the far side's port 443.
    pub udp_seen: &'static AtomicUsize,
}

/// The far side's names (`*.far.test`): `allowed`, `other` and `denied` name the web server's
/// addresses, `rebind` a private address (the test host's own); every other name is asked of
/// the test host's resolver.
fn far_answer(query: &[u8], far: (Ipv4Addr, Ipv4Addr)) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    let q = Message::from_vec(query).ok()?;
    let name = q.queries().first()?.name().clone();
    let ascii = name.to_ascii().to_ascii_lowercase();
    let addr = match ascii.as_str() {
        "allowed.far.test." => far.0,
        "other.far.test." | "denied.far.test." => far.1,
        "rebind.far.test." => Ipv4Addr::new(10, 0, 2, 100),
        _ => return None,
    };
    let mut m = Message::new();
    m.set_id(q.id());
    m.set_message_type(MessageType::Response);
    m.set_recursion_desired(true);
    m.set_recursion_available(true);
    m.add_query(q.queries()[0].clone());
    m.add_answer(Record::from_rdata(name, 120, RData::A(A(addr))));
    m.to_vec().ok()
}

/// The far side, made once per run: its addresses are the first of three documentation
/// ranges that does not hold the package mirror's address (the mirror must stay reachable).
pub fn far_side() -> &'static Far {
    static FAR: OnceLock<Far> = OnceLock::new();
    FAR.get_or_init(|| {
        let mirror = ok("getent ahostsv4 deb.debian.org | awk 'NR == 1 {print $1}'");
        let mirror: Ipv4Addr = mirror.trim().parse().expect("the mirror's address");
        let base = [
            Ipv4Addr::new(198, 18, 0, 0),
            Ipv4Addr::new(198, 51, 100, 0),
            Ipv4Addr::new(192, 0, 2, 0),
        ]
        .into_iter()
        .find(|b| b.octets()[..3] != mirror.octets()[..3])
        .unwrap();
        let [a, b, c, _] = base.octets();
        let near = Ipv4Addr::new(a, b, c, 1);
        let addr = Ipv4Addr::new(a, b, c, 2);
        let addr2 = Ipv4Addr::new(a, b, c, 3);
        // A far side of an earlier run in this test host goes first.
        sh("ip netns delete testfar; ip link delete testfar-near");
        ok(&format!(
            "ip netns add testfar && ip link add testfar-near type veth peer name eth0 netns testfar \
             && ip addr add {near}/24 dev testfar-near && ip link set testfar-near up \
             && ip -n testfar addr add {addr}/24 dev eth0 && ip -n testfar addr add {addr2}/24 dev eth0 \
             && ip -n testfar link set eth0 up \
             && ip -n testfar link set lo up"
        ));
        let udp_seen: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open("/run/netns/testfar").unwrap();
            // SAFETY: a plain syscall; this thread stays in the far side's namespace.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let listener = TcpListener::bind("0.0.0.0:80").unwrap();
            let udp = std::net::UdpSocket::bind("0.0.0.0:443").unwrap();
            tx.send(()).unwrap();
            std::thread::spawn(move || {
                let mut b = [0u8; 2048];
                while udp.recv_from(&mut b).is_ok() {
                    udp_seen.fetch_add(1, Ordering::SeqCst);
                }
            });
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || serve_far(conn, (addr, addr2)));
            }
        });
        rx.recv().unwrap();
        // The far side's DNS server, in the test host's namespace on the near address: the
        // service's upstream in the tests of names; other names go to the test host's own.
        let dns = std::net::UdpSocket::bind((near, 53)).unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok((n, from)) = dns.recv_from(&mut b) {
                let answer = far_answer(&b[..n], (addr, addr2)).or_else(|| {
                    let up = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
                    up.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                    up.send_to(&b[..n], "10.0.2.3:53").ok()?;
                    let mut r = [0u8; 4096];
                    let got = up.recv(&mut r).ok()?;
                    Some(r[..got].to_vec())
                });
                if let Some(answer) = answer {
                    let _ = dns.send_to(&answer, from);
                }
            }
        });
        Far {
            addr,
            addr2,
            near,
            udp_seen,
        }
    })
}

/// Answers one HTTP request with "far side" and the Host it named; `GET /resolve?name=NAME`
/// with the address of a far side's name as a resolver over HTTP would (DNS over HTTPS, in
/// the shape that matters here: an address the service's DNS never gave).
fn serve_far(mut conn: TcpStream, far: (Ipv4Addr, Ipv4Addr)) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let host = text
        .lines()
        .find_map(|l| l.strip_prefix("Host: "))
        .unwrap_or("")
        .to_owned();
    let resolved = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|path| path.strip_prefix("/resolve?name="))
        .and_then(|name| match name {
            "allowed.far.test" => Some(far.0),
            "other.far.test" | "denied.far.test" => Some(far.1),
            _ => None,
        });
    let body = match resolved {
        Some(a) => format!("{a}\n"),
        None => format!("far side {host}\n"),
    };
    let _ = write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// Whether a TCP connection from inside `name` to `addr:port` opens (bash's /dev/tcp, 3 s).
pub async fn opens(m: &WorkspacesProxy<'_>, name: &str, addr: &str, port: u16) -> bool {
    let probe = format!(
        "timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/{port}' 2>/dev/null && echo open || echo closed"
    );
    let (code, out, err, ..) = m.exec(name, &probe, no_options()).await.unwrap();
    let out = String::from_utf8_lossy(&out).trim().to_owned();
    assert!(
        code == 0 && (out == "open" || out == "closed"),
        "probe of {addr}:{port} from {name}: {code} {out} {}",
        String::from_utf8_lossy(&err)
    );
    out == "open"
}

/// What `command` prints inside `name` (it must succeed).
pub async fn inside(m: &WorkspacesProxy<'_>, name: &str, command: &str) -> String {
    let (code, out, err, ..) = m
        .exec(
            name,
            command,
            spec(vec![("timeout_secs", Variant::from(60u32))]),
        )
        .await
        .unwrap();
    assert_eq!(
        code,
        0,
        "`{command}` in {name}: {}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The container's resolver: the service on the host end of its link.
pub async fn gateway(m: &WorkspacesProxy<'_>, name: &str) -> String {
    inside(m, name, "awk '/^nameserver/ {print $2}' /etc/resolv.conf")
        .await
        .trim()
        .to_owned()
}

pub fn link_of(id: &str) -> String {
    agent_workspaces::system::network::link_name(id)
}

/// The service's table, as `nft` prints it ("" when there is none).
pub fn table() -> String {
    sh("nft list table inet agent_workspaces").stdout
}

/// A ready container with a network of its own whose init script installed `curl`, `socat`
/// and `ip` from the mirror.
pub async fn networked_container(conn: &zbus::Connection, prefix: &str) -> String {
    let name = unique(prefix);
    let init = "#!/bin/sh\nset -e\napt-get update -qq\n\
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl socat iproute2 >/dev/null\n\
                echo installed\n";
    manager(conn)
        .await
        .create_workspace(container_spec(
            &name,
            vec![
                ("build_on_create", Variant::from(true)),
                ("init_script", Variant::from(init)),
            ],
        ))
        .await
        .unwrap();
    let status = wait_built(conn, &name, Duration::from_secs(1200)).await;
    let m = manager(conn).await;
    let ws = workspace(conn, &m.get_workspace(&name).await.unwrap()).await;
    assert_eq!(
        status,
        "ready",
        "{name}: {} / init log: {:?}",
        ws.error_message().await.unwrap(),
        m.get_init_log(&name, 20).await
    );
    name
}

/// A connection to `port` inside `name` through the port proxy, once something listens there.
pub async fn wait_for_port(m: &WorkspacesProxy<'_>, name: &str, port: u16) -> zbus::OwnedFd {
    let start = std::time::Instant::now();
    loop {
        match m.connect_port(name, port).await {
            Ok(fd) => return fd,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(10),
                "nothing listens on {port} in {name}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The service asks the far side's DNS server (it answers the far side's names and passes the
/// rest on), until the returned guard puts the configuration back.
pub struct FarDns {
    original: String,
}

impl FarDns {
    pub fn configure(far: &Far) -> Self {
        let config = "/etc/agent-workspaces/config.toml";
        let original = std::fs::read_to_string(config).unwrap_or_default();
        std::fs::write(
            config,
            format!("{original}\n[network]\ndns = [\"{}\"]\n", far.near),
        )
        .unwrap();
        restart_service();
        Self { original }
    }
}

impl Drop for FarDns {
    fn drop(&mut self) {
        let _ = std::fs::write("/etc/agent-workspaces/config.toml", &self.original);
        let _ = sh(&format!("systemctl restart {UNIT}"));
    }
}

/// What `curl` says for `url` from inside (its body, or `failed`), 3 s at most.
pub async fn fetch(m: &WorkspacesProxy<'_>, name: &str, args: &str) -> String {
    let (_, out, ..) = m
        .exec(
            name,
            &format!("curl -sS --max-time 3 {args} 2>/dev/null || echo failed"),
            no_options(),
        )
        .await
        .unwrap();
    String::from_utf8_lossy(&out).trim().to_owned()
}
