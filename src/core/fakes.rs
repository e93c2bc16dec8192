//! In-memory fakes of every port, for the core's tests and the D-Bus contract tests.

use crate::core::files::{FileCall, FileOutcome};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::error::{Error, Result};
use super::manager::{Manager, Ports};
use super::ports::*;
use super::spec::ServiceLimits;
use super::workspace::Workspace;

#[derive(Default)]
pub(crate) struct MemStore(pub(crate) Mutex<BTreeMap<String, Workspace>>);
impl Store for MemStore {
    fn load_all(&self) -> Vec<Workspace> {
        self.0.lock().unwrap().values().cloned().collect()
    }
    fn save(&self, ws: &Workspace) -> Result<()> {
        self.0.lock().unwrap().insert(ws.id.clone(), ws.clone());
        Ok(())
    }
    fn remove(&self, id: &str) -> Result<()> {
        self.0.lock().unwrap().remove(id);
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct MemDirs(pub(crate) Mutex<Vec<String>>);
impl HostDirs for MemDirs {
    fn ensure(&self, path: &Path) -> Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("ensure {}", path.display()));
        Ok(())
    }
    fn remove_tree(&self, path: &Path) -> Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("remove {}", path.display()));
        Ok(())
    }
    fn default_dir(&self, id: &str) -> PathBuf {
        PathBuf::from("/state/workspaces").join(id)
    }
}

/// Records requests; a command "block" runs until cancelled, "hold" until `release`.
#[derive(Default)]
pub(crate) struct FakeExec(
    pub(crate) Mutex<Vec<ExecRequest>>,
    pub(crate) tokio::sync::Notify,
    /// Every size a terminal was given, in order.
    pub(crate) std::sync::Arc<Mutex<Vec<WindowSize>>>,
);

/// The writer a command "escape" left behind was cut off (its reader, the service, let go).
pub(crate) static ESCAPED_WRITER_CUT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// One end of a socket pair, standing for a connection to a port (`connect_port`).
fn fake_connection() -> Result<std::os::fd::OwnedFd> {
    let (a, _b) = tokio::net::UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
    Ok(a.into_std().map_err(|e| Error::io("deregister", e))?.into())
}

/// A file call as the fakes serve it: a path with "missing" in it is `FileNotFound`; what
/// streams out is a pipe holding the absolute path; content in is read to its end; `Stat`
/// gives the path's entry, `ListDirectory` two entries.
pub(crate) async fn fake_files(call: FileCall) -> Result<FileOutcome> {
    use crate::core::files::{Entry, EntryType, FileErrorKind, FileOp};
    use std::io::{Read, Write};
    let path = String::from_utf8_lossy(&call.req.path).into_owned();
    if path.contains("missing") {
        return Err(crate::core::files::failure(
            "fake",
            FileErrorKind::NotFound,
            path.as_bytes(),
            "No such file or directory",
        ));
    }
    let entry = |name: &str| Entry {
        name: name.as_bytes().to_vec(),
        kind: EntryType::File,
        size: 4,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_usec: 1,
        target: Vec::new(),
    };
    Ok(match call.req.op {
        FileOp::Read | FileOp::Download | FileOp::Watch => {
            let (r, mut w) =
                std::os::unix::net::UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
            w.write_all(path.as_bytes())
                .map_err(|e| Error::io("write", e))?;
            FileOutcome::Stream(r.into())
        }
        // The content comes on a socket in the contract tests.
        FileOp::Write | FileOp::Upload => {
            let content = call.content.expect("content");
            tokio::task::spawn_blocking(move || {
                let mut all = Vec::new();
                std::os::unix::net::UnixStream::from(content)
                    .read_to_end(&mut all)
                    .map(drop)
            })
            .await
            .expect("joined")
            .map_err(|e| Error::io("read", e))?;
            FileOutcome::Done
        }
        FileOp::Stat => FileOutcome::Entries {
            entries: vec![entry(&path)],
            truncated: false,
        },
        FileOp::List => FileOutcome::Entries {
            entries: vec![entry("a"), entry("b")],
            truncated: true,
        },
        _ => FileOutcome::Done,
    })
}

/// A background process's terminal that records its sizes.
struct FakeTerminal(std::sync::Arc<Mutex<Vec<WindowSize>>>);

