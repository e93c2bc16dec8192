//! Cgroups of commands: the service's delegated subtree (`<unit cgroup>/daemon` for itself,
//! `exec-N` for each host command), the host agent's and a container's payload subtree alike.
//! A command's cgroup is made before it starts and joined by the child before it execs;
//! `cgroup.kill` ends everything it started; the cgroup is removed once empty.
//!
//! Every cgroup is acted on through a descriptor of its directory, opened when it was made
//! (and checked then to be the one made: host root's), never through its path again: a
//! container's root can remove and remake cgroups in its own subtree, and move its processes
//! between them, but it cannot make the service act on a cgroup other than the one it holds.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use tracing::warn;

pub(super) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// How the process tree of a command is contained: a host command's (the service's
/// setting) and a container command's (its payload cgroup) alike.
#[derive(Clone)]
pub enum Containment {
    /// In a new cgroup `exec-N` below this delegated cgroup (the default): `cgroup.kill` ends
    /// everything the command started.
    Cgroup(Arc<CgroupParent>),
    /// In a new process group: for running the daemon by hand outside systemd. Weaker: a
    /// process that leaves its process group (setsid) survives a timeout.
    ProcessGroup,
}

pub(super) fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

fn fd_is_cgroup2(fd: impl AsFd) -> bool {
    rfs::fstatfs(fd).is_ok_and(|s| s.f_type == CGROUP2_SUPER_MAGIC)
}

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_mount() -> Option<&'static Path> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|p| is_cgroup2(p))
}

/// A delegated cgroup below which commands get cgroups of their own: the service's, the host
/// agent's unit's, or a container's payload. Open once, as a directory descriptor.
pub struct CgroupParent {
    dir: OwnedFd,
    /// For messages, and the key of the cgroups kept for the next commands.
    path: PathBuf,
    /// Its cgroup id (the directory's inode number).
    id: u64,
    /// The path of this cgroup as the agent that starts commands in it sees it (from the root
    /// of its own view of the hierarchy: `/` for a container's payload); the command's cgroup
    /// is named to the agent below it. None: commands here are started by the service.
    seen_as: Option<PathBuf>,
    /// Whose processes join the commands' cgroups by themselves (a container's root): their
    /// `cgroup.procs` and `cgroup.threads` are given to that user and group, so the agent can
    /// join with its own credentials. Everything else of the cgroup stays host root's.
    joiner: Option<(u32, u32)>,
}

impl CgroupParent {
    /// Opens the cgroup at `path` (a unit's delegated cgroup: every directory on the way is
    /// host root's, so the path cannot be redirected).
    pub fn open(
        path: &Path,
        seen_as: Option<PathBuf>,
        joiner: Option<(u32, u32)>,
    ) -> io::Result<Arc<Self>> {
        let dir = rfs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if !fd_is_cgroup2(&dir) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a cgroup", path.display()),
            ));
        }
        let id = rfs::fstat(&dir)?.st_ino;
        Ok(Arc::new(Self {
            dir,
            path: path.to_path_buf(),
            id,
            seen_as,
            joiner,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The service's delegated cgroup v2 subtree: `<unit cgroup>/daemon` holds the service itself,
/// `<unit cgroup>/exec-N` one command each (cgroup v2 allows no processes in inner nodes).
pub struct CgroupTree {
    base: Arc<CgroupParent>,
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
        let mount = cgroup2_mount()
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
        remove_stale(&base);
        let base = CgroupParent::open(&base, None, None)
            .map_err(|e| format!("cannot open {}: {e}", base.display()))?;
        Ok(Self { base })
    }

    /// The cgroup below which host commands run.
    pub fn base(&self) -> &Arc<CgroupParent> {
        &self.base
    }
}

/// Ends and removes the `exec-*` cgroups below the service's own (only host root's there).
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
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

/// Numbers command cgroups (`exec-N`), unique for the life of the service.
pub(super) static NEXT_COMMAND: AtomicU64 = AtomicU64::new(1);

/// Empty command cgroups kept for the next commands below the same parent: making a cgroup
/// costs a third of a millisecond (measured in the test host), more than the rest of the
/// service's work for a command. One whose parent is gone (its container stopped), or that is
/// not empty (a container's root may move its processes into a kept cgroup of its subtree),
/// is not used.
static POOL: std::sync::LazyLock<std::sync::Mutex<HashMap<PathBuf, Vec<CommandCgroup>>>> =
    std::sync::LazyLock::new(Default::default);
/// Empty cgroups kept per parent.
const POOL_PER_PARENT: usize = 16;

/// Lets go of the cgroups kept below `parent` (a container that stopped: they, and its
/// payload's descriptor, would otherwise be held until its next command).
pub fn forget_kept_below(parent: &Path) {
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(parent);
}

/// One command's cgroup, held by its directory's descriptor.
pub(super) struct CommandCgroup {
    parent: Arc<CgroupParent>,
    /// Its name in the parent (`exec-N`).
    name: String,
    /// The directory: the child is made in it (`CLONE_INTO_CGROUP`) where it can, and every
    /// file of the cgroup is opened from it.
    pub(super) dir: OwnedFd,
    id: u64,
    /// Its `cgroup.events`, kept open: whether it holds processes is one read.
    events: fs::File,
    /// `cgroup.kill` was written (by a timeout, a cancel, or a `SIGKILL` sent to it): it is
    /// never kept for another command (see `keep`).
    killed: std::sync::atomic::AtomicBool,
    /// Its `cgroup.procs`, open for writing once the service's own child needs it (`procs`).
    procs: std::sync::OnceLock<OwnedFd>,
}

fn open_in(dir: impl AsFd, name: &str, flags: OFlags) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dir,
        name,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?)
}

