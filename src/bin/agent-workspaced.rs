//! agent-workspaced: the agent-workspaces system service. Owns `org.agent.Workspaces` on the
//! system bus; run by systemd (`agent-workspaced.service`, bus-activatable).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use agent_workspaces::cli::daemon::{Args, Internal};
use libsystemd::daemon::{NotifyState, notify};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use zbus::fdo::{RequestNameFlags, RequestNameReply};

use agent_workspaces::core::messages;
use agent_workspaces::core::{Manager, Ports};
use agent_workspaces::dbus::{self, BUS_NAME};
use agent_workspaces::system::commands::cgroup::{CgroupTree, Containment};
use agent_workspaces::system::commands::host::HostExecutor;
use agent_workspaces::system::commands::host_agent::HostAgent;
use agent_workspaces::system::config::{Config, ContainmentMode};
use agent_workspaces::system::containers::{AGENT_FILE, NspawnContainers};
use agent_workspaces::system::library::FsLibrary;
use agent_workspaces::system::logging;
use agent_workspaces::system::network::Networks;
use agent_workspaces::system::store::{Dirs, FileStore};
use agent_workspaces::system::systemd::Systemd;

/// Exit code for a configuration error (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

fn fail(code: u8, message: String) -> ExitCode {
    error!("{message}");
    eprintln!("agent-workspaced: {message}");
    let _ = notify(false, &[NotifyState::Status(message)]);
    ExitCode::from(code)
}

fn notify_or_warn(states: &[NotifyState]) {
    if let Err(e) = notify(false, states) {
        warn!("Cannot notify systemd: {e}");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Internal::BuildTree { plan }) = &args.command {
        return ExitCode::from(agent_workspaces::system::containers::build::main(plan));
    }
    // What systemd kept for this service across its restart (background processes).
    agent_workspaces::system::commands::keep::init();
    if let Err(e) = logging::init(args.log_target) {
        eprintln!("agent-workspaced: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, format!("Bad configuration: {e}")),
    };
    match run(args, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, e),
    }
}

