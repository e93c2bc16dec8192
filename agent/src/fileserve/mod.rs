//! File requests served (`files` is the protocol): by the agent inside a container, in its own
//! view of the tree and as the container's root (or the user a request names), and by the
//! service for a host workspace, in a thread of its own connected to it as an agent would be.
//!
//! Every operation is on the server's own view: in a container, links resolve inside it and
//! ownership and permissions are the container's; nothing here is trusted to the service's
//! credentials. Writes are made to a temporary name beside the file and renamed into place, so
//! a reader sees the old file or the new one, and a failed write leaves the old one.

mod archive;
mod ids;
pub mod io;
mod watch;

use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::files::{
    COMMIT, Entry, EntryType, FileErrorKind, FileOp, FileReply, FileRequest, MAX_DEPTH,
    MAX_FILE_REPLY, MAX_LIST, MAX_PATH, flag,
};
use io::{PipeReader, PipeWriter};

/// Entries of a listing when the request gives no `limit`.
pub const DEFAULT_LIST: u32 = 10_000;
/// Directories a watch follows when the request gives no `limit`.
pub const DEFAULT_WATCHED: u32 = 1024;

/// A failure to answer with: its kind, the path it is about, and the words.
#[derive(Debug)]
pub(crate) struct Failure(FileReply);

impl Failure {
    fn new(kind: FileErrorKind, path: &[u8], message: impl Into<String>) -> Self {
        Self(FileReply::failed(kind, path, message))
    }

    fn io(path: &[u8], e: &std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(n) => FileErrorKind::of_errno(n),
            None if e.kind() == std::io::ErrorKind::TimedOut => FileErrorKind::Incomplete,
            None => FileErrorKind::Other,
        };
        Self::new(kind, path, e.to_string())
    }
}

type Result<T, E = Failure> = std::result::Result<T, E>;

fn send(conn: &mut UnixStream, reply: &FileReply) -> bool {
    conn.write_all(&reply.encode()).is_ok()
}

/// Answers with the failure; the connection serves no other request.
fn refuse(conn: &mut UnixStream, f: Failure) -> bool {
    send(conn, &f.0);
    false
}

/// Serves one file request on `conn`, with the descriptor that came with it; true when the
/// connection may serve another request.
pub fn serve(conn: &mut UnixStream, req: FileRequest, mut fds: Vec<OwnedFd>) -> bool {
    let wanted = usize::from(req.op.streams_in() || req.op.streams_out());
    if fds.len() != wanted {
        let f = Failure::new(
            FileErrorKind::Invalid,
            &req.path,
            format!("expected {wanted} descriptors with the request"),
        );
        send(conn, &f.0);
        return false;
    }
    let fd = fds.pop();
    // Permissions are checked as the user asked for, and what is made is theirs: this
    // thread's file system ids (and groups) are theirs until the request is served.
    let identity = match ids::Identity::resolve(&req.user, &req.group) {
        Ok(i) => i,
        Err(f) => {
            send(conn, &f.0);
            return false;
        }
    };
    let _as = match identity.assume() {
        Ok(guard) => guard,
        Err(e) => {
            send(conn, &Failure::io(&req.path, &e).0);
            return false;
        }
    };
    let answer = match (req.op, fd) {
        (FileOp::Stat, None) => stat(&req).map(one),
        (FileOp::List, None) => list(&req),
        (FileOp::MakeDirectory, None) => make_directory(&req).map(|()| FileReply::done()),
        (FileOp::Remove, None) => remove(&req).map(|()| FileReply::done()),
        (FileOp::Move, None) => move_(&req).map(|()| FileReply::done()),
        (FileOp::Read, Some(out)) => return read(conn, &req, out),
        (FileOp::Download, Some(out)) => return archive::download(conn, &req, out),
        (FileOp::Watch, Some(out)) => return watch::watch(conn, &req, out),
        (FileOp::Write, Some(input)) => return write(conn, &req, input),
        (FileOp::Upload, Some(input)) => return archive::upload(conn, &req, input),
        _ => unreachable!("descriptors checked above"),
    };
    send(conn, &answer.unwrap_or_else(|f| f.0))
}

fn one(e: Entry) -> FileReply {
    FileReply::Done {
        entries: vec![e],
        truncated: false,
    }
}

