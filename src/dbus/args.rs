//! `a{sv}` arguments into the core's typed requests. Each key's name and D-Bus type come from
//! `schema.rs`; an unknown key or a wrong type is `InvalidArgs` naming the key.

use std::collections::{BTreeMap, HashMap};

use zbus::OwnedVariant;

use super::error::{Error, Result};
use super::schema::{self, Keys};
use crate::core::files::{FileOp, FileRequest, check_path, flag};
use crate::core::ports::{ExecIo, WindowSize};
use crate::core::spec::{Changes, CreateSpec, ExecParams};
use agent_workspaces_agent::files::{MAX_DEPTH, MAX_LIST, MAX_WATCHED};

pub type Dict = HashMap<String, OwnedVariant>;

struct Args {
    map: Dict,
    keys: Keys,
}

impl Args {
    fn new(map: Dict, keys: Keys) -> Result<Self> {
        if let Some(key) = map.keys().find(|k| keys.get(k).is_none()) {
            return Err(keys.unknown(key));
        }
        Ok(Self { map, keys })
    }

    /// The value of `key`, which must have the schema's D-Bus type exactly.
    fn take<T>(&mut self, key: &str) -> Result<Option<T>>
    where
        T: TryFrom<OwnedVariant, Error = zbus::Error>,
    {
        let Some(signature) = self.keys.get(key).map(|k| k.ty.signature()) else {
            // A key the parser reads must be in the schema: a programming error, said as one.
            return Err(Error::invalid(
                key,
                format!("not a key of {}", self.keys.what),
            ));
        };
        let Some(v) = self.map.remove(key) else {
            return Ok(None);
        };
        let got = v.value_signature().to_string();
        if got != signature {
            return Err(Error::invalid(
                key,
                format!(
                    "expected type '{signature}', got '{got}' (in {})",
                    self.keys.what
                ),
            ));
        }
        T::try_from(v)
            .map(Some)
            .map_err(|e| Error::invalid(key, format!("{e} (in {})", self.keys.what)))
    }

    fn env(&mut self, key: &str) -> Result<Option<BTreeMap<String, String>>> {
        self.take::<HashMap<String, String>>(key)
            .map(|m| m.map(|m| m.into_iter().collect()))
    }
}

pub fn create_spec(map: Dict) -> Result<CreateSpec> {
    let mut a = Args::new(map, schema::CREATE)?;
    Ok(CreateSpec {
        name: a.take("name")?,
        workspace_type: a.take("workspace_type")?,
        distro: a.take("distro")?,
        env_vars: a.env("env_vars")?,
        init_script: a.take("init_script")?,
        skills: a.take("skills")?,
        tools: a.take("tools")?,
        template: a.take("template")?,
        path: a.take("path")?,
        build_on_create: a.take("build_on_create")?,
        network: a.take("network")?,
        egress_allow: a.take("egress_allow")?,
        egress_deny: a.take("egress_deny")?,
        memory_max: a.take("memory_max")?,
        cpu_quota_percent: a.take("cpu_quota_percent")?,
        tasks_max: a.take("tasks_max")?,
        idle_pause_secs: a.take("idle_pause_secs")?,
        idle_stop_secs: a.take("idle_stop_secs")?,
    })
}

pub fn changes(map: Dict) -> Result<Changes> {
    let mut a = Args::new(map, schema::CHANGES)?;
    let skills = a.take("skills")?;
    let tools = a.take("tools")?;
    Ok(Changes {
        skills,
        tools,
        ..settings(&mut a)?
    })
}

/// The keys `UpdateWorkspace` and `ForkWorkspace` share: all the changes but the Library's.
fn settings(a: &mut Args) -> Result<Changes> {
    Ok(Changes {
        env_vars: a.env("env_vars")?,
        init_script: a.take("init_script")?,
        skills: None,
        tools: None,
        network: a.take("network")?,
        egress_allow: a.take("egress_allow")?,
        egress_deny: a.take("egress_deny")?,
        memory_max: a.take("memory_max")?,
        cpu_quota_percent: a.take("cpu_quota_percent")?,
        tasks_max: a.take("tasks_max")?,
        idle_pause_secs: a.take("idle_pause_secs")?,
        idle_stop_secs: a.take("idle_stop_secs")?,
    })
}