impl CommandCgroup {
    /// A cgroup for one command below `parent`: an empty one kept from an earlier command, or a
    /// new `exec-N`.
    pub(super) fn create(parent: &Arc<CgroupParent>) -> io::Result<Self> {
        loop {
            let pooled = POOL
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_mut(&parent.path)
                .and_then(Vec::pop);
            let Some(cg) = pooled else { break };
            if cg.parent.id != parent.id {
                // Of an earlier cgroup at that path (a container started again).
                continue;
            }
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
        // a container's subtree) may hold one, and so may one the container's root made (it
        // sees the names): the numbers then jump ahead by a random stride, a few times at most.
        let mut tries = 0;
        let name = loop {
            let name = format!("exec-{}", NEXT_COMMAND.fetch_add(1, Ordering::Relaxed));
            match rfs::mkdirat(&parent.dir, name.as_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) => break name,
                Err(e) if e == rustix::io::Errno::EXIST && tries < 16 => {
                    tries += 1;
                    let stride = (uuid::Uuid::new_v4().as_u128() as u64) >> 32;
                    NEXT_COMMAND.fetch_add(stride, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        };
        Self::made(parent, name.clone()).inspect_err(|_| {
            let _ = rfs::unlinkat(&parent.dir, name.as_str(), AtFlags::REMOVEDIR);
        })
    }

    /// The cgroup just made as `name`: opened, checked to be the one made (host root's: what
    /// a container's root makes in its subtree is its own), and given to whoever joins it.
    fn made(parent: &Arc<CgroupParent>, name: String) -> io::Result<Self> {
        let dir = open_in(&parent.dir, &name, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let st = rfs::fstat(&dir)?;
        if st.st_uid != 0 || !fd_is_cgroup2(&dir) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{name} was replaced as it was made"),
            ));
        }
        if let Some((uid, gid)) = parent.joiner {
            let (uid, gid) = (rfs::Uid::from_raw(uid), rfs::Gid::from_raw(gid));
            for file in ["cgroup.procs", "cgroup.threads"] {
                rfs::chownat(&dir, file, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
            }
        }
        let events = fs::File::from(open_in(&dir, "cgroup.events", OFlags::RDONLY)?);
        Ok(Self {
            parent: parent.clone(),
            name,
            dir,
            id: st.st_ino,
            events,
            killed: Default::default(),
            procs: Default::default(),
        })
    }

    /// A command's cgroup kept across a restart of the service (its directory's descriptor,
    /// from systemd's store): its parent is found through it.
    pub(super) fn from_dir(dir: OwnedFd) -> io::Result<Self> {
        if !fd_is_cgroup2(&dir) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a cgroup"));
        }
        let path = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.starts_with("exec-"))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a command's cgroup"))?
            .to_owned();
        let up = open_in(&dir, "..", OFlags::RDONLY | OFlags::DIRECTORY)?;
        let parent = Arc::new(CgroupParent {
            id: rfs::fstat(&up)?.st_ino,
            dir: up,
            path: path.parent().unwrap_or(Path::new("/")).to_path_buf(),
            seen_as: None,
            joiner: None,
        });
        let id = rfs::fstat(&dir)?.st_ino;
        let events = fs::File::from(open_in(&dir, "cgroup.events", OFlags::RDONLY)?);
        Ok(Self {
            parent,
            name,
            dir,
            id,
            events,
            // Not known: as if it was.
            killed: std::sync::atomic::AtomicBool::new(true),
            procs: Default::default(),
        })
    }

