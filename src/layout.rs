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

fn assert_none_use(dir: &str, forbidden: &[&str], why: &str) {
    let found: Vec<String> = code_lines(dir)
        .into_iter()
        .filter(|(_, l)| forbidden.iter().any(|f| l.contains(f)))
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
        "src/dbus",
        &["axum", "hyper", "crate::http"],
        "src/dbus knows nothing of HTTP",
    );
}

/// Files that are one thing though longer than the rest, and why.
const LONG_ON_PURPOSE: &[(&str, &str)] = &[(
    "src/system/tree.rs",
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
