//! The workspace record, its kinds and its lifecycle.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a workspace's commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkspaceType {
    /// Directly on the server: full access, no isolation.
    Host,
    /// In an isolated tree run with systemd-nspawn.
    Container,
}

impl WorkspaceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Container => "container",
        }
    }
}

impl FromStr for WorkspaceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(Self::Host),
            "container" => Ok(Self::Container),
            _ => Err(format!(
                "unknown workspace_type '{}': expected 'host' or 'container'",
                s.escape_default()
            )),
        }
    }
}

/// Lifecycle: `pending -> building -> ready`, `error` on failure, `destroying` on the way out;
/// `ready <-> paused` (a container's processes frozen).
/// A destroyed workspace has no record, so "destroyed" is never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pending,
    Building,
    Ready,
    /// Ready, its container's processes frozen (memory kept, no CPU) until it is resumed.
    Paused,
    Error,
    Destroying,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Building => "building",
            Self::Ready => "ready",
            Self::Paused => "paused",
            Self::Error => "error",
            Self::Destroying => "destroying",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Distributions a container workspace can be built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distro {
    UbuntuNoble,
    UbuntuJammy,
    DebianBookworm,
    ArchLinux,
}

impl Distro {
    pub const ALL: [Distro; 4] = [
        Self::UbuntuNoble,
        Self::UbuntuJammy,
        Self::DebianBookworm,
        Self::ArchLinux,
    ];

    /// Every distro's name, as callers write it.
    pub const NAMES: [&'static str; Self::ALL.len()] = {
        let mut names = [""; Self::ALL.len()];
        let mut i = 0;
        while i < names.len() {
            names[i] = Self::ALL[i].as_str();
            i += 1;
        }
        names
    };

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UbuntuNoble => "ubuntu-noble",
            Self::UbuntuJammy => "ubuntu-jammy",
            Self::DebianBookworm => "debian-bookworm",
            Self::ArchLinux => "arch-linux",
        }
    }
}

impl FromStr for Distro {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown distro '{}': expected one of {}",
                    s.escape_default(),
                    Self::NAMES.join(", ")
                )
            })
    }
}

/// A container's network: one of its own with the internet through NAT (the default for new
/// containers), a private one with only `lo`, or the host's (no network boundary). A record
/// without one is from before `internet` existed, when the host's was the default: it keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    #[default]
    Host,
    Private,
    Internet,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Private => "private",
            Self::Internet => "internet",
        }
    }
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(Self::Host),
            "private" => Ok(Self::Private),
            "internet" => Ok(Self::Internet),
            _ => Err(format!(
                "unknown network '{}': expected 'internet', 'private' or 'host'",
                s.escape_default()
            )),
        }
    }
}

/// Resource limits of a container, applied as unit properties, and how long it may sit idle
/// before it is paused or stopped (none: the service's default; 0: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_max: Option<u64>,
    pub cpu_quota_percent: Option<u32>,
    pub tasks_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_pause_secs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_stop_secs: Option<u32>,
}

/// One workspace, as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    pub id: String,
    pub name: String,
    pub workspace_type: WorkspaceType,
    pub status: Status,
    #[serde(default)]
    pub error_message: String,
    /// The workspace directory on the host (host workspaces).
    pub path: PathBuf,
    /// True when the service created `path` and so removes it on destroy; false for a directory
    /// the caller chose, which is never deleted.
    pub owns_path: bool,
    #[serde(default)]
    pub distro: Option<Distro>,
    /// Values are secret: never logged, never in a public property.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default)]
    pub init_script: String,
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub template: String,
    /// Microseconds since the Unix epoch.
    pub created_at_usec: u64,
    #[serde(default)]
    pub network: Network,
    /// Egress rules of a container with a network of its own (`core::egress`), normalized.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_deny: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Where a build is ("unpack", "init", ...); empty when no build runs.
    #[serde(default)]
    pub build_step: String,
}

impl Workspace {
    pub fn is_default_host(&self) -> bool {
        self.id == super::names::DEFAULT_HOST
    }

    pub fn is_container(&self) -> bool {
        self.workspace_type == WorkspaceType::Container
    }
}

/// A workspace property that a change touched; the D-Bus layer emits `PropertiesChanged` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Status,
    ErrorMessage,
    EnvVarNames,
    Skills,
    Tools,
    Network,
    Egress,
    Limits,
    BuildStep,
    /// Its snapshots (taken, deleted).
    Snapshots,
}