    /// Its path, for messages.
    pub(super) fn path(&self) -> PathBuf {
        self.parent.path.join(&self.name)
    }

    /// Its path as the agent that starts commands in its parent sees it.
    pub(super) fn seen_by_agent(&self) -> Option<PathBuf> {
        self.parent.seen_as.as_ref().map(|p| p.join(&self.name))
    }

    /// Its `cgroup.procs`, open for writing (once, kept with the cgroup): the service's own
    /// child writes itself into it where it is not made in the cgroup.
    pub(super) fn procs(&self) -> io::Result<&OwnedFd> {
        if let Some(fd) = self.procs.get() {
            return Ok(fd);
        }
        let fd = open_in(&self.dir, "cgroup.procs", OFlags::WRONLY)?;
        Ok(self.procs.get_or_init(|| fd))
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

    /// Sends `sig` to every process in the cgroup, off the runtime's threads, in time linear in
    /// their number (`signal_all`).
    pub(super) async fn signal(&self, sig: i32) {
        if sig == libc::SIGKILL {
            self.killed.store(true, Ordering::Relaxed);
        }
        let dir = match self.dir.try_clone() {
            Ok(d) => d,
            Err(e) => return warn!("Cannot signal {}: {e}", self.path().display()),
        };
        let path = self.path();
        let sent = tokio::task::spawn_blocking(move || signal_all(&dir, sig)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("Cannot send signal {sig} to {}: {e}", path.display()),
            Err(e) => warn!("Cannot send signal {sig} to {}: {e}", path.display()),
        }
    }

    pub(super) fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        if let Err(e) = kill(&self.dir) {
            warn!("Cannot kill {}: {e}", self.path().display());
        }
    }

    /// Keeps the empty cgroup for a next command below the same parent, or removes it when
    /// enough are kept. Only one never killed: Linux (seen on 6.18) kills at birth a child
    /// made by `CLONE_INTO_CGROUP` in a cgroup that has seen `cgroup.kill` (it compares that
    /// cgroup's kill count with the one of the cgroup the parent is in), so a killed cgroup is
    /// removed (`remove`), never kept.
    pub(super) fn keep(self) {
        if self.killed.load(Ordering::Relaxed) {
            drop(tokio::spawn(self.remove()));
            return;
        }
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = pool.entry(self.parent.path.clone()).or_default();
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
                Ok(f) => match read_populated(f.get_ref()) {
                    Some(false) => return true,
                    // Gone (its container stopped): empty, and nothing to keep.
                    None => return true,
                    Some(true) => {}
                },
                Err(_) => return read_populated(&self.events) != Some(true),
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
                self.path().display()
            );
            return;
        }
        self.remove_dir();
    }

    /// Removes the (empty) cgroup: the one of its name in its parent, if that is still this
    /// one (a container's root may have removed it and made another of that name); one
    /// already gone is no error.
    fn remove_dir(&self) {
        match rfs::statat(
            &self.parent.dir,
            self.name.as_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if st.st_ino == self.id => {}
            _ => return,
        }
        match rfs::unlinkat(&self.parent.dir, self.name.as_str(), AtFlags::REMOVEDIR) {
            Err(e) if e != rustix::io::Errno::NOENT => {
                warn!("Cannot remove {}: {e}", self.path().display())
            }
            _ => {}
        }
    }
}

/// Writes `cgroup.kill` of the cgroup whose directory this is.
fn kill(dir: &OwnedFd) -> io::Result<()> {
    let mut f = fs::File::from(open_in(dir, "cgroup.kill", OFlags::WRONLY)?);
    f.write_all(b"1")
}

