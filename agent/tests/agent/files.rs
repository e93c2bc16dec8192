//! File requests served by the agent binary (`files`, `fileserve`), end to end through its
//! socket, on this machine's file system.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use agent_workspaces_agent::files::{
    ABORT, COMMIT, EntryType, FileErrorKind, FileOp, FileReply, FileRequest, MAX_FILE_REPLY, flag,
};
use agent_workspaces_agent::{frame_len, send_with_fds};

use super::{Agent, pipe, start_agent};

fn reply(conn: &mut UnixStream) -> FileReply {
    let mut header = [0u8; 4];
    conn.read_exact(&mut header).unwrap();
    let n = frame_len(header, MAX_FILE_REPLY).unwrap();
    let mut body = vec![0u8; n];
    conn.read_exact(&mut body).unwrap();
    FileReply::decode(&body).unwrap()
}

fn send(agent: &Agent, req: &FileRequest, fd: Option<&OwnedFd>) -> UnixStream {
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let frame = req.encode();
    let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
    let n = send_with_fds(conn.as_fd(), &frame, &fds).unwrap();
    conn.write_all(&frame[n..]).unwrap();
    conn
}

fn call(agent: &Agent, req: &FileRequest) -> FileReply {
    reply(&mut send(agent, req, None))
}

fn req(op: FileOp, path: &Path) -> FileRequest {
    FileRequest::new(op, path.as_os_str().as_encoded_bytes().to_vec())
}

