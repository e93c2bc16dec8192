//! The Library: a directory (normally a git checkout) with `skill/<name>/`, `tool/<name>` and
//! `workspace-template/<name>.json`. Read afresh on every use, so a `git pull` there needs no
//! restart. Nothing is read or copied from outside it: names are single path elements, and
//! symlinks are copied only when they point inside the entry they belong to.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::core::error::{Error, Result};
use crate::core::names::validate_library_name;
use crate::core::ports::Library;
use crate::core::template::Template;

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

    fn root_checked(&self) -> Result<PathBuf> {
        fs::canonicalize(&self.root).map_err(|e| lib_error(&self.root, "cannot be read", e))
    }

    /// The entry `<kind dir>/<name>` (plus `suffix`), resolved, and proven to be inside the
    /// Library; Ok(None) when there is no such entry.
    fn entry(&self, dir: &str, kind: &str, name: &str, suffix: &str) -> Result<Option<PathBuf>> {
        validate_library_name(kind, name)
            .map_err(|e| Error::InvalidArgs(format!("Invalid '{kind}s': {e}")))?;
        let root = self.root_checked()?;
        let path = root.join(dir).join(format!("{name}{suffix}"));
        if fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let real = fs::canonicalize(&path)
            .map_err(|e| lib_error(&self.root, &format!("has a broken {kind} '{name}'"), e))?;
        if !real.starts_with(root.join(dir)) {
            return Err(Error::InvalidArgs(format!(
                "Invalid '{kind}s': {kind} '{name}' points outside the Library ({})",
                real.display()
            )));
        }
        Ok(Some(real))
    }

    fn names_in(&self, dir: &str, suffix: &str) -> Result<Vec<String>> {
        let root = self.root_checked()?;
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

/// Copies `src` to `dst` keeping modes; symlinks are copied as links only when they resolve
/// inside `top` (the skill or tool being copied).
fn copy_entry(src: &Path, dst: &Path, top: &Path) -> Result<()> {
    let io_err = |p: &Path, e: io::Error| Error::Io(format!("Cannot copy {}: {e}", p.display()));
    let meta = fs::symlink_metadata(src).map_err(|e| io_err(src, e))?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(src).map_err(|e| io_err(src, e))?;
        let resolved = fs::canonicalize(src).ok();
        if !resolved.is_some_and(|r| r.starts_with(top)) {
            return Err(Error::InvalidArgs(format!(
                "{} is a symlink pointing outside its Library entry ({})",
                src.display(),
                target.display()
            )));
        }
        std::os::unix::fs::symlink(&target, dst).map_err(|e| io_err(dst, e))?;
    } else if meta.is_dir() {
        fs::create_dir_all(dst).map_err(|e| io_err(dst, e))?;
        for e in fs::read_dir(src).map_err(|e| io_err(src, e))?.flatten() {
            copy_entry(&e.path(), &dst.join(e.file_name()), top)?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.permissions().mode()))
            .map_err(|e| io_err(dst, e))?;
    } else if meta.is_file() {
        fs::copy(src, dst).map_err(|e| io_err(src, e))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.permissions().mode()))
            .map_err(|e| io_err(dst, e))?;
    }
    Ok(())
}

fn remove_path(p: &Path) -> Result<()> {
    let r = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|e| Error::Io(format!("Cannot remove {}: {e}", p.display())))
}

