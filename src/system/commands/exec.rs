//! Runs commands: a host command directly, a container command through its agent, each in a
//! cgroup of its own (`cgroup.rs`), so a timeout or a cancel ends its whole process tree at
//! once; when the command's shell exits, whatever it left running is ended the same way.
//! Output is collected and capped per stream (`output.rs`).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent_workspaces_agent::{self as agent_proto, RefuseReason, Reply};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

use crate::core::error::{Error, Result};
use crate::core::ports::{ExecIo, ExecOutcome, KeepAs, ProcessIo, Signals, WindowSize};
use crate::system::commands::agent::AgentConnection;
use crate::system::commands::cgroup::{CommandCgroup, Containment};
use crate::system::commands::output::{DRAIN, READ_GRACE, collect_after_end, collect_running};
use crate::system::commands::pipes::Streams;
use crate::system::commands::relay;

/// The start of the error of a command its agent did not start (the connection lost, or no
/// answer): nothing of it ran.
pub const NOT_STARTED: &str = "Cannot run the command through the agent of workspace";

/// The first line of a kept process's record when its terminal was made inside its container
/// (`kept.rs` gives it its resizes again).
pub(crate) const TERMINAL_INSIDE: &str = "terminal-inside";

/// How long an agent may take to answer a request (it answers as soon as it has forked).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The soft descriptor limit the service started with, which the commands it starts get back.
static CHILD_NOFILE_SOFT: AtomicU64 = AtomicU64::new(1024);

/// systemd gives services a soft limit of 1024 descriptors (for select()'s sake) under a high
/// hard limit; a service that needs more raises its own soft limit, and gives what it starts
/// the original (`run_contained` does). Each running command holds about a dozen descriptors
/// here, so 1024 would refuse commands long before `max_concurrent`. Returns the new limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        CHILD_NOFILE_SOFT.store(lim.rlim_cur, Ordering::Relaxed);
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The request to an agent for a command: its shell command, working directory (resolved
/// by the agent, where it runs) and exact environment.
pub(crate) fn agent_request(
    command: String,
    cwd: &Path,
    env: BTreeMap<String, String>,
    terminal: agent_proto::Terminal,
) -> agent_proto::ExecRequest {
    use std::os::unix::ffi::OsStrExt;
    agent_proto::ExecRequest {
        command: command.into_bytes(),
        cwd: cwd.as_os_str().as_bytes().to_vec(),
        env: env
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
            .collect(),
        // Named once the command's cgroup is made (`launch`).
        cgroup: Vec::new(),
        terminal,
    }
}

/// 128+N for death by signal N, as shells report it.
pub fn exit_code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// The host's shell, looked up once: bash, or sh where there is no bash.
fn shell() -> &'static str {
    static SHELL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    SHELL.get_or_init(|| {
        if Path::new("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        }
    })
}

enum Ending {
    Exited(Result<i32>),
    TimedOut,
    Cancelled,
}

/// How a command is started once its cgroup and streams are ready.
pub enum Launch<'a> {
    /// Started by the service: the shell command with exactly `env`, in `cwd`.
    Here {
        command: &'a str,
        env: &'a BTreeMap<String, String>,
        dir: &'a agent_proto::spawn::WorkDir,
        /// Its stdin is a terminal to make its controlling terminal.
        terminal: bool,
    },
    /// By the agent inside a container (the request names the shell command, its environment
    /// and working directory as seen inside).
    Agent {
        conn: AgentConnection,
        request: agent_proto::ExecRequest,
        /// For messages.
        workspace: &'a str,
    },
}

/// One command to run and collect.
pub struct Command<'a> {
    pub launch: Launch<'a>,
    pub io: ExecIo,
    pub timeout: Duration,
    pub output_cap: usize,
    /// Signals for every process of the command while it runs.
    pub signals: Option<Signals>,
    /// Kept across a restart of the service (started by an agent: the connection that
    /// reports its end, its cgroup and the core's record go to the store).
    pub keep: Option<KeepAs>,
}

/// How an agent starts a command on a terminal: one made inside (its size in a background
/// process's streams), the one the service made as its stdin, or none.
pub(crate) fn agent_terminal(terminal: bool, io: &ExecIo) -> agent_proto::Terminal {
    match io {
        ExecIo::Process(ProcessIo {
            terminal_inside: Some(t),
            ..
        }) => agent_proto::Terminal::Make {
            cols: t.size.cols,
            rows: t.size.rows,
        },
        _ if terminal => agent_proto::Terminal::Given,
        _ => agent_proto::Terminal::None,
    }
}

/// What reaches a running command from outside: signals for its processes, and the new sizes
/// of a terminal its agent made.
#[derive(Default)]
struct Controls<'a> {
    signals: Option<&'a mut Signals>,
    resizes: Option<&'a mut Resizes>,
}

