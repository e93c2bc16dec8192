//! The Library: templates merged into a create, skills and tools installed and synced.

use std::path::PathBuf;

use tracing::info;

use crate::core::error::{Error, Result};
use crate::core::ports::InstallTarget;
use crate::core::spec::CreateSpec;
use crate::core::template::{Template, merge};
use crate::core::workspace::{Status, Workspace};

use super::*;

impl Manager {
    /// The request merged over its template, if it names one: what `create` validates.
    pub fn with_template(&self, spec: CreateSpec) -> Result<CreateSpec> {
        match spec.template.as_deref() {
            None | Some("") => Ok(spec),
            Some(name) => {
                crate::core::names::validate_library_name("template", name)
                    .map_err(|e| Error::invalid("template", e))?;
                let t = self.ports.library.template(name)?;
                Ok(merge(&t, spec))
            }
        }
    }

    /// Where a workspace's `.opencode/` goes.
    pub(super) fn install_target(&self, ws: &Workspace) -> InstallTarget {
        if ws.is_container() {
            InstallTarget {
                root: self.ports.containers.tree_path(&ws.name),
                dir: CONTAINER_WORKDIR.trim_start_matches('/').into(),
                container: true,
            }
        } else {
            InstallTarget {
                root: ws.path.clone(),
                dir: PathBuf::new(),
                container: false,
            }
        }
    }

    /// A container's workspace directory exists once it is built.
    pub(super) fn library_dir_exists(&self, ws: &Workspace) -> bool {
        !ws.is_container() || self.ports.containers.is_built(ws)
    }

    /// Copies the workspace's skills and tools (the default host workspace: every skill), on a
    /// blocking thread: a Library entry can be thousands of files.
    pub(super) async fn install_library(&self, ws: &Workspace) -> Result<()> {
        let library = self.ports.library.clone();
        let target = self.install_target(ws);
        let (every_skill, skills, tools) =
            (ws.is_default_host(), ws.skills.clone(), ws.tools.clone());
        blocking(move || {
            let skills = if every_skill {
                library.skills()?
            } else {
                skills
            };
            library.install(&target, &skills, &tools)
        })
        .await
    }

    /// `Library::check` on a blocking thread (it reads every file of the entries).
    pub(super) async fn check_library(&self, skills: &[String], tools: &[String]) -> Result<()> {
        let library = self.ports.library.clone();
        let (skills, tools) = (skills.to_vec(), tools.to_vec());
        blocking(move || library.check(&skills, &tools)).await
    }

    /// `SyncWorkspace`: copies the skills and tools again from the Library as it is now.
    pub async fn sync(&self, key: &str) -> Result<()> {
        let ws = self.get(key)?;
        if !self.library_dir_exists(&ws) {
            // A built container whose /workspace is gone (its own code removed or replaced it).
            if matches!(ws.status, Status::Ready | Status::Paused) {
                return Err(Error::io_msg(format!(
                    "Cannot install skills and tools into workspace '{}': /workspace is not a directory in its tree",
                    ws.name
                )));
            }
            return Err(Error::NotReady {
                workspace: ws.name,
                status: ws.status.to_string(),
            });
        }
        self.install_library(&ws).await?;
        info!(workspace_id = %ws.id, workspace_name = %ws.name,
              "Synced skills and tools of {} from the Library", ws.name);
        Ok(())
    }

    /// The Library's skills and tools, by name (those that can be installed).
    pub async fn library(&self) -> Result<(Vec<String>, Vec<String>)> {
        let library = self.ports.library.clone();
        blocking(move || Ok((library.skills()?, library.tools()?))).await
    }

    pub async fn templates(&self) -> Result<Vec<Template>> {
        let library = self.ports.library.clone();
        blocking(move || library.templates()).await
    }

    pub async fn template(&self, name: &str) -> Result<Template> {
        crate::core::names::validate_library_name("template", name)
            .map_err(|e| Error::invalid("name", e))?;
        let library = self.ports.library.clone();
        let name = name.to_owned();
        blocking(move || library.template(&name)).await
    }
}
