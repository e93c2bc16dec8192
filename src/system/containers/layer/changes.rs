//! Changes of a tree's layers: snapshots, restores, forks; each committed by one state.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::core::ports::SnapshotInfo;

/// Why a change of layers was refused (inside the `io::Error` it returns).
#[derive(Debug)]
pub enum Refusal {
    /// A full tree, not layers.
    NotLayered(PathBuf),
    NoSnapshot(String),
    Exists(String),
    /// This many layers would be stacked.
    TooDeep(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLayered(tree) => write!(
                f,
                "{} is a full tree, not copy-on-write layers (it was unpacked whole where layers could not be mounted); rebuild it on a file system with overlayfs and idmapped mounts",
                tree.display()
            ),
            Self::NoSnapshot(name) => write!(f, "no snapshot '{name}'"),
            Self::Exists(name) => write!(f, "a snapshot named '{name}' exists already"),
            Self::TooDeep(n) => write!(
                f,
                "{n} layers would be stacked, more than {MAX_LOWERS}: fork or restore an earlier snapshot, or rebuild"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    /// The refusal an error carries, if it is one.
    pub fn of(e: &io::Error) -> Option<&Refusal> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Refusal>())
    }
}

fn refused(r: Refusal) -> io::Error {
    io::Error::other(r)
}

fn not_layered(tree: &Path) -> io::Error {
    refused(Refusal::NotLayered(tree.to_path_buf()))
}

fn no_snapshot(name: &str) -> io::Error {
    refused(Refusal::NoSnapshot(name.to_owned()))
}

fn too_deep(layers: usize) -> io::Error {
    refused(Refusal::TooDeep(layers))
}

/// The stack of `tree`, which must be layered.
pub(super) fn stack(tree: &Path) -> io::Result<State> {
    read_state(&layer_dir(tree))?.ok_or_else(|| not_layered(tree))
}

/// The snapshots of `tree`, oldest first.
pub fn snapshots(tree: &Path) -> io::Result<Vec<SnapshotInfo>> {
    let Some(st) = read_state(&layer_dir(tree))? else {
        return Ok(Vec::new());
    };
    let layers = layers_of(tree);
    Ok(st
        .snapshots
        .iter()
        .map(|s| SnapshotInfo {
            name: s.name.clone(),
            created_usec: s.created_usec,
            bytes: s
                .layers
                .first()
                .map_or(0, |id| disk_usage_of(&shared(&layers, id).join("tree"))),
        })
        .collect())
}

/// The bytes of the tree's own writable layer.
pub fn disk_usage(tree: &Path) -> io::Result<u64> {
    let dir = layer_dir(tree);
    let Some(st) = read_state(&dir)? else {
        return Ok(0);
    };
    Ok(disk_usage_of(&upper_paths(&layers_of(tree), &dir, &st).0))
}

/// Captures the tree as snapshot `name`. `running`: the container runs, frozen by the caller
/// for as long as this takes; its writable layer is copied (reflinks where the file system
/// has them) into a new read-only layer. Otherwise the writable layer itself becomes
/// read-only and a fresh one starts over it: the same cost whatever the size.
pub fn snapshot(tree: &Path, name: &str, running: bool, now_usec: u64) -> io::Result<()> {
    let dir = layer_dir(tree);
    let layers = layers_of(tree);
    let st = stack(tree)?;
    if st.snapshots.iter().any(|s| s.name == name) {
        return Err(clash(name));
    }
    if st.lowers.len() + 1 > MAX_LOWERS {
        return Err(too_deep(st.lowers.len() + 1));
    }
    if running {
        let (id, tmp) = copy_layer(&layers, &upper_paths(&layers, &dir, &st).0, st.range)?;
        crate::failpoint::hit("snapshot-copied");
        let _held = lock(&layers)?;
        let mut st = stack(tree)?;
        if st.snapshots.iter().any(|s| s.name == name) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(clash(name));
        }
        publish(&layers, &id, &tmp)?;
        crate::failpoint::hit("snapshot-published");
        let mut taken = vec![id];
        taken.extend(st.lowers.iter().cloned());
        st.snapshots.push(Snapshot {
            name: name.to_owned(),
            layers: taken,
            created_usec: now_usec,
        });
        return write_json(&dir.join(STATE), &st);
    }
    let _held = lock(&layers)?;
    let mut st = stack(tree)?;
    if upper_is_empty(&layers, &dir, &st) {
        // Nothing of its own yet: the snapshot is the layers under it, and nothing moves.
        st.snapshots.push(Snapshot {
            name: name.to_owned(),
            layers: st.lowers.clone(),
            created_usec: now_usec,
        });
        return write_json(&dir.join(STATE), &st);
    }
    unmount(tree)?;
    crate::failpoint::hit("snapshot-unmounted");
    st.retired.clear();
    let old = rebase(&layers, &dir, &mut st)?;
    st.snapshots.push(Snapshot {
        name: name.to_owned(),
        layers: st.lowers.clone(),
        created_usec: now_usec,
    });
    write_json(&dir.join(STATE), &st)?;
    crate::failpoint::hit("snapshot-committed");
    let _ = fs::remove_dir_all(shared(&layers, &old).join("work"));
    mount(&layers, &dir, &st, tree)
}

