//! The keys of every request dictionary (`a{sv}`) of the API, described once: name and type.
//!
//! Read by the D-Bus parser (`args.rs`: unknown keys and wrong types are `InvalidArgs` naming
//! the key), by the JSON conversion that the REST bridge and `workspacectl` share
//! (`Keys::from_json`), and by the tests that keep the OpenAPI document's request bodies and
//! `workspacectl`'s options equal to it. A new option is one entry here, plus the code that
//! implements it.

use std::collections::HashMap;

use serde_json::{Map, Value};
use zbus::Variant;

use super::client::OwnedArgs;
use crate::core::Error;

/// A key's D-Bus type; in JSON each has one form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// `s`: a JSON string.
    Str,
    /// `b`: true or false.
    Bool,
    /// `q`: a non-negative integer below 2^16.
    U16,
    /// `u`: a non-negative integer below 2^32.
    U32,
    /// `t`: a non-negative integer.
    U64,
    /// `as`: an array of strings.
    Strings,
    /// `a{ss}`: an object of strings.
    StrMap,
    /// `ay`: bytes; in JSON, a string (its UTF-8 bytes).
    Bytes,
}

impl Type {
    pub const fn signature(self) -> &'static str {
        match self {
            Self::Str => "s",
            Self::Bool => "b",
            Self::U16 => "q",
            Self::U32 => "u",
            Self::U64 => "t",
            Self::Strings => "as",
            Self::StrMap => "a{ss}",
            Self::Bytes => "ay",
        }
    }

    /// The JSON form, in words.
    pub const fn json_form(self) -> &'static str {
        match self {
            Self::Str | Self::Bytes => "a string",
            Self::Bool => "true or false",
            Self::U16 => "an integer from 0 to 65535",
            Self::U32 | Self::U64 => "a non-negative integer",
            Self::Strings => "an array of strings",
            Self::StrMap => "an object of strings",
        }
    }

    /// The JSON Schema `type` of the JSON form.
    pub const fn json_type(self) -> &'static str {
        match self {
            Self::Str | Self::Bytes => "string",
            Self::Bool => "boolean",
            Self::U16 | Self::U32 | Self::U64 => "integer",
            Self::Strings => "array",
            Self::StrMap => "object",
        }
    }

    /// A JSON value of this form as a D-Bus value, or `None` if it has another form.
    fn dbus_value(self, value: &Value) -> Option<Variant<'static>> {
        Some(match (self, value) {
            (Self::Str, Value::String(s)) => Variant::from(s.clone()),
            (Self::Bytes, Value::String(s)) => Variant::from(s.as_bytes().to_vec()),
            (Self::Bool, Value::Bool(b)) => Variant::from(*b),
            (Self::U16, Value::Number(n)) => Variant::from(u16::try_from(n.as_u64()?).ok()?),
            (Self::U32, Value::Number(n)) => Variant::from(u32::try_from(n.as_u64()?).ok()?),
            (Self::U64, Value::Number(n)) => Variant::from(n.as_u64()?),
            (Self::Strings, Value::Array(items)) => Variant::from(
                items
                    .iter()
                    .map(|i| i.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>()?,
            ),
            (Self::StrMap, Value::Object(m)) => Variant::from(
                m.iter()
                    .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect::<Option<HashMap<String, String>>>()?,
            ),
            _ => return None,
        })
    }
}

/// Where a key sits in a REST (JSON) body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Json {
    /// A member of the body, under the key's own name.
    Member,
    /// A member of the body's `limits` object.
    Limit,
    /// A member of the body's `egress` object, named without `egress_` (`allow`, `deny`).
    Egress,
}

/// The object that holds the `Json::Limit` keys in a REST body.
pub const LIMITS: &str = "limits";
/// The object that holds the `Json::Egress` keys in a REST body.
pub const EGRESS: &str = "egress";

impl Json {
    /// The body's object that holds the keys of this place; none for members.
    pub const fn object(self) -> Option<&'static str> {
        match self {
            Self::Member => None,
            Self::Limit => Some(LIMITS),
            Self::Egress => Some(EGRESS),
        }
    }

    /// The name a key has at this place in JSON.
    pub fn json_name(self, key: &'static str) -> &'static str {
        match self {
            Self::Egress => key.strip_prefix("egress_").unwrap_or(key),
            _ => key,
        }
    }

    const NESTED: [Json; 2] = [Json::Limit, Json::Egress];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub ty: Type,
    pub json: Json,
}

