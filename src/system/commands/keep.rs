//! What a restart of the service must not lose, kept by systemd: the service's ends of each
//! background process's streams, its connection to the agent that started it (which reports
//! its exit) and its record, in the unit's file descriptor store (`FDSTORE=1` with an
//! `FDNAME=`, `FileDescriptorStoreMax=` in the unit). systemd hands them back at the next start
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`), after a `systemctl restart` and after a crash alike; a
//! `systemctl stop` lets them go. Outside systemd nothing is kept. One keeper per service, as
//! there is one descriptor store: `keeper()`.
//!
//! Names, for a process's key `process.<workspace id>.<process id>` (few messages to PID 1:
//! two when a process starts, two when it ends):
//! - `<key>`: the service's end of its output (a pipe's read end, or the terminal's master),
//!   the agent connection, its cgroup's directory, and a memory file with the core's record;
//!   stored together once the agent has started it.
//! - `<key>.in`: its stdin's write end (pipes only); let go alone when the service closes it.
//! - `<key>.hold`, `<key>.output`: stored when the service stops: the command's own end of its
//!   output, which the service holds while it runs (`holds`), and the output kept so far. A
//!   process that had finished is kept then too: its record (with its exit code) under `<key>`
//!   and its output.
//!
//! systemd drops a stored descriptor that hangs up. Held, a process's output cannot hang up
//! while the service is away, so what it wrote last is still there when the service comes
//! back; the agent keeps a finished command's connection open until the service closes it
//! (asked to by one byte after `Started`: `AgentConnection::keep_open`), so its exit status is
//! too. (After a crash nothing held the output: a process that ended
//! meanwhile has its exit status and not its last output.) When the service has read a
//! process's end it lets its hold go, and the output reaches its end at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use libsystemd::daemon::{self, NotifyState};
use tracing::warn;

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

/// What systemd handed back for one process.
#[derive(Default)]
pub struct Received {
    /// Under `<key>`: output end, agent connection, record.
    pub main: Vec<OwnedFd>,
    pub input: Option<OwnedFd>,
    pub hold: Option<OwnedFd>,
    pub output: Option<OwnedFd>,
}

/// A process's streams between `prepare` and `keep_started`.
struct Pending {
    out: OwnedFd,
    input: Option<OwnedFd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct Keeper {
    /// The service runs under systemd, which keeps what it is given.
    enabled: bool,
    received: Mutex<BTreeMap<String, Received>>,
    pending: Mutex<HashMap<String, Pending>>,
    /// The command's end of each kept process's output, held while it runs.
    holds: Mutex<HashMap<String, OwnedFd>>,
    /// Processes with a `.hold` and `.output` in the store.
    stopped_with: Mutex<HashSet<String>>,
}

impl Keeper {
    /// A keeper that keeps nothing (not under systemd; tests).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            received: Mutex::default(),
            pending: Mutex::default(),
            holds: Mutex::default(),
            stopped_with: Mutex::default(),
        }
    }

    /// Takes what systemd passed at start (call before anything else opens descriptors).
    /// Keeping is on when the service runs under systemd's notification socket.
    pub fn from_env() -> Self {
        let mut keeper = Self::disabled();
        keeper.enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let received = keeper.received.get_mut().unwrap_or_else(|e| e.into_inner());
        match libsystemd::activation::receive_descriptors_with_names(true) {
            Ok(fds) => {
                for (fd, name) in fds {
                    use std::os::fd::{FromRawFd, IntoRawFd};
                    // SAFETY: systemd passed this descriptor to this process (the crate set
                    // it close-on-exec); it is ours alone.
                    let fd: OwnedFd = unsafe { OwnedFd::from_raw_fd(fd.into_raw_fd()) };
                    let Some((key, kind)) = split_name(&name) else {
                        warn!("Dropping a stored descriptor of unknown name {name:?}");
                        continue;
                    };
                    let r = received.entry(key.to_owned()).or_default();
                    match kind {
                        Kind::Main => r.main.push(fd),
                        Kind::In => r.input = Some(fd),
                        Kind::Hold => r.hold = Some(fd),
                        Kind::Output => r.output = Some(fd),
                    }
                }
            }
            Err(e) => warn!("Cannot take the descriptors systemd passed: {e}"),
        }
        keeper
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Everything received at start, by key (once). A process received with a hold gets it
    /// back as held.
    pub fn take_received(&self) -> BTreeMap<String, Received> {
        let mut all = std::mem::take(&mut *lock(&self.received));
        for (key, r) in &mut all {
            if r.hold.is_some() || r.output.is_some() {
                lock(&self.stopped_with).insert(key.clone());
            }
            if let Some(hold) = r.hold.take() {
                lock(&self.holds).insert(key.clone(), hold);
            }
        }
        all
    }

    fn send(&self, name: &str, fds: &[BorrowedFd<'_>]) {
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = daemon::notify_with_fds(
            false,
            &[NotifyState::Fdstore, NotifyState::Fdname(name.to_owned())],
            &raw,
        );
        if let Err(e) = sent {
            warn!("Cannot hand {name} to systemd's descriptor store: {e}");
        }
    }

    fn remove(&self, name: &str) {
        let _ = daemon::notify(
            false,
            &[
                NotifyState::FdstoreRemove,
                NotifyState::Fdname(name.to_owned()),
            ],
        );
    }

    /// A new process's streams, to keep once it has started: the service's ends of its
    /// output and input, and the command's end of its output, held from now on.
    pub fn prepare(
        &self,
        key: &str,
        out: BorrowedFd<'_>,
        input: Option<BorrowedFd<'_>>,
        hold: BorrowedFd<'_>,
    ) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let pending = Pending {
            out: out.try_clone_to_owned()?,
            input: input.map(|i| i.try_clone_to_owned()).transpose()?,
        };
        let hold = hold.try_clone_to_owned()?;
        lock(&self.pending).insert(key.to_owned(), pending);
        lock(&self.holds).insert(key.to_owned(), hold);
        Ok(())
    }

    /// Keeps a started process: its prepared streams, the agent connection that reports its
    /// end, its cgroup's directory and its record (after a first line of `flags`, words that
    /// say how to take it up).
    pub fn keep_started(
        &self,
        key: &str,
        agent: BorrowedFd<'_>,
        cgroup: Option<BorrowedFd<'_>>,
        flags: &str,
        record: &[u8],
    ) {
        let Some(pending) = lock(&self.pending).remove(key) else {
            return;
        };
        let mut data = flags.as_bytes().to_vec();
        data.push(b'\n');
        data.extend_from_slice(record);
        let record = match memfd(key, &data) {
            Ok(fd) => fd,
            Err(e) => return warn!("Cannot keep {key}: {e}"),
        };
        let mut fds = vec![pending.out.as_fd(), agent, record.as_fd()];
        fds.extend(cgroup);
        self.send(key, &fds);
        if let Some(input) = &pending.input {
            self.send(&format!("{key}.in"), &[input.as_fd()]);
        }
    }

    /// At shutdown: keeps a running process's output so far, and its hold.
    pub fn keep_stopping(&self, key: &str, output: &[u8]) {
        if !self.enabled {
            return;
        }
        if lock(&self.stopped_with).contains(key) {
            self.remove(&format!("{key}.output"));
        }
        match memfd(key, output) {
            Ok(fd) => self.send(&format!("{key}.output"), &[fd.as_fd()]),
            Err(e) => warn!("Cannot keep the output of {key}: {e}"),
        }
        if let Some(hold) = lock(&self.holds).get(key) {
            // The same descriptor stored again is ignored by systemd.
            self.send(&format!("{key}.hold"), &[hold.as_fd()]);
        }
        lock(&self.stopped_with).insert(key.to_owned());
    }

    /// At shutdown: keeps a finished process's record and output (its exit code, for
    /// whoever asks after the restart).
    pub fn keep_finished(&self, key: &str, record: &[u8], output: &[u8]) {
        if !self.enabled {
            return;
        }
        let mut data = vec![b'\n'];
        data.extend_from_slice(record);
        match (memfd(key, &data), memfd(key, output)) {
            (Ok(record), Ok(output)) => {
                self.send(key, &[record.as_fd()]);
                self.send(&format!("{key}.output"), &[output.as_fd()]);
            }
            (Err(e), _) | (_, Err(e)) => warn!("Cannot keep finished process {key}: {e}"),
        }
    }

    /// Lets go of the kept stdin of a process (the service closed its own).
    pub fn forget_input(&self, key: &str) {
        if self.enabled {
            self.remove(&format!("{key}.in"));
        }
    }

    /// Lets go of everything kept for a process; its output reaches its end.
    pub fn forget(&self, key: &str) {
        if !self.enabled {
            return;
        }
        lock(&self.holds).remove(key);
        lock(&self.pending).remove(key);
        self.remove(key);
        self.remove(&format!("{key}.in"));
        if lock(&self.stopped_with).remove(key) {
            self.remove(&format!("{key}.hold"));
            self.remove(&format!("{key}.output"));
        }
    }
}

enum Kind {
    Main,
    In,
    Hold,
    Output,
}

/// A stored name -> the process's key and what it holds.
fn split_name(name: &str) -> Option<(&str, Kind)> {
    if !name.starts_with("process.") {
        return None;
    }
    // A key is `process.<ws>.<n>`: its last part is a number.
    let (rest, last) = name.rsplit_once('.')?;
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Some((name, Kind::Main));
    }
    let kind = match last {
        "in" => Kind::In,
        "hold" => Kind::Hold,
        "output" => Kind::Output,
        _ => return None,
    };
    Some((rest, kind))
}

/// A sealed-size memory file holding `data`.
pub(super) fn memfd(key: &str, data: &[u8]) -> io::Result<OwnedFd> {
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
        let kind = |n| split_name(n).map(|(k, kind)| (k, kind as u8));
        assert_eq!(
            kind("process.host.3"),
            Some(("process.host.3", Kind::Main as u8))
        );
        assert_eq!(
            kind("process.0f0e-aa.12.output"),
            Some(("process.0f0e-aa.12", Kind::Output as u8))
        );
        assert_eq!(
            kind("process.host.3.in"),
            Some(("process.host.3", Kind::In as u8))
        );
        assert_eq!(
            kind("process.host.3.hold"),
            Some(("process.host.3", Kind::Hold as u8))
        );
        assert_eq!(kind("process.host.3.other"), None);
        assert_eq!(kind("socket.agent"), None);
    }

    #[test]
    fn a_memory_file_gives_back_what_it_was_given() {
        let fd = memfd("t", b"kept across a restart").unwrap();
        assert_eq!(read_memfd(&fd).unwrap(), b"kept across a restart");
        // Read twice: each read starts from the beginning.
        assert_eq!(read_memfd(&fd).unwrap(), b"kept across a restart");
    }
}
