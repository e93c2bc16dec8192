//! Copy-on-write container trees: a workspace's tree is an overlay of a writable layer of its
//! own over read-only layers (snapshots it was restored or forked from) over the distro's cached
//! base tree, unpacked once and never written. Creating a tree costs a few directories and a
//! mount instead of unpacking the whole base; a rebuild drops the layers.
//!
//! Ownership: the container runs in a user namespace of its own, so its root is a 64K range
//! `R` of host ids. An idmapped mount of the merged overlay is refused by the kernel (only
//! layers can be idmapped), so each *lower* layer is an idmapped clone: the base (host 0..64K
//! seen as `R..R+64K`), and each read-only layer from the range it was written in (another
//! workspace's, for a fork) to `R`. The upper layer belongs to `R`: the merged tree is owned by
//! the container's range as if it had been chowned, without writing a byte of the layers below.
//! nspawn (`--private-users=pick`) reads the range from the tree's root and takes it; the chown
//! it would do finds the tree already shifted.
//!
//! Layout, beside the trees, in `<machines_dir>/.agent-workspaces-layers/`:
//! - `.shared/<id>/`: one layer: `tree/` (its files), `meta` (the range they are owned by),
//!   `work/` while it is a workspace's upper layer. Made as `<id>.tmp` and renamed when whole.
//! - `<name>/state`: the workspace's stack (the base, its range, its upper layer, the
//!   read-only layers under it, its snapshots, each a list of layers), replaced atomically: the
//!   one commit point of every change. A layer no state names is removed (`collect`), so
//!   "reference counts" are the states themselves, counted at start-up and after each removal,
//!   and a crash at any step leaves the old stack or the new one.
//! - `<name>/upper`, `<name>/work`, `<name>/base`: a tree made before snapshots, taken into
//!   `.shared` the first time its layers change (`intent` says the move while it is made).
//!
//! The overlay is mounted at `<machines_dir>/<name>`, so every path to the tree, `machinectl
//! list-images` and the confined access of `Tree` stay as they are. Where the file system
//! cannot do this (overlayfs as an upper layer, no idmapped mounts), the build unpacks a full
//! tree as before.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod at;
mod changes;
mod files;
mod flatten;
mod mount;
mod probe;
mod reclaim;

pub use changes::*;
use files::{copy_layer, disk_usage_of};
pub use flatten::*;
use mount::mount;
pub use probe::{FIX as COPY_ON_WRITE_FIX, probe};
pub use reclaim::{Reclaimed, base_lock, reclaim_bases};

const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
/// The size of a container's id range, as nspawn's.
const RANGE: u32 = 0x1_0000;
/// The ranges nspawn's `--private-users=pick` chooses from.
const PICK_MIN: u32 = 0x0008_0000;
const PICK_MAX: u32 = 0x6FFF_0000;
/// Where the layers are, beside the trees.
const LAYERS: &str = ".agent-workspaces-layers";
/// The layers, each in a directory named by its id (no workspace name starts with a dot).
const SHARED: &str = ".shared";
/// A workspace's stack.
const STATE: &str = "state";
/// A move under way (a tree from before snapshots taken into `.shared`).
const INTENT: &str = "intent";
/// A fork whose record is not saved yet: removed at start-up if it has none.
const FORKING: &str = "forking";
/// What is being removed: renamed here under the lock (fast), deleted after it is let go, so
/// no commit waits for the unlinking of a big layer (a running snapshot holds its container
/// frozen while it waits for the lock).
const TRASH: &str = ".trash";
/// Read-only layers a tree may stack over its base. A snapshot or fork past it is refused
/// with a message that says how to go on (a rebuild, or a fork of a shallower snapshot).
pub const MAX_LOWERS: usize = 64;

/// This process, as the marks it leaves say it: its PID and start time (a PID alone could be
/// another's after a restart). A start-up's clean-up leaves what a live process of its own is
/// making (a fork under way, a layer half copied) to that process.
pub(super) fn token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        // Field 22 of /proc/self/stat, counted after the command's closing parenthesis.
        let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let start = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .unwrap_or("0");
        format!("{}-{start}", std::process::id())
    })
}

