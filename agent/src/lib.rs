//! The wire protocol between agent-workspaces and the agent inside each container, shared by
//! both sides.
//!
//! The service connects to the agent's Unix socket (`/run/agent-workspaces/agent.sock` inside
//! the container) and sends one request frame with the command's three standard streams
//! attached (`SCM_RIGHTS`): pipes the service made and relays, never a descriptor a caller lent
//! it, nor one opened with the service's credentials. The request names the cgroup the command
//! joins as the agent sees it (`/exec-7` below the container's own cgroup root): the agent
//! opens it itself, so what it can do with it is what the container's root can do anyway. The
//! agent answers `Started`, then `Exited` when the command's shell exits, or `Refused` when it
//! could not start it.
//!
//! A command on a terminal made inside (`Terminal::Make`) gets a pseudo-terminal of the
//! container's own devpts from the agent, which relays it to and from the pipes; between
//! `Started` and `Exited` the service may send `RESIZE` messages for it.
//!
//! After `Exited` the connection serves one command after another: the agent reads one byte.
//! `NEXT` is followed by the next request frame (with its descriptors); `KEEP` (sent by the
//! service after `Started`) asks it to hold the connection open until the service closes it;
//! an end of the connection, or anything else, ends it. A connection that was refused, that
//! ran a command on a terminal, ends after its answer. (A port's connection is not the
//! agent's to make: the service connects from a thread in the container's network namespace,
//! so no socket it lends to a caller passes through, or stays in, the container.)
//!
//! A frame is a little-endian `u32` length of what follows, one byte of kind, then the body.
//! Byte strings are a `u32` length and the bytes. Every decoder here treats its input as
//! hostile: the service reads what an agent it does not trust sends, so sizes are bounded
//! before anything is allocated, and nothing panics on malformed input.

pub mod direct;
pub mod files;
pub mod fileserve;
pub mod spawn;
pub mod workdir;

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The agent's socket inside the container.
pub const SOCKET: &str = "/run/agent-workspaces/agent.sock";
/// Where the agent binary is bind-mounted (read-only) inside every container.
pub const AGENT_PATH: &str = "/run/host/agent-workspaces-agent";
/// 2: the cgroup named, not passed; terminals made inside. An agent of version 1 refuses a
/// request of version 2 ("unsupported protocol version").
pub const PROTOCOL_VERSION: u32 = 2;
/// After `Exited`: the next request follows on this connection.
pub const NEXT: u8 = b'n';
/// After `Started`: keep the connection open after `Exited` until the service closes it (a
/// connection the service keeps across its restart: systemd drops a stored one that hangs up).
pub const KEEP: u8 = b'k';
/// After `Started`, for a command on a terminal made inside: its new size follows, columns
/// and rows as little-endian `u16`s (`resize_message`).
pub const RESIZE: u8 = b'r';
/// How long the agent waits for a request (a connection's first, or the next one after
/// `Exited`) before it ends the connection.
pub const IDLE_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest request (command, working directory and environment together).
pub const MAX_REQUEST: usize = 24 * 1024 * 1024;
/// The largest reply.
pub const MAX_REPLY: usize = 64 * 1024;
/// Descriptors a request carries at most: stdin, stdout, stderr.
pub const MAX_FDS: usize = 3;

const KIND_EXEC: u8 = 1;
/// An exec whose stdin is a terminal it gets as its controlling terminal (in a session of its
/// own). A kind of its own: an agent older than it refuses it instead of running the command
/// without its terminal.
const KIND_EXEC_TERMINAL: u8 = 2;
/// An exec on a terminal the agent makes (`Terminal::Make`), its size after the request.
const KIND_EXEC_MAKE_TERMINAL: u8 = 4;
const KIND_STARTED: u8 = 1;
const KIND_EXITED: u8 = 2;
const KIND_REFUSED: u8 = 3;