/// `ForkWorkspace`'s spec (`schema::FORK`): the fork's name (required) and what it changes
/// of its source's settings.
pub fn fork_spec(map: Dict) -> Result<(String, Changes)> {
    let mut a = Args::new(map, schema::FORK)?;
    let name: Option<String> = a.take("name")?;
    let name =
        name.ok_or_else(|| Error::invalid("name", "missing: a fork needs a name of its own"))?;
    Ok((name, settings(&mut a)?))
}

/// `SnapshotWorkspace`'s options (`schema::SNAPSHOT`): none is known yet.
pub fn snapshot_options(map: Dict) -> Result<()> {
    Args::new(map, schema::SNAPSHOT).map(|_| ())
}

/// `Exec` options (`schema::EXEC`).
pub fn exec_params(command: String, map: Dict) -> Result<ExecParams> {
    let mut a = Args::new(map, schema::EXEC)?;
    let stdin = a.take("stdin")?.unwrap_or_default();
    exec_common(command, a, ExecIo::Collect { stdin })
}

/// `ExecWithFds` options (`schema::EXEC_WITH_FDS`): stdin is a descriptor of its own.
pub fn exec_fds_params(command: String, map: Dict, io: ExecIo) -> Result<ExecParams> {
    let a = Args::new(map, schema::EXEC_WITH_FDS)?;
    exec_common(command, a, io)
}

fn exec_common(command: String, mut a: Args, io: ExecIo) -> Result<ExecParams> {
    Ok(ExecParams {
        command,
        timeout_secs: a.take("timeout_secs")?,
        cwd: a.take("cwd")?,
        env: a.env("env")?.unwrap_or_default(),
        io,
    })
}

/// A background process's options as given.
pub struct ProcessOptions {
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// A pseudo-terminal of this size (80x24 unless given).
    pub terminal: Option<WindowSize>,
}

/// `StartProcess` options (`schema::START_PROCESS`): the call's environment and working
/// directory, and whether it runs on a terminal (`pty`) of what size (`cols`, `rows`).
pub fn process_options(map: Dict) -> Result<ProcessOptions> {
    let mut a = Args::new(map, schema::START_PROCESS)?;
    let cwd = a.take("cwd")?;
    let env = a.env("env")?.unwrap_or_default();
    let pty: bool = a.take("pty")?.unwrap_or(false);
    let cols: Option<u16> = a.take("cols")?;
    let rows: Option<u16> = a.take("rows")?;
    let terminal = if pty {
        let d = WindowSize::default();
        Some(WindowSize {
            cols: cols.unwrap_or(d.cols),
            rows: rows.unwrap_or(d.rows),
        })
    } else {
        if cols.is_some() || rows.is_some() {
            let which = if cols.is_some() { "cols" } else { "rows" };
            return Err(Error::invalid(which, "a terminal size needs pty: true"));
        }
        None
    };
    Ok(ProcessOptions { env, cwd, terminal })
}

