//! The caller's descriptors of a command an agent starts (`ExecWithFds` on a container):
//! never handed to the command. A descriptor given into a container is the container's for as
//! long as any process there keeps it, and a process can always outlive its command (leave its
//! cgroup as the container's root may): a redirected file rewritten after the call, a terminal
//! read after it, a directory walked out of. So the command gets pipes the service made, and
//! the service relays between them and the caller's descriptors, as `docker exec` does, until
//! the command has ended; then the caller's descriptors are closed by the service alone.
//!
//! The caller's descriptors are whatever the caller had (files, terminals, pipes, sockets,
//! directories): their open files' flags are the caller's too, so they are used as they are,
//! blocking, each by a thread of its own. Such a thread is told to stop by a flag and woken
//! from a blocked read or write by a signal (`SIGURG`, whose handler does nothing and does
//! not restart the call): nothing waits on a caller's descriptor past the command's end and
//! its drain.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::output::{DRAIN, DRAIN_BYTES};

/// The signal that wakes a relay thread blocked on a caller's descriptor.
const WAKE: libc::c_int = libc::SIGURG;

extern "C" fn on_wake(_: libc::c_int) {}

/// Installs the handler of `WAKE` once: it does nothing, and a call it interrupts returns
/// `EINTR` (no `SA_RESTART`). A command's exec resets it, as every handled signal.
fn install_wake() -> io::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    (*INSTALLED.get_or_init(|| {
        // SAFETY: a handler that touches nothing; the struct is fully set before use.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_wake as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(WAKE, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    }))
    .map_err(io::Error::from_raw_os_error)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// What a relay thread is told.
const RUN: u8 = 0;
/// The command has ended: what is in the pipe and comes within the drain is still relayed.
const DRAINING: u8 = 1;
/// Stop now, whatever is left.
const STOP: u8 = 2;

/// One relay thread: its state, and its end. Dropped before it was ended (an error on the way
/// to the command's start), it is stopped all the same.
struct Worker {
    /// Held until the thread is joined, or left to itself (`GIVE_UP`).
    thread: Option<std::thread::JoinHandle<()>>,
    state: Arc<AtomicU8>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// How long a stopped relay thread is woken before it is left to itself: a call no signal
/// interrupts (a lent file on a hung network file system) then holds that thread alone, not the
/// command's answer.
const GIVE_UP: Duration = Duration::from_secs(5);

impl Worker {
    fn spawn(name: &str, work: impl FnOnce(&AtomicU8) + Send + 'static) -> io::Result<Self> {
        let state = Arc::new(AtomicU8::new(RUN));
        let (tx, done) = tokio::sync::oneshot::channel();
        let told = state.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .stack_size(64 * 1024)
            .spawn(move || {
                work(&told);
                let _ = tx.send(());
            })?;
        Ok(Self {
            thread: Some(thread),
            state,
            done: Some(done),
        })
    }

    /// Tells the thread `state` and waits for its end, up to `within`; then stops it: woken
    /// from whatever call it is blocked in until it has ended (or `GIVE_UP` has passed).
    async fn end(mut self, state: u8, within: Duration) {
        if let (Some(thread), Some(done)) = (self.thread.take(), self.done.take()) {
            stop(thread, self.state.clone(), done, state, within).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let (Some(thread), Some(done)) = (self.thread.take(), self.done.take()) else {
            return;
        };
        let state = self.state.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(stop(thread, state, done, STOP, Duration::ZERO))),
            Err(_) => {
                state.store(STOP, Ordering::SeqCst);
                wake(&thread);
            }
        }
    }
}

async fn stop(
    thread: std::thread::JoinHandle<()>,
    state: Arc<AtomicU8>,
    mut done: tokio::sync::oneshot::Receiver<()>,
    told: u8,
    within: Duration,
) {
    state.store(told, Ordering::SeqCst);
    if told == STOP {
        wake(&thread);
    }
    if tokio::time::timeout(within, &mut done).await.is_err() {
        state.store(STOP, Ordering::SeqCst);
        // A signal sent just before the thread enters a blocking call is lost: sent again
        // until the thread has ended.
        let since = tokio::time::Instant::now();
        loop {
            wake(&thread);
            if tokio::time::timeout(Duration::from_millis(10), &mut done)
                .await
                .is_ok()
            {
                break;
            }
            if since.elapsed() > GIVE_UP {
                tracing::warn!(
                    "A relay of a caller's descriptor is stuck in a call no signal interrupts; left to itself"
                );
                // Not joined: it is detached, and never signalled again.
                return;
            }
        }
    }
    // It has ended (its last act): joining does not block.
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
}

fn wake(thread: &std::thread::JoinHandle<()>) {
    // SAFETY: the thread is not joined nor detached yet (its handle is borrowed here), so its
    // id is valid.
    unsafe { libc::pthread_kill(thread.as_pthread_t(), WAKE) };
}

/// The relays of one command.
pub(super) struct Relays {
    input: Option<Worker>,
    stdout: Worker,
    /// None when stderr is stdout's pipe.
    stderr: Option<Worker>,
}

/// The command's ends of its three streams, and the relays of the caller's.
pub(super) struct Relayed {
    pub(super) child: [OwnedFd; 3],
    pub(super) relays: Relays,
}

/// Makes pipes for a command in place of the caller's descriptors and starts relaying. An
/// input that is `/dev/null` is the command's too (nothing can be kept of it); an output the
/// caller gave twice (stdout and stderr the same file, `2>&1`) is one pipe, so its order is
/// kept.
pub(super) fn relay(stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd) -> io::Result<Relayed> {
    install_wake()?;
    let (child_in, input) = if is_dev_null(stdin.as_fd()) {
        (stdin, None)
    } else {
        let (r, w) = pipe()?;
        let worker = Worker::spawn("relay-in", move |state| copy_in(&stdin, w, state))?;
        (r, Some(worker))
    };
    let same = same_file(stdout.as_fd(), stderr.as_fd());
    let (out_r, out_w) = pipe()?;
    let (child_err, stderr) = if same {
        drop(stderr);
        (out_w.try_clone()?, None)
    } else {
        let (err_r, err_w) = pipe()?;
        let worker = Worker::spawn("relay-err", move |state| copy_out(err_r, &stderr, state))?;
        (err_w, Some(worker))
    };
    let stdout = Worker::spawn("relay-out", move |state| copy_out(out_r, &stdout, state))?;
    Ok(Relayed {
        child: [child_in, out_w, child_err],
        relays: Relays {
            input,
            stdout,
            stderr,
        },
    })
}

impl Relays {
    /// The command has ended (its processes are gone): its input stops at once; its output is
    /// relayed for at most `DRAIN` and `DRAIN_BYTES` more (only a process that left the
    /// command could still write), then every relay stops. When this returns, the service holds
    /// none of the caller's descriptors, and the command's pipes are closed (whatever still
    /// writes to them gets `EPIPE`).
    pub(super) async fn finish(self) {
        let input = async {
            if let Some(w) = self.input {
                w.end(STOP, Duration::ZERO).await;
            }
        };
        let stderr = async {
            if let Some(w) = self.stderr {
                w.end(DRAINING, DRAIN).await;
            }
        };
        tokio::join!(input, self.stdout.end(DRAINING, DRAIN), stderr);
    }
}

fn is_dev_null(fd: BorrowedFd<'_>) -> bool {
    let Ok(st) = rustix::fs::fstat(fd) else {
        return false;
    };
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice
        && rustix::fs::major(st.st_rdev) == 1
        && rustix::fs::minor(st.st_rdev) == 3
}

fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// Waits until `fd` is ready for `events` (a caller's descriptor may be non-blocking: its
/// flags are the caller's); woken like a blocked read or write.
fn wait_ready(fd: BorrowedFd<'_>, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: polling one descriptor we hold; an interruption returns, as a wake-up should.
    unsafe { libc::poll(&mut p, 1, -1) };
}

/// One `read(2)`; `None` when interrupted (or, on a non-blocking descriptor, once it is ready).
fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: read into a buffer of the length given.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::Interrupted => Ok(None),
        io::ErrorKind::WouldBlock => {
            wait_ready(fd, libc::POLLIN);
            Ok(None)
        }
        _ => Err(e),
    }
}

/// Writes all of `buf`, unless told to stop first; false when it did not.
fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8], state: &AtomicU8) -> bool {
    while !buf.is_empty() {
        if state.load(Ordering::SeqCst) == STOP {
            return false;
        }
        // SAFETY: write from the buffer given. MSG_NOSIGNAL is not needed: the service
        // ignores SIGPIPE.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    wait_ready(fd, libc::POLLOUT);
                    continue;
                }
                _ => return false,
            }
        }
        buf = &buf[n as usize..];
    }
    true
}

