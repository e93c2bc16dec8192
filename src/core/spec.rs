//! Requests as the core sees them, already typed by the transport layer (D-Bus `a{sv}`, JSON),
//! and the value checks every transport shares.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::error::{Error, Result};
use super::names::{validate_env_name, validate_name};
use super::workspace::{Distro, Limits, Network, WorkspaceType};

/// Size limits on caller input. Oversized values are refused with `InvalidArgs` naming the key.
pub mod limits {
    /// Linux refuses a single argument longer than this (MAX_ARG_STRLEN is 128 KiB including NUL).
    pub const COMMAND_MAX: usize = 128 * 1024 - 1;
    pub const INIT_SCRIPT_MAX: usize = 1024 * 1024;
    pub const ENV_VARS_MAX: usize = 256;
    pub const ENV_VALUE_MAX: usize = 32 * 1024;
    pub const STDIN_MAX: usize = 8 * 1024 * 1024;
    pub const PATH_MAX: usize = 4095;
    pub const LIST_MAX: usize = 256;
}

/// `CreateWorkspace` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSpec {
    pub name: Option<String>,
    pub workspace_type: Option<String>,
    pub distro: Option<String>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub init_script: Option<String>,
    pub skills: Option<Vec<String>>,
    pub tools: Option<Vec<String>>,
    pub template: Option<String>,
    pub path: Option<String>,
    pub build_on_create: Option<bool>,
    pub network: Option<String>,
    pub egress_allow: Option<Vec<String>>,
    pub egress_deny: Option<Vec<String>>,
    pub memory_max: Option<u64>,
    pub cpu_quota_percent: Option<u32>,
    pub tasks_max: Option<u64>,
    pub idle_pause_secs: Option<u32>,
    pub idle_stop_secs: Option<u32>,
}

/// `UpdateWorkspace` input: only the keys present change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub env_vars: Option<BTreeMap<String, String>>,
    pub init_script: Option<String>,
    pub skills: Option<Vec<String>>,
    pub tools: Option<Vec<String>>,
    /// Containers only; applies at the container's next start.
    pub network: Option<String>,
    /// Containers only; applied to a running container at once.
    pub egress_allow: Option<Vec<String>>,
    pub egress_deny: Option<Vec<String>>,
    /// Containers only; applied to a running container at once. 0 removes the limit.
    pub memory_max: Option<u64>,
    pub cpu_quota_percent: Option<u32>,
    pub tasks_max: Option<u64>,
    pub idle_pause_secs: Option<u32>,
    pub idle_stop_secs: Option<u32>,
}

/// `Exec` input.
#[derive(Debug, Default)]
pub struct ExecParams {
    pub command: String,
    pub timeout_secs: Option<u32>,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub io: crate::core::ports::ExecIo,
}

/// A create request after every check: what the manager acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCreate {
    pub name: String,
    pub workspace_type: WorkspaceType,
    pub distro: Option<Distro>,
    pub env_vars: BTreeMap<String, String>,
    pub init_script: String,
    pub skills: Vec<String>,
    pub tools: Vec<String>,
    pub template: String,
    pub path: Option<PathBuf>,
    pub build_on_create: bool,
    pub network: Network,
    pub egress_allow: Vec<String>,
    pub egress_deny: Vec<String>,
    pub limits: Limits,
}

fn invalid(key: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(key, why)
}

pub fn check_env(key: &str, env: &BTreeMap<String, String>) -> Result<()> {
    if env.len() > limits::ENV_VARS_MAX {
        return Err(invalid(
            key,
            format!("{} variables, at most {}", env.len(), limits::ENV_VARS_MAX),
        ));
    }
    for (name, value) in env {
        validate_env_name(name).map_err(|e| invalid(key, e))?;
        if value.len() > limits::ENV_VALUE_MAX {
            return Err(invalid(
                key,
                format!(
                    "value of {name} is {} bytes, at most {}",
                    value.len(),
                    limits::ENV_VALUE_MAX
                ),
            ));
        }
        if value.contains('\0') {
            return Err(invalid(key, format!("value of {name} contains a NUL byte")));
        }
    }
    Ok(())
}

fn check_init_script(script: &str) -> Result<()> {
    if script.len() > limits::INIT_SCRIPT_MAX {
        return Err(invalid(
            "init_script",
            format!(
                "{} bytes, at most {}",
                script.len(),
                limits::INIT_SCRIPT_MAX
            ),
        ));
    }
    Ok(())
}

