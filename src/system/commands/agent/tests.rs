//! The service's side of the agent protocol against stand-in agents: kept connections used
//! again, replaced, dropped; port requests on them.

use super::*;
use agent_workspaces_agent::{ExecRequest, Reply};
use rustix::fs as rfs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream as StdStream};

/// A home for an agent listening at `path` (a container's is found through its leader).
fn home_at(path: &std::path::Path) -> Arc<AgentHome> {
    home_for(path, None)
}

fn home_for(path: &std::path::Path, peer: Option<Peer>) -> Arc<AgentHome> {
    use rustix::fs::{Mode, OFlags};
    let socket = rfs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).unwrap();
    AgentHome::new(socket, peer)
}

/// A stand-in agent: answers every command on a connection with Started and Exited 0;
/// after each, ends the connection (`serves_next: false`, as agents before NEXT did) or
/// reads NEXT and serves the next request. A port request it answers with a connection
/// (one end of a socket pair) and ends the connection. Counts the connections it accepted.
fn fake_agent(listener: UnixListener, serves_next: bool) -> Arc<std::sync::atomic::AtomicUsize> {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            loop {
                let mut header = [0u8; 4];
                let mut fds = Vec::new();
                if recv_with_fds(conn.as_fd(), &mut header, &mut fds).unwrap_or(0) != 4 {
                    break;
                }
                let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
                conn.read_exact(&mut body).unwrap();
                let mut out = Reply::Started { pid: 1 }.encode();
                out.extend(Reply::Exited { code: 0 }.encode());
                conn.write_all(&out).unwrap();
                if !serves_next {
                    break;
                }
                let mut next = [0u8; 1];
                if conn.read(&mut next).unwrap_or(0) != 1 || next[0] != NEXT {
                    break;
                }
            }
        }
    });
    accepted
}

/// Starts `true` on `conn` (stdin, stdout and stderr /dev/null): the agent's first answer.
async fn start_true(conn: &mut AgentConnection) -> Option<Reply> {
    let req = ExecRequest {
        command: b"true".to_vec(),
        cwd: b"/".to_vec(),
        env: vec![],
        cgroup: Vec::new(),
        terminal: agent_workspaces_agent::Terminal::None,
    };
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds = [null.as_fd(), null.as_fd(), null.as_fd()];
    conn.start(&req, &fds, Duration::from_secs(5))
        .await
        .unwrap()
}

/// One command on a kept connection or a new one, to its end; the connection kept after.
async fn run_one(home: &Arc<AgentHome>) {
    let mut conn = match home.take_idle() {
        Some(c) => c,
        None => home.connect().await.unwrap(),
    };
    assert_eq!(start_true(&mut conn).await, Some(Reply::Started { pid: 1 }));
    assert_eq!(conn.reply().await.unwrap(), Some(Reply::Exited { code: 0 }));
    conn.recycle();
}

#[tokio::test]
async fn a_connection_is_used_again_and_one_the_agent_ended_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    for serves_next in [true, false] {
        let path = dir.path().join(format!("agent-{serves_next}.sock"));
        let accepted = fake_agent(UnixListener::bind(&path).unwrap(), serves_next);
        let home = home_at(&path);
        for _ in 0..5 {
            run_one(&home).await;
        }
        if serves_next {
            // One connection served all five; it waits for the next.
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
            assert!(home.reuse.load(Ordering::SeqCst));
            assert_eq!(home.idle.lock().unwrap().len(), 1);
        } else {
            // The first kept connection was found ended: reuse is off, each command has
            // a connection of its own, and none is kept.
            assert_eq!(accepted.load(Ordering::SeqCst), 5);
            assert!(!home.reuse.load(Ordering::SeqCst));
            assert!(home.idle.lock().unwrap().is_empty());
        }
    }
}