type Resizes = tokio::sync::mpsc::UnboundedReceiver<WindowSize>;

/// A started command.
enum Running<'a> {
    Here(crate::system::commands::spawn::Spawned),
    Agent {
        conn: AgentConnection,
        workspace: &'a str,
    },
}

impl Running<'_> {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::Here(c) => Some(c.id()),
            Running::Agent { .. } => None,
        }
    }

    /// Until the command's shell exits: its exit code.
    async fn wait(&mut self) -> Result<i32> {
        match self {
            Running::Here(c) => c
                .wait()
                .await
                .map(exit_code_of)
                .map_err(|e| Error::JobFailed(format!("Cannot wait for the command: {e}"))),
            Running::Agent { conn, workspace } => match conn.reply().await {
                Ok(Some(Reply::Exited { code })) => Ok(code),
                Ok(None) => Err(Error::JobFailed(format!(
                    "The agent of workspace '{workspace}' ended while the command ran; the command was killed"
                ))),
                Ok(Some(other)) => Err(Error::JobFailed(format!(
                    "The agent of workspace '{workspace}' answered {other:?} instead of an exit status"
                ))),
                Err(e) => Err(Error::JobFailed(format!(
                    "Lost the agent of workspace '{workspace}' while the command ran: {e}"
                ))),
            },
        }
    }

    /// After the command's processes were killed: collects the child (bounded for an agent).
    async fn reap(&mut self) {
        match self {
            Running::Here(c) => {
                let _ = c.wait().await;
            }
            Running::Agent { conn, .. } => {
                let _ = tokio::time::timeout(DRAIN, conn.reply()).await;
            }
        }
    }
}