impl FsLibrary {
    /// Replaces `<dest>/<name>` by a fresh copy of each listed entry; removes the others.
    fn install_kind(&self, dir: &str, kind: &str, names: &[String], dest: &Path) -> Result<()> {
        fs::create_dir_all(dest)
            .map_err(|e| Error::Io(format!("Cannot create {}: {e}", dest.display())))?;
        if let Ok(existing) = fs::read_dir(dest) {
            for e in existing.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !names.contains(&n) {
                    remove_path(&e.path())?;
                }
            }
        }
        for name in names {
            let src = self
                .entry(dir, kind, name, "")?
                .ok_or_else(|| not_found(kind, name))?;
            let target = dest.join(name);
            let staged = dest.join(format!(".{name}.new"));
            remove_path(&staged)?;
            copy_entry(&src, &staged, &src)?;
            remove_path(&target)?;
            fs::rename(&staged, &target)
                .map_err(|e| Error::Io(format!("Cannot install {}: {e}", target.display())))?;
        }
        Ok(())
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
        self.names_in("skill", "")
    }

    fn tools(&self) -> Result<Vec<String>> {
        self.names_in("tool", "")
    }

    fn check(&self, skills: &[String], tools: &[String]) -> Result<()> {
        for (dir, kind, names) in [("skill", "skill", skills), ("tool", "tool", tools)] {
            for name in names {
                if self.entry(dir, kind, name, "")?.is_none() {
                    return Err(not_found(kind, name));
                }
            }
        }
        Ok(())
    }

    fn install(&self, dir: &Path, skills: &[String], tools: &[String]) -> Result<()> {
        self.check(skills, tools)?;
        let base = dir.join(".opencode");
        self.install_kind("skill", "skill", skills, &base.join("skill"))?;
        self.install_kind("tool", "tool", tools, &base.join("tool"))
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
                Error::InvalidArgs(m) => Error::InvalidArgs(m.replace("'templates'", "'template'")),
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

    #[test]
    fn installs_exactly_the_listed_entries_with_their_modes() {
        let (dir, lib) = library();
        let ws = dir.path().join("ws");
        lib.install(&ws, &["python-dev".into(), "web".into()], &["lint".into()])
            .unwrap();
        let run = ws.join(".opencode/skill/python-dev/scripts/run.sh");
        assert_eq!(
            fs::metadata(&run).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(ws.join(".opencode/skill/web/SKILL.md").is_file());
        assert!(ws.join(".opencode/tool/lint").is_file());
        lib.install(&ws, &["web".into()], &[]).unwrap();
        assert!(
            !ws.join(".opencode/skill/python-dev").exists(),
            "unlisted skill removed"
        );
        assert!(
            !ws.join(".opencode/tool/lint").exists(),
            "unlisted tool removed"
        );
        assert_eq!(lib.skills().unwrap(), ["python-dev", "web"]);
    }

    #[test]
    fn unknown_and_escaping_names_are_refused_and_change_nothing() {
        let (dir, lib) = library();
        let ws = dir.path().join("ws");
        assert_eq!(
            lib.install(&ws, &["nope".into()], &[]),
            Err(Error::NoSuchSkill("nope".into()))
        );
        assert_eq!(
            lib.check(&[], &["nope".into()]),
            Err(Error::NoSuchTool("nope".into()))
        );
        for bad in ["..", "../etc", "/etc", ".hidden", "a/b"] {
            assert!(
                matches!(lib.check(&[bad.into()], &[]), Err(Error::InvalidArgs(_))),
                "{bad}"
            );
        }
        assert!(!ws.exists(), "nothing was written");
        // A skill that is a symlink out of the Library, and a file symlink inside a skill.
        symlink("/etc", lib.root.join("skill/escape")).unwrap();
        assert!(matches!(
            lib.check(&["escape".into()], &[]),
            Err(Error::InvalidArgs(_))
        ));
        symlink("/etc/passwd", lib.root.join("skill/web/passwd")).unwrap();
        assert!(matches!(
            lib.install(&ws, &["web".into()], &[]),
            Err(Error::InvalidArgs(_))
        ));
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
    fn a_missing_library_is_a_clear_error() {
        let lib = FsLibrary::new("/nonexistent/library");
        assert!(
            matches!(lib.templates(), Err(Error::Library(m)) if m.contains("/nonexistent/library"))
        );
        assert!(matches!(
            lib.check(&["x".into()], &[]),
            Err(Error::Library(_))
        ));
    }
}
