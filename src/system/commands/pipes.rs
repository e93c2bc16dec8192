//! The pipes of commands: an exec's (its output collected by the service, or the caller's own
//! descriptors given to a host command: a container's are relayed, `relay.rs`) and a
//! background process's (stdin, and one pipe for stdout and stderr both, read into the
//! process's buffer; or a terminal: the service's own for a host command, one the agent makes
//! inside for a container's).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio::net::unix::pipe;

use crate::core::ports::{
    Attachment, ExecIo, ProcessIo, ProcessStreams, Terminal, TerminalInside, WindowSize,
};

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// A file call's content pipe (`files.rs`): 1 MiB of room (where the system allows it), so a
/// large file moves in large pieces.
pub(crate) fn content_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe_pair()?;
    grow(&w);
    Ok((r, w))
}

/// Gives a pipe 1 MiB of room; a system that refuses keeps the default.
pub(crate) fn grow(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we hold; failure changes nothing.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// The command's ends of its standard streams, and the service's ends where it collects them.
pub(super) struct Streams {
    pub(super) child: [OwnedFd; 3],
    /// The service's end of the command's stdin, and what to write there (`None`: given no
    /// input, it reads `/dev/null`).
    pub(super) stdin: Option<(OwnedFd, Vec<u8>)>,
    /// The service's ends of the command's stdout and stderr, not yet registered with the
    /// runtime (see `output.rs`).
    pub(super) stdout: Option<OwnedFd>,
    pub(super) stderr: Option<OwnedFd>,
}

/// `/dev/null`, open for reading: the stdin of a command given no input (it reads end of file
/// at once, as from a closed empty pipe), one descriptor shared by all.
static DEV_NULL: std::sync::LazyLock<io::Result<OwnedFd>> =
    std::sync::LazyLock::new(|| Ok(std::fs::File::open("/dev/null")?.into()));

pub(super) fn streams(io: ExecIo) -> io::Result<Streams> {
    match io {
        ExecIo::Collect { stdin } => {
            let (in_r, stdin) = if stdin.is_empty() {
                let null = DEV_NULL
                    .as_ref()
                    .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
                (null.try_clone()?, None)
            } else {
                let (in_r, in_w) = pipe_pair()?;
                (in_r, Some((in_w, stdin)))
            };
            let (out_r, out_w) = pipe_pair()?;
            let (err_r, err_w) = pipe_pair()?;
            Ok(Streams {
                child: [in_r, out_w, err_w],
                stdin,
                stdout: Some(out_r),
                stderr: Some(err_r),
            })
        }
        ExecIo::Lend {
            stdin,
            stdout,
            stderr,
        }
        | ExecIo::Process(ProcessIo {
            stdin,
            stdout,
            stderr,
            ..
        }) => Ok(Streams {
            child: [stdin, stdout, stderr],
            stdin: None,
            stdout: None,
            stderr: None,
        }),
    }
}

/// A background process's streams: its stdin, and one pipe for its stdout and stderr; or, with
/// a window size, a pseudo-terminal of that size: the service's own as all three for a host
/// command, or (`container`) one the container's agent makes inside and relays to and from
/// the pipes, resized through the request's channel.
/// `keep` is given the service's ends of its output and input, and the command's end of its
/// output, before they are handed out (to keep them across a restart: `keep.rs`).
pub(super) fn process_streams(
    terminal: Option<WindowSize>,
    container: bool,
    keep: impl FnOnce(BorrowedFd<'_>, Option<BorrowedFd<'_>>, BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<ProcessStreams> {
    if let (Some(size), false) = (terminal, container) {
        return pty(size, keep);
    }
    let (stdin, input) = pipe_pair()?;
    let (output, stdout) = pipe_pair()?;
    let stderr = stdout.try_clone()?;
    keep(output.as_fd(), Some(input.as_fd()), stdout.as_fd())?;
    let (terminal_inside, controls) = match terminal {
        Some(size) => {
            let (controls, resizes) = resizer();
            (Some(TerminalInside { size, resizes }), Some(controls))
        }
        None => (None, None),
    };
    Ok(ProcessStreams {
        command: ExecIo::Process(ProcessIo {
            stdin,
            stdout,
            stderr,
            terminal_inside,
        }),
        input: Box::new(pipe::Sender::from_owned_fd(input)?),
        output: Box::new(pipe::Receiver::from_owned_fd(output)?),
        terminal: controls,
    })
}

/// The controls of a terminal the container's agent made, and where its resizes go (to the
/// command's connection to the agent: `exec.rs`).
pub(super) fn resizer() -> (
    Box<dyn Terminal>,
    tokio::sync::mpsc::UnboundedReceiver<WindowSize>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (Box::new(Resizer(tx)), rx)
}

/// A terminal made inside a container, as the service controls it.
struct Resizer(tokio::sync::mpsc::UnboundedSender<WindowSize>);

impl Terminal for Resizer {
    fn resize(&self, size: WindowSize) -> io::Result<()> {
        self.0
            .send(size)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the process has ended"))
    }
}

/// A pseudo-terminal from the service's own `/dev/ptmx` (as nspawn makes a container's
/// console): the command gets the terminal, opened from the master (`TIOCGPTPEER`, no path
/// looked up), as stdin, stdout and stderr; the service reads and writes the master. When the
/// last holder of the terminal closes it, reading the master fails (`EIO`): the output's end.
fn pty(
    size: WindowSize,
    keep: impl FnOnce(BorrowedFd<'_>, Option<BorrowedFd<'_>>, BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<ProcessStreams> {
    use rustix::pty::OpenptFlags;
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let terminal = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    let master = Pty(master);
    master.resize(size)?;
    // Non-blocking for the runtime: the flag is the open file's, shared by every copy.
    rustix::io::ioctl_fionbio(&master.0, true)?;
    keep(master.0.as_fd(), None, terminal.as_fd())?;
    let (input, output, terminal_controls) = pty_ends(master)?;
    Ok(ProcessStreams {
        command: ExecIo::Process(ProcessIo {
            stdin: terminal.try_clone()?,
            stdout: terminal.try_clone()?,
            stderr: terminal,
            terminal_inside: None,
        }),
        input,
        output,
        terminal: Some(terminal_controls),
    })
}

type PtyEnds = (
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    Box<dyn Terminal>,
);

/// The service's ends of a terminal (non-blocking): what it types, what it reads, its controls.
pub(super) fn pty_ends(master: Pty) -> io::Result<PtyEnds> {
    Ok((
        Box::new(pipe::Sender::from_owned_fd_unchecked(
            master.0.try_clone()?,
        )?),
        Box::new(pipe::Receiver::from_owned_fd_unchecked(
            master.0.try_clone()?,
        )?),
        Box::new(master),
    ))
}

/// The master of a background process's pseudo-terminal.
pub(super) struct Pty(pub(super) OwnedFd);

impl Terminal for Pty {
    fn resize(&self, size: WindowSize) -> io::Result<()> {
        let ws = rustix::termios::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        Ok(rustix::termios::tcsetwinsize(&self.0, ws)?)
    }
}

/// A connected pair of stream sockets: one end for a caller (left blocking, as callers
/// expect a descriptor they are given to be), the other the service's.
pub(super) fn attachment() -> io::Result<Attachment> {
    let (caller, ours) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    let (reader, writer) = tokio::net::UnixStream::from_std(ours)?.into_split();
    Ok(Attachment {
        caller: caller.into(),
        reader: Box::new(reader),
        writer: Box::new(writer),
    })
}