const fn key(name: &'static str, ty: Type) -> Key {
    Key {
        name,
        ty,
        json: Json::Member,
    }
}

const fn limit(name: &'static str, ty: Type) -> Key {
    Key {
        name,
        ty,
        json: Json::Limit,
    }
}

const fn egress(name: &'static str) -> Key {
    Key {
        name,
        ty: Type::Strings,
        json: Json::Egress,
    }
}

/// The keys one dictionary argument accepts.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    /// The argument, in words ("the workspace spec"), for error messages.
    pub what: &'static str,
    pub keys: &'static [Key],
}

/// `CreateWorkspace`'s `spec`; the REST create body.
pub const CREATE: Keys = Keys {
    what: "the workspace spec",
    keys: &[
        key("name", Type::Str),
        key("workspace_type", Type::Str),
        key("distro", Type::Str),
        key("env_vars", Type::StrMap),
        key("init_script", Type::Str),
        key("skills", Type::Strings),
        key("tools", Type::Strings),
        key("template", Type::Str),
        key("path", Type::Str),
        key("build_on_create", Type::Bool),
        key("network", Type::Str),
        egress("egress_allow"),
        egress("egress_deny"),
        limit("memory_max", Type::U64),
        limit("cpu_quota_percent", Type::U32),
        limit("tasks_max", Type::U64),
        limit("idle_pause_secs", Type::U32),
        limit("idle_stop_secs", Type::U32),
    ],
};

/// `UpdateWorkspace`'s and `Update`'s `changes`; the REST PATCH body.
pub const CHANGES: Keys = Keys {
    what: "the changes",
    keys: &[
        key("env_vars", Type::StrMap),
        key("init_script", Type::Str),
        key("skills", Type::Strings),
        key("tools", Type::Strings),
        key("network", Type::Str),
        egress("egress_allow"),
        egress("egress_deny"),
        limit("memory_max", Type::U64),
        limit("cpu_quota_percent", Type::U32),
        limit("tasks_max", Type::U64),
        limit("idle_pause_secs", Type::U32),
        limit("idle_stop_secs", Type::U32),
    ],
};

/// `ForkWorkspace`'s and `Fork`'s `spec`; the REST fork body (with `snapshot`). The rest of a
/// fork's settings are its source's.
pub const FORK: Keys = Keys {
    what: "the fork spec",
    keys: &[
        key("name", Type::Str),
        key("env_vars", Type::StrMap),
        key("init_script", Type::Str),
        key("network", Type::Str),
        egress("egress_allow"),
        egress("egress_deny"),
        limit("memory_max", Type::U64),
        limit("cpu_quota_percent", Type::U32),
        limit("tasks_max", Type::U64),
        limit("idle_pause_secs", Type::U32),
        limit("idle_stop_secs", Type::U32),
    ],
};

/// `SnapshotWorkspace`'s and `Snapshot`'s `options`: none yet (a dictionary, so options can
/// come without a new signature).
pub const SNAPSHOT: Keys = Keys {
    what: "the snapshot options",
    keys: &[],
};

/// `stdin` last: `ExecWithFds` takes the others.
const EXEC_KEYS: &[Key] = &[
    key("timeout_secs", Type::U32),
    key("cwd", Type::Str),
    key("env", Type::StrMap),
    key("stdin", Type::Bytes),
];

/// `Exec`'s `options`; the REST exec body (with `command`).
pub const EXEC: Keys = Keys {
    what: "the exec options",
    keys: EXEC_KEYS,
};

/// `ExecWithFds`'s `options`: `Exec`'s but `stdin`, which is a descriptor of its own.
pub const EXEC_WITH_FDS: Keys = Keys {
    what: "the exec options",
    keys: EXEC_KEYS.split_at(EXEC_KEYS.len() - 1).0,
};

/// `StartProcess`'s `options`.
pub const START_PROCESS: Keys = Keys {
    what: "the process options",
    keys: &[
        key("cwd", Type::Str),
        key("env", Type::StrMap),
        key("pty", Type::Bool),
        key("cols", Type::U16),
        key("rows", Type::U16),
    ],
};

