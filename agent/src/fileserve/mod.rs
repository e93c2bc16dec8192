//! File requests served (`files` is the protocol): by the agent inside a container, in its own
//! view of the tree and as the container's root (or the user a request names), and by the
//! service for a host workspace, in a thread of its own connected to it as an agent would be.
//!
//! Every operation is on the server's own view: in a container, links resolve inside it and
//! ownership and permissions are the container's; nothing here is trusted to the service's
//! credentials. Writes are made to a temporary name beside the file and renamed into place, so
//! a reader sees the old file or the new one, and a failed write leaves the old one.

mod archive;
mod content;
mod ids;
pub mod io;
mod tree;
mod watch;

pub use archive::{pack, unpack};

use std::ffi::{CString, OsStr};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::files::{Entry, EntryType, FileErrorKind, FileOp, FileReply, FileRequest, MAX_PATH};

/// Entries of a listing when the request gives no `limit`.
pub const DEFAULT_LIST: u32 = 10_000;
/// Directories a watch follows when the request gives no `limit`.
pub const DEFAULT_WATCHED: u32 = 1024;

/// A failure to answer with: its kind, the path it is about, and the words.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) FileReply);

impl Failure {
    pub(crate) fn new(kind: FileErrorKind, path: &[u8], message: impl Into<String>) -> Self {
        Self(FileReply::failed(kind, path, message))
    }

    pub(crate) fn io(path: &[u8], e: &std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(n) => FileErrorKind::of_errno(n),
            None if e.kind() == std::io::ErrorKind::TimedOut => FileErrorKind::Incomplete,
            None => FileErrorKind::Other,
        };
        Self::new(kind, path, e.to_string())
    }
}

pub(crate) type Result<T, E = Failure> = std::result::Result<T, E>;

pub(crate) fn send(conn: &mut UnixStream, reply: &FileReply) -> bool {
    conn.write_all(&reply.encode()).is_ok()
}

/// Answers with the failure; the connection serves no other request.
pub(crate) fn refuse(conn: &mut UnixStream, f: Failure) -> bool {
    send(conn, &f.0);
    false
}

/// Serves one file request on `conn`, with the descriptor that came with it; true when the
/// connection may serve another request.
pub fn serve(conn: &mut UnixStream, req: FileRequest, mut fds: Vec<OwnedFd>) -> bool {
    let wanted = usize::from(req.op.streams_in() || req.op.streams_out());
    if fds.len() != wanted {
        let f = Failure::new(
            FileErrorKind::Invalid,
            &req.path,
            format!("expected {wanted} descriptors with the request"),
        );
        send(conn, &f.0);
        return false;
    }
    let fd = fds.pop();
    // Permissions are checked as the user asked for, and what is made is theirs: this
    // thread's file system ids (and groups) are theirs until the request is served.
    let identity = match ids::Identity::resolve(&req.user, &req.group) {
        Ok(i) => i,
        Err(f) => {
            send(conn, &f.0);
            return false;
        }
    };
    let _as = match identity.assume() {
        Ok(guard) => guard,
        Err(e) => {
            send(conn, &Failure::io(&req.path, &e).0);
            return false;
        }
    };
    let answer = match (req.op, fd) {
        (FileOp::Stat, None) => tree::stat(&req).map(one),
        (FileOp::List, None) => tree::list(&req),
        (FileOp::MakeDirectory, None) => tree::make_directory(&req).map(|()| FileReply::done()),
        (FileOp::Remove, None) => tree::remove(&req).map(|()| FileReply::done()),
        (FileOp::Move, None) => tree::move_(&req).map(|()| FileReply::done()),
        (FileOp::Read, Some(out)) => return content::read(conn, &req, out),
        (FileOp::Download, Some(out)) => return archive::download(conn, &req, out),
        (FileOp::Watch, Some(out)) => return watch::watch(conn, &req, out),
        (FileOp::Write, Some(input)) => return content::write(conn, &req, input),
        (FileOp::Upload, Some(input)) => return archive::upload(conn, &req, input),
        _ => unreachable!("descriptors checked above"),
    };
    send(conn, &answer.unwrap_or_else(|f| f.0))
}

/// Serves the one file request that comes on `conn`: the service's own thread for a host
/// workspace, connected to it as an agent would be.
pub fn serve_connection(mut conn: UnixStream) {
    match crate::read_request(&mut conn, Vec::new()) {
        Ok((crate::Request::File(req), fds)) => {
            serve(&mut conn, req, fds);
        }
        Ok(_) => {
            let f = Failure::new(FileErrorKind::Invalid, b"", "not a file request");
            send(&mut conn, &f.0);
        }
        Err(_) => {}
    }
}

pub(crate) fn one(e: Entry) -> FileReply {
    FileReply::Done {
        entries: vec![e],
        truncated: false,
    }
}

pub(crate) fn path_of(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// The request's path: absolute, no NUL, within `MAX_PATH`.
pub(crate) fn checked(p: &[u8]) -> Result<&Path> {
    if p.first() != Some(&b'/') {
        return Err(Failure::new(
            FileErrorKind::Invalid,
            p,
            "the path must be absolute",
        ));
    }
    if p.contains(&0) || p.len() > MAX_PATH {
        return Err(Failure::new(
            FileErrorKind::Invalid,
            p,
            "the path holds a NUL byte or is too long",
        ));
    }
    Ok(path_of(p))
}

pub(crate) fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

pub(crate) fn entry_of(name: &[u8], m: &std::fs::Metadata, target: Vec<u8>) -> Entry {
    Entry {
        name: name.to_vec(),
        kind: EntryType::of_mode(m.mode()),
        size: m.size(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_usec: m.mtime() * 1_000_000 + m.mtime_nsec() / 1000,
        target,
    }
}