async fn run(args: Args, config: Config) -> Result<(), String> {
    // systemd may pass several directories separated by ':'; the first is ours.
    let state_dir = PathBuf::from(
        args.state_dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("/var/lib/agent-workspaces"),
    );
    let containment = match config.exec_containment {
        ContainmentMode::Cgroup => {
            let tree = CgroupTree::setup().map_err(|e| {
                format!(
                    "Cannot set up per-command cgroups: {e}. To run without them (weaker: a command that \
                     leaves its process group survives a timeout), set [exec] isolation = \"process-group\""
                )
            })?;
            Containment::Cgroup(tree.base().clone())
        }
        ContainmentMode::ProcessGroup => {
            warn!(
                "Commands run in process groups, not cgroups ([exec] isolation = \"process-group\")"
            );
            Containment::ProcessGroup
        }
    };
    if let Err(e) = agent_workspaces::system::commands::exec::raise_fd_limit() {
        warn!("Cannot raise the descriptor limit (commands at once are fewer): {e}");
    }
    let store = FileStore::open(state_dir.join("records")).map_err(|e| e.to_string())?;
    let conn = agent_workspaces::dbus::client::bus(args.bus_address.as_deref())
        .await
        .map_err(|e| format!("Cannot connect to the bus: {e}"))?;
    let systemd = Systemd::new(&conn)
        .await
        .map_err(|e| format!("Cannot reach systemd on the bus: {e}"))?;
    let program = std::env::current_exe().map_err(|e| format!("Cannot find this program: {e}"))?;
    let agent_program = program.with_file_name(AGENT_FILE);
    let containers = Arc::new(NspawnContainers::new(
        systemd.clone(),
        config.container.clone(),
        &state_dir,
        program,
        config.limits.exec.max_output_bytes,
        Arc::new(Networks::new(config.network.clone())),
    ));
    // Background processes of host workspaces run under the host agent (where they outlive a
    // restart of this service), when commands get cgroups at all.
    let host_executor = match &containment {
        Containment::Cgroup(_) => HostExecutor::new(containment)
            .with_host_agent(HostAgent::new(systemd.clone(), agent_program)),
        Containment::ProcessGroup => HostExecutor::new(containment),
    };
    let (events, receiver) = dbus::objects::EventQueue::new();
    let host_dir = config
        .host_workspace_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("host"));
    let manager = Arc::new(Manager::new(
        Ports {
            store: Arc::new(store),
            dirs: Arc::new(Dirs::new(state_dir.join("workspaces"))),
            executor: Arc::new(host_executor),
            containers: containers.clone(),
            library: Arc::new(FsLibrary::new(
                config
                    .library_path
                    .clone()
                    .unwrap_or_else(|| state_dir.join("library")),
            )),
            events: Arc::new(events.clone()),
        },
        host_dir,
        config.limits,
    ));
    manager.load().map_err(|e| e.to_string())?;
    manager.reconcile();
    manager.settle_frozen().await;
    manager.recover_processes();
    let error_data = dbus::ErrorData::kept(state_dir.join("error-data.json"), &conn)
        .await
        .map_err(|e| format!("Cannot ask the bus for its id: {e}"))?;
    dbus::serve(&conn, manager.clone(), events, receiver, error_data)
        .await
        .map_err(|e| format!("Cannot serve the D-Bus objects: {e}"))?;
    match conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => {}
        Ok(reply) => {
            return Err(format!(
                "Cannot own {BUS_NAME}: {reply:?} (another instance runs)"
            ));
        }
        Err(e) => return Err(format!("Cannot own {BUS_NAME}: {e}")),
    }
    info!(
        message_id = messages::SERVICE_STARTED,
        "agent-workspaced {} serving {BUS_NAME} with {} workspaces",
        env!("CARGO_PKG_VERSION"),
        manager.list().len()
    );
    notify_or_warn(&[
        NotifyState::Ready,
        NotifyState::Status(format!("Serving {BUS_NAME}")),
    ]);
    // Said once, at start: without copy-on-write trees every create costs a whole unpack.
    let probing = containers.clone();
    tokio::task::spawn_blocking(move || {
        if let Some(reason) = probing.probe_copy_on_write() {
            let fix = agent_workspaces::system::containers::layer::COPY_ON_WRITE_FIX;
            warn!(
                message_id = messages::COPY_ON_WRITE_OFF,
                reason = reason.as_str(),
                fix,
                "Copy-on-write container trees are off: {reason}. Every create unpacks the whole \
                 base (about a second, instead of a twentieth). To turn them on, {fix}"
            );
        }
    });

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&args.config, &config, &manager, &containers),
        }
    }

    notify_or_warn(&[NotifyState::Stopping]);
    info!("Stopping: releasing {BUS_NAME} and ending running commands");
    if let Err(e) = conn.release_name(BUS_NAME).await {
        warn!("Cannot release {BUS_NAME}: {e}");
    }
    manager.shutdown();
    // Give cancelled calls a moment to send their replies before the connection closes.
    for _ in 0..100 {
        if manager.running_execs() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

/// `SIGHUP` (`systemctl reload`): applies every setting that can change while the service
/// runs (the [exec] limits, the container build settings and the distros); names the changed
/// ones that only a restart applies.
fn reload(
    path: &std::path::Path,
    started_with: &Config,
    manager: &Manager,
    containers: &NspawnContainers,
) {
    notify_or_warn(&[NotifyState::Reloading]);
    match Config::load(path) {
        Ok(new) => {
            manager.set_limits(new.limits);
            let mut later = containers.reload(&new.container);
            for (name, changed) in [
                (
                    "host_workspace_dir",
                    new.host_workspace_dir != started_with.host_workspace_dir,
                ),
                (
                    "library_path",
                    new.library_path != started_with.library_path,
                ),
                (
                    "exec.isolation",
                    new.exec_containment != started_with.exec_containment,
                ),
            ] {
                if changed {
                    later.push(name);
                }
            }
            if !later.is_empty() {
                warn!(
                    "{} changed in {}: that takes effect at the next restart (systemctl restart agent-workspaced)",
                    later.join(", "),
                    path.display()
                );
            }
            info!(
                message_id = messages::CONFIG_RELOADED,
                "Reloaded {}",
                path.display()
            );
        }
        Err(e) => error!("Reload failed, keeping the previous configuration: {e}"),
    }
    notify_or_warn(&[NotifyState::Ready]);
}
