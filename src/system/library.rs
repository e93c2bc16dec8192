//! The Library: a directory (normally a git checkout) with `skill/<name>/`, `tool/<name>` and
//! `workspace-template/<name>.json`. Read afresh on every use, so a `git pull` there needs no
//! restart. Nothing is read or copied from outside it: names are single path elements, and
//! symlinks are copied only when they point inside the entry they belong to.
//!
//! Installs into a workspace are all or nothing: every listed entry is read and checked first,
//! then copied into a fresh directory beside `.opencode/skill` (or `tool`), which is swapped in
//! whole. The destination is a tree the service does not trust (a container's, or a workspace
//! directory): it is reached only through `tree::Tree`, so a link planted there is never
//! followed out of it.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::core::error::{Error, Result};
use crate::core::names::validate_library_name;
use crate::core::ports::{InstallTarget, Library};
use crate::core::template::Template;
use crate::system::containers::tree::{Tree, TreeDir};

pub struct FsLibrary {
    root: PathBuf,
}

fn lib_error(root: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Library(format!("The Library at {} {what}: {e}", root.display()))
}

impl FsLibrary {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The Library's real path; None when there is none yet (a fresh install: an absent
    /// Library is an empty one).
    fn root_checked(&self) -> Result<Option<PathBuf>> {
        match fs::canonicalize(&self.root) {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(lib_error(&self.root, "cannot be read", e)),
        }
    }

    /// The entry `<kind dir>/<name>` (plus `suffix`), resolved, and proven to be inside the
    /// Library; Ok(None) when there is no such entry.
    fn entry(&self, dir: &str, kind: &str, name: &str, suffix: &str) -> Result<Option<PathBuf>> {
        validate_library_name(kind, name).map_err(|e| Error::invalid(format!("{kind}s"), e))?;
        let Some(root) = self.root_checked()? else {
            return Ok(None);
        };
        let path = root.join(dir).join(format!("{name}{suffix}"));
        if fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let real = fs::canonicalize(&path)
            .map_err(|e| lib_error(&self.root, &format!("has a broken {kind} '{name}'"), e))?;
        if !real.starts_with(root.join(dir)) {
            return Err(Error::invalid(
                format!("{kind}s"),
                format!(
                    "{kind} '{name}' points outside the Library ({})",
                    real.display()
                ),
            ));
        }
        Ok(Some(real))
    }

    fn names_in(&self, dir: &str, suffix: &str) -> Result<Vec<String>> {
        let Some(root) = self.root_checked()? else {
            return Ok(Vec::new());
        };
        let d = root.join(dir);
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(lib_error(
                    &self.root,
                    &format!("has an unreadable {dir}/"),
                    e,
                ));
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let n = n.strip_suffix(suffix)?.to_owned();
                validate_library_name("entry", &n).ok().map(|()| n)
            })
            .collect();
        names.sort();
        Ok(names)
    }
}

/// One thing of a Library entry to copy: its path below the entry's parent (so the first
/// element is the entry's name), and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Dir {
        rel: PathBuf,
        mode: u32,
    },
    File {
        rel: PathBuf,
        src: PathBuf,
        mode: u32,
    },
    Link {
        rel: PathBuf,
        target: PathBuf,
    },
}

/// Items of one entry at most: a Library entry is a handful of files.
const ITEMS_MAX: usize = 100_000;

/// Everything below `src`, checked: symlinks must resolve inside `top` (the entry itself);
/// other file types (FIFOs, devices, sockets) are refused (`InvalidArgs`, whose field the
/// caller names).
fn plan_entry(src: &Path, rel: PathBuf, top: &Path, out: &mut Vec<Item>) -> Result<()> {
    let io_err = |p: &Path, e: io::Error| Error::io(format!("Cannot read {}", p.display()), e);
    if out.len() >= ITEMS_MAX {
        return Err(Error::invalid(
            "entry",
            format!("{} has more than {ITEMS_MAX} files", top.display()),
        ));
    }
    let meta = fs::symlink_metadata(src).map_err(|e| io_err(src, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(src).map_err(|e| io_err(src, e))?;
        let resolved = fs::canonicalize(src).ok();
        if !resolved.is_some_and(|r| r.starts_with(top)) {
            return Err(Error::invalid(
                "entry",
                format!(
                    "{} is a symlink pointing outside its Library entry ({})",
                    src.display(),
                    target.display()
                ),
            ));
        }
        out.push(Item::Link { rel, target });
    } else if meta.is_dir() {
        out.push(Item::Dir {
            rel: rel.clone(),
            mode,
        });
        let mut children: Vec<_> = fs::read_dir(src)
            .map_err(|e| io_err(src, e))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        children.sort();
        for name in children {
            plan_entry(&src.join(&name), rel.join(&name), top, out)?;
        }
    } else if meta.is_file() {
        out.push(Item::File {
            rel,
            src: src.to_path_buf(),
            mode,
        });
    } else {
        return Err(Error::invalid(
            "entry",
            format!(
                "{} is neither a file, a directory nor a symlink",
                src.display()
            ),
        ));
    }
    Ok(())
}

/// The directory holding `rel`'s last element below `base`, walked one element at a time
/// without following links; and that last element.
fn parent_of<'a>(base: &TreeDir, rel: &'a Path) -> io::Result<(Option<TreeDir>, &'a str)> {
    let mut elements: Vec<&str> = rel
        .iter()
        .map(|e| {
            e.to_str()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "name is not UTF-8"))
        })
        .collect::<io::Result<_>>()?;
    let last = elements
        .pop()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))?;
    let mut dir: Option<TreeDir> = None;
    for e in elements {
        dir = Some(dir.as_ref().unwrap_or(base).open_dir(e)?);
    }
    Ok((dir, last))
}

