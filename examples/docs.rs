//! `make docs`: the manual pages of the three programs and workspacectl's shell completions,
//! rendered from their command-line definitions (src/cli.rs) into the directory given.
//!
//!   cargo run --example docs -- OUT
//!   OUT/man/workspacectl.1, workspacectl-SUBCOMMAND.1, agent-workspaced.8,
//!   agent-workspaces-http.8, agent-workspaces-mcp.1; OUT/completions/workspacectl.bash, _workspacectl, workspacectl.fish

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use agent_workspaces::cli;

fn man(cmd: clap::Command, section: &str, out: &Path) -> std::io::Result<()> {
    let name = cmd.get_name().to_owned();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .section(section)
        .source(format!("agent-workspaces {}", env!("CARGO_PKG_VERSION")))
        .manual("agent-workspaces")
        .render(&mut page)?;
    std::fs::write(out.join(format!("{name}.{section}")), page)
}

fn main() -> std::io::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "target/docs".into());
    let man_dir = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&completions)?;

    man(cli::daemon::Args::command(), "8", &man_dir)?;
    man(cli::http::Args::command(), "8", &man_dir)?;
    man(cli::mcp::Args::command(), "1", &man_dir)?;
    let ctl = cli::workspacectl::Cli::command();
    man(ctl.clone(), "1", &man_dir)?;
    // One page per subcommand, as git and systemd's tools do: their options in full.
    for sub in ctl.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("workspacectl-{}", sub.get_name());
        let name: &'static str = Box::leak(name.into_boxed_str());
        let page = sub
            .clone()
            .name(name)
            .bin_name(format!("workspacectl {}", sub.get_name()))
            .version(env!("CARGO_PKG_VERSION"));
        man(page, "1", &man_dir)?;
    }

    for (shell, file) in [
        (Shell::Bash, "workspacectl.bash"),
        (Shell::Zsh, "_workspacectl"),
        (Shell::Fish, "workspacectl.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(
            shell,
            &mut cli::workspacectl::Cli::command(),
            "workspacectl",
            &mut script,
        );
        std::fs::write(completions.join(file), script)?;
    }
    Ok(())
}
