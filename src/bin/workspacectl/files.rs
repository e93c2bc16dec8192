//! The file commands: `cp` (both ways), `ls`, `cat`, `rm`, `mkdir`, `mv`, `watch`. Content
//! streams through pipes (never whole in memory); directories travel as tar streams, packed
//! and unpacked here by the agent crate's own code, which trusts nothing an archive from a
//! workspace says.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use agent_workspaces::cli::workspacectl::FileUser;
use agent_workspaces::dbus::client::interactive::WorkspacesProxy;
use agent_workspaces::dbus::client::{Args, EntryTuple, entry_json};
use agent_workspaces_agent::fileserve;
use serde_json::json;
use zbus::Variant;

fn err(e: zbus::Error) -> String {
    agent_workspaces::core::Error::from(e).to_string()
}

pub fn options(who: &FileUser, extra: Vec<(&'static str, Variant<'static>)>) -> Args<'static> {
    let mut o: Args<'static> = extra.into_iter().collect();
    if let Some(u) = &who.user {
        o.insert("user", Variant::from(u.clone()));
    }
    if let Some(g) = &who.group {
        o.insert("group", Variant::from(g.clone()));
    }
    o
}

/// `WORKSPACE:PATH`, or `None` for a local path (one with a `/` before any `:`, or none).
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (ws, path) = arg.split_once(':')?;
    (!ws.is_empty() && !ws.contains('/')).then_some((ws, if path.is_empty() { "." } else { path }))
}

fn base_name(path: &str) -> String {
    Path::new(path.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    std::io::pipe()
        .map(|(r, w)| (r.into(), w.into()))
        .map_err(|e| format!("cannot make a pipe: {e}"))
}

/// `cp SRC DEST`.
pub async fn cp(
    m: &WorkspacesProxy<'_>,
    src: &str,
    dest: &str,
    who: &FileUser,
) -> Result<(), String> {
    match (remote(src), remote(dest)) {
        (None, Some((ws, path))) => copy_to(m, Path::new(src), ws, path, who).await,
        (Some((ws, path)), None) => copy_from(m, ws, path, Path::new(dest), who).await,
        _ => Err("one of SRC and DEST must be WORKSPACE:PATH, the other a local path".into()),
    }
}

/// Whether `path` in the workspace is a directory that exists.
async fn remote_dir(
    m: &WorkspacesProxy<'_>,
    ws: &str,
    path: &str,
    who: &FileUser,
) -> Result<bool, String> {
    match m.stat_file(ws, path, options(who, vec![])).await {
        Ok(e) => Ok(e.1 == "dir"),
        Err(e) => match agent_workspaces::core::Error::from(e) {
            agent_workspaces::core::Error::File {
                kind: agent_workspaces::core::files::FileErrorKind::NotFound,
                ..
            } => Ok(false),
            other => Err(other.to_string()),
        },
    }
}

async fn copy_to(
    m: &WorkspacesProxy<'_>,
    local: &Path,
    ws: &str,
    path: &str,
    who: &FileUser,
) -> Result<(), String> {
    let meta = std::fs::metadata(local).map_err(|e| format!("{}: {e}", local.display()))?;
    let name = base_name(&local.to_string_lossy());
    let into = remote_dir(m, ws, path, who).await?;
    let target = if into || path.ends_with('/') {
        format!("{}/{name}", path.trim_end_matches('/'))
    } else {
        path.to_owned()
    };
    if meta.is_dir() {
        let (r, w) = pipe()?;
        let from = local.to_path_buf();
        let packer = std::thread::spawn(move || fileserve::pack(&from, w));
        let sent = m
            .upload(ws, &target, zbus::Fd::from(r.as_fd()), options(who, vec![]))
            .await;
        drop(r);
        let packed = packer
            .join()
            .map_err(|_| "the packing thread failed".to_owned())?;
        sent.map_err(err)?;
        packed.map_err(|e| format!("{}: {e}", local.display()))
    } else {
        use std::os::unix::fs::PermissionsExt;
        let file = std::fs::File::open(local).map_err(|e| format!("{}: {e}", local.display()))?;
        let o = options(
            who,
            vec![
                ("create_parents", Variant::from(true)),
                ("mode", Variant::from(meta.permissions().mode() & 0o7777)),
                ("size", Variant::from(meta.len())),
            ],
        );
        m.write_file(ws, &target, zbus::Fd::from(file.as_fd()), o)
            .await
            .map_err(err)
    }
}

async fn copy_from(
    m: &WorkspacesProxy<'_>,
    ws: &str,
    path: &str,
    local: &Path,
    who: &FileUser,
) -> Result<(), String> {
    let entry = m
        .stat_file(ws, path, options(who, vec![]))
        .await
        .map_err(err)?;
    let target: PathBuf = if local.is_dir() {
        local.join(base_name(path))
    } else {
        local.to_path_buf()
    };
    if entry.1 == "dir" {
        let fd: OwnedFd = m
            .download(ws, path, options(who, vec![]))
            .await
            .map_err(err)?
            .into();
        let target = std::path::absolute(&target).map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || fileserve::unpack(&target, fd))
            .await
            .map_err(|e| e.to_string())?
    } else {
        let fd: OwnedFd = m
            .read_file(ws, path, options(who, vec![]))
            .await
            .map_err(err)?
            .into();
        let size = entry.2;
        tokio::task::spawn_blocking(move || write_local(&target, fd, size, entry.3))
            .await
            .map_err(|e| e.to_string())?
    }
}

