//! Cgroups of commands: the service's delegated subtree (`<unit cgroup>/daemon` for itself,
//! `exec-N` for each host command) and a container's payload subtree alike. A command's
//! cgroup is created before it starts and joined by the child before it execs; `cgroup.kill`
//! ends everything it started; the cgroup is removed once empty.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::warn;

pub(super) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// How the process tree of a command is contained: a host command's (the service's
/// setting) and a container command's (its payload cgroup) alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// In a new cgroup `exec-N` below this delegated cgroup (the default): `cgroup.kill` ends
    /// everything the command started.
    Cgroup(PathBuf),
    /// In a new process group: for running the daemon by hand outside systemd. Weaker: a
    /// process that leaves its process group (setsid) survives a timeout.
    ProcessGroup,
}

/// The service's delegated cgroup v2 subtree: `<unit cgroup>/daemon` holds the service itself,
/// `<unit cgroup>/exec-N` one command each (cgroup v2 allows no processes in inner nodes).
pub struct CgroupTree {
    base: PathBuf,
}

pub(super) fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_mount() -> Option<&'static Path> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|p| is_cgroup2(p))
}

impl CgroupTree {
    /// Finds the service's own cgroup, checks that it is a delegated unit cgroup, moves the
    /// service into `daemon/` below it and removes `exec-*` cgroups a previous run left.
    pub fn setup() -> std::result::Result<Self, String> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v2 membership in /proc/self/cgroup")?
            .trim()
            .to_owned();
        let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|p| is_cgroup2(p))
            .ok_or("no cgroup v2 hierarchy mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified")?;
        let rel = rel.strip_suffix("/daemon").unwrap_or(&rel).to_owned();
        let unit = rel.rsplit('/').next().unwrap_or("");
        if !(unit.ends_with(".service") || unit.ends_with(".scope")) {
            return Err(format!(
                "the service's cgroup '{rel}' is not a systemd unit's: run it as agent-workspaced.service (Delegate=yes)"
            ));
        }
        let base = mount.join(rel.trim_start_matches('/'));
        if !base.join("cgroup.kill").exists() {
            return Err(format!(
                "{} has no cgroup.kill (Linux 5.14 or later is needed)",
                base.display()
            ));
        }
        let daemon = base.join("daemon");
        fs::create_dir_all(&daemon).map_err(|e| {
            format!(
                "cannot create {} (is Delegate=yes set?): {e}",
                daemon.display()
            )
        })?;
        fs::write(daemon.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("cannot move the service into {}: {e}", daemon.display()))?;
        let tree = Self { base };
        tree.remove_stale();
        Ok(tree)
    }

    fn remove_stale(&self) {
        let Ok(entries) = fs::read_dir(&self.base) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("exec-") {
                let dir = e.path();
                let _ = fs::write(dir.join("cgroup.kill"), "1");
                if let Err(err) = remove_cgroup_blocking(&dir) {
                    warn!(
                        "Cannot remove stale command cgroup {}: {err}",
                        dir.display()
                    );
                }
            }
        }
    }

    /// The cgroup below which host commands run.
    pub fn base(&self) -> &Path {
        &self.base
    }
}

/// Numbers command cgroups (`exec-N`), unique for the life of the service.
pub(super) static NEXT_COMMAND: AtomicU64 = AtomicU64::new(1);

/// Empty command cgroups kept for the next commands below the same parent: making a cgroup
/// costs a third of a millisecond (measured in the test host), more than the rest of the
/// service's work for a command. Their files belong to host root, so nothing inside a
/// container can put a process into one while it waits here; one that is gone (its container
/// stopped) or not empty is not used.
static POOL: std::sync::LazyLock<std::sync::Mutex<HashMap<PathBuf, Vec<CommandCgroup>>>> =
    std::sync::LazyLock::new(Default::default);
/// Empty cgroups kept per parent.
const POOL_PER_PARENT: usize = 16;

impl CommandCgroup {
    /// A cgroup for one command below `parent`: an empty one kept from an earlier command, or a
    /// new `exec-N`.
    pub(super) fn create(parent: &Path) -> io::Result<Self> {
        loop {
            let pooled = POOL
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_mut(parent)
                .and_then(Vec::pop);
            let Some(cg) = pooled else { break };
            match read_populated(&cg.events) {
                Some(false) => return Ok(cg),
                Some(true) => {
                    cg.kill();
                    tokio::spawn(cg.remove());
                }
                // Gone with its container.
                None => {}
            }
        }
        // Numbers are unique in this run; a cgroup an earlier run of the service left (kept in
        // a container's subtree) may hold one.
        let mut dir;
        let mut tries = 0;
        loop {
            let n = NEXT_COMMAND.fetch_add(1, Ordering::Relaxed);
            dir = parent.join(format!("exec-{n}"));
            match fs::create_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 10_000 => tries += 1,
                Err(e) => return Err(e),
            }
        }
        CommandCgroup::open(&dir).inspect_err(|_| {
            let _ = fs::remove_dir(&dir);
        })
    }
}

/// A cgroup's directory, open for `CLONE_INTO_CGROUP`.
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?
        .into())
}

fn remove_cgroup_blocking(dir: &Path) -> io::Result<()> {
    for _ in 0..500 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            other => return other,
        }
    }
    fs::remove_dir(dir)
}

