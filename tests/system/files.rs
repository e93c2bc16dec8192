//! A workspace's files over D-Bus, in a host workspace and inside a real container: every
//! method, ownership inside, atomic replace, large files at constant memory, offsets, tar
//! streams both ways (10 000 files; hostile archives), watch events, callers that close early,
//! FIFOs, and a stopped container started on use.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use agent_workspaces::dbus::client::{Args, WorkspacesProxy};
use zbus::Variant;

use super::boundary::inside;
use super::*;

fn opts<'a>(items: Vec<(&'a str, Variant<'a>)>) -> Args<'a> {
    items.into_iter().collect()
}

/// A pipe whose write end a thread fills with `content` (then closes); its read end.
fn feed(content: Vec<u8>) -> (OwnedFd, std::thread::JoinHandle<()>) {
    let (r, mut w) = std::io::pipe().unwrap();
    let t = std::thread::spawn(move || {
        let _ = w.write_all(&content);
    });
    (r.into(), t)
}

async fn write(
    m: &WorkspacesProxy<'_>,
    ws: &str,
    path: &str,
    content: &[u8],
    o: Args<'_>,
) -> zbus::Result<()> {
    let (r, t) = feed(content.to_vec());
    let res = m.write_file(ws, path, zbus::Fd::from(r.as_fd()), o).await;
    drop(r);
    t.join().unwrap();
    res
}

fn read_all(fd: zbus::OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    std::fs::File::from(OwnedFd::from(fd))
        .read_to_end(&mut out)
        .unwrap();
    out
}

async fn read(m: &WorkspacesProxy<'_>, ws: &str, path: &str, o: Args<'_>) -> zbus::Result<Vec<u8>> {
    let fd = m.read_file(ws, path, o).await?;
    Ok(tokio::task::spawn_blocking(move || read_all(fd))
        .await
        .unwrap())
}

fn names_of(entries: &[agent_workspaces::dbus::client::EntryTuple]) -> Vec<String> {
    entries.iter().map(|e| e.0.clone()).collect()
}