fn check_list(key: &str, items: &[String]) -> Result<()> {
    if items.len() > limits::LIST_MAX {
        return Err(invalid(
            key,
            format!("at most {} entries", limits::LIST_MAX),
        ));
    }
    Ok(())
}

impl CreateSpec {
    /// Checks every value; nothing has been changed when this fails.
    pub fn validate(self) -> Result<ValidCreate> {
        let name = self
            .name
            .ok_or_else(|| invalid("name", "missing: every workspace needs a name"))?;
        validate_name(&name).map_err(|e| invalid("name", e))?;
        let workspace_type = match self.workspace_type.as_deref() {
            None => WorkspaceType::Host,
            Some(t) => t.parse().map_err(|e| invalid("workspace_type", e))?,
        };
        let distro = match self.distro.as_deref() {
            None | Some("") => None,
            Some(d) => Some(d.parse::<Distro>().map_err(|e| invalid("distro", e))?),
        };
        if workspace_type == WorkspaceType::Host && distro.is_some() {
            return Err(invalid("distro", "only container workspaces have a distro"));
        }
        if workspace_type == WorkspaceType::Container && distro.is_none() {
            return Err(invalid(
                "distro",
                format!(
                    "missing: a container workspace needs one of {}",
                    Distro::NAMES.join(", ")
                ),
            ));
        }
        let network = match self.network.as_deref() {
            // A host workspace is the host's network (the key is refused for it below).
            None if workspace_type == WorkspaceType::Host => Network::Host,
            None => Network::Internet,
            Some(n) => n.parse().map_err(|e| invalid("network", e))?,
        };
        let limits = Limits {
            memory_max: self.memory_max,
            cpu_quota_percent: self.cpu_quota_percent,
            tasks_max: self.tasks_max,
            idle_pause_secs: self.idle_pause_secs,
            idle_stop_secs: self.idle_stop_secs,
        };
        let egress_allow = check_egress("egress_allow", self.egress_allow.as_deref())?;
        let egress_deny = check_egress("egress_deny", self.egress_deny.as_deref())?;
        if workspace_type == WorkspaceType::Host {
            for (key, set) in [
                ("network", self.network.is_some()),
                ("egress_allow", self.egress_allow.is_some()),
                ("egress_deny", self.egress_deny.is_some()),
                ("memory_max", limits.memory_max.is_some()),
                ("cpu_quota_percent", limits.cpu_quota_percent.is_some()),
                ("tasks_max", limits.tasks_max.is_some()),
                ("idle_pause_secs", limits.idle_pause_secs.is_some()),
                ("idle_stop_secs", limits.idle_stop_secs.is_some()),
                ("build_on_create", self.build_on_create.is_some()),
            ] {
                if set {
                    return Err(invalid(key, "only container workspaces take it"));
                }
            }
        }
        if limits.memory_max == Some(0) {
            return Err(invalid("memory_max", "must be at least 1 byte"));
        }
        if limits.cpu_quota_percent == Some(0) {
            return Err(invalid("cpu_quota_percent", "must be at least 1"));
        }
        if limits.tasks_max == Some(0) {
            return Err(invalid("tasks_max", "must be at least 1"));
        }
        let env_vars = self.env_vars.unwrap_or_default();
        check_env("env_vars", &env_vars)?;
        let init_script = self.init_script.unwrap_or_default();
        check_init_script(&init_script)?;
        let skills = self.skills.unwrap_or_default();
        check_list("skills", &skills)?;
        let tools = self.tools.unwrap_or_default();
        check_list("tools", &tools)?;
        let path = match self.path {
            None => None,
            Some(p) => {
                if workspace_type != WorkspaceType::Host {
                    return Err(invalid("path", "only host workspaces take a path"));
                }
                if !p.starts_with('/') || p.len() > limits::PATH_MAX || p.contains('\0') {
                    return Err(invalid(
                        "path",
                        format!("'{}' is not an absolute path", p.escape_default()),
                    ));
                }
                if p.split('/').any(|c| c == "..") {
                    return Err(invalid("path", "'..' is not allowed"));
                }
                Some(PathBuf::from(p))
            }
        };
        Ok(ValidCreate {
            name,
            workspace_type,
            distro,
            env_vars,
            init_script,
            skills,
            tools,
            template: self.template.unwrap_or_default(),
            path,
            build_on_create: self.build_on_create.unwrap_or(false),
            network,
            egress_allow,
            egress_deny,
            limits,
        })
    }
}

/// An egress list checked and normalized (`core::egress`); none is an empty one.
fn check_egress(key: &str, list: Option<&[String]>) -> Result<Vec<String>> {
    list.map_or(Ok(Vec::new()), |l| super::egress::check(key, l))
}