/// Copies the planned items into `staged` (a directory the service just made).
fn copy_items(staged: &TreeDir, items: &[Item]) -> io::Result<()> {
    for item in items {
        match item {
            Item::Dir { rel, mode } => {
                let (parent, name) = parent_of(staged, rel)?;
                parent.as_ref().unwrap_or(staged).create_dir(name, *mode)?;
            }
            Item::File { rel, src, mode } => {
                let (parent, name) = parent_of(staged, rel)?;
                // O_NOFOLLOW and O_NONBLOCK: the plan said "regular file"; if the Library changed
                // since, this fails rather than follows a new link or waits on a FIFO.
                let mut from = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(src)?;
                if !from.metadata()?.is_file() {
                    return Err(io::Error::other(format!(
                        "{} changed while it was copied",
                        src.display()
                    )));
                }
                let mut to = parent.as_ref().unwrap_or(staged).create_file(name, *mode)?;
                io::copy(&mut from, &mut to)?;
            }
            Item::Link { rel, target } => {
                let (parent, name) = parent_of(staged, rel)?;
                parent
                    .as_ref()
                    .unwrap_or(staged)
                    .create_symlink(target, name)?;
            }
        }
    }
    Ok(())
}

/// Makes `<opencode>/<dir>` hold exactly `entries`: staged in a fresh directory, then swapped
/// in whole.
fn install_kind(opencode: &TreeDir, dir: &str, entries: &[Vec<Item>]) -> io::Result<()> {
    let staged_name = format!(".{dir}.{}.new", uuid::Uuid::new_v4().simple());
    let staged = opencode.create_dir(&staged_name, 0o755)?;
    let result = entries
        .iter()
        .try_for_each(|items| copy_items(&staged, items))
        .and_then(|()| opencode.replace_with(&staged_name, dir));
    if result.is_err() {
        let _ = opencode.remove_all(&staged_name);
    }
    result
}

impl FsLibrary {
    /// The entries of one kind that can be installed; the others are reported (journal) and
    /// left out, so that one bad entry costs only itself.
    fn installable(&self, dir: &str, kind: &str) -> Result<Vec<String>> {
        let mut names = self.names_in(dir, "")?;
        names.retain(
            |name| match self.plan(dir, kind, std::slice::from_ref(name)) {
                Ok(_) => true,
                Err(e) => {
                    warn!("Leaving out {kind} '{name}' of the Library: {e}");
                    false
                }
            },
        );
        Ok(names)
    }

    /// Every listed entry of one kind, read and checked.
    fn plan(&self, dir: &str, kind: &str, names: &[String]) -> Result<Vec<Vec<Item>>> {
        names
            .iter()
            .map(|name| {
                let src = self
                    .entry(dir, kind, name, "")?
                    .ok_or_else(|| not_found(kind, name))?;
                let mut items = Vec::new();
                plan_entry(&src, PathBuf::from(name), &src, &mut items).map_err(|e| match e {
                    Error::InvalidArgs { reason, .. } => {
                        Error::invalid(format!("{kind}s"), format!("{kind} '{name}': {reason}"))
                    }
                    other => other,
                })?;
                Ok(items)
            })
            .collect()
    }
}

fn not_found(kind: &str, name: &str) -> Error {
    match kind {
        "skill" => Error::NoSuchSkill(name.to_owned()),
        _ => Error::NoSuchTool(name.to_owned()),
    }
}

impl Library for FsLibrary {
    fn skills(&self) -> Result<Vec<String>> {
        self.installable("skill", "skill")
    }

    fn tools(&self) -> Result<Vec<String>> {
        self.installable("tool", "tool")
    }

    fn check(&self, skills: &[String], tools: &[String]) -> Result<()> {
        // As deep as an install: an entry that exists but cannot be installed is refused here.
        self.plan("skill", "skill", skills)?;
        self.plan("tool", "tool", tools)?;
        Ok(())
    }

