//! Adapters to the machine: record store and directories on disk, host command execution,
//! configuration, logging. Implements the ports of `core`.

pub mod config;
pub mod exec;
pub mod logging;
pub mod store;