/// Every method on one workspace, with paths relative to its directory (`base` absolute).
async fn every_method(m: &WorkspacesProxy<'_>, ws: &str, base: &str) {
    write(
        m,
        ws,
        "t/a.txt",
        b"hello",
        opts(vec![("create_parents", Variant::from(true))]),
    )
    .await
    .unwrap();
    assert_eq!(
        read(m, ws, "t/a.txt", no_options()).await.unwrap(),
        b"hello"
    );
    assert_eq!(
        read(
            m,
            ws,
            &format!("{base}/t/a.txt"),
            opts(vec![
                ("offset", Variant::from(1u64)),
                ("length", Variant::from(3u64))
            ])
        )
        .await
        .unwrap(),
        b"ell"
    );
    let st = m.stat_file(ws, "t/a.txt", no_options()).await.unwrap();
    assert_eq!((st.1.as_str(), st.2, st.3), ("file", 5, 0o644));
    m.make_directory(ws, "t/d/e", opts(vec![("parents", Variant::from(true))]))
        .await
        .unwrap();
    m.move_file(ws, "t/a.txt", "t/d/b.txt", no_options())
        .await
        .unwrap();
    let (entries, truncated) = m
        .list_directory(ws, "t", opts(vec![("depth", Variant::from(3u32))]))
        .await
        .unwrap();
    assert_eq!(
        (names_of(&entries), truncated),
        (vec!["d".to_owned(), "d/b.txt".into(), "d/e".into()], false)
    );
    // Download then upload of the same tree elsewhere gives the same tree.
    let tar = read_all(m.download(ws, "t", no_options()).await.unwrap());
    let (r, t) = feed(tar);
    m.upload(ws, "copy", zbus::Fd::from(r.as_fd()), no_options())
        .await
        .unwrap();
    t.join().unwrap();
    assert_eq!(
        read(m, ws, "copy/d/b.txt", no_options()).await.unwrap(),
        b"hello"
    );
    // Errors by name, with the path.
    assert_error(
        m.stat_file(ws, "t/nothing", no_options()).await,
        "org.agent.Workspaces.Error.FileNotFound",
        "t/nothing",
    );
    assert_error(
        read(m, ws, "t/d", no_options()).await,
        "org.agent.Workspaces.Error.IsADirectory",
        "/t/d",
    );
    assert_error(
        m.list_directory(ws, "t/d/b.txt", no_options()).await,
        "org.agent.Workspaces.Error.NotADirectory",
        "b.txt",
    );
    assert_error(
        m.remove_file(ws, "t", no_options()).await,
        "org.agent.Workspaces.Error.DirectoryNotEmpty",
        "/t",
    );
    assert_error(
        m.stat_file(ws, &"x/".repeat(3000), no_options()).await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "path",
    );
    m.remove_file(ws, "t", opts(vec![("recursive", Variant::from(true))]))
        .await
        .unwrap();
    m.remove_file(ws, "copy", opts(vec![("recursive", Variant::from(true))]))
        .await
        .unwrap();
    assert_error(
        m.stat_file(ws, "t", no_options()).await,
        "org.agent.Workspaces.Error.FileNotFound",
        "/t",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_method_on_a_host_workspace_and_a_full_disk() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("files-host");
    let path = format!("/srv/{name}");
    m.create_workspace(spec(vec![
        ("name", Variant::from(name.as_str())),
        ("path", Variant::from(path.as_str())),
    ]))
    .await
    .unwrap();
    every_method(&m, &name, &path).await;
    // The service wrote it: the host's view.
    write(&m, &name, "plain", b"on the host", no_options())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(format!("{path}/plain")).unwrap(),
        b"on the host"
    );

    // A full disk: a named error, and nothing half-written left behind (the old file stays).
    let small = format!("{path}/small");
    std::fs::create_dir_all(&small).unwrap();
    ok(&format!("mount -t tmpfs -o size=1m tmpfs {small}"));
    write(&m, &name, "small/f", b"old", no_options())
        .await
        .unwrap();
    let r = write(&m, &name, "small/f", &vec![1u8; 4 << 20], no_options()).await;
    assert_error(r, "org.agent.Workspaces.Error.NoSpaceLeft", "small/f");
    assert_eq!(std::fs::read(format!("{small}/f")).unwrap(), b"old");
    assert_eq!(
        std::fs::read_dir(&small).unwrap().count(),
        1,
        "no temporary file left"
    );
    ok(&format!("umount {small}"));
    m.destroy_workspace(&name).await.unwrap();
}