/// Run `command` with the container's shell (`/bin/bash -c`, `/bin/sh -c` without bash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: Vec<u8>,
    /// Absolute, inside the container.
    pub cwd: Vec<u8>,
    /// The complete environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// The cgroup the command joins before it execs, as a path from the root of the cgroup v2
    /// hierarchy the agent sees (`/exec-7` in a container); empty: none.
    pub cgroup: Vec<u8>,
    pub terminal: Terminal,
}

/// Whether and how a command runs on a terminal: in a session of its own, with the terminal as
/// its controlling terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    None,
    /// Its stdin is the terminal (the host agent's: made by the service).
    Given,
    /// The agent makes one of this size from its own `/dev/ptmx` (the container's devpts) and
    /// relays it: its input from the stdin pipe, its output to the stdout pipe.
    Make {
        cols: u16,
        rows: u16,
    },
}

/// The `RESIZE` message for a command on a terminal made inside.
pub fn resize_message(cols: u16, rows: u16) -> [u8; 5] {
    let [c0, c1] = cols.to_le_bytes();
    let [r0, r1] = rows.to_le_bytes();
    [RESIZE, c0, c1, r0, r1]
}

/// Any request the agent takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Exec(ExecRequest),
    /// A workspace's files (`files`).
    File(files::FileRequest),
}

impl Request {
    /// Decodes a frame's contents (after its length), whatever its kind.
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        match frame.first() {
            Some(&files::KIND_FILE) => files::FileRequest::decode(frame).map(Request::File),
            _ => ExecRequest::decode(frame).map(Request::Exec),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The working directory is missing or not a directory.
    Cwd,
    /// The shell could not be started.
    Spawn,
    /// The request was malformed or carried the wrong descriptors.
    BadRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The command runs; `pid` as seen inside the container.
    Started { pid: u32 },
    /// The shell exited: its exit status, or 128+N for death by signal N.
    Exited { code: i32 },
    Refused {
        reason: RefuseReason,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed agent message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes"))
        }
    }
}

/// The length a frame header announces, checked against `max`.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, DecodeError> {
    let n = u32::from_le_bytes(header) as usize;
    if n == 0 {
        return Err(DecodeError("empty frame"));
    }
    if n > max {
        return Err(DecodeError("frame too large"));
    }
    Ok(n)
}

impl ExecRequest {
    /// The whole frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        put_bytes(&mut body, &self.command);
        put_bytes(&mut body, &self.cwd);
        body.extend_from_slice(&(self.env.len() as u32).to_le_bytes());
        for (k, v) in &self.env {
            put_bytes(&mut body, k);
            put_bytes(&mut body, v);
        }
        put_bytes(&mut body, &self.cgroup);
        let kind = match self.terminal {
            Terminal::None => KIND_EXEC,
            Terminal::Given => KIND_EXEC_TERMINAL,
            Terminal::Make { cols, rows } => {
                body.extend_from_slice(&cols.to_le_bytes());
                body.extend_from_slice(&rows.to_le_bytes());
                KIND_EXEC_MAKE_TERMINAL
            }
        };
        frame(kind, &body)
    }

    /// Decodes a frame's contents (after its length).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(frame);
        let kind = r.u8()?;
        if ![KIND_EXEC, KIND_EXEC_TERMINAL, KIND_EXEC_MAKE_TERMINAL].contains(&kind) {
            return Err(DecodeError("unknown request kind"));
        }
        if r.u32()? != PROTOCOL_VERSION {
            return Err(DecodeError("unsupported protocol version"));
        }
        let command = r.bytes()?.to_vec();
        let cwd = r.bytes()?.to_vec();
        let n = r.u32()? as usize;
        // Each entry takes at least 8 bytes: no allocation beyond what was received.
        if n > r.0.len() / 8 {
            return Err(DecodeError("environment count exceeds the frame"));
        }
        let mut env = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.bytes()?.to_vec();
            let v = r.bytes()?.to_vec();
            env.push((k, v));
        }
        let cgroup = r.bytes()?.to_vec();
        let terminal = match kind {
            KIND_EXEC_TERMINAL => Terminal::Given,
            KIND_EXEC_MAKE_TERMINAL => Terminal::Make {
                cols: r.u16()?,
                rows: r.u16()?,
            },
            _ => Terminal::None,
        };
        r.end()?;
        Ok(Self {
            command,
            cwd,
            env,
            cgroup,
            terminal,
        })
    }
}

