//! How each distribution's base tree is made: the bootstrap command line, its keyring and mirror,
//! and the key of the cached base tree. Pure functions, so the command lines of distributions
//! this machine cannot reach are still tested.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::workspace::Distro;

/// Bump when the way base trees are made changes: old cached trees are then not used.
const BASE_FORMAT: u32 = 1;

/// Per-distribution settings; every field has a default and can be overridden in the
/// configuration (`[distro.<name>]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistroSettings {
    pub mirror: String,
    /// Keyring that signs the mirror's metadata. Required unless `verify_signatures = false`.
    pub keyring: Option<PathBuf>,
    pub verify_signatures: bool,
    /// Extra packages in the base tree.
    pub packages: Vec<String>,
}

impl DistroSettings {
    pub fn default_for(distro: Distro) -> Self {
        let (mirror, keyring) = match distro {
            Distro::DebianBookworm => (
                "http://deb.debian.org/debian",
                "/usr/share/keyrings/debian-archive-keyring.gpg",
            ),
            Distro::UbuntuNoble | Distro::UbuntuJammy => (
                "http://archive.ubuntu.com/ubuntu",
                "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
            ),
            Distro::ArchLinux => (
                "https://geo.mirror.pkgbuild.com/$repo/os/$arch",
                "/usr/share/keyrings/archlinux.gpg",
            ),
        };
        Self {
            mirror: mirror.to_owned(),
            keyring: Some(PathBuf::from(keyring)),
            verify_signatures: true,
            packages: Vec::new(),
        }
    }
}

/// The suite name debootstrap fetches, and the script it runs (Debian 12's debootstrap has no
/// `noble` script; Ubuntu releases since gutsy share the `gutsy` script).
pub fn suite(distro: Distro) -> Option<(&'static str, Option<&'static str>)> {
    match distro {
        Distro::DebianBookworm => Some(("bookworm", None)),
        Distro::UbuntuJammy => Some(("jammy", Some("/usr/share/debootstrap/scripts/gutsy"))),
        Distro::UbuntuNoble => Some(("noble", Some("/usr/share/debootstrap/scripts/gutsy"))),
        Distro::ArchLinux => None,
    }
}

/// Checks the settings before anything runs: a missing keyring is a clear error unless the
/// operator turned verification off for this distribution.
pub fn check(distro: Distro, s: &DistroSettings) -> Result<(), String> {
    if !s.verify_signatures {
        return Ok(());
    }
    match &s.keyring {
        None => Err(format!(
            "no keyring is configured for {}: set [distro.{}] keyring, or verify_signatures = false",
            distro.as_str(),
            distro.as_str()
        )),
        Some(k) if !k.is_file() => Err(format!(
            "the keyring {} for {} does not exist (install its keyring package, or set [distro.{}] keyring)",
            k.display(),
            distro.as_str(),
            distro.as_str()
        )),
        Some(_) => Ok(()),
    }
}

/// The programs a build runs that are not always installed, with the Debian package of each:
/// those every build needs (unpacking the cached base), and those making a base needs.
pub const UNPACK_TOOLS: &[(&str, &str)] = &[("tar", "tar"), ("zstd", "zstd")];

pub fn bootstrap_tools(distro: Distro) -> &'static [(&'static str, &'static str)] {
    match suite(distro) {
        // wget: the mirror probe, and debootstrap's downloads.
        Some(_) => &[("debootstrap", "debootstrap"), ("wget", "wget")],
        None => &[
            ("pacstrap", "arch-install-scripts"),
            ("pacman", "pacman-package-manager"),
        ],
    }
}

/// The first of `tools` not found on `path` (a PATH value), as "'cmd' is not installed
/// (apt-get install pkg)".
pub fn missing_tool(tools: &[(&str, &str)], path: &str) -> Option<String> {
    tools.iter().find_map(|(cmd, package)| {
        let found = path.split(':').filter(|d| !d.is_empty()).any(|d| {
            std::fs::metadata(Path::new(d).join(cmd)).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        });
        (!found).then(|| format!("'{cmd}' is not installed (apt-get install {package})"))
    })
}

/// The command that writes a fresh base tree into `target`.
pub fn bootstrap_argv(
    distro: Distro,
    s: &DistroSettings,
    target: &Path,
    debs_cache: &Path,
) -> Vec<String> {
    let target = target.display().to_string();
    match suite(distro) {
        Some((suite, script)) => {
            let mut argv = vec![
                "debootstrap".to_owned(),
                "--variant=minbase".to_owned(),
                format!("--cache-dir={}", debs_cache.display()),
            ];
            if !s.packages.is_empty() {
                argv.push(format!("--include={}", s.packages.join(",")));
            }
            match (&s.keyring, s.verify_signatures) {
                (_, false) => argv.push("--no-check-gpg".to_owned()),
                (Some(k), true) => argv.push(format!("--keyring={}", k.display())),
                (None, true) => {}
            }
            argv.extend([suite.to_owned(), target, s.mirror.clone()]);
            if let Some(script) = script {
                argv.push(script.to_owned());
            }
            argv
        }
        None => {
            // pacstrap with a pacman.conf written next to the tree (see `pacman_conf`).
            let mut argv = vec![
                "pacstrap".to_owned(),
                "-c".to_owned(),
                "-G".to_owned(),
                "-M".to_owned(),
                "-C".to_owned(),
                format!("{target}.pacman.conf"),
                target,
                "base".to_owned(),
            ];
            argv.extend(s.packages.iter().cloned());
            argv
        }
    }
}

