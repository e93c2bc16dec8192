//! The service's side of an agent (`agent-workspaces-agent`: a container's PID 2, or the host
//! agent): a connection per running command, the command's pipes passed along; a connection
//! whose command ended is kept for a next command (`AgentHome`).
//!
//! A container's agent is reached through the descriptor of its socket itself
//! (`containers::leader` finds it inside the container), and the process at the other end of
//! each new connection is checked to be in the container's namespaces and run by its root
//! (`Peer`). The agent is not trusted: its replies are bounded and checked, every wait on it
//! has an end, and it is given nothing its container's root does not have (the command's
//! pipes; its cgroup by name).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agent_workspaces_agent::files::{FileReply, FileRequest, MAX_FILE_REPLY};
use agent_workspaces_agent::{
    ExecRequest, IDLE_CONNECTION_TIMEOUT, KEEP, MAX_REPLY, NEXT, Reply, frame_len, recv_with_fds,
    send_with_fds,
};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;

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
    /// What has come of a reply so far: a read may be cancelled between two halves of one.
    pending: Vec<u8>,
}

/// One container's agent as the service reaches it: its socket, who may answer there, and the
/// connections whose commands ended, kept for the next ones (a command then costs no connect,
/// no accept and no registration with the reactor).
pub struct AgentHome {
    /// An `O_PATH` descriptor of the socket inode (see `containers::leader`).
    socket: OwnedFd,
    /// Who must be at the other end of a new connection.
    peer: Option<Peer>,
    idle: Mutex<Vec<(UnixStream, Instant)>>,
    /// Off for an agent that ends every connection after its command (`ENDS_EVERY_CONNECTION`).
    reuse: AtomicBool,
}

/// The process an agent's socket must belong to: one in the container's PID namespace, run
/// by the container's root. (Any process of the container's root passes: the service gives an
/// agent nothing its container's root could not do already, so that is all it needs to know.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The inode of the container's PID namespace.
    pub pid_ns: u64,
    /// The container's root, as the host sees it.
    pub uid: u32,
}

/// A new connection to the socket at `path`, within `SEND_TIMEOUT`.
async fn connect_to(path: impl AsRef<std::path::Path>) -> io::Result<UnixStream> {
    tokio::time::timeout(SEND_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not accept"))?
}

impl AgentHome {
    /// The agent behind the socket whose `O_PATH` descriptor this is, which `peer` must serve.
    pub fn new(socket: OwnedFd, peer: Option<Peer>) -> Arc<Self> {
        Arc::new(Self {
            socket,
            peer,
            idle: Mutex::default(),
            reuse: AtomicBool::new(true),
        })
    }

    async fn connect(self: &Arc<Self>) -> io::Result<AgentConnection> {
        let stream = connect_to(format!("/proc/self/fd/{}", self.socket.as_raw_fd())).await?;
        if let Some(peer) = &self.peer {
            check_peer(&stream, peer)?;
        }
        Ok(AgentConnection::on(stream, None, Some(self.clone())))
    }

    /// A kept connection that the agent still serves, the most recently used one.
    fn take_idle(self: &Arc<Self>) -> Option<AgentConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|(_, since)| since.elapsed() < IDLE_CONNECTION_LIFE);
        while let Some((stream, since)) = idle.pop() {
            if still_open(&stream) {
                return Some(AgentConnection::on(stream, Some(since), Some(self.clone())));
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

/// The process at the other end of a new connection is the agent's kind: in the container's
/// PID namespace, run by its root. Found through `SO_PEERPIDFD` where the kernel has it (so a
/// PID reused meanwhile is never taken for the agent), else `SO_PEERCRED`.
fn check_peer(stream: &UnixStream, peer: &Peer) -> io::Result<()> {
    let refused = |why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the process at the agent's socket is not the container's agent: {why}"),
        )
    };
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a local of the size given.
    if unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    if cred.uid != peer.uid {
        return Err(refused(format!(
            "it runs as uid {}, not the container's root ({})",
            cred.uid, peer.uid
        )));
    }
    let pidfd = peer_pidfd(stream);
    let ns = std::fs::metadata(format!("/proc/{}/ns/pid", cred.pid)).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    });
    // Read from /proc by its PID: still the same process if its pidfd says it lives.
    let same = pidfd.as_ref().is_none_or(|fd| pidfd_alive(fd.as_fd()));
    match ns {
        Ok(ns) if same && ns == peer.pid_ns => Ok(()),
        Ok(_) if same => Err(refused(format!(
            "process {} is in another PID namespace",
            cred.pid
        ))),
        _ => Err(refused(format!("process {} is gone", cred.pid))),
    }
}