/// A file call's request from its path and options (`schema::READ_FILE` and the others, one
/// per operation); `target` is `MoveFile`'s destination.
pub fn file_request(
    op: FileOp,
    path: &str,
    target: Option<&str>,
    map: Dict,
) -> Result<FileRequest> {
    let keys = match op {
        FileOp::Read => schema::READ_FILE,
        FileOp::Write => schema::WRITE_FILE,
        FileOp::List => schema::LIST_DIRECTORY,
        FileOp::MakeDirectory => schema::MAKE_DIRECTORY,
        FileOp::Remove => schema::REMOVE_FILE,
        FileOp::Move => schema::MOVE_FILE,
        FileOp::Watch => schema::WATCH_FILES,
        FileOp::Stat | FileOp::Download | FileOp::Upload => schema::FILE_IDENTITY,
    };
    check_path("path", path)?;
    let mut a = Args::new(map, keys)?;
    let mut req = FileRequest::new(op, path.as_bytes().to_vec());
    if let Some(t) = target {
        check_path("to", t)?;
        req.target = t.as_bytes().to_vec();
    }
    let mut set = |a: &mut Args, key: &str, bit: u32| -> Result<()> {
        if keys.get(key).is_some() && a.take::<bool>(key)?.unwrap_or(false) {
            req.flags |= bit;
        }
        Ok(())
    };
    set(&mut a, "create_parents", flag::PARENTS)?;
    set(&mut a, "parents", flag::PARENTS)?;
    set(&mut a, "append", flag::APPEND)?;
    set(&mut a, "exclusive", flag::EXCLUSIVE)?;
    set(&mut a, "recursive", flag::RECURSIVE)?;
    set(&mut a, "replace", flag::REPLACE)?;
    // An upload makes its directory (and the ones above it) where missing.
    if op == FileOp::Upload {
        req.flags |= flag::PARENTS;
    }
    if req.has(flag::APPEND) && req.has(flag::EXCLUSIVE) {
        return Err(Error::invalid(
            "append",
            "cannot be combined with exclusive",
        ));
    }
    let opt = |a: &mut Args, key: &str| -> Result<Option<u32>> {
        if keys.get(key).is_some() {
            a.take(key)
        } else {
            Ok(None)
        }
    };
    let opt64 = |a: &mut Args, key: &str| -> Result<Option<u64>> {
        if keys.get(key).is_some() {
            a.take(key)
        } else {
            Ok(None)
        }
    };
    if let Some(mode) = opt(&mut a, "mode")? {
        if mode > 0o7777 {
            return Err(Error::invalid(
                "mode",
                "permission bits: at most 0o7777 (4095)",
            ));
        }
        // 0 would mean "the default" to the agent: a file with no permission bits is asked
        // for as such.
        req.mode = mode;
    }
    if let Some(o) = opt64(&mut a, "offset")? {
        req.offset = o;
    }
    if let Some(l) = opt64(&mut a, "length")? {
        req.length = l;
    }
    if let Some(size) = opt64(&mut a, "size")? {
        req.flags |= flag::SIZED;
        req.length = size;
    }
    if let Some(d) = opt(&mut a, "depth")? {
        if d == 0 || d > MAX_DEPTH {
            return Err(Error::invalid("depth", format!("must be 1 to {MAX_DEPTH}")));
        }
        req.depth = d;
    }
    if let Some(l) = opt(&mut a, "limit")? {
        let max = if op == FileOp::Watch {
            MAX_WATCHED
        } else {
            MAX_LIST
        };
        if l == 0 || l > max {
            return Err(Error::invalid("limit", format!("must be 1 to {max}")));
        }
        req.limit = l;
    }
    for (key, field) in [("user", &mut req.user), ("group", &mut req.group)] {
        if let Some(v) = a.take::<String>(key)? {
            if v.is_empty() || v.contains(['\0', ':', '\n']) || v.len() > 256 {
                return Err(Error::invalid(
                    key,
                    "must be a user (or group) name or number",
                ));
            }
            *field = v.into_bytes();
        }
    }
    Ok(req)
}