    fn install(&self, target: &InstallTarget, skills: &[String], tools: &[String]) -> Result<()> {
        // Everything is read and checked before anything in the workspace changes.
        let skills = self.plan("skill", "skill", skills)?;
        let tools = self.plan("tool", "tool", tools)?;
        let opencode = target.dir.join(".opencode");
        let failed = |e: io::Error| {
            Error::io(
                format!(
                    "Cannot install skills and tools into {}",
                    target.root.join(&opencode).display()
                ),
                e,
            )
        };
        let tree = if target.container {
            Tree::open_container(&target.root)
        } else {
            Tree::open(&target.root)
        }
        .map_err(failed)?;
        let dest = tree.dir(&opencode, true).map_err(failed)?;
        install_kind(&dest, "skill", &skills).map_err(failed)?;
        install_kind(&dest, "tool", &tools).map_err(failed)
    }

    fn templates(&self) -> Result<Vec<Template>> {
        let mut out = Vec::new();
        for name in self.names_in("workspace-template", ".json")? {
            match self.template(&name) {
                Ok(t) => out.push(t),
                Err(e) => warn!("Leaving out template {name}: {e}"),
            }
        }
        Ok(out)
    }

    fn template(&self, name: &str) -> Result<Template> {
        let path = self
            .entry("workspace-template", "template", name, ".json")
            .map_err(|e| match e {
                Error::InvalidArgs { reason, .. } => Error::invalid("template", reason),
                other => other,
            })?
            .ok_or_else(|| Error::NoSuchTemplate(name.to_owned()))?;
        let bytes = fs::read(&path).map_err(|e| {
            lib_error(
                &self.root,
                &format!("has an unreadable template '{name}'"),
                e,
            )
        })?;
        let mut t: Template = serde_json::from_slice(&bytes).map_err(|e| {
            let err = lib_error(&self.root, &format!("has a malformed template '{name}'"), e);
            warn!("{err}");
            err
        })?;
        t.name = name.to_owned();
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn library() -> (tempfile::TempDir, FsLibrary) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("library");
        fs::create_dir_all(root.join("skill/python-dev/scripts")).unwrap();
        fs::write(root.join("skill/python-dev/SKILL.md"), "# Python\n").unwrap();
        fs::write(root.join("skill/python-dev/scripts/run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(
            root.join("skill/python-dev/scripts/run.sh"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::create_dir_all(root.join("skill/web")).unwrap();
        fs::write(root.join("skill/web/SKILL.md"), "# Web\n").unwrap();
        fs::create_dir_all(root.join("tool")).unwrap();
        fs::write(root.join("tool/lint"), "#!/bin/sh\n").unwrap();
        fs::create_dir_all(root.join("workspace-template")).unwrap();
        fs::write(
            root.join("workspace-template/fullstack.json"),
            r#"{"name":"fullstack","description":"d","distro":"debian-bookworm","skills":["web"],"tools":["lint"],"env_vars":{"A":"1"},"init_script":"true"}"#,
        )
        .unwrap();
        fs::write(root.join("workspace-template/broken.json"), "{").unwrap();
        let lib = FsLibrary::new(&root);
        (dir, lib)
    }

    fn host(ws: &Path) -> InstallTarget {
        fs::create_dir_all(ws).unwrap();
        InstallTarget {
            root: ws.to_path_buf(),
            dir: PathBuf::new(),
            container: false,
        }
    }

    #[test]
    fn installs_exactly_the_listed_entries_with_their_modes() {
        let (dir, lib) = library();
        let ws = dir.path().join("ws");
        lib.install(
            &host(&ws),
            &["python-dev".into(), "web".into()],
            &["lint".into()],
        )
        .unwrap();
        let run = ws.join(".opencode/skill/python-dev/scripts/run.sh");
        assert_eq!(
            fs::metadata(&run).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(ws.join(".opencode/skill/web/SKILL.md").is_file());
        assert!(ws.join(".opencode/tool/lint").is_file());
        lib.install(&host(&ws), &["web".into()], &[]).unwrap();
        assert!(
            !ws.join(".opencode/skill/python-dev").exists(),
            "unlisted skill removed"
        );
        assert!(
            !ws.join(".opencode/tool/lint").exists(),
            "unlisted tool removed"
        );
        assert_eq!(lib.skills().unwrap(), ["python-dev", "web"]);
        let left: Vec<_> = fs::read_dir(ws.join(".opencode"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left.len(),
            2,
            "only skill/ and tool/, no staging left: {left:?}"
        );
    }

    #[test]
    fn unknown_and_escaping_names_are_refused_and_change_nothing() {
        let (dir, lib) = library();
        let ws = dir.path().join("ws");
        assert_eq!(
            lib.install(&host(&ws), &["nope".into()], &[]),
            Err(Error::NoSuchSkill("nope".into()))
        );
        assert_eq!(
            lib.check(&[], &["nope".into()]),
            Err(Error::NoSuchTool("nope".into()))
        );
        for bad in ["..", "../etc", "/etc", ".hidden", "a/b"] {
            assert!(
                matches!(
                    lib.check(&[bad.into()], &[]),
                    Err(Error::InvalidArgs { .. })
                ),
                "{bad}"
            );
        }
        assert!(!ws.join(".opencode").exists(), "nothing was written");
        // A skill that is a symlink out of the Library, and a file symlink inside a skill.
        symlink("/etc", lib.root.join("skill/escape")).unwrap();
        assert!(matches!(
            lib.check(&["escape".into()], &[]),
            Err(Error::InvalidArgs { .. })
        ));
        symlink("/etc/passwd", lib.root.join("skill/web/passwd")).unwrap();
        assert!(matches!(
            lib.install(&host(&ws), &["web".into()], &[]),
            Err(Error::InvalidArgs { .. })
        ));
    }

    #[test]
    fn one_bad_entry_fails_the_whole_install_and_leaves_the_old_one() {
        let (dir, lib) = library();
        let ws = dir.path().join("ws");
        lib.install(&host(&ws), &["web".into()], &["lint".into()])
            .unwrap();
        symlink("/etc/shadow", lib.root.join("skill/python-dev/leak")).unwrap();
        let r = lib.install(&host(&ws), &["python-dev".into(), "web".into()], &[]);
        assert!(matches!(r, Err(e @ Error::InvalidArgs { .. }) if e.to_string().contains("leak")));
        assert!(
            ws.join(".opencode/skill/web/SKILL.md").is_file(),
            "old skills kept"
        );
        assert!(ws.join(".opencode/tool/lint").is_file(), "old tools kept");
        assert!(!ws.join(".opencode/skill/python-dev").exists());
    }

    #[test]
    fn links_planted_in_the_workspace_are_not_followed() {
        let (dir, lib) = library();
        let ws = dir.path().join("ws");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(ws.join(".opencode")).unwrap();
        // skill/ and tool/ are links out: they are replaced, the outside stays empty.
        symlink(&outside, ws.join(".opencode/skill")).unwrap();
        symlink(&outside, ws.join(".opencode/tool")).unwrap();
        lib.install(&host(&ws), &["web".into()], &["lint".into()])
            .unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(ws.join(".opencode/skill/web/SKILL.md").is_file());
        assert!(!ws.join(".opencode/tool").is_symlink());
        // .opencode itself a link out: resolved inside the workspace (where it leads nowhere).
        fs::remove_dir_all(ws.join(".opencode")).unwrap();
        symlink(&outside, ws.join(".opencode")).unwrap();
        assert!(matches!(
            lib.install(&host(&ws), &["web".into()], &[]),
            Err(Error::Io { .. })
        ));
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn templates_skip_malformed_ones() {
        let (_dir, lib) = library();
        let all = lib.templates().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, "fullstack");
        assert!(
            matches!(lib.template("broken"), Err(Error::Library(m)) if m.contains("malformed"))
        );
        assert_eq!(
            lib.template("none"),
            Err(Error::NoSuchTemplate("none".into()))
        );
    }

    #[test]
    fn an_absent_library_is_an_empty_one() {
        let lib = FsLibrary::new("/nonexistent/library");
        assert_eq!(lib.templates(), Ok(vec![]));
        assert_eq!(lib.skills(), Ok(vec![]));
        assert_eq!(lib.tools(), Ok(vec![]));
        assert_eq!(
            lib.check(&["x".into()], &[]),
            Err(Error::NoSuchSkill("x".into()))
        );
        assert_eq!(lib.template("t"), Err(Error::NoSuchTemplate("t".into())));
    }

    #[test]
    fn an_entry_that_cannot_be_installed_is_refused_and_not_offered() {
        let (dir, lib) = library();
        symlink("/etc/shadow", lib.root.join("skill/python-dev/leak")).unwrap();
        assert_eq!(
            lib.skills().unwrap(),
            ["web"],
            "only installable skills are offered"
        );
        let e = lib.check(&["python-dev".into()], &[]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgs { field, reason } if field == "skills" && reason.contains("python-dev") && reason.contains("leak")),
            "{e:?}"
        );
        // The others still install (the default host workspace gets every installable skill).
        let ws = dir.path().join("ws");
        let skills = lib.skills().unwrap();
        lib.install(&host(&ws), &skills, &[]).unwrap();
        assert!(ws.join(".opencode/skill/web/SKILL.md").is_file());
    }
}
