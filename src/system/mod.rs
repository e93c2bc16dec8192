//! Adapters to the machine: record store and directories on disk, host command execution,
//! configuration, logging. Implements the ports of `core`.

pub mod agent;
pub mod build;
pub mod cgroup;
pub mod config;
pub mod containers;
pub mod distro;
pub mod exec;
pub mod host_agent;
pub mod host_exec;
pub mod keep;
pub mod layer;
pub mod library;
pub mod logging;
mod output;
pub mod pipes;
pub mod spawn;
pub mod store;
pub mod systemd;
pub mod tree;
