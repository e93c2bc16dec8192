//! agent-workspaces-agent: the payload of every container workspace. systemd-nspawn starts it
//! (bind-mounted read-only from the host) as the container's PID 2, so it and every command it
//! starts are inside the container's boundary: its user namespace, capability bounding set,
//! seccomp filter, mount namespace and cgroup. The service connects to its socket and passes
//! each command's descriptors, one command after another on a connection; see the library for
//! the protocol.
//!
//! Usage: agent-workspaces-agent [--socket PATH] [--idle-timeout SECONDS]
//! Prints one line to stderr when it cannot serve. The service knows it is ready when its
//! socket answers (nspawn takes READY=1 only from the container's PID 1, its stub init).

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_workspaces_agent::{
    IDLE_CONNECTION_TIMEOUT, KEEP, NEXT, RefuseReason, Reply, Request, SOCKET, Terminal, direct,
    fileserve, read_request, recv_with_fds, spawn,
};

mod join;
mod terminal;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut socket = std::path::PathBuf::from(SOCKET);
    let mut idle_timeout = IDLE_TIMEOUT;
    while let Some(a) = args.next() {
        let value = args.next();
        match (a.to_str(), value.as_ref().and_then(|v| v.to_str())) {
            (Some("--socket"), Some(p)) => socket = p.into(),
            (Some("--idle-timeout"), Some(s)) if s.parse::<u64>().is_ok_and(|s| s > 0) => {
                idle_timeout = Duration::from_secs(s.parse().expect("checked"));
            }
            _ => {
                eprintln!("usage: agent-workspaces-agent [--socket PATH] [--idle-timeout SECONDS]");
                return ExitCode::from(2);
            }
        }
    }
    match serve(&socket, idle_timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-workspaces-agent: {}: {e}", socket.display());
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft descriptor limit to the hard one (each running command holds a few
/// descriptors here); returns the original soft limit, which commands get back.
fn raise_fd_limit() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let original = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        original
    }
}

