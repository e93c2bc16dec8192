//! Copy-on-write container trees: a workspace's tree is an overlay of a writable layer of its
//! own over the distro's cached base tree, unpacked once and never written. Creating a tree
//! costs a few directories and a mount instead of unpacking the whole base; a rebuild drops
//! the layer.
//!
//! Ownership: the container runs in a user namespace of its own, so its root is a 64K range
//! `R` of host ids. An idmapped mount of the merged overlay is refused by the kernel (only
//! layers can be idmapped), so the *lower* layer is an idmapped clone of the base (host 0..64K
//! seen as `R..R+64K`) and the upper layer belongs to `R`: the merged tree is owned by the
//! container's range as if it had been chowned, without writing a byte of the base. nspawn
//! (`--private-users=pick`) reads the range from the tree's root and takes it; the chown it
//! would do finds the tree already shifted.
//!
//! Layout, beside the trees: `<machines_dir>/.agent-workspaces-layers/<name>/` holds `upper/`,
//! `work/` and `base` (the path of the base tree it lies over). The overlay is mounted at
//! `<machines_dir>/<name>`, so every path to the tree, `machinectl list-images` and the
//! confined access of `Tree` stay as they are. Where the file system cannot do this (overlayfs
//! as an upper layer, no idmapped mounts), the build unpacks a full tree as before.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
/// The size of a container's id range, as nspawn's.
const RANGE: u32 = 0x1_0000;
/// The ranges nspawn's `--private-users=pick` chooses from.
const PICK_MIN: u32 = 0x0008_0000;
const PICK_MAX: u32 = 0x6FFF_0000;
/// Where the layers are, beside the trees.
const LAYERS: &str = ".agent-workspaces-layers";

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

/// The directory of the layers of the trees in `machines`.
pub fn layers_dir(machines: &Path) -> PathBuf {
    machines.join(LAYERS)
}

/// The layer directory of the tree at `tree`.
pub fn layer_dir(tree: &Path) -> PathBuf {
    let name = tree.file_name().unwrap_or_default();
    layers_dir(tree.parent().unwrap_or(Path::new("/"))).join(name)
}

/// Whether an overlay is mounted at `tree` (a layered tree in use): an overlayfs whose device
/// is not its parent's (a tree unpacked on a file system that is itself an overlay is not).
pub fn is_mounted(tree: &Path) -> bool {
    let overlay = nix::sys::statfs::statfs(tree)
        .is_ok_and(|s| s.filesystem_type().0 == OVERLAYFS_SUPER_MAGIC);
    let parent = tree.parent().unwrap_or(Path::new("/"));
    overlay
        && match (fs::symlink_metadata(tree), fs::metadata(parent)) {
            (Ok(t), Ok(p)) => t.dev() != p.dev(),
            _ => false,
        }
}

/// Whether the tree has a layer (mounted or not).
pub fn has_layer(tree: &Path) -> bool {
    layer_dir(tree).join("base").is_file()
}

/// Makes a fresh layer for `tree` over the unpacked base tree `base` and mounts it at `tree`
/// (created). Whatever layer the tree had is gone first. On an error nothing is left.
pub fn create(base: &Path, tree: &Path) -> io::Result<()> {
    remove(tree)?;
    let result = (|| {
        let layer = layer_dir(tree);
        let layers = layer.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(layers)?;
        fs::set_permissions(layers, fs::Permissions::from_mode(0o700))?;
        fs::create_dir(&layer)?;
        let range = pick_range(layers);
        let upper = layer.join("upper");
        fs::create_dir(&upper)?;
        let root_mode = fs::metadata(base)?.mode() & 0o7777;
        fs::set_permissions(&upper, fs::Permissions::from_mode(root_mode))?;
        std::os::unix::fs::chown(&upper, Some(range), Some(range))?;
        fs::create_dir(layer.join("work"))?;
        fs::write(layer.join("base"), base.as_os_str().as_bytes())?;
        fs::create_dir(tree)?;
        mount(base, &layer, tree, range)
    })();
    if result.is_err() {
        let _ = remove(tree);
    }
    result
}

