//! The flatten against real overlay mounts, in a mount namespace of the test's own.

use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

const R: u32 = 0x0009_0000;

/// Runs `body` as root in a mount namespace of its own (a thread unshared from the
/// process's), so the overlays and the tmpfs it mounts go when it ends; skipped (and
/// says so) where the tests do not run as root.
fn in_own_mount_namespace(body: impl FnOnce() + Send + 'static) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (mounts, whiteouts, trusted.* attributes)");
        return;
    }
    let joined = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        body();
    })
    .join();
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
}

fn layer(layers: &Path, id: &str) -> PathBuf {
    let t = shared(layers, id).join("tree");
    fs::create_dir_all(&t).unwrap();
    write_json(&shared(layers, id).join("meta"), &Meta { range: R }).unwrap();
    t
}

fn put(root: &Path, rel: &str, body: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, body).unwrap();
}

fn whiteout(root: &Path, rel: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    nix::sys::stat::mknod(&p, nix::sys::stat::SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
}

fn make_opaque(root: &Path, rel: &str) {
    let p = root.join(rel);
    fs::create_dir_all(&p).unwrap();
    set_xattr(open_dir(&p).unwrap().as_fd(), OPAQUE, b"y").unwrap();
}

/// A workspace `box` in `top/machines` whose stack is C over B over A over a base, with
/// what overlayfs must merge: changed and deleted files, whiteouts, opaque directories, a
/// file over a directory, hard links, a link pointing out of the tree, owners, a fifo.
/// Returns the tree's path.
fn stack_of_three(top: &Path) -> PathBuf {
    let machines = top.join("machines");
    let layers = layers_dir(&machines);
    let base = top.join("base");
    put(&base, "etc/keep", "base keep");
    put(&base, "etc/gone", "base gone");
    put(&base, "opt/d/old", "base old");
    put(&base, "usr/file", "base usr");
    put(&base, "w/b/x", "base x, under b's opaque w");
    let a = layer(&layers, "a");
    put(&a, "a/one", "a one");
    put(&a, "a/dir/x", "a x");
    put(&a, "a/h1", "linked");
    fs::hard_link(a.join("a/h1"), a.join("a/h2")).unwrap();
    symlink("/etc/passwd", a.join("a/out")).unwrap();
    put(&a, "deep/er/file", "a deep");
    put(&a, "etc/added", "a added");
    let b = layer(&layers, "b");
    whiteout(&b, "etc/gone");
    put(&b, "a/one", "b one");
    std::os::unix::fs::chown(b.join("a/one"), Some(R + 1000), Some(R + 1000)).unwrap();
    put(&b, "a/dir/y", "b y");
    whiteout(&b, "a/h2");
    put(&b, "b/two", "b two");
    fs::set_permissions(b.join("b"), fs::Permissions::from_mode(0o750)).unwrap();
    make_opaque(&b, "w");
    put(&b, "w/b/x", "b x");
    make_opaque(&b, "q");
    put(&b, "q/f", "b f");
    put(&a, "q/old", "hidden by b's opaque q");
    let c = layer(&layers, "c");
    // c's w/b merges with b's, whose opaque w hides the base's: c's whiteout of w/b/x hides
    // b's x only, and once merged nothing under the run shows through w.
    fs::create_dir_all(c.join("w/b")).unwrap();
    whiteout(&c, "w/b/x");
    whiteout(&c, "q/f");
    put(&c, "q/g", "c g");
    make_opaque(&c, "a/dir");
    put(&c, "a/dir/z", "c z");
    make_opaque(&c, "opt/d");
    put(&c, "opt/d/new", "c new");
    put(&c, "deep", "now a file");
    nix::unistd::mkfifo(&c.join("a/fifo"), Mode::from_bits_truncate(0o640)).unwrap();
    put(&c, "b/three", "c three");
    let upper = layer(&layers, "u");
    fs::create_dir(shared(&layers, "u").join("work")).unwrap();
    let _ = upper;
    let dir = layers.join("box");
    fs::create_dir_all(&dir).unwrap();
    let st = State {
        base,
        range: R,
        upper: Some("u".into()),
        lowers: vec!["c".into(), "b".into(), "a".into()],
        snapshots: vec![
            Snapshot {
                name: "older".into(),
                layers: vec!["b".into(), "a".into()],
                created_usec: 1,
            },
            Snapshot {
                name: "latest".into(),
                layers: vec!["c".into(), "b".into(), "a".into()],
                created_usec: 2,
            },
        ],
        retired: Vec::new(),
    };
    write_json(&dir.join(STATE), &st).unwrap();
    machines.join("box")
}

/// What overlayfs shows of `lowers` (top first), read-only, at `at`.
fn view(lowers: &[PathBuf], at: &Path) {
    fs::create_dir_all(at).unwrap();
    let l: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    nix::mount::mount(
        Some("overlay"),
        at,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={},redirect_dir=off,metacopy=off", l.join(":")).as_str()),
    )
    .unwrap();
}

/// Every entry under `root`: its type, mode, owner, times and contents (or link target).
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let what = if m.is_dir() {
                todo.push(p.clone());
                "dir".to_owned()
            } else if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_file() {
                format!("file {:?}", fs::read_to_string(&p).unwrap())
            } else {
                format!("special {:o}", m.mode() & 0o170000)
            };
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mtime = if m.is_dir() { 0 } else { m.mtime_nsec() };
            out.insert(
                rel,
                format!(
                    "{what} {:o} {}:{} {mtime}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
        }
    }
    out
}

