//! System tests: the installed service on a real system bus, with real systemd, polkitd and
//! journald, inside the disposable test host. Run them with `make system-test`. One module per
//! area; `support` holds what they share.

mod boundary;
mod cli;
mod containers;
mod egress;
mod errors;
mod far;
mod file_clients;
mod files;
mod flatten;
mod host;
mod hostile;
mod lent;
mod library;
mod load;
mod mcp;
mod network;
mod ownership;
mod polkit;
mod ports;
mod processes;
mod rest;
mod service;
mod snapshots;
mod state;
mod support;
mod survival;
mod trees;

use support::*;
