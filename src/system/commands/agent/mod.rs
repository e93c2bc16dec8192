//! The service's side of the agent inside each container (`agent-workspaces-agent`, the
//! container's PID 2): a connection per running command, the command's descriptors passed
//! along; a connection whose command ended is kept for a next command (`AgentHome`).
//!
//! The agent's socket lives in the container's own `/run`. It is reached through the leader's
//! root (`/proc/<leader>/root`), resolved inside that root like every other path in a
//! container, and connected to through the descriptor of the socket itself, so nothing the
//! container plants can redirect the service to another socket of the host. The agent is
//! not trusted: its replies are bounded and checked, and every wait on it has an end.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use agent_workspaces_agent::{
    ConnectRequest, ExecRequest, IDLE_CONNECTION_TIMEOUT, KEEP, MAX_REPLY, NEXT, RefuseReason,
    Reply, SOCKET, frame_len, recv_with_fds, send_with_fds,
};
use pathrs::RootRef;
use rustix::fs::{self as rfs, FileType, Mode, OFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::system::commands::cgroup::cgroup2_mount;

/// How long connecting and sending a request may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections kept for a next command, per agent, at most.
const MAX_IDLE_CONNECTIONS: usize = 16;
/// How long a kept connection is used again: well within the agent's own limit.
const IDLE_CONNECTION_LIFE: Duration =
    IDLE_CONNECTION_TIMEOUT.saturating_sub(Duration::from_secs(10));
/// A kept connection found ended sooner than this after its command is an agent that ends
/// every connection after its command (one from before the reuse of connections, still running
/// in a container started before an upgrade): none is kept for it again. One ended later (its
/// agent ended, or the connection waited long) is only dropped.
const ENDS_EVERY_CONNECTION: Duration = Duration::from_secs(2);

pub struct AgentConnection {
    stream: UnixStream,
    /// It served a command before, which ended at this instant: the next request is
    /// preceded by `NEXT`.
    reused: Option<Instant>,
    /// Where it goes back to when its command ended (a container's agent).
    home: Option<Arc<AgentHome>>,
}

/// One container's agent as the service reaches it: its socket, and the connections whose
/// commands ended, kept for the next ones (a command then costs no connect, no accept and no
/// registration with the reactor).
struct AgentHome {
    /// An `O_PATH` descriptor of the socket inode (see `Leader::agent_socket`).
    socket: OwnedFd,
    idle: Mutex<Vec<(UnixStream, Instant)>>,
    /// Off for an agent that ends every connection after its command (`ENDS_EVERY_CONNECTION`).
    reuse: AtomicBool,
}

/// A new connection to the socket at `path`, within `SEND_TIMEOUT`.
async fn connect_to(path: impl AsRef<std::path::Path>) -> io::Result<UnixStream> {
    tokio::time::timeout(SEND_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not accept"))?
}

impl AgentHome {
    async fn connect(self: &Arc<Self>) -> io::Result<AgentConnection> {
        Ok(AgentConnection {
            stream: connect_to(format!("/proc/self/fd/{}", self.socket.as_raw_fd())).await?,
            reused: None,
            home: Some(self.clone()),
        })
    }

    /// A kept connection that the agent still serves, the most recently used one.
    fn take_idle(self: &Arc<Self>) -> Option<AgentConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|(_, since)| since.elapsed() < IDLE_CONNECTION_LIFE);
        while let Some((stream, since)) = idle.pop() {
            if still_open(&stream) {
                return Some(AgentConnection {
                    stream,
                    reused: Some(since),
                    home: Some(self.clone()),
                });
            }
            if self.ended_early(since) {
                idle.clear();
            }
        }
        None
    }

    /// A kept connection, idle since `since`, was found ended: whether that turned reuse off.
    fn ended_early(&self, since: Instant) -> bool {
        let early = since.elapsed() < ENDS_EVERY_CONNECTION;
        if early {
            self.reuse.store(false, Ordering::Relaxed);
        }
        early
    }

    /// Keeps a connection whose command ended, unless reuse is off or enough are kept.
    fn keep(&self, stream: UnixStream) {
        if !self.reuse.load(Ordering::Relaxed) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|(_, since)| since.elapsed() < IDLE_CONNECTION_LIFE);
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push((stream, Instant::now()));
        }
    }
}

