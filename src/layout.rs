//! The layering and file sizes `ARCHITECTURE.md` states, checked on the sources: a rule a
//! reviewer would otherwise have to remember.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Code lines of every Rust file under `dir` (comments left out), with their file.
fn code_lines(dir: &str) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&root().join(dir), &mut files);
    files
        .into_iter()
        .flat_map(|f| {
            let text = fs::read_to_string(&f).unwrap();
            text.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| (f.clone(), l.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `line` names the path `word` (as a whole name: `unix::net` does not name `nix::`).
fn names(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| {
        !line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn assert_none_use(dir: &str, forbidden: &[&str], why: &str) {
    let found: Vec<String> = code_lines(dir)
        .into_iter()
        .filter(|(_, l)| forbidden.iter().any(|f| names(l, f)))
        .map(|(f, l)| format!("{}: {}", f.display(), l.trim()))
        .collect();
    assert!(found.is_empty(), "{why}:\n{}", found.join("\n"));
}

#[test]
fn the_core_knows_no_bus_no_http_and_no_machine() {
    assert_none_use(
        "src/core",
        &[
            "zbus",
            "axum",
            "hyper",
            "std::process",
            "std::fs",
            "tokio::fs",
            "libc::",
            "nix::",
            "crate::dbus",
            "crate::http",
            "crate::system",
        ],
        "src/core is the domain: it reaches the world only through its ports",
    );
}

#[test]
fn the_bridge_reaches_the_service_only_over_dbus() {
    assert_none_use(
        "src/http",
        &["crate::system", "core::manager", "core::Manager"],
        "src/http is a D-Bus client of the service; it decides nothing itself",
    );
    assert_none_use(
        "src/mcp",
        &[
            "crate::system",
            "core::manager",
            "core::Manager",
            "axum",
            "crate::http",
        ],
        "src/mcp is a D-Bus client of the service, as the bridge is; the bridge serves it",
    );
    assert_none_use(
        "src/dbus",
        &["axum", "hyper", "crate::http", "rmcp", "crate::mcp"],
        "src/dbus knows nothing of HTTP",
    );
}

/// Files that are one thing though longer than the rest, and why.
const LONG_ON_PURPOSE: &[(&str, &str)] = &[(
    "src/system/containers/tree.rs",
    "confined access to an untrusted tree: one abstraction, half of it property tests",
)];

#[test]
fn no_source_file_holds_several_jobs() {
    const MAX_LINES: usize = 680;
    let mut files = Vec::new();
    for dir in ["src", "agent/src", "tests", "benches", "examples"] {
        if root().join(dir).is_dir() {
            rust_files(&root().join(dir), &mut files);
        }
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let rel = f
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let lines = fs::read_to_string(f).unwrap().lines().count();
            (lines > MAX_LINES && !LONG_ON_PURPOSE.iter().any(|(p, _)| *p == rel))
                .then(|| format!("{rel}: {lines} lines"))
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these along their seams (or say in LONG_ON_PURPOSE why one is one thing):\n{}",
        long.join("\n")
    );
}

/// The module a file under `src/` is, as a path of names (`system::commands::exec`); a
/// directory's `mod.rs` is the directory.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(root().join("src")).unwrap();
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The modules of `src/system` each file there names (`crate::system::...`), resolved to the
/// files that exist; a module's own descendants and ancestors are left out (a directory's
/// `mod.rs` declares its children; `tests` modules look into their parent).
fn system_imports() -> Vec<(String, Vec<String>)> {
    let mut files = Vec::new();
    rust_files(&root().join("src/system"), &mut files);
    let modules: Vec<String> = files.iter().map(|f| module_of(f)).collect();
    files
        .iter()
        .zip(&modules)
        .map(|(f, me)| {
            let text = fs::read_to_string(f).unwrap();
            let mut names: Vec<String> = Vec::new();
            for (i, _) in text.match_indices("crate::system::") {
                let path: String = text[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                // The longest prefix of the path that is a file's module.
                let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
                while !parts.is_empty() && !modules.contains(&parts.join("::")) {
                    parts.pop();
                }
                let target = parts.join("::");
                let related = target.starts_with(&format!("{me}::"))
                    || me.starts_with(&format!("{target}::"))
                    || target == *me;
                if !target.is_empty() && !related && !names.contains(&target) {
                    names.push(target);
                }
            }
            (me.clone(), names)
        })
        .collect()
}

#[test]
fn no_files_of_src_system_import_each_other_in_a_circle() {
    let graph = system_imports();
    let edges = |m: &str| -> Vec<String> {
        graph
            .iter()
            .find(|(n, _)| n == m)
            .map(|(_, e)| e.clone())
            .unwrap_or_default()
    };
    // A depth-first walk from every module; a module met again on the current path closes a
    // circle.
    fn walk(
        m: &str,
        path: &mut Vec<String>,
        done: &mut Vec<String>,
        edges: &dyn Fn(&str) -> Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut circle = path[at..].to_vec();
            circle.push(m.to_owned());
            return Some(circle);
        }
        if done.iter().any(|d| d == m) {
            return None;
        }
        path.push(m.to_owned());
        for next in edges(m) {
            if let Some(c) = walk(&next, path, done, edges) {
                return Some(c);
            }
        }
        path.pop();
        done.push(m.to_owned());
        None
    }
    let mut done = Vec::new();
    for (m, _) in &graph {
        if let Some(circle) = walk(m, &mut Vec::new(), &mut done, &edges) {
            panic!(
                "files of src/system import each other in a circle: {}",
                circle.join(" -> ")
            );
        }
    }
    // The rooms: commands serve containers, never the other way.
    for (m, e) in &graph {
        if m.starts_with("system::commands") {
            let up: Vec<_> = e
                .iter()
                .filter(|t| t.starts_with("system::containers"))
                .collect();
            assert!(up.is_empty(), "{m} imports the containers room: {up:?}");
        }
        // Networks are the containers' to use; they use neither containers nor commands.
        if m.starts_with("system::network") {
            let up: Vec<_> = e
                .iter()
                .filter(|t| {
                    t.starts_with("system::containers") || t.starts_with("system::commands")
                })
                .collect();
            assert!(up.is_empty(), "{m} imports another room: {up:?}");
        }
    }
}
