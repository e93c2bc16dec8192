//! The agent binary run on this machine (no container needed): the protocol end to end.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use agent_workspaces_agent::{
    ExecRequest, MAX_REPLY, RefuseReason, Reply, Terminal, frame_len, send_with_fds,
};

#[path = "agent/files.rs"]
mod files;

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent() -> Agent {
    start_agent_with(&[])
}

fn start_agent_with(args: &[&str]) -> Agent {
    let dir = std::env::temp_dir().join(format!(
        "aw-agent-test-{}-{}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("run/agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_agent-workspaces-agent"))
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .unwrap();
    let start = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the agent did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Agent {
        child,
        socket,
        _dir: tempdir::Dir(dir),
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

fn read_reply(conn: &mut UnixStream) -> Option<Reply> {
    let mut header = [0u8; 4];
    conn.read_exact(&mut header).ok()?;
    let n = frame_len(header, MAX_REPLY).unwrap();
    let mut body = vec![0u8; n];
    conn.read_exact(&mut body).unwrap();
    Some(Reply::decode(&body).unwrap())
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    use std::os::fd::FromRawFd;
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

struct Outcome {
    replies: Vec<Reply>,
    stdout: String,
    stderr: String,
}

fn run(agent: &Agent, command: &str, cwd: &Path, stdin: &[u8]) -> Outcome {
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let req = ExecRequest {
        command: command.as_bytes().to_vec(),
        cwd: cwd.as_os_str().as_encoded_bytes().to_vec(),
        env: vec![
            (b"PATH".to_vec(), b"/usr/bin:/bin".to_vec()),
            (b"GREETING".to_vec(), b"hello there".to_vec()),
        ],
        cgroup: Vec::new(),
        terminal: Terminal::None,
    };
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let frame = req.encode();
    let n = send_with_fds(
        conn.as_fd(),
        &frame,
        &[in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
    )
    .unwrap();
    conn.write_all(&frame[n..]).unwrap();
    drop((in_r, out_w, err_w));
    let mut w = std::fs::File::from(in_w);
    w.write_all(stdin).unwrap();
    drop(w);
    let reader = |fd: OwnedFd| {
        std::thread::spawn(move || {
            let mut s = String::new();
            std::fs::File::from(fd).read_to_string(&mut s).unwrap();
            s
        })
    };
    let (out, err) = (reader(out_r), reader(err_r));
    let mut replies = Vec::new();
    // The agent keeps the connection open after the last reply, until its client closes it.
    while let Some(r) = read_reply(&mut conn) {
        let last = matches!(r, Reply::Exited { .. } | Reply::Refused { .. });
        replies.push(r);
        if last {
            break;
        }
    }
    Outcome {
        replies,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[test]
fn runs_a_command_with_its_streams_env_cwd_and_exit_code() {
    let agent = start_agent();
    let dir = std::env::temp_dir();
    let o = run(
        &agent,
        "cat; echo \"$GREETING\"; pwd; echo oops >&2; exit 3",
        &dir,
        b"from stdin\n",
    );
    assert!(matches!(o.replies[0], Reply::Started { pid } if pid > 0));
    assert_eq!(o.replies[1], Reply::Exited { code: 3 });
    assert_eq!(o.replies.len(), 2);
    let want = format!(
        "from stdin\nhello there\n{}\n",
        dir.canonicalize().unwrap().display()
    );
    assert_eq!(o.stdout, want);
    assert_eq!(o.stderr, "oops\n");
    let o = run(&agent, "kill -TERM $$", &dir, b"");
    assert_eq!(o.replies[1], Reply::Exited { code: 128 + 15 });
}

#[test]
fn a_missing_cwd_is_refused_by_name() {
    let agent = start_agent();
    let o = run(&agent, "true", Path::new("/nonexistent/dir"), b"");
    assert!(
        matches!(&o.replies[..], [Reply::Refused { reason: RefuseReason::Cwd, message }] if message.contains("/nonexistent/dir")),
        "{:?}",
        o.replies
    );
}

#[test]
fn many_commands_at_once() {
    let agent = std::sync::Arc::new(start_agent());
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let agent = agent.clone();
            std::thread::spawn(move || {
                let o = run(&agent, &format!("sleep 0.2; echo {i}"), Path::new("/"), b"");
                assert_eq!(o.stdout, format!("{i}\n"));
                assert_eq!(o.replies.last(), Some(&Reply::Exited { code: 0 }));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The agent's threads (their ids).
fn threads(agent: &Agent) -> std::collections::BTreeSet<u32> {
    std::fs::read_dir(format!("/proc/{}/task", agent.child.id()))
        .unwrap()
        .map(|t| t.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect()
}

/// Runs `each` commands from each of `clients` clients at once; every one must succeed.
fn clients_at_once(agent: &std::sync::Arc<Agent>, clients: usize, each: usize, command: &str) {
    let clients: Vec<_> = (0..clients)
        .map(|_| {
            let agent = agent.clone();
            let command = command.to_owned();
            std::thread::spawn(move || {
                for _ in 0..each {
                    let o = run(&agent, &command, Path::new("/"), b"");
                    assert_eq!(
                        o.replies.last(),
                        Some(&Reply::Exited { code: 0 }),
                        "{command}"
                    );
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

/// A command that runs until `n` commands of its kind run at once (a barrier through a
/// directory): however slowly the machine starts them, `n` run together.
fn all_at_once(n: usize) -> (String, tempdir::Dir) {
    let dir = std::env::temp_dir().join(format!("aw-agent-barrier-{}", rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let command = format!("touch {d}/$$; while [ $(ls {d} | wc -l) -lt {n} ]; do sleep 0.01; done");
    (command, tempdir::Dir(dir))
}

/// Waits (up to a minute: nothing here depends on how fast threads wake) until the agent
/// has at most `n` threads; the count it came down to.
fn threads_come_down_to(agent: &Agent, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    while threads(agent).len() > n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    threads(agent).len()
}

#[test]
fn serving_threads_are_reused_and_the_idle_ones_end() {
    // 32 commands that run at once make at least 32 threads.
    let agent = std::sync::Arc::new(start_agent_with(&["--idle-timeout", "600"]));
    let (barrier, _dir) = all_at_once(32);
    clients_at_once(&agent, 32, 1, &barrier);
    let before = threads(&agent);
    assert!(before.len() > 32, "{before:?}");
    // Then commands from 8 clients at once are served by threads that exist: at least 24 wait
    // while 8 serve, none is made.
    clients_at_once(&agent, 8, 25, "true");
    let made: Vec<_> = threads(&agent).difference(&before).copied().collect();
    assert!(made.is_empty(), "threads made: {made:?}");

    // With a short idle limit, the idle ones end: the first thread and one waiting stay.
    let agent = std::sync::Arc::new(start_agent_with(&["--idle-timeout", "1"]));
    let (barrier, _dir) = all_at_once(32);
    clients_at_once(&agent, 32, 1, &barrier);
    assert!(threads(&agent).len() > 32);
    assert!(
        threads_come_down_to(&agent, 2) <= 2,
        "{:?}",
        threads(&agent)
    );
    // One command after another is served by what is left: a thread made while the one that
    // served the last command was between connections ends too.
    for _ in 0..20 {
        clients_at_once(&agent, 1, 1, "true");
    }
    assert!(
        threads_come_down_to(&agent, 2) <= 2,
        "{:?}",
        threads(&agent)
    );
}

#[test]
fn garbage_and_missing_descriptors_are_refused_and_the_agent_keeps_serving() {
    let agent = start_agent();
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    conn.write_all(&[5, 0, 0, 0, 9, 9, 9, 9, 9]).unwrap();
    assert!(matches!(
        read_reply(&mut conn),
        Some(Reply::Refused {
            reason: RefuseReason::BadRequest,
            ..
        })
    ));
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let req = ExecRequest {
        command: b"true".to_vec(),
        cwd: b"/".to_vec(),
        env: vec![],
        cgroup: Vec::new(),
        terminal: Terminal::None,
    };
    conn.write_all(&req.encode()).unwrap();
    assert!(
        matches!(read_reply(&mut conn), Some(Reply::Refused { reason: RefuseReason::BadRequest, message }) if message.contains("descriptors"))
    );
    let o = run(&agent, "echo still here", Path::new("/"), b"");
    assert_eq!(o.stdout, "still here\n");
}

/// A command whose stdin is a terminal runs in a session of its own with that terminal as its
/// controlling terminal: it leads its session, and its foreground process group is its own.
#[test]
fn a_command_on_a_terminal_leads_its_session_and_controls_the_terminal() {
    use std::os::fd::{AsRawFd, FromRawFd};
    let agent = start_agent();
    // SAFETY: plain calls; each descriptor made is owned at once.
    let (master, terminal) = unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let master = OwnedFd::from_raw_fd(m);
        let t = libc::ioctl(
            m,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(t >= 0);
        (master, OwnedFd::from_raw_fd(t))
    };
    let req = ExecRequest {
        // Fields 6 to 8 of /proc/PID/stat: session, terminal, the terminal's foreground group.
        command: br#"read -r -a f < /proc/$$/stat; test -t 0 && echo "tty pid=$$ sid=${f[5]} fg=${f[7]}""#
            .to_vec(),
        cwd: b"/".to_vec(),
        env: vec![(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())],
        cgroup: Vec::new(),
        terminal: Terminal::Given,
    };
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let frame = req.encode();
    let n = send_with_fds(
        conn.as_fd(),
        &frame,
        &[terminal.as_fd(), terminal.as_fd(), terminal.as_fd()],
    )
    .unwrap();
    conn.write_all(&frame[n..]).unwrap();
    drop(terminal);
    let mut replies = Vec::new();
    // The agent keeps the connection open after the last reply, until its client closes it.
    while let Some(r) = read_reply(&mut conn) {
        let last = matches!(r, Reply::Exited { .. } | Reply::Refused { .. });
        replies.push(r);
        if last {
            break;
        }
    }
    assert!(
        matches!(replies.last(), Some(Reply::Exited { code: 0 })),
        "{replies:?}"
    );
    // The terminal's output, until it is closed (EIO).
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: read into a local buffer.
        let r = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..r as usize]);
    }
    let out = String::from_utf8(out).unwrap();
    let fields: Vec<&str> = out.trim().split(' ').collect();
    assert_eq!(fields.len(), 4, "{out:?}");
    let pid = fields[1].trim_start_matches("pid=");
    assert_eq!(fields[2], format!("sid={pid}"), "{out:?}");
    assert_eq!(fields[3], format!("fg={pid}"), "{out:?}");
}

/// Sends a request on `conn` (after `prefix`) with /dev/null for stdin and stderr; its
/// stdout's read end.
fn send_request(conn: &mut UnixStream, prefix: &[u8], command: &str) -> OwnedFd {
    let null = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let (out_r, out_w) = pipe();
    let req = ExecRequest {
        command: command.as_bytes().to_vec(),
        cwd: b"/".to_vec(),
        env: vec![(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())],
        cgroup: Vec::new(),
        terminal: Terminal::None,
    };
    let mut frame = prefix.to_vec();
    frame.extend(req.encode());
    let n = send_with_fds(
        conn.as_fd(),
        &frame,
        &[null().as_fd(), out_w.as_fd(), null().as_fd()],
    )
    .unwrap();
    conn.write_all(&frame[n..]).unwrap();
    out_r
}

fn read_all(fd: OwnedFd) -> String {
    let mut s = String::new();
    std::fs::File::from(fd).read_to_string(&mut s).unwrap();
    s
}

#[test]
fn a_connection_serves_commands_in_a_row_until_its_client_ends_it() {
    use agent_workspaces_agent::NEXT;
    let agent = start_agent();
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    for (i, prefix) in [&[][..], &[NEXT], &[NEXT]].into_iter().enumerate() {
        let out = send_request(&mut conn, prefix, &format!("echo {i}; exit {i}"));
        let r = read_reply(&mut conn);
        assert!(
            matches!(r, Some(Reply::Started { .. })),
            "command {i}: {r:?}"
        );
        assert_eq!(
            read_reply(&mut conn),
            Some(Reply::Exited { code: i as i32 })
        );
        assert_eq!(read_all(out), format!("{i}\n"));
    }
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    drop(send_request(&mut conn, &[], "true"));
    assert!(matches!(read_reply(&mut conn), Some(Reply::Started { .. })));
    assert_eq!(read_reply(&mut conn), Some(Reply::Exited { code: 0 }));
    // Anything but NEXT or KEEP after an exit ends the connection.
    conn.write_all(b"x").unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(conn.read(&mut [0u8; 1]).unwrap(), 0);
    // A refused request ends its connection too.
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    conn.write_all(&[5, 0, 0, 0, 9, 9, 9, 9, 9]).unwrap();
    assert!(matches!(read_reply(&mut conn), Some(Reply::Refused { .. })));
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(conn.read(&mut [0u8; 1]).unwrap(), 0);
}

#[test]
fn a_connection_marked_after_started_stays_open_until_its_client_closes_it() {
    use agent_workspaces_agent::{KEEP, NEXT};
    let agent = start_agent();
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let out = send_request(&mut conn, &[], "sleep 0.2");
    assert!(matches!(read_reply(&mut conn), Some(Reply::Started { .. })));
    conn.write_all(&[KEEP]).unwrap();
    assert_eq!(read_reply(&mut conn), Some(Reply::Exited { code: 0 }));
    assert_eq!(read_all(out), "");
    // It serves nothing more, and stays open.
    let _out = send_request(&mut conn, &[NEXT], "echo no");
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let r = conn.read(&mut [0u8; 1]);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "a marked connection stays open: {r:?}"
    );
}

/// Reads from `fd` until `needle` has come (or the end); all that came.
fn read_until(fd: &mut std::fs::File, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match fd.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A terminal made by the agent: the command's terminal is a device of the agent's own
/// devpts (it has a name), typed into from the stdin pipe, its output relayed to the stdout
/// pipe, resized by `RESIZE`; the exit comes as `Exited` and the output ends with the terminal.
#[test]
fn a_terminal_made_inside_has_a_name_is_relayed_and_resized() {
    let agent = start_agent();
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let req = ExecRequest {
        command: br#"tty; stty size; read -r line; stty size; echo "got $line"; exit 3"#.to_vec(),
        cwd: b"/".to_vec(),
        env: vec![(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())],
        cgroup: Vec::new(),
        terminal: Terminal::Make { cols: 80, rows: 24 },
    };
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    send_request_on(&mut conn, &req, [&in_r, &out_w, &out_w]);
    drop((in_r, out_w));
    assert!(matches!(read_reply(&mut conn), Some(Reply::Started { .. })));
    let mut out = std::fs::File::from(out_r);
    let first = read_until(&mut out, "24 80");
    let name = first.lines().next().unwrap_or_default().trim().to_owned();
    assert!(name.starts_with("/dev/pts/"), "{first:?}");
    assert!(
        Path::new(&name).exists(),
        "{name} is a device of the agent's devpts"
    );
    conn.write_all(&agent_workspaces_agent::resize_message(100, 30))
        .unwrap();
    let mut input = std::fs::File::from(in_w);
    input.write_all(b"hi\n").unwrap();
    let rest = read_until(&mut out, "got hi");
    assert!(rest.contains("30 100"), "{rest:?}");
    assert_eq!(read_reply(&mut conn), Some(Reply::Exited { code: 3 }));
    // The terminal's last holder has exited: its output ends.
    let mut tail = String::new();
    out.read_to_string(&mut tail).unwrap();
    // A connection that ran a command on a terminal serves no other.
    assert_eq!(read_reply(&mut conn), None);
}

/// The command joins the cgroup the request names, opened by the agent itself.
#[test]
fn a_command_joins_the_cgroup_the_request_names() {
    // The cgroup v2 mount and this process's cgroup in it; root may make a child there.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let Some(mount) = info
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split(' ').nth(4))
    else {
        return eprintln!("no cgroup v2 hierarchy: skipped");
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .trim()
        .trim_end_matches('/')
        .to_owned();
    let name = format!("aw-agent-join-{}", std::process::id());
    let dir = Path::new(mount)
        .join(rel.trim_start_matches('/'))
        .join(&name);
    if let Err(e) = std::fs::create_dir(&dir) {
        return eprintln!("cannot create {}: {e}: skipped", dir.display());
    }
    let agent = start_agent();
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let (out_r, out_w) = pipe();
    let null = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let req = ExecRequest {
        command: b"cat /proc/self/cgroup".to_vec(),
        cwd: b"/".to_vec(),
        env: vec![(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())],
        cgroup: format!("{rel}/{name}").into_bytes(),
        terminal: Terminal::None,
    };
    send_request_on(&mut conn, &req, [&null(), &out_w, &null()]);
    drop(out_w);
    let out = read_all(out_r);
    // Removed once the agent has reaped the command (a cgroup with a process is busy).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("0::") && l.trim_end().ends_with(&name)),
        "{out:?} is in {name}"
    );
    // A cgroup that is not there is refused, by the agent, with its name.
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let missing = ExecRequest {
        cgroup: format!("{rel}/{name}-gone").into_bytes(),
        ..req
    };
    send_request_with(&mut conn, missing);
    assert!(
        matches!(read_reply(&mut conn), Some(Reply::Refused { reason: RefuseReason::Spawn, message }) if message.contains("-gone")),
    );
}

fn send_request_with(conn: &mut UnixStream, req: ExecRequest) {
    let null = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    send_request_on(conn, &req, [&null(), &null(), &null()]);
}

/// Sends `req` on `conn` with these three descriptors.
fn send_request_on(conn: &mut UnixStream, req: &ExecRequest, fds: [&OwnedFd; 3]) {
    let frame = req.encode();
    let fds = fds.map(|f| f.as_fd());
    let n = send_with_fds(conn.as_fd(), &frame, &fds).unwrap();
    conn.write_all(&frame[n..]).unwrap();
}
