//! The debug report: what the tree, systemd and machined say about a container.

use std::fs;
use std::time::Duration;

use crate::core::error::{Error, Result};
use crate::core::ports::{Containers, DebugInfo, DebugValue};
use crate::core::workspace::Workspace;
use crate::system::commands::cgroup::cgroup2_mount;
use crate::system::containers::layer;

use super::*;

impl NspawnContainers {
    /// Tries once whether copy-on-write trees can be made with the configured directories
    /// (`layer::probe`: a mount and an unmount, on a tree and a base of its own); why not, in
    /// words, where they cannot. Blocking.
    pub fn probe_copy_on_write(&self) -> Option<String> {
        let (machines, cache) = {
            let c = self.config();
            (c.machines_dir.clone(), c.cache_dir.clone())
        };
        let off = layer::probe(&machines, &cache).err();
        *self
            .copy_on_write_off
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = off.clone();
        off
    }

    pub(super) fn copy_on_write_off(&self) -> Option<String> {
        self.copy_on_write_off
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) async fn debug_report(&self, ws: &Workspace) -> Result<DebugInfo> {
        use DebugValue::{Bool, List, Str, U64};
        let path = self.tree_path(&ws.name);
        let mut info = DebugInfo::new();
        info.insert("tree".into(), Str(path.display().to_string()));
        // Everything read from the tree is resolved inside it and bounded: what the container
        // planted there (links, FIFOs, devices, huge files) costs an empty field, not a hang.
        let tree = self.tree(ws).ok();
        info.insert("tree_exists".into(), Bool(tree.is_some()));
        let layered = layer::is_mounted(&path);
        info.insert("tree_layered".into(), Bool(layered));
        if tree.is_some() && !layered {
            let why = match self.copy_on_write_off() {
                Some(reason) => format!(
                    "copy-on-write trees are off here: {reason}; to turn them on, {}",
                    layer::COPY_ON_WRITE_FIX
                ),
                None => "a full tree, made while copy-on-write trees were not available; a \
                    rebuild makes it copy-on-write"
                    .into(),
            };
            info.insert("tree_layered_reason".into(), Str(why));
        }
        info.insert(
            "init_script_present".into(),
            Bool(!ws.init_script.is_empty()),
        );
        let Some(tree) = tree else {
            return self.debug_units(ws, info).await;
        };
        let (tree, usage) = tokio::task::spawn_blocking(move || {
            let u = tree.disk_usage("", Duration::from_secs(3), 2_000_000);
            (tree, u)
        })
        .await
        .map_err(|e| Error::io_msg(format!("Cannot measure the tree: {e}")))?;
        info.insert("tree_size_bytes".into(), U64(usage.bytes));
        info.insert("tree_size_complete".into(), Bool(usage.complete));
        let present: Vec<String> = ["bin", "etc", "usr", "var", "tmp", "root", "workspace"]
            .into_iter()
            .filter(|d| tree.is_dir(d))
            .map(String::from)
            .collect();
        info.insert("directories".into(), List(present));
        let shell = ["bin/bash", "bin/sh"]
            .into_iter()
            .find(|s| tree.is_file(s))
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        info.insert("shell".into(), Str(shell));
        let changed = tree
            .modified(format!("{OWN_DIR}/init"))
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64);
        info.insert("init_script_changed_usec".into(), U64(changed));
        let os = ["etc/os-release", "usr/lib/os-release"]
            .into_iter()
            .find_map(|p| tree.read(p, 64 * 1024).ok())
            .unwrap_or_default();
        let pretty = String::from_utf8_lossy(&os)
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .unwrap_or("")
            .trim_matches('"')
            .chars()
            .take(256)
            .collect();
        info.insert("os_release".into(), Str(pretty));
        self.debug_units(ws, info).await
    }

    /// The part of a debug report that systemd and machined give.
    async fn debug_units(&self, ws: &Workspace, mut info: DebugInfo) -> Result<DebugInfo> {
        use DebugValue::{Bool, List, Str, U64};
        let leader = self.systemd.machine_leader(&ws.name).await?;
        info.insert(
            "machine_state".into(),
            Str(if leader.is_some() {
                "running"
            } else {
                "stopped"
            }
            .into()),
        );
        info.insert("leader".into(), U64(leader.map_or(0, u64::from)));
        let unit = unit_name(&ws.name);
        let state = self.systemd.unit_state(&unit).await?;
        info.insert("unit".into(), Str(unit));
        info.insert(
            "unit_state".into(),
            Str(state
                .as_ref()
                .map_or("not loaded".into(), |s| s.active_state.clone())),
        );
        let build_unit = build_unit_name(&ws.name);
        let build_state = self.systemd.unit_state(&build_unit).await?;
        info.insert("build_unit".into(), Str(build_unit));
        let (_, result_path) = self.plan_paths(ws);
        let build_result = match (build_state, read_result(&result_path)) {
            (Some(s), _) => format!("{} ({})", s.active_state, s.result),
            (None, Some(r)) if r.ok => "success".into(),
            (None, Some(r)) => format!("failed in step {}: {}", r.step, r.message),
            (None, None) => "not running".into(),
        };
        info.insert("build_result".into(), Str(build_result));
        // Limits are unit properties; whether the kernel enforces them depends on the cgroup
        // controllers delegated here. Say so rather than pretend.
        let controllers: Vec<String> = cgroup2_mount()
            .and_then(|m| fs::read_to_string(m.join("cgroup.controllers")).ok())
            .map(|c| c.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let l = ws.limits;
        let mut missing = Vec::new();
        for (set, controller, key) in [
            (l.memory_max.is_some(), "memory", "memory_max"),
            (l.cpu_quota_percent.is_some(), "cpu", "cpu_quota_percent"),
            (l.tasks_max.is_some(), "pids", "tasks_max"),
        ] {
            if set && !controllers.iter().any(|c| c == controller) {
                missing.push(format!("{key} is set but the {controller} controller is not available, so it is not enforced"));
            }
        }
        info.insert("memory_max".into(), U64(l.memory_max.unwrap_or(0)));
        info.insert(
            "cpu_quota_percent".into(),
            U64(l.cpu_quota_percent.map_or(0, u64::from)),
        );
        info.insert("tasks_max".into(), U64(l.tasks_max.unwrap_or(0)));
        info.insert("cgroup_controllers".into(), List(controllers));
        info.insert("limits_enforced".into(), Bool(missing.is_empty()));
        info.insert("limits_note".into(), Str(missing.join("; ")));
        let (_, lines) = self.init_log(ws, 1).await?;
        info.insert(
            "init_log".into(),
            Str(self.log_path(ws).display().to_string()),
        );
        info.insert("init_log_lines".into(), U64(u64::from(lines)));
        Ok(info)
    }
}