/// `RerunInit`'s `options`; the REST rerun-init body.
pub const RERUN_INIT: Keys = Keys {
    what: "the rerun-init options",
    keys: &[key("timeout_secs", Type::U32)],
};

/// Who a file call acts as (permissions checked as that user, what is made theirs): a name
/// or a number, looked up in the workspace's own `/etc/passwd` and `/etc/group`.
const USER: Key = key("user", Type::Str);
const GROUP: Key = key("group", Type::Str);

/// `ReadFile`'s `options`.
pub const READ_FILE: Keys = Keys {
    what: "the read options",
    keys: &[
        key("offset", Type::U64),
        key("length", Type::U64),
        USER,
        GROUP,
    ],
};

/// `WriteFile`'s `options`.
pub const WRITE_FILE: Keys = Keys {
    what: "the write options",
    keys: &[
        key("mode", Type::U32),
        key("create_parents", Type::Bool),
        key("append", Type::Bool),
        key("exclusive", Type::Bool),
        key("size", Type::U64),
        USER,
        GROUP,
    ],
};

/// `ListDirectory`'s `options`.
pub const LIST_DIRECTORY: Keys = Keys {
    what: "the listing options",
    keys: &[
        key("depth", Type::U32),
        key("limit", Type::U32),
        USER,
        GROUP,
    ],
};

/// `StatFile`'s, `Download`'s and `Upload`'s `options`.
pub const FILE_IDENTITY: Keys = Keys {
    what: "the file options",
    keys: &[USER, GROUP],
};

/// `MakeDirectory`'s `options`.
pub const MAKE_DIRECTORY: Keys = Keys {
    what: "the directory options",
    keys: &[
        key("parents", Type::Bool),
        key("mode", Type::U32),
        USER,
        GROUP,
    ],
};

/// `RemoveFile`'s `options`.
pub const REMOVE_FILE: Keys = Keys {
    what: "the removal options",
    keys: &[key("recursive", Type::Bool), USER, GROUP],
};

/// `MoveFile`'s `options`.
pub const MOVE_FILE: Keys = Keys {
    what: "the move options",
    keys: &[
        key("replace", Type::Bool),
        key("create_parents", Type::Bool),
        USER,
        GROUP,
    ],
};

/// `WatchFiles`' `options`.
pub const WATCH_FILES: Keys = Keys {
    what: "the watch options",
    keys: &[key("limit", Type::U32), USER, GROUP],
};

