//! Host commands, started by `agent_workspaces_agent::direct::start` (shared with the agent)
//! and awaited through their pidfd.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

/// A started command.
pub struct Spawned {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
}

/// Registers a started command's pidfd with the runtime, to await its end.
pub fn watch(child: agent_workspaces_agent::spawn::Child) -> io::Result<Spawned> {
    let pid = child.pid;
    // SAFETY: the OwnedFd keeps its descriptor open for the AsyncFd's life.
    let pidfd = match unsafe {
        AsyncFd::register_with_interest(child.pidfd, tokio::io::Interest::READABLE)
    } {
        Ok(fd) => fd,
        Err(e) => {
            // SAFETY: ending and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(io::Error::from(e));
        }
    };
    Ok(Spawned {
        pid,
        pidfd,
        reaped: false,
    })
}

impl Spawned {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for the command to exit (its pidfd becomes readable) and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            let mut guard = self.pidfd.readable().await?;
            let mut status = 0;
            // SAFETY: reaping our own child without blocking.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                self.reaped = true;
                return Ok(ExitStatus::from_raw(status));
            }
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            guard.clear_ready();
        }
    }
}

impl Drop for Spawned {
    /// A command given up on is killed and reaped (off this thread).
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let pid = self.pid;
        // SAFETY: our own child, not yet reaped, so the pid is still its own.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        std::thread::spawn(move || {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        });
    }
}
