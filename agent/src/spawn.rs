//! Starts a command without copying the caller: `clone3(CLONE_VM | CLONE_VFORK)` (or `clone`
//! where clone3 is refused) on a stack of its own, as `posix_spawn` does, plus what
//! `posix_spawn` cannot do before the exec: join the command's cgroup (made in it by
//! `CLONE_INTO_CGROUP`, or one write to its open `cgroup.procs`) and give back the soft
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
    /// An open directory to change to (`fchdir`), -1 for `cwd` or none.
    cwd_fd: RawFd,
    fds: [RawFd; 3],
    procs: RawFd,
    process_group: bool,
    terminal: bool,
    nofile_soft: libc::rlim_t,
    /// The kernel set every handled signal back to its default (`CLONE_CLEAR_SIGHAND`): only
    /// the signals in `ignored` are left to reset.
    handlers_cleared: bool,
    /// Signals the caller ignores (bit N-1 for signal N), read once.
    ignored: u64,
    /// Where the child reports why it could not exec: the memory is shared until it execs,
    /// as in glibc's `posix_spawn`, so no pipe is needed.
    err: c_int,
}

thread_local! {
    /// The child's stack while it shares this thread's memory: one per thread (the thread is
    /// suspended while the child uses it), kept for the next command.
    static STACK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 64 * 1024]);
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
        let a = arg as *mut ChildArgs;
        let fail = |a: *mut ChildArgs| -> c_int {
            // Read by the parent once this child has exited (CLONE_VFORK orders it).
            std::ptr::write_volatile(&raw mut (*a).err, *libc::__errno_location());
            libc::_exit(127)
        };
        let a_ = &*a;
        // The service's signal handlers must not run here: every signal not at its default
        // (handled, or ignored like SIGPIPE and glibc's internal ones) back to it, then nothing
        // blocked, as for a command a plain shell starts. Raw rt_sigaction: glibc's wrapper
        // refuses its internal signals.
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let reset = if a_.handlers_cleared {
                a_.ignored & (1 << (sig - 1)) != 0
            } else {
                disposition(sig).is_some_and(|h| h != libc::SIG_DFL)
            };
            if reset {
                set_default(sig);
            }
        }
        if a_.procs >= 0 && libc::write(a_.procs, c"0".as_ptr().cast(), 1) != 1 {
            return fail(a);
        }
        if a_.terminal {
            // A session of its own, whose controlling terminal is its stdin (set below).
            if libc::setsid() < 0 {
                return fail(a);
            }
        } else if a_.process_group && libc::setpgid(0, 0) != 0 {
            return fail(a);
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur > a_.nofile_soft {
            lim.rlim_cur = a_.nofile_soft;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        // The directory first: `cwd_fd` may be a number the dup2s below reuse.
        if a_.cwd_fd >= 0 {
            if libc::fchdir(a_.cwd_fd) != 0 {
                return fail(a);
            }
        } else if !a_.cwd.is_null() && libc::chdir(a_.cwd) != 0 {
            return fail(a);
        }
        for (target, &fd) in a_.fds.iter().enumerate() {
            if libc::dup2(fd, target as c_int) < 0 {
                return fail(a);
            }
        }
        if a_.terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
            return fail(a);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a_.program, a_.argv, a_.envp);
        fail(a)
    }
}

/// A signal's disposition (handler, `SIG_IGN` or `SIG_DFL`); raw `rt_sigaction`, which glibc's
/// wrapper is not (it refuses its internal signals), and async-signal-safe.
fn disposition(sig: c_int) -> Option<libc::sighandler_t> {
    // SAFETY: reading a disposition into a local.
    unsafe {
        let mut old: KernelSigaction = std::mem::zeroed();
        (libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<KernelSigaction>(),
            &mut old,
            8usize,
        ) == 0)
            .then_some(old.handler)
    }
}