/// The service's resident memory, in KiB.
fn service_rss() -> u64 {
    let pid = systemctl("show -p MainPID --value agent-workspaced")
        .trim()
        .to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Samples the service's memory until `stop`; the highest, in KiB.
fn sample_rss(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut max = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            max = max.max(service_rss());
            std::thread::sleep(Duration::from_millis(20));
        }
        max
    })
}

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_s_files_inside_it_ownership_large_files_archives_watch_and_faults() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "files").await;
    every_method(&m, &name, "/workspace").await;

    // Ownership inside: the container's root by default, the user asked for otherwise, and
    // permissions checked as that user.
    write(&m, &name, "mine", b"1", no_options()).await.unwrap();
    write(
        &m,
        &name,
        "/tmp/theirs",
        b"2",
        opts(vec![("user", Variant::from("nobody"))]),
    )
    .await
    .unwrap();
    let owners = inside(&m, &name, "stat -c '%U:%G %a' /workspace/mine /tmp/theirs").await;
    assert_eq!(owners, "root:root 644\nnobody:nogroup 644\n");
    let st = m
        .stat_file(&name, "/tmp/theirs", no_options())
        .await
        .unwrap();
    assert_eq!(st.4, 65534, "uid as the container sees it");
    assert_error(
        write(
            &m,
            &name,
            "/root/x",
            b"no",
            opts(vec![("user", Variant::from("nobody"))]),
        )
        .await,
        "org.agent.Workspaces.Error.FilePermissionDenied",
        "/root/x",
    );
    assert_error(
        m.stat_file(
            &name,
            "/",
            opts(vec![("user", Variant::from("nosuchuser"))]),
        )
        .await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "nosuchuser",
    );

    // Atomic replace: while a write is under way, readers see the old file; a caller that
    // closes early (less than `size`) leaves it, and no temporary file.
    write(&m, &name, "atomic", b"old content", no_options())
        .await
        .unwrap();
    let (r, mut w) = std::io::pipe().unwrap();
    let m2 = m.clone();
    let n2 = name.clone();
    let r2: OwnedFd = r.into();
    let pending = tokio::spawn(async move {
        m2.write_file(
            &n2,
            "atomic",
            zbus::Fd::from(r2.as_fd()),
            opts(vec![("size", Variant::from(100u64))]),
        )
        .await
    });
    w.write_all(b"new cont").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        read(&m, &name, "atomic", no_options()).await.unwrap(),
        b"old content"
    );
    drop(w);
    assert_error(
        pending.await.unwrap(),
        "org.agent.Workspaces.Error.IncompleteContent",
        "8 of 100 bytes",
    );
    assert_eq!(
        read(&m, &name, "atomic", no_options()).await.unwrap(),
        b"old content"
    );
    assert_eq!(
        inside(&m, &name, "ls -A /workspace | grep -c aw- || true").await,
        "0\n"
    );

    // A FIFO (or a device) as the path: a named error at once, never a blocked call.
    inside(&m, &name, "mkfifo /workspace/fifo").await;
    for p in ["fifo", "/dev/null"] {
        let started = Instant::now();
        assert_error(
            read(&m, &name, p, no_options()).await,
            "org.agent.Workspaces.Error.NotARegularFile",
            p,
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    // 1 GiB in and out, the service's memory staying under 64 MB.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_rss(stop.clone());
    let (r, mut w) = std::io::pipe().unwrap();
    let filler = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..1024 {
            w.write_all(&chunk).unwrap();
        }
    });
    let r: OwnedFd = r.into();
    m.write_file(
        &name,
        "big",
        zbus::Fd::from(r.as_fd()),
        opts(vec![("size", Variant::from(GIB))]),
    )
    .await
    .unwrap();
    filler.join().unwrap();
    let fd = m.read_file(&name, "big", no_options()).await.unwrap();
    let (total, all_same) = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(OwnedFd::from(fd));
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, mut same) = (0u64, true);
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break (total, same);
            }
            same &= buf[..n].iter().all(|b| *b == 0x5a);
            total += n as u64;
        }
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let max_rss = sampler.join().unwrap();
    assert_eq!((total, all_same), (GIB, true));
    assert!(
        max_rss < 64 * 1024,
        "the service used {max_rss} KiB moving 1 GiB"
    );
    eprintln!("1 GiB in and out: the service's resident memory at most {max_rss} KiB");
    m.remove_file(&name, "big", no_options()).await.unwrap();

    // A reader that closes early: the agent stops, and the next call is served.
    inside(&m, &name, "head -c 50000000 /dev/zero > /workspace/fifty").await;
    let fd = m.read_file(&name, "fifty", no_options()).await.unwrap();
    let mut f = std::fs::File::from(OwnedFd::from(fd));
    let mut some = [0u8; 4096];
    f.read_exact(&mut some).unwrap();
    drop(f);
    assert_eq!(
        m.stat_file(&name, "fifty", no_options()).await.unwrap().2,
        50_000_000
    );

    // A tar of 10 000 files, both ways.
    inside(&m, &name, "mkdir -p /workspace/many && cd /workspace/many && seq 1 10000 | xargs -n 500 touch && for i in 1 5000 10000; do echo $i > $i; done").await;
    let tar = read_all(m.download(&name, "many", no_options()).await.unwrap());
    let mut archive = tar::Archive::new(tar.as_slice());
    assert_eq!(archive.entries().unwrap().count(), 10_000);
    let (r, t) = feed(tar);
    m.upload(&name, "many2", zbus::Fd::from(r.as_fd()), no_options())
        .await
        .unwrap();
    t.join().unwrap();
    assert_eq!(
        inside(
            &m,
            &name,
            "ls /workspace/many2 | wc -l; cat /workspace/many2/5000"
        )
        .await,
        "10000\n5000\n"
    );

    hostile_archives(&m, &name).await;
    watch(&m, &name).await;

    // A stopped container is started on use.
    m.stop_workspace(&name).await.unwrap();
    assert_eq!(read(&m, &name, "mine", no_options()).await.unwrap(), b"1");
    m.destroy_workspace(&name).await.unwrap();
}