/// pacman.conf for pacstrap: the configured mirror, and signature checking unless turned off.
pub fn pacman_conf(s: &DistroSettings) -> String {
    let siglevel = if s.verify_signatures {
        "Required DatabaseOptional"
    } else {
        "Never"
    };
    let mut conf = format!("[options]\nArchitecture = auto\nSigLevel = {siglevel}\n");
    if let Some(k) = &s.keyring
        && let Some(dir) = k.parent()
    {
        conf.push_str(&format!(
            "GPGDir = {}\n",
            dir.join("pacman-gnupg").display()
        ));
    }
    for repo in ["core", "extra"] {
        conf.push_str(&format!("\n[{repo}]\nServer = {}\n", s.mirror));
    }
    conf
}

/// A stable 64-bit FNV-1a hash: the cache key must not change between builds of this program.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Name of the cached base tree for these settings: a change of mirror, packages or keyring
/// makes a new one.
pub fn base_key(distro: Distro, s: &DistroSettings) -> String {
    let text = format!(
        "{BASE_FORMAT}\n{}\n{}\n{:?}\n{}\n{}",
        distro.as_str(),
        s.mirror,
        s.keyring,
        s.verify_signatures,
        s.packages.join(",")
    );
    format!("{}-{:016x}", distro.as_str(), fnv1a(text.as_bytes()))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_missing_program_is_named_with_its_package() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let path = format!("{}:/nonexistent", bin.display());
        let tools = bootstrap_tools(Distro::DebianBookworm);
        assert_eq!(
            missing_tool(tools, &path).as_deref(),
            Some("'debootstrap' is not installed (apt-get install debootstrap)")
        );
        for cmd in ["debootstrap", "wget"] {
            std::fs::write(bin.join(cmd), "#!/bin/sh\n").unwrap();
        }
        // Present but not executable does not count.
        assert!(
            missing_tool(tools, &path)
                .unwrap()
                .contains("'debootstrap'")
        );
        for cmd in ["debootstrap", "wget"] {
            std::fs::set_permissions(
                bin.join(cmd),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
        }
        assert_eq!(missing_tool(tools, &path), None);
        std::fs::remove_file(bin.join("wget")).unwrap();
        assert_eq!(
            missing_tool(tools, &path).as_deref(),
            Some("'wget' is not installed (apt-get install wget)")
        );
        assert_eq!(
            bootstrap_tools(Distro::ArchLinux)[0],
            ("pacstrap", "arch-install-scripts")
        );
    }

    use super::*;

    fn argv(d: Distro) -> String {
        bootstrap_argv(
            d,
            &DistroSettings::default_for(d),
            Path::new("/var/lib/agent-workspaces/base/x.partial"),
            Path::new("/var/cache/agent-workspaces/debs"),
        )
        .join(" ")
    }

    #[test]
    fn debian_and_ubuntu_command_lines() {
        assert_eq!(
            argv(Distro::DebianBookworm),
            "debootstrap --variant=minbase --cache-dir=/var/cache/agent-workspaces/debs \
             --keyring=/usr/share/keyrings/debian-archive-keyring.gpg bookworm \
             /var/lib/agent-workspaces/base/x.partial http://deb.debian.org/debian"
        );
        let noble = argv(Distro::UbuntuNoble);
        assert!(
            noble.contains(" noble ")
                && noble
                    .ends_with("archive.ubuntu.com/ubuntu /usr/share/debootstrap/scripts/gutsy"),
            "{noble}"
        );
        assert!(noble.contains("--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg"));
        assert!(argv(Distro::UbuntuJammy).contains(" jammy "));
    }

    #[test]
    fn arch_uses_pacstrap_with_its_own_pacman_conf() {
        let a = argv(Distro::ArchLinux);
        assert!(
            a.starts_with(
                "pacstrap -c -G -M -C /var/lib/agent-workspaces/base/x.partial.pacman.conf"
            ),
            "{a}"
        );
        assert!(a.ends_with(" base"));
        let conf = pacman_conf(&DistroSettings::default_for(Distro::ArchLinux));
        assert!(conf.contains("SigLevel = Required DatabaseOptional"));
        assert!(conf.contains("[core]\nServer = https://geo.mirror.pkgbuild.com/$repo/os/$arch"));
    }

    #[test]
    fn verification_off_must_be_explicit() {
        let mut s = DistroSettings::default_for(Distro::DebianBookworm);
        s.keyring = None;
        assert!(
            check(Distro::DebianBookworm, &s)
                .unwrap_err()
                .contains("no keyring")
        );
        s.keyring = Some("/nonexistent/keyring.gpg".into());
        assert!(
            check(Distro::DebianBookworm, &s)
                .unwrap_err()
                .contains("does not exist")
        );
        s.verify_signatures = false;
        assert!(check(Distro::DebianBookworm, &s).is_ok());
        let a =
            bootstrap_argv(Distro::DebianBookworm, &s, Path::new("/t"), Path::new("/c")).join(" ");
        assert!(a.contains("--no-check-gpg") && !a.contains("--keyring"));
    }

    #[test]
    fn cache_key_follows_the_settings() {
        let s = DistroSettings::default_for(Distro::DebianBookworm);
        let k = base_key(Distro::DebianBookworm, &s);
        assert_eq!(k, base_key(Distro::DebianBookworm, &s.clone()));
        assert!(k.starts_with("debian-bookworm-"));
        let mut other = s.clone();
        other.mirror = "http://127.0.0.1/debian".into();
        assert_ne!(k, base_key(Distro::DebianBookworm, &other));
        let mut more = s;
        more.packages.push("curl".into());
        assert_ne!(k, base_key(Distro::DebianBookworm, &more));
    }
}