impl Terminal for FakeTerminal {
    fn resize(&self, size: WindowSize) -> std::io::Result<()> {
        self.0.lock().unwrap().push(size);
        Ok(())
    }
}
#[async_trait]
impl Executor for FakeExec {
    /// Socket pairs in place of pipes: what the command's ends are does not matter here. A
    /// terminal's sizes are recorded in `FakeExec::sizes`.
    fn process_streams(
        &self,
        terminal: Option<WindowSize>,
        _keep: Option<&str>,
        _container: bool,
    ) -> Result<ProcessStreams> {
        let pair = || {
            let (a, b) = tokio::net::UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
            let a = a.into_std().map_err(|e| Error::io("deregister", e))?;
            Ok::<_, Error>((a, b))
        };
        let (in_cmd, input) = pair()?;
        let (out_cmd, output) = pair()?;
        let err_cmd = out_cmd.try_clone().map_err(|e| Error::io("dup", e))?;
        Ok(ProcessStreams {
            command: ExecIo::Process(ProcessIo {
                stdin: in_cmd.into(),
                stdout: out_cmd.into(),
                stderr: err_cmd.into(),
                terminal_inside: None,
            }),
            input: Box::new(input),
            output: Box::new(output),
            terminal: terminal.map(|size| {
                let t = FakeTerminal(self.2.clone());
                t.0.lock().unwrap().push(size);
                Box::new(t) as Box<dyn Terminal>
            }),
        })
    }

    /// One end of a socket pair stands for the connection.
    async fn connect_port(&self, _port: u16) -> Result<std::os::fd::OwnedFd> {
        fake_connection()
    }

    async fn files(
        &self,
        _workspace: &str,
        call: FileCall,
        _cancel: CancellationToken,
    ) -> Result<FileOutcome> {
        fake_files(call).await
    }

    fn attachment(&self) -> Result<Attachment> {
        let (a, b) = tokio::net::UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
        let a = a.into_std().map_err(|e| Error::io("deregister", e))?;
        a.set_nonblocking(false)
            .map_err(|e| Error::io("blocking", e))?;
        let (reader, writer) = b.into_split();
        Ok(Attachment {
            caller: a.into(),
            reader: Box::new(reader),
            writer: Box::new(writer),
        })
    }

    async fn run(&self, mut req: ExecRequest, cancel: CancellationToken) -> Result<ExecOutcome> {
        let block = req.command == "block";
        let hold = req.command == "hold";
        // The command's descriptors are its while it runs, and closed when it returns, as
        // a real command's are.
        let mut io = std::mem::take(&mut req.io);
        // "escape": something the command started outlives it and keeps writing its output.
        if let (true, ExecIo::Process(p)) = (req.command == "escape", &mut io) {
            let stdout = p.stdout.try_clone().map_err(|e| Error::io("dup", e))?;
            let out = std::os::unix::net::UnixStream::from(stdout);
            let mut out =
                tokio::net::UnixStream::from_std(out).map_err(|e| Error::io("register", e))?;
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while out.write_all(&[b'x'; 4096]).await.is_ok() {}
                ESCAPED_WRITER_CUT.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        }
        self.0.lock().unwrap().push(req);
        if hold {
            self.1.notified().await;
        }
        if block {
            cancel.cancelled().await;
            return Ok(ExecOutcome {
                exit_code: -1,
                ..Default::default()
            });
        }
        Ok(ExecOutcome {
            stdout: b"ok".to_vec(),
            ..Default::default()
        })
    }
}

