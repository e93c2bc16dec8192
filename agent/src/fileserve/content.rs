//! File requests on a file's content: `Read` (into a pipe) and `Write` (from one, whole or
//! not at all).

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::io::{self, PipeReader, PipeWriter};
use super::tree::make_parents;
use super::{Failure, Result, checked, cstr, entry_of, one, refuse, send};
use crate::files::{COMMIT, Entry, FileErrorKind, FileReply, FileRequest, flag};

/// Opens an existing regular file for reading, following links; never opens anything else (a
/// FIFO would block, a device could act on the open).
fn open_regular(p: &[u8]) -> Result<std::fs::File> {
    let path = checked(p)?;
    let c = cstr(path).map_err(|e| Failure::io(p, &e))?;
    // SAFETY: a NUL-terminated path; the descriptor is ours.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Failure::io(p, &std::io::Error::last_os_error()));
    }
    // SAFETY: just opened.
    let opath = unsafe { OwnedFd::from_raw_fd(fd) };
    let m = std::fs::File::from(opath.try_clone().map_err(|e| Failure::io(p, &e))?)
        .metadata()
        .map_err(|e| Failure::io(p, &e))?;
    regular(p, &m)?;
    // Reopened through the descriptor: the file checked, not whatever is at the path now.
    let reopened = std::fs::File::open(format!("/proc/self/fd/{}", opath.as_raw_fd()));
    let file = match reopened {
        Ok(f) => f,
        // No /proc: opened by its path again, without blocking, and checked again.
        Err(_) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(path)
                .map_err(|e| Failure::io(p, &e))?;
            regular(p, &f.metadata().map_err(|e| Failure::io(p, &e))?)?;
            f
        }
    };
    Ok(file)
}

/// A regular file; else the failure that says what it is.
fn regular(p: &[u8], m: &std::fs::Metadata) -> Result<()> {
    if m.is_file() {
        Ok(())
    } else if m.is_dir() {
        Err(Failure::new(
            FileErrorKind::IsADirectory,
            p,
            "is a directory",
        ))
    } else {
        Err(Failure::new(
            FileErrorKind::NotRegular,
            p,
            format!("is {}, not a regular file", what(m)),
        ))
    }
}

pub(crate) fn what(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// `Read`: the file's entry, then its content from `offset`, `length` bytes at most, into
/// the pipe.
pub(super) fn read(conn: &mut UnixStream, req: &FileRequest, out: OwnedFd) -> bool {
    let file = match open_regular(&req.path) {
        Ok(f) => f,
        Err(f) => return refuse(conn, f),
    };
    let entry = match file.metadata() {
        Ok(m) => entry_of(&req.path, &m, Vec::new()),
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
    };
    let out = match PipeWriter::new(out) {
        Ok(o) => o,
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
    };
    if !send(conn, &one(entry)) {
        return false;
    }
    // The reader may stop early (it closed its end): the copy ends there.
    let _ = io::file_to_pipe(&file, &out, req.offset, req.length);
    false
}

/// A name for a temporary file beside the target, unique among this process's.
pub(crate) fn temp_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut r = [0u8; 8];
    // SAFETY: getrandom into a local buffer; its failure leaves zeros, and the counter and
    // PID keep the name unique all the same.
    unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), libc::GRND_NONBLOCK) };
    format!(
        ".aw-{}-{}-{:016x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        u64::from_le_bytes(r)
    )
}

/// The verdict byte after the content (`COMMIT` or anything else), read without end only as
/// long as the connection's read timeout.
pub(crate) fn verdict(conn: &mut UnixStream) -> bool {
    // The service sends it once its relay has ended, which a stalled caller delays by up to
    // `STALL` after this side stopped reading (a failed write, a refused entry).
    let _ = conn.set_read_timeout(Some(io::STALL + std::time::Duration::from_secs(10)));
    let mut b = [0u8; 1];
    matches!(conn.read(&mut b), Ok(1)) && b[0] == COMMIT
}

/// `Write`: ready, then the content from the pipe into a temporary file beside the target, put
/// in place (renamed over the old one) only when the service says it came whole. `APPEND`
/// writes at the file's end instead, and cuts back what it added when it did not.
pub(super) fn write(conn: &mut UnixStream, req: &FileRequest, input: OwnedFd) -> bool {
    let target = match prepare_write(req) {
        Ok(t) => t,
        Err(f) => return refuse(conn, f),
    };
    let input = match PipeReader::new(input) {
        Ok(i) => i,
        Err(e) => {
            target.abandon();
            return refuse(conn, Failure::io(&req.path, &e));
        }
    };
    if !send(conn, &FileReply::done()) {
        target.abandon();
        return false;
    }
    let copied = io::pipe_to_file(&input, &target.file);
    drop(input);
    let whole = verdict(conn);
    let answer = match copied {
        Err(e) => {
            target.abandon();
            Failure::io(&req.path, &e).0
        }
        Ok(n) if !whole || (req.has(flag::SIZED) && n != req.length) => {
            target.abandon();
            let said = if req.has(flag::SIZED) {
                format!(" ({n} of {} bytes)", req.length)
            } else {
                String::new()
            };
            Failure::new(
                FileErrorKind::Incomplete,
                &req.path,
                format!("the content did not come whole{said}; nothing was written"),
            )
            .0
        }
        Ok(_) => match target.commit(req) {
            Ok(e) => one(e),
            Err(f) => f.0,
        },
    };
    send(conn, &answer);
    false
}