impl Keys {
    pub fn get(&self, name: &str) -> Option<&'static Key> {
        self.keys.iter().find(|k| k.name == name)
    }

    /// `InvalidArgs` for a key this dictionary does not have.
    pub fn unknown(&self, name: &str) -> Error {
        let mut known: Vec<&str> = self.keys.iter().map(|k| k.name).collect();
        known.sort_unstable();
        Error::invalid(
            name.escape_default().to_string(),
            format!(
                "unknown key in {}; known keys: {}",
                self.what,
                known.join(", ")
            ),
        )
    }

    /// The places of nested objects (`limits`, `egress`) this dictionary has keys at.
    pub fn nested(&self) -> Vec<Json> {
        Json::NESTED
            .into_iter()
            .filter(|p| self.keys.iter().any(|k| k.json == *p))
            .collect()
    }

    /// A REST body (JSON) as this dictionary: each member converted to its key's D-Bus type,
    /// the members of the `limits` and `egress` objects to top-level keys (`egress.allow` is
    /// `egress_allow`), `null` members left out. An unknown member or a wrong form is
    /// `InvalidArgs` naming it as the client wrote it (`limits.memory_max`).
    pub fn from_json(&self, body: Map<String, Value>) -> Result<OwnedArgs, Error> {
        let mut out = OwnedArgs::new();
        for (name, value) in body {
            if value.is_null() {
                continue;
            }
            if let Some(place) = self
                .nested()
                .into_iter()
                .find(|p| p.object() == Some(&name))
            {
                let Value::Object(members) = value else {
                    return Err(Error::invalid(
                        name,
                        format!("must be an object of {}", self.names(place).join(", ")),
                    ));
                };
                self.convert(place, members, &mut out)?;
                continue;
            }
            self.convert(Json::Member, Map::from_iter([(name, value)]), &mut out)?;
        }
        Ok(out)
    }

    fn convert(
        &self,
        place: Json,
        members: Map<String, Value>,
        out: &mut OwnedArgs,
    ) -> Result<(), Error> {
        let prefix = match place.object() {
            None => String::new(),
            Some(object) => format!("{object}."),
        };
        for (name, value) in members {
            if value.is_null() {
                continue;
            }
            let Some(key) = self
                .keys
                .iter()
                .find(|k| k.json == place && place.json_name(k.name) == name)
            else {
                let mut known = self.names(place);
                if place == Json::Member {
                    known.extend(self.nested().into_iter().filter_map(Json::object));
                }
                return Err(Error::invalid(
                    format!("{prefix}{name}"),
                    format!("unknown field; known fields: {}", known.join(", ")),
                ));
            };
            let v = key.ty.dbus_value(&value).ok_or_else(|| {
                Error::invalid(
                    format!("{prefix}{name}"),
                    format!("must be {}", key.ty.json_form()),
                )
            })?;
            out.insert(key.name.to_owned(), v);
        }
        Ok(())
    }

    /// The JSON names of the keys that sit at `place`.
    pub fn names(&self, place: Json) -> Vec<&'static str> {
        self.keys
            .iter()
            .filter(|k| k.json == place)
            .map(|k| place.json_name(k.name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_rest_body_becomes_the_dictionary_limits_lifted() {
        let d = CREATE
            .from_json(json(
                r#"{"name": "box", "skills": ["a"], "env_vars": {"A": "1"}, "build_on_create": true,
                    "limits": {"memory_max": 536870912, "cpu_quota_percent": 50}, "distro": null}"#,
            ))
            .unwrap();
        assert_eq!(d["name"], Variant::from("box"));
        assert_eq!(d["skills"], Variant::from(vec!["a"]));
        assert_eq!(d["build_on_create"], Variant::from(true));
        assert_eq!(d["memory_max"], Variant::from(536870912u64));
        assert_eq!(d["cpu_quota_percent"], Variant::from(50u32));
        assert!(!d.contains_key("distro") && !d.contains_key("limits"));
        // Every key's D-Bus type is the one the schema names.
        for (k, v) in &d {
            assert_eq!(
                v.value_signature(),
                CREATE.get(k).unwrap().ty.signature(),
                "{k}"
            );
        }
        let d = EXEC.from_json(json(r#"{"stdin": "hé"}"#)).unwrap();
        assert_eq!(d["stdin"], Variant::from("hé".as_bytes().to_vec()));
    }

    #[test]
    fn wrong_members_are_named_as_the_client_wrote_them() {
        let field = |keys: Keys, body: &str| match keys.from_json(json(body)) {
            Err(Error::InvalidArgs { field, reason }) => format!("{field}: {reason}"),
            other => panic!("{other:?}"),
        };
        assert_eq!(field(CREATE, r#"{"name": 5}"#), "name: must be a string");
        assert!(field(CREATE, r#"{"colour": "red"}"#).starts_with("colour: unknown field"));
        assert_eq!(
            field(CREATE, r#"{"limits": {"memory_max": -1}}"#),
            "limits.memory_max: must be a non-negative integer"
        );
        assert_eq!(
            field(CHANGES, r#"{"limits": {"cpu_quota_percent": 4294967296}}"#),
            "limits.cpu_quota_percent: must be a non-negative integer"
        );
        assert!(
            field(CREATE, r#"{"limits": {"memory": 1}}"#).starts_with("limits.memory: unknown")
        );
        assert!(field(CREATE, r#"{"limits": 5}"#).starts_with("limits: must be an object"));
        // Limits are members of `limits`, not of the body; exec has no `limits` at all.
        assert!(field(CREATE, r#"{"memory_max": 1}"#).starts_with("memory_max: unknown"));
        assert!(field(EXEC, r#"{"limits": {}}"#).starts_with("limits: unknown"));
        assert_eq!(
            field(EXEC, r#"{"env": {"A": 1}}"#),
            "env: must be an object of strings"
        );
    }

    #[test]
    fn exec_with_fds_takes_every_exec_option_but_stdin() {
        assert_eq!(EXEC_WITH_FDS.keys, &EXEC.keys[..EXEC.keys.len() - 1],);
        assert_eq!(EXEC.keys.last().unwrap().name, "stdin");
    }
}