/// Records calls; a build waits until `release_build` is notified.
#[derive(Default)]
pub(crate) struct FakeContainers {
    calls: Mutex<Vec<String>>,
    pub(crate) release_build: tokio::sync::Notify,
    /// Containers frozen, by name.
    pub(crate) frozen: Mutex<std::collections::HashMap<String, bool>>,
    /// Snapshot names, by workspace name.
    pub(crate) snapshots: Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Whether a lent connection is open (any workspace).
    pub(crate) connection_open: std::sync::atomic::AtomicBool,
}
impl FakeContainers {
    pub(crate) fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn call(&self, c: String) {
        self.calls.lock().unwrap().push(c);
    }
}
#[async_trait]
impl Containers for FakeContainers {
    fn tree_path(&self, name: &str) -> PathBuf {
        PathBuf::from("/machines").join(name)
    }
    fn is_built(&self, _: &Workspace) -> bool {
        true
    }
    async fn check_name_free(&self, name: &str) -> Result<()> {
        if name == "taken" {
            return Err(Error::WorkspaceExists("machine 'taken' exists".into()));
        }
        Ok(())
    }
    async fn build_tree(&self, ws: &Workspace, steps: BuildSteps) -> Result<()> {
        self.call(format!("build {}", ws.name));
        let _ = steps.send("unpack".into());
        self.release_build.notified().await;
        Ok(())
    }
    async fn wait_build(&self, ws: &Workspace) -> Result<()> {
        self.call(format!("wait_build {}", ws.name));
        Ok(())
    }
    async fn start(&self, ws: &Workspace) -> Result<()> {
        self.call(format!("start {}", ws.name));
        Ok(())
    }
    async fn stop(&self, ws: &Workspace) -> Result<()> {
        self.call(format!("stop {}", ws.name));
        Ok(())
    }
    async fn freeze(&self, ws: &Workspace, freeze: bool) -> Result<()> {
        let verb = if freeze { "freeze" } else { "thaw" };
        self.call(format!("{verb} {}", ws.name));
        self.frozen.lock().unwrap().insert(ws.name.clone(), freeze);
        Ok(())
    }
    async fn snapshot(&self, ws: &Workspace, name: &str) -> Result<()> {
        self.call(format!("snapshot {} {name}", ws.name));
        let mut all = self.snapshots.lock().unwrap();
        let list = all.entry(ws.name.clone()).or_default();
        if list.iter().any(|s| s == name) {
            return Err(Error::SnapshotExists(format!("'{name}' exists")));
        }
        list.push(name.to_owned());
        Ok(())
    }
    async fn snapshots(&self, ws: &Workspace) -> Result<Vec<SnapshotInfo>> {
        let all = self.snapshots.lock().unwrap();
        Ok(all
            .get(&ws.name)
            .into_iter()
            .flatten()
            .map(|name| SnapshotInfo {
                name: name.clone(),
                created_usec: 1,
                bytes: 4096,
            })
            .collect())
    }
    async fn delete_snapshot(&self, ws: &Workspace, name: &str) -> Result<()> {
        self.call(format!("delete_snapshot {} {name}", ws.name));
        let mut all = self.snapshots.lock().unwrap();
        let list = all.entry(ws.name.clone()).or_default();
        let before = list.len();
        list.retain(|s| s != name);
        if list.len() == before {
            return Err(Error::NoSuchSnapshot(format!("no '{name}'")));
        }
        Ok(())
    }
    async fn restore(&self, ws: &Workspace, name: &str) -> Result<()> {
        self.call(format!("restore {} {name}", ws.name));
        let all = self.snapshots.lock().unwrap();
        if !all
            .get(&ws.name)
            .is_some_and(|l| l.iter().any(|s| s == name))
        {
            return Err(Error::NoSuchSnapshot(format!("no '{name}'")));
        }
        Ok(())
    }
    async fn fork_tree(&self, source: &Workspace, snapshot: &str, fork: &Workspace) -> Result<()> {
        self.call(format!("fork {} {snapshot} {}", source.name, fork.name));
        if !snapshot.is_empty() {
            let all = self.snapshots.lock().unwrap();
            if !all
                .get(&source.name)
                .is_some_and(|l| l.iter().any(|s| s == snapshot))
            {
                return Err(Error::NoSuchSnapshot(format!("no '{snapshot}'")));
            }
        }
        Ok(())
    }
    async fn fork_done(&self, fork: &Workspace) -> Result<()> {
        self.call(format!("fork_done {}", fork.name));
        Ok(())
    }
    async fn disk_usage(&self, _: &Workspace) -> Result<u64> {
        Ok(8192)
    }
    async fn is_frozen(&self, ws: &Workspace) -> Result<bool> {
        Ok(self
            .frozen
            .lock()
            .unwrap()
            .get(&ws.name)
            .copied()
            .unwrap_or(false))
    }
    async fn apply_limits(&self, ws: &Workspace) -> Result<()> {
        self.call(format!("limits {} {:?}", ws.name, ws.limits));
        Ok(())
    }
    async fn apply_egress(&self, ws: &Workspace) -> Result<()> {
        self.call(format!(
            "egress {} allow {:?} deny {:?}",
            ws.name, ws.egress_allow, ws.egress_deny
        ));
        Ok(())
    }
    async fn exec(
        &self,
        ws: &Workspace,
        req: ExecRequest,
        _: CancellationToken,
    ) -> Result<ExecOutcome> {
        self.call(format!(
            "exec {} {} in {}",
            ws.name,
            req.command,
            req.cwd.display()
        ));
        Ok(ExecOutcome::default())
    }
    async fn connect_port(&self, _ws: &Workspace, _port: u16) -> Result<std::os::fd::OwnedFd> {
        fake_connection()
    }
    async fn lent_connections_open(&self, _ws: &Workspace) -> bool {
        self.connection_open
            .load(std::sync::atomic::Ordering::SeqCst)
    }
    async fn files(
        &self,
        ws: &Workspace,
        call: FileCall,
        _: CancellationToken,
    ) -> Result<FileOutcome> {
        self.call(format!(
            "files {} {:?} {}",
            ws.name,
            call.req.op,
            String::from_utf8_lossy(&call.req.path)
        ));
        fake_files(call).await
    }

