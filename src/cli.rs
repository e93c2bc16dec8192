//! The command lines of the four programs, defined once: the programs parse them, and
//! `examples/docs.rs` (`make docs`) renders their manual pages and `workspacectl`'s shell
//! completions from the same definitions.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::system::{config, logging};

/// agent-workspaced(8).
pub mod daemon {
    use super::*;

    #[derive(Parser)]
    #[command(
        name = "agent-workspaced",
        version,
        about = "The agent-workspaces system service (org.agent.Workspaces)",
        long_about = "The agent-workspaces system service. It owns org.agent.Workspaces on the \
            system bus and gives AI agents places to work: host workspaces, where commands run \
            directly on this machine, and container workspaces, isolated trees run with \
            systemd-nspawn in a user namespace of their own and registered with \
            systemd-machined. Callers are authorized with polkit; logs go to the journal with \
            WORKSPACE_ID= and WORKSPACE_NAME= fields.\n\n\
            It is started by systemd (agent-workspaced.service), on first use through D-Bus \
            activation. Files: /etc/agent-workspaces/config.toml (configuration; \
            `systemctl reload agent-workspaced` rereads it), /var/lib/agent-workspaces \
            (records, host workspaces, the Library), /var/lib/machines (container trees), \
            /var/cache/agent-workspaces (base trees), /var/log/agent-workspaces (init logs). \
            See also workspacectl(1), agent-workspaces-http(8), machinectl(1), polkit(8)."
    )]
    pub struct Args {
        /// Configuration file; a missing file means every default.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        pub config: PathBuf,
        /// State directory (records, host workspaces). systemd passes it as $STATE_DIRECTORY.
        #[arg(
            long,
            env = "STATE_DIRECTORY",
            default_value = "/var/lib/agent-workspaces"
        )]
        pub state_dir: PathBuf,
        /// D-Bus address to serve on instead of the system bus.
        #[arg(long)]
        pub bus_address: Option<String>,
        /// Where logs go.
        #[arg(long, value_enum, default_value = "auto")]
        pub log_target: logging::Target,
        #[command(subcommand)]
        pub command: Option<Internal>,
    }

    /// Not for users: what the service's own transient units run.
    #[derive(Subcommand)]
    pub enum Internal {
        /// Build a container tree from a build plan (run by agent-workspace-build@NAME.service).
        #[command(hide = true)]
        BuildTree { plan: PathBuf },
    }
}

/// agent-workspaces-http(8).
pub mod http {
    use super::*;

