//! Mounting a stack: each lower layer an idmapped read-only clone, then the overlay.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::*;

// From linux/mount.h.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub(super) fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("a path with a NUL byte"))
}

/// Mounts the stack `st` (whose layer directory is `dir`) at `tree`: its upper layer over its
/// read-only layers and the base, each an idmapped read-only clone from its range to the
/// stack's.
pub(super) fn mount(layers: &Path, dir: &Path, st: &State, tree: &Path) -> io::Result<()> {
    check_range(st.range, dir)?;
    let (upper, work) = upper_paths(layers, dir, st);
    let mut lowers = Vec::with_capacity(st.lowers.len() + 1);
    for id in &st.lowers {
        let meta = read_json::<Meta>(&shared(layers, id).join("meta"))?
            .ok_or_else(|| other(format!("layer {id} is missing")))?;
        check_range(meta.range, &shared(layers, id))?;
        lowers.push((shared(layers, id).join("tree"), meta.range));
    }
    lowers.push((st.base.clone(), 0));
    for p in [&upper, &work, dir] {
        // The overlay's options are separated by commas and its lower layers by colons.
        if p.as_os_str().as_bytes().iter().any(|b| b",:\\".contains(b)) {
            return Err(other(format!(
                "{} has a character overlayfs options cannot hold",
                p.display()
            )));
        }
    }
    // Each lower layer is cloned, idmapped, to a mount point of its own in `dir` (short
    // names: the options must fit in a page), then the overlay takes its own clones of them.
    let mut points = Vec::with_capacity(lowers.len());
    // Names of this mount's own, so no other mount of the tree takes them away.
    let mut tag = [0u8; 4];
    let _ = getrandom(&mut tag);
    let tag = u32::from_ne_bytes(tag);
    let cloned = (|| {
        for (i, (layer, from)) in lowers.iter().enumerate() {
            let point = dir.join(format!("l{tag:08x}.{i}"));
            fs::create_dir(&point)?;
            points.push(point.clone());
            clone_to(layer, &point, *from, st.range)?;
        }
        Ok::<_, io::Error>(())
    })();
    let mounted = cloned.and_then(|()| {
        let lowerdir: Vec<String> = points.iter().map(|p| p.display().to_string()).collect();
        let options = format!(
            // No redirected directories and no metadata-only copies: every layer holds
            // whole entries, which is what a flatten merges (`flatten.rs`).
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off",
            lowerdir.join(":"),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            tree,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(io::Error::from)
    });
    // The overlay holds private clones of its layers: the mount points are not needed.
    for p in &points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(p);
    }
    mounted
}

/// Mounts a read-only clone of `layer` at `point`, its owners `from..from+64K` seen as
/// `to..to+64K` (an idmapped mount; a plain clone when they are the same).
pub(super) fn clone_to(layer: &Path, point: &Path, from: u32, to: u32) -> io::Result<()> {
    let clone = {
        let path = cstr(layer)?;
        // SAFETY: open_tree(2) with a valid path; the result is a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                path.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and is owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    };
    let userns = if from == to {
        None
    } else {
        Some(userns(from, to)?)
    };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | userns.as_ref().map_or(0, |_| MOUNT_ATTR_IDMAP),
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_ref().map_or(0, |u| u.as_raw_fd() as u64),
    };
    // SAFETY: mount_setattr(2) on our detached mount, with a mount_attr of the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            clone.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let target = cstr(point)?;
    // SAFETY: move_mount(2) of our detached mount onto a directory we made.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            clone.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A user namespace mapping ids `from..from+64K` to `to..to+64K`, for an idmapped mount: made
/// by a child cloned into a new user namespace, which waits until its namespace is open here.
pub(super) fn userns(from: u32, to: u32) -> io::Result<OwnedFd> {
    let (read, write) = nix::unistd::pipe().map_err(io::Error::from)?;
    let (r, w) = (read.as_raw_fd(), write.as_raw_fd());
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the child runs only async-signal-safe calls (close, read) and returns.
    let child = unsafe {
        nix::sched::clone(
            Box::new(move || {
                libc::close(w);
                let mut b = [0u8; 1];
                libc::read(r, b.as_mut_ptr().cast(), 1);
                0
            }),
            &mut stack,
            nix::sched::CloneFlags::CLONE_NEWUSER,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(io::Error::from)?;
    let opened = (|| {
        let map = format!("{from} {to} {RANGE}\n");
        fs::write(format!("/proc/{child}/uid_map"), &map)?;
        fs::write(format!("/proc/{child}/gid_map"), &map)?;
        fs::File::open(format!("/proc/{child}/ns/user")).map(OwnedFd::from)
    })();
    drop(write);
    drop(read);
    let _ = nix::sys::wait::waitpid(child, None);
    opened
}
