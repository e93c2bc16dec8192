//! workspacectl: a machinectl-like command for agent workspaces. A client of
//! `org.agent.Workspaces` on the system bus; calls allow interactive authorization, so polkit
//! can ask the user for a password.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use agent_workspaces::cli::workspacectl::{Cli, Command};
use serde_json::{Value, json};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use std::os::fd::AsFd;

use agent_workspaces::dbus::client::interactive::WorkspacesProxy;
use agent_workspaces::dbus::client::{Args, OwnedArgs, args, connect, variant_json};

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

/// The REST API's create body, converted as the bridge converts it.
fn spec_from_json(path: &PathBuf) -> Result<Dict, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let Value::Object(m) =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    else {
        return Err(format!("{}: not a JSON object", path.display()));
    };
    agent_workspaces::http::create_spec(m).map_err(|e| format!("{}: {e}", path.display()))
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
        Command::Create {
            name,
            workspace_type,
            distro,
            template,
            skills,
            tools,
            env,
            init_script,
            network,
            build,
            from_json,
        } => {
            let mut spec = match &from_json {
                Some(p) => spec_from_json(p)?,
                None => Dict::new(),
            };
            let mut put = |k: &str, v: Option<Variant<'static>>| {
                if let Some(v) = v {
                    spec.insert(k.to_owned(), v);
                }
            };
            put("name", name.map(Variant::from));
            put("workspace_type", workspace_type.map(Variant::from));
            put("distro", distro.map(Variant::from));
            put("template", template.map(Variant::from));
            put("network", network.map(Variant::from));
            put(
                "skills",
                (!skills.is_empty()).then(|| Variant::from(skills)),
            );
            put("tools", (!tools.is_empty()).then(|| Variant::from(tools)));
            put("build_on_create", build.then(|| Variant::from(true)));
            if !env.is_empty() {
                let map = env
                    .iter()
                    .map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .ok_or(format!("--env {kv}: expected KEY=VALUE"))
                    })
                    .collect::<Result<HashMap<String, String>, String>>()?;
                put("env_vars", Some(Variant::from(map)));
            }
            if let Some(p) = init_script {
                let script =
                    std::fs::read_to_string(&p).map_err(|err| format!("{}: {err}", p.display()))?;
                put("init_script", Some(Variant::from(script)));
            }
            let path = c.m.create_workspace(args(&spec)).await.map_err(e)?;
            print_dict(json_out, &c.properties(path).await.map_err(e)?);
        }
        Command::Build { workspace } => c.m.build_workspace(&workspace).await.map_err(e)?,
        Command::Rebuild { workspace } => c.m.rebuild_workspace(&workspace).await.map_err(e)?,
        Command::Destroy { workspace } => c.m.destroy_workspace(&workspace).await.map_err(e)?,
        Command::Sync { workspace } => c.m.sync_workspace(&workspace).await.map_err(e)?,
        Command::Exec {
            workspace,
            timeout,
            command,
        } => {
            let line = if command.len() == 1 {
                command[0].clone()
            } else {
                command
                    .iter()
                    .map(|a| quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let mut options = Dict::new();
            if let Some(t) = timeout {
                options.insert("timeout_secs".into(), Variant::from(t));
            }
            if json_out {
                let (code, out, err, timed_out, _) =
                    c.m.exec(&workspace, &line, args(&options))
                        .await
                        .map_err(e)?;
                println!(
                    "{:#}",
                    json!({"exit_code": code, "stdout": String::from_utf8_lossy(&out), "stderr": String::from_utf8_lossy(&err), "timed_out": timed_out})
                );
                return Ok(exit_status(code, timed_out));
            }
            // The command gets this process's own stdin, stdout and stderr: its output
            // appears as it is produced, and it can read what is typed or piped in.
            let [stdin, stdout, stderr] = own_streams()
                .map_err(|err| format!("workspacectl: cannot pass the standard streams: {err}"))?;
            let (code, timed_out, _) =
                c.m.exec_with_fds(
                    &workspace,
                    &line,
                    zbus::Fd::from(stdin.as_fd()),
                    zbus::Fd::from(stdout.as_fd()),
                    zbus::Fd::from(stderr.as_fd()),
                    args(&options),
                )
                .await
                .map_err(e)?;
            return Ok(exit_status(code, timed_out));
        }
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
        Command::RerunInit { workspace } => {
            let (code, out, err, timed_out, _) =
                c.m.rerun_init(&workspace, Args::new()).await.map_err(e)?;
            let _ = std::io::stdout().write_all(&out);
            let _ = std::io::stderr().write_all(&err);
            return Ok(exit_status(code, timed_out));
        }
        Command::Completions { .. } => unreachable!("answered before connecting"),
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

#[cfg(test)]
mod tests {
    use super::{quote, spec_from_json};

    #[test]
    fn from_json_takes_the_rest_create_body_limits_included() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("spec.json");
        std::fs::write(
            &file,
            r#"{"name": "box", "workspace_type": "container", "distro": "debian-bookworm",
                "limits": {"memory_max": 536870912, "cpu_quota_percent": 50, "tasks_max": 100},
                "env_vars": {"A": "1"}, "skills": ["web"], "build_on_create": true}"#,
        )
        .unwrap();
        let d = spec_from_json(&file.to_path_buf()).unwrap();
        assert_eq!(u64::try_from(&d["memory_max"]).unwrap(), 536870912);
        assert_eq!(u32::try_from(&d["cpu_quota_percent"]).unwrap(), 50);
        assert_eq!(u64::try_from(&d["tasks_max"]).unwrap(), 100);
        assert!(!d.contains_key("limits"));
        std::fs::write(&file, r#"{"name": "box", "limits": {"memory": 1}}"#).unwrap();
        let e = spec_from_json(&file.to_path_buf()).unwrap_err();
        assert!(e.contains("'limits.memory'"), "{e}");
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