/// The caller's input into the command's stdin pipe, until either ends or the relay stops
/// (the pipe's write end closes with it: the command reads end of file). A directory, or
/// anything else that cannot be read, is an empty input.
fn copy_in(caller: &OwnedFd, pipe: OwnedFd, state: &AtomicU8) {
    let mut buf = vec![0u8; 64 * 1024];
    while state.load(Ordering::SeqCst) == RUN {
        match read(caller.as_fd(), &mut buf) {
            Ok(None) => continue,
            Ok(Some(0)) | Err(_) => return,
            Ok(Some(n)) => {
                if !write_all(pipe.as_fd(), &buf[..n], state) {
                    return;
                }
            }
        }
    }
}

/// The command's output pipe into the caller's descriptor, until the pipe's end; once the
/// command has ended, for at most `DRAIN_BYTES` more (and `DRAIN`: `Worker::end`). A caller's
/// descriptor that fails a write (its reader left) ends the relay, and with it the pipe: the
/// command gets `EPIPE`, as it would writing to the caller's descriptor itself.
fn copy_out(pipe: OwnedFd, caller: &OwnedFd, state: &AtomicU8) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut after_end = 0usize;
    loop {
        let told = state.load(Ordering::SeqCst);
        if told == STOP || (told == DRAINING && after_end >= DRAIN_BYTES) {
            return;
        }
        match read(pipe.as_fd(), &mut buf) {
            Ok(None) => continue,
            Ok(Some(0)) | Err(_) => return,
            Ok(Some(n)) => {
                if told == DRAINING {
                    after_end += n;
                }
                if !write_all(caller.as_fd(), &buf[..n], state) {
                    return;
                }
            }
        }
    }
}

