//! File requests on the tree itself: an entry's metadata, listings, directories made,
//! removals and moves.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{DEFAULT_LIST, Failure, Result, checked, cstr, entry_of};
use crate::files::{
    Entry, FileErrorKind, FileReply, FileRequest, MAX_DEPTH, MAX_FILE_REPLY, MAX_LIST, flag,
};

/// The entry of `path` itself (a link as a link, with its target).
pub(super) fn stat(req: &FileRequest) -> Result<Entry> {
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

/// The entries below a directory, `depth` levels down, each directory's entries sorted by name
/// and following it; at most `limit` entries and `MAX_FILE_REPLY` bytes (`truncated` when
/// more were left).
pub(super) fn list(req: &FileRequest) -> Result<FileReply> {
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
pub(super) fn make_directory(req: &FileRequest) -> Result<()> {
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

/// `mkdir -p`: each missing directory made with `mode`; a failure names the directory.
pub(crate) fn make_parents(path: &Path, mode: u32) -> Result<()> {
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
pub(super) fn remove(req: &FileRequest) -> Result<()> {
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
pub(super) fn move_(req: &FileRequest) -> Result<()> {
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
            copy_tree(from, to, 0).map_err(|e| Failure::io(&req.target, &e))?;
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
fn copy_tree(from: &Path, to: &Path, nesting: usize) -> std::io::Result<()> {
    if nesting > super::archive::MAX_NESTING {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("deeper than {} directories", super::archive::MAX_NESTING),
        ));
    }
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
            copy_tree(&e.path(), &to.join(e.file_name()), nesting + 1)?;
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
