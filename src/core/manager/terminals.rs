//! Background processes on a pseudo-terminal: their size, and callers attached to them
//! (`OpenPty`): each a task that sends the kept output then follows it, and types what the
//! caller writes.

use std::sync::{Arc, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Manager;
use super::processes::{Process, write_to};
use crate::core::error::{Error, Result};
use crate::core::ports::WindowSize;

impl Manager {
    /// Sets the size of the process's terminal.
    pub fn resize_process(&self, key: &str, process: u32, size: WindowSize) -> Result<()> {
        let (_, p) = self.process(key, process)?;
        if !p.info().pty {
            return Err(no_terminal(process));
        }
        check_size(size)?;
        let terminal = p.terminal.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(terminal) = terminal.as_ref() else {
            return Err(Error::JobFailed(format!("Process {process} has ended")));
        };
        terminal.resize(size).map_err(|e| {
            Error::io(
                format!("Cannot resize the terminal of process {process}"),
                e,
            )
        })
    }

    /// Attaches a caller to the process's terminal: the returned end of a socket pair carries
    /// the terminal's output (the output kept so far first, then as it comes, ending when the
    /// process has ended and all is sent), and what the caller writes is typed into it.
    pub fn open_pty(&self, key: &str, process: u32) -> Result<std::os::fd::OwnedFd> {
        let (ws_id, p) = self.process(key, process)?;
        if !p.info().pty {
            return Err(no_terminal(process));
        }
        let attached = p.attached.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if attached >= MAX_ATTACHED {
            p.attached.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::LimitsExceeded(format!(
                "Process {process} has {MAX_ATTACHED} callers attached to its terminal already"
            )));
        }
        let tracker = self
            .ready_for_command(&ws_id)
            .map(|place| place.tracker)
            .inspect_err(|_| {
                p.attached.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            })?;
        let pair = self.ports.executor.attachment().inspect_err(|_| {
            p.attached.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        })?;
        tracker.spawn(attach(p, process, pair.reader, pair.writer));
        Ok(pair.caller)
    }
}

/// Callers attached to one process's terminal at most.
const MAX_ATTACHED: usize = 16;

/// A terminal has at least one column and one row; the field that has none is named.
pub(super) fn check_size(size: WindowSize) -> Result<()> {
    for (field, n) in [("cols", size.cols), ("rows", size.rows)] {
        if n == 0 {
            return Err(Error::invalid(
                field,
                format!("a terminal of {}x{} characters", size.cols, size.rows),
            ));
        }
    }
    Ok(())
}

fn no_terminal(process: u32) -> Error {
    Error::invalid(
        "process",
        format!("process {process} has no terminal (start it with the option pty)"),
    )
}

/// One caller attached to a process's terminal (see `Manager::open_pty`): output to the
/// caller until the process has ended and all is sent or the caller is gone; the caller's
/// bytes typed into the terminal until it stops writing.
async fn attach(
    p: Arc<Process>,
    process: u32,
    mut from_caller: Box<dyn AsyncRead + Send + Unpin>,
    mut to_caller: Box<dyn AsyncWrite + Send + Unpin>,
) {
    let output = async {
        let mut changed = p.changed.subscribe();
        let mut offset = 0;
        loop {
            let (data, next, ended) = p
                .output
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(offset, 64 * 1024);
            if !data.is_empty() {
                if to_caller.write_all(&data).await.is_err() {
                    return;
                }
                offset = next;
                continue;
            }
            if ended || changed.changed().await.is_err() {
                let _ = to_caller.shutdown().await;
                return;
            }
        }
    };
    let input = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_caller.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if write_to(&p, process, &buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The caller has stopped writing; its output goes on.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = output => {}
        () = input => {}
    }
    p.attached.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_without_columns_or_rows_is_refused_by_the_field() {
        let field = |cols, rows| {
            check_size(WindowSize { cols, rows })
                .err()
                .and_then(|e| e.field().map(str::to_owned))
        };
        assert_eq!(field(0, 24).as_deref(), Some("cols"));
        assert_eq!(field(80, 0).as_deref(), Some("rows"));
        assert_eq!(field(80, 24), None);
    }
}
