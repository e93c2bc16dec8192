//! The file requests of the wire protocol: a workspace's files read, written, listed, moved,
//! archived and watched by the agent inside its container (its own view of the tree, its own
//! user namespace), or, for a host workspace, by the same code in a thread of the service
//! (`fileserve`).
//!
//! A request (`FileRequest`, kind `KIND_FILE`) brings at most one descriptor: a pipe the
//! service made, never one a caller lent. Its write end for what streams out (`Read`,
//! `Download`, `Watch`): the agent answers `FileReply::Done` (or `Failed`), then writes into it
//! until the end (or until its reader leaves). Its read end for what streams in (`Write`,
//! `Upload`): the agent answers `Done` once it is ready to take the content (or `Failed`), reads
//! the pipe to its end, then one byte from the service: `COMMIT` (the content came whole: put
//! it in place) or anything else (it did not: leave nothing of it), and answers again.
//! The other requests are answered once, and the connection may serve another (`NEXT`).

use crate::{DecodeError, PROTOCOL_VERSION, Reader, frame, put_bytes};

pub(crate) const KIND_FILE: u8 = 5;
const KIND_FILE_DONE: u8 = 5;
const KIND_FILE_FAILED: u8 = 6;

/// After the content of a `Write` or an `Upload`: it came whole.
pub const COMMIT: u8 = b'c';
/// ... or it did not.
pub const ABORT: u8 = b'a';

/// The largest file reply (a listing).
pub const MAX_FILE_REPLY: usize = 4 * 1024 * 1024;
/// The longest path a request may name (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Entries of a listing at most (`limit`).
pub const MAX_LIST: u32 = 100_000;
/// Levels of a listing below the directory at most (`depth`).
pub const MAX_DEPTH: u32 = 64;
/// Directories a watch follows at most (`limit` of a `Watch`).
pub const MAX_WATCHED: u32 = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    Read,
    Write,
    List,
    Stat,
    MakeDirectory,
    Remove,
    Move,
    Download,
    Upload,
    Watch,
}

impl FileOp {
    const ALL: [FileOp; 10] = [
        FileOp::Read,
        FileOp::Write,
        FileOp::List,
        FileOp::Stat,
        FileOp::MakeDirectory,
        FileOp::Remove,
        FileOp::Move,
        FileOp::Download,
        FileOp::Upload,
        FileOp::Watch,
    ];

    fn code(self) -> u8 {
        Self::ALL.iter().position(|o| *o == self).expect("listed") as u8 + 1
    }

    /// A content pipe's write end goes with the request: the agent writes into it.
    pub fn streams_out(self) -> bool {
        matches!(self, FileOp::Read | FileOp::Download | FileOp::Watch)
    }

    /// A content pipe's read end goes with the request: the agent reads from it.
    pub fn streams_in(self) -> bool {
        matches!(self, FileOp::Write | FileOp::Upload)
    }
}

/// Option bits of a request.
pub mod flag {
    /// Make missing parent directories (`Write`, `MakeDirectory`, `Upload`).
    pub const PARENTS: u32 = 1;
    /// Append to the file rather than replace it (`Write`; not atomic).
    pub const APPEND: u32 = 1 << 1;
    /// Fail if the path exists (`Write`).
    pub const EXCLUSIVE: u32 = 1 << 2;
    /// Remove a directory with everything in it (`Remove`).
    pub const RECURSIVE: u32 = 1 << 3;
    /// Replace what is at the target (`Move`).
    pub const REPLACE: u32 = 1 << 4;
    /// `length` of a `Write` is the content's size: less is a failed write.
    pub const SIZED: u32 = 1 << 5;
    pub(crate) const ALL: u32 = (1 << 6) - 1;
}

