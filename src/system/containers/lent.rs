//! Connections lent to callers (`ConnectPort`): made here, and whether a caller still holds
//! one, so an open connection to a dev server keeps its workspace from idling.
//!
//! The connection is made by the service itself, from a thread that enters the container's
//! network namespace (through the leader's pidfd: no PID reused by another process) and
//! connects to its loopback, not by the container's agent: nothing inside ever holds the
//! socket, so a container cannot keep a connection open (and itself from idling) after its
//! caller closed it.
//!
//! The service keeps no descriptor of a lent connection (one would keep the connection open
//! after its caller closed it): it keeps the socket's inode, and looks for it in the TCP
//! tables of the container's network namespace (`/proc/<leader>/net/tcp`, `tcp6`), which list
//! each socket with the inode of its file while a descriptor of it is open anywhere (a socket
//! closed on every side is gone, or shown with inode 0 while it finishes). Only the cached
//! leader of a running container is looked at: the check never starts a container.

use std::os::fd::{AsFd, OwnedFd};

use super::*;

/// A TCP connection to `port` on the loopback of the leader's network namespace (the
/// container's own, or the host's for a container on the host network), 5 s at most.
pub(super) async fn connect_inside(leader: &Leader, port: u16) -> std::io::Result<OwnedFd> {
    let pidfd = leader.pidfd().try_clone_to_owned()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own, which ends after: a namespace entered stays with the thread.
    std::thread::spawn(move || {
        let connected = (|| {
            nix::sched::setns(&pidfd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let stream =
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
            Ok(OwnedFd::from(stream))
        })();
        let _ = tx.send(connected);
    });
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread failed")))
}

/// Connections remembered per workspace (the newest): a caller that connects per request
/// and closes each does not grow the list without bound between looks.
const KEPT: usize = 256;

impl NspawnContainers {
    /// Its container stopped or removed: its connections went with it.
    pub(super) fn forget_lent(&self, name: &str) {
        self.lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
    }

    /// Remembers a connection lent for the workspace.
    pub(super) fn lend(&self, ws: &Workspace, fd: &impl AsFd) {
        let Ok(st) = nix::sys::stat::fstat(fd.as_fd()) else {
            return;
        };
        let mut all = self
            .lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = all.entry(ws.name.clone()).or_default();
        kept.push(st.st_ino);
        if kept.len() > KEPT {
            kept.drain(..kept.len() - KEPT);
        }
    }

    /// Whether a connection lent for the workspace is open still; those closed are forgotten.
    pub(super) async fn lent_open(&self, ws: &Workspace) -> bool {
        let lent = self
            .lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ws.name)
            .cloned()
            .unwrap_or_default();
        if lent.is_empty() {
            return false;
        }
        let Ok(leader) = self.running_leader(&ws.name) else {
            // Its leader is being looked up (a command starting): in use.
            return true;
        };
        let open = match &leader {
            Some(l) => {
                let pid = l.pid;
                let tables = tokio::task::spawn_blocking(move || {
                    ["tcp", "tcp6"]
                        .iter()
                        .filter_map(|t| {
                            std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok()
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                // Read from the leader's namespace only if the PID was still its.
                if l.alive() {
                    let listed: std::collections::HashSet<u64> =
                        tables.iter().flat_map(|t| socket_inodes(t)).collect();
                    lent.iter()
                        .copied()
                        .filter(|i| listed.contains(i))
                        .collect()
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        let mut all = self
            .lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = all.entry(ws.name.clone()).or_default();
        // Those lent since the look are kept: they are open.
        now.retain(|i| open.contains(i) || !lent.contains(i));
        if now.is_empty() {
            all.remove(&ws.name);
        }
        !open.is_empty()
    }

    /// The cached leader of the workspace's running container, if there is one (never starts
    /// it, unlike `leader`); an error while `leader` is looking it up.
    fn running_leader(&self, name: &str) -> std::result::Result<Option<Arc<Leader>>, ()> {
        let Some(slot) = self
            .leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
        else {
            return Ok(None);
        };
        let cached = slot.try_lock().map_err(|_| ())?;
        Ok(cached.as_ref().filter(|l| l.alive()).cloned())
    }
}

/// The inodes of the sockets a `/proc/net/tcp` (or `tcp6`) table lists (0, a socket no
/// descriptor holds any more, left out).
fn socket_inodes(table: &str) -> impl Iterator<Item = u64> + '_ {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(9)?.parse::<u64>().ok())
        .filter(|&i| i != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inodes_of_a_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 424242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 515151 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D2F4 0100007F:1F90 06 00000000:00000000 03:000016A1 00000000     0        0 0 3 0000000000000000
";
        assert_eq!(
            socket_inodes(table).collect::<Vec<_>>(),
            vec![424242, 515151]
        );
        assert_eq!(socket_inodes("").count(), 0);
    }
}
