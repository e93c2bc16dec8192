//! The files of layers: copied (a running container's writable layer, for a snapshot) and
//! measured.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::*;

/// A copy of the layer `from` (owned by `range`) as a new read-only layer, made as `<id>.tmp`
/// (`cp -a`: owners, modes, times, extended attributes (overlayfs's whiteouts and opaque
/// directories among them), hard links; reflinks where the file system has them). The caller
/// publishes it under the lock.
pub(super) fn copy_layer(layers: &Path, from: &Path, range: u32) -> io::Result<(String, PathBuf)> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = shared(layers, &tmp_name(&id));
    fs::create_dir_all(layers.join(SHARED))?;
    fs::create_dir(&tmp)?;
    let copied = (|| {
        write_json(&tmp.join("meta"), &Meta { range })?;
        let out = std::process::Command::new("cp")
            .args(["-a", "--reflink=auto", "--"])
            .arg(from)
            .arg(tmp.join("tree"))
            .stdin(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(other(format!(
                "cp of {} failed ({}): {}",
                from.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    })();
    match copied {
        Ok(()) => Ok((id, tmp)),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The bytes a directory's files take on disk (allocated blocks; a file with several links
/// once). Walked with descriptors, never through a link (the tree may be a running
/// container's, changing as it is walked), depth first: as many descriptors open as levels,
/// 256 levels at most.
pub(super) fn disk_usage_of(root: &Path) -> u64 {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let Ok(top) = nix::dir::Dir::open(root, flags, Mode::empty()) else {
        return 0;
    };
    let mut seen = std::collections::HashSet::new();
    walk_usage(top, 0, &mut seen)
}

pub(super) fn walk_usage(
    mut dir: nix::dir::Dir,
    depth: usize,
    seen: &mut std::collections::HashSet<(u64, u64)>,
) -> u64 {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{Mode, SFlag, fstatat};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    // SAFETY: the descriptor stays open for as long as `dir`, which outlives every use.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(dir.as_raw_fd()) };
    let mut total = 0u64;
    for entry in dir.iter().flatten() {
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(st) = fstatat(fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        if st.st_nlink > 1 && !seen.insert((st.st_dev, st.st_ino)) {
            continue;
        }
        total += st.st_blocks as u64 * 512;
        let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
        if is_dir
            && depth < 256
            && let Ok(sub) = nix::dir::Dir::openat(fd, name, flags, Mode::empty())
        {
            total += walk_usage(sub, depth + 1, seen);
        }
    }
    total
}
