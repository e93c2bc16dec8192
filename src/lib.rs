//! agent-workspaces: a D-Bus system service that gives AI agents safe places to work.
//!
//! # Layout
//!
//! - [`core`]: the domain. Workspace records, names, lifecycle, validation, the one error type
//!   and the [`core::Manager`] that runs every operation over port traits. No I/O.
//! - [`system`]: adapters to the machine: record store, host directories, command execution in
//!   per-command cgroups, containers (systemd, machined, the in-container agent), confined
//!   access to container trees, the Library, configuration, journal logging.
//! - [`dbus`]: the `org.agent.Workspaces` objects, error names, polkit authorization, and the
//!   client proxies. The only module that knows about D-Bus.
//! - [`http`]: the REST bridge and the dashboard; a D-Bus client of the service. The only
//!   module that knows about HTTP.
//! - [`cli`]: the command lines of the three programs (`src/bin/`), defined once.
//!
//! `ARCHITECTURE.md` at the top of the repository has the code map and the invariants.

pub mod cli;
pub mod core;
pub mod dbus;
pub mod failpoint;
pub mod http;
pub mod mcp;
pub mod system;

#[cfg(test)]
mod layout;
