//! The service's side of the agent inside each container (`agent-workspaces-agent`, the
//! container's PID 2): one connection per command, the command's descriptors passed along.
//!
//! The agent's socket lives in the container's own `/run`. It is reached through the leader's
//! root (`/proc/<leader>/root`), resolved inside that root like every other path in a
//! container, and connected to through the descriptor of the socket itself, so nothing the
//! container plants can redirect the service to another socket of the host. The agent is
//! not trusted: its replies are bounded and checked, and every wait on it has an end.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use std::path::PathBuf;

use agent_workspaces_agent::{
    ConnectRequest, ExecRequest, MAX_REPLY, RefuseReason, Reply, SOCKET, frame_len, recv_with_fds,
    send_with_fds,
};
use pathrs::RootRef;
use rustix::fs::{self as rfs, FileType, Mode, OFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::cgroup::cgroup2_mount;

/// How long connecting and sending a request may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentConnection {
    stream: UnixStream,
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}

/// A running container as the service reaches it: its leader (the container's PID 1), held
/// by a pidfd so that a reused PID is never taken for it; the leader's root (the container's
/// file system); and its payload cgroup, below which commands get their cgroups. Opened once
/// per container start and kept: the exec path then makes no bus call.
pub struct Leader {
    pub pid: u32,
    pidfd: OwnedFd,
    root: OwnedFd,
    /// The leader's cgroup v2 directory (nspawn's delegated `payload`).
    pub payload: PathBuf,
    /// The agent's socket once found (`agent_socket`).
    socket: std::sync::OnceLock<OwnedFd>,
}

impl Leader {
    pub fn open(pid: u32) -> io::Result<Self> {
        let pidfd = pidfd_open(pid)?;
        let root = rfs::openat(
            rfs::CWD,
            format!("/proc/{pid}/root"),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| io::Error::other("the container has no cgroup v2 membership"))?;
        let mount =
            cgroup2_mount().ok_or_else(|| io::Error::other("no cgroup v2 hierarchy is mounted"))?;
        let payload = mount.join(rel.trim().trim_start_matches('/'));
        let leader = Self {
            pid,
            pidfd,
            root,
            payload,
            socket: std::sync::OnceLock::new(),
        };
        // What was opened belongs to the leader only if it still lives: its PID was not reused.
        if !leader.alive() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the container's leader is gone",
            ));
        }
        Ok(leader)
    }

    /// The leader still runs (and so its root and cgroup are the container's).
    pub fn alive(&self) -> bool {
        pidfd_alive(self.pidfd.as_fd())
    }

    /// The agent's socket, as an `O_PATH` descriptor of the socket inode itself, resolved
    /// inside the container once it is there and kept: every later connection goes to that
    /// same socket, whatever the container does to its path meanwhile. (The agent binds it
    /// once, at the container's start; a restarted container has a new leader.)
    fn agent_socket(&self) -> io::Result<BorrowedFd<'_>> {
        if let Some(fd) = self.socket.get() {
            return Ok(fd.as_fd());
        }
        let fd = self.resolve_agent_socket()?;
        // Another connection may have set it meanwhile: the same socket either way.
        let _ = self.socket.set(fd);
        Ok(self.socket.get().expect("set above").as_fd())
    }

    fn resolve_agent_socket(&self) -> io::Result<OwnedFd> {
        let handle = RootRef::from_fd(self.root.as_fd())
            .resolve_nofollow(SOCKET)
            .map_err(|e| match e.kind() {
                pathrs::error::ErrorKind::OsError(Some(n)) => io::Error::from_raw_os_error(n),
                _ => io::Error::other(e.to_string()),
            })?;
        let st = rfs::fstat(handle.as_fd())?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{SOCKET} is not a socket"),
            ));
        }
        Ok(handle.into())
    }
}