/// The name a layer is made under before it is whole: its id, and the process making it.
pub(super) fn tmp_name(id: &str) -> String {
    format!("{id}.{}.tmp", token())
}

/// Held while states are replaced and while unused layers are looked for, by every process
/// that does either (the service; a build unit): a layer made by one change is never taken
/// for garbage by another's collection. A `flock` of `<layers>/.lock`, let go when dropped.
fn lock(layers: &Path) -> io::Result<nix::fcntl::Flock<fs::File>> {
    fs::create_dir_all(layers)?;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(layers.join(".lock"))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))
}

/// A named, read-only state of a workspace's tree: the layers it is made of, top first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub layers: Vec<String>,
    pub created_usec: u64,
}

/// A workspace's stack, as `<name>/state` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// The unpacked base tree at the bottom.
    base: PathBuf,
    /// The container's range: the owner of the upper layer's files.
    range: u32,
    /// The writable layer in `.shared`; none for a tree from before snapshots, whose upper
    /// layer is `<name>/upper`.
    upper: Option<String>,
    /// Read-only layers between the upper layer and the base, top first.
    #[serde(default)]
    lowers: Vec<String>,
    #[serde(default)]
    snapshots: Vec<Snapshot>,
    /// Layers a flatten replaced that the tree's mount still reads: named (so kept) until
    /// the tree is next mounted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    retired: Vec<String>,
}

/// What a layer says of itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    /// The range its files are owned by.
    range: u32,
}

/// A move of a tree from before snapshots into `.shared`, written before it is made.
#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    moves: Vec<(PathBuf, PathBuf)>,
    state: State,
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

fn layers_of(tree: &Path) -> PathBuf {
    layers_dir(tree.parent().unwrap_or(Path::new("/")))
}

