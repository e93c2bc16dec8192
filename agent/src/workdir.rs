//! A command's working directory, opened once by whoever starts the command (the service for a
//! host command, the agent inside a container), with the name `getcwd()` will give there.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::spawn::cstring;

/// A command's working directory, opened once: the open checks that it is a directory, the
/// child changes to it with `fchdir` (no second walk of the path), and its resolved path is
/// what `getcwd()` will say there.
pub struct WorkDir {
    /// As given.
    pub path: std::path::PathBuf,
    /// `O_PATH | O_DIRECTORY`.
    pub fd: OwnedFd,
    /// Its path with every link resolved (the kernel's name of the open directory), or `None`
    /// when that has no plain name (it was removed, or lies outside this root).
    pub resolved: Option<std::path::PathBuf>,
}

impl WorkDir {
    /// Opens `path`, which must be a directory (following links, as `chdir` does).
    pub fn open(path: &Path) -> io::Result<Self> {
        let c = cstring(path.as_os_str().as_bytes())?;
        // A plain absolute path (no `.`, `..` or empty component) that crosses no link is the
        // kernel's name of the directory it opens: one open that refuses links says both, with
        // no read of the name through /proc (which costs more than the rest of the open). Any
        // failure of it (a link on the way, an old kernel, a seccomp filter) goes the general
        // way, which also gives the error the caller sees. (On a case-folding file system a
        // path that differs from the stored names in case only is taken as given, where
        // getcwd would give the stored case: both name the same directory.)
        if plain_absolute(path.as_os_str().as_bytes())
            && let Some(fd) = open_without_links(&c)
        {
            return Ok(WorkDir {
                path: path.to_path_buf(),
                fd,
                resolved: Some(path.to_path_buf()),
            });
        }
        // SAFETY: a plain syscall on a NUL-terminated path; a result >= 0 is ours to own.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just opened for us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let resolved = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .ok()
            .filter(|p| p.is_absolute() && !p.as_os_str().as_bytes().ends_with(b" (deleted)"))
            .or_else(|| std::fs::canonicalize(path).ok());
        Ok(WorkDir {
            path: path.to_path_buf(),
            fd,
            resolved,
        })
    }
}

/// An absolute path with no `.`, `..` or empty component, nor a trailing `/` (but `/`).
fn plain_absolute(path: &[u8]) -> bool {
    path == b"/"
        || (path.first() == Some(&b'/')
            && path[1..]
                .split(|&b| b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b".."))
}

/// `openat2(path, O_PATH | O_DIRECTORY, RESOLVE_NO_SYMLINKS)`; `None` on any failure.
fn open_without_links(path: &CString) -> Option<OwnedFd> {
    // SAFETY: open_how is plain data; all-zero is its empty value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: a plain syscall on a NUL-terminated path and a struct of the size given; a
    // result >= 0 is a descriptor ours to own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_opened_with_the_name_getcwd_gives() {
        let base = std::env::temp_dir().join(format!("aw-workdir-{}", std::process::id()));
        let real = base.join("real/dir");
        std::fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        std::fs::write(base.join("file"), b"").unwrap();
        let real = real.canonicalize().unwrap();
        let resolved = |p: &Path| WorkDir::open(p).unwrap().resolved.unwrap();
        // Plain and free of links: its own name, opened without a read through /proc.
        let c = |p: &Path| cstring(p.as_os_str().as_bytes()).unwrap();
        assert!(open_without_links(&c(&real)).is_some());
        assert!(open_without_links(&c(&base.join("link/dir"))).is_none());
        assert_eq!(resolved(&real), real);
        assert_eq!(resolved(Path::new("/")), Path::new("/"));
        // Through a link, with `..`, `.`, doubled or trailing slashes: the name with all of
        // that resolved.
        for p in [
            "link/dir",
            "real/dir/../dir",
            "real/./dir",
            "real//dir",
            "real/dir/",
        ] {
            let p = format!("{}/{p}", base.canonicalize().unwrap().display());
            assert_eq!(resolved(Path::new(&p)), real, "{p}");
        }
        // Not a directory, or not there: the error of the open.
        let err = |p: &Path| WorkDir::open(p).err().unwrap().raw_os_error();
        assert_eq!(err(&base.join("file")), Some(libc::ENOTDIR));
        assert_eq!(err(&base.join("link/missing")), Some(libc::ENOENT));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn plain_absolute_paths() {
        for p in ["/", "/a", "/a/b.c", "/a/..b"] {
            assert!(plain_absolute(p.as_bytes()), "{p}");
        }
        for p in ["", "a", "/a/", "//a", "/a//b", "/./a", "/a/..", "/a/../b"] {
            assert!(!plain_absolute(p.as_bytes()), "{p}");
        }
    }
}
