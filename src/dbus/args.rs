//! `a{sv}` arguments into the core's typed requests. Every key is checked for its exact D-Bus
//! type; an unknown key or a wrong type is `InvalidArgs` naming the key.

use std::collections::{BTreeMap, HashMap};

use zbus::OwnedVariant;

use super::error::{Error, Result};
use crate::core::ports::ExecIo;
use crate::core::spec::{Changes, CreateSpec, ExecParams};

pub type Dict = HashMap<String, OwnedVariant>;

struct Args {
    map: Dict,
    what: &'static str,
    known: &'static [&'static str],
}

impl Args {
    fn new(map: Dict, what: &'static str, known: &'static [&'static str]) -> Result<Self> {
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let mut keys: Vec<_> = known.to_vec();
            keys.sort_unstable();
            return Err(Error::invalid(
                key.escape_default().to_string(),
                format!("unknown key in {what}; known keys: {}", keys.join(", ")),
            ));
        }
        Ok(Self { map, what, known })
    }

    fn take<T>(&mut self, key: &str, signature: &str) -> Result<Option<T>>
    where
        T: TryFrom<OwnedVariant, Error = zbus::Error>,
    {
        debug_assert!(self.known.contains(&key));
        let Some(v) = self.map.remove(key) else {
            return Ok(None);
        };
        let got = v.value_signature().to_string();
        if got != signature {
            return Err(Error::invalid(
                key,
                format!(
                    "expected type '{signature}', got '{got}' (in {})",
                    self.what
                ),
            ));
        }
        T::try_from(v)
            .map(Some)
            .map_err(|e| Error::invalid(key, format!("{e} (in {})", self.what)))
    }

    fn env(&mut self, key: &str) -> Result<Option<BTreeMap<String, String>>> {
        self.take::<HashMap<String, String>>(key, "a{ss}")
            .map(|m| m.map(|m| m.into_iter().collect()))
    }
}

const SPEC_KEYS: &[&str] = &[
    "name",
    "workspace_type",
    "distro",
    "env_vars",
    "init_script",
    "skills",
    "tools",
    "template",
    "path",
    "build_on_create",
    "network",
    "memory_max",
    "cpu_quota_percent",
    "tasks_max",
];

pub fn create_spec(map: Dict) -> Result<CreateSpec> {
    let mut a = Args::new(map, "the workspace spec", SPEC_KEYS)?;
    Ok(CreateSpec {
        name: a.take("name", "s")?,
        workspace_type: a.take("workspace_type", "s")?,
        distro: a.take("distro", "s")?,
        env_vars: a.env("env_vars")?,
        init_script: a.take("init_script", "s")?,
        skills: a.take("skills", "as")?,
        tools: a.take("tools", "as")?,
        template: a.take("template", "s")?,
        path: a.take("path", "s")?,
        build_on_create: a.take("build_on_create", "b")?,
        network: a.take("network", "s")?,
        memory_max: a.take("memory_max", "t")?,
        cpu_quota_percent: a.take("cpu_quota_percent", "u")?,
        tasks_max: a.take("tasks_max", "t")?,
    })
}

pub fn changes(map: Dict) -> Result<Changes> {
    let mut a = Args::new(
        map,
        "the changes",
        &[
            "env_vars",
            "init_script",
            "skills",
            "tools",
            "network",
            "memory_max",
            "cpu_quota_percent",
            "tasks_max",
        ],
    )?;
    Ok(Changes {
        env_vars: a.env("env_vars")?,
        init_script: a.take("init_script", "s")?,
        skills: a.take("skills", "as")?,
        tools: a.take("tools", "as")?,
        network: a.take("network", "s")?,
        memory_max: a.take("memory_max", "t")?,
        cpu_quota_percent: a.take("cpu_quota_percent", "u")?,
        tasks_max: a.take("tasks_max", "t")?,
    })
}

/// `Exec` options: `timeout_secs` u, `cwd` s, `env` a{ss}, `stdin` ay.
pub fn exec_params(command: String, map: Dict) -> Result<ExecParams> {
    let mut a = Args::new(
        map,
        "the exec options",
        &["timeout_secs", "cwd", "env", "stdin"],
    )?;
    let stdin = a.take("stdin", "ay")?.unwrap_or_default();
    exec_common(command, a, ExecIo::Collect { stdin })
}

/// `ExecWithFds` options: those of `Exec` but `stdin`, which is a descriptor of its own.
pub fn exec_fds_params(command: String, map: Dict, io: ExecIo) -> Result<ExecParams> {
    let a = Args::new(map, "the exec options", &["timeout_secs", "cwd", "env"])?;
    exec_common(command, a, io)
}

fn exec_common(command: String, mut a: Args, io: ExecIo) -> Result<ExecParams> {
    Ok(ExecParams {
        command,
        timeout_secs: a.take("timeout_secs", "u")?,
        cwd: a.take("cwd", "s")?,
        env: a.env("env")?.unwrap_or_default(),
        io,
    })
}

/// `RerunInit` options: `timeout_secs` u.
pub fn rerun_options(map: Dict) -> Result<Option<u32>> {
    let mut a = Args::new(map, "the rerun-init options", &["timeout_secs"])?;
    a.take("timeout_secs", "u")
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