/// The connected peer's pidfd (Linux 6.5 and later).
fn peer_pidfd(stream: &UnixStream) -> Option<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a local of the size given; a descriptor it returns is ours.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
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

impl AgentConnection {
    /// A connection to the agent at `home`: one kept from an earlier command, or a new one.
    pub async fn connect(home: &Arc<AgentHome>) -> io::Result<Self> {
        if home.reuse.load(Ordering::Relaxed)
            && let Some(conn) = home.take_idle()
        {
            return Ok(conn);
        }
        home.connect().await
    }

    /// A connection on `stream`, which takes no descriptor from the agent.
    fn on(stream: UnixStream, reused: Option<Instant>, home: Option<Arc<AgentHome>>) -> Self {
        refuse_rights(&stream);
        Self {
            stream,
            reused,
            home,
            pending: Vec::new(),
        }
    }

    /// Connects to an agent's socket on the host (the host agent's, `host_agent.rs`).
    pub async fn connect_path(path: &std::path::Path) -> io::Result<Self> {
        Ok(Self::on(connect_to(path).await?, None, None))
    }

    /// A connection kept across a restart of the service (`keep.rs`), taken up again.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        Ok(Self::on(UnixStream::from_std(std)?, None, None))
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

    /// Sends a control message while the command runs (`RESIZE`): within a second, or not at
    /// all (an agent that does not read its connection only delays its own terminal's size).
    pub async fn control(&mut self, message: &[u8]) -> io::Result<()> {
        tokio::time::timeout(Duration::from_secs(1), self.stream.write_all(message))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent does not read"))?
    }

