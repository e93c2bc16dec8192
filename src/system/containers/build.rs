//! The container build, run as `agent-workspaced build-tree PLAN` inside a transient unit
//! (`agent-workspace-build@<name>.service`), so it is visible to systemctl and survives a
//! restart of the daemon. Steps: check settings, make or reuse the cached base tree of the
//! distro, unpack it, configure it. Command output goes to the workspace's init log; step lines
//! also go to stdout (the unit's journal). The outcome is written to the plan's result file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::core::workspace::Distro;
use crate::system::containers::distro::{self, DistroSettings};
use crate::system::containers::layer;
use crate::system::containers::tree::Tree;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildPlan {
    pub workspace_id: String,
    pub name: String,
    pub distro: Distro,
    pub settings: DistroSettings,
    pub tree: PathBuf,
    pub cache_dir: PathBuf,
    pub log: PathBuf,
    pub result: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    pub ok: bool,
    pub step: String,
    pub message: String,
}

struct Failure {
    step: &'static str,
    message: String,
}

struct Builder<'a> {
    plan: &'a BuildPlan,
    log: File,
}

impl Builder<'_> {
    fn say(&mut self, line: &str) {
        println!("{line}");
        let _ = writeln!(self.log, "{line}");
    }

    /// A step begins: in the log, and as the unit's status (`STATUS=`), which the service
    /// turns into the workspace's `BuildStep`.
    fn step(&mut self, name: &str, detail: &str) {
        self.say(&format!("== step {name}: {detail}"));
        let _ = libsystemd::daemon::notify(
            false,
            &[libsystemd::daemon::NotifyState::Status(name.to_owned())],
        );
    }

    /// Runs one command with its output in the init log.
    fn run(&mut self, step: &'static str, argv: &[String]) -> Result<(), Failure> {
        self.say(&format!("$ {}", argv.join(" ")));
        let out = self.log.try_clone().map_err(|e| fail(step, e))?;
        let err = self.log.try_clone().map_err(|e| fail(step, e))?;
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| fail(step, format!("cannot run {}: {e}", argv[0])))?;
        if status.success() {
            Ok(())
        } else {
            Err(fail(
                step,
                format!("{} failed ({status}); see the init log", argv[0]),
            ))
        }
    }

    fn steps(&mut self) -> Result<(), Failure> {
        let p = self.plan;
        self.step("check", &format!("{} for {}", p.distro.as_str(), p.name));
        distro::check(p.distro, &p.settings).map_err(|e| fail("check", e))?;
        require("check", distro::UNPACK_TOOLS)?;
        let partial = with_suffix(&p.tree, ".partial");
        if p.tree.exists() || layer::has_layer(&p.tree) {
            self.step("remove-old-tree", &p.tree.display().to_string());
            // A layered tree is unmounted, and its layer goes with it.
            layer::remove(&p.tree).map_err(|e| fail("remove-old-tree", e))?;
        }
        if partial.exists() {
            self.step("remove-old-tree", &partial.display().to_string());
            fs::remove_dir_all(&partial).map_err(|e| fail("remove-old-tree", e))?;
        }
        let key = distro::base_key(p.distro, &p.settings);
        let bases = p.cache_dir.join("base");
        let base = bases.join(format!("{key}.tar.zst"));
        fs::create_dir_all(&bases).map_err(|e| fail("base", e))?;
        if base.exists() {
            self.step("base", &format!("cached {}", base.display()));
        } else {
            self.make_base(&bases, &key, &base)?;
        }
        // Copy-on-write where the file system allows: a layer over the base, unpacked once.
        let (base_tree, _base_held) = self.base_tree(&bases, &key, &base)?;
        self.step(
            "unpack",
            &format!(
                "a copy-on-write layer over {} at {}",
                base_tree.display(),
                p.tree.display()
            ),
        );
        // Made at the tree itself when layered; else unpacked whole beside it, renamed when done.
        let made = match layer::create(&base_tree, &p.tree) {
            Ok(()) => p.tree.clone(),
            Err(e) => {
                self.say(&format!(
                    "copy-on-write trees are not available here ({e}): unpacking a full tree"
                ));
                self.step(
                    "unpack",
                    &format!("{} -> {}", base.display(), p.tree.display()),
                );
                self.untar("unpack", &base, &partial)?;
                partial
            }
        };
        self.step("configure", "resolv.conf, hostname, machine-id, /workspace");
        configure(&made, &p.name).map_err(|e| fail("configure", e))?;
        if made != p.tree {
            fs::rename(&made, &p.tree).map_err(|e| fail("configure", e))?;
        }
        self.say("== tree ready");
        Ok(())
    }

    /// Unpacks the base archive `tar` into the new directory `into`.
    fn untar(&mut self, step: &'static str, tar: &Path, into: &Path) -> Result<(), Failure> {
        fs::create_dir_all(into).map_err(|e| fail(step, e))?;
        self.run(
            step,
            &[
                "tar".into(),
                "--zstd".into(),
                "--numeric-owner".into(),
                "-xpf".into(),
                tar.display().to_string(),
                "-C".into(),
                into.display().to_string(),
            ],
        )
    }

    /// The base unpacked, once for all workspaces of this distro and settings, into
    /// `<key>.tree` (never written afterwards: it is the lower layer of their trees). Builds
    /// that need it at once wait for the first to unpack it.
    /// The base unpacked (once), and its lock: held until the tree's stack names the base (or
    /// a full tree is unpacked instead), so a reclaim never takes a base a build has chosen.
    fn base_tree(
        &mut self,
        bases: &Path,
        key: &str,
        base: &Path,
    ) -> Result<(PathBuf, File), Failure> {
        let dir = bases.join(format!("{key}.tree"));
        let lock = layer::base_lock(bases, key, true)
            .map_err(|e| fail("base", e))?
            .ok_or_else(|| fail("base", "the base's lock was not taken"))?;
        if dir.is_dir() {
            return Ok((dir, lock));
        }
        self.step("base", &format!("unpacking {} once", base.display()));
        let partial = with_suffix(&dir, ".partial");
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| fail("base", e))?;
        }
        self.untar("base", base, &partial)?;
        fs::rename(&partial, &dir).map_err(|e| fail("base", e))?;
        Ok((dir, lock))
    }

    fn make_base(&mut self, bases: &Path, key: &str, base: &Path) -> Result<(), Failure> {
        let p = self.plan;
        let work = bases.join(format!("{key}.partial"));
        if work.exists() {
            fs::remove_dir_all(&work).map_err(|e| fail("bootstrap", e))?;
        }
        require("bootstrap", distro::bootstrap_tools(p.distro))?;
        if let Some((suite, _)) = distro::suite(p.distro) {
            self.step("mirror", &format!("{} ({suite})", p.settings.mirror));
            let release = format!(
                "{}/dists/{suite}/Release",
                p.settings.mirror.trim_end_matches('/')
            );
            self.run(
                "mirror",
                &[
                    "wget".into(),
                    "--spider".into(),
                    "--quiet".into(),
                    "--timeout=20".into(),
                    "--tries=2".into(),
                    release.clone(),
                ],
            )
            .map_err(|_| fail("mirror", format!("the mirror does not answer: {release}")))?;
        } else {
            fs::write(
                with_suffix(&work, ".pacman.conf"),
                distro::pacman_conf(&p.settings),
            )
            .map_err(|e| fail("bootstrap", e))?;
            fs::create_dir_all(&work).map_err(|e| fail("bootstrap", e))?;
        }
        self.step("bootstrap", p.distro.as_str());
        let debs = p.cache_dir.join("debs");
        fs::create_dir_all(&debs).map_err(|e| fail("bootstrap", e))?;
        let argv = distro::bootstrap_argv(p.distro, &p.settings, &work, &debs);
        self.run("bootstrap", &argv)?;
        self.step("cache", &base.display().to_string());
        let tmp = with_suffix(base, ".tmp");
        self.run(
            "cache",
            &[
                "tar".into(),
                "--zstd".into(),
                "--numeric-owner".into(),
                "-cpf".into(),
                tmp.display().to_string(),
                "-C".into(),
                work.display().to_string(),
                ".".into(),
            ],
        )?;
        fs::rename(&tmp, base).map_err(|e| fail("cache", e))?;
        let _ = fs::remove_dir_all(&work);
        // Older bases of this distro (other mirror, packages or format) are not used again.
        let prefix = format!("{}-", p.distro.as_str());
        if let Ok(entries) = fs::read_dir(bases) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) && !n.starts_with(key) {
                    self.say(&format!("removing old base {n}"));
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }
}