/// Sets a signal back to its default (raw `rt_sigaction`, async-signal-safe).
fn set_default(sig: c_int) {
    // SAFETY: a zeroed kernel sigaction is SIG_DFL with no flags and an empty mask.
    unsafe {
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

/// The signals this process ignores (bit N-1 for signal N), read once: what a child made
/// with `CLONE_CLEAR_SIGHAND` still has to reset (SIGPIPE, which Rust programs ignore). The
/// handled ones the kernel resets itself, so none can run in the child whatever changes later.
fn ignored_signals() -> u64 {
    static IGNORED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *IGNORED.get_or_init(|| {
        (1..=64)
            .filter(|&sig| disposition(sig) == Some(libc::SIG_IGN))
            .fold(0u64, |mask, sig| mask | 1 << (sig - 1))
    })
}

/// `clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_CLEAR_SIGHAND [| CLONE_INTO_CGROUP])`:
/// the kernel resets the child's signal handlers and puts it in its cgroup as it makes it, so
/// the child skips 64 `rt_sigaction` calls and its move through `cgroup.procs`. Where clone3
/// is refused (an old kernel, a seccomp filter) or may not place the child (a caller in a
/// user namespace, as the agent is, lacks the rights on the cgroup), the caller falls back to
/// `clone` and the child's own work, and remembers.
#[cfg(target_arch = "x86_64")]
mod clone3 {
    use super::{ChildArgs, child};
    use std::ffi::{c_int, c_void};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    const CLONE_PIDFD: u64 = 0x1000;
    const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

    static NO_CLONE3: AtomicBool = AtomicBool::new(false);
    static NO_INTO_CGROUP: AtomicBool = AtomicBool::new(false);

    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }

    /// Starts the child through clone3 on `stack`; `None` when clone3 cannot be used (the
    /// caller then uses `clone`). Signals are blocked around it as around `clone`.
    pub(super) fn start(
        stack: &mut [u8],
        args: &mut ChildArgs,
        cgroup: Option<&OwnedFd>,
        pidfd: &mut c_int,
    ) -> Option<std::io::Result<libc::pid_t>> {
        if NO_CLONE3.load(Ordering::Relaxed) {
            return None;
        }
        let into = cgroup.filter(|_| !NO_INTO_CGROUP.load(Ordering::Relaxed));
        let base = stack.as_mut_ptr() as usize;
        // 16-byte aligned top: the child's first `call` then sees the ABI's alignment.
        let size = ((base + stack.len()) & !15) - base;
        let mut clone_args = CloneArgs {
            flags: libc::CLONE_VM as u64
                | libc::CLONE_VFORK as u64
                | CLONE_PIDFD
                | CLONE_CLEAR_SIGHAND
                | into.map_or(0, |_| CLONE_INTO_CGROUP),
            pidfd: pidfd as *mut c_int as u64,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: base as u64,
            stack_size: size as u64,
            tls: 0,
            set_tid: 0,
            set_tid_size: 0,
            cgroup: into.map_or(0, |c| c.as_raw_fd() as u64),
        };
        let procs = args.procs;
        args.handlers_cleared = true;
        if into.is_some() {
            args.procs = -1;
        }
        // SAFETY: as for `clone` in `spawn`: all signals blocked around it, the child runs
        // `child` on its own stack with `args`, both untouched by this thread until the child
        // has exec'd or exited (CLONE_VFORK).
        let ret = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let ret = raw_clone3(
                &mut clone_args,
                child,
                args as *mut ChildArgs as *mut c_void,
            );
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            ret
        };
        if ret >= 0 {
            return Some(Ok(ret as libc::pid_t));
        }
        args.handlers_cleared = false;
        args.procs = procs;
        match (-ret) as i32 {
            // No clone3 here (an old kernel; a seccomp filter says EPERM): `clone` from now on.
            libc::ENOSYS => {
                NO_CLONE3.store(true, Ordering::Relaxed);
                None
            }
            // Not into that cgroup (no rights on it, or it may not hold processes): without
            // it from now on; this once through `clone` and `procs`.
            libc::EPERM | libc::EACCES | libc::EINVAL | libc::EOPNOTSUPP | libc::EBUSY
                if into.is_some() =>
            {
                NO_INTO_CGROUP.store(true, Ordering::Relaxed);
                None
            }
            libc::EPERM => {
                NO_CLONE3.store(true, Ordering::Relaxed);
                None
            }
            // What `clone` would fail with too (no memory, too many processes).
            e => Some(Err(std::io::Error::from_raw_os_error(e))),
        }
    }

    /// The raw system call: in the child (on its new stack, rax 0) calls `f(arg)`, which
    /// execs or exits; the exit below is never reached in practice. Returns the child's pid or
    /// -errno in the parent.
    unsafe fn raw_clone3(
        args: &mut CloneArgs,
        f: extern "C" fn(*mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> isize {
        let ret: isize;
        // SAFETY: the caller's contract; r12 and r13 survive the system call in both
        // processes, and the child never returns into this function's frame.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r12",
                "call r13",
                "mov edi, eax",
                "mov eax, 60",
                "syscall",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 as isize => ret,
                in("rdi") args as *mut CloneArgs,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") arg,
                in("r13") f,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}

pub use crate::workdir::WorkDir;

/// What to start.
pub struct Spec<'a> {
    /// The file to execute (relative: to `cwd`).
    pub program: &'a [u8],
    /// `argv[0]` first.
    pub argv: &'a [Vec<u8>],
    /// The complete environment.
    pub env: &'a [(Vec<u8>, Vec<u8>)],
    pub cwd: Option<&'a Path>,
    /// The working directory, open (`O_PATH` will do): used instead of `cwd` when given, so
    /// that the path is not walked again.
    pub cwd_fd: Option<&'a OwnedFd>,
    /// stdin, stdout, stderr.
    pub fds: [&'a OwnedFd; 3],
    /// The open `cgroup.procs` of the command's cgroup.
    pub procs: Option<&'a OwnedFd>,
    /// The command's cgroup directory, open: the child is made in it (`CLONE_INTO_CGROUP`)
    /// where the kernel allows, instead of moving itself there through `procs`.
    pub cgroup: Option<&'a OwnedFd>,
    /// A process group of its own.
    pub process_group: bool,
    /// A session of its own whose controlling terminal is its stdin, a terminal (for a
    /// command on a pseudo-terminal); implies its own process group.
    pub terminal: bool,
    pub nofile_soft: u64,
}

pub(crate) fn cstring(b: &[u8]) -> io::Result<CString> {
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
    let mut args = ChildArgs {
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        cwd: cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        cwd_fd: spec.cwd_fd.map_or(-1, |f| f.as_raw_fd()),
        fds,
        procs: spec.procs.map_or(-1, |p| p.as_raw_fd()),
        process_group: spec.process_group,
        terminal: spec.terminal,
        nofile_soft: spec.nofile_soft as libc::rlim_t,
        handlers_cleared: false,
        ignored: ignored_signals(),
        err: 0,
    };
    let mut pidfd: c_int = -1;
    let pid = STACK.with_borrow_mut(|stack| {
        #[cfg(target_arch = "x86_64")]
        if let Some(pid) = clone3::start(stack, &mut args, spec.cgroup, &mut pidfd) {
            return pid;
        }
        // The stack grows down; its top, 16-byte aligned.
        let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
        // SAFETY: signals are blocked around the clone so that none runs a service handler in
        // the child before it resets them; the child gets only `args` and this thread's
        // stack, both untouched until it has exec'd or exited (CLONE_VFORK suspends this
        // thread until then). CLONE_PIDFD stores a pidfd of the child in `pidfd`.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child,
                top as *mut c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                &raw mut args as *mut c_void,
                &raw mut pidfd,
            );
            let err = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 { Err(err) } else { Ok(pid) }
        }
    })?;
    // SAFETY: the child has exec'd or exited (CLONE_VFORK); what it wrote is visible now.
    let err = unsafe { std::ptr::read_volatile(&raw const args.err) };
    // SAFETY: CLONE_PIDFD made this descriptor for us.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    if err != 0 || pidfd.is_none() {
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited (or is killed first if it exec'd
        // but we have no pidfd to wait for it with).
        unsafe {
            if err == 0 {
                libc::kill(pid, libc::SIGKILL);
            }
            libc::waitpid(pid, &mut status, 0);
        }
        return Err(if err != 0 {
            io::Error::from_raw_os_error(err)
        } else {
            io::Error::other("clone gave no pidfd")
        });
    }
    let pidfd = pidfd.expect("checked above");
    Ok(Child { pid, pidfd })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(program: &[u8], argv: &[&[u8]], dir: Option<&WorkDir>) -> io::Result<(i32, String)> {
        let (r, w) = {
            let mut p = [0; 2];
            // SAFETY: pipe2 fills the array with two new descriptors.
            assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both were just made for us.
            unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
        };
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let argv: Vec<Vec<u8>> = argv.iter().map(|a| a.to_vec()).collect();
        let env = [(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())];
        let child = spawn(Spec {
            program,
            argv: &argv,
            env: &env,
            cwd: None,
            cwd_fd: dir.map(|d| &d.fd),
            fds: [&null, &w, &w],
            procs: None,
            cgroup: None,
            process_group: true,
            terminal: false,
            nofile_soft: 1024,
        })?;
        drop(w);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(child.pid, &mut status, 0) };
        Ok((libc::WEXITSTATUS(status), out))
    }

    /// The cgroup v2 hierarchy's mount point and this process's cgroup in it.
    fn own_cgroup() -> Option<std::path::PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = info
            .lines()
            .find(|l| l.contains(" - cgroup2 "))?
            .split(' ')
            .nth(4)?
            .to_owned();
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
        Some(Path::new(&mount).join(rel.trim_start_matches('/')))
    }

    #[test]
    fn a_command_is_made_in_its_cgroup() {
        // Needs a cgroup this process may create (root, as the service and CI run).
        let Some(parent) = own_cgroup() else {
            return eprintln!("no cgroup v2 hierarchy: skipped");
        };
        let dir = parent.join(format!("aw-spawn-test-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&dir) {
            return eprintln!("cannot create {}: {e}: skipped", dir.display());
        }
        let cgroup = OwnedFd::from(std::fs::File::open(&dir).unwrap());
        let (r, w) = {
            let mut p = [0; 2];
            // SAFETY: pipe2 fills the array with two new descriptors.
            assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both were just made for us.
            unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
        };
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let child = spawn(Spec {
            program: b"/bin/cat",
            argv: &[b"cat".to_vec(), b"/proc/self/cgroup".to_vec()],
            env: &[],
            cwd: None,
            cwd_fd: None,
            fds: [&null, &w, &w],
            procs: None,
            cgroup: Some(&cgroup),
            process_group: true,
            terminal: false,
            nofile_soft: 1024,
        })
        .unwrap();
        drop(w);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(child.pid, &mut status, 0) };
        std::fs::remove_dir(&dir).unwrap();
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(
            out.lines()
                .any(|l| l.starts_with("0::") && l.ends_with(name)),
            "{out:?} is in {name}"
        );
    }

    #[test]
    fn a_command_runs_in_its_directory_and_a_failed_start_says_why() {
        let dir = WorkDir::open(Path::new("/usr/bin/../lib")).unwrap();
        let resolved = std::fs::canonicalize("/usr/lib").unwrap();
        assert_eq!(dir.resolved.as_deref(), Some(resolved.as_path()));
        let (code, out) = run(b"/bin/pwd", &[b"pwd", b"-P"], Some(&dir)).unwrap();
        assert_eq!((code, out.trim()), (0, resolved.to_str().unwrap()));
        // The child's errno comes back through the memory it shares until the exec.
        let e = run(b"/nonexistent/program", &[b"x"], None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let file = std::env::temp_dir().join(format!("aw-spawn-{}", std::process::id()));
        std::fs::write(&file, "not a program").unwrap();
        let e = run(file.as_os_str().as_bytes(), &[b"x"], None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        // A directory that is not one.
        assert!(WorkDir::open(&file).is_err());
        std::fs::remove_file(&file).unwrap();
    }
}
