//! What the operator lets an agent touch through an MCP server: named workspaces only, host
//! workspaces or not, a set of tools, and caps on what one call may ask. Set by the `[mcp]`
//! section of the configuration file and by the command line (which wins). Every refusal says
//! what was refused, why, and which setting decides it. Pure: the server asks, this answers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

/// How the server is reached: the default of `allow_host` differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Started by the agent as its own user (`agent-workspaces-mcp`).
    Stdio,
    /// `/mcp` on the REST bridge, behind its token.
    Http,
}

/// Largest timeout a call may ask when the operator set none: the service's own largest.
pub const DEFAULT_MAX_TIMEOUT_SECS: u32 = 3600;
/// Largest output (per stream) a call may ask when the operator set none.
pub const DEFAULT_MAX_OUTPUT_BYTES: u32 = 256 * 1024;
/// What a call gets when it asks no output size: enough for a model, not a flood.
pub const DEFAULT_OUTPUT_BYTES: u32 = 32 * 1024;
/// The smallest cap: a head and a tail worth reading.
pub const MIN_OUTPUT_BYTES: u32 = 256;

/// `[mcp]` of `/etc/agent-workspaces/config.toml`; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// Only these workspaces (names) are listed and reachable; creates and forks must be named
    /// one of them. Absent: every workspace the caller's polkit rights reach.
    pub workspaces: Option<Vec<String>>,
    /// Whether host workspaces (no isolation) are reachable. Default: yes over stdio (the
    /// agent's own user, as polkit allows), no over HTTP.
    pub allow_host: Option<bool>,
    /// Only these tools are listed and callable. Absent: all.
    pub tools: Option<Vec<String>>,
    /// Largest `timeout_secs` one call may ask (also the timeout of one that asks none).
    pub max_timeout_secs: Option<u32>,
    /// Largest `max_output_bytes` one call may ask (per stream).
    pub max_output_bytes: Option<u32>,
    /// `[mcp.tokens.NAME]`: tokens of the bridge's `/mcp` alone (their holders reach nothing
    /// else of the bridge), each with its limits over this section's.
    pub tokens: Option<BTreeMap<String, TokenSection>>,
}

/// `[mcp.tokens.NAME]`: an MCP-only token, given as the SHA-256 of its text (so the file that
/// names it holds no secret), and its limits, each over `[mcp]`'s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSection {
    /// Hex SHA-256 of the token: `printf %s "$TOKEN" | sha256sum`.
    pub sha256: String,
    pub workspaces: Option<Vec<String>>,
    pub allow_host: Option<bool>,
    pub tools: Option<Vec<String>>,
    pub max_timeout_secs: Option<u32>,
    pub max_output_bytes: Option<u32>,
}

impl TokenSection {
    fn limits(&self) -> Section {
        Section {
            workspaces: self.workspaces.clone(),
            allow_host: self.allow_host,
            tools: self.tools.clone(),
            max_timeout_secs: self.max_timeout_secs,
            max_output_bytes: self.max_output_bytes,
            tokens: None,
        }
    }
}

/// An MCP-only token of the bridge: its name (the caller, in the audit), its hash and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpToken {
    pub name: String,
    pub sha256: [u8; 32],
    pub policy: Policy,
}

/// The MCP-only tokens `[mcp.tokens]` names, each with `[mcp]` under its own limits.
pub fn http_tokens(section: &Section, known: &[&str]) -> Result<Vec<HttpToken>, String> {
    let mut out = Vec::new();
    for (name, t) in section.tokens.iter().flatten() {
        let ok_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok_name || name == "api-token" {
            return Err(format!(
                "[mcp.tokens.{name}]: a token's name is 1 to 64 of a-z 0-9 - _, and not api-token"
            ));
        }
        let hex = t.sha256.trim().to_ascii_lowercase();
        let mut sha256 = [0u8; 32];
        let valid = hex.len() == 64
            && hex
                .as_bytes()
                .chunks(2)
                .zip(sha256.iter_mut())
                .all(|(pair, b)| {
                    std::str::from_utf8(pair)
                        .ok()
                        .and_then(|p| u8::from_str_radix(p, 16).ok())
                        .map(|v| *b = v)
                        .is_some()
                });
        if !valid {
            return Err(format!(
                "[mcp.tokens.{name}] sha256: must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)"
            ));
        }
        let limits = Section {
            tokens: None,
            ..section.clone()
        }
        .overridden_by(t.limits());
        let policy = Policy::new(limits, Transport::Http, known)
            .map_err(|e| format!("[mcp.tokens.{name}]: {e}"))?;
        out.push(HttpToken {
            name: name.clone(),
            sha256,
            policy,
        });
    }
    Ok(out)
}

