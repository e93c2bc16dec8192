//! The dictionary a command sends, built as a REST body from its options and converted by
//! the bridge's own conversion (`dbus::schema`), so the command line reads the one schema.

use super::*;

/// A JSON object from a file (`create --from-json`: the REST API's create body).
fn json_file(path: &PathBuf) -> Result<Map<String, Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))? {
        Value::Object(m) => Ok(m),
        _ => Err(format!("{}: not a JSON object", path.display())),
    }
}

/// `KEY=VALUE` options as a JSON object of strings.
fn env_json(items: &[String]) -> Result<Value, String> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), Value::from(v)))
                .ok_or(format!("--env {kv}: expected KEY=VALUE"))
        })
        .collect::<Result<Map<String, Value>, String>>()
        .map(Value::Object)
}

/// Options of `create` and `update` as members of a REST body: the command line is one more
/// client of the bridge's conversion (`schema::Keys::from_json`), so both read one schema.
fn contents_json(c: &Contents, body: &mut Map<String, Value>) -> Result<(), String> {
    if !c.skills.is_empty() {
        body.insert("skills".into(), Value::from(c.skills.clone()));
    }
    if !c.tools.is_empty() {
        body.insert("tools".into(), Value::from(c.tools.clone()));
    }
    if !c.env.is_empty() {
        body.insert("env_vars".into(), env_json(&c.env)?);
    }
    if let Some(p) = &c.init_script {
        let script = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        body.insert("init_script".into(), Value::from(script));
    }
    Ok(())
}

/// Options of `exec`, `run` and `shell`: the command's directory and environment.
fn place_json(p: &Place, body: &mut Map<String, Value>) -> Result<(), String> {
    put(body, "cwd", p.cwd.clone());
    if !p.env.is_empty() {
        body.insert("env".into(), env_json(&p.env)?);
    }
    Ok(())
}

fn egress_json(e: &Egress, body: &mut Map<String, Value>) {
    let mut egress = Map::new();
    for (key, list) in [("allow", &e.egress_allow), ("deny", &e.egress_deny)] {
        if let Some(list) = list {
            let entries: Vec<Value> = list
                .iter()
                .filter(|d| !d.is_empty())
                .map(|d| Value::from(d.as_str()))
                .collect();
            egress.insert(key.to_owned(), Value::Array(entries));
        }
    }
    if !egress.is_empty() {
        body.insert(schema::EGRESS.to_owned(), Value::Object(egress));
    }
}

fn limits_json(l: &Limits, body: &mut Map<String, Value>) {
    let mut limits = Map::new();
    put(&mut limits, "memory_max", l.memory_max);
    put(&mut limits, "cpu_quota_percent", l.cpu_quota_percent);
    put(&mut limits, "tasks_max", l.tasks_max);
    put(&mut limits, "idle_pause_secs", l.idle_pause_secs);
    put(&mut limits, "idle_stop_secs", l.idle_stop_secs);
    if limits.is_empty() {
        return;
    }
    let all = body
        .entry(schema::LIMITS)
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(all) = all {
        all.extend(limits);
    }
}

fn put(body: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        body.insert(key.to_owned(), v.into());
    }
}

/// The dictionary a command sends (`None` for commands without one), built as a REST body and
/// converted by the bridge's own conversion, so the command line reads the one schema.
pub(super) fn request(command: &Command) -> Result<Option<Dict>, String> {
    let mut body = Map::new();
    let keys = match command {
        Command::Create {
            name,
            workspace_type,
            distro,
            template,
            path,
            contents,
            network,
            egress,
            limits,
            build,
            from_json,
        } => {
            if let Some(p) = from_json {
                body = json_file(p)?;
            }
            put(&mut body, "name", name.clone());
            put(&mut body, "workspace_type", workspace_type.clone());
            put(&mut body, "distro", distro.clone());
            put(&mut body, "template", template.clone());
            put(&mut body, "path", path.clone());
            put(&mut body, "network", network.clone());
            put(&mut body, "build_on_create", build.then_some(true));
            contents_json(contents, &mut body)?;
            egress_json(egress, &mut body);
            limits_json(limits, &mut body);
            schema::CREATE
        }
        Command::Update {
            contents,
            network,
            egress,
            limits,
            ..
        } => {
            put(&mut body, "network", network.clone());
            contents_json(contents, &mut body)?;
            egress_json(egress, &mut body);
            limits_json(limits, &mut body);
            schema::CHANGES
        }
        Command::Fork {
            name,
            network,
            egress,
            limits,
            ..
        } => {
            put(&mut body, "name", Some(name.clone()));
            put(&mut body, "network", network.clone());
            egress_json(egress, &mut body);
            limits_json(limits, &mut body);
            schema::FORK
        }
        Command::Exec { timeout, place, .. } => {
            put(&mut body, "timeout_secs", *timeout);
            place_json(place, &mut body)?;
            schema::EXEC_WITH_FDS
        }
        Command::RerunInit { timeout, .. } => {
            put(&mut body, "timeout_secs", *timeout);
            schema::RERUN_INIT
        }
        Command::Run {
            background,
            place,
            pty,
            cols,
            rows,
            ..
        } => {
            place_json(place, &mut body)?;
            put(&mut body, "pty", pty.then_some(true));
            put(&mut body, "cols", *cols);
            put(&mut body, "rows", *rows);
            if *background {
                schema::START_PROCESS
            } else {
                schema::EXEC_WITH_FDS
            }
        }
        Command::Shell { place, .. } => {
            place_json(place, &mut body)?;
            schema::START_PROCESS
        }
        _ => return Ok(None),
    };
    keys.from_json(body).map(Some).map_err(|e| e.to_string())
}
