//! The far side of the network figures: a network namespace of the test host, joined by a veth
//! pair, with a server that accepts and closes (connect latency) and one that sends
//! `BULK_MB` MiB and closes (download throughput), on an address of a documentation range that
//! does not hold the package mirror's. The same bash script measures both from the test host
//! (the baseline) and from inside a container.

use std::collections::HashMap;
use std::io::Write;

use agent_workspaces::dbus::client::WorkspacesProxy;

use super::timing::{Bound, Figures};
use super::wait_ready;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;

pub const BULK_MB: usize = 1024;
pub const CONNECTS: usize = 200;

fn sh(script: &str) -> String {
    let o = std::process::Command::new("/bin/sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Makes the far side (again, if an earlier run left one); returns its address.
pub fn far_side() -> Ipv4Addr {
    let mirror = sh("getent ahostsv4 deb.debian.org | awk 'NR == 1 {print $1}'");
    let base = [[198, 18, 0], [198, 51, 100], [192, 0, 2]]
        .into_iter()
        .find(|b| {
            !mirror
                .trim()
                .starts_with(&format!("{}.{}.{}.", b[0], b[1], b[2]))
        })
        .unwrap();
    let near = Ipv4Addr::new(base[0], base[1], base[2], 1);
    let far = Ipv4Addr::new(base[0], base[1], base[2], 2);
    let _ = std::process::Command::new("/bin/sh")
        .args([
            "-c",
            "ip netns delete benchfar; ip link delete benchfar-near",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    sh(&format!(
        "ip netns add benchfar && ip link add benchfar-near type veth peer name eth0 netns benchfar \
         && ip addr add {near}/24 dev benchfar-near && ip link set benchfar-near up \
         && ip -n benchfar addr add {far}/24 dev eth0 && ip -n benchfar link set eth0 up \
         && ip -n benchfar link set lo up"
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ns = std::fs::File::open("/run/netns/benchfar").expect("the far side's namespace");
        // SAFETY: a plain syscall; this thread and the ones it starts stay in there.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let bulk = TcpListener::bind((far, 9000)).expect("bind 9000");
        let quick = TcpListener::bind((far, 9001)).expect("bind 9001");
        tx.send(()).unwrap();
        std::thread::spawn(move || {
            for c in quick.incoming() {
                drop(c)
            }
        });
        let chunk = vec![0u8; 1 << 20];
        for c in bulk.incoming().flatten() {
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut c = c;
                for _ in 0..BULK_MB {
                    if c.write_all(&chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    rx.recv().unwrap();
    far
}

/// The bash script that times `CONNECTS` connections and one download from `far`; it prints
/// the three `$EPOCHREALTIME`s around them.
pub fn probe(far: Ipv4Addr) -> String {
    format!(
        "t0=$EPOCHREALTIME; for i in $(seq {CONNECTS}); do exec 3<>/dev/tcp/{far}/9001; exec 3>&-; done; \
         t1=$EPOCHREALTIME; exec 3<>/dev/tcp/{far}/9000; cat <&3 >/dev/null; exec 3>&-; \
         t2=$EPOCHREALTIME; echo $t0 $t1 $t2"
    )
}

/// Seconds per connection and MiB per second from what `probe` printed.
pub fn read_probe(out: &str) -> (f64, f64) {
    let t: Vec<f64> = out
        .split_whitespace()
        .map(|w| w.parse().expect("a time"))
        .collect();
    assert_eq!(t.len(), 3, "{out}");
    (
        (t[1] - t[0]) / CONNECTS as f64,
        BULK_MB as f64 / (t[2] - t[1]),
    )
}

/// The network figures: a create with a network of its own against a bare nspawn start, and
/// the far side reached from container `name` against from the test host.
pub async fn figures(
    conn: &zbus::Connection,
    m: &WorkspacesProxy<'_>,
    name: &str,
    create_ready: f64,
    fig: &mut Figures,
) {
    let pid = std::process::id();
    // A network of its own costs the create its link, addresses, resolver and rules: against
    // a bare nspawn start (a container on the host's network, its tree prepared).
    let bare = format!("bench-bare-{pid}");
    let bare_spec: HashMap<&str, zbus::Variant<'_>> = HashMap::from([
        ("name", zbus::Variant::from(bare.as_str())),
        ("workspace_type", zbus::Variant::from("container")),
        ("distro", zbus::Variant::from("debian-bookworm")),
        ("network", zbus::Variant::from("host")),
        ("build_on_create", zbus::Variant::from(true)),
    ]);
    wait_ready(conn, m.create_workspace(bare_spec).await.expect("create")).await;
    let bare_start = super::start_time(m, &bare).await;
    println!(
        "{:<48} {:>8.3} s   (median of 5)",
        "baseline: bare nspawn start (host network)", bare_start
    );
    fig.set("start_bare_nspawn_s", bare_start);
    fig.ratio(
        "create_ready_with_network_vs_bare_start",
        create_ready / bare_start,
        Bound::AtMost(2.0),
        "",
    );
    // Connect latency and download throughput from the far side: from inside the container
    // (its network: NAT, the rules) against the test host's own, in turn.
    let far = far_side();
    let script = probe(far);
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (code, out, err, ..) = m
            .exec(name, &script, HashMap::new())
            .await
            .expect("probe inside");
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
        inside.push(read_probe(&String::from_utf8_lossy(&out)));
        let out = tokio::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .await
            .expect("probe outside");
        outside.push(read_probe(&String::from_utf8_lossy(&out.stdout)));
    }
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    m.destroy_workspace(&bare).await.expect("destroy");
    let (c_in, c_out) = (med(&inside, |p| p.0), med(&outside, |p| p.0));

    let (b_in, b_out) = (med(&inside, |p| p.1), med(&outside, |p| p.1));
    println!(
        "{:<48} {:>8.3} ms   (the test host's own: {:.3} ms; median of 5 rounds of {}, in turn)",
        "connect to the far side, from a container",
        c_in * 1e3,
        c_out * 1e3,
        CONNECTS
    );
    println!(
        "{:<48} {:>8.0} MiB/s (the test host's own: {:.0} MiB/s; {} MiB, median of 5)",
        "download from the far side, in a container", b_in, b_out, BULK_MB
    );
    fig.set("far_connect_ms", c_in * 1e3);
    fig.set("far_connect_host_ms", c_out * 1e3);

    fig.set("far_download_mib_s", b_in);
    fig.set("far_download_host_mib_s", b_out);
    fig.ratio(
        "far_connect_speed_vs_host",
        c_out / c_in,
        Bound::AtLeast(0.8),
        "(the test host's connect time over the container's)",
    );

    fig.ratio(
        "far_download_vs_host",
        b_in / b_out,
        Bound::AtLeast(0.8),
        "",
    );
}