/// One file request. Paths are absolute in the view of whoever serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequest {
    pub op: FileOp,
    pub path: Vec<u8>,
    /// `Move`'s destination; empty otherwise.
    pub target: Vec<u8>,
    pub flags: u32,
    /// Permission bits of what is made (0: the default, or the replaced file's).
    pub mode: u32,
    /// `Read`: where to start.
    pub offset: u64,
    /// `Read`: bytes at most (`u64::MAX`: to the end); `Write` with `SIZED`: the size.
    pub length: u64,
    /// `List`: levels below the directory (1: its entries).
    pub depth: u32,
    /// `List`: entries at most; `Watch`: directories at most.
    pub limit: u32,
    /// Who does it (permissions are checked as that user, and what is made is theirs): a
    /// name or a number; empty: the server itself.
    pub user: Vec<u8>,
    pub group: Vec<u8>,
}

impl FileRequest {
    pub fn new(op: FileOp, path: impl Into<Vec<u8>>) -> Self {
        Self {
            op,
            path: path.into(),
            target: Vec::new(),
            flags: 0,
            mode: 0,
            offset: 0,
            length: u64::MAX,
            depth: 1,
            limit: 0,
            user: Vec::new(),
            group: Vec::new(),
        }
    }

    pub fn has(&self, f: u32) -> bool {
        self.flags & f != 0
    }

    /// The whole frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        body.push(self.op.code());
        put_bytes(&mut body, &self.path);
        put_bytes(&mut body, &self.target);
        body.extend_from_slice(&self.flags.to_le_bytes());
        body.extend_from_slice(&self.mode.to_le_bytes());
        body.extend_from_slice(&self.offset.to_le_bytes());
        body.extend_from_slice(&self.length.to_le_bytes());
        body.extend_from_slice(&self.depth.to_le_bytes());
        body.extend_from_slice(&self.limit.to_le_bytes());
        put_bytes(&mut body, &self.user);
        put_bytes(&mut body, &self.group);
        frame(KIND_FILE, &body)
    }

    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(frame);
        if r.u8()? != KIND_FILE {
            return Err(DecodeError("unknown request kind"));
        }
        if r.u32()? != PROTOCOL_VERSION {
            return Err(DecodeError("unsupported protocol version"));
        }
        let code = r.u8()?;
        let op = *FileOp::ALL
            .get(usize::from(code).wrapping_sub(1))
            .ok_or(DecodeError("unknown file operation"))?;
        let short = |b: &[u8]| {
            if b.len() > MAX_PATH {
                Err(DecodeError("path too long"))
            } else {
                Ok(b.to_vec())
            }
        };
        let path = short(r.bytes()?)?;
        let target = short(r.bytes()?)?;
        let flags = r.u32()?;
        if flags & !flag::ALL != 0 {
            return Err(DecodeError("unknown file option"));
        }
        let req = Self {
            op,
            path,
            target,
            flags,
            mode: r.u32()?,
            offset: r.u64()?,
            length: r.u64()?,
            depth: r.u32()?,
            limit: r.u32()?,
            user: short(r.bytes()?)?,
            group: short(r.bytes()?)?,
        };
        r.end()?;
        Ok(req)
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    File,
    Directory,
    Symlink,
    /// A FIFO, a socket, a device node.
    Other,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Directory => "dir",
            Self::Symlink => "symlink",
            Self::Other => "other",
        }
    }

    pub fn of_mode(mode: u32) -> Self {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Self::File,
            libc::S_IFDIR => Self::Directory,
            libc::S_IFLNK => Self::Symlink,
            _ => Self::Other,
        }
    }
}

/// A file's metadata, as a listing or a `Stat` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// In a listing, relative to the listed directory (`src/main.rs`); for `Stat`, the path.
    pub name: Vec<u8>,
    pub kind: EntryType,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, microseconds since the epoch.
    pub mtime_usec: i64,
    /// A symbolic link's target; empty otherwise.
    pub target: Vec<u8>,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        put_bytes(out, &self.name);
        out.push(match self.kind {
            EntryType::File => 1,
            EntryType::Directory => 2,
            EntryType::Symlink => 3,
            EntryType::Other => 4,
        });
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.mtime_usec.to_le_bytes());
        put_bytes(out, &self.target);
    }

    /// Bytes it takes in a reply.
    pub fn encoded_len(&self) -> usize {
        4 + self.name.len() + 1 + 8 + 4 + 4 + 4 + 8 + 4 + self.target.len()
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.bytes()?.to_vec(),
            kind: match r.u8()? {
                1 => EntryType::File,
                2 => EntryType::Directory,
                3 => EntryType::Symlink,
                4 => EntryType::Other,
                _ => return Err(DecodeError("unknown entry type")),
            },
            size: r.u64()?,
            mode: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            mtime_usec: r.u64()? as i64,
            target: r.bytes()?.to_vec(),
        })
    }
}