impl Reply {
    /// The whole frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Started { pid } => frame(KIND_STARTED, &pid.to_le_bytes()),
            Reply::Exited { code } => frame(KIND_EXITED, &code.to_le_bytes()),
            Reply::Refused { reason, message } => {
                let mut body = vec![match reason {
                    RefuseReason::Cwd => 1,
                    RefuseReason::Spawn => 2,
                    RefuseReason::BadRequest => 3,
                }];
                let m = message.as_bytes();
                put_bytes(&mut body, &m[..m.len().min(MAX_REPLY / 2)]);
                frame(KIND_REFUSED, &body)
            }
        }
    }

    /// Decodes a frame's contents (after its length).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(frame);
        let reply = match r.u8()? {
            KIND_STARTED => Reply::Started { pid: r.u32()? },
            KIND_EXITED => Reply::Exited {
                code: r.u32()? as i32,
            },
            KIND_REFUSED => {
                let reason = match r.u8()? {
                    1 => RefuseReason::Cwd,
                    2 => RefuseReason::Spawn,
                    3 => RefuseReason::BadRequest,
                    _ => return Err(DecodeError("unknown refusal reason")),
                };
                let message = String::from_utf8_lossy(r.bytes()?).into_owned();
                Reply::Refused { reason, message }
            }
            _ => return Err(DecodeError("unknown reply kind")),
        };
        r.end()?;
        Ok(reply)
    }
}

const CMSG_SPACE: usize = 64; // room for MAX_FDS descriptors, checked in a test

#[repr(C)]
union CmsgBuf {
    _align: libc::cmsghdr,
    buf: [u8; CMSG_SPACE],
}