/// Fails the step, naming the program and its package, when one of `tools` is missing: a
/// missing wget must not look like a mirror that does not answer.
fn require(step: &'static str, tools: &[(&str, &str)]) -> Result<(), Failure> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    match distro::missing_tool(tools, &path) {
        Some(m) => Err(fail(step, m)),
        None => Ok(()),
    }
}

fn fail(step: &'static str, e: impl std::fmt::Display) -> Failure {
    Failure {
        step,
        message: e.to_string(),
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Makes an unpacked base tree this workspace's: DNS, host name, a machine id of its own and
/// the `/workspace` directory. Written through `Tree` like every other write into a tree, so
/// even a base tree with hostile links in it cannot make this write outside it.
pub fn configure(tree: &Path, name: &str) -> std::io::Result<()> {
    // What is made here belongs to the container's root: the tree root's range (host root for
    // a tree unpacked whole, which nspawn maps or chowns on its first start).
    let tree = Tree::open_container(tree)?;
    let etc = tree.dir("etc", true)?;
    let resolv =
        fs::read("/etc/resolv.conf").unwrap_or_else(|_| b"nameserver 127.0.0.1\n".to_vec());
    etc.write_file("resolv.conf", &resolv, 0o644)?;
    etc.write_file("hostname", format!("{name}\n").as_bytes(), 0o644)?;
    etc.write_file(
        "hosts",
        format!(
            "127.0.0.1 localhost\n127.0.1.1 {name}\n::1 localhost ip6-localhost ip6-loopback\n"
        )
        .as_bytes(),
        0o644,
    )?;
    etc.write_file(
        "machine-id",
        format!("{}\n", uuid::Uuid::new_v4().simple()).as_bytes(),
        0o444,
    )?;
    if tree.stat_nofollow("var/lib/dbus/machine-id").is_ok() {
        let dbus = tree.dir("var/lib/dbus", false)?;
        dbus.remove_all("machine-id")?;
        dbus.create_symlink(Path::new("/etc/machine-id"), "machine-id")?;
    }
    tree.dir("workspace", true)?;
    Ok(())
}

/// Entry point of `agent-workspaced build-tree PLAN`: returns the process exit code.
pub fn main(plan_path: &Path) -> u8 {
    let plan: BuildPlan = match fs::read(plan_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot read the build plan {}: {e}", plan_path.display());
            return 2;
        }
    };
    if let Some(dir) = plan.log.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let log = match OpenOptions::new().create(true).append(true).open(&plan.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot open the init log {}: {e}", plan.log.display());
            return 2;
        }
    };
    let mut b = Builder { plan: &plan, log };
    let result = match b.steps() {
        Ok(()) => BuildResult {
            ok: true,
            step: "done".into(),
            message: String::new(),
        },
        Err(f) => {
            b.say(&format!("== step {} failed: {}", f.step, f.message));
            BuildResult {
                ok: false,
                step: f.step.into(),
                message: f.message,
            }
        }
    };
    let written = serde_json::to_vec(&result)
        .map_err(std::io::Error::other)
        .and_then(|bytes| fs::write(&plan.result, bytes));
    if let Err(e) = written {
        eprintln!("cannot write {}: {e}", plan.result.display());
        return 2;
    }
    if result.ok { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_gives_the_tree_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        fs::create_dir_all(tree.join("var/lib/dbus")).unwrap();
        fs::write(tree.join("var/lib/dbus/machine-id"), "shared\n").unwrap();
        configure(tree, "web").unwrap();
        assert_eq!(
            fs::read_to_string(tree.join("etc/hostname")).unwrap(),
            "web\n"
        );
        let id = fs::read_to_string(tree.join("etc/machine-id")).unwrap();
        assert_eq!(id.trim().len(), 32);
        let other = tempfile::tempdir().unwrap();
        configure(other.path(), "web").unwrap();
        let other_id = fs::read_to_string(other.path().join("etc/machine-id")).unwrap();
        assert_ne!(id, other_id, "every tree gets its own machine id");
        assert_eq!(
            fs::read_link(tree.join("var/lib/dbus/machine-id")).unwrap(),
            Path::new("/etc/machine-id")
        );
        assert!(tree.join("workspace").is_dir());
        assert!(tree.join("etc/resolv.conf").is_file());
    }

    #[test]
    fn a_bad_keyring_fails_in_the_check_step_with_a_result_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = DistroSettings::default_for(Distro::UbuntuNoble);
        settings.keyring = Some(dir.path().join("missing.gpg"));
        let plan = BuildPlan {
            workspace_id: "id".into(),
            name: "web".into(),
            distro: Distro::UbuntuNoble,
            settings,
            tree: dir.path().join("machines/web"),
            cache_dir: dir.path().join("cache"),
            log: dir.path().join("log/init.log"),
            result: dir.path().join("result.json"),
        };
        let plan_path = dir.path().join("plan.json");
        fs::write(&plan_path, serde_json::to_vec(&plan).unwrap()).unwrap();
        assert_eq!(main(&plan_path), 1);
        let result: BuildResult =
            serde_json::from_slice(&fs::read(dir.path().join("result.json")).unwrap()).unwrap();
        assert!(!result.ok);
        assert_eq!(result.step, "check");
        assert!(result.message.contains("missing.gpg"), "{}", result.message);
        let log = fs::read_to_string(dir.path().join("log/init.log")).unwrap();
        assert!(log.contains("== step check failed"), "{log}");
    }
}
