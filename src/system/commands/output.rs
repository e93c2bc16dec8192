//! A command's output, collected from its pipes: up to a cap per stream, the rest read and
//! dropped. A command that ends within `READ_GRACE` has its output read after, at once; one
//! that runs longer has it read as it comes, so a full pipe never blocks it for long.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

/// How long output may still arrive after the command has ended (its processes, and its
/// cgroup's, are gone): only a process that left the command's cgroup could hold a stream open
/// longer. Then the service's end of the stream is closed (the writer gets `EPIPE`).
pub(crate) const DRAIN: Duration = Duration::from_secs(2);
/// How much output may still be read, per stream, after the command has ended (a command's
/// own output left in a pipe is at most the pipe's size, 1 MiB at most).
pub(crate) const DRAIN_BYTES: usize = 4 * 1024 * 1024;

/// Reads a stream to its end, keeping the first `cap` bytes. Once `ended` fires (the
/// command's processes were killed), the end of file may take at most `DRAIN` and
/// `DRAIN_BYTES` more (`already`: read since the end before): only a process outside the
/// command's cgroup could hold the stream open longer.
async fn read_capped<R: AsyncRead + Unpin>(
    mut r: R,
    cap: usize,
    ended: &CancellationToken,
    already: usize,
) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    // Output past the cap is read into this and dropped; made only if it comes to that.
    let mut scratch = Vec::new();
    let drain = async {
        ended.cancelled().await;
        tokio::time::sleep(DRAIN).await;
    };
    tokio::pin!(drain);
    let mut after_end = already;
    loop {
        let at_end = ended.is_cancelled();
        if at_end && after_end >= DRAIN_BYTES {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        // Read straight into what is kept: nothing to zero or copy, and nothing allocated for
        // a command that prints nothing.
        let read = async {
            if room > 0 {
                kept.reserve(room.min(16 * 1024));
                let spare = (kept.capacity() - kept.len()).min(room);
                (&mut r).take(spare as u64).read_buf(&mut kept).await
            } else {
                scratch.resize(64 * 1024, 0);
                let n = r.read(&mut scratch).await;
                truncated |= matches!(n, Ok(1..));
                n
            }
        };
        let n = tokio::select! {
            biased;
            n = read => n,
            () = &mut drain => break,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) if at_end => after_end += n,
            Ok(_) => {}
        }
    }
    (kept, truncated)
}

/// How long a command's output is left in its pipes before the service starts reading them
/// as it comes: most commands end sooner, and their whole output is then read at once, with
/// no wake-up of the service per stream as the command exits. Output beyond what a pipe holds
/// (64 KiB) waits at most this long.
pub(super) const READ_GRACE: Duration = Duration::from_millis(1);

/// Collects the output of a command that has ended (and whatever it left is killed): what its
/// pipes hold is read at once, both looked at with one `poll` (for most commands, that is all:
/// both at end of file, nothing to read), up to `DRAIN_BYTES` in all: what a writer that
/// keeps ahead of this loop (a process that left the command) sends does not hold the
/// runtime's thread. Only a pipe something outside the command's cgroup still holds is then
/// awaited (for `DRAIN`, and what is left of `DRAIN_BYTES`).
pub(super) async fn collect_after_end(
    streams: [Option<OwnedFd>; 2],
    cap: usize,
    ended: &CancellationToken,
) -> [(Vec<u8>, bool); 2] {
    use std::os::fd::AsRawFd;
    let mut out: [(Vec<u8>, bool); 2] = Default::default();
    let mut open: [Option<OwnedFd>; 2] = streams;
    let mut buf = [0u8; 16 * 1024];
    let mut read_here = 0usize;
    while read_here < DRAIN_BYTES {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.iter().all(|p| p.fd < 0) {
            return out;
        }
        // SAFETY: poll on descriptors we own, without waiting.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let mut progressed = false;
        for (i, p) in fds.iter().enumerate() {
            let Some(fd) = open[i].as_ref() else { continue };
            if n < 0 || p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
                continue;
            }
            progressed = true;
            if p.revents & libc::POLLIN == 0 && p.revents & libc::POLLHUP != 0 {
                // Nothing left in it and nobody to write more: its end, without a read.
                open[i] = None;
                continue;
            }
            // Readable or at end: this read does not block.
            // SAFETY: read into a local buffer from a descriptor we own.
            let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                open[i] = None;
                continue;
            }
            let r = r as usize;
            read_here += r;
            let (kept, truncated) = &mut out[i];
            let room = cap.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..r.min(room)]);
            *truncated |= r > room;
        }
        if !progressed {
            break;
        }
    }
    // Still held open elsewhere: read as it comes, until end of file or DRAIN.
    let [a, b] = open;
    let wait = |fd: Option<OwnedFd>, i: usize, out: &[(Vec<u8>, bool); 2]| {
        let room = cap.saturating_sub(out[i].0.len());
        async move {
            match fd.map(pipe::Receiver::from_owned_fd) {
                Some(Ok(r)) => read_capped(r, room, ended, read_here).await,
                _ => Default::default(),
            }
        }
    };
    let (more_a, more_b) = tokio::join!(wait(a, 0, &out), wait(b, 1, &out));
    for (i, (more, more_truncated)) in [more_a, more_b].into_iter().enumerate() {
        out[i].0.extend(more);
        out[i].1 |= more_truncated;
    }
    out
}

