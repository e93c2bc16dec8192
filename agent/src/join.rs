//! The cgroup a command joins, opened by the agent itself through its own view of the cgroup
//! v2 hierarchy (in a container, its cgroup namespace: `/` is the container's own cgroup). The
//! service names the cgroup and gives it to the container's root; it hands over no descriptor
//! opened with its own credentials, so whatever a replaced agent could do with the cgroup, the
//! container's root can do already. The kernel checks a move into the cgroup against the
//! credentials and cgroup namespace of whoever opened its `cgroup.procs`: here, the agent's.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;

/// A command's cgroup, open: its directory (the child is made in it where the kernel allows,
/// `CLONE_INTO_CGROUP`) and its `cgroup.procs` (which the child writes itself into before it
/// execs, where it was not made in it).
pub struct Cgroup {
    pub dir: OwnedFd,
    pub procs: OwnedFd,
}

fn open_at(dir: libc::c_int, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain syscall with a NUL-terminated path; a non-negative result is ours.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_cgroup2(fd: &OwnedFd) -> bool {
    // SAFETY: fstatfs into a local.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(fd.as_raw_fd(), &mut st) == 0
            && st.f_type as libc::c_long == CGROUP2_SUPER_MAGIC
    }
}

/// Where this agent sees the cgroup v2 hierarchy.
fn mount() -> io::Result<OwnedFd> {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Ok(fd) = open_at(
            libc::AT_FDCWD,
            Path::new(p),
            libc::O_RDONLY | libc::O_DIRECTORY,
        ) && is_cgroup2(&fd)
        {
            return Ok(fd);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup v2 hierarchy at /sys/fs/cgroup",
    ))
}

/// Opens the cgroup at `path` (absolute, from the root of the hierarchy as this agent sees it;
/// plain names only). `None` for an empty path: the command joins none.
pub fn open(path: &[u8]) -> io::Result<Option<Cgroup>> {
    if path.is_empty() {
        return Ok(None);
    }
    let path = Path::new(OsStr::from_bytes(path));
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let below = path.strip_prefix("/").unwrap_or(path);
    if !plain || below.as_os_str().is_empty() || path.as_os_str().as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a cgroup below the root",
        ));
    }
    let root = mount()?;
    // Below the hierarchy's root, one directory of cgroupfs to the next: no link to follow.
    let dir = open_at(
        root.as_raw_fd(),
        below,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )?;
    if !is_cgroup2(&dir) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a cgroup"));
    }
    let procs = open_at(dir.as_raw_fd(), Path::new("cgroup.procs"), libc::O_WRONLY)?;
    Ok(Some(Cgroup { dir, procs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_path_below_the_root_is_opened() {
        assert!(open(b"").unwrap().is_none());
        for bad in [&b"exec-1"[..], b"/", b"/../etc", b"/exec-1/../..", b"/a\0b"] {
            let e = open(bad).err().map(|e| e.kind());
            assert!(
                matches!(e, Some(io::ErrorKind::InvalidInput)),
                "{:?}: {e:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
