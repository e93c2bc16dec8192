//! Commands and their streams: one command's life (`exec.rs`) in a cgroup of its own
//! (`cgroup.rs`), started here (`spawn.rs`) or by an agent (`agent/`), its output collected
//! (`output.rs`) or its streams made (`pipes.rs`); host workspaces' executor (`host.rs`) and
//! host agent (`host_agent.rs`); file calls through an agent or the service's own file thread
//! (`files.rs`); background processes kept across a restart (`keep.rs`).

pub mod agent;
pub mod cgroup;
pub mod exec;
pub mod files;
pub mod host;
pub mod host_agent;
pub mod keep;
pub mod kept;
mod output;
pub mod pipes;
pub mod relay;
pub mod spawn;
