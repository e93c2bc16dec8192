//! Whether copy-on-write trees can be made here and, where not, why in words and what to do:
//! tried once at start with what a build does (an idmapped clone of a base in the cache, an
//! overlay at a tree beside the containers' trees), on a base and a tree of the probe's own.

use std::fs;
use std::io;
use std::path::Path;

use super::mount::clone_to;
use super::{PICK_MIN, create, layers_of, remove};

/// The probe's tree beside the containers' (no workspace name starts with a dot) and its base
/// in the cache; fixed names, so a probe killed half-way is cleaned by the next.
const TREE: &str = ".agent-workspaces-probe";
const BASE: &str = ".probe";

/// The file systems a reason names, by `statfs` magic.
fn fs_name(path: &Path) -> String {
    match nix::sys::statfs::statfs(path) {
        Ok(s) => match s.filesystem_type().0 {
            0xEF53 => "ext4".into(),
            0x5846_5342 => "xfs".into(),
            0x9123_683E => "btrfs".into(),
            0x794c_7630 => "overlayfs".into(),
            0x0102_1994 => "tmpfs".into(),
            0x2fc1_2fc1 => "zfs".into(),
            other => format!("a file system of type {other:#x}"),
        },
        Err(e) => format!("an unreadable file system ({e})"),
    }
}

fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The fix, the same whatever failed.
pub const FIX: &str = "put the containers' directory ([container] machines_dir, \
     /var/lib/machines by default) and the cache ([container] cache_dir, \
     /var/cache/agent-workspaces) on ext4, xfs or btrfs (not overlayfs, as in a container, \
     some CI runners and VPS images; not tmpfs before Linux 6.3), then restart the service";

/// `Ok` where copy-on-write trees work; else why not, in words.
pub fn probe(machines_dir: &Path, cache_dir: &Path) -> Result<(), String> {
    let tree = machines_dir.join(TREE);
    let bases = cache_dir.join("base");
    let base = bases.join(BASE);
    let result = try_layers(machines_dir, &bases, &base, &tree);
    let _ = remove(&tree);
    let _ = fs::remove_dir_all(&base);
    result
}

fn try_layers(machines_dir: &Path, bases: &Path, base: &Path, tree: &Path) -> Result<(), String> {
    let point = layers_of(tree).join(format!("{TREE}.point"));
    let made = (|| {
        // What a probe killed half-way left: its clone's mount point, its tree, its base.
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&point);
        let _ = remove(tree);
        let _ = fs::remove_dir_all(base);
        fs::create_dir_all(base.join("etc"))?;
        fs::create_dir_all(layers_of(tree))
    })();
    if let Err(e) = made {
        return Err(format!(
            "cannot make a probe in {} and {}: {e}",
            bases.display(),
            machines_dir.display()
        ));
    }
    if fs_name(machines_dir) == "overlayfs" {
        return Err(format!(
            "{} is on overlayfs, which cannot hold the writable layer of another overlay",
            machines_dir.display()
        ));
    }
    // The base's idmapped clone, as each tree's bottom layer is.
    let cloned = fs::create_dir_all(&point).and_then(|()| clone_to(base, &point, 0, PICK_MIN));
    let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&point);
    if let Err(e) = cloned {
        return Err(format!(
            "{} is on {}, where this kernel ({}) cannot make idmapped mounts ({e})",
            bases.display(),
            fs_name(bases),
            kernel()
        ));
    }
    create(base, tree).map_err(|e: io::Error| {
        format!(
            "an overlay with its writable layer on {} ({}) cannot be mounted ({e})",
            machines_dir.display(),
            fs_name(machines_dir)
        )
    })
}
