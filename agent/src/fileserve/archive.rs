//! `Download` and `Upload`: a directory (or a file) as a tar stream, out and in.
//!
//! A download names its entries relative to the path: a directory's are its contents (`a.rs`,
//! `sub/`, `sub/b.rs`), a file is one entry under its own name; an upload of that stream into
//! the same path gives the same tree. Files, directories and symbolic links travel; FIFOs,
//! sockets and devices are left out of a download and refused in an upload.
//!
//! An upload never writes outside its directory, whatever the archive says: names are
//! relative, without `..`; every directory on the way is opened below the one before
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so no link (one the archive made a
//! moment before included) is ever followed; a hard link must name a file inside; each file is
//! written to a temporary name and renamed into place.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::content::{temp_name, verdict, what};
use super::io::{PipeReader, PipeWriter};
use super::tree::make_parents;
use super::{Failure, Result, checked, refuse, send};
use crate::files::{FileErrorKind, FileReply, FileRequest, flag};

/// Directories below one another a walk follows at most (each level is a frame of a thread's
/// stack; `PATH_MAX` alone would allow some 2000).
pub(crate) const MAX_NESTING: usize = 256;

/// `Download`: ready, then the tar stream into the pipe.
pub fn download(conn: &mut UnixStream, req: &FileRequest, out: OwnedFd) -> bool {
    let path = match checked(&req.path) {
        Ok(p) => p,
        Err(f) => return refuse(conn, f),
    };
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
    };
    if !m.is_dir() && !m.is_file() {
        return refuse(
            conn,
            Failure::new(
                FileErrorKind::NotRegular,
                &req.path,
                format!("is {}, not a file or a directory", what(&m)),
            ),
        );
    }
    let out = match PipeWriter::new(out) {
        Ok(o) => o,
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
    };
    if !send(conn, &FileReply::done()) {
        return false;
    }
    let mut tar = tar::Builder::new(out);
    let written = if m.is_dir() {
        add_tree(&mut tar, path, b"")
    } else {
        let name = path.file_name().map(|n| n.as_bytes()).unwrap_or(b"file");
        add_one(&mut tar, path, name)
    };
    // A reader that left, or a stall: the stream ends unfinished, and the reader knows it
    // from the missing end of the archive.
    if written.is_ok() {
        let _ = tar.finish();
    }
    false
}

fn header_of(m: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(m.mode() & 0o7777);
    h.set_uid(u64::from(m.uid()));
    h.set_gid(u64::from(m.gid()));
    h.set_mtime(m.mtime().max(0) as u64);
    h.set_size(0);
    h
}

/// Adds the entry at `path` under `name`: a file, a directory (without its contents) or a
/// link; anything else is left out.
fn add_one(tar: &mut tar::Builder<PipeWriter>, path: &Path, name: &[u8]) -> std::io::Result<()> {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(()); // gone meanwhile
    };
    let name = Path::new(std::ffi::OsStr::from_bytes(name));
    let t = m.file_type();
    if t.is_dir() {
        // A directory's name ends with '/', as tar writes it.
        let mut h = header_of(&m, tar::EntryType::Directory);
        let mut dir = name.as_os_str().to_owned();
        dir.push("/");
        tar.append_data(&mut h, dir, std::io::empty())
    } else if t.is_symlink() {
        let Ok(target) = std::fs::read_link(path) else {
            return Ok(()); // gone meanwhile: left out
        };
        let mut h = header_of(&m, tar::EntryType::Symlink);
        tar.append_link(&mut h, name, target)
    } else if t.is_file() {
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
        else {
            return Ok(()); // unreadable, or gone: left out
        };
        let Ok(m) = file.metadata() else {
            return Ok(());
        };
        if !m.is_file() {
            return Ok(());
        }
        let mut h = header_of(&m, tar::EntryType::Regular);
        h.set_size(m.size());
        // A file that shrinks meanwhile is padded to the size its header says, one that
        // grows is cut: the archive stays well-formed.
        let data = (&file)
            .take(m.size())
            .chain(std::io::repeat(0))
            .take(m.size());
        tar.append_data(&mut h, name, data)
    } else {
        Ok(())
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Adds the contents of the directory `dir` (named `prefix` in the archive), sorted, never
/// through a link.
fn add_tree(tar: &mut tar::Builder<PipeWriter>, dir: &Path, prefix: &[u8]) -> std::io::Result<()> {
    // Recursion is bounded: a deeper tree ends the archive unfinished (its reader sees it).
    if prefix.iter().filter(|b| **b == b'/').count() >= MAX_NESTING {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("deeper than {MAX_NESTING} directories"),
        ));
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut names: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
    names.sort();
    for n in names {
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(n.as_bytes());
        let full = dir.join(&n);
        add_one(tar, &full, &rel)?;
        if std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
            add_tree(tar, &full, &rel)?;
        }
    }
    Ok(())
}

