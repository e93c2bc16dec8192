//! agent-workspaces-mcp: the MCP server over stdio. An agent starts it from its MCP
//! configuration; it calls `org.agent.Workspaces` on the system bus as the agent's own user.
//! Standard output is the protocol's: logs go to the journal, or to standard error.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use rmcp::ServiceExt;

use agent_workspaces::cli::mcp::Args;
use agent_workspaces::mcp::{Bus, Caller, Policy, Section, Server, Shared, Transport, tools};
use agent_workspaces::system::logging;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = logging::init(args.log_target) {
        eprintln!("agent-workspaces-mcp: {e}");
        return ExitCode::from(78);
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("agent-workspaces-mcp: {e}");
            ExitCode::from(1)
        }
    }
}

/// The policy: the file's `[mcp]` section, with the command line over it.
fn policy(args: &Args) -> Result<Policy, String> {
    let file = Section::load(&args.config)?;
    let flags = Section {
        workspaces: (!args.workspaces.is_empty()).then(|| args.workspaces.clone()),
        allow_host: if args.containers_only {
            Some(false)
        } else {
            args.allow_host.then_some(true)
        },
        tools: (!args.tools.is_empty()).then(|| args.tools.clone()),
        max_timeout_secs: args.max_timeout_secs,
        max_output_bytes: args.max_output_bytes,
        tokens: None,
    };
    Policy::new(file.overridden_by(flags), Transport::Stdio, &tools::names())
}

async fn run(args: Args) -> Result<(), String> {
    let policy = policy(&args)?;
    let conn = agent_workspaces::dbus::client::connect(args.bus_address.as_deref())
        .await
        .map_err(|e| format!("cannot connect to the bus: {e}"))?;
    let shared = Arc::new(Shared {
        bus: Bus::new(conn, args.bus_address.clone()),
        policy,
        caller: Caller::this_process(),
        tokens: Vec::new(),
    });
    let service = Server::new(shared)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("MCP session: {e}"))?;
    service
        .waiting()
        .await
        .map_err(|e| format!("MCP session: {e}"))?;
    Ok(())
}