/// The processes a cgroup lists, in the service's PID namespace (that of whoever opened the
/// list), read to its end: bounded by the cgroup's `pids.max`, `TasksMax=` of its unit.
fn listed(dir: &OwnedFd) -> io::Result<Vec<i32>> {
    let mut text = String::new();
    fs::File::from(open_in(dir, "cgroup.procs", OFlags::RDONLY)?).read_to_string(&mut text)?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Processes held by a pidfd at once while signalling: each batch costs one more reading of
/// the list, so the whole is linear in the number of processes for any cgroup under
/// `TasksMax=` (16384 by default: 16 readings).
const SIGNAL_BATCH: usize = 1024;

/// Sends `sig` to every process of a cgroup. `SIGKILL` is the cgroup's `cgroup.kill`. Any
/// other signal: each listed process is held by a pidfd first, then signalled only if the
/// cgroup still lists it (a pid reused meanwhile by a process elsewhere is never signalled).
fn signal_all(dir: &OwnedFd, sig: i32) -> io::Result<()> {
    if sig == libc::SIGKILL {
        return kill(dir);
    }
    let pids = listed(dir)?;
    let mut failed = None;
    for batch in pids.chunks(SIGNAL_BATCH) {
        let held: Vec<(i32, OwnedFd)> = batch
            .iter()
            .filter_map(|&pid| {
                // SAFETY: a plain syscall; a non-negative result is a new descriptor we own.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
                (fd >= 0).then(|| (pid, unsafe { OwnedFd::from_raw_fd(fd as i32) }))
            })
            .collect();
        let still: HashSet<i32> = listed(dir)?.into_iter().collect();
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
                let e = io::Error::last_os_error();
                // One that ended meanwhile was not missed.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    failed = Some(io::Error::new(e.kind(), format!("process {pid}: {e}")));
                }
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Whether a cgroup still holds processes, from its `cgroup.events` (read from the start);
/// `None` when it cannot be read (the cgroup is gone).
fn read_populated(events: &fs::File) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 256];
    let n = events.read_at(&mut buf, 0).ok()?;
    Some(!String::from_utf8_lossy(&buf[..n]).contains("populated 0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup below this process's own, made for a test (root may: as the service and CI
    /// run), removed at the end; `None` where there is no such cgroup v2 hierarchy.
    struct TestParent(PathBuf);

    impl TestParent {
        fn make(name: &str) -> Option<Self> {
            let mount = cgroup2_mount()?;
            let own = fs::read_to_string("/proc/self/cgroup").ok()?;
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))?
                .trim()
                .to_owned();
            let dir = mount
                .join(rel.trim_start_matches('/'))
                .join(format!("{name}-{}", std::process::id()));
            fs::create_dir(&dir).ok()?;
            Some(Self(dir))
        }
    }

    impl Drop for TestParent {
        fn drop(&mut self) {
            if let Ok(entries) = fs::read_dir(&self.0) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    let _ = fs::remove_dir(e.path());
                }
            }
            let _ = fs::remove_dir(&self.0);
        }
    }

    #[tokio::test]
    async fn a_commands_cgroup_is_named_for_its_agent_and_given_to_whoever_joins_it() {
        let Some(dir) = TestParent::make("aw-cgroup-test") else {
            return eprintln!("no writable cgroup v2 hierarchy: skipped");
        };
        let parent =
            CgroupParent::open(&dir.0, Some(PathBuf::from("/seen")), Some((65534, 65534))).unwrap();
        let cg = CommandCgroup::create(&parent).unwrap();
        let seen = cg.seen_by_agent().unwrap();
        assert_eq!(seen.parent(), Some(Path::new("/seen")));
        assert!(
            seen.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("exec-")
        );
        use std::os::unix::fs::MetadataExt;
        let owner = |f: &str| {
            let m = fs::metadata(cg.path().join(f)).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(owner("cgroup.procs"), (65534, 65534));
        assert_eq!(owner("cgroup.threads"), (65534, 65534));
        // Only those: the directory and the rest stay host root's.
        assert_eq!(owner("."), (0, 0));
        assert_eq!(owner("cgroup.kill"), (0, 0));
        assert!(cg.kill_leftovers(), "an empty cgroup is left alone");
        cg.remove().await;
    }

    #[tokio::test]
    async fn a_killed_cgroup_is_never_kept_for_another_command() {
        let Some(dir) = TestParent::make("aw-cgroup-kill-test") else {
            return eprintln!("no writable cgroup v2 hierarchy: skipped");
        };
        let parent = CgroupParent::open(&dir.0, None, None).unwrap();
        let kept = CommandCgroup::create(&parent).unwrap();
        let kept_path = kept.path();
        kept.keep();
        // Taken again: the one kept.
        let again = CommandCgroup::create(&parent).unwrap();
        assert_eq!(again.path(), kept_path);
        // A SIGKILL is its cgroup.kill: then it is removed, not kept.
        again.signal(libc::SIGKILL).await;
        again.keep();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kept_path.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} kept",
                kept_path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let fresh = CommandCgroup::create(&parent).unwrap();
        assert_ne!(fresh.path(), kept_path);
        fresh.remove().await;
    }
}