    #[derive(Parser)]
    #[command(
        name = "agent-workspaces-http",
        version,
        about = "REST bridge for org.agent.Workspaces",
        long_about = "The REST bridge of agent-workspaces: serves /api/... over HTTP/1.1 and \
            calls org.agent.Workspaces on the system bus as its own user, which polkit \
            authorizes; it decides nothing itself. Every request needs \
            `Authorization: Bearer TOKEN`; without a token it refuses to start. It also serves \
            the dashboard at / and the OpenAPI document at /api/openapi.json.\n\n\
            Normally socket-activated by agent-workspaces-http.socket (127.0.0.1:7600) with the \
            token from /etc/agent-workspaces/api-token as the systemd credential api-token. \
            See also agent-workspaced(8), workspacectl(1)."
    )]
    pub struct Args {
        /// Listen here instead of on the socket systemd passes (e.g. 127.0.0.1:7600).
        #[arg(long)]
        pub listen: Option<SocketAddr>,
        /// File holding the API token (default: the systemd credential `api-token`).
        #[arg(long)]
        pub token_file: Option<PathBuf>,
        /// D-Bus address of the service's bus instead of the system bus.
        #[arg(long)]
        pub bus_address: Option<String>,
        /// Where logs go.
        #[arg(long, value_enum, default_value = "auto")]
        pub log_target: logging::Target,
        /// Port proxy: seconds to reach a port in a workspace (then 504).
        #[arg(long, env = "AGENT_WORKSPACES_PORT_CONNECT_TIMEOUT", value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        pub port_connect_timeout: u64,
        /// Port proxy: seconds for the request to be sent on and the server in the workspace to
        /// begin its answer (then 504).
        #[arg(long, env = "AGENT_WORKSPACES_PORT_RESPONSE_TIMEOUT", value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
        pub port_response_timeout: u64,
        /// Port proxy: seconds a connection (an answer's body, a WebSocket) may pass with nothing
        /// sent either way before it is closed.
        #[arg(long, env = "AGENT_WORKSPACES_PORT_IDLE_TIMEOUT", value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
        pub port_idle_timeout: u64,
        /// Port proxy: connections open at once to the ports of one workspace (then 429).
        #[arg(long, env = "AGENT_WORKSPACES_PORT_CONNECTIONS_PER_WORKSPACE", value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100000))]
        pub port_connections_per_workspace: u64,
        /// Port proxy: seconds a connection to a port, its answer read, is kept for a next
        /// request (at most 8 per workspace; 0: a new connection for each request). Below the
        /// keep-alive of common dev servers (Node's is 5 s).
        #[arg(long, env = "AGENT_WORKSPACES_PORT_KEEP", value_name = "SECONDS", default_value_t = 4, value_parser = clap::value_parser!(u64).range(0..=3600))]
        pub port_keep: u64,
        /// Configuration file: its [mcp] section limits the MCP server at /mcp (which serves
        /// container workspaces only unless it says allow_host = true).
        #[arg(long, default_value = config::DEFAULT_PATH)]
        pub config: PathBuf,
        /// Do not serve MCP at /mcp.
        #[arg(long)]
        pub no_mcp: bool,
    }
}

/// agent-workspaces-mcp(1).
pub mod mcp {
    use super::*;

    #[derive(Parser)]
    #[command(
        name = "agent-workspaces-mcp",
        version,
        about = "MCP server for agent workspaces, over stdio",
        long_about = "An MCP (Model Context Protocol) server that gives an AI agent tools to use \
            agent workspaces: list, create and destroy them, run commands, start background \
            processes, read and write files, snapshot, fork, pause and resume; and resources \
            (workspaces://list, workspace://NAME, workspace://NAME/init-log, \
            workspace://NAME/debug) with change notifications. An agent starts it from its MCP \
            configuration and speaks MCP on its standard input and output. It is a client of \
            org.agent.Workspaces on the system bus as the user it runs as, whom polkit \
            authorizes; the options below narrow what it may touch further (they override the \
            [mcp] section of the configuration file key by key). Every tool call is logged to \
            the journal with MCP_TOOL=, WORKSPACE_NAME=, CALLER_UID= and OUTCOME=.\n\n\
            The REST bridge serves the same tools over Streamable HTTP at /mcp. See also \
            agent-workspaces-http(8), workspacectl(1)."
    )]
    pub struct Args {
        /// Only this workspace (repeat for more): listed, reachable, and the only names
        /// create_workspace and fork_workspace may use.
        #[arg(long = "workspace", value_name = "NAME")]
        pub workspaces: Vec<String>,
        /// Container workspaces only: host workspaces (no isolation) are neither listed nor
        /// reachable, and create_workspace makes containers.
        #[arg(long, conflicts_with = "allow_host")]
        pub containers_only: bool,
        /// Host workspaces are reachable (the default over stdio, unless [mcp] allow_host =
        /// false).
        #[arg(long)]
        pub allow_host: bool,
        /// Only these tools (comma-separated names, e.g. exec,read_file,write_file).
        #[arg(long, value_delimiter = ',', value_name = "TOOLS")]
        pub tools: Vec<String>,
        /// Largest timeout one exec may ask, and the timeout of one that asks none.
        #[arg(long, value_name = "SECONDS")]
        pub max_timeout_secs: Option<u32>,
        /// Largest output (bytes per stream) one call may ask; what is longer comes back as its
        /// head and tail with a note.
        #[arg(long, value_name = "BYTES")]
        pub max_output_bytes: Option<u32>,
        /// Configuration file whose [mcp] section sets the defaults of these options.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        pub config: PathBuf,
        /// D-Bus address of the service's bus instead of the system bus.
        #[arg(long)]
        pub bus_address: Option<String>,
        /// Where logs (the audit of each tool call) go; never standard output.
        #[arg(long, value_enum, default_value = "auto")]
        pub log_target: logging::Target,
    }
}

