//! Background processes kept by the previous run of the service (`keep.rs` holds their
//! descriptors), taken up again at start: each one's streams, and its end awaited on the
//! agent connection that was kept with it (`exec::resume`).

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use tracing::warn;

use super::exec::TERMINAL_INSIDE;
use super::keep::{keeper, read_memfd};

/// The processes the previous run kept, each with its streams and its end where its agent
/// connection was kept; also the ids of the cgroups of those that run on.
pub fn kept_processes() -> (Vec<crate::core::ports::KeptProcess>, Vec<u64>) {
    use crate::core::ports::{KeptLive, KeptProcess};
    use tokio::net::unix::pipe;
    let mut found = Vec::new();
    let mut claimed = Vec::new();
    for (key, received) in keeper().take_received() {
        let mut main = Main::default();
        for fd in received.main {
            main.sort(fd);
        }
        let Some((flags, record)) = main.record.as_ref().and_then(read_record) else {
            warn!("Dropping kept descriptors of {key}: no record came with them");
            keeper().forget(&key);
            continue;
        };
        let output = received.output.and_then(|fd| read_memfd(&fd).ok());
        let input = received.input;
        let cgroup = main.cgroup.take().or_else(|| legacy_cgroup(&flags));
        let inside = flags.split_whitespace().any(|f| f == TERMINAL_INSIDE);
        let streams = || -> io::Result<Option<_>> {
            let Some(agent) = main.agent.take() else {
                return Ok(None);
            };
            let conn = crate::system::commands::agent::AgentConnection::from_fd(agent)?;
            // After a crash, an output whose command ended meanwhile is gone: it has ended.
            let ends = match (main.pty.take(), main.out.take()) {
                (Some(master), _) => {
                    let (input, output, terminal) = crate::system::commands::pipes::pty_ends(
                        crate::system::commands::pipes::Pty(master),
                    )?;
                    (Some(input), output, Some(terminal))
                }
                (None, out) => (
                    input
                        .map(pipe::Sender::from_owned_fd)
                        .transpose()?
                        .map(|i| Box::new(i) as Box<_>),
                    match out {
                        Some(out) => Box::new(pipe::Receiver::from_owned_fd(out)?) as Box<_>,
                        None => Box::new(tokio::io::empty()) as Box<_>,
                    },
                    None,
                ),
            };
            // A terminal its container's agent made: resized through the kept connection.
            let (ends, resizes) = match (ends, inside) {
                ((input, output, None), true) => {
                    let (controls, resizes) = crate::system::commands::pipes::resizer();
                    ((input, output, Some(controls)), Some(resizes))
                }
                (ends, _) => (ends, None),
            };
            Ok(Some((ends, resizes, conn)))
        };
        let live = match streams() {
            Ok(Some(((input, output, terminal), resizes, conn))) => {
                claimed.extend(
                    cgroup
                        .as_ref()
                        .and_then(|c| rustix::fs::fstat(c).ok())
                        .map(|s| s.st_ino),
                );
                let key = key.clone();
                let resume: crate::core::ports::Resume = Box::new(move |signals, cancel| {
                    Box::pin(crate::system::commands::exec::resume(
                        key, conn, cgroup, signals, resizes, cancel,
                    ))
                });
                Some(KeptLive {
                    input,
                    output,
                    terminal,
                    resume,
                })
            }
            Ok(None) => None,
            Err(e) => {
                warn!("Cannot take up the kept streams of {key}: {e}");
                None
            }
        };
        found.push(KeptProcess {
            key,
            record,
            output,
            live,
        });
    }
    (found, claimed)
}

/// The descriptors kept under a process's key, told apart by what they are.
#[derive(Default)]
struct Main {
    out: Option<OwnedFd>,
    pty: Option<OwnedFd>,
    agent: Option<OwnedFd>,
    record: Option<OwnedFd>,
    cgroup: Option<OwnedFd>,
}

impl Main {
    fn sort(&mut self, fd: OwnedFd) {
        use rustix::fs::FileType;
        let Ok(st) = rustix::fs::fstat(&fd) else {
            return;
        };
        let slot = match FileType::from_raw_mode(st.st_mode) {
            FileType::Socket => &mut self.agent,
            FileType::Fifo => &mut self.out,
            FileType::CharacterDevice => &mut self.pty,
            FileType::RegularFile => &mut self.record,
            FileType::Directory => &mut self.cgroup,
            _ => return,
        };
        *slot = Some(fd);
    }
}

/// A record as `keep_started` wrote it: its first line (the flags) and the core's record.
fn read_record(fd: &OwnedFd) -> Option<(String, Vec<u8>)> {
    let data = read_memfd(fd).ok()?;
    let newline = data.iter().position(|b| *b == b'\n')?;
    let flags = String::from_utf8_lossy(&data[..newline]).into_owned();
    Some((flags, data[newline + 1..].to_vec()))
}

/// The cgroup of a process kept by a version of the service that kept its path, not its
/// directory (the record's first line): opened by that path once, where it is a command's
/// cgroup below the host agent's unit or a container's payload. (Every directory on the way
/// there is host root's; below a payload, a container's root can make and remove cgroups but
/// no link, so the path leads to a cgroup of that container's at worst.)
fn legacy_cgroup(first_line: &str) -> Option<OwnedFd> {
    let path = PathBuf::from(first_line);
    let mount = crate::system::commands::cgroup::cgroup2_mount()?;
    let below = path.strip_prefix(mount).ok()?;
    let parts: Vec<&str> = below.iter().filter_map(|p| p.to_str()).collect();
    let plain = below
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    let command = parts.last().is_some_and(|n| n.starts_with("exec-"));
    let place = match parts.as_slice() {
        ["system.slice", "agent-workspaces-host-agent.service", _] => true,
        ["machine.slice", unit, "payload", _] => {
            unit.starts_with("agent-workspace-") && unit.ends_with(".service")
        }
        _ => false,
    };
    if !(plain && command && place) {
        return None;
    }
    std::fs::File::open(&path).ok().map(OwnedFd::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::commands::keep::memfd;

    #[test]
    fn a_record_gives_back_its_flags_and_the_cores_record() {
        let fd = memfd("t", b"\n{\"id\":1}").unwrap();
        assert_eq!(
            read_record(&fd),
            Some((String::new(), b"{\"id\":1}".to_vec()))
        );
        let fd = memfd("t", b"terminal-inside\n{}").unwrap();
        assert_eq!(
            read_record(&fd),
            Some(("terminal-inside".into(), b"{}".to_vec()))
        );
        assert_eq!(read_record(&memfd("t", b"no newline").unwrap()), None);
        // A path an earlier version kept is taken up only where a command's cgroup is.
        assert!(legacy_cgroup("/etc").is_none());
        assert!(legacy_cgroup("").is_none());
        let mount = crate::system::commands::cgroup::cgroup2_mount()
            .map(|m| m.display().to_string())
            .unwrap_or_default();
        for elsewhere in [
            "system.slice/sshd.service",
            "machine.slice/agent-workspace-box.service/payload/../../x/exec-1",
            "machine.slice/other.service/payload/exec-1",
            "machine.slice/agent-workspace-box.service/payload/sub/exec-1",
        ] {
            assert!(
                legacy_cgroup(&format!("{mount}/{elsewhere}")).is_none(),
                "{elsewhere}"
            );
        }
    }
}