impl Changes {
    /// Whether any of the container-only keys is present.
    pub fn container_keys(&self) -> Vec<&'static str> {
        [
            ("network", self.network.is_some()),
            ("egress_allow", self.egress_allow.is_some()),
            ("egress_deny", self.egress_deny.is_some()),
            ("memory_max", self.memory_max.is_some()),
            ("cpu_quota_percent", self.cpu_quota_percent.is_some()),
            ("tasks_max", self.tasks_max.is_some()),
            ("idle_pause_secs", self.idle_pause_secs.is_some()),
            ("idle_stop_secs", self.idle_stop_secs.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }

    /// The network asked for, checked.
    pub fn network(&self) -> Result<Option<Network>> {
        self.network
            .as_deref()
            .map(|n| n.parse().map_err(|e| invalid("network", e)))
            .transpose()
    }

    /// `limits` with the asked-for changes applied (0 removes a limit).
    pub fn apply_limits(&self, limits: Limits) -> Limits {
        fn changed<T: Default + PartialEq>(new: Option<T>, old: Option<T>) -> Option<T> {
            match new {
                None => old,
                Some(n) => (n != T::default()).then_some(n),
            }
        }
        Limits {
            memory_max: changed(self.memory_max, limits.memory_max),
            cpu_quota_percent: changed(self.cpu_quota_percent, limits.cpu_quota_percent),
            tasks_max: changed(self.tasks_max, limits.tasks_max),
            // 0 is a value here (never), not a removal.
            idle_pause_secs: self.idle_pause_secs.or(limits.idle_pause_secs),
            idle_stop_secs: self.idle_stop_secs.or(limits.idle_stop_secs),
        }
    }

    /// The egress lists asked for (allow, deny), checked and normalized (none: unchanged).
    pub fn egress(&self) -> Result<[Option<Vec<String>>; 2]> {
        Ok([
            self.egress_allow
                .as_deref()
                .map(|l| super::egress::check("egress_allow", l))
                .transpose()?,
            self.egress_deny
                .as_deref()
                .map(|l| super::egress::check("egress_deny", l))
                .transpose()?,
        ])
    }

    pub fn validate(&self) -> Result<()> {
        self.network()?;
        self.egress()?;
        if let Some(env) = &self.env_vars {
            check_env("env_vars", env)?;
        }
        if let Some(script) = &self.init_script {
            check_init_script(script)?;
        }
        for (key, list) in [("skills", &self.skills), ("tools", &self.tools)] {
            if let Some(list) = list {
                check_list(key, list)?;
                for n in list {
                    super::names::validate_library_name(&key[..key.len() - 1], n)
                        .map_err(|e| invalid(key, e))?;
                }
            }
        }
        Ok(())
    }
}

/// Every limit the service applies, from the configuration; reloaded as a whole. (A
/// workspace's own resource limits are `workspace::Limits`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceLimits {
    pub exec: ExecLimits,
    pub builds: BuildLimits,
    pub idle: IdleLimits,
}

/// How long a container workspace may sit idle (no command, process, file call or port
/// connection) before it is paused, or stopped, unless its own limits say otherwise; 0:
/// never (`[container] idle_pause_secs`, `idle_stop_secs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdleLimits {
    pub pause_secs: u32,
    pub stop_secs: u32,
}

/// Limits on commands (`[exec]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    pub default_timeout_secs: u32,
    pub max_timeout_secs: u32,
    pub max_output_bytes: usize,
    pub max_concurrent: usize,
    /// How long a command waits for a place when `max_concurrent` run, before
    /// `LimitsExceeded` (0: refused at once).
    pub queue_timeout_secs: u32,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self {
            default_timeout_secs: 300,
            max_timeout_secs: 3600,
            max_output_bytes: 1024 * 1024,
            max_concurrent: 64,
            queue_timeout_secs: 10,
        }
    }
}

/// Limits on container builds and their init scripts (`[container]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    /// Builds at once; more is `LimitsExceeded`.
    pub max_concurrent: usize,
    /// How long an init script may run.
    pub init_timeout_secs: u32,
}

impl Default for BuildLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 2,
            init_timeout_secs: 1800,
        }
    }
}