/// Writes the content beside `target` and renames it over it once it came whole. The
/// temporary name is new (`O_EXCL`, never through a link: what a workspace unpacked here
/// before cannot redirect it), and the mode keeps only the permission bits (no set-user-ID
/// file from a workspace).
fn write_local(target: &Path, fd: OwnedFd, size: u64, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let said = |e: std::io::Error| format!("{}: {e}", target.display());
    let mut random = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .map_err(said)?;
    let temp = dir.join(format!(
        ".{}.workspacectl-{:016x}",
        base_name(&target.to_string_lossy()),
        u64::from_le_bytes(random)
    ));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .map_err(said)?;
    let copied = std::io::copy(&mut std::fs::File::from(fd), &mut out);
    let done = match copied {
        Ok(n) if n == size => out
            .set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
            .and_then(|()| std::fs::rename(&temp, target))
            .map_err(said),
        Ok(n) => Err(format!(
            "{}: {n} of {size} bytes came; nothing was written",
            target.display()
        )),
        Err(e) => Err(said(e)),
    };
    if done.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    done
}

fn entry_line(e: &EntryTuple) -> String {
    let (name, kind, size, mode, uid, gid, mtime, target) = e;
    let t = match kind.as_str() {
        "dir" => 'd',
        "symlink" => 'l',
        "other" => '?',
        _ => '-',
    };
    let when = mtime / 1_000_000;
    let link = if kind == "symlink" {
        format!(" -> {target}")
    } else {
        String::new()
    };
    format!("{t}{mode:04o} {uid:>6} {gid:>6} {size:>12} {when:>11} {name}{link}")
}

pub async fn ls(
    m: &WorkspacesProxy<'_>,
    ws: &str,
    path: &str,
    depth: u32,
    who: &FileUser,
    json_out: bool,
) -> Result<(), String> {
    let (entries, truncated) = m
        .list_directory(
            ws,
            path,
            options(who, vec![("depth", Variant::from(depth))]),
        )
        .await
        .map_err(err)?;
    if json_out {
        let v: Vec<_> = entries.iter().map(entry_json).collect();
        println!("{:#}", json!({"entries": v, "truncated": truncated}));
        return Ok(());
    }
    for e in &entries {
        println!("{}", entry_line(e));
    }
    if truncated {
        eprintln!("workspacectl: more entries were left out");
    }
    Ok(())
}

pub async fn cat(
    m: &WorkspacesProxy<'_>,
    ws: &str,
    path: &str,
    who: &FileUser,
) -> Result<(), String> {
    let fd: OwnedFd = m
        .read_file(ws, path, options(who, vec![]))
        .await
        .map_err(err)?
        .into();
    to_stdout(fd).await
}

pub async fn watch(
    m: &WorkspacesProxy<'_>,
    ws: &str,
    path: &str,
    who: &FileUser,
) -> Result<(), String> {
    let fd: OwnedFd = m
        .watch_files(ws, path, options(who, vec![]))
        .await
        .map_err(err)?
        .into();
    // Lines as they come, until the workspace ends the watch or this is interrupted.
    to_stdout(fd).await
}

/// Copies what comes on `fd` to standard output as it comes, to its end.
async fn to_stdout(fd: OwnedFd) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout();
        let mut from = std::fs::File::from(fd);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match std::io::Read::read(&mut from, &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => out.write_all(&buf[..n]).and_then(|()| out.flush())?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot copy the output: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn remote_paths_are_told_from_local_ones() {
        assert_eq!(
            super::remote("box:/workspace/src"),
            Some(("box", "/workspace/src"))
        );
        assert_eq!(super::remote("box:"), Some(("box", ".")));
        assert_eq!(super::remote("./a:b"), None);
        assert_eq!(super::remote("/tmp/x"), None);
        assert_eq!(super::remote(":x"), None);
    }
}
