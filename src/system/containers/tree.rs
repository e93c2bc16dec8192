//! Confined access to a directory tree the service does not trust: a container's root, whose
//! contents code inside the container controls, or a workspace directory.
//!
//! Every path is resolved *inside* the tree: multi-component paths through pathrs (openat2 with
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`, or its safe emulation), so a link, absolute or
//! relative, resolves as it would inside a container and never leaves the tree; every change is
//! then made relative to a directory descriptor, one path element at a time, with `O_NOFOLLOW`,
//! `O_EXCL` and `renameat2`, so a link swapped in while the service works is replaced or
//! refused, never followed. File types are checked on the opened descriptor before anything is
//! read, and reads are bounded: a FIFO, a device node, a huge file or a link loop costs an
//! error, not a hang.
//!
//! What the service creates in a container's tree belongs to the container's root user: the
//! owner of the tree's root directory, rounded down to its 64K user-namespace range (0 for a
//! tree systemd-nspawn maps with an idmapped mount, the range's base for a tree it chowned).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use pathrs::flags::OpenFlags;
use pathrs::{InodeType, Root, RootRef};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, Stat};

/// The size of one user namespace range systemd-nspawn gives a container.
const RANGE: u32 = 0x1_0000;
/// Directories deeper than this are not descended by `disk_usage`.
const MAX_DEPTH: usize = 256;

/// Who owns what the service creates in a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A directory tree, opened once by its host path; everything below is reached through it.
pub struct Tree {
    root: Root,
    path: PathBuf,
    owner: Option<Owner>,
}

fn pathrs_io(e: pathrs::error::Error) -> io::Error {
    match e.kind() {
        pathrs::error::ErrorKind::OsError(Some(errno)) => io::Error::from_raw_os_error(errno),
        // An attack detected during resolution, or an unsupported request.
        _ => io::Error::other(e.to_string()),
    }
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// A single path element: no separators, not `.` or `..`, not empty.
fn check_name(name: &str) -> io::Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not a single path element"),
        ));
    }
    Ok(name)
}

/// The elements of a relative path inside a tree; `..` and absolute paths are refused here
/// (callers name paths they chose; links in the tree may still say anything).
fn elements(rel: &Path) -> io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} leaves the tree", rel.display()),
                ));
            }
        }
    }
    Ok(out)
}

fn temp_name(name: &str) -> String {
    format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple())
}

impl Tree {
    /// A tree whose new files belong to the service (a host workspace's directory).
    pub fn open(path: &Path) -> io::Result<Tree> {
        Ok(Tree {
            root: Root::open(path).map_err(pathrs_io)?,
            path: path.to_path_buf(),
            owner: None,
        })
    }

    /// A container's tree: new files belong to the container's root user.
    pub fn open_container(path: &Path) -> io::Result<Tree> {
        let mut tree = Self::open(path)?;
        let st = rfs::fstat(tree.root.as_fd())?;
        tree.owner = Some(Owner {
            uid: st.st_uid & !(RANGE - 1),
            gid: st.st_gid & !(RANGE - 1),
        });
        Ok(tree)
    }

    pub fn owner(&self) -> Option<Owner> {
        self.owner
    }

    /// The tree's path on the host, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `stat` of `rel`, following links inside the tree.
    pub fn stat(&self, rel: impl AsRef<Path>) -> io::Result<Stat> {
        let h = self.root.resolve(rel.as_ref()).map_err(pathrs_io)?;
        Ok(rfs::fstat(h.as_fd())?)
    }

    /// `stat` of `rel` itself (a link is not followed).
    pub fn stat_nofollow(&self, rel: impl AsRef<Path>) -> io::Result<Stat> {
        let h = self
            .root
            .resolve_nofollow(rel.as_ref())
            .map_err(pathrs_io)?;
        Ok(rfs::fstat(h.as_fd())?)
    }

    pub fn is_dir(&self, rel: impl AsRef<Path>) -> bool {
        self.stat(rel)
            .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory)
    }

    pub fn is_file(&self, rel: impl AsRef<Path>) -> bool {
        self.stat(rel)
            .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::RegularFile)
    }

    /// Modification time of `rel` itself (not of what a link points to).
    pub fn modified(&self, rel: impl AsRef<Path>) -> Option<SystemTime> {
        let st = self.stat_nofollow(rel).ok()?;
        let secs = u64::try_from(st.st_mtime).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::new(secs, st.st_mtime_nsec as u32))
    }

    /// At most `max` bytes of the regular file `rel` (links followed inside the tree). Anything
    /// but a regular file is an error (`InvalidData`): nothing is opened for reading that could
    /// block or never end.
    pub fn read(&self, rel: impl AsRef<Path>, max: usize) -> io::Result<Vec<u8>> {
        let h = self.root.resolve(rel.as_ref()).map_err(pathrs_io)?;
        let st = rfs::fstat(h.as_fd())?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        // The reopened descriptor is the same inode the type was checked on.
        let f = h
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_NOCTTY | OpenFlags::O_NDELAY)
            .map_err(pathrs_io)?;
        let mut out = Vec::with_capacity(max.min(64 * 1024));
        f.take(max as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    /// The directory `rel` (links followed inside the tree), created with its missing parents
    /// when `create` is set. What is created belongs to the tree's owner.
    pub fn dir(&self, rel: impl AsRef<Path>, create: bool) -> io::Result<TreeDir> {
        let rel = rel.as_ref();
        let mut prefix = PathBuf::new();
        let mut current = self.root_dir()?;
        for element in elements(rel)? {
            prefix.push(element);
            let handle = match self.root.resolve(&prefix) {
                Ok(h) => h,
                Err(e) if create && errno(&pathrs_io_ref(&e)) == Some(libc::ENOENT) => {
                    match self
                        .root
                        .create(&prefix, &InodeType::Directory(mode_perm(0o755)))
                    {
                        Ok(()) => {}
                        // Created meanwhile (by the container, or a concurrent call): use it.
                        Err(e) if errno(&pathrs_io_ref(&e)) == Some(libc::EEXIST) => {}
                        Err(e) => return Err(pathrs_io(e)),
                    }
                    let h = self.root.resolve(&prefix).map_err(pathrs_io)?;
                    // Whatever directory this resolves to is inside the tree, so giving it to
                    // the tree's owner cannot give away anything of the host's.
                    if let Some(o) = self.owner {
                        rfs::chownat(
                            h.as_fd(),
                            "",
                            Some(uid(o.uid)),
                            Some(gid(o.gid)),
                            AtFlags::EMPTY_PATH,
                        )?;
                    }
                    h
                }
                Err(e) => return Err(pathrs_io(e)),
            };
            let fd = OwnedFd::from(
                handle
                    .reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)
                    .map_err(pathrs_io)?,
            );
            current = TreeDir {
                fd,
                owner: self.owner,
            };
        }
        Ok(current)
    }

    fn root_dir(&self) -> io::Result<TreeDir> {
        let fd = rfs::openat(
            self.root.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(TreeDir {
            fd,
            owner: self.owner,
        })
    }

    /// Bytes on disk below `rel` (blocks, so sparse files count what they use), not following
    /// links and not descending deeper than 256 directories; `complete` is false when it
    /// stopped at `max_entries` entries or after `budget`.
    pub fn disk_usage(&self, rel: impl AsRef<Path>, budget: Duration, max_entries: u64) -> Usage {
        let mut usage = Usage {
            bytes: 0,
            entries: 0,
            complete: true,
        };
        let Ok(start) = self.dir(rel, false) else {
            return usage;
        };
        let deadline = Instant::now() + budget;
        walk(start.fd.as_fd(), 0, deadline, max_entries, &mut usage);
        usage
    }
}

fn pathrs_io_ref(e: &pathrs::error::Error) -> io::Error {
    match e.kind() {
        pathrs::error::ErrorKind::OsError(Some(errno)) => io::Error::from_raw_os_error(errno),
        _ => io::Error::other(e.to_string()),
    }
}

fn mode_perm(mode: u32) -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(mode)
}

fn uid(raw: u32) -> rfs::Uid {
    rfs::Uid::from_raw(raw)
}

fn gid(raw: u32) -> rfs::Gid {
    rfs::Gid::from_raw(raw)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub entries: u64,
    pub complete: bool,
}

fn walk(dir: BorrowedFd<'_>, depth: usize, deadline: Instant, max: u64, usage: &mut Usage) {
    let Ok(entries) = rfs::Dir::read_from(dir) else {
        return;
    };
    for entry in entries {
        if usage.entries >= max || Instant::now() >= deadline {
            usage.complete = false;
            return;
        }
        let Ok(entry) = entry else {
            continue;
        };
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        usage.entries += 1;
        let Ok(st) = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        usage.bytes += (st.st_blocks as u64).saturating_mul(512);
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if depth + 1 >= MAX_DEPTH {
                usage.complete = false;
                continue;
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            if let Ok(sub) = rfs::openat(dir, name, flags, Mode::empty()) {
                walk(sub.as_fd(), depth + 1, deadline, max, usage);
            }
        }
    }
}

/// A directory inside a tree, held open. Its methods take single path elements and never
/// follow a link at that element.
pub struct TreeDir {
    fd: OwnedFd,
    owner: Option<Owner>,
}

impl TreeDir {
    fn give(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        if let Some(o) = self.owner {
            rfs::fchown(fd, Some(uid(o.uid)), Some(gid(o.gid)))?;
        }
        Ok(())
    }

    /// Opens the directory `name` (a link there is an error, `ELOOP` or `ENOTDIR`).
    pub fn open_dir(&self, name: &str) -> io::Result<TreeDir> {
        let fd = rfs::openat(
            &self.fd,
            check_name(name)?,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(TreeDir {
            fd,
            owner: self.owner,
        })
    }

    /// Creates the directory `name`, which must not exist, with `mode` and the tree's owner.
    pub fn create_dir(&self, name: &str, mode: u32) -> io::Result<TreeDir> {
        rfs::mkdirat(&self.fd, check_name(name)?, Mode::from_raw_mode(0o700))?;
        let dir = self.open_dir(name)?;
        self.give(dir.fd.as_fd())?;
        rfs::fchmod(&dir.fd, Mode::from_raw_mode(mode & 0o7777))?;
        Ok(dir)
    }

    /// The directory `name` belongs to the service: whatever else is there (a link, a file, a
    /// FIFO) is removed and a directory made in its place.
    pub fn own_dir(&self, name: &str, mode: u32) -> io::Result<TreeDir> {
        for _ in 0..8 {
            match self.open_dir(name) {
                Ok(d) => return Ok(d),
                Err(e) if errno(&e) == Some(libc::ENOENT) => {}
                Err(e) if matches!(errno(&e), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    self.remove_all(name)?;
                }
                Err(e) => return Err(e),
            }
            match self.create_dir(name, mode) {
                Ok(d) => return Ok(d),
                // Something appeared meanwhile: look again.
                Err(e) if errno(&e) == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "{name} keeps being replaced while it is being made"
        )))
    }

    /// Creates the regular file `name`, which must not exist, with `mode` and the tree's owner.
    pub fn create_file(&self, name: &str, mode: u32) -> io::Result<File> {
        let fd = rfs::openat(
            &self.fd,
            check_name(name)?,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        self.give(fd.as_fd())?;
        rfs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))?;
        Ok(File::from(fd))
    }

    /// Creates the symlink `name` -> `target` (the target is not looked at).
    pub fn create_symlink(&self, target: &Path, name: &str) -> io::Result<()> {
        rfs::symlinkat(target, &self.fd, check_name(name)?)?;
        if let Some(o) = self.owner {
            rfs::chownat(
                &self.fd,
                name,
                Some(uid(o.uid)),
                Some(gid(o.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    }

    /// Puts a file with `data` and `mode` at `name`, atomically: written under a fresh name,
    /// then renamed over whatever was at `name` (a link there is replaced, not followed; a
    /// directory there is removed).
    pub fn write_file(&self, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
        let tmp = temp_name(check_name(name)?);
        let written = self
            .create_file(&tmp, mode)
            .and_then(|mut f| f.write_all(data))
            .and_then(|()| self.rename_over(&tmp, name));
        if written.is_err() {
            let _ = rfs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
        }
        written
    }

    /// Renames `from` to `to` in this directory, replacing what is at `to` (a directory there
    /// is removed first).
    fn rename_over(&self, from: &str, to: &str) -> io::Result<()> {
        match rfs::renameat(&self.fd, from, &self.fd, to) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR
                ) =>
            {
                self.remove_all(to)?;
                rfs::renameat(&self.fd, from, &self.fd, to).map_err(io::Error::from)
            }
            other => other.map_err(io::Error::from),
        }
    }

    /// Swaps the staged entry `staged` in as `name` (atomically, with `RENAME_EXCHANGE` when
    /// `name` exists), then removes what was there before.
    pub fn replace_with(&self, staged: &str, name: &str) -> io::Result<()> {
        check_name(staged)?;
        check_name(name)?;
        match rfs::renameat_with(&self.fd, staged, &self.fd, name, RenameFlags::EXCHANGE) {
            Ok(()) => self.remove_all(staged),
            Err(e) if e.raw_os_error() == libc::ENOENT => {
                rfs::renameat_with(&self.fd, staged, &self.fd, name, RenameFlags::NOREPLACE)
                    .map_err(io::Error::from)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes `name` and, if it is a directory, everything below it; links are removed, not
    /// followed. A missing entry is not an error.
    pub fn remove_all(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        match RootRef::from_fd(self.fd.as_fd()).remove_all(name) {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = pathrs_io(e);
                if errno(&e) == Some(libc::ENOENT) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The names in this directory (at most `max`).
    pub fn entries(&self, max: usize) -> io::Result<Vec<OsString>> {
        let mut out = Vec::new();
        for entry in rfs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() >= max {
                return Err(io::Error::other(format!("more than {max} entries")));
            }
            out.push(OsStr::from_bytes(name).to_owned());
        }
        Ok(out)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    /// Everything below `dir`, as (path -> kind, mode, content or link target).
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let what = if m.file_type().is_symlink() {
                    format!("link {}", std::fs::read_link(&p).unwrap().display())
                } else if m.is_dir() {
                    stack.push(p.clone());
                    format!("dir {:o}", m.mode())
                } else if !m.is_file() {
                    format!("other {:o}", m.mode())
                } else {
                    let content = std::fs::read(&p).unwrap_or_default();
                    format!("file {:o} {}", m.mode(), String::from_utf8_lossy(&content))
                };
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), what);
            }
        }
        out
    }

    fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
        std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap()
    }

    /// A small deterministic generator (xorshift), so failures replay.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    const NAMES: &[&str] = &["a", "b", "etc", "workspace", ".opencode", "init", "x"];

    /// True when no element of `p` below `root` is a link (so the generator itself never
    /// writes through one).
    fn plain_path(root: &Path, p: &Path) -> bool {
        let mut cur = root.to_path_buf();
        for c in p.strip_prefix(root).unwrap().components() {
            cur.push(c);
            if std::fs::symlink_metadata(&cur).is_ok_and(|m| !m.is_dir()) {
                return false;
            }
        }
        true
    }

    /// A random tree below `root` full of hostile links, next to `outside` (the "host").
    fn hostile_tree(rng: &mut Rng, root: &Path, outside: &Path) {
        let targets: Vec<String> = vec![
            outside.display().to_string(),
            format!("{}/secret", outside.display()),
            format!("{}/dir", outside.display()),
            "/".into(),
            "/etc".into(),
            "..".into(),
            "../..".into(),
            "../../..".into(),
            "../../../../../../..".into(),
            format!("../../../../../../..{}", outside.display()),
            "/proc/self/root".into(),
            "/proc/self/root/etc".into(),
            "/proc/self/cwd".into(),
            "/proc/1/root".into(),
            "a".into(),
            "a/b".into(),
            "./x".into(),
            "init".into(),
            "/a/../../..".into(),
        ];
        for _ in 0..(rng.next() % 24 + 4) {
            let depth = rng.next() % 3;
            let mut p = root.to_path_buf();
            for _ in 0..depth {
                p.push(rng.pick(NAMES));
            }
            p.push(rng.pick(NAMES));
            let parent = p.parent().unwrap();
            if !plain_path(root, parent) || std::fs::create_dir_all(parent).is_err() {
                continue;
            }
            if std::fs::symlink_metadata(&p).is_ok() {
                continue;
            }
            match rng.next() % 5 {
                0 => {
                    let _ = std::fs::create_dir(&p);
                }
                1 => {
                    let _ = std::fs::write(&p, "tree file");
                }
                2 => {
                    let _ = nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU);
                }
                _ => {
                    let t = &targets[(rng.next() % targets.len() as u64) as usize];
                    let _ = symlink(t, &p);
                }
            }
        }
    }

    fn random_rel(rng: &mut Rng) -> PathBuf {
        let mut p = PathBuf::new();
        for _ in 0..(rng.next() % 3 + 1) {
            p.push(rng.pick(NAMES));
        }
        p
    }

    #[test]
    fn thousands_of_hostile_trees_never_reach_outside() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..400 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("tree");
            let outside = dir.path().join("host");
            std::fs::create_dir_all(outside.join("dir")).unwrap();
            std::fs::write(outside.join("secret"), "host secret").unwrap();
            std::fs::set_permissions(outside.join("secret"), PermissionsExt::from_mode(0o600))
                .unwrap();
            std::fs::create_dir_all(&root).unwrap();
            hostile_tree(&mut rng, &root, &outside);
            let before = snapshot(&outside);
            let real_root = root.canonicalize().unwrap();
            let tree = Tree::open_container(&root).unwrap();
            for _ in 0..12 {
                let rel = random_rel(&mut rng);
                let name = rng.pick(NAMES);
                match rng.next() % 7 {
                    0 => {
                        if let Ok(data) = tree.read(&rel, 64) {
                            assert_ne!(data, b"host secret", "round {round}: read {rel:?}");
                        }
                    }
                    1 | 2 => {
                        if let Ok(d) = tree.dir(&rel, true) {
                            assert!(fd_path(d.as_fd()).starts_with(&real_root), "round {round}");
                            let _ = d.write_file(name, b"written", 0o755);
                            if let Ok(sub) = d.own_dir(name, 0o755) {
                                assert!(fd_path(sub.as_fd()).starts_with(&real_root));
                                let _ = sub.write_file("f", b"written", 0o644);
                            }
                        }
                    }
                    3 => {
                        if let Ok(d) = tree.dir(&rel, false) {
                            let _ = d.remove_all(name);
                        }
                    }
                    4 => {
                        if let Ok(d) = tree.dir(&rel, false)
                            && let Ok(staged) = d.create_dir(".staged", 0o755)
                        {
                            let _ = staged.write_file("tool", b"#!/bin/sh\n", 0o755);
                            let _ = d.replace_with(".staged", name);
                        }
                    }
                    5 => {
                        let u = tree.disk_usage(&rel, Duration::from_secs(1), 10_000);
                        assert!(u.bytes < 1 << 30);
                    }
                    _ => {
                        let _ = tree.stat(&rel);
                        let _ = tree.modified(&rel);
                    }
                }
            }
            assert_eq!(snapshot(&outside), before, "round {round} changed the host");
        }
    }

    #[test]
    fn links_resolve_inside_the_tree_as_they_would_in_a_container() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("usr/lib/os-release"), "PRETTY_NAME=\"Inside\"\n").unwrap();
        // Debian's own link, and an absolute one: both resolve inside.
        symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
        symlink("/usr/lib", root.join("lib")).unwrap();
        let tree = Tree::open(&root).unwrap();
        assert_eq!(
            tree.read("etc/os-release", 1024).unwrap(),
            b"PRETTY_NAME=\"Inside\"\n"
        );
        assert_eq!(
            tree.read("lib/os-release", 1024).unwrap(),
            b"PRETTY_NAME=\"Inside\"\n"
        );
        // A link to the host's /etc/hostname resolves to the tree's (missing) one.
        symlink("/etc/hostname", root.join("etc/h")).unwrap();
        assert_eq!(
            tree.read("etc/h", 1024).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn reads_are_bounded_and_refuse_what_is_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let big = File::create(root.join("big")).unwrap();
        big.set_len(10 << 30).unwrap(); // sparse: 10 GB that use no space
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        symlink("/dev/zero", root.join("zero")).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        let tree = Tree::open(root).unwrap();
        let start = Instant::now();
        let e = tree.read("fifo", 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert_eq!(tree.read("big", 4096).unwrap().len(), 4096);
        assert!(tree.read("loop1", 100).is_err());
        assert!(
            tree.read("zero", 100).is_err(),
            "resolves to the tree's /dev/zero"
        );
        assert!(tree.read("d", 100).is_err());
        // A read that blocked would never end: the bound only has to be far from that.
        assert!(start.elapsed() < Duration::from_secs(30));
        let u = tree.disk_usage("", Duration::from_secs(5), 1000);
        assert!(
            u.complete && u.bytes < 1 << 20,
            "{u:?}: sparse blocks, not sizes"
        );
    }

    #[test]
    fn own_dir_and_write_file_replace_links_instead_of_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        let outside = dir.path().join("host");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("file"), "keep").unwrap();
        symlink(&outside, root.join(".agent-workspaces")).unwrap();
        let tree = Tree::open_container(&root).unwrap();
        let d = tree
            .root_dir()
            .unwrap()
            .own_dir(".agent-workspaces", 0o755)
            .unwrap();
        symlink(outside.join("file"), root.join(".agent-workspaces/init")).unwrap();
        d.write_file("init", b"#!/bin/sh\n", 0o700).unwrap();
        assert_eq!(std::fs::read(outside.join("file")).unwrap(), b"keep");
        let m = std::fs::symlink_metadata(root.join(".agent-workspaces/init")).unwrap();
        assert!(m.is_file() && m.mode() & 0o7777 == 0o700);
        assert_eq!(snapshot(&outside).len(), 1);
        // A directory in the way is replaced too; so is a FIFO.
        std::fs::remove_file(root.join(".agent-workspaces/init")).unwrap();
        std::fs::create_dir_all(root.join(".agent-workspaces/init/sub")).unwrap();
        d.write_file("init", b"x", 0o700).unwrap();
        assert!(root.join(".agent-workspaces/init").is_file());
        // Names that are not one element are refused.
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(d.write_file(bad, b"x", 0o600).is_err(), "{bad}");
        }
        assert!(tree.dir("../host", true).is_err());
    }

    #[test]
    fn created_entries_belong_to_the_trees_owner() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::open_container(dir.path()).unwrap();
        let me = Owner {
            uid: nix::unistd::getuid().as_raw() & !(RANGE - 1),
            gid: nix::unistd::getgid().as_raw() & !(RANGE - 1),
        };
        assert_eq!(tree.owner(), Some(me));
        if nix::unistd::getuid().is_root() {
            let d = tree.dir("a/b", true).unwrap();
            d.write_file("f", b"x", 0o640).unwrap();
            for p in ["a", "a/b", "a/b/f"] {
                let m = std::fs::symlink_metadata(dir.path().join(p)).unwrap();
                assert_eq!((m.uid(), m.gid()), (me.uid, me.gid), "{p}");
            }
        }
    }
}
