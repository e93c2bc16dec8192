//! Networks of their own (`network = "internet"`, the default): a container reaches the
//! internet (here: the package mirror, and a "far side" in a network namespace of the test
//! host, on addresses outside every private range) and never the host, its networks or another
//! container; the rules outlive a restart and a `kill -9` of the service; destroy leaves
//! nothing. The test host has a network namespace of its own (`TESTHOST_NET=slirp`): nothing
//! here touches the machine's.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use zbus::Variant;

use super::far::*;
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_container_has_the_internet_and_nothing_of_the_host() {
    require_test_host();
    let far = far_side();
    let conn = bus().await;
    let m = manager(&conn).await;
    // The init script installed packages from the mirror (through NAT and the service's DNS).
    let a = networked_container(&conn, "net-a").await;
    let b = networked_container(&conn, "net-b").await;
    let ws_a = workspace(&conn, &m.get_workspace(&a).await.unwrap()).await;
    let ws_b = workspace(&conn, &m.get_workspace(&b).await.unwrap()).await;
    assert_eq!(ws_a.network().await.unwrap(), "internet");
    let (id_a, id_b) = (ws_a.id().await.unwrap(), ws_b.id().await.unwrap());
    let (init_log, _) = m.get_init_log(&a, 0).await.unwrap();
    assert!(init_log.contains("installed"), "{init_log}");

    // The far side answers, by address.
    let got = inside(
        &m,
        &a,
        &format!("curl -sS --max-time 10 http://{}/", far.addr),
    )
    .await;
    assert_eq!(got, format!("far side {}\n", far.addr));

    // Listeners of the test host on every address: none opens from inside; the far side's
    // port does (the probe can say "open").
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let gw = gateway(&m, &a).await;
    let tap = ok("ip -4 -o addr show dev tap0 | awk '{split($4, a, \"/\"); print a[1]}'");
    assert!(opens(&m, &a, &far.addr.to_string(), 80).await);
    for addr in [gw.as_str(), tap.trim(), &far.near.to_string(), "127.0.0.1"] {
        assert!(
            !opens(&m, &a, addr, port).await,
            "the test host's listener on {addr}:{port} is out of reach"
        );
    }
    assert!(
        listener.accept().is_err(),
        "no connection from the container reached the host's listener"
    );
    // Link-local (cloud metadata) is out of reach too: the gateway's address there would be it.
    assert!(!opens(&m, &a, "169.254.169.254", 80).await);

    // The host's abstract Unix sockets live in the host's network namespace: out of reach.
    use std::os::linux::net::SocketAddrExt;
    let abstract_name = unique("aw-test-abstract");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
    let unix = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    std::os::unix::net::UnixStream::connect_addr(&addr).expect("the abstract socket is there");
    let (_, _, err, ..) = m
        .exec(
            &a,
            &format!("socat -T 2 - ABSTRACT-CONNECT:{abstract_name} </dev/null"),
            no_options(),
        )
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("Connection refused"), "{err}");
    drop(unix);

    // Another container's listener: reachable through the port proxy, never from a container.
    m.start_process(
        &b,
        "exec socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo from-b'",
        no_options(),
    )
    .await
    .unwrap();
    let b_addr = inside(&m, &b, "hostname -I").await.trim().to_owned();
    let fd = wait_for_port(&m, &b, 8080).await;
    let mut s = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "from-b\n", "the port proxy reaches b's listener");
    assert!(
        !opens(&m, &a, &b_addr, 8080).await,
        "a cannot reach b's listener at {b_addr}"
    );
    // What b listens on opens nothing on the host.
    for host_addr in ["127.0.0.1", tap.trim()] {
        assert!(
            TcpStream::connect((host_addr, 8080)).is_err(),
            "b's port 8080 is not open on the host at {host_addr}"
        );
    }
    // A container cannot pass for another: an address of b's taken by a is dropped.
    let spoof = inside(
        &m,
        &a,
        &format!(
            "ip addr add {b_addr}/32 dev host0 2>&1 || true; \
             curl -sS --max-time 3 --interface {b_addr} http://{}/ 2>&1 || echo refused",
            far.addr
        ),
    )
    .await;
    assert!(
        !spoof.contains("far side"),
        "a packet from a with b's address went out: {spoof}"
    );

    // The table names both, and a restart and a kill -9 of the service keep their rules.
    let t = table();
    for id in [&id_a, &id_b] {
        assert!(t.contains(&format!("\"{}\"", link_of(id))), "{t}");
    }
    restart_service();
    // Back means restarted by systemd: a killed process may take a moment to be gone, and
    // until then it is still "active".
    let restarts = || ok(&format!("systemctl show -p NRestarts --value {UNIT}"));
    let before = restarts();
    systemctl(&format!("kill --signal=SIGKILL {UNIT}"));
    wait_for(
        "the service back after kill -9",
        Duration::from_secs(20),
        || {
            let active = sh(&format!("systemctl is-active {UNIT}")).stdout;
            (active.trim() == "active" && restarts() != before).then_some(())
        },
    );
    let t = table();
    assert!(t.contains(&format!("\"{}\"", link_of(&id_a))), "{t}");
    let got = inside(
        &m,
        &a,
        &format!("curl -sS --max-time 10 http://{}/", far.addr),
    )
    .await;
    assert_eq!(got, format!("far side {}\n", far.addr));
    assert!(!opens(&m, &a, &gw, port).await);
    // Its resolver is back too.
    let resolved = inside(&m, &a, "getent hosts deb.debian.org").await;
    assert!(!resolved.trim().is_empty());

    // Stop: the link and the container's rules go; start: back with a network.
    m.stop_workspace(&a).await.unwrap();
    assert!(!ok("ip -br link").contains(&link_of(&id_a)));
    assert!(!table().contains(&link_of(&id_a)));
    let got = inside(
        &m,
        &a,
        &format!("curl -sS --max-time 10 http://{}/", far.addr),
    )
    .await;
    assert_eq!(got, format!("far side {}\n", far.addr));

    // Destroy leaves no link, address or rule of either.
    m.destroy_workspace(&a).await.unwrap();
    m.destroy_workspace(&b).await.unwrap();
    let links = ok("ip -br addr");
    let t = table();
    for id in [&id_a, &id_b] {
        assert!(!links.contains(&link_of(id)), "{links}");
        assert!(!t.contains(&link_of(id)), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_host_networks_are_as_they_were() {
    require_test_host();
    let far = far_side();
    let conn = bus().await;
    let m = manager(&conn).await;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = unique("net-host");
    let private = unique("net-private");
    for (name, network) in [(&host, "host"), (&private, "private")] {
        m.create_workspace(container_spec(
            name,
            vec![
                ("build_on_create", Variant::from(true)),
                ("network", Variant::from(network)),
            ],
        ))
        .await
        .unwrap();
    }
    for name in [&host, &private] {
        assert_eq!(
            wait_built(&conn, name, Duration::from_secs(1200)).await,
            "ready"
        );
    }
    // host: the test host's own network, loopback listener and far side included.
    assert!(opens(&m, &host, "127.0.0.1", port).await);
    assert!(opens(&m, &host, &far.addr.to_string(), 80).await);
    // private: lo only.
    assert!(!opens(&m, &private, "127.0.0.1", port).await);
    assert!(!opens(&m, &private, &far.addr.to_string(), 80).await);
    let links = inside(&m, &private, "ls /sys/class/net").await;
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    for name in [&host, &private] {
        let id = workspace(&conn, &m.get_workspace(name).await.unwrap())
            .await
            .id()
            .await
            .unwrap();
        assert!(!ok("ip -br link").contains(&link_of(&id)));
        m.destroy_workspace(name).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_containers_with_networks_at_once_have_fifty_addresses() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let names = ready_containers_at_once(&conn, "net50", 50).await;
    let mut addresses = Vec::new();
    let mut ids = Vec::new();
    for name in &names {
        addresses.push(inside(&m, name, "hostname -I").await.trim().to_owned());
        let ws = workspace(&conn, &m.get_workspace(name).await.unwrap()).await;
        ids.push(ws.id().await.unwrap());
    }
    let mut unique_addresses = addresses.clone();
    unique_addresses.sort();
    unique_addresses.dedup();
    assert_eq!(unique_addresses.len(), 50, "{addresses:?}");
    // Each reaches the far side with its own address.
    let far = far_side();
    let calls = names.iter().map(|name| {
        let m = m.clone();
        async move { opens(&m, name, &far.addr.to_string(), 80).await }
    });
    assert!(
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .all(|o| o)
    );
    for name in &names {
        m.destroy_workspace(name).await.unwrap();
    }
    let links = ok("ip -br link");
    for id in &ids {
        assert!(!links.contains(&link_of(id)), "{links}");
    }
}
