//! Nothing lent crosses the container boundary, and every lifetime is the command's: what a
//! process that leaves its command's cgroup (as the container's root may) can still hold or
//! make the service do. Each test is an attack from inside a real container and what the
//! host, the caller and the service see after it.

use std::io::{BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use zbus::Variant;

use super::boundary::inside;
use super::processes::{output_until, process};
use super::rest::{TOKEN, bridge_socket_up, curl, next_event, sse_exec};
use super::*;

/// Leaves the command's cgroup for the container's root cgroup: what outlives its command.
const LEAVE: &str = "echo $$ > /sys/fs/cgroup/cgroup.procs";

/// A pseudo-terminal of this test host: (master, the terminal).
pub(super) fn pty_pair() -> (std::fs::File, OwnedFd) {
    // SAFETY: plain calls; each descriptor made is owned at once.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let t = libc::ioctl(m, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY);
        assert!(t >= 0);
        (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(t))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_caller_lends_stays_outside_even_from_a_process_that_left_its_command() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "lent").await;
    inside(
        &m,
        &name,
        &format!(
            r#"cat > /late.sh <<'EOF'
#!/bin/sh
{LEAVE}
sleep 4
echo "LATE WRITE"
perl -e 'seek(STDOUT, 0, 0); print "OVERWRITTEN\n"; close(STDOUT) or print STDERR "closed: $!\n"'
EOF
chmod +x /late.sh"#
        ),
    )
    .await;

    // A host file the caller redirected the output to: after the call returned (what the
    // command left may write for 2 s after its end, and is passed on), nothing in the
    // container writes it, seeks in it or overwrites it.
    let file = "/root/lent-output";
    let started = Instant::now();
    ok(&format!(
        "workspacectl exec {name} --cwd / -- 'setsid /late.sh & sleep 0.3; echo returned' > {file}"
    ));
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        std::fs::read_to_string(file).unwrap(),
        "returned\n",
        "the host file after the call (which took {took:?})"
    );

    // A directory the caller gave as stdin: the container gets a pipe, never the directory.
    let out = ok(&format!(
        "workspacectl exec {name} -- 'readlink /proc/self/fd/0; ls /proc/self/fd/0/.. 2>&1 | head -3; cat | wc -c' < /etc"
    ));
    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with("pipe:["), "{out}");
    assert!(!out.contains("passwd"), "the host's /etc was listed: {out}");

    // A terminal the caller gave as stdin: a process that left its command reads nothing
    // typed into it after the call.
    inside(&m, &name, "rm -f /stolen").await;
    let (mut master, terminal) = pty_pair();
    let status = std::process::Command::new("workspacectl")
        .args(["exec", &name, "--cwd", "/", "--"])
        .arg(format!(
            "setsid sh -c '{LEAVE}; sleep 1; exec cat > /stolen' & sleep 0.3; echo returned"
        ))
        .stdin(std::process::Stdio::from(terminal))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    master.write_all(b"secret-keystroke\n").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let stolen = inside(&m, &name, "cat /stolen 2>/dev/null; true").await;
    assert!(
        !stolen.contains("secret"),
        "typed after the call, read in the container: {stolen:?}"
    );

    // The same through D-Bus: the caller's descriptors are let go once the call answered.
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containers_terminal_is_a_device_of_its_own_devpts_and_tmux_starts_there() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "tty").await;
    // workspacectl shell (StartProcess with a terminal, OpenPty).
    // (What is typed is echoed: the answers are told from it by what the shell computes.)
    let shell = sh(&format!(
        "printf 'tty | tr a-z A-Z; test -c \"$(tty)\" && echo device-$((40+2))\\nexit 3\\n' | workspacectl shell {name} -- sh"
    ));
    assert_eq!(shell.code, 3, "{}", shell.stderr);
    assert!(
        shell.stdout.contains("/DEV/PTS/") && shell.stdout.contains("device-42"),
        "{:?}",
        shell.stdout
    );
    // A process on a terminal through D-Bus: its terminal is one the container's /dev/pts
    // lists, and the host's has no device of that number for it.
    let p = m
        .start_process(
            &name,
            "t=$(tty); echo \"tty=$t\"; test -c \"$t\" && echo listed-inside",
            spec(vec![("pty", Variant::from(true))]),
        )
        .await
        .unwrap();
    let p = process(&conn, p).await;
    let out = output_until(&p, "listed-inside").await;
    assert!(out.contains("tty=/dev/pts/"), "{out:?}");
    // tmux needs a terminal with a name: it starts there.
    inside(
        &m,
        &name,
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null",
    )
    .await;
    let tmux = sh(&format!(
        "printf '' | workspacectl shell {name} -- sh -c 'tmux new-session \"echo inside-tmux; sleep 1\"; echo tmux-exit-$?'"
    ));
    assert!(
        tmux.stdout.contains("tmux-exit-0") && !tmux.stdout.contains("not a terminal"),
        "{:?} {}",
        tmux.stdout,
        tmux.stderr
    );
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_exec_ends_with_exit_though_a_process_that_left_it_keeps_its_stdout() {
    require_test_host();
    bridge_socket_up();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "sse").await;
    inside(&m, &name, "rm -f /escaped").await;
    // (The command waits until its child has left its cgroup, or its end would kill it first.)
    let body = serde_json::json!({
        "command": format!(
            "setsid sh -c '{LEAVE}; touch /escaped; sleep 60' & \
             while [ ! -e /escaped ]; do sleep 0.05; done; echo started"
        ),
    })
    .to_string();
    let started = Instant::now();
    let mut curl = sse_exec(&name, &body);
    let mut events = BufReader::new(curl.stdout.take().unwrap());
    let mut seen = Vec::new();
    while let Some((event, data)) = next_event(&mut events) {
        seen.push(event.clone());
        if event == "exit" {
            assert_eq!(data["exit_code"], 0, "{data}");
            break;
        }
    }
    let took = started.elapsed();
    assert_eq!(seen.first().map(String::as_str), Some("stdout"), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("exit"), "{seen:?}");
    // The drain after the command's end (2 s) and after the answer (2 s), not the minute the
    // process that left it sleeps.
    assert!(took < Duration::from_secs(20), "exit after {took:?}");
    // The stream then ends; the child that left still runs.
    let mut rest = String::new();
    events.read_to_string(&mut rest).unwrap();
    assert!(curl.wait().unwrap().success());
    let left = inside(
        &m,
        &name,
        "grep -lx sleep /proc/[0-9]*/comm 2>/dev/null | wc -l",
    )
    .await;
    assert_eq!(
        left.trim(),
        "1",
        "the child that left its command still runs"
    );
    m.destroy_workspace(&name).await.unwrap();
}