/// Writes `path` (a directory's contents, or a file as one entry) as a tar stream into `out`,
/// as `Download` does: for a client packing its own files (`workspacectl cp`).
pub fn pack(path: &Path, out: OwnedFd) -> std::io::Result<()> {
    let m = std::fs::metadata(path)?;
    let mut tar = tar::Builder::new(PipeWriter::new(out)?);
    if m.is_dir() {
        add_tree(&mut tar, path, b"")?;
    } else {
        let name = path.file_name().map(|n| n.as_bytes()).unwrap_or(b"file");
        add_one(&mut tar, path, name)?;
    }
    tar.finish()
}

/// Unpacks the tar stream `input` (a pipe) into the directory `dir`, made where missing, with
/// the checks of `Upload`: nothing is written outside it, whatever the archive says. For a
/// client unpacking what a workspace sent (`workspacectl cp`): the archive is not trusted.
pub fn unpack(dir: &Path, input: OwnedFd) -> std::result::Result<(), String> {
    let mut req = FileRequest::new(
        crate::files::FileOp::Upload,
        dir.as_os_str().as_bytes().to_vec(),
    );
    req.flags = flag::PARENTS;
    let message = |f: Failure| match f.0 {
        FileReply::Failed { message, .. } => message,
        other => format!("{other:?}"),
    };
    let dest = open_dest(&req).map_err(message)?;
    let input = PipeReader::new(input).map_err(|e| e.to_string())?;
    // What a workspace sends makes no set-user-ID or set-group-ID file on the caller's machine.
    extract(&dest, &req, input, 0o6000).map_err(message)
}

/// `Upload`: the directory made if missing (with `PARENTS`), ready, then each entry of the tar
/// stream written below it; the first entry that would leave it (or is not a file, a directory
/// or a link) ends the upload, named in the answer.
pub fn upload(conn: &mut UnixStream, req: &FileRequest, input: OwnedFd) -> bool {
    let dest = match open_dest(req) {
        Ok(d) => d,
        Err(f) => return refuse(conn, f),
    };
    let input = match PipeReader::new(input) {
        Ok(i) => i,
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
    };
    if !send(conn, &FileReply::done()) {
        return false;
    }
    let result = extract(&dest, req, input, 0);
    let whole = verdict(conn);
    let answer = match result {
        Err(f) => f.0,
        Ok(()) if !whole => {
            Failure::new(
                FileErrorKind::Incomplete,
                &req.path,
                "the archive did not come whole; the entries before its end were written",
            )
            .0
        }
        Ok(()) => FileReply::done(),
    };
    send(conn, &answer);
    false
}

