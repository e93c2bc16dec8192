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
use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

use super::agent::AgentConnection;
use super::cgroup::{CommandCgroup, Containment};
use super::output::{DRAIN, READ_GRACE, collect_after_end, collect_running};
use crate::core::error::{Error, Result};
use crate::core::ports::{
    Attachment, ExecIo, ExecOutcome, ExecRequest, Executor, ProcessStreams, Signals, WindowSize,
};

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

pub struct HostExecutor {
    containment: Containment,
}

impl HostExecutor {
    pub fn new(containment: Containment) -> Self {
        Self { containment }
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
}

/// A started command.
enum Running<'a> {
    Here(super::spawn::Spawned),
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

/// Starts the command with the given ends of its streams, in the cgroup whose `cgroup.procs`
/// is open as `procs`.
async fn launch<'a>(
    launch: Launch<'a>,
    child: [OwnedFd; 3],
    procs: Option<&OwnedFd>,
) -> Result<Running<'a>> {
    match launch {
        Launch::Here {
            command,
            env,
            dir,
            terminal,
        } => {
            let [stdin, stdout, stderr] = &child;
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
                terminal,
                nofile_soft: CHILD_NOFILE_SOFT.load(Ordering::Relaxed),
            })
            .and_then(super::spawn::watch);
            // The command has its own copies of its descriptors now; close the service's.
            drop(child);
            spawned
                .map(Running::Here)
                .map_err(|e| Error::JobFailed(format!("Cannot start {shell}: {e}")))
        }
        Launch::Agent {
            mut conn,
            request,
            workspace,
        } => {
            let lost = |e: io::Error| {
                Error::JobFailed(format!(
                    "Cannot run the command through the agent of workspace '{workspace}': {e}"
                ))
            };
            {
                let mut fds: Vec<BorrowedFd<'_>> = child.iter().map(|f| f.as_fd()).collect();
                fds.extend(procs.map(|p| p.as_fd()));
                conn.send(&request, &fds).await.map_err(lost)?;
            }
            drop(child);
            // The agent answers as soon as it has forked; whatever sits at its socket instead
            // gets no longer than this.
            let first = tokio::time::timeout(DRAIN, conn.reply())
                .await
                .map_err(|_| lost(io::Error::new(io::ErrorKind::TimedOut, "no answer")))?;
            match first.map_err(lost)? {
                Some(Reply::Started { .. }) => Ok(Running::Agent { conn, workspace }),
                Some(Reply::Refused {
                    reason: RefuseReason::Cwd,
                    message,
                }) => Err(Error::invalid("cwd", message)),
                Some(Reply::Refused { message, .. }) => Err(Error::JobFailed(format!(
                    "The agent of workspace '{workspace}' could not start the command: {message}"
                ))),
                Some(other) => Err(lost(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected reply {other:?}"),
                ))),
                None => Err(lost(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }
}

/// Runs a command to its end, its timeout or `cancel`, reading its output as it comes; then
/// ends every process it left in its cgroup (or process group).
pub async fn run_contained(
    c: Command<'_>,
    containment: &Containment,
    cancel: &CancellationToken,
) -> Result<ExecOutcome> {
    let streams = super::pipes::streams(c.io)
        .map_err(|e| Error::JobFailed(format!("Cannot make the command's pipes: {e}")))?;
    let cgroup = match containment {
        Containment::Cgroup(parent) => Some(CommandCgroup::create(parent).map_err(|e| {
            Error::JobFailed(format!(
                "Cannot create a cgroup for the command below {}: {e}",
                parent.display()
            ))
        })?),
        Containment::ProcessGroup => None,
    };
    let start = Instant::now();
    let mut running =
        match launch(c.launch, streams.child, cgroup.as_ref().map(|cg| &cg.procs)).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.kill();
                    cg.remove().await;
                }
                return Err(e);
            }
        };
    let pid = running.pid();
    if let Some((stdin, data)) = streams.stdin {
        if let Ok(mut stdin) = pipe::Sender::from_owned_fd(stdin) {
            // A command that does not read its stdin closes the pipe: that is not an error.
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
            });
        }
    }
    // The command's end and its output are awaited in this one task: no hand-off between
    // threads stands between the command's exit and the answer.
    let ended = CancellationToken::new();
    let cap = c.output_cap;
    let mut signals = c.signals;
    let run = async {
        let timeout = tokio::time::sleep(c.timeout);
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
                } => match &cgroup {
                    Some(cg) => cg.signal(sig),
                    None => {
                        if let (Some(pid), Ok(sig)) = (pid, nix::sys::signal::Signal::try_from(sig)) {
                            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
                        }
                    }
                },
            }
        };
        let duration = start.elapsed();
        // End everything the command left running; its pipes then reach end of file.
        let mut empty = false;
        match &cgroup {
            Some(cg) => match ending {
                Ending::Exited(_) => empty = cg.kill_leftovers(),
                Ending::TimedOut | Ending::Cancelled => cg.kill(),
            },
            None => {
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
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
    match cgroup {
        // Empty, as after most commands: kept for the next one at once.
        Some(cg) if empty => cg.keep(),
        // Being emptied by cgroup.kill: kept or removed once it is, after the answer.
        Some(cg) => drop(tokio::spawn(cg.release())),
        None => {}
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

#[async_trait]
impl Executor for HostExecutor {
    fn process_streams(&self, terminal: Option<WindowSize>) -> Result<ProcessStreams> {
        super::pipes::process_streams(terminal)
            .map_err(|e| Error::io("Cannot make the pipes or terminal of a process", e))
    }

    fn attachment(&self) -> Result<Attachment> {
        super::pipes::attachment().map_err(|e| Error::io("Cannot make a socket pair", e))
    }

    async fn connect_port(&self, port: u16) -> Result<OwnedFd> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let failed = |e: io::Error| {
            Error::JobFailed(format!("Cannot connect to port {port} on the host: {e}"))
        };
        let tcp =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| failed(io::ErrorKind::TimedOut.into()))?
                .map_err(failed)?
                .into_std()
                .map_err(failed)?;
        // Handed to a caller, which expects a plain (blocking) descriptor.
        tcp.set_nonblocking(false).map_err(failed)?;
        Ok(tcp.into())
    }

    async fn run(&self, req: ExecRequest, cancel: CancellationToken) -> Result<ExecOutcome> {
        let dir = agent_proto::spawn::WorkDir::open(&req.cwd).map_err(|e| {
            Error::invalid(
                "cwd",
                format!("{} is not a usable directory: {e}", req.cwd.display()),
            )
        })?;
        let command = Command {
            launch: Launch::Here {
                command: &req.command,
                env: &req.env,
                dir: &dir,
                terminal: req.terminal,
            },
            io: req.io,
            timeout: req.timeout,
            output_cap: req.output_cap,
            signals: req.signals,
        };
        run_contained(command, &self.containment, &cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fs;

    fn req(cmd: &str) -> ExecRequest {
        ExecRequest {
            workspace_id: "t".into(),
            command: cmd.into(),
            env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
            cwd: std::env::temp_dir(),
            io: ExecIo::default(),
            timeout: Duration::from_secs(10),
            output_cap: 1024 * 1024,
            signals: None,
            terminal: false,
        }
    }

    async fn run(r: ExecRequest) -> ExecOutcome {
        HostExecutor::new(Containment::ProcessGroup)
            .run(r, CancellationToken::new())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn separates_streams_and_keeps_exit_code() {
        let o = run(req("printf out; printf err >&2; exit 7")).await;
        assert_eq!(
            (o.exit_code, &o.stdout[..], &o.stderr[..]),
            (7, &b"out"[..], &b"err"[..])
        );
        assert!(!o.timed_out);
    }

    #[tokio::test]
    async fn a_command_starts_with_no_signal_ignored_or_blocked() {
        // The service ignores SIGPIPE and handles others; the command starts as after a plain
        // exec: `yes | head -1` ends, and nothing is ignored or blocked.
        let o = run(req(
            "yes | head -1; grep -E '^Sig(Ign|Blk):' /proc/self/status | tr -d ' \\t'",
        ))
        .await;
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "y\nSigBlk:0000000000000000\nSigIgn:0000000000000000\n"
        );
    }

    #[tokio::test]
    async fn signal_death_is_128_plus_n() {
        assert_eq!(run(req("kill -TERM $$")).await.exit_code, 128 + 15);
    }

    #[tokio::test]
    async fn delivers_stdin_env_and_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = req("cat; echo \"$GREETING\"; pwd");
        r.io = ExecIo::Collect {
            stdin: b"from stdin\n".to_vec(),
        };
        r.env.insert("GREETING".into(), "hello".into());
        r.cwd = dir.path().to_path_buf();
        let o = run(r).await;
        let want = format!("from stdin\nhello\n{}\n", dir.path().display());
        assert_eq!(String::from_utf8_lossy(&o.stdout), want);
    }

    #[tokio::test]
    async fn no_input_is_end_of_file_at_once() {
        let mut r = req("cat; echo end");
        r.timeout = Duration::from_secs(5);
        let o = run(r).await;
        assert!(!o.timed_out, "cat waited for input that never comes");
        assert_eq!(o.stdout, b"end\n");
    }

    #[tokio::test]
    async fn passed_descriptors_are_the_commands_own_streams_live() {
        use std::io::{BufRead, BufReader, Read, Write};
        let pipe = || {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            (fs::File::from(r), fs::File::from(w))
        };
        let (stdin_r, mut stdin_w) = pipe();
        let (stdout_r, stdout_w) = pipe();
        let (mut stderr_r, stderr_w) = pipe();
        let mut r = req("echo first; read line; echo \"got $line\" >&2; exit 4");
        r.io = ExecIo::Pass {
            stdin: stdin_r.into(),
            stdout: stdout_w.into(),
            stderr: stderr_w.into(),
        };
        let task = tokio::spawn(run(r));
        // The first line arrives while the command still waits for its input: it is live.
        let mut out = tokio::task::spawn_blocking(move || {
            let mut out = BufReader::new(stdout_r);
            let mut first = String::new();
            out.read_line(&mut first).unwrap();
            assert_eq!(first, "first\n");
            out
        })
        .await
        .unwrap();
        stdin_w.write_all(b"go\n").unwrap();
        drop(stdin_w);
        let o = task.await.unwrap();
        assert_eq!(o.exit_code, 4);
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "stdout ends with the command");
        assert!(o.stdout.is_empty() && o.stderr.is_empty());
        let mut err = String::new();
        stderr_r.read_to_string(&mut err).unwrap();
        assert_eq!(err, "got go\n");
    }

    #[tokio::test]
    async fn large_output_does_not_block_and_is_capped() {
        let mut r = req("head -c 3000000 /dev/zero; echo done >&2");
        r.output_cap = 1000;
        let o = run(r).await;
        assert_eq!(o.exit_code, 0);
        assert_eq!(o.stdout.len(), 1000);
        assert!(o.stdout_truncated && !o.stderr_truncated);
        assert_eq!(o.stderr, b"done\n");
    }

    #[tokio::test]
    async fn timeout_keeps_output_and_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pid");
        let mut r = req(&format!(
            "sleep 1000 & echo $! > {}; echo started; wait",
            marker.display()
        ));
        r.timeout = Duration::from_millis(300);
        let o = run(r).await;
        assert!(o.timed_out);
        assert_eq!(o.exit_code, -1);
        assert_eq!(o.stdout, b"started\n");
        let pid: i32 = fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
        // The grandchild was killed; give the kernel a moment to reap it (it is reparented).
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.is_empty() || stat.split(' ').nth(2) == Some("Z")
        });
        assert!(gone, "sleep 1000 (pid {pid}) survived the timeout");
    }

    #[tokio::test]
    async fn cancel_ends_the_command() {
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            t.cancel();
        });
        let started = Instant::now();
        let o = HostExecutor::new(Containment::ProcessGroup)
            .run(req("sleep 30"), token)
            .await
            .unwrap();
        assert!(!o.timed_out && o.exit_code == -1);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn missing_cwd_is_invalid_args() {
        let mut r = req("true");
        r.cwd = "/nonexistent/dir".into();
        let e = HostExecutor::new(Containment::ProcessGroup)
            .run(r, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(e, e @ Error::InvalidArgs { .. } if e.to_string().contains("'cwd'")));
    }
}
