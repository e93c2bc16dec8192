//! A running workspace's snapshot copies its writable layer (`cp -a --reflink=auto`, the
//! container frozen meanwhile): on ext4 every byte is copied, on a file system with reflinks
//! (xfs, btrfs) each file's extents are cloned. This measures that layer step itself, outside
//! the service (`layer::snapshot` of a mounted tree, as the service calls it with the
//! container frozen), for 10 MB and 1 GB of a workspace's own files, on ext4 (this machine's
//! disk, under /var/tmp) and on an xfs made for the run: an image in /var/tmp, loop-mounted in
//! a mount namespace of this process's own, so the mount and its loop device (autoclear) go
//! when the process ends, however it ends. Each 1 GB figure is printed against the 10 MB one
//! of the same file system (independent of size: 1.0x), and xfs against ext4.
//!
//! Run as root by `make bench` (tests/bench.sh), on the machine itself: nothing here needs
//! systemd.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use agent_workspaces::system::containers::layer;

const ROUNDS: usize = 3;

fn sh(cmd: &mut Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}

/// Fills the tree with `mb` MiB in 16 files (the same count whatever the size: what is
/// compared is bytes), written to disk.
fn fill(tree: &Path, mb: usize) {
    let dir = tree.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let each = mb * (1 << 20) / 16;
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..16 {
        let mut f = std::fs::File::create(dir.join(format!("f{i}"))).unwrap();
        let mut left = each;
        while left > 0 {
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
    }
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
}

/// The median time of a running snapshot of a tree holding `mb` MiB of its own, on the file
/// system of `dir`.
fn snapshot_time(dir: &Path, mb: usize) -> f64 {
    let machines = dir.join("machines");
    let base = dir.join("base");
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::write(base.join("etc/os-release"), "ID=bench\n").unwrap();
    std::fs::create_dir_all(&machines).unwrap();
    let tree = machines.join(format!("box{mb}"));
    layer::create(&base, &tree).expect("a layered tree");
    fill(&tree, mb);
    let mut times = Vec::new();
    for r in 0..ROUNDS {
        let t = Instant::now();
        layer::snapshot(&tree, &format!("s{r}"), true, 0).expect("snapshot");
        times.push(t.elapsed().as_secs_f64());
        layer::delete_snapshot(&tree, &format!("s{r}")).expect("delete");
    }
    layer::remove(&tree).expect("remove");
    times.sort_by(f64::total_cmp);
    times[ROUNDS / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("running_snapshot: skipped (needs root)");
        return;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("a mount namespace");
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("private mounts");
    let work = PathBuf::from(format!(
        "/var/tmp/agent-workspaces-bench-snapshot.{}",
        std::process::id()
    ));
    std::fs::create_dir_all(work.join("ext4")).unwrap();
    let mut figures: Vec<(&str, f64, f64)> = Vec::new();
    println!("running snapshot, the layer step (median of {ROUNDS}):");
    let ext4 = (
        snapshot_time(&work.join("ext4"), 10),
        snapshot_time(&work.join("ext4"), 1024),
    );
    figures.push(("ext4 (this machine's disk)", ext4.0, ext4.1));
    let xfs_dir = work.join("xfs");
    std::fs::create_dir_all(&xfs_dir).unwrap();
    let image = work.join("xfs.img");
    let made = std::fs::File::create(&image)
        .and_then(|f| f.set_len(4 << 30))
        .is_ok()
        && sh(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(&image))
        && sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&xfs_dir));
    let xfs = made.then(|| (snapshot_time(&xfs_dir, 10), snapshot_time(&xfs_dir, 1024)));
    if let Some(x) = xfs {
        figures.push(("xfs (reflink=1, loop-mounted image)", x.0, x.1));
    } else {
        println!("  xfs: skipped (mkfs.xfs from xfsprogs, or a loop mount, not available)");
    }
    for (fs, small, big) in &figures {
        println!(
            "  {fs}: 10 MB {small:.4} s, 1 GB {big:.4} s: 1 GB / 10 MB = {:.1}x",
            big / small
        );
    }
    if let Some(x) = xfs {
        println!(
            "  1 GB, xfs against ext4: {:.3}x (target: <= 0.1 s on a file system with reflinks: {})",
            x.1 / ext4.1,
            if x.1 <= 0.1 { "met" } else { "NOT met" }
        );
        let _ = nix::mount::umount2(&xfs_dir, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(&work);
}
