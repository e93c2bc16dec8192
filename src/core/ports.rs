//! What the core needs from the outside world. `system/` implements these for real; tests use
//! in-memory fakes. Nothing here does I/O itself.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::error::Result;
use super::files::{FileCall, FileOutcome};
use super::workspace::{Field, Workspace};

/// Where a build reports its steps as it reaches them ("unpack", "configure", ...).
pub type BuildSteps = tokio::sync::mpsc::UnboundedSender<String>;

/// Durable storage of workspace records.
pub trait Store: Send + Sync {
    /// Every readable record. Unreadable ones are reported (journal) and skipped by the store:
    /// they stay on disk untouched, and loading never fails because of one.
    fn load_all(&self) -> Vec<Workspace>;
    /// Writes a record atomically: after a crash either the old or the new record is there.
    fn save(&self, ws: &Workspace) -> Result<()>;
    fn remove(&self, id: &str) -> Result<()>;
}

/// Host workspace directories.
pub trait HostDirs: Send + Sync {
    /// Creates `path` (and parents) if missing, mode 0700 for directories it creates.
    fn ensure(&self, path: &Path) -> Result<()>;
    /// Removes a directory tree the service created.
    fn remove_tree(&self, path: &Path) -> Result<()>;
    /// The directory for a new host workspace with this id, when the caller chose none.
    fn default_dir(&self, id: &str) -> PathBuf;
}