impl Section {
    /// The `[mcp]` section of the configuration file at `path`; a missing file is the defaults.
    /// The file's other sections are the service's (which checks them).
    pub fn load(path: &Path) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            mcp: Section,
        }
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<File>(&text)
                .map(|f| f.mcp)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// This section with `over`'s keys where it has them (the command line over the file).
    pub fn overridden_by(self, over: Section) -> Section {
        Section {
            workspaces: over.workspaces.or(self.workspaces),
            allow_host: over.allow_host.or(self.allow_host),
            tools: over.tools.or(self.tools),
            max_timeout_secs: over.max_timeout_secs.or(self.max_timeout_secs),
            max_output_bytes: over.max_output_bytes.or(self.max_output_bytes),
            tokens: over.tokens.or(self.tokens),
        }
    }
}

/// The limits in force for one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub workspaces: Option<BTreeSet<String>>,
    pub allow_host: bool,
    pub tools: Option<BTreeSet<String>>,
    pub max_timeout_secs: u32,
    pub max_output_bytes: u32,
}

/// A call the policy does not allow, in words for the model and the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Policy {
    /// The policy of `section` for `transport`; tool names are checked against `known`.
    pub fn new(section: Section, transport: Transport, known: &[&str]) -> Result<Self, String> {
        if let Some(tools) = &section.tools {
            let unknown: Vec<&str> = tools
                .iter()
                .map(String::as_str)
                .filter(|t| !known.contains(t))
                .collect();
            if !unknown.is_empty() {
                return Err(format!(
                    "unknown MCP tool(s) in the tool set: {}; known tools: {}",
                    unknown.join(", "),
                    known.join(", ")
                ));
            }
        }
        let max_output_bytes = section.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
        if max_output_bytes < MIN_OUTPUT_BYTES {
            return Err(format!(
                "max_output_bytes must be at least {MIN_OUTPUT_BYTES}, not {max_output_bytes}"
            ));
        }
        let max_timeout_secs = section.max_timeout_secs.unwrap_or(DEFAULT_MAX_TIMEOUT_SECS);
        if max_timeout_secs == 0 {
            return Err("max_timeout_secs must be at least 1".into());
        }
        Ok(Self {
            workspaces: section.workspaces.map(|w| w.into_iter().collect()),
            allow_host: section.allow_host.unwrap_or(transport == Transport::Stdio),
            tools: section.tools.map(|t| t.into_iter().collect()),
            max_timeout_secs,
            max_output_bytes,
        })
    }

    /// Nothing at all: no tool, no workspace (a caller the server cannot place).
    pub fn nothing() -> Self {
        Self {
            workspaces: Some(BTreeSet::new()),
            allow_host: false,
            tools: Some(BTreeSet::new()),
            max_timeout_secs: 1,
            max_output_bytes: MIN_OUTPUT_BYTES,
        }
    }

    pub fn tool_allowed(&self, tool: &str) -> bool {
        self.tools.as_ref().is_none_or(|t| t.contains(tool))
    }

    pub fn check_tool(&self, tool: &str) -> Result<(), Refusal> {
        if self.tool_allowed(tool) {
            return Ok(());
        }
        Err(Refusal(format!(
            "the tool '{tool}' is not enabled on this MCP server (the operator's tool set: {})",
            self.tools
                .iter()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Whether the workspace named `name` is one this server may show and touch.
    pub fn name_allowed(&self, name: &str) -> bool {
        self.workspaces.as_ref().is_none_or(|w| w.contains(name))
    }

    /// The check of a workspace the server is about to touch (as its record says), or make.
    pub fn check_workspace(&self, name: &str, workspace_type: &str) -> Result<(), Refusal> {
        if !self.name_allowed(name) {
            return Err(Refusal(format!(
                "workspace '{name}' is not among the workspaces this MCP server may use ({}); \
                 the operator sets them (--workspace, [mcp] workspaces)",
                self.workspaces
                    .iter()
                    .flatten()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if workspace_type != "container" && !self.allow_host {
            return Err(Refusal(format!(
                "workspace '{name}' is a host workspace (commands run on the server itself, \
                 without isolation), and this MCP server serves container workspaces only; \
                 the operator allows host workspaces with --allow-host ([mcp] allow_host = true)"
            )));
        }
        Ok(())
    }

    /// The timeout to ask the service for: `asked` (refused over the cap), or the cap.
    pub fn timeout(&self, asked: Option<u32>) -> Result<u32, Refusal> {
        match asked {
            None => Ok(self.max_timeout_secs),
            Some(0) => Err(Refusal("timeout_secs must be at least 1".into())),
            Some(t) if t > self.max_timeout_secs => Err(Refusal(format!(
                "timeout_secs {t} is over this MCP server's limit of {} s (set by the operator: \
                 --max-timeout-secs, [mcp] max_timeout_secs); ask for at most {} or start a \
                 background process (start_process) for longer work",
                self.max_timeout_secs, self.max_timeout_secs
            ))),
            Some(t) => Ok(t),
        }
    }

    /// The output bound of one call (per stream): `asked` (refused over the cap), or the
    /// default (never over the cap).
    pub fn output_bytes(&self, asked: Option<u32>) -> Result<usize, Refusal> {
        match asked {
            None => Ok(DEFAULT_OUTPUT_BYTES.min(self.max_output_bytes) as usize),
            Some(n) if n < MIN_OUTPUT_BYTES => Err(Refusal(format!(
                "max_output_bytes must be at least {MIN_OUTPUT_BYTES}"
            ))),
            Some(n) if n > self.max_output_bytes => Err(Refusal(format!(
                "max_output_bytes {n} is over this MCP server's limit of {} bytes (set by the \
                 operator: --max-output-bytes, [mcp] max_output_bytes)",
                self.max_output_bytes
            ))),
            Some(n) => Ok(n as usize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["exec", "list_workspaces", "read_file"];

    #[test]
    fn http_serves_containers_only_unless_the_operator_says_so() {
        let http = Policy::new(Section::default(), Transport::Http, KNOWN).unwrap();
        let e = http.check_workspace("host", "host").unwrap_err();
        assert!(e.0.contains("container workspaces only"), "{e}");
        assert!(e.0.contains("--allow-host"), "{e}");
        http.check_workspace("box", "container").unwrap();
        let stdio = Policy::new(Section::default(), Transport::Stdio, KNOWN).unwrap();
        stdio.check_workspace("host", "host").unwrap();
        let allowed = Section {
            allow_host: Some(true),
            ..Section::default()
        };
        Policy::new(allowed, Transport::Http, KNOWN)
            .unwrap()
            .check_workspace("host", "host")
            .unwrap();
        let denied = Section {
            allow_host: Some(false),
            ..Section::default()
        };
        assert!(
            Policy::new(denied, Transport::Stdio, KNOWN)
                .unwrap()
                .check_workspace("host", "host")
                .is_err()
        );
    }

    #[test]
    fn named_workspaces_and_tools_only() {
        let p = Policy::new(
            Section {
                workspaces: Some(vec!["box".into()]),
                tools: Some(vec!["exec".into()]),
                ..Section::default()
            },
            Transport::Stdio,
            KNOWN,
        )
        .unwrap();
        p.check_workspace("box", "container").unwrap();
        let e = p.check_workspace("web", "container").unwrap_err();
        assert!(
            e.0.contains("'web' is not among") && e.0.contains("(box)"),
            "{e}"
        );
        p.check_tool("exec").unwrap();
        let e = p.check_tool("read_file").unwrap_err();
        assert!(
            e.0.contains("'read_file' is not enabled") && e.0.contains(": exec)"),
            "{e}"
        );
        let e = Policy::new(
            Section {
                tools: Some(vec!["exec".into(), "rm_rf".into()]),
                ..Section::default()
            },
            Transport::Stdio,
            KNOWN,
        )
        .unwrap_err();
        assert!(
            e.contains("unknown MCP tool(s) in the tool set: rm_rf"),
            "{e}"
        );
    }

    #[test]
    fn caps_refuse_what_is_over_them_and_bound_what_asks_nothing() {
        let p = Policy::new(
            Section {
                max_timeout_secs: Some(60),
                max_output_bytes: Some(4096),
                ..Section::default()
            },
            Transport::Stdio,
            KNOWN,
        )
        .unwrap();
        assert_eq!(p.timeout(None), Ok(60));
        assert_eq!(p.timeout(Some(30)), Ok(30));
        let e = p.timeout(Some(61)).unwrap_err();
        assert!(
            e.0.contains("timeout_secs 61 is over") && e.0.contains("60 s"),
            "{e}"
        );
        assert!(p.timeout(Some(0)).is_err());
        assert_eq!(p.output_bytes(None), Ok(4096));
        assert_eq!(p.output_bytes(Some(1000)), Ok(1000));
        assert!(
            p.output_bytes(Some(4097))
                .unwrap_err()
                .0
                .contains("4096 bytes")
        );
        assert!(p.output_bytes(Some(10)).is_err());
        let d = Policy::new(Section::default(), Transport::Stdio, KNOWN).unwrap();
        assert_eq!(d.output_bytes(None), Ok(DEFAULT_OUTPUT_BYTES as usize));
        assert!(
            Policy::new(
                Section {
                    max_output_bytes: Some(10),
                    ..Section::default()
                },
                Transport::Stdio,
                KNOWN
            )
            .is_err()
        );
    }

    #[test]
    fn mcp_tokens_have_their_own_limits_over_the_sections() {
        let text = "[mcp]\nallow_host = false\nmax_timeout_secs = 60\n\
            [mcp.tokens.agent-1]\nsha256 = \"9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\"\n\
            workspaces = [\"box\"]\n";
        let section: Section = toml::from_str::<toml::Table>(text).unwrap()["mcp"]
            .clone()
            .try_into()
            .unwrap();
        let tokens = http_tokens(&section, KNOWN).unwrap();
        assert_eq!(tokens.len(), 1);
        let t = &tokens[0];
        assert_eq!(t.name, "agent-1");
        assert_eq!(t.sha256[..2], [0x9f, 0x86]);
        assert_eq!(t.policy.max_timeout_secs, 60, "the section's own");
        assert!(!t.policy.allow_host);
        assert!(
            t.policy.check_workspace("web", "container").is_err(),
            "its own"
        );
        let bad = |body: &str| {
            let text = format!("[mcp.tokens.x]\n{body}\n");
            let section: Section = toml::from_str::<toml::Table>(&text).unwrap()["mcp"]
                .clone()
                .try_into()
                .unwrap();
            http_tokens(&section, KNOWN).unwrap_err()
        };
        assert!(bad("sha256 = \"abc\"").contains("64 hex digits"));
        assert!(bad("sha256 = \"zz\"").contains("64 hex digits"));
        let mut named = section.clone();
        let t = named.tokens.as_mut().unwrap().remove("agent-1").unwrap();
        named.tokens.as_mut().unwrap().insert("api-token".into(), t);
        assert!(
            http_tokens(&named, KNOWN)
                .unwrap_err()
                .contains("not api-token")
        );
    }

    #[test]
    fn the_command_line_wins_over_the_file_key_by_key() {
        let file: Section =
            toml::from_str::<toml::Table>("[mcp]\nworkspaces = [\"a\"]\nmax_timeout_secs = 10\n")
                .unwrap()["mcp"]
                .clone()
                .try_into()
                .unwrap();
        let merged = file.overridden_by(Section {
            max_timeout_secs: Some(20),
            ..Section::default()
        });
        assert_eq!(merged.workspaces, Some(vec!["a".to_owned()]));
        assert_eq!(merged.max_timeout_secs, Some(20));
        let e = toml::from_str::<toml::Table>("[mcp]\nallow_hosts = true\n").unwrap()["mcp"]
            .clone()
            .try_into::<Section>()
            .unwrap_err();
        assert!(e.to_string().contains("allow_hosts"), "{e}");
    }
}