/// workspacectl(1).
pub mod workspacectl {
    use super::*;

    #[derive(Parser)]
    #[command(
        name = "workspacectl",
        version,
        about = "Manage agent workspaces (org.agent.Workspaces)",
        long_about = "Manage agent workspaces: a client of the agent-workspaces service \
            (org.agent.Workspaces on the system bus), as machinectl is of systemd-machined. \
            WORKSPACE is a workspace's name or id. Calls allow interactive authorization, so \
            polkit may ask for a password. `exec` passes its own standard input, output and \
            error to the command, so output is live, and exits with the command's exit code \
            (124 on timeout).\n\nSee also agent-workspaced(8), agent-workspaces-http(8)."
    )]
    pub struct Cli {
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        pub json: bool,
        /// D-Bus address instead of the system bus.
        #[arg(long, global = true)]
        pub bus_address: Option<String>,
        #[command(subcommand)]
        pub command: Command,
    }

    #[derive(Subcommand)]
    pub enum Command {
        /// List workspaces.
        List,
        /// Show a workspace's properties.
        Status { workspace: String },
        /// Create a workspace.
        Create {
            /// The workspace's name: 1-63 of a-z, 0-9 and '-'.
            name: Option<String>,
            /// host (default) or container.
            #[arg(long = "type")]
            workspace_type: Option<String>,
            /// The container's distribution.
            #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::core::workspace::Distro::NAMES))]
            distro: Option<String>,
            /// A Library template to start from.
            #[arg(long)]
            template: Option<String>,
            /// A host workspace's directory (absolute; needs the exec-host authorization).
            #[arg(long)]
            path: Option<String>,
            #[command(flatten)]
            contents: Contents,
            /// internet (default: a network of its own, the internet through NAT, the host out of reach), private (only lo) or host (the host's own: no network boundary).
            #[arg(long)]
            network: Option<String>,
            #[command(flatten)]
            egress: Egress,
            #[command(flatten)]
            limits: Limits,
            /// Build at once (containers).
            #[arg(long)]
            build: bool,
            /// Take the spec from a JSON file (the REST API's create body); options given
            /// here win over its members.
            #[arg(long)]
            from_json: Option<PathBuf>,
        },
        /// Change a workspace: what is given replaces what it had.
        Update {
            workspace: String,
            #[command(flatten)]
            contents: Contents,
            /// internet, private or host (containers; applies at the next start).
            #[arg(long)]
            network: Option<String>,
            #[command(flatten)]
            egress: Egress,
            #[command(flatten)]
            limits: Limits,
        },
        /// Build a container workspace (returns once the build started).
        Build { workspace: String },
        /// Build a container workspace afresh.
        Rebuild { workspace: String },
        /// Start a container workspace's container (commands also start it).
        Start { workspace: String },
        /// Stop a container workspace's container; its tree stays.
        Stop { workspace: String },
        /// Freeze a container's processes (memory kept, no CPU) until it is resumed or used.
        Pause { workspace: String },
        /// Thaw a paused container.
        Resume { workspace: String },
        /// Capture a container's tree as a named, read-only snapshot (running or stopped).
        Snapshot { workspace: String, name: String },
        /// List a container's snapshots: name, when, bytes of its own.
        Snapshots { workspace: String },
        /// Delete a snapshot (its layers stay while a fork uses them).
        DeleteSnapshot { workspace: String, name: String },
        /// Make a container's tree its snapshot's again (its processes end first).
        Restore { workspace: String, snapshot: String },
        /// A new container workspace whose tree starts as this one's (now, or a snapshot's),
        /// sharing its layers: ready at once, without a build.
        Fork {
            source: String,
            /// The new workspace's name.
            name: String,
            /// Start from this snapshot instead of the source as it is now.
            #[arg(long)]
            snapshot: Option<String>,
            /// internet, private or host (default: the source's).
            #[arg(long)]
            network: Option<String>,
            #[command(flatten)]
            egress: Egress,
            #[command(flatten)]
            limits: Limits,
        },
        /// Destroy a workspace: end its commands, remove its files and record.
        Destroy { workspace: String },
        /// Run a command; exits with its exit code (124 on timeout).
        Exec {
            workspace: String,
            /// Seconds before the command is killed.
            #[arg(long)]
            timeout: Option<u32>,
            #[command(flatten)]
            place: Place,
            /// The command (after --); several words are quoted for the shell.
            #[arg(required = true, last = true)]
            command: Vec<String>,
        },
        /// Run a command: with --background, as a background process that outlives this
        /// call (prints its id); without, as `exec`.
        Run {
            workspace: String,
            /// Start it in the background (see `ps`, `logs`, `kill`, `attach`).
            #[arg(long)]
            background: bool,
            /// With --background: on a pseudo-terminal (attach to it with `attach`).
            #[arg(long, requires = "background")]
            pty: bool,
            /// The terminal's width (80 unless given).
            #[arg(long, requires = "pty")]
            cols: Option<u16>,
            /// The terminal's height (24 unless given).
            #[arg(long, requires = "pty")]
            rows: Option<u16>,
            #[command(flatten)]
            place: Place,
            /// The command (after --); several words are quoted for the shell.
            #[arg(required = true, last = true)]
            command: Vec<String>,
        },
        /// An interactive shell in a workspace, on a terminal (like `machinectl shell`): a
        /// login shell, or the command given. Exits with its exit code.
        Shell {
            workspace: String,
            #[command(flatten)]
            place: Place,
            /// A command to run on the terminal instead of a login shell (after --).
            #[arg(last = true)]
            command: Vec<String>,
        },
        /// Attach this terminal to a background process's terminal (`run --background --pty`,
        /// or a `shell` left running); detach by ending this command (the process goes on).
        Attach {
            workspace: String,
            /// The process's id.
            process: String,
        },
        /// List a workspace's background processes.
        Ps { workspace: String },
        /// Print a background process's output.
        Logs {
            workspace: String,
            /// The process's id (from `run --background` or `ps`).
            process: String,
            /// Keep printing what it writes until it ends.
            #[arg(short = 'f', long)]
            follow: bool,
        },
        /// Send a signal to a background process's whole tree.
        Kill {
            workspace: String,
            process: String,
            /// The signal's number.
            #[arg(short = 's', long, default_value_t = 15)]
            signal: i32,
        },
        /// Show the build and init log of a container workspace.
        InitLog {
            workspace: String,
            /// Only the last N lines (0: all).
            #[arg(short = 'n', long, default_value_t = 0)]
            lines: u32,
        },
        /// Show a container workspace's debug report.
        Debug { workspace: String },
        /// Run a container workspace's init script again.
        RerunInit {
            workspace: String,
            /// Seconds before the script is killed.
            #[arg(long)]
            timeout: Option<u32>,
        },
        /// Copy the workspace's skills and tools from the Library again.
        Sync { workspace: String },
        /// Copy files between this machine and a workspace, as `docker cp` and `machinectl
        /// copy-to` do: one of SRC and DEST is WORKSPACE:PATH, the other a local path. A
        /// directory is copied with everything in it (into DEST when DEST is a directory that
        /// exists, as DEST otherwise). PATH is absolute, or relative to the workspace's
        /// directory.
        Cp {
            src: String,
            dest: String,
            #[command(flatten)]
            who: FileUser,
        },
        /// List a directory of a workspace.
        Ls {
            workspace: String,
            #[arg(default_value = ".")]
            path: String,
            /// Levels below the directory (1 to 64).
            #[arg(short = 'd', long, default_value_t = 1)]
            depth: u32,
            #[command(flatten)]
            who: FileUser,
        },
        /// Print a file of a workspace.
        Cat {
            workspace: String,
            path: String,
            #[command(flatten)]
            who: FileUser,
        },
        /// Remove a file (or, with -r, a directory and everything in it) from a workspace.
        Rm {
            workspace: String,
            path: String,
            #[arg(short = 'r', long)]
            recursive: bool,
            #[command(flatten)]
            who: FileUser,
        },
        /// Make a directory in a workspace.
        Mkdir {
            workspace: String,
            path: String,
            /// Make missing parents; one that exists is no error.
            #[arg(short = 'p', long)]
            parents: bool,
            #[command(flatten)]
            who: FileUser,
        },
        /// Move (rename) a file or directory in a workspace.
        Mv {
            workspace: String,
            from: String,
            to: String,
            /// Replace what is at TO.
            #[arg(short = 'f', long)]
            force: bool,
            #[command(flatten)]
            who: FileUser,
        },
        /// Print the changes below a path of a workspace as lines of JSON until interrupted.
        Watch {
            workspace: String,
            #[arg(default_value = ".")]
            path: String,
            #[command(flatten)]
            who: FileUser,
        },
        /// List the Library's skills and tools.
        Library,
        /// List the Library's templates.
        Templates,
        /// Show one Library template (env var names only).
        Template { name: String },
        /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
        Completions { shell: clap_complete::Shell },
    }

    /// What a workspace holds: `create` and `update` take the same options.
    #[derive(clap::Args, Default)]
    pub struct Contents {
        /// A Library skill to install, repeatable.
        #[arg(long = "skill", value_name = "SKILL")]
        pub skills: Vec<String>,
        /// A Library tool to install, repeatable.
        #[arg(long = "tool", value_name = "TOOL")]
        pub tools: Vec<String>,
        /// KEY=VALUE, repeatable (an update replaces them all).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        pub env: Vec<String>,
        /// File holding the init script (containers).
        #[arg(long, value_name = "FILE")]
        pub init_script: Option<PathBuf>,
    }

    /// Whose files: who a file command acts as in the workspace.
    #[derive(clap::Args, Default, Clone)]
    pub struct FileUser {
        /// Act as this user of the workspace (a name or a number): permissions are checked as
        /// them, and what is made is theirs.
        #[arg(long)]
        pub user: Option<String>,
        /// Act with this group.
        #[arg(long)]
        pub group: Option<String>,
    }

    /// Where and with what a command runs: `exec`, `run` and `shell` take the same options.
    #[derive(clap::Args, Default)]
    pub struct Place {
        /// Working directory, relative to the workspace's.
        #[arg(long)]
        pub cwd: Option<String>,
        /// KEY=VALUE for this command, repeatable; wins over the workspace's.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        pub env: Vec<String>,
    }

    /// Egress rules of a container with network internet (in an update, what is given
    /// replaces the list; an empty value empties it).
    #[derive(clap::Args, Default)]
    pub struct Egress {
        /// With entries, only these are reachable: an IPv4 network or address, or a domain
        /// name (*.example.com for the names below it); repeatable.
        #[arg(long, value_name = "DEST")]
        pub egress_allow: Option<Vec<String>>,
        /// Not reachable, whatever else allows it; repeatable.
        #[arg(long, value_name = "DEST")]
        pub egress_deny: Option<Vec<String>>,
    }

    /// A container's resource limits (in an update, 0 removes one).
    #[derive(clap::Args, Default)]
    pub struct Limits {
        /// Memory, in bytes (MemoryMax=).
        #[arg(long, value_name = "BYTES")]
        pub memory_max: Option<u64>,
        /// CPU time in percent of one CPU (CPUQuota=).
        #[arg(long, value_name = "PERCENT")]
        pub cpu_quota_percent: Option<u32>,
        /// Processes and threads (TasksMax=).
        #[arg(long, value_name = "N")]
        pub tasks_max: Option<u64>,
        /// Pause the container after this long unused (0: never).
        #[arg(long, value_name = "SECS")]
        pub idle_pause_secs: Option<u32>,
        /// Stop the container after this long unused (0: never).
        #[arg(long, value_name = "SECS")]
        pub idle_stop_secs: Option<u32>,
    }
}
