//! Exec latency through D-Bus against a baseline measured in the same run. Runs inside the
//! test host against the installed service: `make bench`. Prints figures and ratios; asserts
//! nothing (targets are judged from the ratios, never by timed assertions).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agent_workspaces::dbus::client::WorkspacesProxy;

const ROUNDS: usize = 300;
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

async fn time_async<F, Fut>(mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..WARMUP {
        f().await;
    }
    let mut out = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        f().await;
        out.push(t.elapsed());
    }
    out
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
}