pub(crate) fn path_of(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// The request's path: absolute, no NUL, within `MAX_PATH`.
fn checked(p: &[u8]) -> Result<&Path> {
    if p.first() != Some(&b'/') {
        return Err(Failure::new(
            FileErrorKind::Invalid,
            p,
            "the path must be absolute",
        ));
    }
    if p.contains(&0) || p.len() > MAX_PATH {
        return Err(Failure::new(
            FileErrorKind::Invalid,
            p,
            "the path holds a NUL byte or is too long",
        ));
    }
    Ok(path_of(p))
}

pub(crate) fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

pub(crate) fn entry_of(name: &[u8], m: &std::fs::Metadata, target: Vec<u8>) -> Entry {
    Entry {
        name: name.to_vec(),
        kind: EntryType::of_mode(m.mode()),
        size: m.size(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_usec: m.mtime() * 1_000_000 + m.mtime_nsec() / 1000,
        target,
    }
}

/// The entry of `path` itself (a link as a link, with its target).
fn stat(req: &FileRequest) -> Result<Entry> {
    let path = checked(&req.path)?;
    let m = std::fs::symlink_metadata(path).map_err(|e| Failure::io(&req.path, &e))?;
    let target = if m.file_type().is_symlink() {
        std::fs::read_link(path)
            .map(|t| t.into_os_string().into_vec())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(entry_of(&req.path, &m, target))
}

use std::os::unix::ffi::OsStringExt;

/// The entries below a directory, `depth` levels down, each directory's entries sorted by name
/// and following it; at most `limit` entries and `MAX_FILE_REPLY` bytes (`truncated` when
/// more were left).
fn list(req: &FileRequest) -> Result<FileReply> {
    let path = checked(&req.path)?;
    let m = std::fs::metadata(path).map_err(|e| Failure::io(&req.path, &e))?;
    if !m.is_dir() {
        return Err(Failure::new(
            FileErrorKind::NotADirectory,
            &req.path,
            "not a directory",
        ));
    }
    let limit = match req.limit {
        0 => DEFAULT_LIST,
        n => n.min(MAX_LIST),
    } as usize;
    let depth = req.depth.clamp(1, MAX_DEPTH);
    let mut out = Listing {
        entries: Vec::new(),
        bytes: 64,
        limit,
        truncated: false,
    };
    walk(path, &[], depth, &mut out).map_err(|e| Failure::io(&req.path, &e))?;
    Ok(FileReply::Done {
        entries: out.entries,
        truncated: out.truncated,
    })
}

struct Listing {
    entries: Vec<Entry>,
    bytes: usize,
    limit: usize,
    truncated: bool,
}

/// Lists `dir` (whose name relative to the listed directory is `prefix`), recursing into
/// directories (never through a link) while `depth` allows.
fn walk(dir: &Path, prefix: &[u8], depth: u32, out: &mut Listing) -> std::io::Result<()> {
    let mut names: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
        // Below the top, an unreadable directory is listed without its entries.
        Err(_) if !prefix.is_empty() => return Ok(()),
        Err(e) => return Err(e),
    };
    names.sort();
    for name in names {
        if out.truncated {
            return Ok(());
        }
        let full = dir.join(&name);
        let Ok(m) = std::fs::symlink_metadata(&full) else {
            continue; // gone meanwhile
        };
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let target = if m.file_type().is_symlink() {
            std::fs::read_link(&full)
                .map(|t| t.into_os_string().into_vec())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let e = entry_of(&rel, &m, target);
        if out.entries.len() >= out.limit || out.bytes + e.encoded_len() > MAX_FILE_REPLY - 64 {
            out.truncated = true;
            return Ok(());
        }
        out.bytes += e.encoded_len();
        out.entries.push(e);
        if m.is_dir() && depth > 1 {
            walk(&full, &rel, depth - 1, out)?;
        }
    }
    Ok(())
}

/// Makes the directory (and, with `PARENTS`, the missing ones above it; then one that exists
/// is no error).
fn make_directory(req: &FileRequest) -> Result<()> {
    let path = checked(&req.path)?;
    let mode = if req.mode == 0 {
        0o755
    } else {
        req.mode & 0o7777
    };
    if req.has(flag::PARENTS) {
        make_parents(path, mode)
    } else {
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .map_err(|e| Failure::io(&req.path, &e))?;
        set_mode(path, mode)
    }
}

use std::os::unix::fs::DirBuilderExt;

/// `mkdir -p`: each missing directory made with `mode`; a failure names the directory.
fn make_parents(path: &Path, mode: u32) -> Result<()> {
    let mut at = PathBuf::from("/");
    for c in path.components().skip(1) {
        at.push(c);
        match std::fs::DirBuilder::new().mode(mode).create(&at) {
            Ok(()) => set_mode(&at, mode)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !at.is_dir() {
                    return Err(Failure::new(
                        FileErrorKind::NotADirectory,
                        at.as_os_str().as_bytes(),
                        "exists and is not a directory",
                    ));
                }
            }
            Err(e) => return Err(Failure::io(at.as_os_str().as_bytes(), &e)),
        }
    }
    Ok(())
}

/// The mode asked for, whatever the umask took away.
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Failure::io(path.as_os_str().as_bytes(), &e))
}

