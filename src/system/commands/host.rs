//! `HostExecutor`, the `Executor` port: host workspaces' commands (started by the service
//! itself, `exec.rs`), background processes (by the host agent where they are kept across a
//! restart, `host_agent.rs`), the streams of processes, attachments and host ports.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::core::error::{Error, Result};
use crate::core::ports::{
    Attachment, ExecOutcome, ExecRequest, Executor, ProcessStreams, WindowSize,
};
use crate::system::commands::cgroup::Containment;
use crate::system::commands::exec::{
    Command, Launch, agent_request, agent_terminal, run_contained,
};
use agent_workspaces_agent as agent_proto;

pub struct HostExecutor {
    containment: Containment,
    /// Starts the background processes kept across a restart (`host_agent.rs`); none where
    /// nothing is kept.
    host_agent: Option<crate::system::commands::host_agent::HostAgent>,
}

impl HostExecutor {
    pub fn new(containment: Containment) -> Self {
        Self {
            containment,
            host_agent: None,
        }
    }

    /// Background processes of host workspaces started by the host agent, and every
    /// background process kept across a restart (with systemd's descriptor store).
    pub fn with_host_agent(
        mut self,
        agent: crate::system::commands::host_agent::HostAgent,
    ) -> Self {
        if crate::system::commands::keep::keeper().enabled() {
            self.host_agent = Some(agent);
        }
        self
    }
}

#[async_trait]
impl Executor for HostExecutor {
    fn process_streams(
        &self,
        terminal: Option<WindowSize>,
        keep: Option<&str>,
        container: bool,
    ) -> Result<ProcessStreams> {
        let keeper = crate::system::commands::keep::keeper();
        let prepare = |output: BorrowedFd<'_>,
                       input: Option<BorrowedFd<'_>>,
                       hold: BorrowedFd<'_>| match keep {
            Some(key) => keeper.prepare(key, output, input, hold),
            None => Ok(()),
        };
        crate::system::commands::pipes::process_streams(terminal, container, prepare)
            .map_err(|e| Error::io("Cannot make the pipes or terminal of a process", e))
    }

    fn keeps_processes(&self) -> bool {
        self.host_agent.is_some()
    }

    fn keep_output(&self, key: &str, output: &[u8]) {
        crate::system::commands::keep::keeper().keep_stopping(key, output);
    }

    fn keep_finished(&self, key: &str, record: &[u8], output: &[u8]) {
        crate::system::commands::keep::keeper().keep_finished(key, record, output);
    }

    fn forget_kept_input(&self, key: &str) {
        crate::system::commands::keep::keeper().forget_input(key);
    }

    fn forget_kept(&self, key: &str) {
        crate::system::commands::keep::keeper().forget(key);
    }

    fn kept_processes(&self) -> Vec<crate::core::ports::KeptProcess> {
        let (kept, claimed) = crate::system::commands::kept::kept_processes();
        if self.host_agent.is_some() {
            crate::system::commands::host_agent::end_unclaimed(&claimed);
        }
        kept
    }

    fn attachment(&self) -> Result<Attachment> {
        crate::system::commands::pipes::attachment()
            .map_err(|e| Error::io("Cannot make a socket pair", e))
    }

    async fn files(
        &self,
        workspace: &str,
        call: crate::core::files::FileCall,
        cancel: CancellationToken,
    ) -> Result<crate::core::files::FileOutcome> {
        let conn = super::files::local(call.req.op)?;
        super::files::call(conn, call, workspace, &cancel).await
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
        if let (Some(agent), Some(_)) = (&self.host_agent, &req.keep) {
            let (parent, conn) = agent.connect().await?;
            let command = Command {
                launch: Launch::Agent {
                    conn,
                    request: agent_request(
                        req.command,
                        &req.cwd,
                        req.env,
                        agent_terminal(req.terminal, &req.io),
                    ),
                    workspace: &req.workspace_id,
                },
                io: req.io,
                timeout: req.timeout,
                output_cap: req.output_cap,
                signals: req.signals,
                keep: req.keep,
            };
            return run_contained(command, &Containment::Cgroup(parent), &cancel).await;
        }
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
            keep: None,
        };
        run_contained(command, &self.containment, &cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ports::ExecIo;
    use std::collections::BTreeMap;
    use std::fs;
    use std::time::Instant;

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
            keep: None,
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
        r.io = ExecIo::Lend {
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
