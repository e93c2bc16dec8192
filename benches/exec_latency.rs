//! The service's speed against baselines measured in the same run: exec latency (host,
//! container, REST), throughput, creating and starting containers, memory. Runs inside the
//! test host against the installed service: `make bench`. Prints each figure, each target's
//! ratio beside it, and ends with one line of JSON holding them all; asserts nothing (targets
//! are judged from the ratios, never by timed assertions).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agent_workspaces::dbus::client::WorkspacesProxy;

mod common;
use common::timing::{
    Bound, Figures, ROUNDS, WARMUP, median, report, throughput, time_async, time_in_turn, time_n,
};
use common::{KeptGet, RestClient, direct_get, tiny_http_server, unit_memory, wait_ready};

/// Per-exec systemd-nspawn is slow; fewer rounds of it.
const NSPAWN_ROUNDS: usize = 40;
/// Rounds of host and container throughput, each in turn.
const THROUGHPUT_ROUNDS: usize = 5;

/// The service's resident memory now, and its peak, in bytes.
fn service_memory() -> (u64, u64) {
    let pid = std::process::Command::new("systemctl")
        .args(["show", "-p", "MainPID", "--value", "agent-workspaced"])
        .output()
        .expect("systemctl");
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

const MB: f64 = 1024.0 * 1024.0;

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

/// Creates a debian-bookworm container workspace (the default network) and waits until it
/// is ready; returns the time.
async fn build_container(conn: &zbus::Connection, m: &WorkspacesProxy<'_>, name: &str) -> Duration {
    common::build_container(conn, m, name, &[]).await
}

#[tokio::main]
async fn main() {
    let conn = zbus::Connection::system().await.expect("system bus");
    let m = WorkspacesProxy::new(&conn).await.expect("proxy");
    let mut fig = Figures::default();
    let exec = |ws: String, cmd: &'static str| {
        let m = m.clone();
        async move {
            let (code, ..) = m.exec(&ws, cmd, HashMap::new()).await.expect("exec");
            assert_eq!(code, 0);
        }
    };

    println!("agent-workspaces benchmark ({ROUNDS} runs each, after {WARMUP} warm-up runs)");
    // The service is bus-activated: a first call starts it, then it is idle.
    m.list_workspaces().await.expect("the service answers");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = service_memory();
    println!(
        "{:<48} {:>8.1} MB",
        "service RSS, idle",
        idle_rss as f64 / MB
    );
    fig.set("service_idle_rss_mb", idle_rss as f64 / MB);

    println!("\nhost workspace");
    // `true` is a plain word, so Exec starts /usr/bin/true itself, as `bash -c true` would
    // exec it (agent/src/direct.rs): the baseline runs the same program. A command that needs
    // the shell is measured after, against the same baseline with bash.
    let fork_exec_once = |argv: &'static [&'static str]| {
        move || async move {
            let s = tokio::process::Command::new(argv[0])
                .args(&argv[1..])
                .status()
                .await
                .expect("spawn");
            assert!(s.success());
        }
    };
    let fork_exec_of = |argv: &'static [&'static str]| time_async(fork_exec_once(argv));
    let peer = zbus::fdo::PeerProxy::builder(&conn)
        .destination("org.agent.Workspaces")
        .path("/org/agent/Workspaces")
        .build()
        .await
        .expect("peer");
    let ping_once = || async { peer.ping().await.expect("ping") };
    // The call alone, refused at once (no such workspace): Exec's handling beyond a Ping.
    report(
        "baseline: Exec of an unknown workspace (an error)",
        time_async(|| async {
            assert!(
                m.exec("no-such-workspace", "true", HashMap::new())
                    .await
                    .is_err()
            );
        })
        .await,
    );
    // The target: Exec against its baselines, the three timed in turn.
    println!("timed in turn (fork+exec, Ping, Exec; round after round):");
    let [fork_exec, ping, host] =
        time_in_turn(fork_exec_once(&["/usr/bin/true"]), ping_once, || {
            exec("host".into(), "true")
        })
        .await;
    let fork_exec = report(
        "baseline: fork+exec of /usr/bin/true (in-process)",
        fork_exec,
    );
    let ping = report("baseline: D-Bus round trip (Peer.Ping)", ping);
    let host = report("Exec('host', 'true') through D-Bus", host);
    fig.set("host_exec_p50_ms", host.p50 * 1e3);
    fig.ratio(
        "host_exec_vs_fork_exec_and_ping",
        host.p50 / (fork_exec.p50 + ping.p50),
        Bound::AtMost(1.2),
        &format!(
            "({:.3} ms of service overhead)",
            (host.p50 - fork_exec.p50 - ping.p50) * 1e3
        ),
    );
    // The same three timed each in a loop of its own, for comparison with earlier runs.
    println!("timed each in a loop of its own:");
    let fork_exec_loop = report(
        "baseline: fork+exec of /usr/bin/true (in-process)",
        fork_exec_of(&["/usr/bin/true"]).await,
    );
    let ping_loop = report(
        "baseline: D-Bus round trip (Peer.Ping)",
        time_async(ping_once).await,
    );
    let host_loop = report(
        "Exec('host', 'true') through D-Bus",
        time_async(|| exec("host".into(), "true")).await,
    );
    fig.ratio(
        "host_exec_vs_fork_exec_and_ping_in_loops",
        host_loop.p50 / (fork_exec_loop.p50 + ping_loop.p50),
        Bound::Reported,
        &format!(
            "({:.3} ms of service overhead)",
            (host_loop.p50 - fork_exec_loop.p50 - ping_loop.p50) * 1e3
        ),
    );
    let fork_exec_bash = report(
        "baseline: fork+exec of bash -c 'true; true'",
        fork_exec_of(&["/bin/bash", "-c", "true; true"]).await,
    );
    let host_bash = report(
        "Exec('host', 'true; true') (through bash)",
        time_async(|| exec("host".into(), "true; true")).await,
    );
    fig.ratio(
        "host_shell_exec_vs_fork_exec_and_ping",
        host_bash.p50 / (fork_exec_bash.p50 + ping.p50),
        Bound::Reported,
        "",
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
    fig.set("rest_exec_p50_ms", rest_exec.p50 * 1e3);
    fig.ratio(
        "rest_exec_vs_dbus_exec",
        rest_exec.p50 / host.p50,
        Bound::AtMost(1.4),
        &format!(
            "(the bridge adds {:.3} ms, {:.3} ms beyond the polkit check its calls need)",
            (rest_exec.p50 - host.p50) * 1e3,
            (rest_exec.p50 - host.p50 - check.p50) * 1e3
        ),
    );

    println!("\nbackground processes and ports (host workspace)");
    let started = report(
        "StartProcess('host', 'true') through D-Bus",
        time_async(|| async {
            m.start_process("host", "true", HashMap::new())
                .await
                .expect("StartProcess");
        })
        .await,
    );
    fig.set("start_process_p50_ms", started.p50 * 1e3);
    fig.ratio(
        "start_process_vs_exec",
        started.p50 / host.p50,
        Bound::Reported,
        "(the call returns once the command has started)",
    );
    let port = tiny_http_server().await;
    let direct = report(
        "baseline: GET / on a loopback port (new connection)",
        time_async(|| direct_get(port)).await,
    );
    let kept = tokio::sync::Mutex::new(KeptGet::new(port).await);
    let direct_kept = report(
        "GET / on a loopback port (connection kept)",
        time_async(|| async { kept.lock().await.get().await }).await,
    );
    let floor = report(
        "GET /api/openapi.json from the bridge (its floor)",
        time_async(|| async {
            assert_eq!(rest.get("/api/openapi.json").await, 200);
        })
        .await,
    );
    fig.set("bridge_floor_p50_ms", floor.p50 * 1e3);
    let path = format!("/api/workspaces/host/ports/{port}/");
    let proxied = report(
        "GET through the bridge's port proxy",
        time_async(|| async {
            assert_eq!(rest.get(&path).await, 200);
        })
        .await,
    );
    fig.set("port_proxy_p50_ms", proxied.p50 * 1e3);
    fig.ratio(
        "port_proxy_vs_direct",
        proxied.p50 / direct.p50,
        Bound::AtMost(1.5),
        &format!(
            "(the proxy adds {:.3} ms: the bridge, and a connection kept from the request before)",
            (proxied.p50 - direct.p50) * 1e3
        ),
    );
    fig.ratio(
        "port_proxy_vs_direct_kept",
        proxied.p50 / direct_kept.p50,
        Bound::Reported,
        "(both over kept connections: what the bridge's own hop costs)",
    );

    let host_rate = throughput(|| exec("host".into(), "true"), 100).await;
    println!("{:<48} {host_rate:>8.1} execs/s", "throughput, 8 clients");
    fig.set("host_throughput_8_clients", host_rate);

    println!("\ncontainer workspace (debian-bookworm, base tree cached, no init script)");
    let pid = std::process::id();
    let name = format!("bench-{pid}");
    // Create -> ready, and create -> first command done: the median of a few, each destroyed
    // before the next (the last one is kept for what follows).
    let (mut ready, mut first) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let scratch = if i == 4 {
            name.clone()
        } else {
            format!("bench-build-{pid}-{i}")
        };
        let t = Instant::now();
        ready.push(build_container(&conn, &m, &scratch).await);
        exec(scratch.clone(), "true").await;
        first.push(t.elapsed());
        if i < 4 {
            m.destroy_workspace(&scratch).await.expect("destroy");
        }
    }
    let create_ready = median(ready);
    let create_first = median(first);
    println!(
        "{:<48} {:>8.3} s   (median of 5)",
        "create -> ready", create_ready
    );
    println!(
        "{:<48} {:>8.3} s   (median of 5; target under 0.3 s)",
        "create -> first command done", create_first
    );
    fig.set("create_ready_s", create_ready);
    fig.set("create_first_exec_s", create_first);
    // The floor of a create: starting the container's unit on a tree already prepared.
    let start = common::start_time(&m, &name).await;
    println!(
        "{:<48} {:>8.3} s   (median of 5)",
        "baseline: start the unit on a prepared tree", start
    );
    fig.set("start_prepared_s", start);
    fig.ratio(
        "create_ready_vs_start_prepared",
        create_ready / start,
        Bound::AtMost(2.0),
        "",
    );
    common::network::figures(&conn, &m, &name, create_ready, &mut fig).await;
    common::files::figures(&m, &name, &mut fig).await;
    let mut rebuilds = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        m.rebuild_workspace(&name).await.expect("rebuild");
        wait_ready(&conn, m.get_workspace(&name).await.expect("get")).await;
        rebuilds.push(t.elapsed());
    }
    let rebuild = median(rebuilds);
    println!(
        "{:<48} {:>8.3} s   (median of 3)",
        "rebuild -> ready", rebuild
    );
    fig.set("rebuild_ready_s", rebuild);
    fig.ratio(
        "rebuild_ready_vs_start_prepared",
        rebuild / start,
        Bound::AtMost(2.0),
        "",
    );

    exec(name.clone(), "true").await;
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
        "baseline: nsenter -t <leader> -a /bin/true",
        time_async(|| {
            run_ok(
                ["nsenter", "-t", &leader, "-a", "/bin/true"]
                    .map(String::from)
                    .to_vec(),
            )
        })
        .await,
    );
    let cexec = report(
        "Exec(container, 'true') through D-Bus",
        time_async(|| exec(name.clone(), "true")).await,
    );
    fig.set("container_exec_p50_ms", cexec.p50 * 1e3);
    fig.ratio(
        "container_exec_vs_nsenter",
        cexec.p50 / floor.p50,
        Bound::AtMost(0.6),
        "(p50)",
    );
    fig.ratio(
        "container_exec_vs_nsenter_p99",
        cexec.p99 / floor.p99,
        Bound::AtMost(1.5),
        "(p99)",
    );
    let floor_bash = report(
        "baseline: nsenter -t <leader> -a bash -c 'true; true'",
        time_async(|| {
            run_ok(
                [
                    "nsenter",
                    "-t",
                    &leader,
                    "-a",
                    "/bin/bash",
                    "-c",
                    "true; true",
                ]
                .map(String::from)
                .to_vec(),
            )
        })
        .await,
    );
    let cexec_bash = report(
        "Exec(container, 'true; true') (through bash)",
        time_async(|| exec(name.clone(), "true; true")).await,
    );
    fig.ratio(
        "container_shell_exec_vs_nsenter",
        cexec_bash.p50 / floor_bash.p50,
        Bound::Reported,
        "(p50)",
    );
    let other = format!("bench-nspawn-{pid}");
    build_container(&conn, &m, &other).await;
    m.stop_workspace(&other).await.expect("stop");
    let tree = format!("/var/lib/machines/{other}");
    let nspawn = report(
        "baseline: systemd-nspawn -D <tree> /bin/true",
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
    m.destroy_workspace(&other).await.expect("destroy");
    fig.ratio(
        "nspawn_per_exec_vs_container_exec",
        nspawn.p50 / cexec.p50,
        Bound::AtLeast(5.0),
        "",
    );
    // Container against host throughput: rounds of both in turn, so that both see the machine
    // in the same state (a round of one alone, minutes apart from the other's, moved this ratio
    // by a tenth from run to run); the median round's ratio.
    let mut rounds = Vec::new();
    for round in 0..THROUGHPUT_ROUNDS {
        // 1200 commands a round, about half a second: a shorter round is moved by a hiccup.
        // Which goes first alternates.
        let host_rate = || throughput(|| exec("host".into(), "true"), 150);
        let container_rate = || throughput(|| exec(name.clone(), "true"), 150);
        let (host, container) = if round % 2 == 0 {
            let host = host_rate().await;
            (host, container_rate().await)
        } else {
            let container = container_rate().await;
            (host_rate().await, container)
        };
        println!(
            "{:<48} {container:>8.1} execs/s   (host {host:.1}/s)",
            "  a round: container throughput"
        );
        rounds.push((container / host, host, container));
    }
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, host, container) = rounds[rounds.len() / 2];
    println!(
        "{:<48} {container:>8.1} execs/s   (median round: host {host:.1}/s in the same round)",
        "container throughput, 8 clients"
    );
    fig.set("container_throughput_8_clients", container);
    fig.ratio(
        "container_vs_host_throughput",
        ratio,
        Bound::AtLeast(0.8),
        &format!(
            "(8 clients; median of {THROUGHPUT_ROUNDS} rounds of both, in turn: {})",
            rounds
                .iter()
                .map(|r| format!("{:.2}", r.0))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    // 256 commands at once on one workspace (tests/bench.sh sets max_concurrent = 256), over 8
    // connections: dbus-daemon allows 128 pending calls per connection.
    let mut clients = Vec::new();
    for _ in 0..8 {
        let c = zbus::Connection::system().await.expect("system bus");
        clients.push(WorkspacesProxy::new(&c).await.expect("proxy"));
    }
    let t = Instant::now();
    let results = futures_util::future::join_all((0..256).map(|i| {
        let m = clients[i % 8].clone();
        let name = name.clone();
        async move {
            m.exec(&name, "sleep 1", HashMap::new())
                .await
                .is_ok_and(|(code, ..)| code == 0)
        }
    }))
    .await;
    let failed = results.iter().filter(|ok| !**ok).count();
    let (_, peak) = service_memory();
    println!(
        "{:<48} {:>8.3} s   ({failed} failed; service RSS peak {:.1} MB, target under 64)",
        "256 commands `sleep 1` at once",
        t.elapsed().as_secs_f64(),
        peak as f64 / MB
    );
    fig.set("concurrent_256_failures", failed as f64);
    fig.set("service_peak_rss_mb", peak as f64 / MB);

    // 20 creates at once, all ready (tests/bench.sh sets max_concurrent_builds = 20).
    let t = Instant::now();
    let names: Vec<String> = (0..20).map(|i| format!("bench-many-{pid}-{i}")).collect();
    futures_util::future::join_all(names.iter().map(|n| build_container(&conn, &m, n))).await;
    let twenty = t.elapsed().as_secs_f64();
    println!(
        "{:<48} {:>8.3} s   (target under 3 s)",
        "20 creates at once, all ready", twenty
    );
    fig.set("twenty_creates_ready_s", twenty);

    // Idle running containers: what each costs the host (its unit's MemoryCurrent).
    let idle: usize = std::env::var("BENCH_IDLE_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut all = names.clone();
    for i in 20..idle {
        let n = format!("bench-many-{pid}-{i}");
        build_container(&conn, &m, &n).await;
        all.push(n);
    }
    futures_util::future::join_all(all.iter().take(idle).map(|n| exec(n.clone(), "true"))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut per: Vec<(u64, &str)> = all
        .iter()
        .take(idle)
        .filter_map(|n| unit_memory(&format!("agent-workspace-{n}.service")))
        .collect();
    per.sort();
    match per.get(per.len() / 2) {
        Some((med, how)) => {
            println!(
                "{:<48} {:>8.1} MB   (median of {} running containers, {how}; target under 5)",
                "an idle running container's memory",
                *med as f64 / MB,
                per.len()
            );
            fig.set("idle_container_mb", *med as f64 / MB);
        }
        None => println!("an idle running container's memory: not measurable here"),
    }
    for n in all.iter().chain([&name]) {
        m.destroy_workspace(n).await.expect("destroy");
    }
    println!();
    println!("{}", serde_json::Value::Object(fig.0));
}
