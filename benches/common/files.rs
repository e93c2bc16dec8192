//! The files API's figures, in a container workspace: a small file read and written through
//! `ReadFile`/`WriteFile` against `Exec('cat')` of the same file, and 1 GiB in and out against
//! `cat` run on the host into and out of the same tree. Both sides of each pair are fed and
//! drained the same way (pipes this process fills and empties).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use agent_workspaces::dbus::client::WorkspacesProxy;
use zbus::Variant;

use super::timing::{Bound, Figures, median, report, time_async};

const SMALL: usize = 4096;
const BIG: u64 = 1 << 30;
const ROUNDS: usize = 3;

/// A pipe this process fills with `bytes` bytes (then closes); its read end, and the thread.
fn feeder(bytes: u64) -> (OwnedFd, std::thread::JoinHandle<()>) {
    let (r, mut w) = std::io::pipe().expect("pipe");
    let t = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).expect("feed");
            left -= n as u64;
        }
    });
    (r.into(), t)
}

/// Reads a descriptor to its end; the bytes read.
fn drain(fd: OwnedFd) -> u64 {
    let mut f = std::fs::File::from(fd);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n as u64,
        }
    }
}

/// `cat` on the host, its stdin and stdout as given; how long it took.
fn host_cat(stdin: std::process::Stdio, stdout: std::process::Stdio) -> Duration {
    let t = Instant::now();
    let status = std::process::Command::new("cat")
        .stdin(stdin)
        .stdout(stdout)
        .status()
        .expect("cat");
    assert!(status.success());
    t.elapsed()
}

pub async fn figures(m: &WorkspacesProxy<'_>, name: &str, fig: &mut Figures) {
    println!("\nfiles (container workspace)");
    let no = || HashMap::<&str, Variant<'_>>::new();
    let small = vec![b'x'; SMALL];
    let (r, t) = feeder(SMALL as u64);
    m.write_file(name, "small", zbus::Fd::from(r.as_fd()), no())
        .await
        .expect("WriteFile");
    t.join().expect("fed");
    let cat = report(
        "baseline: Exec(container, 'cat small'), 4 KiB",
        time_async(|| async {
            let (code, out, ..) = m.exec(name, "cat small", no()).await.expect("Exec");
            assert_eq!((code, out.len()), (0, SMALL));
        })
        .await,
    );
    let read = report(
        "ReadFile(container, 'small'), read to its end",
        time_async(|| async {
            let fd: OwnedFd = m
                .read_file(name, "small", no())
                .await
                .expect("ReadFile")
                .into();
            assert_eq!(drain(fd), SMALL as u64);
        })
        .await,
    );
    fig.set("read_file_4k_p50_ms", read.p50 * 1e3);
    fig.ratio(
        "read_file_4k_vs_exec_cat",
        read.p50 / cat.p50,
        Bound::AtMost(0.5),
        "(p50)",
    );
    let cat_in = report(
        "baseline: Exec(container, 'cat > small'), 4 KiB of stdin",
        time_async(|| async {
            let mut o = no();
            o.insert("stdin", Variant::from(small.clone()));
            let (code, ..) = m.exec(name, "cat > small", o).await.expect("Exec");
            assert_eq!(code, 0);
        })
        .await,
    );
    let write = report(
        "WriteFile(container, 'small'), 4 KiB",
        time_async(|| async {
            let (r, mut w) = std::io::pipe().expect("pipe");
            w.write_all(&small).expect("fill");
            drop(w);
            m.write_file(name, "small", zbus::Fd::from(r.as_fd()), no())
                .await
                .expect("WriteFile");
        })
        .await,
    );
    fig.set("write_file_4k_p50_ms", write.p50 * 1e3);
    fig.ratio(
        "write_file_4k_vs_exec_cat",
        write.p50 / cat_in.p50,
        Bound::AtMost(0.5),
        "(p50)",
    );

    // 1 GiB in and out, each in turn with its baseline.
    let tree = format!("/var/lib/machines/{name}/workspace");
    let (mut ours_in, mut cat_in, mut ours_out, mut cat_out) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        // Each write starts with nothing dirty (writeback of the one before would slow
        // whichever came next), and the two take turns going first.
        for ours in [round % 2 == 0, round % 2 != 0] {
            // SAFETY: sync(2) takes nothing.
            unsafe { libc::sync() };
            let (r, t) = feeder(BIG);
            if ours {
                let start = Instant::now();
                let mut o = no();
                o.insert("size", Variant::from(BIG));
                m.write_file(name, "big", zbus::Fd::from(r.as_fd()), o)
                    .await
                    .expect("WriteFile 1 GiB");
                ours_in.push(start.elapsed());
            } else {
                let out = std::fs::File::create(format!("{tree}/big-host")).expect("create");
                cat_in.push(host_cat(std::fs::File::from(r).into(), out.into()));
            }
            t.join().expect("fed");
        }

        let start = Instant::now();
        let fd: OwnedFd = m
            .read_file(name, "big", no())
            .await
            .expect("ReadFile")
            .into();
        assert_eq!(
            tokio::task::spawn_blocking(move || drain(fd))
                .await
                .expect("drained"),
            BIG
        );
        ours_out.push(start.elapsed());

        let (r, w) = std::io::pipe().expect("pipe");
        let drainer = std::thread::spawn(move || drain(r.into()));
        let input = std::fs::File::open(format!("{tree}/big-host")).expect("open");
        cat_out.push(host_cat(
            input.into(),
            std::fs::File::from(OwnedFd::from(w)).into(),
        ));
        assert_eq!(drainer.join().expect("drained"), BIG);
    }
    let _ = std::fs::remove_file(format!("{tree}/big-host"));
    m.remove_file(name, "big", no()).await.expect("RemoveFile");
    let rate = |d: f64| BIG as f64 / d / (1024.0 * 1024.0);
    let (oi, ci, oo, co) = (
        median(ours_in),
        median(cat_in),
        median(ours_out),
        median(cat_out),
    );
    for (label, d) in [
        ("WriteFile, 1 GiB", oi),
        ("baseline: cat on the host into the tree, 1 GiB", ci),
        ("ReadFile, 1 GiB", oo),
        ("baseline: cat on the host out of the tree, 1 GiB", co),
    ] {
        println!("{label:<48} {:>8.1} MiB/s (median of {ROUNDS})", rate(d));
    }
    fig.set("write_file_1g_mib_s", rate(oi));
    fig.set("read_file_1g_mib_s", rate(oo));
    fig.ratio(
        "write_file_1g_vs_cat",
        ci / oi,
        Bound::AtLeast(0.8),
        "(throughput)",
    );
    fig.ratio(
        "read_file_1g_vs_cat",
        co / oo,
        Bound::AtLeast(0.8),
        "(throughput)",
    );
}
