//! A hostile agent, for the system tests of the container boundary (never installed): it
//! serves the service's requests as the real agent does (so the service takes it for its
//! container's agent), and tries to abuse whatever it is given. It stands for an agent the
//! container's root replaced, ptraced or out-bound:
//!
//! - it keeps every descriptor a request brings, and 4 s after the command's end writes
//!   to its stdout and stderr and reads its stdin (what a process that outlived its command
//!   could do with descriptors lent to it);
//! - it tries to move the process whose PID is in `/hostile-target` (an administrator's shell
//!   `nsenter`ed into the container, say) into the command's cgroup, and into its own root;
//! - it attaches a descriptor to its answers (the service takes none it did not ask for);
//! - it logs every attempt and its result to `/hostile.log`, so a test can tell the attack
//!   was made (and failed), not skipped.
//!
//! Usage: hostile_agent [--socket PATH]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use agent_workspaces_agent::{
    MAX_REQUEST, NEXT, RefuseReason, Reply, Request, SOCKET, direct, frame_len, recv_with_fds,
    send_with_fds, spawn,
};

const LOG: &str = "/hostile.log";

fn log(line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut socket = SOCKET.to_owned();
    while let Some(a) = args.next() {
        if a == "--socket" {
            socket = args.next().expect("--socket PATH");
        }
    }
    let path = Path::new(&socket);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).expect("bind the agent's socket");
    log(&format!("listening on {socket}"));
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || serve(conn));
    }
}

fn serve(mut conn: UnixStream) {
    log("a connection");
    let mut fds = Vec::new();
    loop {
        let Some((req, got)) = read_request(&mut conn, std::mem::take(&mut fds)) else {
            return;
        };
        let req = match req {
            Request::Exec(req) => req,
            Request::File(_) => return,
        };
        let Ok::<[OwnedFd; 3], _>([stdin, stdout, stderr]) = got.try_into() else {
            return;
        };
        steal_cgroup(&req.cgroup);
        let cwd = Path::new(OsStr::from_bytes(&req.cwd));
        let Ok(dir) = spawn::WorkDir::open(cwd) else {
            let _ = conn.write_all(
                &Reply::Refused {
                    reason: RefuseReason::Cwd,
                    message: "no such directory".into(),
                }
                .encode(),
            );
            return;
        };
        let child = direct::start(direct::Command {
            shell: "/bin/sh",
            command: &req.command,
            env: &req.env,
            dir: &dir,
            fds: [&stdin, &stdout, &stderr],
            procs: None,
            cgroup: None,
            terminal: false,
            nofile_soft: 1024,
        });
        let Ok(child) = child else { return };
        // Everything lent is kept, for later.
        abuse_later([stdin, stdout, stderr]);
        // Its answer carries a descriptor nobody asked for (one whose close could be made to
        // linger): refused by the service's socket where the kernel can, else closed by it.
        let started = Reply::Started {
            pid: child.pid as u32,
        }
        .encode();
        let (r, _w) = pipe();
        match send_with_fds(conn.as_fd(), &started, &[r.as_fd()]) {
            Ok(n) => {
                log("attached a descriptor to Started: sent");
                if conn.write_all(&started[n..]).is_err() {
                    return;
                }
            }
            Err(e) => {
                log(&format!("attached a descriptor to Started: {e}"));
                if conn.write_all(&started).is_err() {
                    return;
                }
            }
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(child.pid, &mut status, 0) };
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        if conn.write_all(&Reply::Exited { code }.encode()).is_err() {
            return;
        }
        let mut next = [0u8; 1];
        match recv_with_fds(conn.as_fd(), &mut next, &mut fds) {
            Ok(1) if next[0] == NEXT => {}
            _ => return,
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe2 fills the array with two new descriptors, owned at once.
    unsafe {
        assert_eq!(libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC), 0);
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
    }
}

fn read_request(conn: &mut UnixStream, mut fds: Vec<OwnedFd>) -> Option<(Request, Vec<OwnedFd>)> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = recv_with_fds(conn.as_fd(), &mut header[got..], &mut fds).ok()?;
        if n == 0 {
            return None;
        }
        got += n;
    }
    let len = frame_len(header, MAX_REQUEST).ok()?;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some((Request::decode(&body).ok()?, fds))
}

/// Tries to move the target process into the command's cgroup (named in the request) and
/// into the root of this agent's view of the hierarchy.
fn steal_cgroup(cgroup: &[u8]) {
    let Ok(target) = std::fs::read_to_string("/hostile-target") else {
        return;
    };
    let target = target.trim().to_owned();
    let named = String::from_utf8_lossy(cgroup).into_owned();
    for dir in [named.as_str(), "/"] {
        let procs = format!("/sys/fs/cgroup{}/cgroup.procs", dir.trim_end_matches('/'));
        let result = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(target.as_bytes()));
        match result {
            Ok(()) => log(&format!("moved {target} into {procs}")),
            Err(e) => log(&format!("cannot move {target} into {procs}: {e}")),
        }
    }
}

/// After the command's end: writes to what was its stdout and stderr, reads its stdin.
fn abuse_later(fds: [OwnedFd; 3]) {
    std::thread::spawn(move || {
        // Past the drain that follows the command (2 s): after the call has answered.
        std::thread::sleep(Duration::from_millis(4000));
        let [stdin, stdout, stderr] = fds;
        for (name, fd) in [("stdout", &stdout), ("stderr", &stderr)] {
            let line = b"HOSTILE LATE WRITE\n";
            // SAFETY: write from a local buffer to a descriptor we hold.
            let n = unsafe { libc::write(fd.as_raw_fd(), line.as_ptr().cast(), line.len()) };
            if n < 0 {
                log(&format!(
                    "late write to {name}: {}",
                    std::io::Error::last_os_error()
                ));
            } else {
                log(&format!("late write to {name}: wrote {n} bytes"));
            }
        }
        // SAFETY: fcntl and read on a descriptor we hold, into a local buffer.
        unsafe {
            let flags = libc::fcntl(stdin.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(stdin.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            let mut buf = [0u8; 256];
            let n = libc::read(stdin.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                log(&format!(
                    "late read from stdin: {:?}",
                    String::from_utf8_lossy(&buf[..n as usize])
                ));
            } else {
                log(&format!(
                    "late read from stdin: {n} ({})",
                    std::io::Error::last_os_error()
                ));
            }
        }
    });
}
