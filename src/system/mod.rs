//! Adapters to the machine, by room: `commands/` (commands and their streams, host and
//! container alike), `containers/` (container workspaces: trees, layers, builds, units and the
//! agent's leader), `network/` (containers' networks of their own: links, addresses, DNS,
//! the nftables table), and the record store, the Library, configuration, systemd and logging.
//! Implements the ports of `core`.

pub mod commands;
pub mod config;
pub mod containers;
pub mod library;
pub mod logging;
pub mod network;
pub mod store;
pub mod systemd;
