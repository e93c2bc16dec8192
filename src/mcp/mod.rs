//! MCP, the Model Context Protocol: the service's tools and resources for AI agents, on the
//! official Rust SDK (`rmcp`). The only module that knows MCP. Like the REST bridge it is a
//! D-Bus client of the service and decides nothing the service decides (polkit authorizes the
//! connection's user); it adds what the operator lets an agent touch (`policy.rs`), output a
//! model can read (`output.rs`), and an audit line per tool call (`audit.rs`).
//!
//! Served over stdio by `agent-workspaces-mcp` (as the agent's own user) and over Streamable
//! HTTP at `/mcp` by the REST bridge (as the bridge's user, behind its token).

pub mod audit;
pub mod bus;
mod calls;
mod exec;
mod files;
pub mod output;
pub mod policy;
mod resources;
pub mod tools;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig,
    SubscribeRequestParams, UnsubscribeRequestParams,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

pub use audit::Caller;
pub use bus::Bus;
pub use policy::{Policy, Section, Transport};

/// What every session of one server shares: the bus, the operator's policy, who calls.
pub struct Shared {
    pub bus: Bus,
    /// The limits of `caller` (and over HTTP, of the bridge's API token).
    pub policy: Policy,
    pub caller: Caller,
    /// Over HTTP: the MCP-only tokens, each with its own limits.
    pub tokens: Vec<policy::HttpToken>,
}

/// Put in an HTTP request's extensions by the bridge once its token is checked: the name of
/// the token it carried (`api-token`, or an MCP-only token's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenName(pub String);

impl Shared {
    /// The MCP-only token `given` is, if any: its SHA-256 compared with each in constant time.
    pub fn mcp_token(&self, given: &[u8]) -> Option<&policy::HttpToken> {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let hash = sha2::Sha256::digest(given);
        let mut found = None;
        for t in &self.tokens {
            if bool::from(hash.as_slice().ct_eq(&t.sha256)) {
                found = Some(t);
            }
        }
        found
    }

    /// The limits and the identity of a caller: the token the bridge found on its request
    /// (over HTTP), or this server's own. A name no token has gets nothing.
    fn who(&self, token: Option<&str>) -> (Cow<'_, Policy>, Caller) {
        match token {
            None => (Cow::Borrowed(&self.policy), self.caller.clone()),
            Some(name) => {
                let policy = match self.tokens.iter().find(|t| t.name == name) {
                    Some(t) => Cow::Borrowed(&t.policy),
                    None if self.caller == Caller::Token(name.to_owned()) => {
                        Cow::Borrowed(&self.policy)
                    }
                    None => Cow::Owned(Policy::nothing()),
                };
                (policy, Caller::Token(name.to_owned()))
            }
        }
    }
}

/// One MCP session's handler (stdio has one; HTTP one per client session).
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    subscriptions: Arc<resources::Subscriptions>,
    /// Over HTTP, the token that opened the session: a request of it with another token gets
    /// nothing (a session id is no credential).
    opened_by: Arc<OnceLock<Option<String>>>,
}

impl Server {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            subscriptions: Arc::new(resources::Subscriptions::new(shared.clone())),
            shared,
            opened_by: Arc::default(),
        }
    }

    /// The limits and identity of the caller of one request.
    fn who(&self, extensions: &rmcp::model::Extensions) -> (Cow<'_, Policy>, Caller) {
        let token = extensions
            .get::<http::request::Parts>()
            .and_then(|p| p.extensions.get::<TokenName>())
            .map(|t| t.0.clone());
        let opened_by = self.opened_by.get_or_init(|| token.clone());
        let (policy, caller) = self.shared.who(token.as_deref());
        if *opened_by != token {
            return (Cow::Owned(Policy::nothing()), caller);
        }
        (policy, caller)
    }
}

/// Why a tool call did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The operator's policy does not allow it (said before anything was done).
    Refused,
    /// The arguments are wrong.
    Invalid,
    /// The service (or the command's workspace) failed it.
    Failed,
    /// The client cancelled it.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct ToolError {
    pub why: Why,
    /// A stable name: the service's D-Bus error name (last part), or this server's.
    pub code: String,
    pub message: String,
}

impl ToolError {
    pub fn refused(r: policy::Refusal) -> Self {
        Self {
            why: Why::Refused,
            code: "NotAllowedByOperator".into(),
            message: r.0,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            why: Why::Invalid,
            code: "InvalidArgs".into(),
            message: message.into(),
        }
    }

