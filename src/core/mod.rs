//! The domain: names, the workspace record and its lifecycle, request validation, and the
//! manager that runs every operation over port traits. No D-Bus, HTTP, processes or files here.

pub mod egress;
pub mod error;
pub mod files;
pub mod manager;
pub mod messages;
pub mod names;
pub mod ports;
pub mod spec;
pub mod template;
pub mod workspace;

pub use error::{Error, Result};
pub use manager::{Manager, Ports};

#[cfg(test)]
pub(crate) mod fakes;
#[cfg(test)]
mod tests;
