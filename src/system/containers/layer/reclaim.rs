//! Reclaiming unpacked base trees no stack names any more (the last workspace over a base was
//! destroyed, or rebuilt over a base of a new key).
//!
//! Safe against the builds, which run in processes of their own: a build holds its base's
//! lock (`<key>.lock`, `flock`) from choosing the base until its stack names it (or until it
//! unpacked a full tree instead), and a reclaim removes a base only under that lock, after
//! looking at every stack again. Safe against a `kill -9`: the base is renamed to
//! `<key>.tree.reclaim` first (one step), then emptied; a reclaim, and every start, finishes
//! what a killed one left. Nothing is ever half a base under its own name.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use super::files::disk_usage_of;
use super::{INTENT, Intent, STATE, State, layers_dir, lock, read_json};

/// An unpacked base, beside its archive in the cache's `base/`.
const TREE: &str = ".tree";
/// A base being reclaimed.
const RECLAIM: &str = ".tree.reclaim";

/// What a reclaim removed: the bases and the bytes they held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub bases: Vec<PathBuf>,
    pub bytes: u64,
}

/// A base's lock, held by builds from choosing it until their stack names it.
pub fn base_lock(bases: &Path, key: &str, wait: bool) -> io::Result<Option<File>> {
    let lock = File::create(bases.join(format!("{key}.lock")))?;
    let how = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock on an open descriptor; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), how) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(lock))
}

/// Bases by path, and by device and inode.
type Used = (HashSet<PathBuf>, HashSet<(u64, u64)>);