fn failed(r: FileReply) -> (FileErrorKind, String) {
    match r {
        FileReply::Failed { kind, path, .. } => (kind, String::from_utf8(path).unwrap()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Writes `content` to `path`; the final answer.
fn write(agent: &Agent, mut r: FileRequest, content: &[u8], commit: bool) -> FileReply {
    let (rd, wr) = pipe();
    r.op = FileOp::Write;
    let mut conn = send(agent, &r, Some(&rd));
    drop(rd);
    let first = reply(&mut conn);
    if first != FileReply::done() {
        return first;
    }
    let mut w = std::fs::File::from(wr);
    w.write_all(content).unwrap();
    drop(w);
    conn.write_all(&[if commit { COMMIT } else { ABORT }])
        .unwrap();
    reply(&mut conn)
}

/// Reads a file (or a download, or a watch) to its end.
fn read_out(agent: &Agent, r: &FileRequest) -> (FileReply, Vec<u8>) {
    let (rd, wr) = pipe();
    let mut conn = send(agent, r, Some(&wr));
    drop(wr);
    let first = reply(&mut conn);
    let mut out = Vec::new();
    std::fs::File::from(rd).read_to_end(&mut out).unwrap();
    (first, out)
}

fn dir(agent: &Agent, name: &str) -> std::path::PathBuf {
    let d = agent.socket.parent().unwrap().parent().unwrap().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn files_are_written_whole_read_from_offsets_and_listed() {
    let agent = start_agent();
    let d = dir(&agent, "w");
    let f = d.join("a.txt");
    let mut r = req(FileOp::Write, &f);
    r.mode = 0o640;
    let done = write(&agent, r.clone(), b"hello world", true);
    let FileReply::Done { entries, .. } = done else {
        panic!("{done:?}")
    };
    assert_eq!((entries[0].size, entries[0].mode), (11, 0o640));
    assert_eq!(std::fs::read(&f).unwrap(), b"hello world");
    // An aborted write leaves the old file, and no temporary one.
    let (kind, _) = failed(write(&agent, req(FileOp::Write, &f), b"half", false));
    assert_eq!(kind, FileErrorKind::Incomplete);
    assert_eq!(std::fs::read(&f).unwrap(), b"hello world");
    // A sized write that gets less is incomplete too.
    let mut sized = req(FileOp::Write, &f);
    sized.flags = flag::SIZED;
    sized.length = 100;
    assert_eq!(
        failed(write(&agent, sized, b"short", true)).0,
        FileErrorKind::Incomplete
    );
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        1,
        "no temporary file left"
    );
    // Replacing keeps the mode.
    write(&agent, req(FileOp::Write, &f), b"0123456789", true);
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o640);
    // Exclusive, append, parents.
    let mut ex = req(FileOp::Write, &f);
    ex.flags = flag::EXCLUSIVE;
    assert_eq!(
        failed(write(&agent, ex, b"x", true)),
        (FileErrorKind::Exists, f.display().to_string())
    );
    let mut app = req(FileOp::Write, &f);
    app.flags = flag::APPEND;
    write(&agent, app.clone(), b"AB", true);
    assert_eq!(std::fs::read(&f).unwrap(), b"0123456789AB");
    failed(write(&agent, app, b"lost", false));
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"0123456789AB",
        "an aborted append is cut back"
    );
    let deep = d.join("x/y/z.txt");
    assert_eq!(
        failed(write(&agent, req(FileOp::Write, &deep), b"1", true)).0,
        FileErrorKind::NotFound
    );
    let mut p = req(FileOp::Write, &deep);
    p.flags = flag::PARENTS;
    write(&agent, p, b"1", true);
    assert_eq!(std::fs::read(&deep).unwrap(), b"1");
    // Reads: whole, from an offset, a length.
    let (first, body) = read_out(&agent, &req(FileOp::Read, &f));
    assert!(matches!(first, FileReply::Done { .. }));
    assert_eq!(body, b"0123456789AB");
    let mut part = req(FileOp::Read, &f);
    part.offset = 3;
    part.length = 4;
    assert_eq!(read_out(&agent, &part).1, b"3456");
    // Listing: depth, sorted, each directory's entries after it, and a cap.
    let FileReply::Done { entries, truncated } = call(&agent, &req(FileOp::List, &d)) else {
        panic!()
    };
    let names: Vec<_> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    assert_eq!(
        (names, truncated),
        (vec!["a.txt".to_owned(), "x".into()], false)
    );
    let mut deep_list = req(FileOp::List, &d);
    deep_list.depth = 5;
    let FileReply::Done { entries, .. } = call(&agent, &deep_list) else {
        panic!()
    };
    let names: Vec<_> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    assert_eq!(names, ["a.txt", "x", "x/y", "x/y/z.txt"]);
    assert_eq!(entries[1].kind, EntryType::Directory);
    deep_list.limit = 2;
    let FileReply::Done { entries, truncated } = call(&agent, &deep_list) else {
        panic!()
    };
    assert_eq!((entries.len(), truncated), (2, true));
    assert_eq!(
        failed(call(&agent, &req(FileOp::List, &f))).0,
        FileErrorKind::NotADirectory
    );
    assert_eq!(
        failed(read_out(&agent, &req(FileOp::Read, &d)).0).0,
        FileErrorKind::IsADirectory
    );
    assert_eq!(
        failed(write(&agent, req(FileOp::Write, &d), b"", true)).0,
        FileErrorKind::IsADirectory
    );
}

#[test]
fn directories_links_removal_and_moves() {
    let agent = start_agent();
    let d = dir(&agent, "m");
    let sub = d.join("a/b/c");
    assert_eq!(
        failed(call(&agent, &req(FileOp::MakeDirectory, &sub))).0,
        FileErrorKind::NotFound
    );
    let mut mk = req(FileOp::MakeDirectory, &sub);
    mk.flags = flag::PARENTS;
    mk.mode = 0o700;
    assert_eq!(call(&agent, &mk), FileReply::done());
    assert_eq!(
        std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        call(&agent, &mk),
        FileReply::done(),
        "parents: one that exists is fine"
    );
    std::os::unix::fs::symlink("a/b", d.join("link")).unwrap();
    let FileReply::Done { entries, .. } = call(&agent, &req(FileOp::Stat, &d.join("link"))) else {
        panic!()
    };
    assert_eq!(
        (entries[0].kind, entries[0].target.as_slice()),
        (EntryType::Symlink, &b"a/b"[..])
    );
    // Not empty without recursive; gone with it.
    assert_eq!(
        failed(call(&agent, &req(FileOp::Remove, &d.join("a")))).0,
        FileErrorKind::NotEmpty
    );
    // Moves: no replace by default.
    std::fs::write(d.join("f1"), "1").unwrap();
    std::fs::write(d.join("f2"), "2").unwrap();
    let mut mv = req(FileOp::Move, &d.join("f1"));
    mv.target = d.join("f2").as_os_str().as_encoded_bytes().to_vec();
    assert_eq!(failed(call(&agent, &mv)).0, FileErrorKind::Exists);
    mv.flags = flag::REPLACE;
    assert_eq!(call(&agent, &mv), FileReply::done());
    assert_eq!(std::fs::read_to_string(d.join("f2")).unwrap(), "1");
    assert!(!d.join("f1").exists());
    let mut rm = req(FileOp::Remove, &d.join("a"));
    rm.flags = flag::RECURSIVE;
    assert_eq!(call(&agent, &rm), FileReply::done());
    assert!(!d.join("a").exists());
    assert_eq!(
        failed(call(&agent, &req(FileOp::Stat, &d.join("a")))).0,
        FileErrorKind::NotFound
    );
    assert_eq!(
        failed(call(&agent, &req(FileOp::Remove, Path::new("/")))).0,
        FileErrorKind::Invalid
    );
}

#[test]
fn a_fifo_or_a_device_is_a_named_error_and_never_blocks() {
    let agent = start_agent();
    let d = dir(&agent, "fifo");
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo.as_path(), Path::new("/dev/null")] {
        let start = std::time::Instant::now();
        let (kind, _) = failed(read_out(&agent, &req(FileOp::Read, path)).0);
        assert_eq!(kind, FileErrorKind::NotRegular, "{}", path.display());
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(
            failed(write(&agent, req(FileOp::Write, path), b"x", true)).0,
            FileErrorKind::NotRegular
        );
    }
    // A caller that closes its end early: the agent stops and serves on.
    let big = d.join("big");
    std::fs::write(&big, vec![7u8; 8 << 20]).unwrap();
    let (rd, wr) = pipe();
    let mut conn = send(&agent, &req(FileOp::Read, &big), Some(&wr));
    drop(wr);
    assert!(matches!(reply(&mut conn), FileReply::Done { .. }));
    let mut some = [0u8; 1000];
    std::fs::File::from(rd).read_exact(&mut some).unwrap();
    // (rd dropped here: the agent's next write fails, and its thread serves another.)
    assert!(matches!(
        call(&agent, &req(FileOp::Stat, &big)),
        FileReply::Done { .. }
    ));
}