#[test]
fn a_flattened_run_shows_what_the_run_showed() {
    in_own_mount_namespace(|| {
        let tmp = tempfile::tempdir().unwrap();
        let tree = stack_of_three(tmp.path());
        let layers = layers_of(&tree);
        let t = |id: &str| shared(&layers, id).join("tree");
        let base = tmp.path().join("base");
        view(
            &[t("c"), t("b"), t("a"), base.clone()],
            &tmp.path().join("before"),
        );
        let before = describe(&tmp.path().join("before"));
        // The merge had something to do: a whiteout, an opaque directory, a file over a
        // directory each showed.
        assert!(!before.contains_key("etc/gone") && !before.contains_key("a/h2"));
        assert!(!before.contains_key("a/dir/x") && !before.contains_key("opt/d/old"));
        assert!(before["deep"].starts_with("file"), "{before:?}");
        assert!(before.contains_key("q/g") && !before.contains_key("q/f"));
        assert!(!before.contains_key("q/old"));
        assert!(before["a/one"].contains(&format!("{}:{}", R + 1000, R + 1000)));

        let done = flatten(&tree).unwrap().unwrap();
        assert_eq!(
            done,
            Flattened {
                before: 3,
                after: 1
            }
        );
        let st = changes::stack(&tree).unwrap();
        let f = st.lowers[0].clone();
        assert!(!["a", "b", "c"].contains(&f.as_str()));
        assert_eq!(
            st.snapshots[1].layers,
            vec![f.clone()],
            "the same run, replaced"
        );
        assert_eq!(
            st.snapshots[0].layers,
            vec!["b", "a"],
            "not the whole run: kept"
        );
        assert!(st.retired.is_empty(), "the tree is not mounted");
        assert!(!shared(&layers, "c").exists(), "c is named by nothing now");
        assert!(shared(&layers, "b").exists() && shared(&layers, "a").exists());

        view(&[t(&f), base], &tmp.path().join("after"));
        assert_eq!(describe(&tmp.path().join("after")), before);
        // The whiteout over the base's file stays; those that hid the run's own go.
        let kind = |p: PathBuf| fs::symlink_metadata(p).map(|m| m.mode() & 0o170000).ok();
        assert_eq!(kind(t(&f).join("etc/gone")), Some(0o020000));
        assert_eq!(kind(t(&f).join("a/h2")), None);
        assert_eq!(kind(t(&f).join("q/f")), None);
        assert_eq!(kind(t(&f).join("w/b/x")), None, "nothing under w shows");
        assert!(before.contains_key("w/b") && !before.contains_key("w/b/x"));
        // No data copied: the merged layer's files are the layers' own.
        let ino = |p: PathBuf| fs::symlink_metadata(p).unwrap().ino();
        assert_eq!(ino(t(&f).join("a/one")), ino(t("b").join("a/one")));
        assert_eq!(ino(t(&f).join("a/h1")), ino(t("a").join("a/h1")));
        assert!(
            fs::symlink_metadata(t(&f).join("a/out"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read_link(t(&f).join("a/out")).unwrap(),
            Path::new("/etc/passwd"),
            "the link was linked, not followed"
        );
    });
}

#[test]
fn a_mounted_tree_keeps_the_layers_it_reads_until_it_is_mounted_again() {
    in_own_mount_namespace(|| {
        let tmp = tempfile::tempdir().unwrap();
        let tree = stack_of_three(tmp.path());
        let layers = layers_of(&tree);
        // A mount of the stack at the tree (what `is_mounted` looks for).
        let t = |id: &str| shared(&layers, id).join("tree");
        view(&[t("c"), t("b"), t("a"), tmp.path().join("base")], &tree);
        assert!(is_mounted(&tree));
        flatten(&tree).unwrap().unwrap();
        let st = changes::stack(&tree).unwrap();
        assert_eq!(st.lowers.len(), 1);
        assert_eq!(st.retired, vec!["c", "b", "a"]);
        assert!(shared(&layers, "c").exists(), "the mount still reads it");
        assert_eq!(fs::read_to_string(tree.join("a/dir/z")).unwrap(), "c z");
    });
}

#[test]
fn a_full_disk_during_a_flatten_leaves_the_stack_as_it_was() {
    in_own_mount_namespace(|| {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("fs");
        fs::create_dir(&top).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &top,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=8m,nr_inodes=4096"),
        )
        .unwrap();
        let tree = stack_of_three(&top);
        let layers = layers_of(&tree);
        // More directories to merge than will fit.
        for i in 0..64 {
            put(
                &shared(&layers, "a").join("tree"),
                &format!("many/d{i}/f"),
                "x",
            );
        }
        // Room for a few more inodes, not for the merged layer.
        let used = {
            let s = nix::sys::statvfs::statvfs(&top).unwrap();
            s.files() - s.files_free()
        };
        nix::mount::mount(
            None::<&str>,
            &top,
            None::<&str>,
            nix::mount::MsFlags::MS_REMOUNT,
            Some(format!("size=8m,nr_inodes={}", used + 20).as_str()),
        )
        .unwrap();
        let state_before = fs::read(layers.join("box").join(STATE)).unwrap();
        let e = flatten(&tree).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        assert!(e.to_string().contains("No space left"), "{e}");
        assert_eq!(
            fs::read(layers.join("box").join(STATE)).unwrap(),
            state_before,
            "the stack is as it was"
        );
        let left: Vec<String> = fs::read_dir(layers.join(SHARED))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "no half-made layer: {left:?}");
        for id in ["a", "b", "c"] {
            assert!(shared(&layers, id).join("tree").is_dir());
        }
        nix::mount::umount2(&top, nix::mount::MntFlags::MNT_DETACH).unwrap();
    });
}

#[test]
fn runs_are_replaced_wherever_they_appear() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut l = s(&["x", "c", "b", "a", "y"]);
    assert!(replace_run(&mut l, &s(&["c", "b", "a"]), "f"));
    assert_eq!(l, s(&["x", "f", "y"]));
    let mut l = s(&["c", "b"]);
    assert!(!replace_run(&mut l, &s(&["c", "b", "a"]), "f"));
    assert_eq!(l, s(&["c", "b"]));
}
