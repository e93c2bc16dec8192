//! Commands that need no shell, started without one.
//!
//! Every command is defined as `/bin/bash -c COMMAND`. For a command that is a plain list of
//! words (`ls -la`, `python3 test.py`, `git status`, `true`), bash does nothing but look the
//! first word up in `PATH` and exec it in its own place, after adding `PWD`, `SHLVL` and `_` to
//! the environment. Starting bash for that costs about a millisecond, more than the rest of an
//! exec. So, as GNU make does for recipe lines, such a command is started here the way bash
//! would start it: same program, same `argv`, same environment. Anything else (a pipe,
//! redirection, expansion, quoting beyond the plainest, a builtin, a variable that changes how
//! bash starts or searches, a name not found) goes to bash unchanged.
//!
//! Only bash is modelled: where the shell is `/bin/sh`, every command goes to it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::spawn::WorkDir;

/// A command to exec directly, exactly as `bash -c` would have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direct {
    /// The program to execute: absolute, or relative to the command's working directory (as
    /// written, so that a script sees the same `$0`).
    pub program: PathBuf,
    /// Its arguments, `argv[0]` first (the word as written).
    pub argv: Vec<Vec<u8>>,
    /// Its complete environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

/// bash's builtins and reserved words: a first word among these goes to bash (except `true`
/// and `false` without arguments, which do the same as the programs of those names).
const BASH_NAMES: &[&str] = &[
    ".",
    ":",
    "[",
    "alias",
    "bg",
    "bind",
    "break",
    "builtin",
    "caller",
    "cd",
    "command",
    "compgen",
    "complete",
    "compopt",
    "continue",
    "declare",
    "dirs",
    "disown",
    "echo",
    "enable",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fc",
    "fg",
    "getopts",
    "hash",
    "help",
    "history",
    "jobs",
    "kill",
    "let",
    "local",
    "logout",
    "mapfile",
    "popd",
    "printf",
    "pushd",
    "pwd",
    "read",
    "readarray",
    "readonly",
    "return",
    "set",
    "shift",
    "shopt",
    "source",
    "suspend",
    "test",
    "times",
    "trap",
    "true",
    "type",
    "typeset",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "wait",
    "!",
    "[[",
    "]]",
    "case",
    "coproc",
    "do",
    "done",
    "elif",
    "else",
    "esac",
    "fi",
    "for",
    "function",
    "if",
    "in",
    "select",
    "then",
    "time",
    "until",
    "while",
    "{",
    "}",
];

/// Variables that change how bash starts, what it runs first, or how it searches `PATH`; and
/// the two it rewrites in ways not modelled here (`PWD` kept only when it names the working
/// directory, `OLDPWD` dropped).
fn changes_bash(key: &[u8]) -> bool {
    const KEYS: &[&[u8]] = &[
        b"BASH_ENV",
        b"ENV",
        b"SHELLOPTS",
        b"BASHOPTS",
        b"POSIXLY_CORRECT",
        b"EXECIGNORE",
        b"PWD",
        b"OLDPWD",
        b"IFS",
    ];
    KEYS.contains(&key) || key.starts_with(b"BASH_FUNC_")
}

/// A byte that stands for itself outside quotes, anywhere in a word.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_-./,:+@%=".contains(&b)
}

/// Splits `command` into words if it is nothing but words: plain bytes, `'single quoted'`
/// text, and `"double quoted"` text without `$`, `` ` ``, `\`, `!`. `None` for anything else.
pub fn words(command: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut words = Vec::new();
    let mut word: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < command.len() {
        let b = command[i];
        match b {
            b' ' | b'\t' => {
                words.extend(word.take());
                i += 1;
            }
            b'\'' | b'"' => {
                let end = i + 1 + command[i + 1..].iter().position(|&c| c == b)?;
                let inner = &command[i + 1..end];
                if b == b'"' && inner.iter().any(|c| b"$`\\!".contains(c)) {
                    return None;
                }
                word.get_or_insert_with(Vec::new).extend_from_slice(inner);
                i = end + 1;
            }
            _ if plain(b) => {
                word.get_or_insert_with(Vec::new).push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    words.extend(word);
    Some(words)
}

fn lookup<'a>(env: &'a [(Vec<u8>, Vec<u8>)], key: &[u8]) -> Option<&'a [u8]> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

/// An executable regular file, as bash's search takes it (checked as the caller's effective
/// user).
fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a plain syscall on a NUL-terminated path.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::X_OK, libc::AT_EACCESS) == 0 }
}