    pub fn bus(e: zbus::Error) -> Self {
        let (code, message) = bus::failure(e);
        let why = if code == "InvalidArgs" {
            Why::Invalid
        } else {
            Why::Failed
        };
        Self { why, code, message }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            why: Why::Failed,
            code: "Internal".into(),
            message: message.into(),
        }
    }

    pub fn cancelled() -> Self {
        Self {
            why: Why::Cancelled,
            code: "Cancelled".into(),
            message: "the call was cancelled".into(),
        }
    }

    pub fn outcome(&self) -> &'static str {
        match self.why {
            Why::Refused => "refused",
            Why::Invalid => "invalid",
            Why::Failed => "failed",
            Why::Cancelled => "cancelled",
        }
    }
}

impl From<crate::core::Error> for ToolError {
    fn from(e: crate::core::Error) -> Self {
        Self::invalid(e.to_string())
    }
}

/// A tool's result: structured content, and the text a model reads first (the JSON when
/// none).
pub struct Done {
    pub value: Value,
    pub text: Option<String>,
}

impl Done {
    pub fn json(value: Value) -> Self {
        Self { value, text: None }
    }
}

fn result(r: &Result<Done, ToolError>) -> CallToolResult {
    match r {
        Ok(done) => {
            let text = done
                .text
                .clone()
                .unwrap_or_else(|| serde_json::to_string_pretty(&done.value).unwrap_or_default());
            let mut res = CallToolResult::success(vec![ContentBlock::text(text)]);
            res.structured_content = Some(done.value.clone());
            res
        }
        Err(e) => {
            let mut res = CallToolResult::error(vec![ContentBlock::text(format!(
                "Error ({}): {}",
                e.code, e.message
            ))]);
            res.structured_content = Some(json!({
                "error": {"code": e.code, "message": e.message, "outcome": e.outcome()}
            }));
            res
        }
    }
}

const INSTRUCTIONS: &str = "Workspaces are places to run commands: a container workspace is an \
    isolated Linux system (use it for anything untrusted), a host workspace is the server \
    itself. Start with list_workspaces; create_workspace makes a container. Run commands with \
    exec (short ones) or start_process (servers, long builds); read and write files with the \
    file tools; snapshot_workspace and fork_workspace keep and branch a workspace's state. \
    Resources: workspaces://list, workspace://NAME, workspace://NAME/init-log, \
    workspace://NAME/debug.";

#[allow(deprecated)] // `subscribe`/`unsubscribe`: what clients of protocol 2025-11-25 use.
impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_resources_subscribe()
                .enable_resources_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "agent-workspaces",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let (policy, _) = self.who(&context.extensions);
        Ok(ListToolsResult::with_all_items(
            tools::TOOLS
                .iter()
                .filter(|t| policy.tool_allowed(t.name))
                .map(tools::Spec::tool)
                .collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let started = Instant::now();
        let name = request.name.to_string();
        let Some(spec) = tools::spec(&name) else {
            return Err(ErrorData::invalid_params(
                format!("no tool named '{name}'"),
                None,
            ));
        };
        let workspace = Mutex::new(None::<String>);
        let (policy, caller) = self.who(&context.extensions);
        let r = match policy.check_tool(spec.name) {
            Err(refusal) => Err(ToolError::refused(refusal)),
            Ok(()) => {
                let call = calls::Call {
                    shared: &self.shared,
                    policy: &policy,
                    args: request.arguments.unwrap_or_default(),
                    context: &context,
                    workspace: &workspace,
                };
                call.run(spec.name).await
            }
        };
        let ws = workspace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        audit::record(
            &caller,
            spec.name,
            ws.as_deref(),
            r.as_ref().err(),
            started.elapsed(),
        );
        Ok(result(&r).into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let (policy, _) = self.who(&context.extensions);
        resources::list(&self.shared, &policy).await
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(resources::templates())
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let (policy, _) = self.who(&context.extensions);
        resources::read(&self.shared, &policy, &request.uri)
            .await
            .map(Into::into)
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let (policy, _) = self.who(&context.extensions);
        self.subscriptions
            .subscribe(&policy, request.uri, context.peer.clone())
            .await
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.subscriptions.unsubscribe(&request.uri);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
