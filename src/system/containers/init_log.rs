//! The init log: every build's and init run's output, bounded, read back by lines.

use std::fs::{self, OpenOptions};
use std::io::Write;

use crate::core::error::Result;
use crate::core::workspace::Workspace;

use super::*;

/// The init log is cut back to its last half when it grows past this.
pub(super) const LOG_MAX: u64 = 4 * 1024 * 1024;

impl NspawnContainers {
    /// Appends to the init log (cut back to its last half past `LOG_MAX`), on a blocking
    /// thread: the cut rewrites megabytes.
    pub(super) async fn append_to_log(&self, ws: &Workspace, text: &[u8]) {
        let path = self.log_path(ws);
        let text = text.to_vec();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                let _ = fs::create_dir_all(dir);
            }
            if fs::metadata(&path).is_ok_and(|m| m.len() > LOG_MAX)
                && let Ok(old) = fs::read(&path)
            {
                let keep = &old[old.len() - (LOG_MAX / 2) as usize..];
                let _ = fs::write(&path, keep);
            }
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&path) {
                let _ = f.write_all(&text);
            }
        })
        .await;
    }

    pub(super) async fn read_log(&self, ws: &Workspace, max_lines: u32) -> Result<(String, u32)> {
        let path = self.log_path(ws);
        let text = match tokio::fs::read(&path).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("read", &path, e)),
        };
        let lines: Vec<&str> = text.lines().collect();
        let total = lines.len() as u32;
        let from = if max_lines == 0 {
            0
        } else {
            lines.len().saturating_sub(max_lines as usize)
        };
        let mut content = lines[from..].join("\n");
        if !content.is_empty() {
            content.push('\n');
        }
        Ok((content, total))
    }
}