/// How bash would start `command` in `cwd` (absolute, as the command will see it) with `env`,
/// when that is a plain exec; `None` when bash must run it. The file system is the caller's:
/// the agent plans inside the container, the service on the host.
pub fn plan(command: &[u8], env: &[(Vec<u8>, Vec<u8>)], dir: &WorkDir) -> Option<Direct> {
    let cwd = dir.path.as_path();
    let argv = words(command)?;
    let first = argv.first()?;
    if first.is_empty() || first.contains(&b'=') {
        return None;
    }
    if env.iter().any(|(k, _)| changes_bash(k)) {
        return None;
    }
    let shlvl = match lookup(env, b"SHLVL") {
        None => b"0".to_vec(),
        // Kept as it is only in its plain form (bash rewrites any other).
        Some(v)
            if v == b"0" || (v.len() <= 4 && v[0] != b'0' && v.iter().all(u8::is_ascii_digit)) =>
        {
            v.to_vec()
        }
        Some(_) => return None,
    };
    let (program, underscore) = if first.contains(&b'/') {
        let given = Path::new(OsStr::from_bytes(first));
        if !executable(&cwd.join(given)) {
            return None;
        }
        (given.to_path_buf(), first.clone())
    } else {
        let name = std::str::from_utf8(first).ok()?;
        if BASH_NAMES.contains(&name) && !(matches!(name, "true" | "false") && argv.len() == 1) {
            return None;
        }
        let path = lookup(env, b"PATH")?;
        let mut found = None;
        for dir in path.split(|&c| c == b':') {
            // An empty or relative entry is searched relative to the command's directory; left to bash.
            if dir.first() != Some(&b'/') {
                return None;
            }
            let candidate = Path::new(OsStr::from_bytes(dir)).join(name);
            if executable(&candidate) {
                found = Some(candidate);
                break;
            }
        }
        let program = found?;
        let underscore = program.as_os_str().as_bytes().to_vec();
        (program, underscore)
    };
    // bash sets PWD from getcwd(): the working directory with its links resolved.
    let pwd = dir.resolved.as_ref()?;
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(env.len() + 3);
    for (k, v) in env {
        if k != b"SHLVL" && k != b"_" && !out.iter().any(|(o, _)| o == k) {
            out.push((k.clone(), lookup(env, k).unwrap_or(v).to_vec()));
        }
    }
    out.push((b"PWD".to_vec(), pwd.as_os_str().as_bytes().to_vec()));
    out.push((b"SHLVL".to_vec(), shlvl));
    out.push((b"_".to_vec(), underscore));
    Some(Direct {
        program,
        argv,
        env: out,
    })
}

/// A shell command to start (see `start`).
pub struct Command<'a> {
    /// `/bin/bash`, or `/bin/sh` where there is no bash (then the shell runs every command).
    pub shell: &'a str,
    pub command: &'a [u8],
    /// The complete environment.
    pub env: &'a [(Vec<u8>, Vec<u8>)],
    pub dir: &'a WorkDir,
    /// stdin, stdout, stderr.
    pub fds: [&'a std::os::fd::OwnedFd; 3],
    /// The open `cgroup.procs` of the command's cgroup.
    pub procs: Option<&'a std::os::fd::OwnedFd>,
    /// The command's cgroup directory, open (`spawn::Spec::cgroup`).
    pub cgroup: Option<&'a std::os::fd::OwnedFd>,
    /// Its stdin is a terminal to make its controlling terminal.
    pub terminal: bool,
    pub nofile_soft: u64,
}