fn open_dest(req: &FileRequest) -> Result<OwnedFd> {
    let path = checked(&req.path)?;
    if req.has(flag::PARENTS) {
        make_parents(path, 0o755)?;
    }
    let m = std::fs::metadata(path).map_err(|e| Failure::io(&req.path, &e))?;
    if !m.is_dir() {
        return Err(Failure::new(
            FileErrorKind::NotADirectory,
            &req.path,
            "not a directory",
        ));
    }
    let c = super::cstr(path).map_err(|e| Failure::io(&req.path, &e))?;
    // SAFETY: a NUL-terminated path; the descriptor is ours.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Failure::io(&req.path, &std::io::Error::last_os_error()));
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A relative archive name as its components: no absolute name, no `..`; `.` and empty ones
/// dropped.
fn components(name: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if name.first() == Some(&b'/') {
        return Err("its name is absolute");
    }
    let mut out = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("its name climbs out with '..'"),
            c if c.contains(&0) => return Err("its name holds a NUL byte"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn cstring(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

/// Opens the directory `name` below `dir`, never through a link nor out of `dir`.
fn open_beneath(dir: &OwnedFd, name: &[u8]) -> std::io::Result<OwnedFd> {
    let c = cstring(name)?;
    // SAFETY: a plain struct of integers, zero is valid for each.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a NUL-terminated name and a struct of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        // A link where a directory is expected says so (ELOOP), whatever the kernel said.
        if e.raw_os_error() == Some(libc::ENOTDIR) {
            // SAFETY: fstatat without following, into a local.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe {
                libc::fstatat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            } == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFLNK
            {
                return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
            }
        }
        return Err(e);
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The directory that holds the entry `parts` (all but the last, made where missing, mode
/// 0755), opened below `dest`.
fn parent_of(dest: &OwnedFd, parts: &[&[u8]]) -> std::io::Result<OwnedFd> {
    let mut dir = dest.try_clone()?;
    for p in &parts[..parts.len() - 1] {
        dir = match open_beneath(&dir, p) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let c = cstring(p)?;
                // SAFETY: mkdirat below a directory we hold.
                if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                open_beneath(&dir, p)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(dir)
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Renames `temp` over `name` in `dir`.
fn put_in_place(dir: &OwnedFd, temp: &CString, name: &CString) -> std::io::Result<()> {
    // SAFETY: renameat within a directory we hold.
    let r = unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            temp.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: unlinkat of our own temporary name.
        unsafe { libc::unlinkat(dir.as_raw_fd(), temp.as_ptr(), 0) };
        return Err(e);
    }
    Ok(())
}

/// A reader that remembers whether it reached its end: an archive that ends without its end
/// blocks (cut between two entries) reaches it; a whole one stops reading before.
struct Ends<R> {
    inner: R,
    ended: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Ends<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended.set(true);
        }
        Ok(n)
    }
}

/// Unpacks below `dest`; `strip` are mode bits no file made gets.
fn extract(dest: &OwnedFd, req: &FileRequest, input: PipeReader, strip: u32) -> Result<()> {
    let ended = std::rc::Rc::new(std::cell::Cell::new(false));
    let mut archive = tar::Archive::new(Ends {
        inner: input,
        ended: ended.clone(),
    });
    let entries = archive.entries().map_err(|e| Failure::io(&req.path, &e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_stream(req, &e))?;
        let name = entry.path_bytes().into_owned();
        let refused = |why: &str| {
            Failure::new(
                FileErrorKind::ArchiveRefused,
                &name,
                format!(
                    "archive entry '{}' refused: {why}",
                    String::from_utf8_lossy(&name)
                ),
            )
        };
        let parts = components(&name).map_err(&refused)?;
        let kind = entry.header().entry_type();
        if parts.is_empty() {
            // The directory itself ("./").
            if kind.is_dir() {
                continue;
            }
            return Err(refused("it has no name"));
        }
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let at = |e: std::io::Error| match e.raw_os_error() {
            Some(libc::ELOOP | libc::EXDEV) => refused("a directory on its way is a symbolic link"),
            _ => Failure::new(
                FileErrorKind::of_errno(e.raw_os_error().unwrap_or(0)),
                &name,
                format!(
                    "cannot write archive entry '{}': {e}",
                    String::from_utf8_lossy(&name)
                ),
            ),
        };
        let dir = parent_of(dest, &parts).map_err(at)?;
        let last = cstring(parts[parts.len() - 1]).map_err(at)?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777 & !strip;
        match kind {
            tar::EntryType::Directory => {
                // SAFETY: mkdirat below a directory we hold.
                let r = unsafe { libc::mkdirat(dir.as_raw_fd(), last.as_ptr(), mode) };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(at(e));
                    }
                    // What is there must be a directory itself, not a link to one.
                    open_beneath(&dir, parts[parts.len() - 1]).map_err(at)?;
                } else {
                    // SAFETY: fchmodat below a directory we hold (the umask took bits away).
                    unsafe { libc::fchmodat(dir.as_raw_fd(), last.as_ptr(), mode, 0) };
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let temp = cstring(temp_name().as_bytes()).map_err(at)?;
                // SAFETY: openat of a new name below a directory we hold.
                let fd = unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        temp.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if fd < 0 {
                    return Err(at(std::io::Error::last_os_error()));
                }
                // SAFETY: just opened.
                let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let size = entry.size();
                let written = std::io::copy(&mut entry, &mut file)
                    .and_then(|n| {
                        // The stream ended inside the entry (the reader gives no error for
                        // that): nothing of it goes in place.
                        if n != size {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                format!("the archive ended inside it ({n} of {size} bytes)"),
                            ));
                        }
                        use std::os::unix::fs::PermissionsExt;
                        file.set_permissions(std::fs::Permissions::from_mode(mode))
                    })
                    .and_then(|()| {
                        let mtime = entry.header().mtime().unwrap_or(0);
                        let t = std::time::Duration::from_secs(mtime);
                        match std::time::UNIX_EPOCH.checked_add(t) {
                            Some(t) => file.set_modified(t),
                            None => Ok(()), // beyond what a time holds: left as now
                        }
                    });
                if let Err(e) = written {
                    // SAFETY: unlinkat of our own temporary name.
                    unsafe { libc::unlinkat(dir.as_raw_fd(), temp.as_ptr(), 0) };
                    return Err(if e.raw_os_error().is_some() {
                        at(e)
                    } else {
                        bad_stream(req, &e)
                    });
                }
                put_in_place(&dir, &temp, &last).map_err(at)?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target =
                    cstring(&target).map_err(|_| refused("its link target holds a NUL byte"))?;
                let temp = cstring(temp_name().as_bytes()).map_err(at)?;
                // SAFETY: symlinkat of a new name below a directory we hold; its target is
                // never followed here.
                check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), temp.as_ptr()) })
                    .map_err(at)?;
                put_in_place(&dir, &temp, &last).map_err(at)?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let tparts = components(&target)
                    .map_err(|why| refused(&format!("its link target is refused: {why}")))?;
                if tparts.is_empty() {
                    return Err(refused("its link target has no name"));
                }
                let tdir = parent_of_existing(dest, &tparts).map_err(at)?;
                let tlast = cstring(tparts[tparts.len() - 1]).map_err(at)?;
                let temp = cstring(temp_name().as_bytes()).map_err(at)?;
                // SAFETY: linkat between directories we hold, not following a link at the
                // source.
                check(unsafe {
                    libc::linkat(
                        tdir.as_raw_fd(),
                        tlast.as_ptr(),
                        dir.as_raw_fd(),
                        temp.as_ptr(),
                        0,
                    )
                })
                .map_err(at)?;
                put_in_place(&dir, &temp, &last).map_err(at)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refused("it is a device node"));
            }
            tar::EntryType::Fifo => return Err(refused("it is a FIFO")),
            _ => return Err(refused("it is not a file, a directory or a link")),
        }
    }
    drop(archive);
    if ended.get() {
        return Err(Failure::new(
            FileErrorKind::Incomplete,
            &req.path,
            "the archive ended without its end: entries after the last one written are missing",
        ));
    }
    Ok(())
}

/// The directory that holds an existing entry, opened below `dest` (nothing made).
fn parent_of_existing(dest: &OwnedFd, parts: &[&[u8]]) -> std::io::Result<OwnedFd> {
    let mut dir = dest.try_clone()?;
    for p in &parts[..parts.len() - 1] {
        dir = open_beneath(&dir, p)?;
    }
    Ok(dir)
}

/// The stream itself is broken (not a tar archive, cut short, stalled).
fn bad_stream(req: &FileRequest, e: &std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return Failure::new(FileErrorKind::Incomplete, &req.path, e.to_string());
    }
    Failure::new(
        FileErrorKind::ArchiveRefused,
        &req.path,
        format!("not a readable tar archive: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_stay_below() {
        assert_eq!(
            components(b"a/./b//c").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(components(b"./").unwrap().is_empty());
        assert!(components(b"/etc/passwd").is_err());
        assert!(components(b"a/../../x").is_err());
        assert!(components(b"..").is_err());
    }
}
