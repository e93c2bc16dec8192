//! A workspace's files: each file call checked, its paths made absolute (below the workspace's
//! directory for a host workspace, below `/workspace` in a container), and served by the
//! container's agent inside it or by the service for a host workspace. A stopped container is
//! started on use, as for `Exec`; a destroy waits for the calls that are being answered.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::exec::CommandPlace;
use super::{CONTAINER_WORKDIR, Manager};
use crate::core::error::{Error, Result};
use crate::core::files::{FileCall, FileOutcome, absolute};

impl Manager {
    /// Serves a file call in the workspace `key`. Relative paths are below the workspace's
    /// directory; `caller_gone` fires when the caller disconnects (a write in progress is
    /// then abandoned, leaving nothing).
    pub async fn files(
        &self,
        key: &str,
        mut call: FileCall,
        caller_gone: CancellationToken,
    ) -> Result<FileOutcome> {
        self.wake(key).await?;
        let CommandPlace {
            ws,
            running: _running,
            cancel,
            ..
        } = self.ready_for_command(key)?;
        let base = if ws.is_container() {
            Path::new(CONTAINER_WORKDIR)
        } else {
            ws.path.as_path()
        };
        call.req.path = absolute(base, &call.req.path);
        if !call.req.target.is_empty() {
            call.req.target = absolute(base, &call.req.target);
        }
        let served = async {
            if ws.is_container() {
                self.ports.containers.files(&ws, call, caller_gone).await
            } else {
                self.ports.executor.files(&ws.name, call, caller_gone).await
            }
        };
        tokio::select! {
            r = served => r,
            () = cancel.cancelled() => Err(Error::JobFailed(format!(
                "The file call in workspace '{}' was ended: the workspace is being destroyed or the service is stopping",
                ws.name
            ))),
        }
    }
}