fn shared(layers: &Path, id: &str) -> PathBuf {
    layers.join(SHARED).join(id)
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
    let dir = layer_dir(tree);
    dir.join(STATE).is_file() || dir.join(INTENT).is_file() || dir.join("base").is_file()
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

/// Writes `bytes` to `path` whole or not at all (a temporary file, synced, renamed over it).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| other(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| other(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// The stack of the workspace whose layer directory is `dir`: its state, or what a tree from
/// before snapshots says of itself; None for a tree without layers. A move left half made is
/// finished first.
fn read_state(dir: &Path) -> io::Result<Option<State>> {
    settle(dir)?;
    if let Some(state) = read_json::<State>(&dir.join(STATE))? {
        return Ok(Some(state));
    }
    let base = match fs::read(dir.join("base")) {
        Ok(b) => PathBuf::from(std::ffi::OsStr::from_bytes(&b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let range = fs::metadata(dir.join("upper"))?.uid();
    Ok(Some(State {
        base,
        range,
        upper: None,
        lowers: Vec::new(),
        snapshots: Vec::new(),
        retired: Vec::new(),
    }))
}

/// Finishes a move an `intent` describes: each move not made yet is made, then the state is
/// committed and the intent removed.
fn settle(dir: &Path) -> io::Result<()> {
    let Some(intent) = read_json::<Intent>(&dir.join(INTENT))? else {
        return Ok(());
    };
    for (from, to) in &intent.moves {
        if from.exists() && !to.exists() {
            fs::rename(from, to)?;
        }
    }
    write_json(&dir.join(STATE), &intent.state)?;
    let _ = fs::remove_file(dir.join("base"));
    fs::remove_file(dir.join(INTENT))
}

fn check_range(range: u32, what: &Path) -> io::Result<()> {
    if !range.is_multiple_of(RANGE) || range == 0 {
        return Err(other(format!(
            "{}: owned by {range}, not a container's range",
            what.display()
        )));
    }
    Ok(())
}

/// A new, empty layer owned by `range` with the mode `mode` at its root, with a work
/// directory: made as `<id>.tmp`, returned with its id once renamed (under the lock, so no
/// collection sees it unnamed by a state: the caller commits a state naming it before it
/// lets the lock go).
fn new_upper(layers: &Path, range: u32, mode: u32) -> io::Result<(String, PathBuf)> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = shared(layers, &tmp_name(&id));
    fs::create_dir_all(tmp.parent().unwrap_or(layers))?;
    fs::create_dir(&tmp)?;
    let tree = tmp.join("tree");
    fs::create_dir(&tree)?;
    fs::set_permissions(&tree, fs::Permissions::from_mode(mode))?;
    std::os::unix::fs::chown(&tree, Some(range), Some(range))?;
    fs::create_dir(tmp.join("work"))?;
    write_json(&tmp.join("meta"), &Meta { range })?;
    Ok((id, tmp))
}

/// Renames a layer made as `<id>.tmp` to its id.
fn publish(layers: &Path, id: &str, tmp: &Path) -> io::Result<()> {
    fs::rename(tmp, shared(layers, id))
}

/// Where the upper layer of a stack is: its files and its work directory.
fn upper_paths(layers: &Path, dir: &Path, st: &State) -> (PathBuf, PathBuf) {
    match &st.upper {
        Some(id) => (
            shared(layers, id).join("tree"),
            shared(layers, id).join("work"),
        ),
        None => (dir.join("upper"), dir.join("work")),
    }
}

/// Makes a fresh layer for `tree` over the unpacked base tree `base` and mounts it at `tree`
/// (created). Whatever layers the tree had are gone first. On an error nothing is left.
pub fn create(base: &Path, tree: &Path) -> io::Result<()> {
    remove(tree)?;
    let result = (|| {
        let dir = layer_dir(tree);
        let layers = layers_of(tree);
        fs::create_dir_all(&layers)?;
        fs::set_permissions(&layers, fs::Permissions::from_mode(0o700))?;
        fs::create_dir(&dir)?;
        let root_mode = fs::metadata(base)?.mode() & 0o7777;
        // Mounted under the lock, like every mount of a stack: a flatten's commit, under it
        // too, knows from `is_mounted` whether a mount reads the layers it replaces.
        let _held = lock(&layers)?;
        let range = pick_range(&layers);
        let (id, tmp) = new_upper(&layers, range, root_mode)?;
        publish(&layers, &id, &tmp)?;
        let state = State {
            base: base.to_path_buf(),
            range,
            upper: Some(id),
            lowers: Vec::new(),
            snapshots: Vec::new(),
            retired: Vec::new(),
        };
        write_json(&dir.join(STATE), &state)?;
        fs::create_dir(tree)?;
        mount(&layers, &dir, &state, tree)
    })();
    if result.is_err() {
        let _ = remove(tree);
    }
    result
}

/// Mounts the tree's layers again if they are not mounted (after a reboot).
pub fn ensure_mounted(tree: &Path) -> io::Result<()> {
    if !has_layer(tree) || is_mounted(tree) {
        return Ok(());
    }
    // Two callers at once (the start-up's pass over every tree, a command starting its
    // container) mount it once.
    let _held = lock(&layers_of(tree))?;
    if is_mounted(tree) {
        return Ok(());
    }
    let dir = layer_dir(tree);
    let Some(mut state) = read_state(&dir)? else {
        return Ok(());
    };
    fs::create_dir_all(tree)?;
    mount(&layers_of(tree), &dir, &state, tree)?;
    // Nothing reads the layers a flatten retired any more.
    if !state.retired.is_empty() && state.upper.is_some() {
        state.retired.clear();
        write_json(&dir.join(STATE), &state)?;
        drop(_held);
        collect(&layers_of(tree), false)?;
    }
    Ok(())
}

/// Unmounts the tree and removes it and its layer directory; the layers nothing else uses
/// go with it. Nothing there: nothing to do.
pub fn remove(tree: &Path) -> io::Result<()> {
    unmount(tree)?;
    match fs::remove_dir_all(tree) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let layers = layers_of(tree);
    let dir = layer_dir(tree);
    if dir.exists() {
        // Under the lock: a flatten's commit either wrote its state before (and the layers it
        // names are collected below) or finds none and drops its layer.
        let trashed = {
            let _held = lock(&layers)?;
            to_trash(&layers, &dir)?
        };
        empty_trash(std::slice::from_ref(&trashed));
    }
    collect(&layers, false)
}

/// Renames `path` into the trash (the lock held); where it went.
fn to_trash(layers: &Path, path: &Path) -> io::Result<PathBuf> {
    let trash = layers.join(TRASH);
    fs::create_dir_all(&trash)?;
    let to = trash.join(tmp_name(&uuid::Uuid::new_v4().simple().to_string()));
    fs::rename(path, &to)?;
    Ok(to)
}

/// Deletes what was put in the trash (the lock let go). What a crash leaves there goes at the
/// next start-up; an error leaves it for then too.
fn empty_trash(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = fs::remove_dir_all(p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("Cannot remove {}: {e}", p.display());
        }
    }
}

fn unmount(tree: &Path) -> io::Result<()> {
    if is_mounted(tree) {
        nix::mount::umount2(tree, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    Ok(())
}

/// Removes the layers in `.shared` that no workspace's state names. A state that cannot be
/// read stops the collection (nothing is removed on a guess). `startup`: layers left half
/// made (`.tmp`) by a change a crash ended go too.
pub fn collect(layers: &Path, startup: bool) -> io::Result<()> {
    let mut trashed = Vec::new();
    if startup {
        // Left by a process a crash ended (this one's own are being emptied by it).
        for e in fs::read_dir(layers.join(TRASH))
            .into_iter()
            .flatten()
            .flatten()
        {
            if !e
                .file_name()
                .to_string_lossy()
                .ends_with(&format!(".{}.tmp", token()))
            {
                trashed.push(e.path());
            }
        }
    }
    {
        let _held = lock(layers)?;
        let entries = match fs::read_dir(layers.join(SHARED)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                drop(_held);
                empty_trash(&trashed);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let used = used_layers(layers)?;
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let unused = match id.strip_suffix(".tmp") {
                // Half made by a process a crash ended; one this process is making is its own.
                Some(rest) => startup && !rest.ends_with(&format!(".{}", token())),
                None => !used.contains(&id),
            };
            if unused {
                trashed.push(to_trash(layers, &e.path())?);
            }
        }
    }
    empty_trash(&trashed);
    Ok(())
}

/// Every layer a state (or a move under way) names.
fn used_layers(layers: &Path) -> io::Result<std::collections::HashSet<String>> {
    let mut used = std::collections::HashSet::new();
    for e in fs::read_dir(layers)?.flatten() {
        if e.file_name().as_bytes().starts_with(b".") {
            continue;
        }
        let dir = e.path();
        let mut states = Vec::new();
        states.extend(read_json::<State>(&dir.join(STATE))?);
        states.extend(read_json::<Intent>(&dir.join(INTENT))?.map(|i| i.state));
        for st in states {
            used.extend(st.upper.iter().cloned());
            used.extend(st.lowers.iter().cloned());
            used.extend(st.retired.iter().cloned());
            for s in st.snapshots {
                used.extend(s.layers);
            }
        }
    }
    Ok(used)
}

/// A 64K-aligned range in nspawn's pick range that no running nspawn holds (nspawn locks the
/// range it uses in `/run/systemd/nspawn-uid/<base>`) and no other layer in `layers` has (a
/// stopped container holds no lock), at random like nspawn's own pick.
fn pick_range(layers: &Path) -> u32 {
    let mut taken: Vec<u32> = Vec::new();
    for e in fs::read_dir(layers).into_iter().flatten().flatten() {
        if let Ok(Some(st)) = read_json::<State>(&e.path().join(STATE)) {
            taken.push(st.range);
        } else if let Ok(m) = fs::metadata(e.path().join("upper")) {
            taken.push(m.uid());
        }
    }
    for e in fs::read_dir(layers.join(SHARED))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(Some(meta)) = read_json::<Meta>(&e.path().join("meta")) {
            taken.push(meta.range);
        }
    }
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
