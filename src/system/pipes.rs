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
    /// The service's end of the command's stdin, and what to write there.
    pub(super) stdin: Option<(OwnedFd, Vec<u8>)>,
    pub(super) stdout: Option<pipe::Receiver>,
    pub(super) stderr: Option<pipe::Receiver>,
}

pub(super) fn streams(io: ExecIo) -> io::Result<Streams> {
    match io {
        ExecIo::Collect { stdin } => {
            let (in_r, in_w) = pipe_pair()?;
            let (out_r, out_w) = pipe_pair()?;
            let (err_r, err_w) = pipe_pair()?;
            Ok(Streams {
                child: [in_r, out_w, err_w],
                stdin: Some((in_w, stdin)),
                stdout: Some(pipe::Receiver::from_owned_fd(out_r)?),
                stderr: Some(pipe::Receiver::from_owned_fd(err_r)?),
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
