//! Egress rules of a container with a network of its own: by network and by name, changed on
//! the running container at once, holding against what a hostile agent tries (`/etc/hosts`,
//! an address with an allowed Host, a resolver of its own, DNS rebinding, UDP), against the
//! far side of `far.rs`.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use zbus::Variant;

use agent_workspaces::dbus::client::WorkspacesProxy;

use super::far::*;
use super::*;

/// Gives workspace `name` these egress rules (both lists replaced).
async fn set_rules(m: &WorkspacesProxy<'_>, name: &str, allow: &[&str], deny: &[&str]) {
    m.update_workspace(
        name,
        spec(vec![
            ("egress_allow", Variant::from(allow.to_vec())),
            ("egress_deny", Variant::from(deny.to_vec())),
        ]),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_rules_by_network_change_a_running_container_at_once() {
    require_test_host();
    let far = far_side();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "net-rules").await;
    let mirror = ok("getent ahostsv4 deb.debian.org | awk 'NR == 1 {print $1}'");
    let mirror = mirror.trim();
    let far_addr = far.addr.to_string();
    let far_net = format!("{}/24", Ipv4Addr::from(u32::from(far.addr) & !0xff));
    assert!(opens(&m, &name, &far_addr, 80).await);
    assert!(opens(&m, &name, mirror, 80).await);
    // Deny the far side's address: gone at once, the mirror still there.
    set_rules(&m, &name, &[], &[&far_addr]).await;
    let ws = workspace(&conn, &m.get_workspace(&name).await.unwrap()).await;
    assert_eq!(ws.egress_deny().await.unwrap(), [format!("{far_addr}/32")]);
    assert!(!opens(&m, &name, &far_addr, 80).await);
    assert!(opens(&m, &name, mirror, 80).await);
    // Allow only the far side's network: the far side back, the mirror gone.
    set_rules(&m, &name, &[&far_net], &[]).await;
    assert!(opens(&m, &name, &far_addr, 80).await);
    assert!(!opens(&m, &name, mirror, 80).await);
    // The rules outlive a restart of the service, and a stop and start of the container.
    restart_service();
    assert!(!opens(&m, &name, mirror, 80).await);
    m.stop_workspace(&name).await.unwrap();
    m.start_workspace(&name).await.unwrap();
    assert!(!opens(&m, &name, mirror, 80).await);
    assert!(opens(&m, &name, &far_addr, 80).await);
    // No rules: everything public again.
    set_rules(&m, &name, &[], &[]).await;
    assert!(opens(&m, &name, mirror, 80).await);
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_rules_by_name_hold_against_the_tricks_of_a_hostile_agent() {
    require_test_host();
    let far = far_side();
    let _dns = FarDns::configure(far);
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = networked_container(&conn, "net-names").await;
    let id = workspace(&conn, &m.get_workspace(&name).await.unwrap())
        .await
        .id()
        .await
        .unwrap();
    let (addr, addr2) = (far.addr.to_string(), far.addr2.to_string());
    // Without rules the far side's names resolve and both addresses answer; UDP arrives.
    assert_eq!(
        fetch(&m, &name, "http://other.far.test/").await,
        "far side other.far.test"
    );
    let before = far.udp_seen.load(Ordering::SeqCst);
    inside(&m, &name, &format!("echo x > /dev/udp/{addr}/443")).await;
    wait_for("a datagram at the far side", Duration::from_secs(5), || {
        (far.udp_seen.load(Ordering::SeqCst) > before).then_some(())
    });

    // Only allowed.far.test: its lookup opens its address, for TCP only.
    set_rules(&m, &name, &["allowed.far.test"], &[]).await;
    assert_eq!(
        fetch(&m, &name, "http://allowed.far.test/").await,
        "far side allowed.far.test"
    );
    // Through the name check on 80 and 443: a connection to the allowed name's address that
    // names another site (domain fronting on a shared address) is closed, in HTTP and TLS.
    assert_eq!(
        fetch(
            &m,
            &name,
            "-H 'Host: other.far.test' http://allowed.far.test/"
        )
        .await,
        "failed"
    );
    fetch(
        &m,
        &name,
        "--connect-to other.far.test:443:allowed.far.test:443 https://other.far.test/",
    )
    .await;
    for (port, what) in [
        (80, "which the egress rules do not allow"),
        (443, "which the egress rules do not allow"),
    ] {
        let want =
            format!("Refused a connection to {addr}:{port}: it names other.far.test, {what}");
        wait_for(&want, Duration::from_secs(10), || {
            journal(&format!("WORKSPACE_ID={id}"))
                .iter()
                .any(|e| e["MESSAGE"].as_str().is_some_and(|m| m == want))
                .then_some(())
        });
    }
    // Another name is refused by the resolver, and its address stays closed.
    let looked = sh(&format!(
        "workspacectl exec {name} -- getent hosts other.far.test"
    ));
    assert_ne!(looked.code, 0, "{looked:?}");
    assert_eq!(
        fetch(&m, &name, &format!("http://{addr2}/")).await,
        "failed"
    );
    // A resolver over HTTP(S) at an allowed name (DNS over HTTPS, in the shape that matters:
    // the address comes from elsewhere than the service's DNS): it answers, and the address it
    // gave stays closed.
    let doh = fetch(
        &m,
        &name,
        "http://allowed.far.test/resolve?name=other.far.test",
    )
    .await;
    assert_eq!(doh, addr2, "the resolver over HTTP answered");
    assert_eq!(
        fetch(
            &m,
            &name,
            &format!("-H 'Host: other.far.test' http://{doh}/")
        )
        .await,
        "failed"
    );
    // /etc/hosts pointing the allowed name at the other address: closed.
    inside(
        &m,
        &name,
        &format!("echo '{addr2} allowed.far.test' >> /etc/hosts"),
    )
    .await;
    assert_eq!(fetch(&m, &name, "http://allowed.far.test/").await, "failed");
    // The other address with the allowed name as Host (domain fronting by address): closed.
    assert_eq!(
        fetch(
            &m,
            &name,
            &format!("-H 'Host: allowed.far.test' http://{addr2}/")
        )
        .await,
        "failed"
    );
    // UDP (QUIC) to the allowed name's address: closed.
    let before = far.udp_seen.load(Ordering::SeqCst);
    inside(&m, &name, &format!("echo x > /dev/udp/{addr}/443; sleep 1")).await;
    assert_eq!(
        far.udp_seen.load(Ordering::SeqCst),
        before,
        "no datagram went out"
    );
    // A resolver of its own: every query to port 53 reaches the service's, which refuses.
    let own = sh(&format!(
        "workspacectl exec {name} -- bash -c 'echo nameserver 198.51.100.53 > /etc/resolv.conf; getent hosts other.far.test'"
    ));
    assert_ne!(own.code, 0, "{own:?}");
    // DNS rebinding: an allowed name answered with a private address opens nothing.
    set_rules(&m, &name, &["allowed.far.test", "rebind.far.test"], &[]).await;
    inside(&m, &name, "getent hosts rebind.far.test || true").await;
    let learnt = ok(&format!(
        "nft list set inet agent_workspaces open_{}",
        agent_workspaces::system::network::link_name(&id).trim_start_matches("aw-")
    ));
    assert!(!learnt.contains("10.0.2.100"), "{learnt}");
    // A refused connection is in the journal under the workspace's id, with its destination.
    wait_for(
        "the refused connection in the journal",
        Duration::from_secs(10),
        || {
            journal(&format!("WORKSPACE_ID={id}"))
                .iter()
                .any(|e| {
                    e["MESSAGE"].as_str().is_some_and(|m| {
                        m.contains(&format!("Refused a connection to {addr2}:80 (TCP)"))
                    })
                })
                .then_some(())
        },
    );
    // The refusals are in the journal under the workspace's id.
    let refused = journal(&format!("WORKSPACE_ID={id}"));
    assert!(
        refused.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("Refused a DNS lookup of other.far.test"))),
        "the journal names the refused lookup"
    );

    // Two allowed names: each is reached on its own addresses only.
    inside(&m, &name, "sed -i '/far.test/d' /etc/hosts").await;
    set_rules(&m, &name, &["allowed.far.test", "other.far.test"], &[]).await;
    assert_eq!(
        fetch(&m, &name, "http://other.far.test/").await,
        "far side other.far.test"
    );
    assert_eq!(
        fetch(
            &m,
            &name,
            "-H 'Host: other.far.test' http://allowed.far.test/"
        )
        .await,
        "failed"
    );
    assert_eq!(
        fetch(&m, &name, "http://allowed.far.test/").await,
        "far side allowed.far.test"
    );
    // A wildcard, changed on the running container at once.
    inside(&m, &name, "sed -i '/far.test/d' /etc/hosts").await;
    set_rules(&m, &name, &["*.far.test"], &[]).await;
    assert_eq!(
        fetch(&m, &name, "http://other.far.test/").await,
        "far side other.far.test"
    );
    assert_eq!(
        fetch(&m, &name, "http://allowed.far.test/").await,
        "far side allowed.far.test"
    );

    // A denied name in an otherwise open policy: refused, and its address closed.
    set_rules(&m, &name, &[], &["denied.far.test"]).await;
    assert_eq!(fetch(&m, &name, "http://denied.far.test/").await, "failed");
    assert_eq!(
        fetch(&m, &name, &format!("http://{addr2}/")).await,
        "failed"
    );
    assert_eq!(
        fetch(&m, &name, &format!("http://{addr}/")).await,
        format!("far side {addr}")
    );
    m.destroy_workspace(&name).await.unwrap();
}