    async fn run_init(
        &self,
        ws: &Workspace,
        _: Duration,
        _: CancellationToken,
    ) -> Result<ExecOutcome> {
        self.call(format!("init {}", ws.name));
        Ok(ExecOutcome {
            exit_code: if ws.init_script.contains("fail") {
                1
            } else {
                0
            },
            ..Default::default()
        })
    }
    async fn init_log(&self, _: &Workspace, _: u32) -> Result<(String, u32)> {
        Ok((String::new(), 0))
    }
    async fn append_log(&self, _: &Workspace, _: &str) {}
    async fn clean_orphans(&self, known: &[Workspace], _taken: crate::core::ports::NameTaken) {
        let names: Vec<&str> = known.iter().map(|w| w.name.as_str()).collect();
        self.call(format!("clean_orphans {}", names.join(",")));
    }
    async fn debug_info(&self, _: &Workspace) -> Result<DebugInfo> {
        Ok(DebugInfo::new())
    }
    async fn remove(&self, ws: &Workspace) -> Result<()> {
        self.call(format!("remove {}", ws.name));
        Ok(())
    }
}

/// A Library with skills a, b and tool t, and template "tpl"; records installs.
#[derive(Default)]
pub(crate) struct FakeLibrary(pub(crate) Mutex<Vec<String>>);
impl Library for FakeLibrary {
    fn skills(&self) -> Result<Vec<String>> {
        Ok(vec!["a".into(), "b".into()])
    }
    fn tools(&self) -> Result<Vec<String>> {
        Ok(vec!["t".into()])
    }
    fn check(&self, skills: &[String], tools: &[String]) -> Result<()> {
        // "disk-full" passes the check and fails the install.
        if let Some(s) = skills
            .iter()
            .find(|s| !["a", "b", "disk-full"].contains(&s.as_str()))
        {
            return Err(Error::NoSuchSkill(s.clone()));
        }
        if let Some(t) = tools.iter().find(|t| t.as_str() != "t") {
            return Err(Error::NoSuchTool(t.clone()));
        }
        Ok(())
    }
    fn install(&self, target: &InstallTarget, skills: &[String], tools: &[String]) -> Result<()> {
        self.check(skills, tools)?;
        if skills.iter().any(|s| s == "disk-full") {
            return Err(Error::io_msg("No space left on device"));
        }
        let mut dir = target.root.display().to_string();
        if !target.dir.as_os_str().is_empty() {
            dir = format!("{dir} in {}", target.dir.display());
        }
        if target.container {
            dir.push_str(" (container)");
        }
        self.0.lock().unwrap().push(format!(
            "{dir} skills={} tools={}",
            skills.join(","),
            tools.join(",")
        ));
        Ok(())
    }
    fn templates(&self) -> Result<Vec<crate::core::template::Template>> {
        Ok(vec![self.template("tpl")?])
    }
    fn template(&self, name: &str) -> Result<crate::core::template::Template> {
        if name != "tpl" {
            return Err(Error::NoSuchTemplate(name.into()));
        }
        Ok(crate::core::template::Template {
            name: "tpl".into(),
            distro: Some("debian-bookworm".into()),
            skills: vec!["a".into()],
            env_vars: [("FROM".into(), "template".into())].into(),
            init_script: Some("echo from template".into()),
            ..Default::default()
        })
    }
}

#[derive(Default)]
pub(crate) struct EventLog(pub(crate) Mutex<Vec<Event>>);
impl Events for EventLog {
    fn emit(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

/// Every fake but the events, and a manager over them.
#[derive(Default)]
pub(crate) struct Fakes {
    pub(crate) store: Arc<MemStore>,
    pub(crate) dirs: Arc<MemDirs>,
    pub(crate) exec: Arc<FakeExec>,
    pub(crate) containers: Arc<FakeContainers>,
    pub(crate) library: Arc<FakeLibrary>,
}

impl Fakes {
    /// A loaded manager (the default host workspace exists) that reports to `events`.
    pub(crate) fn manager(&self, events: Arc<dyn Events>, limits: ServiceLimits) -> Arc<Manager> {
        let manager = Arc::new(Manager::new(
            Ports {
                store: self.store.clone(),
                dirs: self.dirs.clone(),
                executor: self.exec.clone(),
                containers: self.containers.clone(),
                library: self.library.clone(),
                events,
            },
            "/state/host".into(),
            limits,
        ));
        manager.load().expect("the fakes load");
        manager
    }
}
