//! agent-workspaces-http: the REST bridge. Serves `/api/...` over HTTP and calls
//! `org.agent.Workspaces` on the system bus. Socket-activated by
//! `agent-workspaces-http.socket`, or `--listen ADDR` by hand. Refuses to start without a token.

use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use agent_workspaces::cli::http::Args;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use agent_workspaces::http::{AppState, PortLimits, PortProxy, serve};
use agent_workspaces::mcp;
use agent_workspaces::system::logging;
use std::time::Duration;

fn token(args: &Args) -> Result<String, String> {
    let path = match &args.token_file {
        Some(p) => p.clone(),
        None => std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|d| PathBuf::from(d).join("api-token"))
            .ok_or(
                "no API token: pass --token-file, or run under systemd with \
                    LoadCredential=api-token:/etc/agent-workspaces/api-token",
            )?,
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the API token {}: {e}", path.display()))?;
    let token = text.trim().to_owned();
    if token.len() < 16 {
        return Err(format!(
            "the API token in {} is shorter than 16 characters; refusing to run with it",
            path.display()
        ));
    }
    Ok(token)
}

fn listener(args: &Args) -> Result<std::net::TcpListener, String> {
    if let Some(addr) = args.listen {
        return std::net::TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen on {addr}: {e}"));
    }
    let fds = libsystemd::activation::receive_descriptors(true)
        .map_err(|e| format!("no socket from systemd and no --listen: {e}"))?;
    let fd = fds
        .into_iter()
        .next()
        .ok_or("no socket from systemd and no --listen")?;
    // SAFETY: systemd passed this descriptor to us, and nothing else owns it.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(fd.into_raw_fd()) })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = logging::init(args.log_target) {
        eprintln!("agent-workspaces-http: {e}");
        return ExitCode::from(78);
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("agent-workspaces-http: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let token = token(&args)?;
    let std_listener = listener(&args)?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
    let conn = agent_workspaces::dbus::client::connect(args.bus_address.as_deref())
        .await
        .map_err(|e| format!("cannot connect to the bus: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!("agent-workspaces-http serving on {local}");
    let _ = libsystemd::daemon::notify(false, &[libsystemd::daemon::NotifyState::Ready]);
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let shutdown = async move {
        let _ = term.recv().await;
    };
    let bus_address = args.bus_address.clone();
    let mcp = if args.no_mcp {
        None
    } else {
        let section = mcp::Section::load(&args.config)?;
        let known = mcp::tools::names();
        let tokens = mcp::policy::http_tokens(&section, &known)
            .map_err(|e| format!("{}: {e}", args.config.display()))?;
        let policy = mcp::Policy::new(section, mcp::Transport::Http, &known)
            .map_err(|e| format!("{}: [mcp]: {e}", args.config.display()))?;
        Some(Arc::new(mcp::Shared {
            bus: mcp::Bus::new(conn.clone(), bus_address.clone()),
            policy,
            caller: mcp::Caller::Token(agent_workspaces::http::TOKEN_NAME.into()),
            tokens,
        }))
    };
    let state = AppState {
        mcp,
        conn,
        bus_address,
        token,
        ports: PortProxy::new(PortLimits {
            connect: Duration::from_secs(args.port_connect_timeout),
            first_byte: Duration::from_secs(args.port_response_timeout),
            idle: Duration::from_secs(args.port_idle_timeout),
            per_workspace: args.port_connections_per_workspace,
            keep: Duration::from_secs(args.port_keep),
        }),
    };
    let state = Arc::new(state);
    tokio::spawn(agent_workspaces::http::cut_kept_on_status_changes(
        state.clone(),
    ));
    serve(listener, state, shutdown)
        .await
        .map_err(|e| e.to_string())
}