/// One `sendmsg(2)` of `data` with `fds` attached (`SCM_RIGHTS`); returns the bytes sent. The
/// descriptors travel with the first byte: send the rest with plain writes.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr/cmsg buffer are valid; every pointer set below outlives the call.
    unsafe {
        let mut cmsg_buf: CmsgBuf = zeroed();
        let mut msg: libc::msghdr = zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            let payload = size_of::<RawFd>() * raw.len();
            msg.msg_control = cmsg_buf.buf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Reads one request frame and the descriptors that came with it (some may have come with
/// the byte before it: `fds`).
pub fn read_request(
    conn: &mut std::os::unix::net::UnixStream,
    mut fds: Vec<OwnedFd>,
) -> io::Result<(Request, Vec<OwnedFd>)> {
    use std::io::Read;
    use std::os::fd::AsFd;
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = recv_with_fds(conn.as_fd(), &mut header[got..], &mut fds)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let len = frame_len(header, MAX_REQUEST)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    let req = Request::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((req, fds))
}

/// One `recvmsg(2)` into `buf`; descriptors that came with the bytes are appended to `fds`
/// (close-on-exec). More than `MAX_FDS` descriptors, or a truncated control message, is an
/// error (the descriptors that did arrive are closed).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in send_with_fds; the kernel fills at most msg_controllen bytes.
    unsafe {
        let mut cmsg_buf: CmsgBuf = zeroed();
        let mut msg: libc::msghdr = zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.buf.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_SPACE as _;
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n;
            }
            let e = io::Error::last_os_error();
            // A socket with a receive timeout is not restarted after a signal.
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut received = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    received.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() + received.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors in one message",
            ));
        }
        fds.extend(received);
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn request() -> ExecRequest {
        ExecRequest {
            command: b"echo \"$A\"; exit 3".to_vec(),
            cwd: b"/workspace".to_vec(),
            env: vec![
                (b"A".to_vec(), b"b\0c".to_vec()),
                (b"PATH".to_vec(), b"/bin".to_vec()),
            ],
            cgroup: b"/exec-7".to_vec(),
            terminal: Terminal::None,
        }
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let r = request();
        let f = r.encode();
        let n = frame_len([f[0], f[1], f[2], f[3]], MAX_REQUEST).unwrap();
        assert_eq!(n, f.len() - 4);
        assert_eq!(ExecRequest::decode(&f[4..]).unwrap(), r);
        for terminal in [
            Terminal::Given,
            Terminal::Make {
                cols: 132,
                rows: 43,
            },
        ] {
            let t = ExecRequest {
                terminal,
                ..request()
            };
            assert_eq!(ExecRequest::decode(&t.encode()[4..]).unwrap(), t);
        }
        // A request of the first version is refused (its agent's service sent the cgroup).
        let mut old = r.encode();
        old[5..9].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            ExecRequest::decode(&old[4..]),
            Err(DecodeError("unsupported protocol version"))
        );
        assert_eq!(
            Request::decode(&r.encode()[4..]).unwrap(),
            Request::Exec(r.clone())
        );
        for reply in [
            Reply::Started { pid: 42 },
            Reply::Exited { code: -1 },
            Reply::Exited { code: 137 },
            Reply::Refused {
                reason: RefuseReason::Cwd,
                message: "no such directory".into(),
            },
        ] {
            let f = reply.encode();
            assert_eq!(Reply::decode(&f[4..]).unwrap(), reply);
        }
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic_or_a_huge_allocation() {
        let f = ExecRequest {
            terminal: Terminal::Make { cols: 80, rows: 24 },
            ..request()
        }
        .encode();
        // Every truncation and every single-byte corruption of a valid frame.
        for cut in 0..f.len() - 4 {
            assert!(ExecRequest::decode(&f[4..4 + cut]).is_err(), "cut at {cut}");
        }
        for i in 4..f.len() {
            for b in [0u8, 1, 0x7f, 0xff] {
                let mut g = f.clone();
                g[i] = b;
                let _ = ExecRequest::decode(&g[4..]);
                let _ = Reply::decode(&g[4..]);
            }
        }
        // An environment count far beyond the frame is refused before allocating.
        let mut huge = vec![KIND_EXEC];
        huge.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(ExecRequest::decode(&huge).is_err());
        assert!(frame_len(u32::MAX.to_le_bytes(), MAX_REPLY).is_err());
        assert!(frame_len([0; 4], MAX_REPLY).is_err());
        assert!(Reply::decode(&[KIND_EXITED, 1, 2]).is_err());
        assert!(Reply::decode(&[KIND_EXITED, 1, 2, 3, 4, 5]).is_err());
    }

    #[test]
    fn descriptors_travel_with_the_first_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = UnixStream::pair().unwrap();
        let data = request().encode();
        let n = send_with_fds(a.as_fd(), &data, &[r.as_fd(), w.as_fd()]).unwrap();
        assert_eq!(n, data.len());
        let mut fds = Vec::new();
        let mut header = [0u8; 4];
        assert_eq!(recv_with_fds(b.as_fd(), &mut header, &mut fds).unwrap(), 4);
        assert_eq!(fds.len(), 2);
        let mut rest = vec![0u8; data.len() - 4];
        std::io::Read::read_exact(&mut (&b), &mut rest).unwrap();
        assert_eq!(rest, data[4..]);
        // The received descriptors are live copies: write through one, read from its peer.
        let w2 = UnixStream::from(fds.pop().unwrap());
        std::io::Write::write_all(&mut (&w2), b"x").unwrap();
        let mut got = [0u8; 1];
        std::io::Read::read_exact(&mut (&r), &mut got).unwrap();
        assert_eq!(&got, b"x");
        assert!(send_with_fds(b.as_fd(), b"x", &[r.as_fd(); MAX_FDS + 1]).is_err());
        // Room for MAX_FDS descriptors.
        assert!(
            unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize
                <= CMSG_SPACE
        );
    }
}