impl AgentConnection {
    /// Connects to the agent of the container whose leader this is.
    pub async fn connect(leader: &Leader) -> io::Result<Self> {
        let socket = leader.agent_socket()?;
        let path = format!("/proc/self/fd/{}", socket.as_raw_fd());
        let stream = tokio::time::timeout(SEND_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not accept"))??;
        Ok(Self { stream })
    }

    /// Connects to an agent's socket on the host (the host agent's, `host_agent.rs`).
    pub async fn connect_path(path: &std::path::Path) -> io::Result<Self> {
        let stream = tokio::time::timeout(SEND_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not accept"))??;
        Ok(Self { stream })
    }

    /// A connection kept across a restart of the service (`keep.rs`), taken up again.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        Ok(Self {
            stream: UnixStream::from_std(std)?,
        })
    }

    /// Asks the agent to keep this connection open after the command's exit until the
    /// service closes it (one byte after `Started`; an older agent ignores it).
    pub async fn keep_open(&mut self) -> io::Result<()> {
        tokio::time::timeout(SEND_TIMEOUT, self.stream.write_all(b"k"))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not read"))?
    }

    /// The connection's socket, to keep across a restart.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Sends the request with the command's descriptors (stdin, stdout, stderr, and the open
    /// `cgroup.procs` of its cgroup).
    pub async fn send(&mut self, req: &ExecRequest, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let frame = req.encode();
        let send = async {
            let mut sent = 0;
            while sent == 0 {
                self.stream.writable().await?;
                match self.stream.try_io(Interest::WRITABLE, || {
                    send_with_fds(self.stream.as_fd(), &frame, fds)
                }) {
                    Ok(n) => sent = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            self.stream.write_all(&frame[sent..]).await
        };
        tokio::time::timeout(SEND_TIMEOUT, send)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not read"))?
    }

    /// The agent's next reply; `None` when it closed the connection.
    pub async fn reply(&mut self) -> io::Result<Option<Reply>> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let n = frame_len(header, MAX_REPLY)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut body = vec![0u8; n];
        self.stream.read_exact(&mut body).await?;
        Reply::decode(&body)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Asks the agent for a TCP connection to `port` on the container's loopback; the
    /// connected socket it sends back (checked to be a stream socket: the agent is not
    /// trusted).
    pub async fn connect_port(&mut self, port: u16) -> io::Result<OwnedFd> {
        let frame = ConnectRequest { port }.encode();
        tokio::time::timeout(SEND_TIMEOUT, self.stream.write_all(&frame))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not read"))??;
        let mut buf = vec![0u8; MAX_REPLY + 4];
        let mut got = 0;
        let mut fds = Vec::new();
        let receive = async {
            loop {
                if got >= 4 {
                    let n = frame_len([buf[0], buf[1], buf[2], buf[3]], MAX_REPLY)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if got >= 4 + n {
                        return Ok::<usize, io::Error>(n);
                    }
                }
                self.stream.readable().await?;
                match self.stream.try_io(Interest::READABLE, || {
                    recv_with_fds(self.stream.as_fd(), &mut buf[got..], &mut fds)
                }) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        };
        // The agent connects with a timeout of its own (5 s); a little more for the answer.
        let n = tokio::time::timeout(Duration::from_secs(8), receive)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not answer"))??;
        let reply = Reply::decode(&buf[4..4 + n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match reply {
            Reply::Connected => {
                let fd = fds.pop().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "no connection came with the answer",
                    )
                })?;
                if !is_stream_socket(&fd) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the agent answered with something that is not a connection",
                    ));
                }
                Ok(fd)
            }
            Reply::Refused {
                reason: RefuseReason::Connect,
                message,
            } => Err(io::Error::new(io::ErrorKind::ConnectionRefused, message)),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply {other:?}"),
            )),
        }
    }
}

/// A connected stream socket (what a TCP connection is).
fn is_stream_socket(fd: &OwnedFd) -> bool {
    let Ok(st) = rfs::fstat(fd) else {
        return false;
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return false;
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a local of the size given.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut ty).cast(),
            &mut len,
        )
    };
    r == 0 && ty == libc::SOCK_STREAM
}