/// Whether the stack's writable layer holds nothing (a fresh one: its root directory only).
fn upper_is_empty(layers: &Path, dir: &Path, st: &State) -> bool {
    fs::read_dir(upper_paths(layers, dir, st).0).is_ok_and(|mut d| d.next().is_none())
}

fn clash(name: &str) -> io::Error {
    refused(Refusal::Exists(name.to_owned()))
}

/// The stack's writable layer becomes its top read-only layer under a fresh writable one (not
/// committed: the caller writes the state). The tree must be unmounted and the lock held.
/// Returns the id of the layer that became read-only.
fn rebase(layers: &Path, dir: &Path, st: &mut State) -> io::Result<String> {
    take_legacy(layers, dir, st)?;
    let old = st.upper.clone().unwrap_or_default();
    let mode = fs::metadata(shared(layers, &old).join("tree"))?.mode() & 0o7777;
    let (id, tmp) = new_upper(layers, st.range, mode)?;
    publish(layers, &id, &tmp)?;
    st.lowers.insert(0, old.clone());
    st.upper = Some(id);
    Ok(old)
}

/// Takes the writable layer of a tree from before snapshots (`<name>/upper`) into `.shared`,
/// through an intent (a crash in the middle is finished by `settle`). The lock is held.
fn take_legacy(layers: &Path, dir: &Path, st: &mut State) -> io::Result<()> {
    if st.upper.is_some() {
        return Ok(());
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let target = shared(layers, &id);
    fs::create_dir_all(layers.join(SHARED))?;
    fs::create_dir(&target)?;
    write_json(&target.join("meta"), &Meta { range: st.range })?;
    let new = State {
        upper: Some(id),
        ..st.clone()
    };
    let intent = Intent {
        moves: vec![
            (dir.join("upper"), target.join("tree")),
            (dir.join("work"), target.join("work")),
        ],
        state: new.clone(),
    };
    write_json(&dir.join(INTENT), &intent)?;
    settle(dir)?;
    *st = new;
    Ok(())
}

/// Removes snapshot `name`; its layers go once nothing else uses them.
pub fn delete_snapshot(tree: &Path, name: &str) -> io::Result<()> {
    let dir = layer_dir(tree);
    let layers = layers_of(tree);
    {
        let _held = lock(&layers)?;
        let mut st = stack(tree)?;
        let before = st.snapshots.len();
        st.snapshots.retain(|s| s.name != name);
        if st.snapshots.len() == before {
            return Err(no_snapshot(name));
        }
        write_json(&dir.join(STATE), &st)?;
    }
    collect(&layers, false)
}

/// The tree becomes snapshot `name`'s: a fresh writable layer over its layers. The container
/// must be stopped.
pub fn restore(tree: &Path, name: &str) -> io::Result<()> {
    let dir = layer_dir(tree);
    let layers = layers_of(tree);
    {
        let _held = lock(&layers)?;
        let mut st = stack(tree)?;
        let snap = st
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| no_snapshot(name))?;
        unmount(tree)?;
        let (upper, _) = upper_paths(&layers, &dir, &st);
        let mode = fs::metadata(&upper)?.mode() & 0o7777;
        crate::failpoint::hit("restore-unmounted");
        let (id, tmp) = new_upper(&layers, st.range, mode)?;
        publish(&layers, &id, &tmp)?;
        crate::failpoint::hit("restore-published");
        let legacy = st.upper.is_none();
        st.upper = Some(id);
        st.lowers = snap.layers;
        st.retired.clear();
        write_json(&dir.join(STATE), &st)?;
        crate::failpoint::hit("restore-committed");
        if legacy {
            let _ = fs::remove_file(dir.join("base"));
            for d in ["upper", "work"] {
                let _ = fs::remove_dir_all(dir.join(d));
            }
        }
        mount(&layers, &dir, &st, tree)?;
    }
    collect(&layers, false)
}

