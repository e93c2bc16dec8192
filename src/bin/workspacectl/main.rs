//! workspacectl: a machinectl-like command for agent workspaces. A client of
//! `org.agent.Workspaces` on the system bus; calls allow interactive authorization, so polkit
//! can ask the user for a password.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use agent_workspaces::cli::workspacectl::{Cli, Command, Contents, Egress, Limits, Place};
use agent_workspaces::dbus::schema;
use serde_json::{Map, Value, json};
use zbus::{OwnedObjectPath, OwnedVariant};

use std::os::fd::AsFd;

use agent_workspaces::dbus::client::interactive::WorkspacesProxy;
use agent_workspaces::dbus::client::{OwnedArgs, args, connect, variant_json};

mod body;
mod files;
use body::request;
mod processes;

type Dict = OwnedArgs;

struct Client {
    /// Calls allow interactive authorization: polkit may ask for a password.
    m: WorkspacesProxy<'static>,
    conn: zbus::Connection,
}

impl Client {
    async fn properties(
        &self,
        path: OwnedObjectPath,
    ) -> zbus::Result<HashMap<String, OwnedVariant>> {
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination("org.agent.Workspaces")
            .path(path)
            .build()
            .await?;
        Ok(props
            .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
                "org.agent.Workspaces.Workspace",
            ))
            .await?)
    }
}

fn dict_json(d: &HashMap<String, OwnedVariant>) -> Value {
    let mut m: Vec<_> = d.iter().collect();
    m.sort_by(|a, b| a.0.cmp(b.0));
    Value::Object(
        m.into_iter()
            .map(|(k, v)| (k.clone(), variant_json(v)))
            .collect(),
    )
}

/// The exit status for a command's outcome: its own, or 124 (timeout(1)'s) when it timed out.
fn exit_status(code: i32, timed_out: bool) -> ExitCode {
    ExitCode::from(if timed_out {
        124
    } else {
        code.clamp(0, 255) as u8
    })
}

fn print_dict(json_out: bool, d: &HashMap<String, OwnedVariant>) {
    let v = dict_json(d);
    if json_out {
        println!("{v:#}");
        return;
    }
    if let Value::Object(m) = v {
        for (k, v) in m {
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            println!("{k:>24}: {text}");
        }
    }
}

/// Copies of descriptors 0, 1 and 2; /dev/null stands in for one that is closed.
fn own_streams() -> std::io::Result<[std::os::fd::OwnedFd; 3]> {
    let get = |fd: std::os::fd::BorrowedFd<'_>, write: bool| match fd.try_clone_to_owned() {
        Ok(fd) => Ok(fd),
        Err(_) => std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .open("/dev/null")
            .map(Into::into),
    };
    Ok([
        get(std::io::stdin().as_fd(), false)?,
        get(std::io::stdout().as_fd(), true)?,
        get(std::io::stderr().as_fd(), true)?,
    ])
}

