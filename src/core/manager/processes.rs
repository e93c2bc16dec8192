//! Background processes: commands that outlive the call that started them. Each runs as an
//! exec with no practical timeout, its stdout and stderr into one pipe read into a bounded
//! buffer, its stdin a pipe the service holds; it is tracked with the workspace's execs, so
//! `Stop` and `Destroy` end it like any command (and the service's shutdown, unless it is kept
//! across a restart: `kept.rs`), and its whole tree lives in its own cgroup. Finished processes
//! are kept for a while, then forgotten.
//!
//! This is the one place the core makes descriptors itself (the pipes of a process): a
//! background process has no caller whose descriptors it could use.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::info;

use super::exec::{CommandPlace, command_cwd, command_env, run_command};
use super::output::OutputBuffer;
use super::{Manager, now_usec};
use crate::core::error::{Error, Result};
use crate::core::ports::{Event, ExecIo, ExecRequest, ProcessStreams, Terminal, WindowSize};

/// Output kept per process; older output is dropped (and `ReadOutput` says where it resumes).
pub const OUTPUT_CAP: usize = 1024 * 1024;
/// Running background processes per workspace, and in the whole service.
pub const MAX_PER_WORKSPACE: usize = 32;
pub const MAX_TOTAL: usize = 256;
/// Finished processes kept per workspace, each for at most `KEEP_FINISHED`.
pub const FINISHED_PER_WORKSPACE: usize = 16;
pub const KEEP_FINISHED: Duration = Duration::from_secs(600);
/// How long a process's output is still read after the process has ended (its processes, and
/// its cgroup's, are gone: only one that left it could still write), and how much at most;
/// then the service's end is closed, and whatever writes to it gets `EPIPE`.
const OUTPUT_END: Duration = Duration::from_secs(2);
const OUTPUT_END_BYTES: usize = 4 * 1024 * 1024;
/// Longest `ReadOutput` answer.
pub const MAX_READ: u32 = 1024 * 1024;
/// A background process has no timeout of its own: it ends, is signalled, or its workspace
/// stops. (Ten years keeps clear of any overflow in the timer.)
const NO_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What is known of a background process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub id: u32,
    pub command: String,
    pub running: bool,
    /// The exit status (128+N after signal N); -1 while it runs, or when it could not be
    /// started or was lost.
    pub exit_code: i32,
    pub started_at_usec: u64,
    /// 0 while it runs.
    pub ended_at_usec: u64,
    /// It runs on a pseudo-terminal.
    pub pty: bool,
}

pub(super) struct Process {
    info: Mutex<ProcessInfo>,
    /// Fired when the process has ended: its output is read for `OUTPUT_END` more at most.
    exited: tokio_util::sync::CancellationToken,
    pub(super) output: Mutex<OutputBuffer>,
    /// Bumped when output arrives and when the process ends.
    pub(super) changed: watch::Sender<u64>,
    signals: mpsc::UnboundedSender<i32>,
    stdin: tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>,
    /// Its terminal's controls while it runs (let go when it ends: a finished process keeps
    /// no terminal open).
    pub(super) terminal: Mutex<Option<Box<dyn Terminal>>>,
    /// Callers attached to its terminal (`open_pty`).
    pub(super) attached: std::sync::atomic::AtomicUsize,
    /// The key it is kept under across a restart (`kept.rs`), where the executor keeps.
    pub(super) kept: Option<String>,
}

impl Process {
    pub(super) fn new(
        info: ProcessInfo,
        output: OutputBuffer,
        signals: mpsc::UnboundedSender<i32>,
        input: Option<Box<dyn AsyncWrite + Send + Unpin>>,
        terminal: Option<Box<dyn Terminal>>,
        kept: Option<String>,
    ) -> Self {
        Self {
            info: Mutex::new(info),
            exited: Default::default(),
            output: Mutex::new(output),
            changed: watch::channel(0).0,
            signals,
            stdin: tokio::sync::Mutex::new(input),
            terminal: Mutex::new(terminal),
            attached: Default::default(),
            kept,
        }
    }

