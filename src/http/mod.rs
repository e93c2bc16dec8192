//! The REST bridge: HTTP in front of the D-Bus API, so authorization, validation and logs stay
//! in the service. The only module that knows HTTP. Every route calls one D-Bus method; errors
//! come back as `{"error": {"code", "message", "field"}}` with a status that fits the error.

use std::sync::Arc;

mod convert;
mod error;
mod files;
mod kept;
mod pages;
mod ports;
mod processes;
mod routes;
mod server;
mod snapshots;
mod stream;
mod terminal;

pub use error::ApiError;
pub use kept::cut_kept_on_status_changes;
pub use pages::OPENAPI;
pub use ports::{PortLimits, PortProxy};
pub use routes::app;
pub use server::{BODY_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_HEADER_BYTES, serve};
use {convert::*, error::*, pages::*, server::*};

/// Largest request body accepted (an exec's stdin travels in it).
pub const BODY_LIMIT: usize = 16 * 1024 * 1024;

pub struct AppState {
    pub conn: zbus::Connection,
    /// Where `conn` goes (None: the system bus); streaming execs open their own connection.
    pub bus_address: Option<String>,
    pub token: String,
    /// The port proxy's limits and its open connections.
    pub ports: PortProxy,
    /// MCP at `/mcp` (none: not served): the bus, the operator's `[mcp]` policy, the token's
    /// name as the caller.
    pub mcp: Option<Arc<crate::mcp::Shared>>,
}

/// The name of the bridge's one token, as the audit of MCP calls names the caller: the
/// systemd credential it is loaded as.
pub const TOKEN_NAME: &str = "api-token";

#[cfg(test)]
mod tests;
