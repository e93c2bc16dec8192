//! Commands in a running container: one started through its agent (the container started
//! again first when its agent is gone), and what tells an ending container.

use super::*;

impl NspawnContainers {
    /// Runs one command through the agent, restarting a container whose agent is gone
    /// first; the leader it used, and the outcome.
    pub(super) async fn exec_once(
        &self,
        ws: &Workspace,
        req: ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<(Arc<Leader>, Result<ExecOutcome>)> {
        let (leader, conn) = self.agent_of(ws).await?;
        // The working directory is resolved by the agent, inside the container.
        let terminal = agent_terminal(req.terminal, &req.io);
        let request = agent_request(req.command, &req.cwd, req.env, terminal);
        let command = Command {
            launch: Launch::Agent {
                conn,
                request,
                workspace: &ws.name,
            },
            io: req.io,
            timeout: req.timeout,
            output_cap: req.output_cap,
            signals: req.signals,
            keep: req.keep,
        };
        let containment = Containment::Cgroup(leader.payload.clone());
        let outcome = run_contained(command, &containment, cancel).await;
        Ok((leader, outcome))
    }
}

impl NspawnContainers {
    /// The running container's leader and a connection to its agent; a container whose agent
    /// is gone (killed, crashed: no one listens on its socket) is started again first, once,
    /// and that is logged.
    pub(super) async fn agent_of(&self, ws: &Workspace) -> Result<(Arc<Leader>, AgentConnection)> {
        let mut leader = self.leader(ws).await?;
        let not_answering = |e: std::io::Error| {
            Error::JobFailed(format!(
                "The agent of workspace '{}' does not answer: {e} (StopWorkspace and StartWorkspace restart it)",
                ws.name
            ))
        };
        let conn = match agent_connection(&leader).await {
            Ok(conn) => conn,
            Err(e) if agent_gone(&e) => {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "The agent of workspace {} is gone ({e}); restarting its container", ws.name);
                self.stop(ws).await?;
                leader = self.leader(ws).await?;
                agent_connection(&leader).await.map_err(not_answering)?
            }
            Err(e) => return Err(not_answering(e)),
        };
        Ok((leader, conn))
    }
}

/// A connection to the agent of the container whose leader this is.
pub(super) async fn agent_connection(leader: &Leader) -> std::io::Result<AgentConnection> {
    AgentConnection::connect(leader.agent()?).await
}

/// Whether a container's leader ends within a second (a command that could not be started
/// met a container that was ending).
pub(super) async fn ended(leader: &Leader) -> bool {
    for _ in 0..50 {
        if !leader.alive() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Whether connecting to an agent failed because nothing listens there any more (its
/// process or its whole container ended), rather than because of what is at its path.
pub(super) fn agent_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::ENOENT | libc::ESRCH)
    )
}

impl NspawnContainers {
    /// `Containers::exec`.
    pub(super) async fn exec_retried(
        &self,
        ws: &Workspace,
        req: ExecRequest,
        cancel: CancellationToken,
    ) -> Result<ExecOutcome> {
        // A plain exec (its stdin bytes in, its output collected) that could not be started
        // because the container was ending just then (its agent killed while a connection to
        // it still looked open) is started once more, in the container started afresh:
        // nothing of it ran. (Kept for the retry: a copy of the request, so not for a large
        // stdin, which every exec would pay for.)
        let again = match (&req.io, &req.signals, &req.keep) {
            (ExecIo::Collect { stdin }, None, None) if stdin.len() <= RETRY_STDIN_MAX => {
                Some(ExecRequest {
                    workspace_id: req.workspace_id.clone(),
                    command: req.command.clone(),
                    env: req.env.clone(),
                    cwd: req.cwd.clone(),
                    io: ExecIo::Collect {
                        stdin: stdin.clone(),
                    },
                    timeout: req.timeout,
                    output_cap: req.output_cap,
                    signals: None,
                    terminal: req.terminal,
                    keep: None,
                })
            }
            _ => None,
        };
        let (leader, outcome) = self.exec_once(ws, req, &cancel).await?;
        match (outcome, again) {
            (Err(Error::JobFailed(why)), Some(again))
                if why.starts_with(NOT_STARTED) && ended(&leader).await =>
            {
                warn!(workspace_id = %ws.id, workspace_name = %ws.name,
                      "The container of workspace {} ended as a command was started ({why}); starting both again", ws.name);
                self.stop(ws).await?;
                self.exec_once(ws, again, &cancel).await?.1
            }
            (outcome, _) => outcome,
        }
    }
}
