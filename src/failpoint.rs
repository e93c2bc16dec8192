//! Failpoints for the crash tests: with `AGENT_WORKSPACES_FAILPOINT=NAME` in its environment
//! the service kills itself with `SIGKILL` (as `kill -9` would: nothing cleaned up, nothing
//! flushed) when it reaches the point of that name. Unset (always, outside the system tests),
//! a point costs a comparison with a value read once.

use std::sync::OnceLock;

/// Ends the process here if `name` is the failpoint its environment names.
pub fn hit(name: &str) {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("AGENT_WORKSPACES_FAILPOINT").ok());
    if point.as_deref() == Some(name) {
        eprintln!("failpoint {name}: killing the service");
        // SAFETY: kill(2) of this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
