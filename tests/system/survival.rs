//! Background processes outlive a restart of the service: host processes (run by the host
//! agent) and container processes alike are found again with their ids, output, input,
//! terminal and signals; one that ended while the service restarted is reported with its
//! exit code.

use std::time::Duration;

use zbus::Variant;

use super::processes::{output_until, process, read_until};
use super::*;

/// The PID a process printed as `pid=N`.
fn pid_in(text: &str) -> u32 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {text:?}"))
}

const ECHO: &str = "echo pid=$$; while read -r l; do echo \"got $l\"; done; echo eof; exit 5";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_processes_outlive_a_restart_of_the_service() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let box_name = ready_container_named(&conn, "keep").await;
    let service_pid = ok(&format!("systemctl show -p MainPID --value {UNIT}"));

    // Host: one reading its input, one on a terminal, one that ends when the old service does.
    let host_echo = m.start_process("host", ECHO, no_options()).await.unwrap();
    let host_pty = m
        .start_process(
            "host",
            "echo pid=$$; stty size; read -r l; echo \"typed $l\"; exit 4",
            spec(vec![
                ("pty", Variant::from(true)),
                ("cols", Variant::from(90u16)),
                ("rows", Variant::from(20u16)),
            ]),
        )
        .await
        .unwrap();
    let ends = m
        .start_process(
            "host",
            &format!(
                "while kill -0 {} 2>/dev/null; do sleep 0.05; done; exit 9",
                service_pid.trim()
            ),
            no_options(),
        )
        .await
        .unwrap();
    // Container: one reading its input.
    let boxed = m
        .start_process(&box_name, ECHO, no_options())
        .await
        .unwrap();

    let mut pids = Vec::new();
    for (path, want) in [(&host_echo, "pid="), (&host_pty, "20 90"), (&boxed, "pid=")] {
        let text = output_until(&process(&conn, path.clone()).await, want).await;
        assert!(text.contains(want), "{text:?}");
        pids.push(pid_in(&text));
    }
    // One that has finished before the restart.
    let finished = m
        .start_process("host", "echo done; exit 3", no_options())
        .await
        .unwrap();
    let finished = process(&conn, finished.clone()).await;
    assert_eq!(finished.wait(30).await.unwrap(), (3, false));
    let listed_before = m.list_processes("host").await.unwrap();

    restart_service();
    assert_ne!(
        ok(&format!("systemctl show -p MainPID --value {UNIT}")),
        service_pid,
        "the service was restarted"
    );
    let conn = bus().await;
    let m = manager(&conn).await;

    // The host processes run on, the same processes (their PIDs live; the host agent's).
    for pid in &pids[..2] {
        assert!(!pid_gone(*pid), "host process {pid} survived the restart");
    }
    let agent_procs = ok(
        "cat /sys/fs/cgroup/system.slice/agent-workspaces-host-agent.service/exec-*/cgroup.procs",
    );
    assert!(
        agent_procs.lines().any(|l| l.trim() == pids[0].to_string()),
        "{} runs under the host agent: {agent_procs}",
        pids[0]
    );
    // Listed with the same ids and commands (those that had finished, with their exit codes);
    // the one that ended with the old service has its exit code.
    let listed = m.list_processes("host").await.unwrap();
    for (id, command, running, code) in &listed_before {
        assert!(
            listed
                .iter()
                .any(|(i, c, r, x)| i == id && c == command && (*running || (!r && x == code))),
            "{id} is listed again: {listed:?}"
        );
    }
    let finished = process(&conn, finished.inner().path().to_owned().into()).await;
    assert_eq!(finished.exit_code().await.unwrap(), 3);
    assert_eq!(
        finished.read_output(0, 100).await.unwrap(),
        (b"done\n".to_vec(), 5, true),
        "a finished process's output is kept across the restart"
    );
    let ended = process(&conn, ends.clone()).await;
    assert_eq!(ended.wait(30).await.unwrap(), (9, false));
    assert!(!ended.running().await.unwrap());

    // Output kept from before the restart, input taken after it, the end reported.
    for (path, pid) in [(&host_echo, pids[0]), (&boxed, pids[2])] {
        let p = process(&conn, path.clone()).await;
        assert!(p.running().await.unwrap(), "{path} runs");
        let before = output_until(&p, "pid=").await;
        assert_eq!(
            before,
            format!("pid={pid}\n"),
            "the output kept across the restart"
        );
        p.write_input(b"after\n").await.unwrap();
        assert_eq!(
            output_until(&p, "got after").await,
            format!("pid={pid}\ngot after\n")
        );
        p.write_input(b"").await.unwrap();
        assert_eq!(p.wait(30).await.unwrap(), (5, false));
        assert_eq!(
            output_until(&p, "eof").await,
            format!("pid={pid}\ngot after\neof\n")
        );
    }

    // The terminal: attached after the restart, the kept output first, then typing.
    let p = process(&conn, host_pty.clone()).await;
    assert!(p.running().await.unwrap());
    let fd = p.open_pty().await.unwrap();
    let std_stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
    std_stream.set_nonblocking(true).unwrap();
    let mut t = tokio::net::UnixStream::from_std(std_stream).unwrap();
    let mut seen = Vec::new();
    read_until(&mut t, &mut seen, "20 90\r\n").await;
    p.resize(100, 30).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        t.write_all(b"hi\n").await.unwrap();
    }
    read_until(&mut t, &mut seen, "typed hi\r\n").await;
    assert_eq!(p.wait(30).await.unwrap(), (4, false));

    // A process started after the restart gets the next id, and a signal still reaches a
    // process taken up again.
    let again = m.start_process("host", ECHO, no_options()).await.unwrap();
    let ids: Vec<u32> = listed_before
        .iter()
        .map(|(id, ..)| id.parse().unwrap())
        .collect();
    let p = process(&conn, again.clone()).await;
    let new_id: u32 = p.id().await.unwrap().parse().unwrap();
    assert!(ids.iter().all(|id| *id < new_id), "{new_id} after {ids:?}");
    let pid = pid_in(&output_until(&p, "pid=").await);

    // A crash: systemd restarts the service with what it kept; the process runs on, takes
    // input and a signal (its output from before the crash is lost).
    let restarts = || ok(&format!("systemctl show -p NRestarts --value {UNIT}"));
    let before = restarts();
    ok(&format!("systemctl kill -s KILL {UNIT}"));
    wait_for(
        "systemd to restart the service",
        Duration::from_secs(30),
        || {
            let active = sh(&format!("systemctl is-active {UNIT}")).stdout;
            (active.trim() == "active" && restarts() != before).then_some(())
        },
    );
    let conn = bus().await;
    let m = manager(&conn).await;
    let p = process(&conn, again.clone()).await;
    assert!(p.running().await.unwrap(), "it runs on after the crash");
    assert!(!pid_gone(pid));
    p.write_input(
        b"crash
",
    )
    .await
    .unwrap();
    assert!(output_until(&p, "got crash").await.contains(
        "got crash
"
    ));
    p.signal(15).await.unwrap();
    assert_eq!(p.wait(30).await.unwrap(), (128 + 15, false));

    // A stop lets systemd drop what it kept: the next start ends what the host agent still
    // runs for the old service, and lists nothing of it.
    let orphan = m.start_process("host", ECHO, no_options()).await.unwrap();
    let pid = pid_in(&output_until(&process(&conn, orphan.clone()).await, "pid=").await);
    systemctl(&format!("stop {UNIT}"));
    restart_service();
    wait_for("the orphan to be ended", Duration::from_secs(10), || {
        pid_gone(pid).then_some(())
    });
    let conn = bus().await;
    let m = manager(&conn).await;
    let orphan_id = orphan.as_str().rsplit('/').next().unwrap().to_owned();
    assert!(
        !m.list_processes("host")
            .await
            .unwrap()
            .iter()
            .any(|(id, ..)| *id == orphan_id),
        "not listed after a stop"
    );
    m.destroy_workspace(&box_name).await.unwrap();
}
