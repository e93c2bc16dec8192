//! `Watch`: changes below a directory (or to one file), as lines of JSON into the pipe, until
//! its reader closes it (or stops reading for `io::STALL`).
//!
//! Each line is one event: `{"event":"created","path":"src/a.rs","type":"file"}`, with
//! `event` one of `created`, `modified`, `deleted`, `moved` (with `"from"`), `overflow` (the
//! kernel dropped events: look again) and `limit` (a directory left unwatched: more than
//! `limit` directories). Paths are relative to the watched path. Directories are watched as
//! they appear (what a new directory already holds is reported created).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::io::PipeWriter;
use super::{DEFAULT_WATCHED, Failure, checked, refuse, send};
use crate::files::{EntryType, FileReply, FileRequest, MAX_WATCHED};

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

struct Watcher {
    fd: OwnedFd,
    root: PathBuf,
    /// Watch descriptor -> its directory, relative to the root ("" for the root).
    dirs: HashMap<i32, Vec<u8>>,
    limit: usize,
    limited: bool,
    out: PipeWriter,
    /// The root is a file: its own events, named by its name.
    file: Option<Vec<u8>>,
    /// The last `modified` reported, and when: a write is many events (`IN_MODIFY` for each
    /// write, `IN_CLOSE_WRITE`), reported once a second at most while nothing else happens.
    modified: Option<(Vec<u8>, std::time::Instant)>,
}

pub fn watch(conn: &mut UnixStream, req: &FileRequest, out: OwnedFd) -> bool {
    let root = match checked(&req.path) {
        Ok(p) => p.to_path_buf(),
        Err(f) => return refuse(conn, f),
    };
    let m = match std::fs::metadata(&root) {
        Ok(m) => m,
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
    };
    // SAFETY: a new inotify instance; the descriptor is ours.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return refuse(
            conn,
            Failure::io(&req.path, &std::io::Error::last_os_error()),
        );
    }
    let out = match PipeWriter::new(out) {
        Ok(o) => o,
        Err(e) => return refuse(conn, Failure::io(&req.path, &e)),
    };
    let mut w = Watcher {
        // SAFETY: just made.
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
        root: root.clone(),
        dirs: HashMap::new(),
        limit: match req.limit {
            0 => DEFAULT_WATCHED,
            n => n.min(MAX_WATCHED),
        } as usize,
        limited: false,
        out,
        file: None,
        modified: None,
    };
    if m.is_dir() {
        if let Err(e) = w.add(b"") {
            return refuse(conn, Failure::io(&req.path, &e));
        }
        w.add_below(b"", false);
    } else {
        let name = root
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        if let Err(e) = w.add_file(&root) {
            return refuse(conn, Failure::io(&req.path, &e));
        }
        w.file = Some(name);
    }
    if !send(conn, &FileReply::done()) {
        return false;
    }
    if w.limited {
        let _ = w.emit("limit", b"", None, None);
    }
    let _ = w.run();
    false
}

impl Watcher {
    fn add(&mut self, rel: &[u8]) -> std::io::Result<()> {
        self.add_mask(&self.root.join(OsStr::from_bytes(rel)), MASK)
            .map(|wd| {
                self.dirs.insert(wd, rel.to_vec());
            })
    }

    fn add_file(&mut self, path: &Path) -> std::io::Result<()> {
        let mask = libc::IN_MODIFY
            | libc::IN_CLOSE_WRITE
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ATTRIB;
        self.add_mask(path, mask).map(|wd| {
            self.dirs.insert(wd, Vec::new());
        })
    }