/// Makes `tree` (a new workspace's, which must not exist) a fork of `source`: a fresh
/// writable layer of its own range over snapshot `snapshot`'s layers, or over the source's
/// current state (`running`: the source runs, frozen by the caller, and its writable layer is
/// copied; else it becomes a read-only layer both share). Marked unfinished until
/// `fork_done`.
pub fn fork(source: &Path, snapshot: Option<&str>, running: bool, tree: &Path) -> io::Result<()> {
    let layers = layers_of(source);
    let source_dir = layer_dir(source);
    let dir = layer_dir(tree);
    let st = stack(source)?;
    if let Some(name) = snapshot
        && !st.snapshots.iter().any(|s| s.name == name)
    {
        return Err(no_snapshot(name));
    }
    let copied = match snapshot {
        None if running => Some(copy_layer(
            &layers,
            &upper_paths(&layers, &source_dir, &st).0,
            st.range,
        )?),
        _ => None,
    };
    let made = (|| {
        let _held = lock(&layers)?;
        let mut st = stack(source)?;
        let lowers = match (snapshot, &copied) {
            (Some(name), _) => st
                .snapshots
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| no_snapshot(name))?
                .layers
                .clone(),
            (None, Some((id, tmp))) => {
                crate::failpoint::hit("fork-copied");
                publish(&layers, id, tmp)?;
                let mut lowers = vec![id.clone()];
                lowers.extend(st.lowers.iter().cloned());
                lowers
            }
            (None, None) if upper_is_empty(&layers, &source_dir, &st) => st.lowers.clone(),
            (None, None) => {
                if st.lowers.len() + 1 > MAX_LOWERS {
                    return Err(too_deep(st.lowers.len() + 1));
                }
                unmount(source)?;
                st.retired.clear();
                let old = rebase(&layers, &source_dir, &mut st)?;
                write_json(&source_dir.join(STATE), &st)?;
                crate::failpoint::hit("fork-source-rebased");
                let _ = fs::remove_dir_all(shared(&layers, &old).join("work"));
                st.lowers.clone()
            }
        };
        if lowers.len() > MAX_LOWERS {
            return Err(too_deep(lowers.len()));
        }
        fs::create_dir(&dir)?;
        fs::write(dir.join(FORKING), token())?;
        let range = pick_range(&layers);
        let mode = fs::metadata(upper_paths(&layers, &source_dir, &st).0)?.mode() & 0o7777;
        let (id, tmp) = new_upper(&layers, range, mode)?;
        publish(&layers, &id, &tmp)?;
        let forked = State {
            base: st.base.clone(),
            range,
            upper: Some(id),
            lowers,
            snapshots: Vec::new(),
            retired: Vec::new(),
        };
        write_json(&dir.join(STATE), &forked)?;
        crate::failpoint::hit("fork-committed");
        // Both mounted under the lock (see `create`).
        if !is_mounted(source) {
            mount(&layers, &source_dir, &st, source)?;
        }
        fs::create_dir(tree)?;
        mount(&layers, &dir, &forked, tree)
    })();
    match made {
        Ok(()) => Ok(()),
        Err(e) => {
            if let Some((_, tmp)) = copied {
                let _ = fs::remove_dir_all(tmp);
            }
            if !is_mounted(source) {
                let _ = ensure_mounted(source);
            }
            let _ = remove(tree);
            Err(e)
        }
    }
}