/// Nothing has come on a kept connection, not even its end (a peek that does not wait).
fn still_open(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: a non-blocking peek into a local buffer.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
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
    /// The agent once its socket was found (`agent_home`).
    agent: OnceLock<Arc<AgentHome>>,
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
            agent: OnceLock::new(),
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
    fn agent_home(&self) -> io::Result<&Arc<AgentHome>> {
        if let Some(home) = self.agent.get() {
            return Ok(home);
        }
        let home = Arc::new(AgentHome {
            socket: self.resolve_agent_socket()?,
            idle: Mutex::default(),
            reuse: AtomicBool::new(true),
        });
        // Another connection may have set it meanwhile: the same socket either way.
        Ok(self.agent.get_or_init(|| home))
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
    /// A connection to the agent of the container whose leader this is: one kept from an
    /// earlier command, or a new one.
    pub async fn connect(leader: &Leader) -> io::Result<Self> {
        let home = leader.agent_home()?;
        if home.reuse.load(Ordering::Relaxed)
            && let Some(conn) = home.take_idle()
        {
            return Ok(conn);
        }
        home.connect().await
    }

    /// Connects to an agent's socket on the host (the host agent's, `host_agent.rs`).
    pub async fn connect_path(path: &std::path::Path) -> io::Result<Self> {
        Ok(Self {
            stream: connect_to(path).await?,
            reused: None,
            home: None,
        })
    }

    /// A connection kept across a restart of the service (`keep.rs`), taken up again.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        Ok(Self {
            stream: UnixStream::from_std(std)?,
            reused: None,
            home: None,
        })
    }

    /// Asks the agent to keep this connection open after the command's exit until the
    /// service closes it (one byte after `Started`; an older agent ignores it). It then serves
    /// no other command.
    pub async fn keep_open(&mut self) -> io::Result<()> {
        self.home = None;
        tokio::time::timeout(SEND_TIMEOUT, self.stream.write_all(&[KEEP]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not read"))?
    }

    /// The connection's socket, to keep across a restart.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Sends the request with the command's descriptors (stdin, stdout, stderr, and the open
    /// `cgroup.procs` of its cgroup) and reads the agent's first answer (`None`: it closed the
    /// connection), waiting for it at most `answer_within`. A kept connection that the agent
    /// ended meanwhile (it ended without an answer: the agent never reads a request it does
    /// not answer) is replaced by a new one, once.
    pub async fn start(
        &mut self,
        req: &ExecRequest,
        fds: &[BorrowedFd<'_>],
        answer_within: Duration,
    ) -> io::Result<Option<Reply>> {
        // The frame after NEXT: a kept connection sends all of it, a new one from the second
        // byte.
        let mut framed = vec![NEXT];
        framed.extend(req.encode());
        let first = self.request(&framed, fds, answer_within).await;
        let ended = match &first {
            Ok(None) => true,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            Ok(Some(_)) => false,
        };
        match (self.reused, self.home.clone()) {
            (Some(since), Some(home)) if ended => {
                if home.ended_early(since) {
                    home.idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                }
                *self = home.connect().await?;
                self.request(&framed, fds, answer_within).await
            }
            _ => first,
        }
    }

    /// Sends one request frame, `NEXT` first on a kept connection (`framed` holds both), and
    /// reads the first answer.
    async fn request(
        &mut self,
        framed: &[u8],
        fds: &[BorrowedFd<'_>],
        answer_within: Duration,
    ) -> io::Result<Option<Reply>> {
        let from = usize::from(self.reused.is_none());
        self.send(&framed[from..], fds).await?;
        tokio::time::timeout(answer_within, self.reply())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
    }

    async fn send(&mut self, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let send = async {
            let mut sent = 0;
            while sent == 0 {
                self.stream.writable().await?;
                match self.stream.try_io(Interest::WRITABLE, || {
                    send_with_fds(self.stream.as_fd(), frame, fds)
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

    /// After its command's `Exited`: kept for the agent's next command, where it has a home
    /// (a container's agent) and was not asked to stay open (`keep_open`).
    pub fn recycle(self) {
        if let Some(home) = self.home {
            home.keep(self.stream);
        }
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
        let mut frame = ConnectRequest { port }.encode();
        if self.reused.is_some() {
            // A kept connection: the request follows NEXT (and the agent ends the connection
            // after its answer).
            frame.insert(0, NEXT);
        }
        self.home = None;
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

#[cfg(test)]
mod tests;