/// Shell-quotes one argument (so `exec NAME -- ls "a b"` runs what was typed).
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// One shell command line: one word as it is, several quoted for the shell.
fn command_line(command: &[String]) -> String {
    if command.len() == 1 {
        command[0].clone()
    } else {
        command
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `exec` (and `run` without `--background`): the command gets this process's own stdin,
/// stdout and stderr; with `--json`, its output is collected instead.
async fn exec(
    c: &Client,
    workspace: &str,
    line: &str,
    options: Dict,
    json_out: bool,
) -> Result<ExitCode, String> {
    let e = |e: zbus::Error| agent_workspaces::core::Error::from(e).to_string();
    if json_out {
        let (code, out, err, timed_out, _) =
            c.m.exec(workspace, line, args(&options)).await.map_err(e)?;
        println!(
            "{:#}",
            json!({"exit_code": code, "stdout": String::from_utf8_lossy(&out), "stderr": String::from_utf8_lossy(&err), "timed_out": timed_out})
        );
        return Ok(exit_status(code, timed_out));
    }
    // Its output appears as it is produced, and it can read what is typed or piped in.
    let [stdin, stdout, stderr] = own_streams()
        .map_err(|err| format!("workspacectl: cannot pass the standard streams: {err}"))?;
    let (code, timed_out, _) =
        c.m.exec_with_fds(
            workspace,
            line,
            zbus::Fd::from(stdin.as_fd()),
            zbus::Fd::from(stdout.as_fd()),
            zbus::Fd::from(stderr.as_fd()),
            args(&options),
        )
        .await
        .map_err(e)?;
    Ok(exit_status(code, timed_out))
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "workspacectl",
            &mut std::io::stdout(),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let conn = connect(cli.bus_address.as_deref())
        .await
        .map_err(|e| format!("cannot connect to the bus: {e}"))?;
    let m = WorkspacesProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let c = Client { m, conn };
    // The service's error, as the service words it (the same enum the bridge maps to HTTP).
    let e = |e: zbus::Error| agent_workspaces::core::Error::from(e).to_string();
    let json_out = cli.json;
    // The command's dictionary argument, if it has one (checked before any call).
    let dict = request(&cli.command)?.unwrap_or_default();
    match cli.command {
        Command::List => {
            let all = c.m.list_workspaces().await.map_err(e)?;
            if json_out {
                let v: Vec<Value> = all
                    .iter()
                    .map(|w| json!({"id": w.0, "name": w.1, "workspace_type": w.2, "status": w.3}))
                    .collect();
                println!("{:#}", Value::Array(v));
            } else {
                println!("{:<38} {:<24} {:<10} STATUS", "ID", "NAME", "TYPE");
                for w in &all {
                    println!("{:<38} {:<24} {:<10} {}", w.0, w.1, w.2, w.3);
                }
                println!("\n{} workspaces listed.", all.len());
            }
        }
        Command::Status { workspace } => {
            let path = c.m.get_workspace(&workspace).await.map_err(e)?;
            print_dict(json_out, &c.properties(path).await.map_err(e)?);
        }
        Command::Create { .. } => {
            let path = c.m.create_workspace(args(&dict)).await.map_err(e)?;
            print_dict(json_out, &c.properties(path).await.map_err(e)?);
        }
        Command::Update { workspace, .. } => {
            c.m.update_workspace(&workspace, args(&dict))
                .await
                .map_err(e)?;
            let path = c.m.get_workspace(&workspace).await.map_err(e)?;
            print_dict(json_out, &c.properties(path).await.map_err(e)?);
        }
        Command::Build { workspace } => c.m.build_workspace(&workspace).await.map_err(e)?,
        Command::Rebuild { workspace } => c.m.rebuild_workspace(&workspace).await.map_err(e)?,
        Command::Destroy { workspace } => c.m.destroy_workspace(&workspace).await.map_err(e)?,
        Command::Sync { workspace } => c.m.sync_workspace(&workspace).await.map_err(e)?,
        Command::Start { workspace } => c.m.start_workspace(&workspace).await.map_err(e)?,
        Command::Stop { workspace } => c.m.stop_workspace(&workspace).await.map_err(e)?,
        Command::Pause { workspace } => c.m.pause_workspace(&workspace).await.map_err(e)?,
        Command::Resume { workspace } => c.m.resume_workspace(&workspace).await.map_err(e)?,
        Command::Snapshot { workspace, name } => {
            c.m.snapshot_workspace(&workspace, &name, args(&dict))
                .await
                .map_err(e)?
        }
        Command::Snapshots { workspace } => {
            let all = c.m.list_snapshots(&workspace).await.map_err(e)?;
            if json_out {
                let v: Vec<Value> = all
                    .iter()
                    .map(|s| json!({"name": s.0, "created_at": s.1, "bytes": s.2}))
                    .collect();
                println!("{:#}", Value::Array(v));
            } else {
                println!("{:<24} {:<26} BYTES", "NAME", "CREATED");
                for (name, created, bytes) in &all {
                    println!("{name:<24} {:<26} {bytes}", usec_time(*created));
                }
            }
        }
        Command::DeleteSnapshot { workspace, name } => {
            c.m.delete_snapshot(&workspace, &name).await.map_err(e)?
        }
        Command::Restore {
            workspace,
            snapshot,
        } => {
            c.m.restore_workspace(&workspace, &snapshot)
                .await
                .map_err(e)?
        }
        Command::Fork {
            source, snapshot, ..
        } => {
            let path =
                c.m.fork_workspace(&source, snapshot.as_deref().unwrap_or(""), args(&dict))
                    .await
                    .map_err(e)?;
            print_dict(json_out, &c.properties(path).await.map_err(e)?);
        }
        Command::Exec {
            workspace, command, ..
        }
        | Command::Run {
            workspace,
            command,
            background: false,
            ..
        } => {
            return exec(&c, &workspace, &command_line(&command), dict, json_out).await;
        }
        Command::Run {
            workspace, command, ..
        } => {
            let path =
                c.m.start_process(&workspace, &command_line(&command), args(&dict))
                    .await
                    .map_err(e)?;
            let id = path.as_str().rsplit('/').next().unwrap_or_default();
            if json_out {
                println!("{:#}", json!({"id": id, "path": path.as_str()}));
            } else {
                println!("{id}");
            }
        }
        Command::Shell {
            workspace, command, ..
        } => {
            let command = (!command.is_empty()).then(|| command_line(&command));
            let code = processes::shell(&c.conn, &c.m, &workspace, command, dict).await?;
            return Ok(exit_status(code, false));
        }
        Command::Attach { workspace, process } => {
            let code = processes::attach(&c.conn, &c.m, &workspace, &process).await?;
            return Ok(exit_status(code, false));
        }
        Command::Ps { workspace } => processes::ps(&c.m, &workspace, json_out).await?,
        Command::Logs {
            workspace,
            process,
            follow,
        } => processes::logs(&c.conn, &c.m, &workspace, &process, follow).await?,
        Command::Kill {
            workspace,
            process,
            signal,
        } => processes::kill(&c.conn, &c.m, &workspace, &process, signal).await?,
        Command::InitLog { workspace, lines } => {
            let (content, total) = c.m.get_init_log(&workspace, lines).await.map_err(e)?;
            if json_out {
                println!("{:#}", json!({"content": content, "total_lines": total}));
            } else {
                print!("{content}");
            }
        }
        Command::Debug { workspace } => {
            let info = c.m.get_debug_info(&workspace).await.map_err(e)?;
            print_dict(json_out, &info);
        }
        Command::RerunInit { workspace, .. } => {
            let (code, out, err, timed_out, _) =
                c.m.rerun_init(&workspace, args(&dict)).await.map_err(e)?;
            let _ = std::io::stdout().write_all(&out);
            let _ = std::io::stderr().write_all(&err);
            return Ok(exit_status(code, timed_out));
        }
        Command::Cp { src, dest, who } => files::cp(&c.m, &src, &dest, &who).await?,
        Command::Ls {
            workspace,
            path,
            depth,
            who,
        } => files::ls(&c.m, &workspace, &path, depth, &who, json_out).await?,
        Command::Cat {
            workspace,
            path,
            who,
        } => files::cat(&c.m, &workspace, &path, &who).await?,
        Command::Rm {
            workspace,
            path,
            recursive,
            who,
        } => {
            let o = files::options(&who, vec![("recursive", recursive.into())]);
            c.m.remove_file(&workspace, &path, o).await.map_err(e)?
        }
        Command::Mkdir {
            workspace,
            path,
            parents,
            who,
        } => {
            let o = files::options(&who, vec![("parents", parents.into())]);
            c.m.make_directory(&workspace, &path, o).await.map_err(e)?
        }
        Command::Mv {
            workspace,
            from,
            to,
            force,
            who,
        } => {
            let o = files::options(&who, vec![("replace", force.into())]);
            c.m.move_file(&workspace, &from, &to, o).await.map_err(e)?
        }
        Command::Watch {
            workspace,
            path,
            who,
        } => files::watch(&c.m, &workspace, &path, &who).await?,
        Command::Completions { .. } => unreachable!("answered before connecting"),
        Command::Library => {
            let (skills, tools) = c.m.list_library().await.map_err(e)?;
            if json_out {
                println!("{:#}", json!({"skills": skills, "tools": tools}));
            } else {
                println!("skills: {}\ntools: {}", skills.join(" "), tools.join(" "));
            }
        }
        Command::Template { name } => {
            print_dict(json_out, &c.m.get_template(&name).await.map_err(e)?);
        }
        Command::Templates => {
            let all = c.m.list_templates().await.map_err(e)?;
            if json_out {
                let v: Vec<Value> = all
                    .iter()
                    .map(|t| json!({"name": t.0, "description": t.1, "distro": t.2}))
                    .collect();
                println!("{:#}", Value::Array(v));
            } else {
                println!("{:<24} {:<18} DESCRIPTION", "NAME", "DISTRO");
                for t in &all {
                    println!("{:<24} {:<18} {}", t.0, t.2, t.1);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("workspacectl: {msg}");
            ExitCode::from(1)
        }
    }
}

/// A time in µs since the epoch as `YYYY-MM-DD HH:MM:SS` UTC (days to a civil date as in
/// Howard Hinnant's `civil_from_days`).
fn usec_time(usec: u64) -> String {
    let secs = usec / 1_000_000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_civil_dates() {
        assert_eq!(super::usec_time(0), "1970-01-01 00:00:00");
        // 2026-12-06 19:17:50 UTC
        assert_eq!(
            super::usec_time(1_796_584_670_000_000),
            "2026-12-06 19:17:50"
        );
        assert_eq!(super::usec_time(951_782_400_000_000), "2000-02-29 00:00:00");
    }

    use std::collections::BTreeSet;

    use super::*;

    fn dict(argv: &[&str]) -> Result<Dict, String> {
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        Ok(request(&cli.command)?.expect("the command takes a dictionary"))
    }

    fn keys(d: &Dict) -> BTreeSet<&str> {
        d.keys().map(String::as_str).collect()
    }

    fn all(k: schema::Keys) -> BTreeSet<&'static str> {
        k.keys.iter().map(|k| k.name).collect()
    }

    /// Every key of the schema has its option, with the schema's type: a key added to the
    /// schema without one fails here.
    #[test]
    fn every_schema_key_has_an_option() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("init.sh");
        std::fs::write(&script, "echo hi").unwrap();
        let script = script.to_str().unwrap();
        let contents = [
            "--skill",
            "a",
            "--tool",
            "t",
            "--env",
            "A=1",
            "--init-script",
            script,
        ];
        let limits = [
            "--memory-max",
            "1000000",
            "--cpu-quota-percent",
            "50",
            "--tasks-max",
            "10",
            "--idle-pause-secs",
            "300",
            "--idle-stop-secs",
            "0",
            "--egress-allow",
            "*.debian.org",
            "--egress-allow",
            "192.0.2.0/24",
            "--egress-deny",
            "",
        ];
        let mut argv = vec![
            "workspacectl",
            "create",
            "box",
            "--type",
            "container",
            "--distro",
            "debian-bookworm",
            "--template",
            "tpl",
            "--path",
            "/srv/box",
            "--network",
            "private",
            "--build",
        ];
        argv.extend(contents);
        argv.extend(limits);
        let d = dict(&argv).unwrap();
        assert_eq!(keys(&d), all(schema::CREATE));
        assert_eq!(
            String::try_from(d["init_script"].clone()).unwrap(),
            "echo hi"
        );
        assert_eq!(
            <Vec<String>>::try_from(d["egress_allow"].clone()).unwrap(),
            ["*.debian.org", "192.0.2.0/24"]
        );
        // An empty value empties the list.
        assert!(
            <Vec<String>>::try_from(d["egress_deny"].clone())
                .unwrap()
                .is_empty()
        );

        let mut argv = vec!["workspacectl", "update", "box", "--network", "host"];
        argv.extend(contents);
        argv.extend(limits);
        assert_eq!(keys(&dict(&argv).unwrap()), all(schema::CHANGES));

        let mut argv = vec![
            "workspacectl",
            "fork",
            "box",
            "box-2",
            "--snapshot",
            "s1",
            "--network",
            "private",
        ];
        argv.extend(limits.iter().filter(|a| {
            !a.starts_with("--egress") && !a.contains('.') && !a.contains('/') && !a.is_empty()
        }));
        let d = dict(&argv).unwrap();
        assert_eq!(String::try_from(d["name"].clone()).unwrap(), "box-2");
        assert_eq!(u32::try_from(d["idle_pause_secs"].clone()).unwrap(), 300);

        let d = dict(&[
            "workspacectl",
            "exec",
            "box",
            "--timeout",
            "5",
            "--cwd",
            "sub",
            "--env",
            "B=2",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(keys(&d), all(schema::EXEC_WITH_FDS));

        let d = dict(&["workspacectl", "rerun-init", "box", "--timeout", "5"]).unwrap();
        assert_eq!(keys(&d), all(schema::RERUN_INIT));

        let d = dict(&[
            "workspacectl",
            "run",
            "--background",
            "--pty",
            "--cols",
            "100",
            "--rows",
            "30",
            "box",
            "--cwd",
            "sub",
            "--env",
            "B=2",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(keys(&d), all(schema::START_PROCESS));
    }

    #[test]
    fn from_json_takes_the_rest_create_body_and_options_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("spec.json");
        std::fs::write(
            &file,
            r#"{"name": "box", "workspace_type": "container", "distro": "debian-bookworm",
                "limits": {"memory_max": 536870912, "cpu_quota_percent": 50},
                "env_vars": {"A": "1"}, "skills": ["web"], "build_on_create": true}"#,
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let d = dict(&[
            "workspacectl",
            "create",
            "--from-json",
            file,
            "--tasks-max",
            "100",
        ])
        .unwrap();
        assert_eq!(u64::try_from(&d["memory_max"]).unwrap(), 536870912);
        assert_eq!(u32::try_from(&d["cpu_quota_percent"]).unwrap(), 50);
        assert_eq!(u64::try_from(&d["tasks_max"]).unwrap(), 100);
        assert!(!d.contains_key("limits"));
        let d = dict(&["workspacectl", "create", "other", "--from-json", file]).unwrap();
        assert_eq!(String::try_from(d["name"].clone()).unwrap(), "other");
        std::fs::write(
            dir.path().join("bad.json"),
            r#"{"name": "box", "limits": {"memory": 1}}"#,
        )
        .unwrap();
        let bad = dir.path().join("bad.json");
        let e = dict(&[
            "workspacectl",
            "create",
            "--from-json",
            bad.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(e.contains("'limits.memory'"), "{e}");
        let e = dict(&[
            "workspacectl",
            "exec",
            "box",
            "--env",
            "novalue",
            "--",
            "true",
        ])
        .unwrap_err();
        assert!(e.contains("KEY=VALUE"), "{e}");
    }

    #[test]
    fn an_unknown_distro_is_refused_with_the_known_ones() {
        let e = dict(&["workspacectl", "create", "box", "--distro", "plan9"]).unwrap_err();
        assert!(
            e.contains("debian-bookworm") && e.contains("arch-linux"),
            "{e}"
        );
    }

    #[test]
    fn quoting_keeps_arguments_whole() {
        assert_eq!(quote("ls"), "ls");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("$HOME"), "'$HOME'");
    }
}