/// Starts the command with the given ends of its streams, in its cgroup: made in it, or joined
/// before it execs (the service's own child writes itself into the cgroup's `cgroup.procs`; an
/// agent's opens the cgroup it is told the name of, through its own view of the hierarchy).
async fn launch<'a>(
    launch: Launch<'a>,
    child: [OwnedFd; 3],
    cgroup: Option<&CommandCgroup>,
) -> Result<Running<'a>> {
    match launch {
        Launch::Here {
            command,
            env,
            dir,
            terminal,
        } => {
            let [stdin, stdout, stderr] = &child;
            let procs = cgroup
                .map(CommandCgroup::procs)
                .transpose()
                .map_err(|e| Error::JobFailed(format!("Cannot open the command's cgroup: {e}")))?;
            let env: Vec<(Vec<u8>, Vec<u8>)> = env
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
            let shell = shell();
            let spawned = agent_proto::direct::start(agent_proto::direct::Command {
                shell,
                command: command.as_bytes(),
                env: &env,
                dir,
                fds: [stdin, stdout, stderr],
                procs,
                cgroup: cgroup.map(|cg| &cg.dir),
                terminal,
                nofile_soft: CHILD_NOFILE_SOFT.load(Ordering::Relaxed),
            })
            .and_then(crate::system::commands::spawn::watch);
            // The command has its own copies of its descriptors now; close the service's.
            drop(child);
            spawned
                .map(Running::Here)
                .map_err(|e| Error::JobFailed(format!("Cannot start {shell}: {e}")))
        }
        Launch::Agent {
            mut conn,
            mut request,
            workspace,
        } => {
            let lost = |e: io::Error| Error::JobFailed(format!("{NOT_STARTED} '{workspace}': {e}"));
            if let Some(cg) = cgroup {
                let seen = cg.seen_by_agent().ok_or_else(|| {
                    lost(io::Error::other("its cgroup has no name the agent knows"))
                })?;
                request.cgroup = seen.into_os_string().into_encoded_bytes();
            }
            let first = {
                let fds: Vec<BorrowedFd<'_>> = child.iter().map(|f| f.as_fd()).collect();
                // The agent answers as soon as it has forked; whatever sits at its socket
                // instead gets no longer than ANSWER_WITHIN (sending has a limit of its own).
                conn.start(&request, &fds, ANSWER_WITHIN).await
            };
            drop(child);
            match first.map_err(lost)? {
                Some(Reply::Started { .. }) => Ok(Running::Agent { conn, workspace }),
                Some(Reply::Refused {
                    reason: RefuseReason::Cwd,
                    message,
                }) => Err(Error::invalid("cwd", message)),
                Some(Reply::Refused { message, .. }) => {
                    // An agent from before this protocol (a container started before an
                    // upgrade) is not spoken to in the older one.
                    let older = if message.contains("unsupported protocol version")
                        || message.contains("unknown request kind")
                    {
                        " (the agent in the running container is older than the service: \
                         StopWorkspace and StartWorkspace restart it with the installed one)"
                    } else {
                        ""
                    };
                    Err(Error::JobFailed(format!(
                        "The agent of workspace '{workspace}' could not start the command: {message}{older}"
                    )))
                }
                Some(other) => Err(lost(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected reply {other:?}"),
                ))),
                None => Err(lost(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }
}

/// Until the command's shell exits, its `timeout` passes or `cancel` fires, with its signals
/// delivered to every process of it and its terminal's new sizes to its agent meanwhile; then
/// ends what it left running (its cgroup, or its process group). How it ended, and whether its
/// cgroup was empty already.
async fn until_end(
    running: &mut Running<'_>,
    cgroup: Option<&CommandCgroup>,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
    controls: Controls<'_>,
) -> (Ending, bool) {
    let Controls {
        mut signals,
        mut resizes,
    } = controls;
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let pid = running.pid();
    let timeout = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    let ending = loop {
        tokio::select! {
            r = running.wait() => break Ending::Exited(r),
            () = &mut timeout => break Ending::TimedOut,
            () = cancel.cancelled() => break Ending::Cancelled,
            Some(sig) = async {
                match signals.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => match cgroup {
                Some(cg) => cg.signal(sig).await,
                None => {
                    if let (Some(pid), Ok(sig)) = (pid, Signal::try_from(sig)) {
                        let _ = killpg(Pid::from_raw(pid as i32), sig);
                    }
                }
            },
            Some(size) = async {
                match resizes.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Running::Agent { conn, .. } = running {
                    let message = agent_proto::resize_message(size.cols, size.rows);
                    if let Err(e) = conn.control(&message).await {
                        tracing::warn!("Cannot resize a terminal through its agent: {e}");
                    }
                }
            },
        }
    };
    let mut empty = false;
    match cgroup {
        Some(cg) => match ending {
            Ending::Exited(_) => empty = cg.kill_leftovers(),
            Ending::TimedOut | Ending::Cancelled => cg.kill(),
        },
        None => {
            if let Some(pid) = pid {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
    (ending, empty)
}

/// A command's cgroup after it: kept for the next one when it was empty (as after most
/// commands), else removed once `cgroup.kill` has emptied it, after the answer (a killed
/// cgroup is never kept: see `CommandCgroup::keep`).
fn put_back(cg: CommandCgroup, empty: bool) {
    if empty {
        cg.keep();
    } else {
        drop(tokio::spawn(cg.remove()));
    }
}

/// Runs a command to its end, its timeout or `cancel`, reading its output as it comes; then
/// ends every process it left in its cgroup (or process group).
pub async fn run_contained(
    c: Command<'_>,
    containment: &Containment,
    cancel: &CancellationToken,
) -> Result<ExecOutcome> {
    let cgroup = match containment {
        Containment::Cgroup(parent) => Some(CommandCgroup::create(parent).map_err(|e| {
            Error::JobFailed(format!(
                "Cannot create a cgroup for the command below {}: {e}",
                parent.path().display()
            ))
        })?),
        Containment::ProcessGroup => None,
    };
    let no_pipes = |e: io::Error| Error::JobFailed(format!("Cannot make the command's pipes: {e}"));
    let mut resizes = None;
    let mut relays = None;
    let streams = match c.io {
        // An agent's command never gets what a caller lent: pipes, relayed. (What the caller
        // lent is looked at off the event loop: it may be on any file system.)
        ExecIo::Lend {
            stdin,
            stdout,
            stderr,
        } if matches!(c.launch, Launch::Agent { .. }) => {
            tokio::task::spawn_blocking(move || relay::relay(stdin, stdout, stderr))
                .await
                .map_err(|e| no_pipes(io::Error::other(e)))
                .and_then(|r| r.map_err(no_pipes))
                .map(|r| {
                    relays = Some(r.relays);
                    Streams {
                        child: r.child,
                        stdin: None,
                        stdout: None,
                        stderr: None,
                    }
                })
        }
        ExecIo::Process(mut p) => {
            resizes = p.terminal_inside.take().map(|t| t.resizes);
            crate::system::commands::pipes::streams(ExecIo::Process(p)).map_err(no_pipes)
        }
        io => crate::system::commands::pipes::streams(io).map_err(no_pipes),
    };
    let streams = match streams {
        Ok(s) => s,
        Err(e) => {
            // Nothing ran in it: as after a command that left nothing.
            if let Some(cg) = cgroup {
                put_back(cg, true);
            }
            return Err(e);
        }
    };
    let start = Instant::now();
    let mut running = match launch(c.launch, streams.child, cgroup.as_ref()).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(cg) = cgroup {
                cg.kill();
                cg.remove().await;
            }
            if let Some(r) = relays {
                r.finish().await;
            }
            return Err(e);
        }
    };
    if let (Some(keep), Running::Agent { conn, .. }) = (&c.keep, &mut running) {
        if let Err(e) = conn.keep_open().await {
            tracing::warn!(
                "Cannot ask the agent to keep {}'s connection: {e}",
                keep.key
            );
        }
        crate::system::commands::keep::keeper().keep_started(
            &keep.key,
            conn.socket(),
            cgroup.as_ref().map(|cg| cg.dir.as_fd()),
            if resizes.is_some() {
                TERMINAL_INSIDE
            } else {
                ""
            },
            &keep.record,
        );
    }
    if let Some((stdin, data)) = streams.stdin
        && let Ok(mut stdin) = pipe::Sender::from_owned_fd(stdin)
    {
        // A command that does not read its stdin closes the pipe: that is not an error.
        tokio::spawn(async move {
            let _ = stdin.write_all(&data).await;
        });
    }
    // The command's end and its output are awaited in this one task: no hand-off between
    // threads stands between the command's exit and the answer.
    let ended = CancellationToken::new();
    let cap = c.output_cap;
    let mut signals = c.signals;
    let run = async {
        let controls = Controls {
            signals: signals.as_mut(),
            resizes: resizes.as_mut(),
        };
        let (ending, empty) = until_end(
            &mut running,
            cgroup.as_ref(),
            Some(c.timeout),
            cancel,
            controls,
        )
        .await;
        let duration = start.elapsed();
        ended.cancel();
        let code = match ending {
            Ending::Exited(r) => Some(r),
            Ending::TimedOut | Ending::Cancelled => {
                running.reap().await;
                None
            }
        };
        (code, duration, empty)
    };
    // Most commands end within READ_GRACE: their output is read after, all at once. One that
    // runs longer has it read as it comes. (Nothing awaits `ended` until the command has
    // ended: a wake-up of this task by itself would hand it to another thread.)
    let (stdout_fd, stderr_fd) = (streams.stdout, streams.stderr);
    let ((code, duration, empty), (stdout, stdout_truncated), (stderr, stderr_truncated)) = {
        tokio::pin!(run);
        let early = tokio::select! {
            biased;
            r = &mut run => Some(r),
            () = tokio::time::sleep(READ_GRACE) => None,
        };
        match early {
            Some(r) => {
                let [out, err] = collect_after_end([stdout_fd, stderr_fd], cap, &ended).await;
                (r, out, err)
            }
            None => {
                tokio::join!(
                    run,
                    collect_running(stdout_fd, cap, &ended),
                    collect_running(stderr_fd, cap, &ended)
                )
            }
        }
    };
    if let Some(cg) = cgroup {
        put_back(cg, empty);
    }
    // The agent's connection serves the next command once this one has ended.
    if let (Some(Ok(_)), Running::Agent { conn, .. }) = (&code, running) {
        conn.recycle();
    }
    // The caller's descriptors: what is left of the output drained, then let go.
    if let Some(r) = relays {
        r.finish().await;
    }
    let timed_out = code.is_none() && !cancel.is_cancelled();
    let exit_code = match code {
        Some(r) => r?,
        None => -1,
    };
    Ok(ExecOutcome {
        exit_code,
        stdout,
        stderr,
        timed_out,
        stdout_truncated,
        stderr_truncated,
        duration,
    })
}

/// A kept process taken up after a restart: its end awaited on the kept connection to the
/// agent that started it, its signals delivered to its cgroup; cancelled, its cgroup is
/// killed. Whatever it left running when it ended is ended, as after any command.
pub(super) async fn resume(
    key: String,
    conn: AgentConnection,
    cgroup: Option<OwnedFd>,
    mut signals: Signals,
    mut resizes: Option<Resizes>,
    cancel: CancellationToken,
) -> Result<i32> {
    let cg = cgroup.and_then(|dir| {
        CommandCgroup::from_dir(dir)
            .inspect_err(|e| tracing::warn!("Cannot take up the cgroup of {key}: {e}"))
            .ok()
    });
    let mut running = Running::Agent {
        conn,
        workspace: &key,
    };
    let controls = Controls {
        signals: Some(&mut signals),
        resizes: resizes.as_mut(),
    };
    let (ending, empty) = until_end(&mut running, cg.as_ref(), None, &cancel, controls).await;
    let code = match ending {
        Ending::Exited(r) => r,
        Ending::TimedOut | Ending::Cancelled => {
            running.reap().await;
            Ok(-1)
        }
    };
    if let Some(cg) = cg {
        put_back(cg, empty);
    }
    code
}
