//! Logging: structured journal entries (fields without prefix, so `WORKSPACE_ID=` and
//! `MESSAGE_ID=` arrive as such) where journald runs, else readable lines on stderr.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The journal when its socket exists, else stderr.
    Auto,
    Journal,
    Stderr,
}

/// Installs the global subscriber. Returns where logs go.
pub fn init(target: Target) -> Result<&'static str, String> {
    let filter = EnvFilter::try_from_env("AGENT_WORKSPACES_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,zbus=warn"));
    let journal = match target {
        Target::Stderr => None,
        Target::Auto => tracing_journald::layer().ok(),
        Target::Journal => {
            Some(tracing_journald::layer().map_err(|e| format!("cannot reach the journal: {e}"))?)
        }
    };
    match journal {
        Some(layer) => {
            tracing_subscriber::registry()
                .with(filter)
                .with(layer.with_field_prefix(None))
                .init();
            Ok("journal")
        }
        None => {
            tracing_subscriber::registry()
                .with(filter)
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
                .init();
            Ok("stderr")
        }
    }
}