    /// The connection's socket, to keep across a restart.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Sends the request with the command's three streams and reads the agent's first answer
    /// (`None`: it closed the connection), waiting for it at most `answer_within`. A kept connection that the agent
    /// ended meanwhile (it ended without an answer: the agent never reads a request it does
    /// not answer) is replaced by a new one, once.
    pub async fn start(
        &mut self,
        req: &ExecRequest,
        fds: &[BorrowedFd<'_>],
        answer_within: Duration,
    ) -> io::Result<Option<Reply>> {
        // The agent ends a connection that ran a command on a terminal it made.
        let serves_another = !matches!(req.terminal, agent_workspaces_agent::Terminal::Make { .. });
        let result = self.start_request(req, fds, answer_within).await;
        if !serves_another {
            self.home = None;
        }
        result
    }

    async fn start_request(
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
        if self.replace_if_ended(&first).await? {
            return self.request(&framed, fds, answer_within).await;
        }
        first
    }

    /// A kept connection that the agent ended meanwhile (it ended without an answer: the
    /// agent never reads a request it does not answer) is replaced by a new one, once: true
    /// when it was, and the request is to be sent again.
    async fn replace_if_ended<T>(&mut self, first: &io::Result<Option<T>>) -> io::Result<bool> {
        let ended = match first {
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
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Sends a file request with its descriptor (a content pipe's end), and reads the agent's
    /// answer within `answer_within` (`None`: it closed the connection). A kept connection the
    /// agent ended meanwhile is replaced, as for a command.
    pub async fn file_request(
        &mut self,
        req: &FileRequest,
        fd: Option<BorrowedFd<'_>>,
        answer_within: Duration,
    ) -> io::Result<Option<FileReply>> {
        let mut framed = vec![NEXT];
        framed.extend(req.encode());
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let first = self.file_exchange(&framed, &fds, answer_within).await;
        if self.replace_if_ended(&first).await? {
            return self.file_exchange(&framed, &fds, answer_within).await;
        }
        first
    }

    async fn file_exchange(
        &mut self,
        framed: &[u8],
        fds: &[BorrowedFd<'_>],
        answer_within: Duration,
    ) -> io::Result<Option<FileReply>> {
        let from = usize::from(self.reused.is_none());
        self.send(&framed[from..], fds).await?;
        self.file_reply(answer_within).await
    }

    /// The agent's next answer to a file request, within `within`; `None` when it closed the
    /// connection.
    pub async fn file_reply(&mut self, within: Duration) -> io::Result<Option<FileReply>> {
        let reply = self.next_frame(MAX_FILE_REPLY, FileReply::decode);
        tokio::time::timeout(within, reply)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
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

    /// The agent's next reply; `None` when it closed the connection. Cancel-safe: what came
    /// of a reply stays for the next call.
    /// No reply brings a descriptor: any that come are closed (`discard`). No byte past the
    /// reply is read: what follows stays in the socket (a kept connection is stored with it
    /// across a restart).
    pub async fn reply(&mut self) -> io::Result<Option<Reply>> {
        self.next_frame(MAX_REPLY, Reply::decode).await
    }

    /// The next frame (its length within `max`), decoded in place by `decode`; `None` when the
    /// agent closed the connection first. Read in pieces of 64 KiB at most: nothing is
    /// allocated for bytes that have not come.
    async fn next_frame<T>(
        &mut self,
        max: usize,
        decode: fn(&[u8]) -> Result<T, agent_workspaces_agent::DecodeError>,
    ) -> io::Result<Option<T>> {
        loop {
            let want = if self.pending.len() < 4 {
                4
            } else {
                let header = [
                    self.pending[0],
                    self.pending[1],
                    self.pending[2],
                    self.pending[3],
                ];
                4 + frame_len(header, max)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            };
            if self.pending.len() >= 4 && self.pending.len() == want {
                let decoded = decode(&self.pending[4..]);
                self.pending.clear();
                return decoded
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            self.stream.readable().await?;
            let mut buf = vec![0u8; (want - self.pending.len()).min(64 * 1024)];
            let mut came = Vec::new();
            let read = self.stream.try_io(Interest::READABLE, || {
                recv_with_fds(self.stream.as_fd(), &mut buf, &mut came)
            });
            discard(came);
            match read {
                Ok(0) if self.pending.is_empty() => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// `SO_PASSRIGHTS` (Linux 6.16): whether a socket takes descriptors passed to it. Off, the
/// agent's `sendmsg` with any fails: an agent cannot make the service close descriptors of its
/// choosing (a socket whose close lingers, say) on its event loop's threads.
const SO_PASSRIGHTS: libc::c_int = 83;

fn refuse_rights(stream: &UnixStream) {
    let value: libc::c_int = 0;
    // SAFETY: setsockopt from a local of the size given. An older kernel refuses the option;
    // then descriptors still come, and `discard` closes them off the event loop.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Closes descriptors an agent sent unasked, off the event loop: closing the last copy of a
/// socket whose `SO_LINGER` is set waits for its peer, so each is reset to close at once.
fn discard(fds: Vec<OwnedFd>) {
    if fds.is_empty() {
        return;
    }
    tracing::warn!(
        "The agent sent {} descriptors with a reply; closed",
        fds.len()
    );
    let close = move || {
        for fd in fds {
            let abort = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt from a local of the size given; fails harmlessly on what is
            // not a socket.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const abort).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            drop(fd);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(close)),
        Err(_) => close(),
    }
}

#[cfg(test)]
mod tests;