#[tokio::test]
async fn a_kept_connection_that_ends_before_it_answers_is_replaced_by_a_new_one() {
    // The agent ends the connection after reading NEXT and the request (as it would if it
    // ended it between the service's peek and the request): the request goes again, on
    // a new connection.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let home = home_at(&path);
    let served = std::thread::spawn(move || {
        let (mut first, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 4096];
        recv_with_fds(first.as_fd(), &mut buf, &mut Vec::new()).unwrap();
        let mut out = Reply::Started { pid: 1 }.encode();
        out.extend(Reply::Exited { code: 0 }.encode());
        first.write_all(&out).unwrap();
        // The next request comes on this connection; it ends unanswered.
        recv_with_fds(first.as_fd(), &mut buf, &mut Vec::new()).unwrap();
        drop(first);
        let (mut second, _): (StdStream, _) = listener.accept().unwrap();
        let n = recv_with_fds(second.as_fd(), &mut buf, &mut Vec::new()).unwrap();
        // A new connection's request comes without NEXT.
        assert_ne!(buf[0], NEXT);
        assert!(n >= 4);
        second.write_all(&out).unwrap();
    });
    let mut conn = home.connect().await.unwrap();
    assert_eq!(start_true(&mut conn).await, Some(Reply::Started { pid: 1 }));
    assert_eq!(conn.reply().await.unwrap(), Some(Reply::Exited { code: 0 }));
    conn.recycle();
    let mut conn = home.take_idle().expect("kept");
    assert_eq!(start_true(&mut conn).await, Some(Reply::Started { pid: 1 }));
    assert!(conn.reused.is_none());
    assert!(!home.reuse.load(Ordering::SeqCst));
    served.join().unwrap();
}

#[tokio::test]
async fn a_kept_connection_found_ended_long_after_its_command_is_only_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let home = home_at(&path);
    let (ours, theirs) = StdStream::pair().unwrap();
    drop(theirs);
    ours.set_nonblocking(true).unwrap();
    let since = Instant::now() - Duration::from_secs(10);
    home.idle
        .lock()
        .unwrap()
        .push((UnixStream::from_std(ours).unwrap(), since));
    assert!(home.take_idle().is_none());
    // Its agent may have ended it for waiting (or ended): reuse stays on.
    assert!(home.reuse.load(Ordering::SeqCst));
}

/// This process's PID namespace, as an agent's peer check sees it.
fn own_pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").unwrap().ino()
}

#[tokio::test]
async fn only_a_process_of_the_containers_root_in_its_namespace_is_taken_for_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    fake_agent(UnixListener::bind(&path).unwrap(), true);
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let right = Peer {
        pid_ns: own_pid_ns(),
        uid: me,
    };
    let mut conn = AgentConnection::connect(&home_for(&path, Some(right)))
        .await
        .unwrap();
    assert_eq!(start_true(&mut conn).await, Some(Reply::Started { pid: 1 }));
    for wrong in [
        Peer {
            uid: me.wrapping_add(65536),
            ..right
        },
        Peer {
            pid_ns: right.pid_ns + 1,
            ..right
        },
    ] {
        let e = AgentConnection::connect(&home_for(&path, Some(wrong)))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{wrong:?}: {e}");
        assert!(e.to_string().contains("not the container's agent"), "{e}");
    }
}

#[tokio::test]
async fn a_descriptor_sent_with_a_reply_unasked_is_refused_or_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // A stand-in agent that attaches a pipe's write end to its Started.
    let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let agent = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut header = [0u8; 4];
        let mut fds = Vec::new();
        recv_with_fds(conn.as_fd(), &mut header, &mut fds).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
        conn.read_exact(&mut body).unwrap();
        let started = Reply::Started { pid: 1 }.encode();
        let sent = send_with_fds(conn.as_fd(), &started, &[pipe_w.as_fd()]);
        match &sent {
            Ok(n) => conn.write_all(&started[*n..]).unwrap(),
            // The service's socket takes no descriptor (SO_PASSRIGHTS, Linux 6.16).
            Err(_) => conn.write_all(&started).unwrap(),
        }
        drop(pipe_w);
        conn.write_all(&Reply::Exited { code: 0 }.encode()).unwrap();
        // Held until the service closes the connection.
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        sent.map(drop)
    });
    let mut conn = AgentConnection::connect(&home_at(&path)).await.unwrap();
    assert_eq!(start_true(&mut conn).await, Some(Reply::Started { pid: 1 }));
    assert_eq!(conn.reply().await.unwrap(), Some(Reply::Exited { code: 0 }));
    // Nothing of the pipe is held by the service: its reader sees the end.
    let mut pipe = std::fs::File::from(pipe_r);
    let mut got = Vec::new();
    let ended = tokio::task::spawn_blocking(move || pipe.read_to_end(&mut got).map(|_| got));
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .expect("the pipe's end")
            .unwrap()
            .unwrap(),
        b""
    );
    drop(conn);
    let sent = agent.join().unwrap();
    if let Err(e) = sent {
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    }
}
