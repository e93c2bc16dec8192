//! Flattening: adjacent read-only layers of one range merged into one, in the background,
//! once a stack is deeper than `FLATTEN_AT` (every snapshot of a stopped tree and every fork
//! of one adds a layer; overlayfs reads each lookup through all of them, and `MAX_LOWERS` is
//! the bound past which snapshots and forks are refused).
//!
//! The merged layer is made of **hard links** to the files of the layers it replaces, and new
//! directories: no file's data is copied and no owner rewritten (so only layers owned by the
//! same range are merged; a fork's layers and its source's stay apart). Read-only layers never
//! change, so the links share nothing that is ever written. What overlayfs would show through
//! the run, the merged layer shows: per name, the topmost layer's entry wins; a whiteout stays
//! a whiteout; a directory merges the directories below it down to an opaque one, a whiteout
//! or a file, and is made opaque itself when anything stopped it (what lies under the run must
//! stay hidden). Mounts are made with `redirect_dir=off,metacopy=off`, so no layer holds a
//! redirected directory or a file whose data is elsewhere; one that does is refused.
//!
//! The walk reads layers a container wrote (hostile names, links, depths) with descriptors
//! only: every directory is opened beneath its layer's root with `openat2` refusing symbolic
//! links and mount crossings; entries are linked with `linkat` (which never follows a link).
//! A directory deeper than `PATH_MAX` fails the flatten, which only leaves the stack as deep
//! as it was.
//!
//! Committing: under the lock, every run is replaced by its merged layer wherever it appears
//! in the state (the stack and the snapshots). A mounted tree keeps reading the old layers
//! until it is mounted again, so they stay named (`retired`) until then. A crash before the
//! commit leaves a `.tmp` layer the next start-up removes.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{FileStat, Mode};

use super::at::*;
use super::*;

/// The read-only layers a stack holds before it is flattened in the background.
pub const FLATTEN_AT: usize = 16;

/// What a flatten did: read-only layers in the stack before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flattened {
    pub before: usize,
    pub after: usize,
}

/// The read-only layers of the tree's stack (0 for a tree without layers).
pub fn depth(tree: &Path) -> io::Result<usize> {
    Ok(read_state(&layer_dir(tree))?.map_or(0, |st| st.lowers.len()))
}

/// Flattens the tree's stack if it is deeper than `FLATTEN_AT` and than `floor`: see the
/// module's note. None: nothing to do (shallow enough, or no run of two layers of one range).
pub fn flatten_if_deep(tree: &Path, floor: usize) -> io::Result<Option<Flattened>> {
    if depth(tree)? <= FLATTEN_AT.max(floor) {
        return Ok(None);
    }
    flatten(tree)
}

/// Merges each run of two or more adjacent read-only layers owned by one range into one.
pub fn flatten(tree: &Path) -> io::Result<Option<Flattened>> {
    let dir = layer_dir(tree);
    let layers = layers_of(tree);
    let st = changes::stack(tree)?;
    let mut runs: Vec<(Vec<String>, u32)> = Vec::new();
    for id in &st.lowers {
        let range = read_json::<Meta>(&shared(&layers, id).join("meta"))?
            .ok_or_else(|| other(format!("layer {id} is missing")))?
            .range;
        match runs.last_mut() {
            Some((run, r)) if *r == range => run.push(id.clone()),
            _ => runs.push((vec![id.clone()], range)),
        }
    }
    runs.retain(|(run, _)| run.len() >= 2);
    if runs.is_empty() {
        return Ok(None);
    }
    // What lies under a run: the rest of the stack and the base (the same wherever the run
    // appears: a layer only ever lies over the history it was written on).
    let below = |run: &[String]| -> Vec<PathBuf> {
        let last = run.last().map(String::as_str);
        let at = st.lowers.iter().position(|l| Some(l.as_str()) == last);
        let mut under: Vec<PathBuf> = at
            .map(|i| {
                st.lowers[i + 1..]
                    .iter()
                    .map(|l| shared(&layers, l).join("tree"))
                    .collect()
            })
            .unwrap_or_default();
        under.push(st.base.clone());
        under
    };
    let mut merged: Vec<(Vec<String>, String, PathBuf)> = Vec::new();
    let discard = |merged: &[(Vec<String>, String, PathBuf)]| {
        for (_, _, tmp) in merged {
            let _ = fs::remove_dir_all(tmp);
        }
    };
    for (run, range) in runs {
        match merge(&layers, &run, range, &below(&run)) {
            Ok((id, tmp)) => merged.push((run, id, tmp)),
            Err(e) => {
                discard(&merged);
                return Err(e);
            }
        }
    }
    crate::failpoint::hit("flatten-merged");
    let committed = (|| {
        let _held = lock(&layers)?;
        let mut st = changes::stack(tree)?;
        let before = st.lowers.len();
        let mounted = is_mounted(tree);
        let mut kept = Vec::new();
        for (run, id, tmp) in &merged {
            let mut used = false;
            if replace_run(&mut st.lowers, run, id) {
                used = true;
                if mounted {
                    st.retired.extend(run.iter().cloned());
                }
            }
            for s in &mut st.snapshots {
                used |= replace_run(&mut s.layers, run, id);
            }
            if used {
                publish(&layers, id, tmp)?;
                kept.push(tmp.clone());
            } else {
                let _ = fs::remove_dir_all(tmp);
            }
        }
        crate::failpoint::hit("flatten-published");
        write_json(&dir.join(STATE), &st)?;
        Ok::<_, io::Error>(Flattened {
            before,
            after: st.lowers.len(),
        })
    })();
    match committed {
        Ok(f) => {
            // Done: what is left unnamed goes now, or at the next collection.
            if let Err(e) = collect(&layers, false) {
                tracing::warn!("Cannot remove the layers a flatten replaced yet: {e}");
            }
            Ok(Some(f))
        }
        Err(e) => {
            discard(&merged);
            // Published but not committed: unnamed, so collected.
            let _ = collect(&layers, false);
            Err(e)
        }
    }
}