/// Where a command's standard streams come from and go to.
#[derive(Debug)]
pub enum ExecIo {
    /// stdin from these bytes; stdout and stderr collected into the outcome, capped.
    Collect { stdin: Vec<u8> },
    /// The caller's own descriptors (`ExecWithFds`), used as the command runs; nothing is
    /// collected. A host command is given them, as a shell gives its own; a command in a
    /// container never is (nothing a caller lends crosses into a container): it gets pipes the
    /// service relays to and from them until the command has ended, then lets them go.
    Lend {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// A background process's streams, as `Executor::process_streams` made them.
    Process(ProcessIo),
}

/// The command's ends of a background process's streams.
#[derive(Debug)]
pub struct ProcessIo {
    /// Its stdin, and one pipe for its stdout and stderr both; or a terminal the service made
    /// (host workspaces) as all three.
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// A terminal its container's agent makes inside, of this size, relayed to and from the
    /// pipes above; its new sizes come on `resizes`.
    pub terminal_inside: Option<TerminalInside>,
}

#[derive(Debug)]
pub struct TerminalInside {
    pub size: WindowSize,
    pub resizes: tokio::sync::mpsc::UnboundedReceiver<WindowSize>,
}

impl Default for ExecIo {
    fn default() -> Self {
        Self::Collect { stdin: Vec::new() }
    }
}

/// One command to run, fully resolved.
#[derive(Debug)]
pub struct ExecRequest {
    /// Used to name the command's cgroup and log lines.
    pub workspace_id: String,
    /// Run as `/bin/bash -c COMMAND` (`/bin/sh -c` where there is no bash).
    pub command: String,
    /// The complete environment (nothing is inherited from the service).
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub io: ExecIo,
    pub timeout: Duration,
    /// Cap per collected output stream; the rest is read and dropped, and the stream is flagged.
    pub output_cap: usize,
    /// Signals to deliver to every process of the command while it runs (a background
    /// process's `Signal`); `None` for a plain exec.
    pub signals: Option<Signals>,
    /// Its stdin is a terminal (`ProcessStreams::terminal`): the command runs in a session of
    /// its own with that terminal as its controlling terminal.
    pub terminal: bool,
    /// A background process to keep across a restart of the service (where the executor
    /// `keeps_processes`): it is started where a restart does not end it, and what reports
    /// its end is kept with `record` under this key.
    pub keep: Option<KeepAs>,
}

/// The key and record a background process is kept under (`Executor::keeps_processes`).
#[derive(Debug, Clone)]
pub struct KeepAs {
    pub key: String,
    /// The core's record of the process, given back as it was (`KeptProcess::record`).
    pub record: Vec<u8>,
}

/// How a kept process runs on after a restart: its end (the exit code), awaited while its
/// signals are delivered; cancelled, it ends the process.
pub type Resume = Box<
    dyn FnOnce(
            Signals,
            CancellationToken,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i32>> + Send>>
        + Send,
>;

/// A background process found again after a restart of the service.
pub struct KeptProcess {
    pub key: String,
    pub record: Vec<u8>,
    /// What the service kept of its output when it stopped (`Executor::keep_output`); none
    /// after a crash.
    pub output: Option<Vec<u8>>,
    /// Its streams and its end, when all of them were kept; `None`: it is known only by its
    /// record (it is reported ended).
    pub live: Option<KeptLive>,
}

pub struct KeptLive {
    /// None when its stdin was closed (by the process, or as it ended).
    pub input: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    pub output: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    pub terminal: Option<Box<dyn Terminal>>,
    pub resume: Resume,
}

/// Where the signals for a running command come from.
pub type Signals = tokio::sync::mpsc::UnboundedReceiver<i32>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutcome {
    /// The exit status, 128+N for death by signal N, -1 on timeout.
    pub exit_code: i32,
    /// Empty when the caller's descriptors were used (`ExecIo::Lend`).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration: Duration,
}

/// Runs commands. Contract: when `run` returns, every process the command started is gone,
/// whether it exited, timed out or `cancel` fired (then `Err(JobFailed)` or an outcome).
#[async_trait]
pub trait Executor: Send + Sync {
    async fn run(&self, req: ExecRequest, cancel: CancellationToken) -> Result<ExecOutcome>;
    /// The streams of a background process (host or container): the command's ends, and the
    /// service's. With a window size: a pseudo-terminal of that size, made by the service for
    /// a host command, by the container's agent inside for a container's (`container`).
    /// `keep`: the key the process is kept under across a restart (only where the executor
    /// `keeps_processes`).
    fn process_streams(
        &self,
        terminal: Option<WindowSize>,
        keep: Option<&str>,
        container: bool,
    ) -> Result<ProcessStreams>;
    /// A connected pair: one end for a caller (`OpenPty`), the other as the service's reader
    /// and writer.
    fn attachment(&self) -> Result<Attachment>;
    /// A TCP connection to `port` on the host's loopback, for a caller (`ConnectPort`).
    async fn connect_port(&self, port: u16) -> Result<std::os::fd::OwnedFd>;
    /// A file call on a host workspace (paths absolute on the host), served by the service
    /// itself; `cancel` fires when the caller is gone.
    async fn files(
        &self,
        workspace: &str,
        call: FileCall,
        cancel: CancellationToken,
    ) -> Result<FileOutcome>;
    /// Background processes can be kept across a restart of the service (under systemd, with
    /// its descriptor store): `ExecRequest::keep` is then honoured.
    fn keeps_processes(&self) -> bool {
        false
    }
    /// Keeps a process's output (as the core encodes it) for the next start; at shutdown.
    fn keep_output(&self, _key: &str, _output: &[u8]) {}
    /// Keeps a finished process's record and output for the next start; at shutdown.
    fn keep_finished(&self, _key: &str, _record: &[u8], _output: &[u8]) {}
    /// Lets go of the kept copy of a process's stdin (the service closed it).
    fn forget_kept_input(&self, _key: &str) {}
    /// Lets go of everything kept for a process (it ended, or it is no longer wanted).
    fn forget_kept(&self, _key: &str) {}
    /// The processes kept by the previous run of the service (once, at start).
    fn kept_processes(&self) -> Vec<KeptProcess> {
        Vec::new()
    }
}

/// A background process's streams.
pub struct ProcessStreams {
    /// The command's: its stdin, and one pipe for stdout and stderr both, or the terminal as
    /// all three (`ExecIo::Process`).
    pub command: ExecIo,
    /// The service's end of the command's stdin (the terminal's input).
    pub input: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    /// The service's end of the command's output (the terminal's output).
    pub output: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    /// The terminal's controls, for a command on a pseudo-terminal.
    pub terminal: Option<Box<dyn Terminal>>,
}

/// A pseudo-terminal's size, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for WindowSize {
    fn default() -> Self {
        Self { cols: 80, rows: 24 }
    }
}

/// A background process's pseudo-terminal, as the service holds it.
pub trait Terminal: Send + Sync {
    /// Sets its size (its foreground process group gets `SIGWINCH`).
    fn resize(&self, size: WindowSize) -> std::io::Result<()>;
}

/// One end of a connected pair for a caller, and the service's end as a reader and a writer.
pub struct Attachment {
    pub caller: std::os::fd::OwnedFd,
    pub reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    pub writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
}

/// Where a workspace's skills and tools go: `<root>/<dir>/.opencode/`. The service does not
/// trust what is below `root` (a container's tree, or a workspace directory its commands
/// write): every path there is resolved inside `root`, never through a link that leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallTarget {
    pub root: PathBuf,
    /// Relative to `root`.
    pub dir: PathBuf,
    /// `root` is a container's tree: what is installed belongs to the container's root user.
    pub container: bool,
}