impl ExecParams {
    /// Checks the request against the limits; returns the timeout to use.
    pub fn validate(&self, limits: &ExecLimits) -> Result<u32> {
        if self.command.is_empty() {
            return Err(invalid("command", "empty"));
        }
        if self.command.len() > limits::COMMAND_MAX {
            return Err(invalid(
                "command",
                format!(
                    "{} bytes, at most {}",
                    self.command.len(),
                    limits::COMMAND_MAX
                ),
            ));
        }
        if self.command.contains('\0') {
            return Err(invalid("command", "contains a NUL byte"));
        }
        let timeout = self.timeout_secs.unwrap_or(limits.default_timeout_secs);
        if timeout == 0 || timeout > limits.max_timeout_secs {
            return Err(invalid(
                "timeout_secs",
                format!(
                    "{timeout} is out of range: 1 to {} seconds (the configured maximum)",
                    limits.max_timeout_secs
                ),
            ));
        }
        if let Some(cwd) = &self.cwd
            && (cwd.is_empty() || cwd.len() > limits::PATH_MAX || cwd.contains('\0'))
        {
            return Err(invalid("cwd", "must be a non-empty path"));
        }
        check_env("env", &self.env)?;
        if let crate::core::ports::ExecIo::Collect { stdin } = &self.io
            && stdin.len() > limits::STDIN_MAX
        {
            return Err(invalid(
                "stdin",
                format!("{} bytes, at most {}", stdin.len(), limits::STDIN_MAX),
            ));
        }
        Ok(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> CreateSpec {
        CreateSpec {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn key_of(e: Error) -> String {
        match e {
            e @ Error::InvalidArgs { .. } => e.to_string(),
            other => panic!("expected InvalidArgs, got {other:?}"),
        }
    }

    #[test]
    fn minimal_spec_is_a_host_workspace() {
        let v = spec("web").validate().unwrap();
        assert_eq!(v.workspace_type, WorkspaceType::Host);
        assert_eq!(v.name, "web");
        assert!(v.env_vars.is_empty() && v.path.is_none());
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases: Vec<(CreateSpec, &str)> = vec![
            (CreateSpec::default(), "'name'"),
            (spec("Bad"), "'name'"),
            (
                CreateSpec {
                    workspace_type: Some("vm".into()),
                    ..spec("a")
                },
                "'workspace_type'",
            ),
            (
                CreateSpec {
                    workspace_type: Some("container".into()),
                    distro: Some("gentoo".into()),
                    ..spec("a")
                },
                "'distro'",
            ),
            (
                CreateSpec {
                    env_vars: Some([("1X".to_string(), "v".to_string())].into()),
                    ..spec("a")
                },
                "'env_vars'",
            ),
            (
                CreateSpec {
                    env_vars: Some([("X".to_string(), "v".repeat(40_000))].into()),
                    ..spec("a")
                },
                "'env_vars'",
            ),
            (
                CreateSpec {
                    init_script: Some("x".repeat(limits::INIT_SCRIPT_MAX + 1)),
                    ..spec("a")
                },
                "'init_script'",
            ),
            (
                CreateSpec {
                    path: Some("relative/dir".into()),
                    ..spec("a")
                },
                "'path'",
            ),
            (
                CreateSpec {
                    path: Some("/srv/../etc".into()),
                    ..spec("a")
                },
                "'path'",
            ),
        ];
        for (s, key) in cases {
            let msg = key_of(s.clone().validate().unwrap_err());
            assert!(
                msg.contains(key),
                "{s:?}: message {msg:?} does not name {key}"
            );
        }
    }

    #[test]
    fn exec_timeout_bounds_name_the_maximum() {
        let limits = ExecLimits::default();
        let p = |t| ExecParams {
            command: "true".into(),
            timeout_secs: Some(t),
            ..Default::default()
        };
        assert_eq!(p(1).validate(&limits), Ok(1));
        assert_eq!(p(3600).validate(&limits), Ok(3600));
        for bad in [0, 3601] {
            let msg = key_of(p(bad).validate(&limits).unwrap_err());
            assert!(
                msg.contains("timeout_secs") && msg.contains("3600"),
                "{msg}"
            );
        }
        let default = ExecParams {
            command: "true".into(),
            ..Default::default()
        };
        assert_eq!(default.validate(&limits), Ok(300));
    }

    #[test]
    fn exec_refuses_oversized_command_and_stdin() {
        let limits = ExecLimits::default();
        let big = ExecParams {
            command: "x".repeat(limits::COMMAND_MAX + 1),
            ..Default::default()
        };
        assert!(key_of(big.validate(&limits).unwrap_err()).contains("'command'"));
        let stdin = ExecParams {
            command: "cat".into(),
            io: crate::core::ports::ExecIo::Collect {
                stdin: vec![0; limits::STDIN_MAX + 1],
            },
            ..Default::default()
        };
        assert!(key_of(stdin.validate(&limits).unwrap_err()).contains("'stdin'"));
    }
}