/// Writes a drop-in for the bridge with these settings (empty: none) and lets the next
/// connection start it afresh with them.
fn bridge_settings(env: &[(&str, &str)]) {
    let dir = "/run/systemd/system/agent-workspaces-http.service.d";
    let _ = std::fs::remove_dir_all(dir);
    if !env.is_empty() {
        std::fs::create_dir_all(dir).unwrap();
        let lines: String = env
            .iter()
            .map(|(k, v)| format!("Environment={k}={v}\n"))
            .collect();
        std::fs::write(format!("{dir}/test.conf"), format!("[Service]\n{lines}")).unwrap();
    }
    systemctl("daemon-reload");
    systemctl("stop agent-workspaces-http.service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_proxy_cuts_a_server_that_never_answers_or_stalls_and_caps_connections() {
    require_test_host();
    bridge_socket_up();
    bridge_settings(&[
        ("AGENT_WORKSPACES_PORT_RESPONSE_TIMEOUT", "2"),
        ("AGENT_WORKSPACES_PORT_IDLE_TIMEOUT", "4"),
        ("AGENT_WORKSPACES_PORT_CONNECTIONS_PER_WORKSPACE", "2"),
    ]);
    // On the test host's loopback (the default host workspace reaches it): one server that
    // accepts and never answers, one that answers a part and stalls.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let stalls = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalls_port = stalls.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut held = Vec::new();
        while let Ok((mut s, _)) = stalls.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
                .await;
            held.push(s);
        }
    });
    // (curl gives up after 30 s: a proxy without limits fails the test, it does not hang it.)
    let started = Instant::now();
    let (status, body) = curl(
        "GET",
        &format!("/api/workspaces/host/ports/{silent_port}/"),
        Some(TOKEN),
        "-m 30",
    );
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
    let started = Instant::now();
    let stalled = sh(&format!(
        "curl -sS -m 30 -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7600/api/workspaces/host/ports/{stalls_port}/"
    ));
    let took = started.elapsed();
    assert!(
        stalled.code != 0 && stalled.stdout.starts_with("200"),
        "the body is cut: {stalled:?}"
    );
    assert!(took < Duration::from_secs(15), "cut after {took:?}");
    // Two connections at once to one workspace's ports, then 429 until one closes.
    let hold = || {
        std::process::Command::new("curl")
            .args(["-sS", "-m", "30", "-o", "/dev/null"])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .arg(format!(
                "http://127.0.0.1:7600/api/workspaces/host/ports/{silent_port}/"
            ))
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (hold(), hold());
    std::thread::sleep(Duration::from_millis(1000));
    let (status, body) = curl(
        "GET",
        &format!("/api/workspaces/host/ports/{stalls_port}/"),
        Some(TOKEN),
        "-m 30",
    );
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "limits_exceeded", "{body}");
    let _ = (a.wait(), b.wait());
    bridge_settings(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_that_left_an_ended_background_process_costs_the_service_nothing() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "flood").await;
    inside(
        &m,
        &name,
        &format!(
            "printf '#!/bin/sh\\n{LEAVE}\\necho $$ > /flood.pid\\nexec cat /dev/zero\\n' > /flood.sh; chmod +x /flood.sh"
        ),
    )
    .await;
    let p = m
        .start_process(&name, "setsid /flood.sh & sleep 0.2", no_options())
        .await
        .unwrap();
    let p = process(&conn, p).await;
    assert_eq!(p.wait(30).await.unwrap(), (0, false));
    // Its output was read for the drain after its end (2 s), then let go: the flooder got
    // EPIPE, and nothing reads for it any more.
    std::thread::sleep(Duration::from_secs(3));
    let flooder = inside(
        &m,
        &name,
        "test -d /proc/$(cat /flood.pid) && echo alive || echo gone",
    )
    .await;
    assert_eq!(flooder.trim(), "gone");
    let pid = ok(&format!("systemctl show -p MainPID --value {UNIT}"));
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = ticks();
    std::thread::sleep(Duration::from_secs(5));
    let used = ticks() - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        used * 100 < 5 * 5 * hz,
        "the service used {used} ticks (at {hz}/s) in 5 s after the process ended"
    );
    m.destroy_workspace(&name).await.unwrap();
}