fn serve(socket: &Path, idle_timeout: Duration) -> io::Result<()> {
    let child_nofile = raise_fd_limit();
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    // A thread's accept returns after this long without a connection (SO_RCVTIMEO holds for
    // accept on Linux), and the thread may end.
    let timeout = libc::timeval {
        tv_sec: idle_timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt from a local of the size given.
    if unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let pool = std::sync::Arc::new(Pool {
        listener,
        idle: AtomicUsize::new(0),
        child_nofile,
    });
    // This thread serves too, and never ends.
    pool.work(false);
    Ok(())
}

/// How long a serving thread waits for a connection before it ends (one always stays).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The threads that serve connections: each accepts one, serves it to its end (its commands,
/// one after another), and accepts the next. A thread is made only when none is left waiting, so the pool
/// grows to the number of commands that run at once and serves every later command with a
/// thread that exists (making one costs more than the rest of a short command's start); a
/// thread that waited `IDLE_TIMEOUT` for a connection ends, unless it is the last one waiting.
struct Pool {
    listener: UnixListener,
    /// Threads waiting in accept.
    idle: AtomicUsize,
    child_nofile: libc::rlim_t,
}

impl Pool {
    fn work(self: &std::sync::Arc<Self>, may_end: bool) {
        loop {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let conn = self.listener.accept();
            let others_waiting = self.idle.fetch_sub(1, Ordering::SeqCst) - 1;
            match conn {
                Ok((conn, _)) => {
                    if others_waiting == 0 {
                        // The last waiting thread took this one: another waits for the next.
                        let pool = self.clone();
                        let spawned = std::thread::Builder::new()
                            .name("exec".into())
                            .stack_size(256 * 1024)
                            .spawn(move || pool.work(true));
                        if let Err(e) = spawned {
                            eprintln!("agent-workspaces-agent: cannot start a thread: {e}");
                        }
                    }
                    serve_connection(conn, self.child_nofile);
                }
                // Nothing to serve for IDLE_TIMEOUT.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if may_end && others_waiting > 0 {
                        return;
                    }
                }
                // A connection that went away before accept, or a passing shortage.
                Err(e) => {
                    eprintln!("agent-workspaces-agent: accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn refuse(conn: &mut UnixStream, reason: RefuseReason, message: String) {
    // The service may have gone: nothing to do about that here.
    let _ = conn.write_all(&Reply::Refused { reason, message }.encode());
}

/// Serves one connection: one command after another (see the library for the protocol).
fn serve_connection(mut conn: UnixStream, child_nofile: libc::rlim_t) {
    // Only a client that sends nothing could hold this thread; the service sends at once, and
    // lets a connection it holds for the next command go before this passes.
    let _ = conn.set_read_timeout(Some(IDLE_CONNECTION_TIMEOUT));
    let mut fds = Vec::new();
    while serve_one(&mut conn, std::mem::take(&mut fds), child_nofile) {
        let mut next = [0u8; 1];
        // The request's descriptors come with the first byte sent with them: this one.
        match recv_with_fds(conn.as_fd(), &mut next, &mut fds) {
            Ok(1) if next[0] == NEXT => {}
            Ok(1) if next[0] == KEEP => return hold_open(&mut conn),
            _ => return,
        }
    }
}

/// Serves one request; true when it ran a command to its end and the connection may serve
/// another.
fn serve_one(conn: &mut UnixStream, fds: Vec<OwnedFd>, child_nofile: libc::rlim_t) -> bool {
    let (req, fds) = match read_request(conn, fds) {
        Ok(r) => r,
        Err(e) => {
            refuse(conn, RefuseReason::BadRequest, e.to_string());
            return false;
        }
    };
    let req = match req {
        Request::Exec(req) => req,
        // The workspace's files, in this agent's own view of them.
        Request::File(f) => return fileserve::serve(conn, f, fds),
    };
    let Ok::<[OwnedFd; 3], _>([stdin, stdout, stderr]) = fds.try_into() else {
        refuse(
            conn,
            RefuseReason::BadRequest,
            "expected 3 descriptors: stdin, stdout and stderr".into(),
        );
        return false;
    };
    // Inside the container, so whatever links are in the way resolve inside it too.
    let cwd = Path::new(OsStr::from_bytes(&req.cwd));
    let dir = match spawn::WorkDir::open(cwd) {
        Ok(d) => d,
        Err(e) => {
            let message = format!("{} is not a directory in the container: {e}", cwd.display());
            refuse(conn, RefuseReason::Cwd, message);
            return false;
        }
    };
    // The command's cgroup, opened here, through this agent's own view of the hierarchy: the
    // service hands over no descriptor of its own for it.
    let cgroup = match join::open(&req.cgroup) {
        Ok(c) => c,
        Err(e) => {
            let message = format!(
                "cannot open the command's cgroup {}: {e}",
                String::from_utf8_lossy(&req.cgroup)
            );
            refuse(conn, RefuseReason::Spawn, message);
            return false;
        }
    };
    // A terminal made here: the command gets its far end as all three streams; the pipes are
    // relayed to and from it (`terminal::relay`).
    let made = match req.terminal {
        Terminal::Make { cols, rows } => match terminal::open(cols, rows) {
            Ok(t) => Some(t),
            Err(e) => {
                let message = format!("cannot make a terminal in the container: {e}");
                refuse(conn, RefuseReason::Spawn, message);
                return false;
            }
        },
        _ => None,
    };
    let shell = if Path::new("/bin/bash").is_file() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let spawned = {
        let fds = match &made {
            Some(t) => [&t.peer, &t.peer, &t.peer],
            None => [&stdin, &stdout, &stderr],
        };
        direct::start(direct::Command {
            shell,
            command: &req.command,
            env: &req.env,
            dir: &dir,
            fds,
            procs: cgroup.as_ref().map(|c| &c.procs),
            cgroup: cgroup.as_ref().map(|c| &c.dir),
            terminal: req.terminal != Terminal::None,
            nofile_soft: child_nofile,
        })
    };
    drop(cgroup);
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let message = format!("cannot start {shell}: {e}");
            refuse(conn, RefuseReason::Spawn, message);
            return false;
        }
    };
    let started = Reply::Started {
        pid: child.pid as u32,
    };
    if let Some(t) = made {
        // Only the command holds the terminal now: its output ends when the last process
        // that has it closes it.
        let terminal::Made { master, peer } = t;
        drop(peer);
        drop(stderr);
        if conn.write_all(&started.encode()).is_err() {
            // The service is gone before it knew of the command: it ends, and is reaped.
            end(&child);
            return false;
        }
        let keep = terminal::relay(conn, &child, master, stdin, stdout, wait);
        if keep {
            hold_open(conn);
        }
        // A connection that ran a command on a terminal serves no other.
        return false;
    }
    // Close this side's copies of the command's descriptors: its output ends when it does.
    drop((stdin, stdout, stderr));
    if ends_within(&child.pidfd, QUICK_MS) {
        // Most commands end within a millisecond: their start and end go in one write, and
        // the service wakes once for both.
        let code = wait(child.pid);
        let mut both = started.encode();
        both.extend_from_slice(&Reply::Exited { code }.encode());
        conn.write_all(&both).is_ok()
    } else {
        let sent = conn.write_all(&started.encode());
        let code = wait(child.pid);
        // The service may have gone (it cancelled the command): the connection ends.
        sent.is_ok() && conn.write_all(&Reply::Exited { code }.encode()).is_ok()
    }
}

/// Holds a connection open until the service closes it (`KEEP`).
fn hold_open(conn: &mut UnixStream) {
    let _ = conn.set_read_timeout(None);
    let mut byte = [0u8; 1];
    while matches!(conn.read(&mut byte), Ok(1..)) {}
}

/// Kills and reaps a command nobody will learn the end of.
pub(crate) fn end(child: &spawn::Child) {
    // SAFETY: signalling the process the pidfd holds; then reaping our own child.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            child.pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
    wait(child.pid);
}

/// How long the start of a command is held back in case its end comes with it.
const QUICK_MS: i32 = 1;

/// The process the pidfd holds ends within `ms` milliseconds.
fn ends_within(pidfd: &OwnedFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling one descriptor we hold.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// Waits for the child and reaps it: its exit status, or 128+N for death by signal N.
pub(crate) fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: reaping our own child into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return -1;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}