/// A raw tar archive (the tar crate's builder refuses what a hostile one holds).
fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
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

async fn hostile_archives(m: &WorkspacesProxy<'_>, name: &str) {
    inside(
        m,
        name,
        "mkdir -p /outside && echo secret > /outside/secret",
    )
    .await;
    let cases = [
        (
            "dotdot",
            raw_tar(&[("../../outside/evil", tar::EntryType::Regular, "", b"x")]),
        ),
        (
            "absolute",
            raw_tar(&[("/outside/evil", tar::EntryType::Regular, "", b"x")]),
        ),
        (
            "through a link",
            raw_tar(&[
                ("l", tar::EntryType::Symlink, "/outside", b""),
                ("l/evil", tar::EntryType::Regular, "", b"x"),
            ]),
        ),
        (
            "through a link to the host",
            raw_tar(&[
                ("h", tar::EntryType::Symlink, "/proc/1/root/etc", b""),
                ("h/evil", tar::EntryType::Regular, "", b"x"),
            ]),
        ),
        (
            "hard link out",
            raw_tar(&[("hl", tar::EntryType::Link, "../../outside/secret", b"")]),
        ),
        (
            "device node",
            raw_tar(&[("dev", tar::EntryType::Char, "", b"")]),
        ),
    ];
    for (what, archive) in cases {
        let (r, t) = feed(archive);
        let res = m
            .upload(name, "up", zbus::Fd::from(r.as_fd()), no_options())
            .await;
        t.join().unwrap();
        assert_error(res, "org.agent.Workspaces.Error.ArchiveRefused", "refused");
        assert_eq!(
            inside(m, name, "ls -A /outside").await,
            "secret\n",
            "{what}: nothing written outside"
        );
        assert!(
            !std::path::Path::new("/etc/evil").exists(),
            "{what}: the host untouched"
        );
    }
    assert_eq!(
        inside(m, name, "ls -A /workspace/up | grep -v '^[lh]$' || true").await,
        "",
        "nothing else written"
    );
}

async fn watch(m: &WorkspacesProxy<'_>, name: &str) {
    m.make_directory(name, "watched", no_options())
        .await
        .unwrap();
    let fd = m.watch_files(name, "watched", no_options()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let r = std::io::BufReader::new(std::fs::File::from(OwnedFd::from(fd)));
        for line in std::io::BufRead::lines(r) {
            let Ok(line) = line else { break };
            if tx
                .send(serde_json::from_str::<serde_json::Value>(&line).unwrap())
                .is_err()
            {
                break;
            }
        }
    });
    inside(
        m,
        name,
        "cd /workspace/watched && echo 1 > f && mkdir d && echo 2 > d/g && mv f h && rm h",
    )
    .await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = [
        "created f ",
        "modified f ",
        "created d ",
        "created d/g ",
        "moved h f",
        "deleted h ",
    ];
    while !wanted.iter().all(|w| seen.iter().any(|s| s == w)) && Instant::now() < deadline {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            seen.push(format!(
                "{} {} {}",
                e["event"].as_str().unwrap(),
                e["path"].as_str().unwrap_or(""),
                e["from"].as_str().unwrap_or("")
            ));
        }
    }
    for want in [
        "created f ",
        "modified f ",
        "created d ",
        "created d/g ",
        "moved h f",
        "deleted h ",
    ] {
        assert!(seen.iter().any(|s| s == want), "no '{want}' in {seen:?}");
    }
    // Nothing per event in the journal.
    let id = manager_id(m, name).await;
    let lines = journal(&format!("WORKSPACE_ID={id} --since=-1min"));
    assert!(
        !lines
            .iter()
            .any(|l| l["MESSAGE"].as_str().unwrap_or("").contains("watched")),
        "{lines:?}"
    );
}

async fn manager_id(m: &WorkspacesProxy<'_>, name: &str) -> String {
    m.list_workspaces()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.1 == name)
        .unwrap()
        .0
}