    pub(super) fn info(&self) -> ProcessInfo {
        self.info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A workspace's processes.
#[derive(Default)]
pub(super) struct WorkspaceProcesses {
    pub(super) next: u32,
    pub(super) by_id: BTreeMap<u32, Arc<Process>>,
}

pub(super) type Processes = Mutex<HashMap<String, WorkspaceProcesses>>;

impl Manager {
    pub(super) fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<String, WorkspaceProcesses>> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn process(&self, key: &str, process: u32) -> Result<(String, Arc<Process>)> {
        let id = self.get(key)?.id;
        let p = self
            .procs()
            .get(&id)
            .and_then(|w| w.by_id.get(&process).cloned())
            .ok_or_else(|| Error::NoSuchProcess(format!("{process} in workspace '{key}'")))?;
        Ok((id, p))
    }

    /// Starts `command` as a background process of the workspace, on a pseudo-terminal of the
    /// given size if there is one; returns its id.
    pub async fn start_process(
        &self,
        key: &str,
        command: String,
        env: BTreeMap<String, String>,
        cwd: Option<String>,
        terminal: Option<WindowSize>,
    ) -> Result<u32> {
        if let Some(size) = terminal {
            super::terminals::check_size(size)?;
        }
        // The checks of an exec's command, environment and directory.
        let params = crate::core::spec::ExecParams {
            command,
            timeout_secs: None,
            cwd,
            env,
            io: ExecIo::default(),
        };
        params.validate(&self.limits().exec)?;
        let crate::core::spec::ExecParams {
            command, cwd, env, ..
        } = params;
        self.wake(key).await?;
        let CommandPlace {
            ws,
            running: _running,
            tracker,
            end_processes: cancel,
            ..
        } = self.ready_for_command(key)?;
        let keeps = self.ports.executor.keeps_processes();
        let (signals_tx, signals_rx) = mpsc::unbounded_channel();
        // The caps checked, the id taken and the streams made (kept under a key the id
        // completes) under one lock: concurrent starts neither pass a cap together nor share
        // a key. Making the streams is a few system calls.
        let (process, streams) = {
            let mut all = self.procs();
            let running = |w: &WorkspaceProcesses| {
                w.by_id
                    .values()
                    .filter(|p| {
                        p.info
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .running
                    })
                    .count()
            };
            let total: usize = all.values().map(running).sum();
            let mine = all.entry(ws.id.clone()).or_default();
            if running(mine) >= MAX_PER_WORKSPACE || total >= MAX_TOTAL {
                return Err(Error::LimitsExceeded(format!(
                    "Too many background processes: workspace '{}' runs {} (at most {MAX_PER_WORKSPACE}), the service {total} (at most {MAX_TOTAL})",
                    ws.name,
                    running(mine)
                )));
            }
            let id = mine.next + 1;
            let kept = keeps.then(|| super::kept::key(&ws.id, id));
            let ProcessStreams {
                command: streams,
                input,
                output,
                terminal: pty,
            } = self.ports.executor.process_streams(
                terminal,
                kept.as_deref(),
                ws.workspace_type == crate::core::workspace::WorkspaceType::Container,
            )?;
            mine.next = id;
            let process = Arc::new(Process::new(
                ProcessInfo {
                    id,
                    command: command.clone(),
                    running: true,
                    exit_code: -1,
                    started_at_usec: now_usec(),
                    ended_at_usec: 0,
                    pty: pty.is_some(),
                },
                OutputBuffer::default(),
                signals_tx,
                Some(input),
                pty,
                kept,
            ));
            mine.by_id.insert(id, process.clone());
            (process, (streams, output))
        };
        let id = process.info().id;
        let (streams, output) = streams;
        let mut env = command_env(&ws, env);
        if terminal.is_some() {
            env.entry("TERM".into())
                .or_insert_with(|| "xterm-256color".into());
        }
        let request = ExecRequest {
            workspace_id: ws.id.clone(),
            command,
            env,
            cwd: command_cwd(&ws, cwd),
            io: streams,
            timeout: NO_TIMEOUT,
            output_cap: 0,
            signals: Some(signals_rx),
            terminal: terminal.is_some(),
            keep: process.kept.clone().map(|key| crate::core::ports::KeepAs {
                key,
                record: super::kept::record(&ws.id, &process.info()),
            }),
        };
        info!(workspace_id = %ws.id, workspace_name = %ws.name, process = id,
              "Starting background process {id} in workspace {}", ws.name);
        self.ports.events.emit(Event::ProcessAdded {
            id: ws.id.clone(),
            process: id,
        });
        let containers = self.ports.containers.clone();
        let executor = self.ports.executor.clone();
        let ending = Ending {
            process: process.clone(),
            executor: self.ports.executor.clone(),
            events: self.ports.events.clone(),
            ws_id: ws.id.clone(),
            name: ws.name.clone(),
        };
        let forget = ws.id.clone();
        let run = async move {
            let outcome = run_command(&containers, &executor, &ws, request, cancel)
                .await
                .map(|o| o.exit_code);
            ending.end(outcome).await;
        };
        tracker.spawn(read_output(process, output));
        tracker.spawn(run);
        self.forget_finished(&forget);
        Ok(id)
    }

    /// The workspace's processes, oldest first.
    pub fn list_processes(&self, key: &str) -> Result<Vec<ProcessInfo>> {
        let id = self.get(key)?.id;
        self.forget_finished(&id);
        Ok(self
            .procs()
            .get(&id)
            .map(|w| w.by_id.values().map(|p| p.info()).collect())
            .unwrap_or_default())
    }

    pub fn process_info(&self, key: &str, process: u32) -> Result<ProcessInfo> {
        Ok(self.process(key, process)?.1.info())
    }

    /// Up to `max_bytes` of output from `offset`: the data, the offset after it, and whether
    /// the output is complete and all read.
    pub fn read_output(
        &self,
        key: &str,
        process: u32,
        offset: u64,
        max_bytes: u32,
    ) -> Result<(Vec<u8>, u64, bool)> {
        let (_, p) = self.process(key, process)?;
        let out = p.output.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(out.read(offset, max_bytes.min(MAX_READ)))
    }

    /// Writes to the process's stdin; empty `data` closes it (the process reads end of file).
    /// On a terminal, empty `data` types the end-of-file character (Ctrl-D) instead: a
    /// terminal's input stays open as long as the terminal.
    pub async fn write_input(&self, key: &str, process: u32, data: &[u8]) -> Result<()> {
        let (_, p) = self.process(key, process)?;
        write_to(&p, process, data).await?;
        // Closed: the copy kept for a restart goes too, or the process never reads its end.
        if let (true, false, Some(kept)) = (data.is_empty(), p.info().pty, &p.kept) {
            self.ports.executor.forget_kept_input(kept);
        }
        Ok(())
    }

    /// Sends signal `sig` to every process of the background process's tree.
    pub fn signal_process(&self, key: &str, process: u32, sig: i32) -> Result<()> {
        if !(1..=64).contains(&sig) {
            return Err(Error::invalid("signal", format!("{sig} is not a signal")));
        }
        let (_, p) = self.process(key, process)?;
        if !p.info().running || p.signals.send(sig).is_err() {
            return Err(Error::JobFailed(format!("Process {process} has ended")));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to end: its exit code, or -1 and true on timeout.
    pub async fn wait_process(
        &self,
        key: &str,
        process: u32,
        timeout: Duration,
    ) -> Result<(i32, bool)> {
        let (_, p) = self.process(key, process)?;
        let mut changed = p.changed.subscribe();
        let ended = async {
            loop {
                let info = p.info();
                if !info.running {
                    return info.exit_code;
                }
                if changed.changed().await.is_err() {
                    return p.info().exit_code;
                }
            }
        };
        Ok(match tokio::time::timeout(timeout, ended).await {
            Ok(code) => (code, false),
            Err(_) => (-1, true),
        })
    }

    /// Forgets finished processes beyond `FINISHED_PER_WORKSPACE`, and those that ended more
    /// than `KEEP_FINISHED` ago.
    fn forget_finished(&self, ws_id: &str) {
        let now = now_usec();
        let gone: Vec<u32> = {
            let mut all = self.procs();
            let Some(w) = all.get_mut(ws_id) else {
                return;
            };
            let finished: Vec<(u32, u64)> = w
                .by_id
                .values()
                .map(|p| p.info())
                .filter(|i| !i.running)
                .map(|i| (i.id, i.ended_at_usec))
                .collect();
            let excess = finished.len().saturating_sub(FINISHED_PER_WORKSPACE);
            let old = KEEP_FINISHED.as_micros() as u64;
            let gone: Vec<u32> = finished
                .iter()
                .enumerate()
                .filter(|(i, (_, ended))| *i < excess || now.saturating_sub(*ended) > old)
                .map(|(_, (id, _))| *id)
                .collect();
            for id in &gone {
                w.by_id.remove(id);
            }
            gone
        };
        for process in gone {
            self.ports.events.emit(Event::ProcessRemoved {
                id: ws_id.to_owned(),
                process,
            });
        }
    }

    /// Forgets every process of a workspace being removed (they have ended).
    pub(super) fn forget_processes(&self, ws_id: &str) {
        let gone = self.procs().remove(ws_id).unwrap_or_default();
        for process in gone.by_id.into_keys() {
            self.ports.events.emit(Event::ProcessRemoved {
                id: ws_id.to_owned(),
                process,
            });
        }
    }
}

/// Reads a process's output into its buffer until its end; once the process has ended, for at
/// most `OUTPUT_END` and `OUTPUT_END_BYTES` more. Then the output is let go.
pub(super) async fn read_output(
    process: Arc<Process>,
    mut output: Box<dyn AsyncRead + Send + Unpin>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let drain = async {
        process.exited.cancelled().await;
        tokio::time::sleep(OUTPUT_END).await;
    };
    tokio::pin!(drain);
    let mut after_end = 0usize;
    loop {
        let ended = process.exited.is_cancelled();
        if ended && after_end >= OUTPUT_END_BYTES {
            break;
        }
        let n = tokio::select! {
            biased;
            n = output.read(&mut buf) => n,
            () = &mut drain => break,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if ended {
                    after_end += n;
                }
                process
                    .output
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(&buf[..n], OUTPUT_CAP);
                process.bump();
            }
        }
    }
    process
        .output
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .complete = true;
    process.bump();
    // Let go last: whatever learns that the output is over finds it so.
    drop(output);
}

/// What the end of a process updates and tells.
pub(super) struct Ending {
    pub(super) process: Arc<Process>,
    pub(super) executor: Arc<dyn crate::core::ports::Executor>,
    pub(super) events: Arc<dyn crate::core::ports::Events>,
    pub(super) ws_id: String,
    pub(super) name: String,
}

impl Ending {
    /// Records the process's end (`outcome`: its exit code, or why it is unknown), lets its
    /// stdin, terminal and kept descriptors go, and announces it.
    pub(super) async fn end(self, outcome: Result<i32>) {
        let Self {
            process,
            executor,
            events,
            ws_id,
            name,
        } = self;
        let id = process.info().id;
        let exit_code = *outcome.as_ref().unwrap_or(&-1);
        // What was kept for a restart goes (with it the output's end the store held), and
        // its output is read to the end first: whoever learns of the end reads all of it.
        // (Bounded: whatever else held the output was ended with the process's cgroup, and
        // what left it is read for OUTPUT_END at most.)
        if let Some(key) = &process.kept {
            executor.forget_kept(key);
        }
        process.exited.cancel();
        let mut changed = process.changed.subscribe();
        let complete = || {
            process
                .output
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .complete
        };
        // The reader ends within OUTPUT_END (a little more for it to be scheduled).
        let _ = tokio::time::timeout(OUTPUT_END * 2, async {
            while !complete() && changed.changed().await.is_ok() {}
        })
        .await;
        {
            let mut info = process.info.lock().unwrap_or_else(PoisonError::into_inner);
            info.running = false;
            info.exit_code = exit_code;
            info.ended_at_usec = now_usec();
        }
        // Its stdin and terminal go with it.
        process.stdin.lock().await.take();
        process
            .terminal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match outcome {
            Ok(_) => info!(workspace_id = %ws_id, workspace_name = %name, process = id,
                           exit_code, "Background process {id} in workspace {name} ended: exit code {exit_code}"),
            Err(e) => info!(workspace_id = %ws_id, workspace_name = %name, process = id,
                            "Background process {id} in workspace {name} ended: {e}"),
        }
        process.bump();
        events.emit(Event::ProcessExited {
            id: ws_id,
            process: id,
        });
    }
}

/// Writes to a process's stdin (see `Manager::write_input`).
pub(super) async fn write_to(p: &Process, process: u32, data: &[u8]) -> Result<()> {
    let mut stdin = p.stdin.lock().await;
    let closed = || Error::JobFailed(format!("The input of process {process} is closed"));
    let on_terminal = p.info().pty;
    let data = match (data.is_empty(), on_terminal) {
        (true, true) => b"\x04".as_slice(),
        (true, false) => return stdin.take().map(drop).ok_or_else(closed),
        (false, _) => data,
    };
    let pipe = stdin.as_mut().ok_or_else(closed)?;
    match tokio::time::timeout(Duration::from_secs(10), pipe.write_all(data)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            stdin.take();
            Err(Error::JobFailed(format!(
                "Cannot write to process {process}: {e}"
            )))
        }
        Err(_) => Err(Error::JobFailed(format!(
            "Process {process} did not read its input for 10 s"
        ))),
    }
}