/// The Library: skills, tools and templates, read afresh on every use.
pub trait Library: Send + Sync {
    /// Every skill's name.
    fn skills(&self) -> Result<Vec<String>>;
    /// Every tool's name.
    fn tools(&self) -> Result<Vec<String>>;
    /// Checks names (`InvalidArgs` for names that would leave the Library, `NoSuchSkill`,
    /// `NoSuchTool`) before anything changes.
    fn check(&self, skills: &[String], tools: &[String]) -> Result<()>;
    /// Makes the target's `.opencode/skill/` and `.opencode/tool/` hold exactly these entries,
    /// copied with their modes. All or nothing: every entry is checked and copied aside first,
    /// then each directory is swapped in whole.
    fn install(&self, target: &InstallTarget, skills: &[String], tools: &[String]) -> Result<()>;
    /// Every readable template; malformed ones are reported (journal) and left out.
    fn templates(&self) -> Result<Vec<crate::core::template::Template>>;
    fn template(&self, name: &str) -> Result<crate::core::template::Template>;
}

/// One value of a debug report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebugValue {
    Str(String),
    U64(u64),
    Bool(bool),
    List(Vec<String>),
}

/// A debug report: key -> value.
pub type DebugInfo = BTreeMap<String, DebugValue>;

/// A snapshot of a container workspace's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub created_usec: u64,
    /// The bytes of the layer it made: what it keeps of its own.
    pub bytes: u64,
}