fn upload(agent: &Agent, dest: &Path, archive: &[u8]) -> FileReply {
    let (rd, wr) = pipe();
    let mut r = req(FileOp::Upload, dest);
    r.flags = flag::PARENTS;
    let mut conn = send(agent, &r, Some(&rd));
    drop(rd);
    let first = reply(&mut conn);
    if first != FileReply::done() {
        return first;
    }
    let archive = archive.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = std::fs::File::from(wr).write_all(&archive);
    });
    writer.join().unwrap();
    conn.write_all(&[COMMIT]).unwrap();
    reply(&mut conn)
}

/// An archive entry: name, type, link target, content.
type Raw<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

/// A tar archive of raw headers (the tar crate's builder refuses what a hostile one holds).
fn hostile(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn download_and_upload_round_trip_and_hostile_archives_write_nothing_outside() {
    let agent = start_agent();
    let src = dir(&agent, "src");
    std::fs::create_dir_all(src.join("sub/deep")).unwrap();
    std::fs::write(src.join("a.txt"), "a").unwrap();
    std::fs::write(src.join("sub/deep/b.bin"), vec![1u8; 100_000]).unwrap();
    std::fs::set_permissions(src.join("a.txt"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
    let (first, tarball) = read_out(&agent, &req(FileOp::Download, &src));
    assert_eq!(first, FileReply::done());
    let dest = dir(&agent, "dest").join("new");
    assert_eq!(upload(&agent, &dest, &tarball), FileReply::done());
    assert_eq!(
        std::fs::read(dest.join("sub/deep/b.bin")).unwrap(),
        vec![1u8; 100_000]
    );
    assert_eq!(
        std::fs::metadata(dest.join("a.txt")).unwrap().mode() & 0o777,
        0o751
    );
    assert_eq!(
        std::fs::read_link(dest.join("sub/link")).unwrap(),
        Path::new("../a.txt")
    );

    let outside = dir(&agent, "outside");
    let box_ = dir(&agent, "box");
    let outside_s = outside.as_os_str().as_encoded_bytes().to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            hostile(&[(b"../outside/evil", tar::EntryType::Regular, b"", b"x")]),
        ),
        (
            "absolute",
            hostile(&[(
                &[outside_s.as_slice(), b"/evil"].concat(),
                tar::EntryType::Regular,
                b"",
                b"x",
            )]),
        ),
        (
            "through a link",
            hostile(&[
                (b"l", tar::EntryType::Symlink, &outside_s, b""),
                (b"l/evil", tar::EntryType::Regular, b"", b"x"),
            ]),
        ),
        (
            "device",
            hostile(&[(b"dev", tar::EntryType::Char, b"", b"")]),
        ),
        (
            "fifo",
            hostile(&[(b"fifo", tar::EntryType::Fifo, b"", b"")]),
        ),
        (
            "hard link out",
            hostile(&[(b"h", tar::EntryType::Link, b"../outside/secret", b"")]),
        ),
    ];
    std::fs::write(outside.join("secret"), "s").unwrap();
    for (what, archive) in cases {
        let (kind, _) = failed(upload(&agent, &box_, &archive));
        assert_eq!(kind, FileErrorKind::ArchiveRefused, "{what}");
        let names: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret"], "{what}: nothing written outside");
    }
    assert!(!box_.join("dev").exists() && !box_.join("fifo").exists());
    // Not an archive at all.
    assert_eq!(
        failed(upload(&agent, &box_, &[1u8; 2048])).0,
        FileErrorKind::ArchiveRefused
    );
}

#[test]
fn watch_reports_created_modified_deleted_and_moved_until_its_reader_closes() {
    let agent = start_agent();
    let d = dir(&agent, "watched");
    std::fs::create_dir(d.join("old")).unwrap();
    let (rd, wr) = pipe();
    let mut conn = send(&agent, &req(FileOp::Watch, &d), Some(&wr));
    drop(wr);
    assert_eq!(reply(&mut conn), FileReply::done());
    let mut events = std::io::BufReader::new(std::fs::File::from(rd));
    let mut next = || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut events, &mut line).unwrap();
        line
    };
    std::fs::write(d.join("f"), "1").unwrap();
    assert_eq!(
        next(),
        "{\"event\":\"created\",\"path\":\"f\",\"type\":\"file\"}\n"
    );
    assert_eq!(
        next(),
        "{\"event\":\"modified\",\"path\":\"f\",\"type\":\"file\"}\n"
    );
    std::fs::write(d.join("old/g"), "1").unwrap();
    assert_eq!(
        next(),
        "{\"event\":\"created\",\"path\":\"old/g\",\"type\":\"file\"}\n"
    );
    assert_eq!(
        next(),
        "{\"event\":\"modified\",\"path\":\"old/g\",\"type\":\"file\"}\n"
    );
    std::fs::rename(d.join("f"), d.join("h")).unwrap();
    assert_eq!(
        next(),
        "{\"event\":\"moved\",\"path\":\"h\",\"type\":\"file\",\"from\":\"f\"}\n"
    );
    std::fs::remove_file(d.join("h")).unwrap();
    assert_eq!(
        next(),
        "{\"event\":\"deleted\",\"path\":\"h\",\"type\":\"file\"}\n"
    );
    std::fs::create_dir(d.join("new")).unwrap();
    assert_eq!(
        next(),
        "{\"event\":\"created\",\"path\":\"new\",\"type\":\"dir\"}\n"
    );
    std::fs::write(d.join("new/x"), "").unwrap();
    assert_eq!(
        next(),
        "{\"event\":\"created\",\"path\":\"new/x\",\"type\":\"file\"}\n"
    );
}