/// Why a file request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorKind {
    NotFound,
    NotADirectory,
    IsADirectory,
    Exists,
    PermissionDenied,
    /// A FIFO, a socket or a device node where a file or directory is needed.
    NotRegular,
    NoSpace,
    NotEmpty,
    /// An archive entry that would leave the destination, or that is not a file, directory
    /// or link (a device node).
    ArchiveRefused,
    /// A request that cannot be served as asked (a bad option, a path over the limits, a
    /// user that does not exist there).
    Invalid,
    /// The content did not come whole (the caller closed early, or sent less than `length`).
    Incomplete,
    /// Anything else (an I/O error).
    Other,
}

impl FileErrorKind {
    const ALL: [FileErrorKind; 12] = [
        Self::NotFound,
        Self::NotADirectory,
        Self::IsADirectory,
        Self::Exists,
        Self::PermissionDenied,
        Self::NotRegular,
        Self::NoSpace,
        Self::NotEmpty,
        Self::ArchiveRefused,
        Self::Invalid,
        Self::Incomplete,
        Self::Other,
    ];

    /// The kind of an error number.
    pub fn of_errno(errno: i32) -> Self {
        match errno {
            libc::ENOENT => Self::NotFound,
            libc::ENOTDIR => Self::NotADirectory,
            libc::EISDIR => Self::IsADirectory,
            libc::EEXIST => Self::Exists,
            libc::EACCES | libc::EPERM | libc::EROFS => Self::PermissionDenied,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Self::NoSpace,
            libc::ENOTEMPTY => Self::NotEmpty,
            libc::ENAMETOOLONG | libc::ELOOP => Self::Invalid,
            _ => Self::Other,
        }
    }
}

/// The answer to a file request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileReply {
    /// Done (or, for what streams, ready): `Stat` and `Read` give the file's entry, `List` the
    /// directory's entries (sorted by name, `truncated` when there were more than it could
    /// give), `Write` after `COMMIT` the written file's entry; the rest nothing.
    Done {
        entries: Vec<Entry>,
        truncated: bool,
    },
    Failed {
        kind: FileErrorKind,
        /// The path the failure is about (the request's, a parent of it, an archive entry's).
        path: Vec<u8>,
        /// What went wrong, in words (an error number's text).
        message: String,
    },
}

impl FileReply {
    pub fn done() -> Self {
        Self::Done {
            entries: Vec::new(),
            truncated: false,
        }
    }

    pub fn failed(kind: FileErrorKind, path: &[u8], message: impl Into<String>) -> Self {
        Self::Failed {
            kind,
            path: path[..path.len().min(MAX_PATH)].to_vec(),
            message: message.into(),
        }
    }