/// `RerunInit` options (`schema::RERUN_INIT`).
pub fn rerun_options(map: Dict) -> Result<Option<u32>> {
    let mut a = Args::new(map, schema::RERUN_INIT)?;
    a.take("timeout_secs")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(items: Vec<(&str, OwnedVariant)>) -> Dict {
        items.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn s(v: &str) -> OwnedVariant {
        OwnedVariant::try_from(zbus::Variant::from(v)).unwrap()
    }

    /// A value of each schema type.
    fn sample(ty: schema::Type) -> OwnedVariant {
        use schema::Type;
        let v = match ty {
            Type::Str => zbus::Variant::from("x"),
            Type::Bool => zbus::Variant::from(true),
            Type::U16 => zbus::Variant::from(7u16),
            Type::U32 => zbus::Variant::from(7u32),
            Type::U64 => zbus::Variant::from(7u64),
            Type::Strings => zbus::Variant::from(vec!["x"]),
            Type::StrMap => zbus::Variant::from(HashMap::from([("K", "v")])),
            Type::Bytes => zbus::Variant::from(b"x".to_vec()),
        };
        OwnedVariant::try_from(v).unwrap()
    }

    fn full(keys: Keys) -> Dict {
        keys.keys
            .iter()
            .map(|k| (k.name.to_owned(), sample(k.ty)))
            .collect()
    }

    /// Every key of the schema reaches the typed request: none is accepted and dropped.
    #[test]
    fn every_schema_key_is_read() {
        let s = create_spec(full(schema::CREATE)).unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("None"), "{debug}");
        assert_eq!(
            debug.matches("Some(").count(),
            schema::CREATE.keys.len(),
            "{debug}"
        );
        let c = changes(full(schema::CHANGES)).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("None"), "{debug}");
        assert_eq!(debug.matches("Some(").count(), schema::CHANGES.keys.len());
        let p = exec_params("true".into(), full(schema::EXEC)).unwrap();
        assert_eq!((p.timeout_secs, p.cwd.as_deref()), (Some(7), Some("x")));
        assert_eq!(p.env["K"], "v");
        assert!(matches!(&p.io, ExecIo::Collect { stdin } if stdin == b"x"));
        let p = exec_fds_params(
            "true".into(),
            full(schema::EXEC_WITH_FDS),
            ExecIo::default(),
        );
        assert_eq!(p.unwrap().timeout_secs, Some(7));
        assert_eq!(rerun_options(full(schema::RERUN_INIT)).unwrap(), Some(7));
    }

    #[test]
    fn parses_every_spec_key() {
        let env: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        let spec = create_spec(dict(vec![
            ("name", s("web")),
            ("workspace_type", s("host")),
            ("env_vars", env.into()),
            ("path", s("/srv/web")),
            (
                "skills",
                OwnedVariant::try_from(zbus::Variant::from(vec!["a"])).unwrap(),
            ),
        ]))
        .unwrap();
        assert_eq!(spec.name.as_deref(), Some("web"));
        assert_eq!(spec.env_vars.unwrap()["A"], "1");
        assert_eq!(spec.skills.unwrap(), vec!["a".to_string()]);
        assert_eq!(spec.path.as_deref(), Some("/srv/web"));
    }

    #[test]
    fn unknown_key_and_wrong_type_name_the_key() {
        let e = create_spec(dict(vec![("colour", s("red"))])).unwrap_err();
        assert!(e.to_string().contains("'colour'"), "{e}");
        let e = create_spec(dict(vec![("name", OwnedVariant::from(5u32))])).unwrap_err();
        assert!(
            e.to_string().contains("'name'") && e.to_string().contains("'u'"),
            "{e}"
        );
        let e = exec_params(
            "true".into(),
            dict(vec![("timeout_secs", OwnedVariant::from(5i32))]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("'timeout_secs'"), "{e}");
        assert_eq!(
            zbus::DBusError::name(&e).as_str(),
            "org.freedesktop.DBus.Error.InvalidArgs"
        );
        assert_eq!(e.field(), Some("timeout_secs"));
    }

    #[test]
    fn exec_options() {
        let p = exec_params(
            "cat".into(),
            dict(vec![
                ("timeout_secs", OwnedVariant::from(9u32)),
                (
                    "stdin",
                    OwnedVariant::try_from(zbus::Variant::from(vec![1u8, 2])).unwrap(),
                ),
                ("cwd", s("sub")),
            ]),
        )
        .unwrap();
        assert!(matches!(&p.io, ExecIo::Collect { stdin } if stdin == &[1, 2]));
        assert_eq!((p.timeout_secs, p.cwd.as_deref()), (Some(9), Some("sub")));
        // With descriptors, stdin is one of them: the option is unknown.
        let e = exec_fds_params(
            "cat".into(),
            dict(vec![(
                "stdin",
                OwnedVariant::try_from(zbus::Variant::from(vec![1u8])).unwrap(),
            )]),
            ExecIo::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("'stdin'"), "{e}");
    }
}