    fn add_mask(&self, path: &Path, mask: u32) -> std::io::Result<i32> {
        let c = super::cstr(path)?;
        // SAFETY: inotify_add_watch with a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(wd)
        }
    }

    /// Watches the directories below `rel` (never through a link), within the limit; with
    /// `report`, what is there is reported created.
    fn add_below(&mut self, rel: &[u8], report: bool) {
        let dir = self.root.join(OsStr::from_bytes(rel));
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        names.sort();
        for n in names {
            let child = join(rel, n.as_bytes());
            let Ok(m) = std::fs::symlink_metadata(dir.join(&n)) else {
                continue;
            };
            if report {
                let _ = self.emit(
                    "created",
                    &child,
                    Some(EntryType::of_mode(std::os::unix::fs::MetadataExt::mode(&m))),
                    None,
                );
            }
            if m.is_dir() {
                let nesting = child.iter().filter(|b| **b == b'/').count();
                if self.dirs.len() >= self.limit || nesting >= super::archive::MAX_NESTING {
                    self.limited = true;
                    continue;
                }
                if self.add(&child).is_ok() {
                    self.add_below(&child, report);
                }
            }
        }
    }

    fn emit(
        &mut self,
        event: &str,
        path: &[u8],
        kind: Option<EntryType>,
        from: Option<&[u8]>,
    ) -> std::io::Result<()> {
        if event == "modified" {
            if let Some((p, at)) = &self.modified
                && p == path
                && at.elapsed() < std::time::Duration::from_secs(1)
            {
                return Ok(());
            }
            self.modified = Some((path.to_vec(), std::time::Instant::now()));
        } else {
            self.modified = None;
        }
        let mut line = format!("{{\"event\":\"{event}\"");
        if event != "overflow" {
            line.push_str(&format!(",\"path\":{}", json_string(path)));
        }
        if let Some(k) = kind {
            line.push_str(&format!(",\"type\":\"{}\"", k.as_str()));
        }
        if let Some(f) = from {
            line.push_str(&format!(",\"from\":{}", json_string(f)));
        }
        line.push_str("}\n");
        self.out.write_all(line.as_bytes())
    }

    /// Reads events until the reader goes (or stalls), or the watched path itself goes.
    fn run(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut p = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                // Only errors: the reader closed its end.
                libc::pollfd {
                    fd: self.out.0.as_fd().as_raw_fd(),
                    events: 0,
                    revents: 0,
                },
            ];
            // SAFETY: polling two descriptors we hold.
            let n = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if p[1].revents != 0 {
                return Ok(());
            }
            // SAFETY: read into the buffer given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            let events = parse(&buf[..n as usize]);
            if !self.handle(events)? {
                return Ok(());
            }
        }
    }

    /// Reports one batch of events; false when the watched path itself is gone.
    fn handle(&mut self, events: Vec<Event>) -> std::io::Result<bool> {
        let mut i = 0;
        while i < events.len() {
            let e = &events[i];
            i += 1;
            if e.mask & libc::IN_Q_OVERFLOW != 0 {
                self.emit("overflow", b"", None, None)?;
                continue;
            }
            let Some(dir) = self.dirs.get(&e.wd).cloned() else {
                continue;
            };
            if let Some(name) = self.file.clone() {
                if e.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                    self.emit("deleted", &name, Some(EntryType::File), None)?;
                    return Ok(false);
                }
                if e.mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE | libc::IN_ATTRIB) != 0 {
                    self.emit("modified", &name, Some(EntryType::File), None)?;
                }
                continue;
            }
            if e.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                if dir.is_empty() {
                    self.emit("deleted", b".", Some(EntryType::Directory), None)?;
                    return Ok(false);
                }
                continue;
            }
            if e.mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&e.wd);
                continue;
            }
            let path = join(&dir, &e.name);
            let is_dir = e.mask & libc::IN_ISDIR != 0;
            let kind = |path: &[u8]| {
                if is_dir {
                    EntryType::Directory
                } else {
                    std::fs::symlink_metadata(self.root.join(OsStr::from_bytes(path)))
                        .map(|m| EntryType::of_mode(std::os::unix::fs::MetadataExt::mode(&m)))
                        .unwrap_or(EntryType::File)
                }
            };
            let (event, from) = if e.mask & libc::IN_MOVED_FROM != 0 {
                // Paired with the next event when that is its other half.
                match events.get(i) {
                    Some(to) if to.mask & libc::IN_MOVED_TO != 0 && to.cookie == e.cookie => {
                        i += 1;
                        let to_dir = self.dirs.get(&to.wd).cloned().unwrap_or_default();
                        let to_path = join(&to_dir, &to.name);
                        let k = kind(&to_path);
                        self.emit("moved", &to_path, Some(k), Some(&path))?;
                        if is_dir {
                            self.rename_dirs(&path, &to_path);
                        }
                        continue;
                    }
                    _ => ("deleted", None),
                }
            } else if e.mask & libc::IN_MOVED_TO != 0 || e.mask & libc::IN_CREATE != 0 {
                ("created", None)
            } else if e.mask & libc::IN_DELETE != 0 {
                ("deleted", None)
            } else if e.mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
                ("modified", None)
            } else {
                continue;
            };
            let k = if event == "deleted" {
                if is_dir {
                    EntryType::Directory
                } else {
                    EntryType::File
                }
            } else {
                kind(&path)
            };
            self.emit(event, &path, Some(k), from)?;
            if event == "created" && is_dir {
                if self.dirs.len() >= self.limit {
                    self.emit("limit", &path, Some(EntryType::Directory), None)?;
                } else if self.add(&path).is_ok() {
                    self.add_below(&path, true);
                }
            }
        }
        Ok(true)
    }

    /// A watched directory moved: its watches (and those below) carry the new name.
    fn rename_dirs(&mut self, from: &[u8], to: &[u8]) {
        for rel in self.dirs.values_mut() {
            if rel.as_slice() == from {
                *rel = to.to_vec();
            } else if rel.starts_with(from) && rel.get(from.len()) == Some(&b'/') {
                let mut n = to.to_vec();
                n.extend_from_slice(&rel[from.len()..]);
                *rel = n;
            }
        }
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() && !name.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

struct Event {
    wd: i32,
    mask: u32,
    cookie: u32,
    name: Vec<u8>,
}

fn parse(mut buf: &[u8]) -> Vec<Event> {
    let head = std::mem::size_of::<libc::inotify_event>();
    let mut out = Vec::new();
    while buf.len() >= head {
        // SAFETY: at least one header's bytes; read unaligned.
        let e: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let len = e.len as usize;
        if buf.len() < head + len {
            break;
        }
        let name = &buf[head..head + len];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        out.push(Event {
            wd: e.wd,
            mask: e.mask,
            cookie: e.cookie,
            name: name.to_vec(),
        });
        buf = &buf[head + len..];
    }
    out
}

/// A JSON string of bytes (invalid UTF-8 replaced).
fn json_string(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(super::json_string(b"a\"b\\c\n\x01"), r#""a\"b\\c\n\u0001""#);
        assert_eq!(super::json_string(b"\xff"), "\"\u{fffd}\"");
    }
}