#[test]
fn a_cut_archive_puts_nothing_half_in_place_and_unpack_makes_no_setuid_file() {
    let agent = start_agent();
    let d = dir(&agent, "cut");
    std::fs::write(d.join("data.bin"), "the good one").unwrap();
    let whole = hostile(&[
        (b"first", tar::EntryType::Regular, b"", b"1"),
        (b"data.bin", tar::EntryType::Regular, b"", &[7u8; 4000]),
    ]);
    // Cut inside data.bin's content: an error, and the old data.bin stays.
    let cut = &whole[..512 * 3 + 1000];
    assert!(matches!(upload(&agent, &d, cut), FileReply::Failed { .. }));
    assert_eq!(std::fs::read(d.join("data.bin")).unwrap(), b"the good one");
    // Cut between two entries (no end blocks): said, not taken for whole.
    let between = &whole[..512 * 2];
    assert_eq!(
        failed(upload(&agent, &d, between)).0,
        FileErrorKind::Incomplete
    );
    assert_eq!(std::fs::read(d.join("data.bin")).unwrap(), b"the good one");
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".aw-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A client unpacking what a workspace sent: no set-user-ID file.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o4755);
    h.set_size(1);
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut h, "suid", &b"x"[..]).unwrap();
    let archive = b.into_inner().unwrap();
    let (r, w) = pipe();
    let writer = std::thread::spawn(move || std::fs::File::from(w).write_all(&archive).unwrap());
    let out = dir(&agent, "client");
    agent_workspaces_agent::fileserve::unpack(&out, r).unwrap();
    writer.join().unwrap();
    assert_eq!(
        std::fs::metadata(out.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
}
