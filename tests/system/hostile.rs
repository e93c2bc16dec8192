//! The agent inside a container is the container's: assume it is replaced, ptraced or
//! out-bound at its socket. A hostile one gains nothing from what the service gives it, and
//! a socket bound at its path is not taken for it. (The hostile agent is
//! `agent/examples/hostile_agent.rs`, built by `tests/system/run.sh`; its path comes in
//! `HOSTILE_AGENT`.)

use std::io::Write;
use std::time::{Duration, Instant};

use super::boundary::inside;
use super::processes::{output_until, process};
use super::*;

/// The hostile agent (its path in `HOSTILE_AGENT` is relative to the repository, the tests'
/// working directory).
fn hostile_agent() -> std::path::PathBuf {
    let path = std::env::var_os("HOSTILE_AGENT").expect("HOSTILE_AGENT names the hostile agent");
    std::env::current_dir().unwrap().join(path)
}

/// Copies the hostile agent into the container's tree as `/hostile_agent`.
fn plant_hostile_agent(name: &str) {
    let to = format!("/var/lib/machines/{name}/hostile_agent");
    std::fs::copy(hostile_agent(), &to).unwrap();
}

/// `/hostile.log` of the container (what the hostile agent tried, and what came of it).
fn hostile_log(name: &str) -> String {
    std::fs::read_to_string(format!("/var/lib/machines/{name}/hostile.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_bound_at_the_agents_path_is_not_taken_for_it_after_a_restart() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "outbound").await;
    plant_hostile_agent(&name);
    // The container's root binds a socket of its own at the agent's path.
    m.start_process(
        &name,
        "exec /hostile_agent --socket /run/agent-workspaces/agent.sock",
        no_options(),
    )
    .await
    .unwrap();
    wait_for("the socket bound", Duration::from_secs(10), || {
        hostile_log(&name).contains("listening").then_some(())
    });
    restart_service();
    let m = manager(&bus().await).await;
    assert_error(
        m.exec(&name, "echo hi", no_options()).await,
        "org.agent.Workspaces.Error.JobFailed",
        "is not the socket the container's agent made",
    );
    assert!(
        !hostile_log(&name).contains("a connection"),
        "the service connected to it: {}",
        hostile_log(&name)
    );
    // A stop and a start give the container its own agent again.
    m.stop_workspace(&name).await.unwrap();
    m.start_workspace(&name).await.unwrap();
    let (code, out, ..) = m.exec(&name, "echo back", no_options()).await.unwrap();
    assert_eq!((code, out.as_slice()), (0, &b"back\n"[..]));
    m.destroy_workspace(&name).await.unwrap();
}

/// Puts the hostile agent in place of the installed one while it lives: containers started
/// meanwhile run it as their PID 2.
struct AgentReplaced;

const AGENT: &str = "/usr/libexec/agent-workspaces-agent";

impl AgentReplaced {
    fn new() -> Self {
        std::fs::copy(AGENT, format!("{AGENT}.real")).unwrap();
        let tmp = format!("{AGENT}.hostile");
        std::fs::copy(hostile_agent(), &tmp).unwrap();
        std::fs::rename(&tmp, AGENT).unwrap();
        Self
    }
}

impl Drop for AgentReplaced {
    fn drop(&mut self) {
        let _ = std::fs::rename(format!("{AGENT}.real"), AGENT);
    }
}

/// The cgroup a process of this host is in.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_gains_nothing_from_what_the_service_gives_it() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "hostile").await;
    m.stop_workspace(&name).await.unwrap();
    let replaced = AgentReplaced::new();
    m.start_workspace(&name).await.unwrap();
    drop(replaced);
    let leader = ok(&format!("machinectl show {name} -p Leader --value"));
    // An administrator's shell entered into the container's PID and mount namespaces: it keeps
    // the host's credentials and its host cgroup.
    let mut admin = std::process::Command::new("nsenter")
        .args(["-t", leader.trim(), "-p", "-m", "--", "sleep", "300"])
        .spawn()
        .unwrap();
    // nsenter forks the process that enters the PID namespace: its child.
    let nsenter = admin.id();
    let (admin_pid, admin_inner) = wait_for("the admin shell", Duration::from_secs(10), || {
        let children =
            std::fs::read_to_string(format!("/proc/{nsenter}/task/{nsenter}/children")).ok()?;
        let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        // Its PID as the container sees it: the last of NSpid.
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))?
            .split_whitespace()
            .last()?
            .to_owned();
        (inner != pid.to_string()).then_some((pid, inner))
    });
    let before = cgroup_of(admin_pid);
    inside(&m, &name, &format!("echo {admin_inner} > /hostile-target")).await;
    // A caller that lends a file and a terminal.
    let file = "/root/hostile-output";
    let (mut master, terminal) = super::lent::pty_pair();
    let status = std::process::Command::new("workspacectl")
        .args(["exec", &name, "--", "echo hi"])
        .stdin(std::process::Stdio::from(terminal))
        .stdout(std::fs::File::create(file).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    master.write_all(b"secret-keystroke\n").unwrap();
    let log = wait_for("the agent's late attempts", Duration::from_secs(20), || {
        let log = hostile_log(&name);
        (log.matches("late read from stdin").count() >= 2).then_some(log)
    });
    // Nothing written to the caller's file after the call; the keystroke read by nobody.
    assert_eq!(std::fs::read_to_string(file).unwrap(), "hi\n", "{log}");
    assert!(!log.contains("secret"), "{log}");
    assert!(!log.contains("wrote"), "late writes went somewhere: {log}");
    // The administrator's shell stayed where it was, though the agent tried to move it.
    assert!(log.contains("cannot move"), "{log}");
    // A descriptor attached to its answers: refused (or, on a kernel before 6.16, closed),
    // and the service answered all the same.
    assert!(log.contains("attached a descriptor to Started"), "{log}");
    assert!(!log.contains("moved "), "{log}");
    assert_eq!(cgroup_of(admin_pid), before);
    let _ = admin.kill();
    let _ = admin.wait();
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_reaches_ten_thousand_processes_while_the_service_answers() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "many").await;
    let p = m
        .start_process(
            &name,
            "i=0; while [ $i -lt 10000 ]; do sleep 600 & i=$((i+1)); done; echo spawned; wait",
            no_options(),
        )
        .await
        .unwrap();
    let p = process(&conn, p).await;
    let out = tokio::time::timeout(Duration::from_secs(300), output_until(&p, "spawned"))
        .await
        .unwrap();
    assert!(out.contains("spawned"), "{out:?}");
    // Every process of the command, as the host sees them.
    let payload = format!("/sys/fs/cgroup/machine.slice/agent-workspace-{name}.service/payload");
    let pids = || -> Vec<u32> {
        std::fs::read_dir(&payload)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("exec-"))
            .map(|e| std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default())
            .collect::<String>()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    };
    assert!(pids().len() > 10_000, "{}", pids().len());
    let stopped = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('T')
        })
    };
    let started = Instant::now();
    p.signal(libc::SIGSTOP).await.unwrap();
    let answered = started.elapsed();
    // While the signal goes to each of them, the service answers.
    let asked = Instant::now();
    m.list_workspaces().await.unwrap();
    let listed = asked.elapsed();
    let all = wait_for("every process stopped", Duration::from_secs(60), || {
        let pids = pids();
        pids.iter().all(stopped).then_some(pids.len())
    });
    eprintln!(
        "SIGSTOP to {all} processes: answered in {answered:?}, all stopped after {:?}; a call meanwhile took {listed:?}",
        started.elapsed()
    );
    assert!(
        answered < Duration::from_secs(1),
        "Signal answered after {answered:?}"
    );
    assert!(
        listed < Duration::from_secs(1),
        "a call meanwhile took {listed:?}"
    );
    // SIGKILL is the cgroup's cgroup.kill: all of them at once.
    p.signal(libc::SIGKILL).await.unwrap();
    assert_eq!(p.wait(60).await.unwrap(), (137, false));
    m.destroy_workspace(&name).await.unwrap();
}