/// Replaces each appearance of `run` (adjacent, in order) in `list` by `id`.
fn replace_run(list: &mut Vec<String>, run: &[String], id: &str) -> bool {
    let mut replaced = false;
    let mut i = 0;
    while i + run.len() <= list.len() {
        if list[i..i + run.len()] == *run {
            list.splice(i..i + run.len(), [id.to_owned()]);
            replaced = true;
        }
        i += 1;
    }
    replaced
}

/// Whether the directory open at `fd` is opaque; an error for what this merge cannot carry
/// (a redirect, an opaque directory holding extended-attribute whiteouts).
fn opaque(fd: BorrowedFd<'_>, what: &Path) -> io::Result<bool> {
    if get_xattr(fd, c"trusted.overlay.redirect")?.is_some() {
        return Err(other(format!(
            "{} is a redirected directory (redirect_dir), which a flatten cannot merge",
            what.display()
        )));
    }
    match get_xattr(fd, OPAQUE)?.as_deref() {
        None => Ok(false),
        Some(b"y") => Ok(true),
        Some(v) => Err(other(format!(
            "{}: opaque mark {:?}, which a flatten cannot merge",
            what.display(),
            String::from_utf8_lossy(v)
        ))),
    }
}

/// Gives the directory `dst` the owner, mode and extended attributes (overlayfs's own aside)
/// of `src`, and the opaque mark if `opaque`.
fn copy_dir_meta(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, opaque: bool) -> io::Result<FileStat> {
    let st = nix::sys::stat::fstat(src)?;
    nix::unistd::fchown(
        dst,
        Some(nix::unistd::Uid::from_raw(st.st_uid)),
        Some(nix::unistd::Gid::from_raw(st.st_gid)),
    )?;
    nix::sys::stat::fchmod(dst, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    for name in list_xattrs(src)? {
        if name.to_bytes().starts_with(OVERLAY_PREFIX) {
            continue;
        }
        if let Some(value) = get_xattr(src, &name)? {
            set_xattr(dst, &name, &value)?;
        }
    }
    if opaque {
        set_xattr(dst, OPAQUE, b"y")?;
    }
    Ok(st)
}

/// Merges the layers `run` (top first, all owned by `range`; over the trees `below`) into a
/// new layer made as `<id>.tmp` (removed again on an error). The caller publishes it under
/// the lock.
fn merge(
    layers: &Path,
    run: &[String],
    range: u32,
    below: &[PathBuf],
) -> io::Result<(String, PathBuf)> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = shared(layers, &tmp_name(&id));
    fs::create_dir_all(layers.join(SHARED))?;
    fs::create_dir(&tmp)?;
    let made = (|| {
        write_json(&tmp.join("meta"), &Meta { range })?;
        fs::create_dir(tmp.join("tree"))?;
        let roots = run
            .iter()
            .map(|l| open_dir(&shared(layers, l).join("tree")))
            .collect::<io::Result<Vec<_>>>()?;
        let under = below
            .iter()
            .map(|p| open_dir(p))
            .collect::<io::Result<Vec<_>>>()?;
        let out_root = open_dir(&tmp.join("tree"))?;
        merge_trees(&roots, &under, out_root.as_fd())
    })();
    match made {
        Ok(()) => Ok((id, tmp)),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The directories of the trees `under` (given as their open directories at the same path, in
/// order) that show through below it at `name`, as overlayfs looks down: a directory shows
/// and the look goes on, unless it is opaque; a whiteout or a file ends it. Indices into `dirs`.
fn showing_below(dirs: &[(usize, OwnedFd)], name: &CStr, path: &Path) -> io::Result<Vec<usize>> {
    let mut out = Vec::new();
    for (i, d) in dirs {
        match stat_at(d.as_fd(), name)? {
            None => continue,
            Some(st) if is_dir(&st) => {
                out.push(*i);
                if opaque(open_sub(d.as_fd(), name)?.as_fd(), path)? {
                    break;
                }
            }
            Some(_) => break,
        }
    }
    Ok(out)
}

/// Whether a whiteout of `name` still hides something: what overlayfs would find below the
/// run there (the first of `dirs` that has the name) is an entry, not a whiteout.
fn hides_something(dirs: &[(usize, OwnedFd)], name: &CStr) -> io::Result<bool> {
    for (_, d) in dirs {
        if let Some(st) = stat_at(d.as_fd(), name)? {
            return Ok(!is_whiteout(&st));
        }
    }
    Ok(false)
}

/// Directories of one union (a directory with more names) or in all (more directories) that a
/// flatten refuses: a container could make millions, and the merge keeps them in memory.
const MAX_NAMES_PER_DIRECTORY: usize = 1 << 20;
const MAX_DIRECTORIES: usize = 1 << 21;

/// The merge itself: `roots` (top first) into the empty directory `out_root`. Iterative (a
/// stack of directories still to merge, each with the layers of the run that show through it
/// and the trees under the run that do), so no descriptor is held across levels.
///
/// A whiteout is kept only where it still hides something under the run: one that hid an
/// entry of the run hides it by that entry's absence; one in a directory nothing under the
/// run shows through would be listed by overlayfs as an entry (it filters whiteouts only in
/// directories it merges).
fn merge_trees(roots: &[OwnedFd], under: &[OwnedFd], out_root: BorrowedFd<'_>) -> io::Result<()> {
    let root_stat = copy_dir_meta(roots[0].as_fd(), out_root, false)?;
    let mut times = vec![(PathBuf::new(), root_stat)];
    let mut todo: Vec<(PathBuf, Vec<usize>, Vec<usize>)> = vec![(
        PathBuf::new(),
        (0..roots.len()).collect(),
        (0..under.len()).collect(),
    )];
    while let Some((rel, chain, showing)) = todo.pop() {
        let dirs = chain
            .iter()
            .map(|&i| open_beneath(roots[i].as_fd(), &rel))
            .collect::<io::Result<Vec<_>>>()?;
        let below = showing
            .iter()
            .map(|&i| open_beneath(under[i].as_fd(), &rel).map(|d| (i, d)))
            .collect::<io::Result<Vec<_>>>()?;
        let out = open_beneath(out_root, &rel)?;
        let mut all = BTreeSet::new();
        for d in &dirs {
            all.extend(names(d.as_fd())?);
            if all.len() > MAX_NAMES_PER_DIRECTORY {
                return Err(other(format!(
                    "{}: more than {MAX_NAMES_PER_DIRECTORY} names in one directory",
                    rel.display()
                )));
            }
        }
        for name in all {
            let mut top = None;
            for (k, d) in dirs.iter().enumerate() {
                if let Some(st) = stat_at(d.as_fd(), &name)? {
                    top = Some((k, st));
                    break;
                }
            }
            let Some((k, st)) = top else { continue };
            let path = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            if is_whiteout(&st) && !hides_something(&below, &name)? {
                continue;
            }
            if !is_dir(&st) {
                // A file, link, device, whiteout: the same inode (no data copied).
                nix::unistd::linkat(
                    dirs[k].as_fd(),
                    name.as_c_str(),
                    out.as_fd(),
                    name.as_c_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("{}: {e}", path.display()),
                    )
                })?;
                continue;
            }
            let src = open_sub(dirs[k].as_fd(), &name)?;
            let mut stopped = opaque(src.as_fd(), &path)?;
            let mut sub = vec![chain[k]];
            for (k2, d) in dirs.iter().enumerate().skip(k + 1) {
                if stopped {
                    break;
                }
                match stat_at(d.as_fd(), &name)? {
                    None => {}
                    Some(s) if is_dir(&s) => {
                        sub.push(chain[k2]);
                        stopped = opaque(open_sub(d.as_fd(), &name)?.as_fd(), &path)?;
                    }
                    // A whiteout or a file: what is below it is hidden.
                    Some(_) => stopped = true,
                }
            }
            // Nothing under the run shows through an opaque directory.
            let sub_showing = if stopped {
                Vec::new()
            } else {
                showing_below(&below, &name, &path)?
            };
            nix::sys::stat::mkdirat(
                out.as_fd(),
                name.as_c_str(),
                Mode::from_bits_truncate(0o700),
            )
            .map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("{}: {e}", path.display()),
                )
            })?;
            let made = open_sub(out.as_fd(), &name)?;
            let st = copy_dir_meta(src.as_fd(), made.as_fd(), stopped)?;
            if times.len() >= MAX_DIRECTORIES {
                return Err(other(format!(
                    "more than {MAX_DIRECTORIES} directories to merge"
                )));
            }
            times.push((path.clone(), st));
            todo.push((path, sub, sub_showing));
        }
    }
    // Last: making entries in a directory changes its times.
    for (rel, st) in times {
        let d = open_beneath(out_root, &rel)?;
        nix::sys::stat::futimens(
            d.as_fd(),
            &nix::sys::time::TimeSpec::new(st.st_atime, st.st_atime_nsec),
            &nix::sys::time::TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