/// The bases some stack of the trees in `machines` names (its state, or a move under way),
/// by path and by inode. An unreadable stack fails the whole: a reclaim then removes nothing.
fn used_bases(machines: &Path) -> io::Result<Used> {
    let mut paths = HashSet::new();
    let layers = layers_dir(machines);
    let entries = match fs::read_dir(&layers) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((paths, HashSet::new())),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        if e.file_name().as_bytes().starts_with(b".") {
            continue;
        }
        let dir = e.path();
        paths.extend(read_json::<State>(&dir.join(STATE))?.map(|s| s.base));
        paths.extend(read_json::<Intent>(&dir.join(INTENT))?.map(|i| i.state.base));
        // A tree from before snapshots names its base in a file of its own.
        match fs::read(dir.join("base")) {
            Ok(b) => {
                paths.insert(PathBuf::from(std::ffi::OsStr::from_bytes(&b)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let inodes = paths
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    Ok((paths, inodes))
}

/// Removes every unpacked base in `bases` that no stack of the trees in `machines` names and
/// no build holds; finishes reclaims a kill ended. `between` runs after each rename (the
/// crash tests' failpoint).
pub fn reclaim_bases(machines: &Path, bases: &Path, between: impl Fn()) -> io::Result<Reclaimed> {
    // One reclaim at a time in this process (a destroy's and the start-up's may meet).
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut done = Reclaimed::default();
    let entries = match fs::read_dir(bases) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e),
    };
    let mut keys = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(RECLAIM) {
            done.bytes += disk_usage_of(&e.path());
            remove_all(&e.path())?;
            done.bases.push(e.path());
        } else if let Some(key) = name.strip_suffix(TREE)
            && e.file_type()?.is_dir()
        {
            keys.push(key.to_owned());
        }
    }
    for key in keys {
        let tree = bases.join(format!("{key}{TREE}"));
        let (paths, inodes) = used_bases(machines)?;
        if is_used(&tree, &paths, &inodes) {
            continue;
        }
        // A build choosing this base holds its lock until its stack names it.
        let Some(base_held) = base_lock(bases, &key, false)? else {
            continue;
        };
        // Looked at again, and renamed, under the layers' lock too: a fork names its source's
        // base under that lock, without the base's.
        let layers_held = lock(&layers_dir(machines))?;
        let (paths, inodes) = used_bases(machines)?;
        if is_used(&tree, &paths, &inodes) || !tree.is_dir() {
            continue;
        }
        let bytes = disk_usage_of(&tree);
        let gone = bases.join(format!("{key}{RECLAIM}"));
        fs::rename(&tree, &gone)?;
        drop(layers_held);
        drop(base_held);
        between();
        remove_all(&gone)?;
        done.bytes += bytes;
        done.bases.push(tree);
    }
    Ok(done)
}

/// Removes a directory tree; one already gone is removed.
fn remove_all(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn is_used(tree: &Path, paths: &HashSet<PathBuf>, inodes: &HashSet<(u64, u64)>) -> bool {
    paths.contains(tree) || fs::metadata(tree).is_ok_and(|m| inodes.contains(&(m.dev(), m.ino())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_over(base: &Path) -> State {
        State {
            base: base.to_path_buf(),
            range: 0x80000,
            upper: Some("u".into()),
            lowers: Vec::new(),
            snapshots: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// Only a base no stack names and no build holds goes; what a killed reclaim left goes too.
    #[test]
    fn only_bases_nothing_names_or_holds_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let (machines, bases) = (dir.path().join("machines"), dir.path().join("base"));
        let layers = layers_dir(&machines);
        for key in ["named", "moving", "old", "unused", "held"] {
            fs::create_dir_all(bases.join(format!("{key}.tree/etc"))).unwrap();
            fs::write(
                bases.join(format!("{key}.tree/etc/os-release")),
                [7u8; 5000],
            )
            .unwrap();
        }
        fs::create_dir_all(bases.join("killed.tree.reclaim/usr")).unwrap();
        fs::create_dir_all(layers.join("a")).unwrap();
        fs::write(
            layers.join("a").join(STATE),
            serde_json::to_vec(&state_over(&bases.join("named.tree"))).unwrap(),
        )
        .unwrap();
        fs::create_dir_all(layers.join("b")).unwrap();
        let intent = Intent {
            moves: Vec::new(),
            state: state_over(&bases.join("moving.tree")),
        };
        fs::write(
            layers.join("b").join(INTENT),
            serde_json::to_vec(&intent).unwrap(),
        )
        .unwrap();
        fs::create_dir_all(layers.join("c")).unwrap();
        fs::write(
            layers.join("c").join("base"),
            bases.join("old.tree").as_os_str().as_bytes(),
        )
        .unwrap();
        let _build = base_lock(&bases, "held", true).unwrap().unwrap();

        let done = reclaim_bases(&machines, &bases, || {}).unwrap();
        let mut gone: Vec<_> = done
            .bases
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        gone.sort();
        assert_eq!(gone, ["killed.tree.reclaim", "unused.tree"]);
        assert!(done.bytes >= 5000, "{done:?}");
        for kept in ["named", "moving", "old", "held"] {
            assert!(
                bases.join(format!("{kept}.tree/etc/os-release")).exists(),
                "{kept}"
            );
        }
        assert!(!bases.join("unused.tree").exists());
        assert!(!bases.join("killed.tree.reclaim").exists());
    }

    /// A stack that cannot be read stops the reclaim: nothing is removed on a guess.
    #[test]
    fn an_unreadable_stack_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (machines, bases) = (dir.path().join("machines"), dir.path().join("base"));
        fs::create_dir_all(bases.join("k.tree")).unwrap();
        let layers = layers_dir(&machines);
        fs::create_dir_all(layers.join("a")).unwrap();
        fs::write(layers.join("a").join(STATE), b"{").unwrap();
        assert!(reclaim_bases(&machines, &bases, || {}).is_err());
        assert!(bases.join("k.tree").is_dir());
    }

    /// A kill between the rename and the removal leaves no base half removed under its name,
    /// and the next reclaim finishes it.
    #[test]
    fn a_reclaim_cut_short_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (machines, bases) = (dir.path().join("machines"), dir.path().join("base"));
        fs::create_dir_all(bases.join("k.tree/usr/lib")).unwrap();
        let cut = std::panic::catch_unwind(|| {
            let _ = reclaim_bases(&machines, &bases, || panic!("killed"));
        });
        assert!(cut.is_err());
        assert!(!bases.join("k.tree").exists());
        assert!(bases.join("k.tree.reclaim/usr/lib").is_dir());
        let done = reclaim_bases(&machines, &bases, || {}).unwrap();
        assert_eq!(done.bases, [bases.join("k.tree.reclaim")]);
        assert!(!bases.join("k.tree.reclaim").exists());
    }
}