/// Removes a file, a link, an empty directory, or with `RECURSIVE` a directory and all in it
/// (never following a link).
fn remove(req: &FileRequest) -> Result<()> {
    let path = checked(&req.path)?;
    if path.parent().is_none() {
        return Err(Failure::new(
            FileErrorKind::Invalid,
            &req.path,
            "the root directory is not removed",
        ));
    }
    let m = std::fs::symlink_metadata(path).map_err(|e| Failure::io(&req.path, &e))?;
    let r = if !m.is_dir() {
        std::fs::remove_file(path)
    } else if req.has(flag::RECURSIVE) {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_dir(path)
    };
    r.map_err(|e| Failure::io(&req.path, &e))
}

/// Renames `path` to `target`; over what is there only with `REPLACE`. Across file systems
/// (or an overlay's lower layer), copied and then removed, as `mv` does.
fn move_(req: &FileRequest) -> Result<()> {
    let from = checked(&req.path)?;
    let to = checked(&req.target)?;
    let (cf, ct) = (
        cstr(from).map_err(|e| Failure::io(&req.path, &e))?,
        cstr(to).map_err(|e| Failure::io(&req.target, &e))?,
    );
    if req.has(flag::PARENTS)
        && let Some(parent) = to.parent()
    {
        make_parents(parent, 0o755)?;
    }
    let flags = if req.has(flag::REPLACE) {
        0
    } else {
        libc::RENAME_NOREPLACE
    };
    // SAFETY: two NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EXDEV) => {
            if !req.has(flag::REPLACE) && std::fs::symlink_metadata(to).is_ok() {
                return Err(Failure::new(FileErrorKind::Exists, &req.target, "exists"));
            }
            copy_tree(from, to).map_err(|e| Failure::io(&req.target, &e))?;
            let m = std::fs::symlink_metadata(from).map_err(|e| Failure::io(&req.path, &e))?;
            if m.is_dir() {
                std::fs::remove_dir_all(from)
            } else {
                std::fs::remove_file(from)
            }
            .map_err(|e| Failure::io(&req.path, &e))
        }
        // The destination's side names the failure when it is what is in the way.
        Some(libc::EEXIST | libc::ENOTEMPTY | libc::EISDIR) => Err(Failure::io(&req.target, &e)),
        Some(libc::ENOENT) if std::fs::symlink_metadata(from).is_ok() => {
            Err(Failure::io(&req.target, &e))
        }
        _ => Err(Failure::io(&req.path, &e)),
    }
}

/// Copies a file, a link or a directory tree (never through a link) to `to`, with modes and
/// times; FIFOs, sockets and devices are refused.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let m = std::fs::symlink_metadata(from)?;
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(from)?;
        let _ = std::fs::remove_file(to);
        std::os::unix::fs::symlink(target, to)
    } else if ft.is_dir() {
        std::fs::DirBuilder::new()
            .mode(m.mode() & 0o7777)
            .create(to)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists && to.is_dir() {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        std::fs::set_permissions(to, m.permissions())
    } else if ft.is_file() {
        std::fs::copy(from, to).map(drop)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a file, a directory or a link", from.display()),
        ))
    }
}

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

use std::os::unix::fs::OpenOptionsExt;

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
fn read(conn: &mut UnixStream, req: &FileRequest, out: OwnedFd) -> bool {
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
fn verdict(conn: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(conn.read(&mut b), Ok(1)) && b[0] == COMMIT
}

/// `Write`: ready, then the content from the pipe into a temporary file beside the target, put
/// in place (renamed over the old one) only when the service says it came whole. `APPEND`
/// writes at the file's end instead, and cuts back what it added when it did not.
fn write(conn: &mut UnixStream, req: &FileRequest, input: OwnedFd) -> bool {
    let target = match prepare_write(req) {
        Ok(t) => t,
        Err(f) => return refuse(conn, f),
    };
    let input = match PipeReader::new(input) {
        Ok(i) => i,
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
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
