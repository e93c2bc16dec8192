//! The pipes of commands: an exec's (its output collected by the service, or the caller's own
//! descriptors passed through) and a background process's (stdin, and one pipe for stdout and
//! stderr both, read into the process's buffer).

use std::io;
use std::os::fd::OwnedFd;

use tokio::net::unix::pipe;

use crate::core::ports::{ExecIo, ProcessStreams};

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// The command's ends of its standard streams, and the service's ends where it collects them.
pub(super) struct Streams {
    pub(super) child: [OwnedFd; 3],
    /// The service's end of the command's stdin, and what to write there (`None`: given no
    /// input, it reads `/dev/null`).
    pub(super) stdin: Option<(OwnedFd, Vec<u8>)>,
    /// The service's ends of the command's stdout and stderr, not yet registered with the
    /// runtime (see `exec::collect`).
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
        ExecIo::Pass {
            stdin,
            stdout,
            stderr,
        } => Ok(Streams {
            child: [stdin, stdout, stderr],
            stdin: None,
            stdout: None,
            stderr: None,
        }),
    }
}

/// A background process's streams: its stdin, and one pipe for its stdout and stderr.
pub(super) fn process_streams() -> io::Result<ProcessStreams> {
    let (stdin, input) = pipe_pair()?;
    let (output, stdout) = pipe_pair()?;
    let stderr = stdout.try_clone()?;
    Ok(ProcessStreams {
        command: ExecIo::Pass {
            stdin,
            stdout,
            stderr,
        },
        input: Box::new(pipe::Sender::from_owned_fd(input)?),
        output: Box::new(pipe::Receiver::from_owned_fd(output)?),
    })
}
