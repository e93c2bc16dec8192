//! agent-workspaces: a D-Bus system service that gives AI agents safe places to work.
//!
//! # Layout
//!
//! - [`core`]: the domain. Workspace records, names, lifecycle, validation and the
//!   [`core::Manager`] that runs every operation over port traits. No I/O.
//! - [`system`]: adapters to the machine: record store, host directories, command execution in
//!   per-command cgroups, configuration, journal logging.
//! - [`dbus`]: the `org.agent.Workspaces` objects, errors, polkit authorization. The only
//!   module that knows about D-Bus.
//!
//! `ARCHITECTURE.md` at the top of the repository has the code map and the invariants.

pub mod cli;
pub mod core;
pub mod dbus;
pub mod http;
pub mod system;