/// Mounts the tree's layer again if it is not mounted (after a reboot).
pub fn ensure_mounted(tree: &Path) -> io::Result<()> {
    if !has_layer(tree) || is_mounted(tree) {
        return Ok(());
    }
    let layer = layer_dir(tree);
    let base = PathBuf::from(std::ffi::OsStr::from_bytes(&fs::read(layer.join("base"))?));
    let range = fs::metadata(layer.join("upper"))?.uid();
    if range % RANGE != 0 || range == 0 {
        return Err(io::Error::other(format!(
            "{}: its upper layer is owned by {range}, not a container's range",
            layer.display()
        )));
    }
    fs::create_dir_all(tree)?;
    mount(&base, &layer, tree, range)
}

/// Unmounts the tree and removes it and its layer. Nothing there: nothing to do.
pub fn remove(tree: &Path) -> io::Result<()> {
    if is_mounted(tree) {
        nix::mount::umount2(tree, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    for dir in [tree.to_path_buf(), layer_dir(tree)] {
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// A 64K-aligned range in nspawn's pick range that no running nspawn holds (nspawn locks the
/// range it uses in `/run/systemd/nspawn-uid/<base>`) and no other layer in `layers` has (a
/// stopped container holds no lock), at random like nspawn's own pick.
fn pick_range(layers: &Path) -> u32 {
    let taken: Vec<u32> = fs::read_dir(layers)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| fs::metadata(e.path().join("upper")).ok())
                .map(|m| m.uid())
                .collect()
        })
        .unwrap_or_default();
    let mut candidate = 0;
    for _ in 0..100 {
        let mut bytes = [0u8; 4];
        let _ = getrandom(&mut bytes);
        candidate = PICK_MIN + (u32::from_ne_bytes(bytes) % (PICK_MAX - PICK_MIN));
        candidate &= !(RANGE - 1);
        if candidate < PICK_MIN || taken.contains(&candidate) {
            continue;
        }
        let lock = format!("/run/systemd/nspawn-uid/{candidate}");
        match fs::OpenOptions::new().write(true).open(&lock) {
            // A lock file nspawn left: taken if it still holds the lock.
            Ok(f) => {
                // SAFETY: flock on an open descriptor.
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    return candidate;
                }
            }
            Err(_) => return candidate,
        }
    }
    candidate
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("a path with a NUL byte"))
}

/// Mounts the overlay of `layer` over an idmapped clone of `base` at `tree`.
fn mount(base: &Path, layer: &Path, tree: &Path, range: u32) -> io::Result<()> {
    let lower = layer.join("lower");
    let upper = layer.join("upper");
    let work = layer.join("work");
    for p in [&lower, &upper, &work] {
        // The overlay's options are separated by commas and its lower layers by colons.
        if p.as_os_str().as_bytes().iter().any(|b| b",:\\".contains(b)) {
            return Err(io::Error::other(format!(
                "{} has a character overlayfs options cannot hold",
                p.display()
            )));
        }
    }
    let userns = userns(range)?;
    let clone = {
        let path = cstr(base)?;
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
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
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
    fs::create_dir_all(&lower)?;
    let target = cstr(&lower)?;
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
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let mounted = nix::mount::mount(
        Some("overlay"),
        tree,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(io::Error::from);
    // The overlay holds private clones of its layers: the lower mount is not needed any more.
    let _ = nix::mount::umount2(&lower, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&lower);
    mounted
}

/// A user namespace mapping ids 0..64K to `range..range+64K`, for an idmapped mount: made by a
/// child cloned into a new user namespace, which waits until its namespace is open here.
fn userns(range: u32) -> io::Result<OwnedFd> {
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
        let map = format!("0 {range} {RANGE}\n");
        fs::write(format!("/proc/{child}/uid_map"), &map)?;
        fs::write(format!("/proc/{child}/gid_map"), &map)?;
        fs::File::open(format!("/proc/{child}/ns/user")).map(OwnedFd::from)
    })();
    drop(write);
    drop(read);
    let _ = nix::sys::wait::waitpid(child, None);
    opened
}
