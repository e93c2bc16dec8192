//! Workspace records as JSON files under `<state>/records/<id>.json`, each with a schema
//! version, written atomically (temporary file, fsync, rename, fsync of the directory).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::core::error::{Error, Result};
use crate::core::messages;
use crate::core::ports::Store;
use crate::core::workspace::Workspace;

/// Bump when the record format changes incompatibly; older readers then skip newer records.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct RecordFile {
    schema_version: u32,
    workspace: Workspace,
}

pub struct FileStore {
    dir: PathBuf,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("Cannot {what} {}", path.display()), e)
}

impl FileStore {
    /// Opens (creating if needed) the record directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        Ok(Self { dir })
    }

    fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn read_one(path: &Path) -> std::result::Result<Workspace, String> {
        let bytes = fs::read(path).map_err(|e| e.to_string())?;
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let version: Version = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if version.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "schema version {} is not supported (this service reads version {SCHEMA_VERSION})",
                version.schema_version
            ));
        }
        let record: RecordFile = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if record.workspace.id != stem {
            return Err(format!(
                "the record's id '{}' does not match its file name",
                record.workspace.id
            ));
        }
        Ok(record.workspace)
    }
}

impl Store for FileStore {
    fn load_all(&self) -> Vec<Workspace> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(
                    "Cannot read the record directory {}: {e}",
                    self.dir.display()
                );
                return Vec::new();
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let mut out = Vec::new();
        for path in paths {
            match Self::read_one(&path) {
                Ok(ws) => out.push(ws),
                Err(why) => warn!(
                    message_id = messages::RECORD_CORRUPT,
                    record = %path.display(),
                    "Skipping unreadable workspace record {}: {why}", path.display()
                ),
            }
        }
        out
    }

    fn save(&self, ws: &Workspace) -> Result<()> {
        let record = RecordFile {
            schema_version: SCHEMA_VERSION,
            workspace: ws.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::io(format!("Cannot encode record of {}", ws.id), e.into()))?;
        let path = self.path_of(&ws.id);
        let tmp = self.dir.join(format!(".{}.json.tmp", ws.id));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_error("write", &path, e)
        })
    }

    fn remove(&self, id: &str) -> Result<()> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error("sync", &self.dir, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &path, e)),
        }
    }
}

/// Host workspace directories under `<state>/workspaces/<id>`.
pub struct Dirs {
    base: PathBuf,
}

impl Dirs {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self { base: base.into() }
    }
}

impl crate::core::ports::HostDirs for Dirs {
    fn ensure(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| io_error("create", path, e))
    }

    fn remove_tree(&self, path: &Path) -> Result<()> {
        match fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", path, e)),
        }
    }

    fn default_dir(&self, id: &str) -> PathBuf {
        self.base.join(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::workspace::{Status, WorkspaceType};

    fn ws(id: &str) -> Workspace {
        Workspace {
            id: id.into(),
            name: format!("n-{id}"),
            workspace_type: WorkspaceType::Host,
            status: Status::Ready,
            error_message: String::new(),
            path: "/tmp/x".into(),
            owns_path: true,
            distro: None,
            env_vars: [("A".to_string(), "secret".to_string())].into(),
            init_script: String::new(),
            skills: vec![],
            tools: vec![],
            template: String::new(),
            created_at_usec: 7,
            network: Default::default(),
            egress_allow: vec![],
            egress_deny: vec![],
            limits: Default::default(),
            build_step: String::new(),
        }
    }

    #[test]
    fn round_trips_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("records")).unwrap();
        store.save(&ws("a")).unwrap();
        store.save(&ws("b")).unwrap();
        assert_eq!(store.load_all(), vec![ws("a"), ws("b")]);
        store.remove("a").unwrap();
        store.remove("a").unwrap();
        assert_eq!(store.load_all(), vec![ws("b")]);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("records"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec!["b.json"], "no temporary files remain");
    }

    #[test]
    fn skips_corrupt_foreign_and_future_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.save(&ws("good")).unwrap();
        fs::write(dir.path().join("broken.json"), b"{not json").unwrap();
        let mut future = serde_json::to_value(RecordFile {
            schema_version: SCHEMA_VERSION,
            workspace: ws("future"),
        })
        .unwrap();
        future["schema_version"] = 99.into();
        fs::write(dir.path().join("future.json"), future.to_string()).unwrap();
        let renamed = fs::read(dir.path().join("good.json")).unwrap();
        fs::write(dir.path().join("other.json"), renamed).unwrap();
        assert_eq!(store.load_all(), vec![ws("good")]);
        assert!(dir.path().join("broken.json").exists(), "never deleted");
    }
}