pub(super) struct CommandCgroup {
    pub(super) dir: PathBuf,
    /// Open before fork, so the child only has to write(2) to it.
    pub(super) procs: OwnedFd,
    /// The directory itself, open: a child is made in it (`CLONE_INTO_CGROUP`) where it can.
    pub(super) dir_fd: OwnedFd,
    /// Its `cgroup.events`, kept open: whether it holds processes is one read.
    events: fs::File,
}

impl CommandCgroup {
    /// A command's cgroup that exists: just made, or made by an earlier run of the service (a
    /// kept process's).
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        let procs = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("cgroup.procs"))?;
        Ok(CommandCgroup {
            dir: dir.to_path_buf(),
            procs: OwnedFd::from(procs),
            dir_fd: open_dir(dir)?,
            events: fs::File::open(dir.join("cgroup.events"))?,
        })
    }

    /// Ends what the command left running: nothing to do (and nothing written) when its
    /// cgroup is already empty, as it is after most commands. Says whether it was empty.
    pub(super) fn kill_leftovers(&self) -> bool {
        let empty = read_populated(&self.events) == Some(false);
        if !empty {
            self.kill();
        }
        empty
    }

    /// Sends `sig` to every process in the cgroup. Each is held by a pidfd before the signal,
    /// and signalled only if the cgroup still lists it after: a pid reused meanwhile by a
    /// process elsewhere is never signalled.
    pub(super) fn signal(&self, sig: i32) {
        let procs = || -> Vec<i32> {
            fs::read_to_string(self.dir.join("cgroup.procs"))
                .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
                .unwrap_or_default()
        };
        let held: Vec<(i32, OwnedFd)> = procs()
            .into_iter()
            .filter_map(|pid| {
                // SAFETY: a plain syscall; a non-negative result is a new descriptor we own.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
                (fd >= 0).then(|| (pid, unsafe { OwnedFd::from_raw_fd(fd as i32) }))
            })
            .collect();
        let still = procs();
        for (pid, fd) in held.iter().filter(|(pid, _)| still.contains(pid)) {
            // SAFETY: signalling the process the pidfd holds.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if r != 0 {
                warn!(
                    "Cannot send signal {sig} to process {pid} of {}: {}",
                    self.dir.display(),
                    io::Error::last_os_error()
                );
            }
        }
    }

    pub(super) fn kill(&self) {
        if let Err(e) = fs::write(self.dir.join("cgroup.kill"), "1") {
            warn!("Cannot kill {}: {e}", self.dir.display());
        }
    }

    /// Keeps the empty cgroup for a next command below the same parent, or removes it when
    /// enough are kept. Only one never killed: Linux (seen on 6.18) kills at birth a child
    /// made by `CLONE_INTO_CGROUP` in a cgroup that has seen `cgroup.kill` (it compares that
    /// cgroup's kill count with the one of the cgroup the parent is in), so a killed cgroup is
    /// removed (`remove`), never kept.
    pub(super) fn keep(self) {
        let parent = self.dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = pool.entry(parent).or_default();
        if kept.len() < POOL_PER_PARENT {
            kept.push(self);
            return;
        }
        drop(pool);
        self.remove_dir();
    }

    /// Whether the cgroup is empty within 5 s. The kernel says when a cgroup empties by
    /// changing `populated` in its `cgroup.events` and waking pollers of that file
    /// (`POLLPRI`): awaited, and looked at again every 100 ms should a wake-up be missed.
    async fn wait_empty(&self) -> bool {
        let events = self.events.try_clone().and_then(|f| {
            // SAFETY: a File owns its descriptor until it is dropped, with the AsyncFd.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(f, tokio::io::Interest::PRIORITY)
            }
            .map_err(io::Error::from)
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match &events {
                Ok(f) if read_populated(f.get_ref()) == Some(false) => return true,
                Ok(_) => {}
                // Gone (its container stopped): empty, and nothing to keep.
                Err(_) => return !self.dir.exists(),
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let wake = async {
                match &events {
                    Ok(f) => match f.ready(tokio::io::Interest::PRIORITY).await {
                        Ok(mut guard) => guard.clear_ready(),
                        Err(_) => std::future::pending().await,
                    },
                    Err(_) => std::future::pending().await,
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(100), wake).await;
        }
    }

    /// Waits until the killed processes are gone, then removes the cgroup.
    pub(super) async fn remove(self) {
        if !self.wait_empty().await {
            warn!(
                "{} still has processes 5 s after cgroup.kill",
                self.dir.display()
            );
            return;
        }
        self.remove_dir();
    }

    /// Removes the (empty) cgroup; one already gone is no error.
    fn remove_dir(&self) {
        match fs::remove_dir(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                warn!("Cannot remove {}: {e}", self.dir.display())
            }
            _ => {}
        }
    }
}

/// Whether a cgroup still holds processes, from its `cgroup.events` (read from the start);
/// `None` when it cannot be read (the cgroup is gone).
fn read_populated(events: &fs::File) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 256];
    let n = events.read_at(&mut buf, 0).ok()?;
    Some(!String::from_utf8_lossy(&buf[..n]).contains("populated 0"))
}