/// Whether a workspace of this name exists, or is being created, now (`clean_orphans`).
pub type NameTaken = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Container workspaces: trees, units, machines. Every method is given the workspace record.
#[async_trait]
pub trait Containers: Send + Sync {
    /// The container tree of a workspace with this name.
    fn tree_path(&self, name: &str) -> PathBuf;
    /// True when the tree is built (it has its `/workspace` directory).
    fn is_built(&self, ws: &Workspace) -> bool;
    /// `WorkspaceExists` when a machine, an image or a tree of this name exists already.
    async fn check_name_free(&self, name: &str) -> Result<()>;
    /// Makes the container tree from scratch in a transient build unit; returns when the unit
    /// has finished, telling `steps` each step as the unit reaches it. Errors name the failing
    /// step.
    async fn build_tree(&self, ws: &Workspace, steps: BuildSteps) -> Result<()>;
    /// After a restart of the service: waits for a build unit that is still running, then tells
    /// whether the tree is complete (Ok) or the build failed or was interrupted (Err).
    async fn wait_build(&self, ws: &Workspace) -> Result<()>;
    /// Starts the container unit (registered with machined) unless it runs.
    async fn start(&self, ws: &Workspace) -> Result<()>;
    /// Stops the build and container units, if any.
    async fn stop(&self, ws: &Workspace) -> Result<()>;
    /// Freezes (`true`) or thaws the container's processes with the cgroup freezer (systemd's
    /// `FreezeUnit`/`ThawUnit`): memory kept, no CPU. Freezing a container that is not running
    /// is `NotReady`; thawing one that is not frozen does nothing.
    async fn freeze(&self, ws: &Workspace, freeze: bool) -> Result<()>;
    /// Whether the container runs frozen.
    async fn is_frozen(&self, ws: &Workspace) -> Result<bool>;
    /// Whether a connection `connect_port` lent is still open (its caller holds it): a
    /// workspace with one is in use however long ago it was made.
    async fn lent_connections_open(&self, ws: &Workspace) -> bool;
    /// Gives a running container unit the workspace's current limits (a removed limit becomes
    /// no limit); does nothing when the container is not running.
    async fn apply_limits(&self, ws: &Workspace) -> Result<()>;
    /// Gives a running container with a network of its own the workspace's current egress
    /// rules; does nothing when it is not running.
    async fn apply_egress(&self, ws: &Workspace) -> Result<()>;
    /// Runs a command inside the running container (starting it if needed).
    async fn exec(
        &self,
        ws: &Workspace,
        req: ExecRequest,
        cancel: CancellationToken,
    ) -> Result<ExecOutcome>;
    /// A TCP connection to `port` on the container's loopback (its own network, or the host's
    /// for a container on the host network), made inside by its agent, for a caller.
    async fn connect_port(&self, ws: &Workspace, port: u16) -> Result<std::os::fd::OwnedFd>;
    /// A file call served inside the container by its agent (started first if it is not
    /// running); paths are absolute inside it. `cancel` fires when the caller is gone.
    async fn files(
        &self,
        ws: &Workspace,
        call: FileCall,
        cancel: CancellationToken,
    ) -> Result<FileOutcome>;
    /// Runs the init script inside the container, appending its output to the init log.
    async fn run_init(
        &self,
        ws: &Workspace,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<ExecOutcome>;
    /// The last `max_lines` lines of the init log (all when 0) and its total line count.
    async fn init_log(&self, ws: &Workspace, max_lines: u32) -> Result<(String, u32)>;
    /// Appends a line to the init log.
    async fn append_log(&self, ws: &Workspace, line: &str);
    /// At start: reports trees and units of containers that have no record (`known` are the
    /// container workspaces), and removes what is clearly the service's own leftover
    /// (half-built trees, units it started, links of no running container); takes up the
    /// networks of running containers.
    /// `taken` says whether a workspace of a name exists, or is being created, now: what
    /// looks left over is checked against it when it is acted on, since workspaces are
    /// created while this runs.
    async fn clean_orphans(&self, known: &[Workspace], taken: NameTaken);
    /// What the tree, the units and machined say about this container.
    async fn debug_info(&self, ws: &Workspace) -> Result<DebugInfo>;
    /// Removes tree, logs and leftovers; the units must be stopped.
    async fn remove(&self, ws: &Workspace) -> Result<()>;
    /// Captures the tree as the read-only snapshot `name`, while the container runs (frozen
    /// for the capture) or is stopped. `SnapshotExists` for a name it has.
    async fn snapshot(&self, ws: &Workspace, name: &str) -> Result<()>;
    /// Its snapshots, oldest first.
    async fn snapshots(&self, ws: &Workspace) -> Result<Vec<SnapshotInfo>>;
    /// Removes a snapshot; its layers stay while a fork uses them. `NoSuchSnapshot`.
    async fn delete_snapshot(&self, ws: &Workspace, name: &str) -> Result<()>;
    /// The tree becomes snapshot `name`'s: the container is stopped first (its processes
    /// end), and started again if it ran.
    async fn restore(&self, ws: &Workspace, name: &str) -> Result<()>;
    /// Makes the tree of `fork`, a new workspace, from `source`'s snapshot, or from its state
    /// now when `snapshot` is empty (the source frozen for the capture if it runs). Nothing
    /// is left on an error; until `fork_done`, a restart removes it.
    async fn fork_tree(&self, source: &Workspace, snapshot: &str, fork: &Workspace) -> Result<()>;
    /// The fork's record is saved: its tree is kept from now on.
    async fn fork_done(&self, fork: &Workspace) -> Result<()>;
    /// The bytes of the workspace's own writable layer.
    async fn disk_usage(&self, ws: &Workspace) -> Result<u64>;
}

/// What happened, for the transport layers (D-Bus objects and signals). Delivered in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Added {
        id: String,
    },
    Changed {
        id: String,
        fields: Vec<Field>,
    },
    Removed {
        id: String,
    },
    /// A background process of workspace `id` started (its object appears).
    ProcessAdded {
        id: String,
        process: u32,
    },
    /// It ended: `Running`, `ExitCode` and `EndedAt` changed.
    ProcessExited {
        id: String,
        process: u32,
    },
    /// It was forgotten (its object goes).
    ProcessRemoved {
        id: String,
        process: u32,
    },
    /// Workspace `id`'s tree became its snapshot `snapshot`'s.
    Restored {
        id: String,
        snapshot: String,
    },
}

pub trait Events: Send + Sync {
    fn emit(&self, event: Event);
}