/// A caller's content (`WriteFile`, `Upload`) into a pipe the service made, which is what the
/// agent (or the service's own file thread) reads: the caller's descriptor never goes further.
/// A thread of its own copies (`splice` where the descriptor allows it, plain reads and writes
/// otherwise), woken and stopped as a command's relays are.
pub(crate) struct Inflow {
    worker: Worker,
    /// Bytes moved so far (a stall is no progress for a while).
    moved: Arc<std::sync::atomic::AtomicU64>,
    /// It reached the caller's end of file.
    whole: Arc<std::sync::atomic::AtomicBool>,
}

/// Makes the pipe and starts copying the caller's descriptor into it; the pipe's read end is
/// for whoever takes the content.
pub(crate) fn inflow(caller: OwnedFd) -> io::Result<(OwnedFd, Inflow)> {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    install_wake()?;
    let (r, w) = pipe()?;
    super::pipes::grow(&w);
    let moved = Arc::new(AtomicU64::new(0));
    let whole = Arc::new(AtomicBool::new(false));
    let (m, wh) = (moved.clone(), whole.clone());
    let worker = Worker::spawn("relay-file", move |state| {
        if copy_all(&caller, &w, state, &m) {
            wh.store(true, Ordering::SeqCst);
        }
    })?;
    Ok((
        r,
        Inflow {
            worker,
            moved,
            whole,
        },
    ))
}

impl Inflow {
    /// Waits for the content's end: true when it came whole (the caller's end of file), false
    /// when reading or writing failed, nothing moved for `stall`, or `cancel` fired (then the
    /// copy is stopped). When this returns, the service holds neither the caller's descriptor
    /// nor the pipe's write end: whoever reads it sees its end.
    pub(crate) async fn finish(
        mut self,
        cancel: &tokio_util::sync::CancellationToken,
        stall: Duration,
    ) -> bool {
        let Some(mut done) = self.worker.done.take() else {
            return false;
        };
        let mut seen = 0;
        let mut since = tokio::time::Instant::now();
        let ended = loop {
            tokio::select! {
                _ = &mut done => break true,
                () = cancel.cancelled() => break false,
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    let now = self.moved.load(Ordering::SeqCst);
                    if now != seen {
                        (seen, since) = (now, tokio::time::Instant::now());
                    } else if since.elapsed() >= stall {
                        break false;
                    }
                }
            }
        };
        if let Some(thread) = self.worker.thread.take() {
            if ended {
                // It has ended (its last act): joining does not block.
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            } else {
                let state = self.worker.state.clone();
                stop(thread, state, done, STOP, Duration::ZERO).await;
            }
        }
        ended && self.whole.load(Ordering::SeqCst)
    }
}