/// Where a write goes: a temporary file beside the target (or the target itself, to append).
struct WriteTarget {
    file: std::fs::File,
    dir: PathBuf,
    name: Vec<u8>,
    /// The temporary file's name; `None` when appending to the target.
    temp: Option<String>,
    /// Appending: the size it had, cut back to when the content did not come whole.
    size_before: u64,
    /// The replaced file's mode and owner, kept.
    old: Option<std::fs::Metadata>,
}

fn prepare_write(req: &FileRequest) -> Result<WriteTarget> {
    let mut path = checked(&req.path)?.to_path_buf();
    // A link at the path is written through (as `>` does), when it leads somewhere.
    if let Ok(m) = std::fs::symlink_metadata(&path)
        && m.file_type().is_symlink()
        && let Ok(real) = std::fs::canonicalize(&path)
    {
        path = real;
    }
    let p = path.as_os_str().as_bytes().to_vec();
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Failure::new(
            FileErrorKind::IsADirectory,
            &p,
            "is a directory",
        ));
    };
    if req.path.ends_with(b"/") {
        return Err(Failure::new(
            FileErrorKind::IsADirectory,
            &p,
            "names a directory",
        ));
    }
    if req.has(flag::PARENTS) {
        make_parents(dir, 0o755)?;
    }
    let old = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {
            return Err(Failure::new(
                FileErrorKind::IsADirectory,
                &p,
                "is a directory",
            ));
        }
        Ok(_) if req.has(flag::EXCLUSIVE) => {
            return Err(Failure::new(FileErrorKind::Exists, &p, "exists"));
        }
        Ok(m) if m.is_file() => Some(m),
        // A dangling link is replaced; anything else that is not a file is refused.
        Ok(m) if m.file_type().is_symlink() => None,
        Ok(m) => {
            return Err(Failure::new(
                FileErrorKind::NotRegular,
                &p,
                format!("is {}, not a regular file", what(&m)),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Failure::io(&p, &e)),
    };
    let dir_meta =
        std::fs::metadata(dir).map_err(|e| Failure::io(dir.as_os_str().as_bytes(), &e))?;
    if !dir_meta.is_dir() {
        return Err(Failure::new(
            FileErrorKind::NotADirectory,
            dir.as_os_str().as_bytes(),
            "not a directory",
        ));
    }
    if req.has(flag::APPEND) {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(if req.mode == 0 {
                0o644
            } else {
                req.mode & 0o7777
            })
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Failure::io(&p, &e))?;
        let m = file.metadata().map_err(|e| Failure::io(&p, &e))?;
        regular(&p, &m)?;
        return Ok(WriteTarget {
            file,
            dir: dir.to_path_buf(),
            name: name.as_bytes().to_vec(),
            temp: None,
            size_before: m.len(),
            old: None,
        });
    }
    let temp = temp_name();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(&temp))
        .map_err(|e| Failure::io(&p, &e))?;
    Ok(WriteTarget {
        file,
        dir: dir.to_path_buf(),
        name: name.as_bytes().to_vec(),
        temp: Some(temp),
        size_before: 0,
        old,
    })
}

impl WriteTarget {
    fn path(&self) -> PathBuf {
        self.dir.join(OsStr::from_bytes(&self.name))
    }

    /// Leaves nothing of the write: the temporary file removed, or an append cut back.
    fn abandon(self) {
        match &self.temp {
            Some(t) => drop(std::fs::remove_file(self.dir.join(t))),
            None => drop(self.file.set_len(self.size_before)),
        }
    }

    /// Puts the written file in place with its mode (and the replaced file's owner); its entry.
    fn commit(self, req: &FileRequest) -> Result<Entry> {
        let p = self.path();
        let pb = p.as_os_str().as_bytes().to_vec();
        let Some(temp) = &self.temp else {
            let m = self.file.metadata().map_err(|e| Failure::io(&pb, &e))?;
            return Ok(entry_of(&req.path, &m, Vec::new()));
        };
        let fail = |e: std::io::Error| {
            let _ = std::fs::remove_file(self.dir.join(temp));
            Failure::io(&pb, &e)
        };
        let mode = match (req.mode, &self.old) {
            (0, Some(old)) => old.mode() & 0o7777,
            (0, None) => 0o644,
            (m, _) => m & 0o7777,
        };
        // The replaced file's owner stays, unless the request named one (it made this file).
        if let Some(old) = &self.old
            && req.user.is_empty()
            && req.group.is_empty()
        {
            let _ = std::os::unix::fs::fchown(&self.file, Some(old.uid()), Some(old.gid()));
        }
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        let m = self.file.metadata().map_err(fail)?;
        let flags = if req.has(flag::EXCLUSIVE) {
            libc::RENAME_NOREPLACE
        } else {
            0
        };
        let from = cstr(&self.dir.join(temp)).map_err(fail)?;
        let to = cstr(&p).map_err(fail)?;
        // SAFETY: two NUL-terminated paths.
        if unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                flags,
            )
        } != 0
        {
            return Err(fail(std::io::Error::last_os_error()));
        }
        Ok(entry_of(&req.path, &m, Vec::new()))
    }
}
