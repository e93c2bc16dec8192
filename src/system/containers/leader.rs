//! A running container as the service reaches it: its leader (the container's PID 1), held by
//! a pidfd so that a reused PID is never taken for it; the leader's root (the container's file
//! system); its payload cgroup, below which commands get cgroups of their own; and its agent.
//! Opened once per container start and kept: the exec path then makes no bus call.
//!
//! The payload is found from what systemd says of the container's unit (its `ControlGroup`,
//! and nspawn's `payload` below it), not from the leader's own cgroup, which the container's
//! root can move. The agent's socket is resolved inside the container and kept as a
//! descriptor of the socket itself; it is remembered (`<state>/agents/<name>`) with the
//! leader it belongs to (its PID and start time in this boot), so a service that restarts while the container runs takes the same
//! socket again or none: a socket the container's root bound at the agent's path meanwhile is
//! refused.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use agent_workspaces_agent::SOCKET;
use pathrs::RootRef;
use rustix::fs::{self as rfs, FileType, Mode, OFlags};

use crate::system::commands::agent::{AgentHome, Peer, pidfd_alive};
use crate::system::commands::cgroup::{CgroupParent, cgroup2_mount};

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub struct Leader {
    pub pid: u32,
    pidfd: OwnedFd,
    /// When it started (field 22 of `/proc/PID/stat`): with the PID, it names this leader in
    /// the agent's record.
    started: u64,
    root: OwnedFd,
    /// nspawn's delegated `payload` cgroup: commands' cgroups are made below it, and its
    /// owner is the container's root.
    pub payload: Arc<CgroupParent>,
    peer: Peer,
    /// Where the agent's socket is remembered across a restart of the service.
    record: PathBuf,
    /// The agent once its socket was found (`agent`).
    agent: OnceLock<Arc<AgentHome>>,
}

impl Leader {
    /// The leader's pidfd: what enters its namespaces (`setns`) without a PID to be reused.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The leader `pid` of the container whose unit's cgroup is `unit_cgroup` (as systemd
    /// says: `/machine.slice/agent-workspace-<name>.service`); `record`: where its agent's
    /// socket is remembered.
    pub fn open(pid: u32, unit_cgroup: &str, record: PathBuf) -> io::Result<Self> {
        let pidfd = pidfd_open(pid)?;
        let root = rfs::openat(
            rfs::CWD,
            format!("/proc/{pid}/root"),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let started = start_time(pid)?;
        let pid_ns = std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })?;
        let mount =
            cgroup2_mount().ok_or_else(|| io::Error::other("no cgroup v2 hierarchy is mounted"))?;
        if unit_cgroup.is_empty() {
            return Err(io::Error::other("its unit has no cgroup"));
        }
        let payload_path = mount
            .join(unit_cgroup.trim_start_matches('/'))
            .join("payload");
        // The agent sees the payload as the root of its own cgroup namespace; its processes
        // join commands' cgroups as the container's root, the payload's owner.
        let owner = std::fs::metadata(&payload_path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        })?;
        let payload = CgroupParent::open(&payload_path, Some(PathBuf::from("/")), Some(owner))?;
        let leader = Self {
            pid,
            pidfd,
            started,
            root,
            payload,
            peer: Peer {
                pid_ns,
                uid: owner.0,
            },
            record,
            agent: OnceLock::new(),
        };
        // What was opened belongs to the leader only if it still lives: its PID was not reused.
        if !leader.alive() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the container's leader is gone",
            ));
        }
        Ok(leader)
    }

    /// The leader still runs (and so its root and cgroup are the container's).
    pub fn alive(&self) -> bool {
        pidfd_alive(self.pidfd.as_fd())
    }

    /// The container's agent: its socket, as an `O_PATH` descriptor of the socket inode
    /// itself, resolved inside the container once it is there and kept, so every later
    /// connection goes to that same socket whatever the container does to its path. (The agent
    /// binds it once, at the container's start; a restarted container has a new leader.)
    pub fn agent(&self) -> io::Result<&Arc<AgentHome>> {
        if let Some(home) = self.agent.get() {
            return Ok(home);
        }
        let socket = self.resolve_agent_socket()?;
        self.check_remembered(&socket)?;
        let home = AgentHome::new(socket, Some(self.peer));
        // Another connection may have set it meanwhile: the same socket either way.
        Ok(self.agent.get_or_init(|| home))
    }

    fn resolve_agent_socket(&self) -> io::Result<OwnedFd> {
        let handle = RootRef::from_fd(self.root.as_fd())
            .resolve_nofollow(SOCKET)
            .map_err(|e| match e.kind() {
                pathrs::error::ErrorKind::OsError(Some(n)) => io::Error::from_raw_os_error(n),
                _ => io::Error::other(e.to_string()),
            })?;
        let st = rfs::fstat(handle.as_fd())?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{SOCKET} is not a socket"),
            ));
        }
        Ok(handle.into())
    }

    /// The socket found is the one remembered for this leader; or, where none is (the first
    /// time, as the container starts), it is remembered from now on.
    fn check_remembered(&self, socket: &OwnedFd) -> io::Result<()> {
        let st = rfs::fstat(socket)?;
        let this = AgentRecord {
            boot: boot_id(),
            leader: self.pid,
            started: self.started,
            dev: st.st_dev,
            ino: st.st_ino,
        };
        match AgentRecord::read(&self.record) {
            Some(r) if (r.boot, r.leader, r.started) == (this.boot, this.leader, this.started) => {
                if (r.dev, r.ino) == (this.dev, this.ino) {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{SOCKET} is not the socket the container's agent made when the container started (something in the container bound another there)"
                        ),
                    ))
                }
            }
            _ => this.write(&self.record),
        }
    }
}

/// The start time of a process, in clock ticks after boot.
fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields after its last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/PID/stat"))
}

/// This boot's id (a leader's PID and start time name it within one boot only), as a number.
fn boot_id() -> u128 {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|t| u128::from_str_radix(&t.trim().replace('-', ""), 16).ok())
        .unwrap_or(0)
}

/// The agent's socket of one container start, remembered across restarts of the service.
#[derive(Debug, PartialEq, Eq)]
struct AgentRecord {
    boot: u128,
    leader: u32,
    started: u64,
    dev: u64,
    ino: u64,
}

impl AgentRecord {
    fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut words = text.split_whitespace();
        let boot = u128::from_str_radix(words.next()?, 16).ok()?;
        let mut n = words.map(str::parse::<u64>);
        let mut next = || n.next()?.ok();
        Some(Self {
            boot,
            leader: u32::try_from(next()?).ok()?,
            started: next()?,
            dev: next()?,
            ino: next()?,
        })
    }

    /// Written whole (temporary file, rename): a crash leaves the old record or the new one.
    fn write(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            format!(
                "{:x} {} {} {} {}\n",
                self.boot, self.leader, self.started, self.dev, self.ino
            ),
        )?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents").join("box");
        assert_eq!(AgentRecord::read(&path), None);
        let r = AgentRecord {
            boot: boot_id(),
            leader: 4242,
            started: 123_456,
            dev: 38,
            ino: 9_000_000_001,
        };
        r.write(&path).unwrap();
        assert_eq!(AgentRecord::read(&path), Some(r));
        assert_ne!(boot_id(), 0);
        std::fs::write(&path, "4242 oops").unwrap();
        assert_eq!(AgentRecord::read(&path), None);
    }

    #[test]
    fn a_start_time_is_read_past_a_command_name_with_spaces() {
        let me = start_time(std::process::id()).unwrap();
        assert!(me > 0);
    }
}