    /// The whole frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Done { entries, truncated } => {
                let mut body = vec![u8::from(*truncated)];
                body.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    e.encode(&mut body);
                }
                frame(KIND_FILE_DONE, &body)
            }
            Self::Failed {
                kind,
                path,
                message,
            } => {
                let code = FileErrorKind::ALL
                    .iter()
                    .position(|k| k == kind)
                    .expect("listed") as u8;
                let mut body = vec![code];
                put_bytes(&mut body, path);
                let m = message.as_bytes();
                put_bytes(&mut body, &m[..m.len().min(1024)]);
                frame(KIND_FILE_FAILED, &body)
            }
        }
    }

    /// Decodes a frame's contents (after its length).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(frame);
        let reply = match r.u8()? {
            KIND_FILE_DONE => {
                let truncated = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError("bad flag")),
                };
                let n = r.u32()? as usize;
                // Each entry takes at least 37 bytes: no allocation beyond what was received.
                if n > r.0.len() / 37 {
                    return Err(DecodeError("entry count exceeds the frame"));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(Entry::decode(&mut r)?);
                }
                Self::Done { entries, truncated }
            }
            KIND_FILE_FAILED => {
                let kind = *FileErrorKind::ALL
                    .get(usize::from(r.u8()?))
                    .ok_or(DecodeError("unknown error kind"))?;
                let path = r.bytes()?;
                if path.len() > MAX_PATH {
                    return Err(DecodeError("path too long"));
                }
                let message = String::from_utf8_lossy(r.bytes()?).into_owned();
                Self::Failed {
                    kind,
                    path: path.to_vec(),
                    message,
                }
            }
            _ => return Err(DecodeError("unknown reply kind")),
        };
        r.end()?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            name: b"src/main.rs".to_vec(),
            kind: EntryType::Symlink,
            size: 1 << 40,
            mode: 0o755,
            uid: 1000,
            gid: 100,
            mtime_usec: -5,
            target: b"../x".to_vec(),
        }
    }

    #[test]
    fn requests_and_replies_round_trip() {
        for op in FileOp::ALL {
            let mut r = FileRequest::new(op, b"/workspace/a".to_vec());
            r.target = b"/workspace/b".to_vec();
            r.flags = flag::PARENTS | flag::SIZED;
            r.mode = 0o640;
            r.offset = 7;
            r.length = 9;
            r.depth = 3;
            r.limit = 10;
            r.user = b"nobody".to_vec();
            r.group = b"100".to_vec();
            let f = r.encode();
            assert_eq!(
                crate::frame_len([f[0], f[1], f[2], f[3]], crate::MAX_REQUEST).unwrap(),
                f.len() - 4
            );
            assert_eq!(
                crate::Request::decode(&f[4..]).unwrap(),
                crate::Request::File(r)
            );
        }
        for reply in [
            FileReply::done(),
            FileReply::Done {
                entries: vec![entry(), entry()],
                truncated: true,
            },
            FileReply::failed(FileErrorKind::NotRegular, b"/dev/null", "a device"),
            FileReply::failed(FileErrorKind::Other, b"", "I/O error"),
        ] {
            let f = reply.encode();
            assert_eq!(
                f.len() - 4,
                u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize
            );
            assert_eq!(FileReply::decode(&f[4..]).unwrap(), reply);
        }
        assert_eq!(entry().encoded_len(), {
            let mut v = Vec::new();
            entry().encode(&mut v);
            v.len()
        });
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        let mut r = FileRequest::new(FileOp::Write, b"/a".to_vec());
        r.user = b"u".to_vec();
        let f = r.encode();
        for cut in 0..f.len() - 4 {
            assert!(FileRequest::decode(&f[4..4 + cut]).is_err(), "cut at {cut}");
        }
        let reply = FileReply::Done {
            entries: vec![entry()],
            truncated: false,
        }
        .encode();
        for cut in 0..reply.len() - 4 {
            assert!(
                FileReply::decode(&reply[4..4 + cut]).is_err(),
                "cut at {cut}"
            );
        }
        for i in 4..f.len() {
            for b in [0u8, 1, 0x7f, 0xff] {
                let mut g = f.clone();
                g[i] = b;
                let _ = FileRequest::decode(&g[4..]);
                let mut g = reply.clone();
                if i < g.len() {
                    g[i] = b;
                    let _ = FileReply::decode(&g[4..]);
                }
            }
        }
        // An unknown option bit, an unknown operation, a count beyond the frame.
        let mut bad = r.clone();
        bad.flags = 1 << 31;
        assert!(FileRequest::decode(&bad.encode()[4..]).is_err());
        let mut g = f.clone();
        g[9] = 99;
        assert!(FileRequest::decode(&g[4..]).is_err());
        let mut huge = vec![KIND_FILE_DONE, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(FileReply::decode(&huge).is_err());
        // A path over the limit.
        let long = FileRequest::new(FileOp::Stat, vec![b'a'; MAX_PATH + 1]);
        assert!(FileRequest::decode(&long.encode()[4..]).is_err());
    }
}