/// Copies the caller's descriptor into the pipe until its end of file (true), a failure, or
/// `STOP` (false).
fn copy_all(
    caller: &OwnedFd,
    pipe: &OwnedFd,
    state: &AtomicU8,
    moved: &std::sync::atomic::AtomicU64,
) -> bool {
    // splice first: no copy through the service where the caller's descriptor allows it.
    loop {
        if state.load(Ordering::SeqCst) != RUN {
            return false;
        }
        // SAFETY: splice between two descriptors we hold, at their own positions.
        let n = unsafe {
            libc::splice(
                caller.as_raw_fd(),
                std::ptr::null_mut(),
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                1 << 20,
                libc::SPLICE_F_MOVE,
            )
        };
        if n > 0 {
            moved.fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        if n == 0 {
            return true;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            // A non-blocking caller's descriptor makes the splice non-blocking at both ends:
            // wait for room in the pipe, then for the caller's data (never a busy loop).
            Some(libc::EAGAIN) => {
                wait_ready(pipe.as_fd(), libc::POLLOUT);
                wait_ready(caller.as_fd(), libc::POLLIN);
            }
            // Not something splice takes (a terminal, say): plain reads and writes.
            Some(libc::EINVAL | libc::ENOSYS) => break,
            _ => return false,
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    while state.load(Ordering::SeqCst) == RUN {
        match read(caller.as_fd(), &mut buf) {
            Ok(None) => continue,
            Ok(Some(0)) => return true,
            Err(_) => return false,
            Ok(Some(n)) => {
                if !write_all(pipe.as_fd(), &buf[..n], state) {
                    return false;
                }
                moved.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    fn file(fd: OwnedFd) -> std::fs::File {
        std::fs::File::from(fd)
    }

    /// Relays for a command whose stdout the caller gives as `stdout` (stdin and stderr are
    /// `/dev/null`).
    fn relay_out(stdout: OwnedFd) -> Relayed {
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let sink = std::fs::OpenOptions::new().write(true).open("/dev/null");
        relay(null, stdout, OwnedFd::from(sink.unwrap())).unwrap()
    }

    #[tokio::test]
    async fn a_callers_content_comes_whole_or_is_said_not_to() {
        let cancel = tokio_util::sync::CancellationToken::new();
        // Whole: to the caller's end of file.
        let (mut caller, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (read, flow) = inflow(theirs.into()).unwrap();
        caller.write_all(b"content").unwrap();
        drop(caller);
        assert!(flow.finish(&cancel, Duration::from_secs(5)).await);
        let mut got = Vec::new();
        std::fs::File::from(read).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"content");
        // Not whole: the caller stalls, or the call is cancelled.
        let (_caller, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_read, flow) = inflow(theirs.into()).unwrap();
        assert!(!flow.finish(&cancel, Duration::from_secs(2)).await);
        let (_caller, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_read, flow) = inflow(theirs.into()).unwrap();
        cancel.cancel();
        assert!(!flow.finish(&cancel, Duration::from_secs(60)).await);
    }

    #[tokio::test]
    async fn output_is_relayed_and_the_callers_descriptors_are_let_go_at_the_end() {
        let (caller_out_r, caller_out_w) = pipe().unwrap();
        let (caller_err_r, caller_err_w) = pipe().unwrap();
        let (caller_in_r, caller_in_w) = pipe().unwrap();
        let r = relay(caller_in_r, caller_out_w, caller_err_w).unwrap();
        let [child_in, child_out, child_err] = r.child;
        file(caller_in_w).write_all(b"typed").unwrap();
        let mut got = [0u8; 5];
        file(child_in.try_clone().unwrap())
            .read_exact(&mut got)
            .unwrap();
        assert_eq!(&got, b"typed");
        file(child_out).write_all(b"out").unwrap();
        file(child_err).write_all(b"err").unwrap();
        r.relays.finish().await;
        // The callers' descriptors are closed: their readers see the end.
        let mut out = String::new();
        file(caller_out_r).read_to_string(&mut out).unwrap();
        let mut err = String::new();
        file(caller_err_r).read_to_string(&mut err).unwrap();
        assert_eq!((out.as_str(), err.as_str()), ("out", "err"));
        drop(child_in);
    }

    #[tokio::test]
    async fn an_output_still_held_after_the_end_is_cut_at_the_drain() {
        let (caller_out_r, caller_out_w) = pipe().unwrap();
        let r = relay_out(caller_out_w);
        let [_child_in, child_out, _child_err] = r.child;
        // Something that outlived the command keeps writing.
        let writer = std::thread::spawn(move || {
            let mut f = file(child_out);
            let started = Instant::now();
            while f.write_all(b"late ").is_ok() {
                std::thread::sleep(Duration::from_millis(10));
                if started.elapsed() > Duration::from_secs(30) {
                    return false;
                }
            }
            true
        });
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            file(caller_out_r).read_to_end(&mut all).unwrap();
            all.len()
        });
        let started = Instant::now();
        r.relays.finish().await;
        let took = started.elapsed();
        assert!(took < DRAIN + Duration::from_secs(5), "{took:?}");
        // The writer got EPIPE (its pipe's reader, the service, let go), the caller the end.
        assert!(writer.join().unwrap(), "the late writer was cut off");
        assert!(reader.join().unwrap() > 0);
    }

    #[tokio::test]
    async fn a_relay_blocked_on_a_caller_that_never_reads_is_stopped() {
        // The caller's output is a pipe nobody reads: the relay blocks writing to it.
        let (_caller_out_r, caller_out_w) = pipe().unwrap();
        let r = relay_out(caller_out_w);
        let [_child_in, child_out, _child_err] = r.child;
        let mut f = file(child_out);
        // More than both pipes hold.
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..8 {
                if f.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        r.relays.finish().await;
        assert!(started.elapsed() < DRAIN + Duration::from_secs(5));
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn stdout_and_stderr_of_one_file_are_one_pipe() {
        let (caller_r, caller_w) = pipe().unwrap();
        let both = caller_w.try_clone().unwrap();
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let r = relay(null, caller_w, both).unwrap();
        let [child_in, out, err] = r.child;
        assert!(
            is_dev_null(child_in.as_fd()),
            "/dev/null is the command's own"
        );
        assert!(same_file(out.as_fd(), err.as_fd()));
        file(out).write_all(b"1").unwrap();
        file(err).write_all(b"2").unwrap();
        r.relays.finish().await;
        let mut s = String::new();
        file(caller_r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "12");
    }

    #[tokio::test]
    async fn a_non_blocking_callers_descriptor_is_waited_on_not_given_up() {
        // The caller's output is a non-blocking pipe (its flags are the caller's): what does
        // not fit at once is written when the caller has read.
        let (caller_r, caller_w) = pipe().unwrap();
        rustix::io::ioctl_fionbio(&caller_w, true).unwrap();
        let r = relay_out(caller_w);
        let [_child_in, child_out, _child_err] = r.child;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || file(child_out).write_all(&data).unwrap());
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            file(caller_r).read_to_end(&mut all).unwrap();
            all
        });
        writer.join().unwrap();
        r.relays.finish().await;
        assert_eq!(reader.join().unwrap(), expected);
    }

    #[tokio::test]
    async fn a_caller_that_stops_reading_ends_the_commands_output_as_its_own_would() {
        // `... | head -1`: the caller's reader leaves; the command then gets EPIPE.
        let (caller_r, caller_w) = pipe().unwrap();
        let r = relay_out(caller_w);
        let [_child_in, child_out, _child_err] = r.child;
        drop(caller_r);
        let writer = std::thread::spawn(move || {
            let mut f = file(child_out);
            loop {
                if let Err(e) = f.write_all(b"y\n") {
                    return e.kind();
                }
            }
        });
        assert_eq!(writer.join().unwrap(), std::io::ErrorKind::BrokenPipe);
        r.relays.finish().await;
    }
}
