//! Starts a command without copying the caller: `clone(CLONE_VM | CLONE_VFORK)` on a stack
//! of its own, as `posix_spawn` does, plus what `posix_spawn` cannot do before the exec: join
//! the command's cgroup (one write to its open `cgroup.procs`) and give back the soft
//! descriptor limit. A `fork` (what a `pre_exec` hook forces) copies the page tables of the
//! whole multi-threaded caller and turns every page it touches next into a copy-on-write
//! fault. Used by the service for host commands and by the agent inside each container.
//!
//! The child shares the caller's memory until it execs (the calling thread waits meanwhile):
//! it runs only async-signal-safe calls on data prepared before the clone, with every signal
//! blocked until the caller's handlers are reset to their defaults.

use std::ffi::{CString, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the child needs, prepared before the clone: it may not allocate.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    fds: [RawFd; 3],
    procs: RawFd,
    process_group: bool,
    nofile_soft: libc::rlim_t,
    report: RawFd,
}

/// The kernel's `struct sigaction` (x86-64 and aarch64 layout: handler, flags, restorer, mask).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// The child: runs in the service's memory until `execve`.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points to the ChildArgs the parent keeps alive until the exec (CLONE_VFORK);
    // everything below is an async-signal-safe system call.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |a: &ChildArgs| -> c_int {
            let errno = *libc::__errno_location();
            libc::write(a.report, (&errno as *const c_int).cast(), 4);
            libc::_exit(127)
        };
        // The service's signal handlers must not run here: every signal not at its default
        // (handled, or ignored like SIGPIPE and glibc's internal ones) back to it, then nothing
        // blocked, as for a command a plain shell starts. Raw rt_sigaction: glibc's wrapper
        // refuses its internal signals.
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: KernelSigaction = std::mem::zeroed();
            if libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old,
                8usize,
            ) == 0
                && old.handler != libc::SIG_DFL
            {
                let dfl: KernelSigaction = std::mem::zeroed();
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
        if a.procs >= 0 && libc::write(a.procs, c"0".as_ptr().cast(), 1) != 1 {
            return fail(a);
        }
        if a.process_group && libc::setpgid(0, 0) != 0 {
            return fail(a);
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur > a.nofile_soft {
            lim.rlim_cur = a.nofile_soft;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        for (target, &fd) in a.fds.iter().enumerate() {
            if libc::dup2(fd, target as c_int) < 0 {
                return fail(a);
            }
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) != 0 {
            return fail(a);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
        fail(a)
    }
}

/// What to start.
pub struct Spec<'a> {
    /// The file to execute (relative: to `cwd`).
    pub program: &'a [u8],
    /// `argv[0]` first.
    pub argv: &'a [Vec<u8>],
    /// The complete environment.
    pub env: &'a [(Vec<u8>, Vec<u8>)],
    pub cwd: Option<&'a Path>,
    /// stdin, stdout, stderr.
    pub fds: [&'a OwnedFd; 3],
    /// The open `cgroup.procs` of the command's cgroup.
    pub procs: Option<&'a OwnedFd>,
    /// A process group of its own.
    pub process_group: bool,
    pub nofile_soft: u64,
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// A descriptor the child may `dup2` onto 0, 1 or 2 without clobbering another: one that is
/// not 0, 1 or 2 itself.
fn above_stdio(fd: &OwnedFd, keep: &mut Vec<OwnedFd>) -> io::Result<RawFd> {
    let raw = fd.as_raw_fd();
    if raw > 2 {
        return Ok(raw);
    }
    // SAFETY: fcntl on a descriptor we hold; the result is a new descriptor we own.
    let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just made for us.
    keep.push(unsafe { OwnedFd::from_raw_fd(dup) });
    Ok(dup)
}

/// A started command: its pid and a pidfd of it (it is the caller's to reap).
pub struct Child {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
}

/// Starts the command; returns once it has exec'd, or with why it could not.
pub fn spawn(spec: Spec<'_>) -> io::Result<Child> {
    if spec.argv.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty command line",
        ));
    }
    let program = cstring(spec.program)?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<io::Result<_>>()?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstring(&[k.as_slice(), b"=", v.as_slice()].concat()))
        .collect::<io::Result<_>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let cwd = spec
        .cwd
        .map(|c| cstring(c.as_os_str().as_bytes()))
        .transpose()?;
    let mut keep = Vec::new();
    let fds = [
        above_stdio(spec.fds[0], &mut keep)?,
        above_stdio(spec.fds[1], &mut keep)?,
        above_stdio(spec.fds[2], &mut keep)?,
    ];
    let (report_read, report_write) = {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills the array with two new descriptors.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just made for us.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    };
    let args = ChildArgs {
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        cwd: cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        fds,
        procs: spec.procs.map_or(-1, |p| p.as_raw_fd()),
        process_group: spec.process_group,
        nofile_soft: spec.nofile_soft as libc::rlim_t,
        report: report_write.as_raw_fd(),
    };
    let mut stack = vec![0u8; 64 * 1024];
    // The stack grows down; its top, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: signals are blocked around the clone so that none runs a service handler in the
    // child before it resets them; the child gets only `args`, alive until it has exec'd
    // (CLONE_VFORK suspends this thread until then).
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut c_void,
        );
        let err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(err);
        }
        pid
    };
    drop(report_write);
    drop(stack);
    // The exec happened (the report pipe closed with it) or the child says why not.
    let mut errno = [0u8; 4];
    let n = loop {
        // SAFETY: read into a local buffer.
        let n = unsafe { libc::read(report_read.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n;
        }
    };
    if n == 4 {
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    // SAFETY: pidfd_open of our own child, not yet reaped (so its pid is still its own).
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let err = io::Error::last_os_error();
        // SAFETY: ending and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(err);
    }
    // SAFETY: the descriptor was just made for us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    Ok(Child { pid, pidfd })
}
