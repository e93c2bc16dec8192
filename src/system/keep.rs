//! What a restart of the service must not lose, kept by systemd: the service's ends of each
//! background process's streams, its connection to the agent that started it (which reports
//! its exit) and its record, in the unit's file descriptor store (`FDSTORE=1` with an
//! `FDNAME=`, `FileDescriptorStoreMax=` in the unit). systemd hands them back at the next start
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`), after a `systemctl restart` and after a crash alike; a
//! `systemctl stop` lets them go. Outside systemd nothing is kept.
//!
//! Names: `process.<workspace id>.<process id>.<kind>`, kind one of `in`, `out`, `pty`,
//! `agent`, `record`, `cgroup` (the process's cgroup directory), `output` (the output kept
//! when the service stopped), and `hold`: the command's own end of its output (a pipe's write
//! end, the terminal), which the service itself does not keep open. systemd drops a stored
//! descriptor that hangs up; held, the output's end cannot hang up while the service is away,
//! so what the process wrote last (and its exit status, the agent keeping its end of the
//! connection open until the service closes it) is still there when it comes back. `hold`
//! is let go with the rest when the process's end has been read. One keeper per process, as there is one descriptor store per
//! service: `keeper()`.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use libsystemd::daemon::{self, NotifyState};
use tracing::warn;

/// The kinds of descriptor kept for a process.
pub const KINDS: [&str; 8] = [
    "in", "out", "pty", "hold", "agent", "record", "cgroup", "output",
];

/// The longest record or kept output read back.
const MAX_MEMFD: u64 = 2 * 1024 * 1024;

static KEEPER: std::sync::OnceLock<Keeper> = std::sync::OnceLock::new();

/// The service's keeper: the one `init` set, or one that keeps nothing.
pub fn keeper() -> &'static Keeper {
    KEEPER.get_or_init(Keeper::disabled)
}

/// Takes what systemd passed and keeps from now on (at start, before anything else opens
/// descriptors).
pub fn init() {
    let _ = KEEPER.set(Keeper::from_env());
}

pub struct Keeper {
    /// The service runs under systemd, which keeps what it is given.
    enabled: bool,
    /// What systemd handed over at start, by key (`process.<ws>.<n>`) and kind.
    received: Mutex<BTreeMap<String, BTreeMap<String, OwnedFd>>>,
}

impl Keeper {
    /// A keeper that keeps nothing (not under systemd; tests).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            received: Mutex::default(),
        }
    }

    /// Takes what systemd passed at start (call before anything else opens descriptors).
    /// Keeping is on when the service runs under systemd's notification socket.
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut received: BTreeMap<String, BTreeMap<String, OwnedFd>> = BTreeMap::new();
        match libsystemd::activation::receive_descriptors_with_names(true) {
            Ok(fds) => {
                for (fd, name) in fds {
                    use std::os::fd::{FromRawFd, IntoRawFd};
                    // SAFETY: systemd passed this descriptor to this process (the crate set
                    // it close-on-exec); it is ours alone.
                    let fd: OwnedFd = unsafe { OwnedFd::from_raw_fd(fd.into_raw_fd()) };
                    match split_name(&name) {
                        Some((key, kind)) => {
                            received
                                .entry(key.to_owned())
                                .or_default()
                                .insert(kind.to_owned(), fd);
                        }
                        None => warn!("Dropping a stored descriptor of unknown name {name:?}"),
                    }
                }
            }
            Err(e) => warn!("Cannot take the descriptors systemd passed: {e}"),
        }
        Self {
            enabled,
            received: Mutex::new(received),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Everything received at start, by key and kind (once).
    pub fn take_received(&self) -> BTreeMap<String, BTreeMap<String, OwnedFd>> {
        std::mem::take(&mut *self.received.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Gives systemd a descriptor to keep as `<key>.<kind>`.
    pub fn store(&self, key: &str, kind: &str, fd: BorrowedFd<'_>) {
        if !self.enabled {
            return;
        }
        let name = format!("{key}.{kind}");
        let sent = daemon::notify_with_fds(
            false,
            &[NotifyState::Fdstore, NotifyState::Fdname(name.clone())],
            &[std::os::fd::AsRawFd::as_raw_fd(&fd)],
        );
        if let Err(e) = sent {
            warn!("Cannot hand {name} to systemd's descriptor store: {e}");
        }
    }

    /// Keeps `data` as `<key>.<kind>` in a memory file (replacing what was kept under it).
    pub fn store_data(&self, key: &str, kind: &str, data: &[u8]) {
        if !self.enabled {
            return;
        }
        self.remove(key, kind);
        match memfd(key, data) {
            Ok(fd) => self.store(key, kind, fd.as_fd()),
            Err(e) => warn!("Cannot keep {key}.{kind}: {e}"),
        }
    }

    /// Lets go of `<key>.<kind>`.
    pub fn remove(&self, key: &str, kind: &str) {
        if !self.enabled {
            return;
        }
        let _ = daemon::notify(
            false,
            &[
                NotifyState::FdstoreRemove,
                NotifyState::Fdname(format!("{key}.{kind}")),
            ],
        );
    }

    /// Lets go of everything kept for a process.
    pub fn forget(&self, key: &str) {
        for kind in KINDS {
            self.remove(key, kind);
        }
    }
}

/// The processes the previous run kept, each with its streams and its end where all of them
/// were kept (an agent connection, and a terminal or both pipes).
/// Also the cgroups of those that run on.
pub fn kept_processes() -> (
    Vec<crate::core::ports::KeptProcess>,
    Vec<std::path::PathBuf>,
) {
    use crate::core::ports::{KeptLive, KeptProcess};
    use tokio::net::unix::pipe;
    let mut found = Vec::new();
    let mut claimed = Vec::new();
    for (key, mut fds) in keeper().take_received() {
        let Some(record) = fds.get("record").and_then(|fd| read_memfd(fd).ok()) else {
            warn!("Dropping kept descriptors of {key}: no record came with them");
            keeper().forget(&key);
            continue;
        };
        let output = fds.get("output").and_then(|fd| read_memfd(fd).ok());
        let cgroup = fds
            .get("cgroup")
            .and_then(|fd| read_memfd(fd).ok())
            .and_then(|p| String::from_utf8(p).ok())
            .map(std::path::PathBuf::from)
            .filter(|p| super::cgroup::cgroup2_mount().is_some_and(|m| p.starts_with(m)));
        let mut streams = || -> io::Result<Option<_>> {
            let ends = match (fds.remove("pty"), fds.remove("in"), fds.remove("out")) {
                (Some(master), _, _) => {
                    let (input, output, terminal) =
                        super::pipes::pty_ends(super::pipes::Pty(master))?;
                    (Some(input), output, Some(terminal))
                }
                // Its stdin is gone from the store when nothing read it any more.
                (None, input, Some(output)) => (
                    input
                        .map(pipe::Sender::from_owned_fd)
                        .transpose()?
                        .map(|i| Box::new(i) as Box<_>),
                    Box::new(pipe::Receiver::from_owned_fd(output)?) as Box<_>,
                    None,
                ),
                _ => return Ok(None),
            };
            let Some(agent) = fds.remove("agent") else {
                return Ok(None);
            };
            Ok(Some((ends, super::agent::AgentConnection::from_fd(agent)?)))
        };
        let live = match streams() {
            Ok(Some(((input, output, terminal), conn))) => {
                claimed.extend(cgroup.clone());
                let key = key.clone();
                let resume: crate::core::ports::Resume = Box::new(move |signals, cancel| {
                    Box::pin(super::exec::resume(key, conn, cgroup, signals, cancel))
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

/// `process.<ws>.<n>.<kind>` -> (`process.<ws>.<n>`, kind).
fn split_name(name: &str) -> Option<(&str, &str)> {
    let (key, kind) = name.rsplit_once('.')?;
    (key.starts_with("process.") && KINDS.contains(&kind)).then_some((key, kind))
}

/// A sealed-size memory file holding `data`.
fn memfd(key: &str, data: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(key, rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data)?;
    file.rewind()?;
    Ok(file.into())
}

/// What a kept memory file holds (bounded).
pub fn read_memfd(fd: &OwnedFd) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd.try_clone()?);
    file.rewind()?;
    let mut data = Vec::new();
    file.take(MAX_MEMFD).read_to_end(&mut data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_key_and_kind() {
        assert_eq!(
            split_name("process.host.3.agent"),
            Some(("process.host.3", "agent"))
        );
        assert_eq!(
            split_name("process.0f0e-aa.12.output"),
            Some(("process.0f0e-aa.12", "output"))
        );
        assert_eq!(split_name("process.host.3.other"), None);
        assert_eq!(split_name("socket.agent"), None);
        assert_eq!(split_name("agent"), None);
    }

    #[test]
    fn a_memory_file_gives_back_what_it_was_given() {
        let fd = memfd("t", b"kept across a restart").unwrap();
        assert_eq!(read_memfd(&fd).unwrap(), b"kept across a restart");
        // Read twice: each read starts from the beginning.
        assert_eq!(read_memfd(&fd).unwrap(), b"kept across a restart");
    }
}