/// Starts `SHELL -c COMMAND` in its own process group: a plain list of words exec'd as bash
/// would exec it (`plan`), anything else, or a direct start that fails, through the shell.
/// Used by the service for host commands and by the agent inside each container.
pub fn start(c: Command<'_>) -> std::io::Result<crate::spawn::Child> {
    let spawn = |program: &[u8], argv: &[Vec<u8>], env: &[(Vec<u8>, Vec<u8>)]| {
        crate::spawn::spawn(crate::spawn::Spec {
            program,
            argv,
            env,
            cwd: Some(&c.dir.path),
            cwd_fd: Some(&c.dir.fd),
            fds: c.fds,
            procs: c.procs,
            cgroup: c.cgroup,
            process_group: true,
            terminal: c.terminal,
            nofile_soft: c.nofile_soft,
        })
    };
    let direct = (c.shell == "/bin/bash")
        .then(|| plan(c.command, c.env, c.dir))
        .flatten();
    if let Some(d) = &direct
        && let Ok(child) = spawn(d.program.as_os_str().as_bytes(), &d.argv, &d.env)
    {
        return Ok(child);
    }
    let argv = [c.shell.into(), b"-c".to_vec(), c.command.to_vec()];
    spawn(c.shell.as_bytes(), &argv, c.env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(p: &Path) -> WorkDir {
        WorkDir::open(p).unwrap()
    }
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    #[test]
    fn words_of_plain_commands() {
        let w = |s: &str| {
            words(s.as_bytes()).map(|v| {
                v.into_iter()
                    .map(|w| String::from_utf8(w).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            w("ls -la /tmp"),
            Some(vec!["ls".into(), "-la".into(), "/tmp".into()])
        );
        assert_eq!(w("  a\t b  "), Some(vec!["a".into(), "b".into()]));
        assert_eq!(
            w("a 'b c' \"d e\" f''g ''"),
            Some(vec![
                "a".into(),
                "b c".into(),
                "d e".into(),
                "fg".into(),
                String::new()
            ])
        );
        assert_eq!(
            w("echo 'it''s $HOME | x'"),
            Some(vec!["echo".into(), "its $HOME | x".into()])
        );
        assert_eq!(w(""), Some(vec![]));
        for shell in [
            "a | b",
            "a > f",
            "a < f",
            "a && b",
            "a; b",
            "a &",
            "$X",
            "a $X",
            "a `b`",
            "a $(b)",
            "a *",
            "a ?",
            "a [x]",
            "~/x",
            "a {b,c}",
            "a # c",
            "a\nb",
            "a \\ b",
            "\"$X\"",
            "\"a\\b\"",
            "\"!x\"",
            "'unterminated",
            "\"unterminated",
            "a (b)",
            "a^b",
            "a\u{e9}",
        ] {
            assert_eq!(w(shell), None, "{shell:?} needs a shell");
        }
    }

    type Env = Vec<(Vec<u8>, Vec<u8>)>;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn bash() -> Option<&'static str> {
        Path::new("/bin/bash").is_file().then_some("/bin/bash")
    }

    /// What a command printed and its exit status.
    fn output(mut cmd: Command) -> (String, Option<i32>) {
        let out = cmd.output().unwrap();
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (String::from_utf8(out.stdout).unwrap(), out.status.code())
    }

    fn run_direct(d: &Direct, cwd: &Path) -> (String, Option<i32>) {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&d.program);
        cmd.arg0(OsStr::from_bytes(&d.argv[0]))
            .args(d.argv[1..].iter().map(|a| OsStr::from_bytes(a)))
            .env_clear()
            .envs(
                d.env
                    .iter()
                    .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
            )
            .current_dir(cwd);
        output(cmd)
    }

    fn run_bash(command: &str, e: &[(Vec<u8>, Vec<u8>)], cwd: &Path) -> (String, Option<i32>) {
        let mut cmd = Command::new(bash().unwrap());
        cmd.arg("-c")
            .arg(command)
            .env_clear()
            .envs(
                e.iter()
                    .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
            )
            .current_dir(cwd);
        output(cmd)
    }

    /// A directory with a program that prints its argv[0], its arguments, the environment
    /// (sorted) and its working directory, reached through a link.
    fn fixture(name: &str) -> (PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!("aw-direct-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let bin = base.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(base.join("real/work")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let show = bin.join("show");
        // Not `sh`: dash exports nothing of its own, so what it prints is what it was given.
        std::fs::write(
            &show,
            "#!/bin/dash\nprintf '%s\\n' \"$0\"; for a; do printf '[%s]\\n' \"$a\"; done; env | sort; pwd -P; exit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&show, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::copy(&show, base.join("real/work/local")).unwrap();
        std::fs::write(bin.join("notexec"), "#!/bin/dash\n").unwrap();
        (base.clone(), base.join("link/work"))
    }

    /// The point of this module: for every command it plans, the planned exec gives what
    /// `bash -c` gives (argv, environment, directory, exit status), byte for byte.
    #[test]
    fn a_planned_exec_is_what_bash_would_do() {
        if bash().is_none() || !Path::new("/bin/dash").is_file() {
            eprintln!("skipped: needs /bin/bash and /bin/dash");
            return;
        }
        let (base, cwd) = fixture("same");
        let path = format!("{}/bin:/usr/bin:/bin", base.display());
        let abs = format!("{}/bin/show y", base.display());
        let cases: Vec<(&str, Env)> = vec![
            ("show", env(&[("PATH", &path)])),
            (
                "show a 'b c' \"d e\" f''g '' --x=1 a,b:c@d%e+f",
                env(&[("PATH", &path), ("A", "1"), ("B", "two words")]),
            ),
            (
                "show",
                env(&[("PATH", &path), ("SHLVL", "3"), ("_", "stale")]),
            ),
            (
                "show",
                env(&[
                    ("PATH", &path),
                    ("SHLVL", "0"),
                    ("HOME", "/root"),
                    ("A", "1"),
                    ("A", "2"),
                ]),
            ),
            ("./local x", env(&[("PATH", "/usr/bin:/bin")])),
            ("  show\tx  ", env(&[("PATH", &path), ("LANG", "C.UTF-8")])),
            (&abs, env(&[("PATH", "/usr/bin:/bin")])),
        ];
        for (command, e) in &cases {
            let d = plan(command.as_bytes(), e, &dir(&cwd))
                .unwrap_or_else(|| panic!("{command:?} should be planned"));
            assert_eq!(
                run_direct(&d, &cwd),
                run_bash(command, e, &cwd),
                "{command:?} {e:?}"
            );
        }
        // `true` and `false` alone: the programs do what the builtins do.
        for (command, code) in [("true", 0), ("false", 1)] {
            let e = env(&[("PATH", "/usr/bin:/bin")]);
            let d = plan(command.as_bytes(), &e, &dir(&cwd)).unwrap();
            assert_eq!(run_direct(&d, &cwd), (String::new(), Some(code)));
            assert_eq!(run_bash(command, &e, &cwd), (String::new(), Some(code)));
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn everything_else_goes_to_bash() {
        let (base, cwd) = fixture("else");
        let path = format!("{}/bin:/usr/bin:/bin", base.display());
        let p = env(&[("PATH", &path)]);
        for command in [
            "",
            "echo hi",
            "true x",
            "cd /",
            "export A=1",
            "A=1 show",
            "show | cat",
            "show $HOME",
            "kill 1",
            "[ -e x ]",
            "if",
            "missing-program",
            "notexec",
            "./missing",
            "show > f",
        ] {
            assert_eq!(
                plan(command.as_bytes(), &p, &dir(&cwd)),
                None,
                "{command:?}"
            );
        }
        for extra in [
            ("BASH_ENV", "/x"),
            ("ENV", "/x"),
            ("SHELLOPTS", "xtrace"),
            ("BASHOPTS", "x"),
            ("POSIXLY_CORRECT", "1"),
            ("EXECIGNORE", "*"),
            ("PWD", "/"),
            ("OLDPWD", "/"),
            ("IFS", ":"),
            ("BASH_FUNC_show%%", "() { :; }"),
            ("SHLVL", "x"),
            ("SHLVL", "007"),
        ] {
            let mut e = p.clone();
            e.extend(env(&[extra]));
            assert_eq!(plan(b"show", &e, &dir(&cwd)), None, "{extra:?}");
        }
        // No PATH, or one with a relative entry: bash's own rules.
        assert_eq!(plan(b"show", &[], &dir(&cwd)), None);
        assert_eq!(
            plan(b"show", &env(&[("PATH", &format!(":{path}"))]), &dir(&cwd)),
            None
        );
        assert_eq!(
            plan(
                b"show",
                &env(&[("PATH", &format!("bin:{path}"))]),
                &dir(&cwd)
            ),
            None
        );
        // The first executable in PATH order, as bash takes it.
        let d = plan(b"show", &p, &dir(&cwd)).unwrap();
        assert_eq!(d.program, base.join("bin/show"));
        let names: BTreeSet<_> = d.env.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(names.len(), d.env.len(), "each variable once");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
