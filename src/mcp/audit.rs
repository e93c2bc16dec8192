//! One journal entry per tool call: the tool, the workspace, who called and the outcome, as
//! fields (`MCP_TOOL=`, `WORKSPACE_NAME=`, `CALLER_UID=` or `TOKEN_NAME=`, `OUTCOME=`,
//! `ERROR_CODE=`, `DURATION_USEC=`, under `MESSAGE_ID=` [`MCP_TOOL_CALLED`]), so
//! `journalctl MESSAGE_ID=... CALLER_UID=1000` answers who did what.

use std::time::Duration;

use tracing::{info, warn};

use super::ToolError;

/// `MESSAGE_ID` of a tool call's entry.
pub const MCP_TOOL_CALLED: &str = "7b0f6c4e2d8a4f51a3c9e1d25b6a8f04";

/// Who calls, as the transport knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Over stdio: the user the server runs as (the agent's, which polkit authorizes).
    Uid(u32),
    /// Over HTTP: the name of the token the request carried.
    Token(String),
}

impl Caller {
    /// This process's own user.
    pub fn this_process() -> Self {
        Self::Uid(nix::unistd::getuid().as_raw())
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Uid(uid) => write!(f, "uid {uid}"),
            Caller::Token(name) => write!(f, "token '{name}'"),
        }
    }
}

pub fn record(
    caller: &Caller,
    tool: &str,
    workspace: Option<&str>,
    error: Option<&ToolError>,
    took: Duration,
) {
    let (uid, token) = match caller {
        Caller::Uid(u) => (Some(*u), None),
        Caller::Token(t) => (None, Some(t.as_str())),
    };
    let outcome = error.map_or("ok", ToolError::outcome);
    let on = workspace
        .map(|w| format!(" on workspace '{w}'"))
        .unwrap_or_default();
    let usec = took.as_micros() as u64;
    match error {
        None => info!(
            message_id = MCP_TOOL_CALLED,
            mcp_tool = tool,
            workspace_name = workspace,
            caller_uid = uid,
            token_name = token,
            outcome,
            duration_usec = usec,
            "MCP: {tool}{on} by {caller}: ok"
        ),
        Some(e) => warn!(
            message_id = MCP_TOOL_CALLED,
            mcp_tool = tool,
            workspace_name = workspace,
            caller_uid = uid,
            token_name = token,
            outcome,
            error_code = e.code.as_str(),
            duration_usec = usec,
            "MCP: {tool}{on} by {caller}: {outcome}: {}",
            e.message
        ),
    }
}