/// The fork's record is saved: it is a workspace like any other.
pub fn fork_done(tree: &Path) -> io::Result<()> {
    match fs::remove_file(layer_dir(tree).join(FORKING)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// At start-up: the trees of forks a crash ended before their record was saved (`known` are
/// the container workspaces' names) are removed, the marks of those it ended after are, and
/// layers nothing uses go.
pub fn finish_forks(machines: &Path, known: &[String]) -> io::Result<()> {
    let layers = layers_dir(machines);
    for e in fs::read_dir(&layers).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(mark) = fs::read_to_string(e.path().join(FORKING)) else {
            continue;
        };
        // A fork this process is making now (the clean-up runs while it serves).
        if name.starts_with('.') || mark == token() {
            continue;
        }
        let tree = machines.join(&name);
        if known.contains(&name) {
            fork_done(&tree)?;
        } else {
            tracing::warn!("Removing {}, a fork a restart interrupted", tree.display());
            remove(&tree)?;
        }
    }
    collect(&layers, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree from before snapshots: `<name>/upper`, `<name>/work`, `<name>/base`.
    fn legacy(layers: &Path) -> PathBuf {
        let dir = layers.join("box");
        fs::create_dir_all(dir.join("upper/etc")).unwrap();
        fs::write(dir.join("upper/etc/mine"), b"kept").unwrap();
        fs::create_dir_all(dir.join("work/work")).unwrap();
        fs::write(dir.join("base"), b"/var/cache/base.tree").unwrap();
        dir
    }

    #[test]
    fn a_tree_from_before_snapshots_is_taken_into_shared_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let layers = tmp.path();
        let dir = legacy(layers);
        let mut st = read_state(&dir).unwrap().unwrap();
        assert_eq!(st.upper, None);
        assert_eq!(st.base, Path::new("/var/cache/base.tree"));
        take_legacy(layers, &dir, &mut st).unwrap();
        let id = st.upper.clone().unwrap();
        assert_eq!(
            fs::read(shared(layers, &id).join("tree/etc/mine")).unwrap(),
            b"kept"
        );
        assert!(shared(layers, &id).join("work/work").is_dir());
        assert!(!dir.join("upper").exists() && !dir.join("base").exists());
        assert_eq!(
            read_state(&dir).unwrap().unwrap(),
            st,
            "the state is committed"
        );
        assert!(!dir.join(INTENT).exists());
    }

    #[test]
    fn a_move_a_crash_ended_half_way_is_finished_when_the_state_is_next_read() {
        let tmp = tempfile::tempdir().unwrap();
        let layers = tmp.path();
        let dir = legacy(layers);
        let st = read_state(&dir).unwrap().unwrap();
        let target = shared(layers, "l1");
        fs::create_dir_all(&target).unwrap();
        let new = State {
            upper: Some("l1".into()),
            ..st
        };
        let intent = Intent {
            moves: vec![
                (dir.join("upper"), target.join("tree")),
                (dir.join("work"), target.join("work")),
            ],
            state: new.clone(),
        };
        write_json(&dir.join(INTENT), &intent).unwrap();
        // The first move was made, then the process ended.
        fs::rename(dir.join("upper"), target.join("tree")).unwrap();
        // Until then, a collection counts the layer the intent names as used.
        assert!(used_layers(layers).unwrap().contains("l1"));
        assert_eq!(read_state(&dir).unwrap().unwrap(), new);
        assert!(target.join("work/work").is_dir() && !dir.join("work").exists());
        assert_eq!(fs::read(target.join("tree/etc/mine")).unwrap(), b"kept");
        collect(layers, true).unwrap();
        assert!(target.is_dir(), "a layer a state names is kept");
        fs::create_dir_all(shared(layers, "stray.1-2.tmp")).unwrap();
        fs::create_dir_all(shared(layers, &tmp_name("mine"))).unwrap();
        fs::create_dir_all(shared(layers, "unnamed")).unwrap();
        collect(layers, true).unwrap();
        assert!(!shared(layers, "stray.1-2.tmp").exists() && !shared(layers, "unnamed").exists());
        assert!(
            shared(layers, &tmp_name("mine")).exists(),
            "a layer this process is making is left to it"
        );
    }
}
