//! `a{sv}` arguments into the core's typed requests. Each key's name and D-Bus type come from
//! `schema.rs`; an unknown key or a wrong type is `InvalidArgs` naming the key.

use std::collections::{BTreeMap, HashMap};

use zbus::OwnedVariant;

use super::error::{Error, Result};
use super::schema::{self, Keys};
use crate::core::ports::{ExecIo, WindowSize};
use crate::core::spec::{Changes, CreateSpec, ExecParams};

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
    })
}

pub fn changes(map: Dict) -> Result<Changes> {
    let mut a = Args::new(map, schema::CHANGES)?;
    Ok(Changes {
        env_vars: a.env("env_vars")?,
        init_script: a.take("init_script")?,
        skills: a.take("skills")?,
        tools: a.take("tools")?,
        network: a.take("network")?,
        egress_allow: a.take("egress_allow")?,
        egress_deny: a.take("egress_deny")?,
        memory_max: a.take("memory_max")?,
        cpu_quota_percent: a.take("cpu_quota_percent")?,
        tasks_max: a.take("tasks_max")?,
    })
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