/// Collects a stream as it comes, until end of file (or `DRAIN` after `ended`).
pub(super) async fn collect_running(
    fd: Option<OwnedFd>,
    cap: usize,
    ended: &CancellationToken,
) -> (Vec<u8>, bool) {
    match fd.map(pipe::Receiver::from_owned_fd) {
        Some(Ok(r)) => read_capped(r, cap, ended, 0).await,
        _ => Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pipe_pair() -> (OwnedFd, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (r, std::fs::File::from(w))
    }

    #[tokio::test]
    async fn output_of_an_ended_command_is_read_at_once_and_capped() {
        let (out_r, mut out_w) = pipe_pair();
        let (err_r, mut err_w) = pipe_pair();
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        out_w.write_all(&data).unwrap();
        err_w.write_all(b"oops").unwrap();
        drop((out_w, err_w));
        let ended = CancellationToken::new();
        ended.cancel();
        let [out, err] = collect_after_end([Some(out_r), Some(err_r)], 1 << 20, &ended).await;
        assert_eq!(out, (data.clone(), false));
        assert_eq!(err, (b"oops".to_vec(), false));

        let (out_r, mut out_w) = pipe_pair();
        out_w.write_all(&data).unwrap();
        drop(out_w);
        let [out, err] = collect_after_end([Some(out_r), None], 1000, &ended).await;
        assert_eq!(out, (data[..1000].to_vec(), true));
        assert_eq!(err, (Vec::new(), false));
    }

    #[tokio::test]
    async fn a_pipe_still_held_elsewhere_is_awaited_to_its_end() {
        let (out_r, mut out_w) = pipe_pair();
        let (err_r, err_w) = pipe_pair();
        drop(err_w);
        out_w.write_all(b"first ").unwrap();
        let ended = CancellationToken::new();
        ended.cancel();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            out_w.write_all(b"and last").unwrap();
        });
        let [out, err] = collect_after_end([Some(out_r), Some(err_r)], 1 << 20, &ended).await;
        late.join().unwrap();
        assert_eq!(out, (b"first and last".to_vec(), false));
        assert_eq!(err, (Vec::new(), false));
    }

    #[tokio::test]
    async fn output_of_a_running_command_is_read_as_it_comes_and_capped() {
        let (out_r, mut out_w) = pipe_pair();
        let ended = CancellationToken::new();
        // More than a pipe holds: read while it is written, or the writer would block.
        let writer = std::thread::spawn(move || {
            out_w.write_all(&vec![7u8; 300_000]).unwrap();
        });
        let (out, truncated) = collect_running(Some(out_r), 100_000, &ended).await;
        writer.join().unwrap();
        assert_eq!((out.len(), truncated), (100_000, true));
        assert!(out.iter().all(|&b| b == 7));
    }
}
