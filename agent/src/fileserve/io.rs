//! The content pipes of file requests: read and written with a bound on how long nothing moves
//! (`STALL`), so no reader that stops reading, and no writer that stops writing, holds a thread
//! for ever.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

/// How long a content pipe may stay without progress before the transfer is given up.
pub const STALL: Duration = Duration::from_secs(120);

/// Waits until `fd` is ready for `events`, up to `STALL`; an error when it is not, or when
/// its other end is gone (for a write: `EPIPE`).
pub fn wait(fd: BorrowedFd<'_>, events: libc::c_short) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: polling one descriptor we hold.
        let n = unsafe { libc::poll(&mut p, 1, STALL.as_millis() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "nothing moved on the content pipe",
            ));
        }
        if events == libc::POLLOUT && p.revents & libc::POLLERR != 0 {
            return Err(io::Error::from_raw_os_error(libc::EPIPE));
        }
        return Ok(());
    }
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl flags on a descriptor we hold.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn result(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The write end of a content pipe, made non-blocking: each write waits for room at most
/// `STALL`.
pub struct PipeWriter(pub OwnedFd);

impl PipeWriter {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(borrow(&fd))?;
        Ok(Self(fd))
    }
}

fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

/// One write, waiting for room at most `STALL`.
fn write_some(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: write from the buffer given; SIGPIPE is ignored by the agent and the service.
        match result(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(fd, libc::POLLOUT)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

impl io::Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_some(borrow(&self.0), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Write for &PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_some(borrow(&self.0), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The read end of a content pipe, made non-blocking: each read waits for data at most
/// `STALL`.
pub struct PipeReader(pub OwnedFd);

impl PipeReader {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(borrow(&fd))?;
        Ok(Self(fd))
    }
}

impl io::Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: read into the buffer given.
            match result(unsafe {
                libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(borrow(&self.0), libc::POLLIN)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Copies `file` from `offset`, `length` bytes at most, into the pipe (`sendfile`: no copy
/// through this process). Ends early, without an error, when the file ends.
pub fn file_to_pipe(
    file: &std::fs::File,
    out: &PipeWriter,
    mut offset: u64,
    length: u64,
) -> io::Result<u64> {
    let mut left = length;
    let mut sent = 0;
    while left > 0 {
        let chunk = left.min(1 << 20) as usize;
        let mut off = offset as libc::off_t;
        // SAFETY: sendfile between two descriptors we hold, with a local offset.
        match result(unsafe {
            libc::sendfile(out.0.as_raw_fd(), file.as_raw_fd(), &mut off, chunk)
        }) {
            Ok(0) => break,
            Ok(n) => {
                offset += n as u64;
                left -= n as u64;
                sent += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(borrow(&out.0), libc::POLLOUT)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A file system without sendfile: plain reads and writes.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                return copy_plain(file, out, offset, left).map(|n| sent + n);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

fn copy_plain(file: &std::fs::File, out: &PipeWriter, offset: u64, length: u64) -> io::Result<u64> {
    use std::io::{Read, Seek, Write};
    let mut f = file;
    f.seek(io::SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = length;
    let mut out = out;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(length - left)
}

/// Copies the pipe to its end into `file` (`splice`: no copy through this process); the bytes
/// copied.
pub fn pipe_to_file(input: &PipeReader, file: &std::fs::File) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // SAFETY: splice between two descriptors we hold, from the pipe at its own position to
        // the file at its own.
        let n = result(unsafe {
            libc::splice(
                input.0.as_raw_fd(),
                std::ptr::null_mut(),
                file.as_raw_fd(),
                std::ptr::null_mut(),
                1 << 20,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        });
        match n {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(borrow(&input.0), libc::POLLIN)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A file system without splice: plain reads and writes.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                use std::io::{Read, Write};
                let mut buf = vec![0u8; 64 * 1024];
                let mut input = PipeReader(input.0.try_clone()?);
                let mut f = file;
                loop {
                    let n = input.read(&mut buf)?;
                    if n == 0 {
                        return Ok(total);
                    }
                    f.write_all(&buf[..n])?;
                    total += n as u64;
                }
            }
            Err(e) => return Err(e),
        }
    }
}
