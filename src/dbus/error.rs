//! How the one error type (`core::Error`) travels over D-Bus, both ways.
//!
//! The service's own conditions are named `org.agent.Workspaces.Error.*`; bad arguments,
//! refusals and I/O failures use the standard `org.freedesktop.DBus.Error.*` names clients
//! already handle. A reply carries the message first (what `busctl` and every client show),
//! then the variant's data as further strings (for `InvalidArgs`, the field), so that a client
//! (the bridge, `workspacectl`) gets the same variant back with `Error::from(zbus::Error)`,
//! without reading the prose.
//!
//! zbus itself turns the standard names into `fdo::Error`s, which keep only the message: an
//! `InvalidArgs` then comes back through the one format of its message, `Invalid 'FIELD':
//! REASON` (`Error::invalid_from_text`).
//!
//! (zbus's `DBusError` derive would put zbus into the core, name every variant under one
//! prefix, and send only a description; so the trait is implemented here by hand.)

use zbus::message::{Header, Message};
use zbus::names::ErrorName;

pub use crate::core::Error;
use crate::core::files::FileErrorKind;

pub const PREFIX: &str = "org.agent.Workspaces.Error.";
const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
const INTERACTIVE: &str = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";
const IO_ERROR: &str = "org.freedesktop.DBus.Error.IOError";

/// The D-Bus name of each variant; `from_reply` is its inverse.
fn name_of(e: &Error) -> &str {
    match e {
        Error::InvalidArgs { .. } => INVALID_ARGS,
        Error::AccessDenied(_) => ACCESS_DENIED,
        Error::InteractiveAuthorizationRequired(_) => INTERACTIVE,
        Error::Io { .. } => IO_ERROR,
        Error::NoSuchWorkspace(_) => "org.agent.Workspaces.Error.NoSuchWorkspace",
        Error::WorkspaceExists(_) => "org.agent.Workspaces.Error.WorkspaceExists",
        Error::NotReady { .. } => "org.agent.Workspaces.Error.NotReady",
        Error::Busy(_) => "org.agent.Workspaces.Error.Busy",
        Error::LimitsExceeded(_) => "org.agent.Workspaces.Error.LimitsExceeded",
        Error::JobFailed(_) => "org.agent.Workspaces.Error.JobFailed",
        Error::NotSupported(_) => "org.agent.Workspaces.Error.NotSupported",
        Error::Protected(_) => "org.agent.Workspaces.Error.Protected",
        Error::NoSuchSkill(_) => "org.agent.Workspaces.Error.NoSuchSkill",
        Error::NoSuchTool(_) => "org.agent.Workspaces.Error.NoSuchTool",
        Error::NoSuchTemplate(_) => "org.agent.Workspaces.Error.NoSuchTemplate",
        Error::NoSuchProcess(_) => "org.agent.Workspaces.Error.NoSuchProcess",
        Error::NoSuchSnapshot(_) => "org.agent.Workspaces.Error.NoSuchSnapshot",
        Error::SnapshotExists(_) => "org.agent.Workspaces.Error.SnapshotExists",
        Error::Library(_) => "org.agent.Workspaces.Error.LibraryError",
        Error::File { kind, .. } => file_error_name(*kind),
        Error::Bus { name, .. } => name,
    }
}

/// The file errors' names; `Invalid` travels as `InvalidArgs`.
const FILE_ERRORS: [(FileErrorKind, &str); 11] = [
    (
        FileErrorKind::NotFound,
        "org.agent.Workspaces.Error.FileNotFound",
    ),
    (
        FileErrorKind::NotADirectory,
        "org.agent.Workspaces.Error.NotADirectory",
    ),
    (
        FileErrorKind::IsADirectory,
        "org.agent.Workspaces.Error.IsADirectory",
    ),
    (
        FileErrorKind::Exists,
        "org.agent.Workspaces.Error.FileExists",
    ),
    (
        FileErrorKind::PermissionDenied,
        "org.agent.Workspaces.Error.FilePermissionDenied",
    ),
    (
        FileErrorKind::NotRegular,
        "org.agent.Workspaces.Error.NotARegularFile",
    ),
    (
        FileErrorKind::NoSpace,
        "org.agent.Workspaces.Error.NoSpaceLeft",
    ),
    (
        FileErrorKind::NotEmpty,
        "org.agent.Workspaces.Error.DirectoryNotEmpty",
    ),
    (
        FileErrorKind::ArchiveRefused,
        "org.agent.Workspaces.Error.ArchiveRefused",
    ),
    (
        FileErrorKind::Incomplete,
        "org.agent.Workspaces.Error.IncompleteContent",
    ),
    (FileErrorKind::Other, "org.agent.Workspaces.Error.FileError"),
];

fn file_error_name(kind: FileErrorKind) -> &'static str {
    FILE_ERRORS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("org.agent.Workspaces.Error.FileError", |(_, n)| n)
}

/// The variant's data sent after the message (variants whose data is the message send none).
fn data_of(e: &Error) -> Vec<&str> {
    match e {
        Error::InvalidArgs { field, reason } => vec![field, reason],
        Error::NotReady { workspace, status } => vec![workspace, status],
        Error::NoSuchWorkspace(n)
        | Error::Protected(n)
        | Error::NoSuchSkill(n)
        | Error::NoSuchTool(n)
        | Error::NoSuchTemplate(n)
        | Error::NoSuchProcess(n) => vec![n],
        Error::File { path, .. } => vec![path],
        _ => vec![],
    }
}

/// The variant a reply names, from its message and data.
fn from_reply(name: &str, message: String, data: Vec<String>) -> Error {
    let mut data = data.into_iter();
    let mut next = |fallback: &str| data.next().unwrap_or_else(|| fallback.to_owned());
    match name {
        INVALID_ARGS => match (data.next(), data.next()) {
            (Some(field), Some(reason)) => Error::InvalidArgs { field, reason },
            _ => Error::invalid_from_text(&message),
        },
        ACCESS_DENIED => Error::AccessDenied(message),
        INTERACTIVE => Error::InteractiveAuthorizationRequired(message),
        IO_ERROR => Error::io_msg(message),
        _ => match name.strip_prefix(PREFIX) {
            Some("NoSuchWorkspace") => Error::NoSuchWorkspace(next(&message)),
            Some("WorkspaceExists") => Error::WorkspaceExists(message),
            Some("NotReady") => Error::NotReady {
                workspace: next(""),
                status: next(&message),
            },
            Some("Busy") => Error::Busy(message),
            Some("LimitsExceeded") => Error::LimitsExceeded(message),
            Some("JobFailed") => Error::JobFailed(message),
            Some("NotSupported") => Error::NotSupported(message),
            Some("Protected") => Error::Protected(next(&message)),
            Some("NoSuchSkill") => Error::NoSuchSkill(next(&message)),
            Some("NoSuchTool") => Error::NoSuchTool(next(&message)),
            Some("NoSuchTemplate") => Error::NoSuchTemplate(next(&message)),
            Some("NoSuchProcess") => Error::NoSuchProcess(next(&message)),
            Some("NoSuchSnapshot") => Error::NoSuchSnapshot(message),
            Some("SnapshotExists") => Error::SnapshotExists(message),
            Some("LibraryError") => Error::Library(message),
            Some(_) if let Some((kind, _)) = FILE_ERRORS.iter().find(|(_, n)| *n == name) => {
                Error::File {
                    kind: *kind,
                    path: next(""),
                    message,
                }
            }
            _ => Error::Bus {
                name: name.to_owned(),
                message,
            },
        },
    }
}

impl zbus::DBusError for Error {
    fn name(&self) -> ErrorName<'_> {
        // Every name above is valid; a Bus error's came from a reply, so it was valid too.
        ErrorName::try_from(name_of(self)).unwrap_or_else(|_| {
            ErrorName::from_static_str_unchecked("org.freedesktop.DBus.Error.Failed")
        })
    }

    fn description(&self) -> Option<&str> {
        match self {
            Error::InvalidArgs { reason, .. } => Some(reason),
            Error::Io { what, .. } => Some(what),
            Error::NotReady { status, .. } => Some(status),
            Error::Bus { message, .. } | Error::File { message, .. } => Some(message),
            Error::NoSuchWorkspace(s)
            | Error::WorkspaceExists(s)
            | Error::Busy(s)
            | Error::LimitsExceeded(s)
            | Error::JobFailed(s)
            | Error::NotSupported(s)
            | Error::Protected(s)
            | Error::NoSuchSkill(s)
            | Error::NoSuchTool(s)
            | Error::NoSuchTemplate(s)
            | Error::NoSuchProcess(s)
            | Error::NoSuchSnapshot(s)
            | Error::SnapshotExists(s)
            | Error::Library(s)
            | Error::AccessDenied(s)
            | Error::InteractiveAuthorizationRequired(s) => Some(s),
        }
    }

    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        let message = match self {
            // Its text is the error's own (the name travels as the name).
            Error::Bus { message, .. } => message.clone(),
            _ => self.to_string(),
        };
        let reply = Message::error(call, zbus::DBusError::name(self));
        match data_of(self)[..] {
            [] => reply.build(&(message,)),
            [a] => reply.build(&(message, a)),
            [a, b, ..] => reply.build(&(message, a, b)),
        }
    }
}

impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Self {
        match &e {
            zbus::Error::MethodError(name, description, reply) => {
                let body = reply.body();
                // zbus writes a body's signature as a structure: "(ss)" for two strings.
                let signature = body.signature().to_string();
                let mut strings = match signature.trim_start_matches('(').trim_end_matches(')') {
                    "s" => body.deserialize::<(String,)>().map(|t| vec![t.0]),
                    "ss" => body
                        .deserialize::<(String, String)>()
                        .map(|t| vec![t.0, t.1]),
                    "sss" => body
                        .deserialize::<(String, String, String)>()
                        .map(|t| vec![t.0, t.1, t.2]),
                    _ => Ok(vec![]),
                }
                .unwrap_or_default()
                .into_iter();
                let message = strings
                    .next()
                    .or_else(|| description.clone())
                    .unwrap_or_default();
                from_reply(name.as_str(), message, strings.collect())
            }
            // A name zbus does not know as an fdo error can still arrive wrapped in one.
            zbus::Error::FDO(f) if matches!(**f, zbus::fdo::Error::ZBus(_)) => match *f.clone() {
                zbus::fdo::Error::ZBus(inner) => Error::from(inner),
                _ => unreachable!("matched above"),
            },
            zbus::Error::FDO(f) => {
                use zbus::DBusError;
                from_reply(
                    f.name().as_str(),
                    f.description().unwrap_or_default().to_owned(),
                    vec![],
                )
            }
            other => Error::Bus {
                name: "org.freedesktop.zbus.Error".into(),
                message: other.to_string(),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    fn every_variant() -> Vec<Error> {
        vec![
            Error::invalid("limits.memory_max", "must be a non-negative integer"),
            Error::NoSuchWorkspace("web".into()),
            Error::WorkspaceExists("Workspace 'web' already exists".into()),
            Error::NotReady {
                workspace: "box".into(),
                status: "building".into(),
            },
            Error::Busy("busy".into()),
            Error::LimitsExceeded("too many".into()),
            Error::JobFailed("killed".into()),
            Error::NotSupported("host".into()),
            Error::Protected("host".into()),
            Error::NoSuchSkill("s".into()),
            Error::NoSuchTool("t".into()),
            Error::NoSuchTemplate("tpl".into()),
            Error::NoSuchProcess("3 in workspace 'box'".into()),
            Error::NoSuchSnapshot("No snapshot 'a' of workspace 'box'".into()),
            Error::SnapshotExists("Workspace 'box' has a snapshot 'a' already".into()),
            Error::Library("malformed".into()),
            Error::File {
                kind: FileErrorKind::NotRegular,
                path: "/workspace/fifo".into(),
                message: "'/workspace/fifo' in workspace 'box': is a FIFO".into(),
            },
            Error::File {
                kind: FileErrorKind::Other,
                path: "/x".into(),
                message: "'/x' in workspace 'box': Input/output error".into(),
            },
            Error::io_msg("Cannot write"),
            Error::AccessDenied("no".into()),
            Error::InteractiveAuthorizationRequired("ask".into()),
            Error::Bus {
                name: "org.freedesktop.DBus.Error.ServiceUnknown".into(),
                message: "not running".into(),
            },
        ]
    }

    struct Failing(Vec<Error>);

    #[zbus::interface(name = "org.agent.Test")]
    impl Failing {
        async fn fail(&self, i: u32) -> Result<()> {
            Err(self.0[i as usize].clone())
        }
    }

    /// Through real D-Bus messages: what the service replies is what a client gets back.
    #[tokio::test]
    async fn every_variant_survives_a_real_reply() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let guid = zbus::Guid::generate();
        let (server, client) = tokio::join!(
            zbus::connection::Builder::unix_stream(a)
                .server(guid)
                .p2p()
                .serve_at("/t", Failing(every_variant()))
                .build(),
            zbus::connection::Builder::unix_stream(b).p2p().build(),
        );
        let (_server, client) = (server.unwrap(), client.unwrap());
        let proxy = zbus::Proxy::new(&client, "org.agent.Test", "/t", "org.agent.Test")
            .await
            .unwrap();
        for (i, want) in every_variant().into_iter().enumerate() {
            let e = proxy
                .call::<_, _, ()>("Fail", &(i as u32))
                .await
                .unwrap_err();
            assert_eq!(Error::from(e), want);
        }
    }

    #[test]
    fn every_file_error_has_a_name_of_its_own() {
        let mut names: Vec<_> = FILE_ERRORS
            .iter()
            .map(|(k, _)| file_error_name(*k))
            .collect();
        for name in &names {
            assert!(name.starts_with(PREFIX), "{name}");
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FILE_ERRORS.len());
    }

    #[test]
    fn every_variant_has_its_name_and_comes_back_whole() {
        for e in every_variant() {
            let name = e.name().to_string();
            assert!(ErrorName::try_from(name.as_str()).is_ok(), "{name}");
            let data: Vec<String> = data_of(&e).into_iter().map(String::from).collect();
            let message = match &e {
                Error::Bus { message, .. } => message.clone(),
                _ => e.to_string(),
            };
            let back = from_reply(&name, message, data);
            assert_eq!(back, e, "{name}");
            assert_eq!(back.to_string(), e.to_string());
        }
        assert_eq!(
            Error::NoSuchWorkspace("x".into()).name().as_str(),
            "org.agent.Workspaces.Error.NoSuchWorkspace"
        );
        assert_eq!(
            Error::invalid("name", "bad").name().as_str(),
            "org.freedesktop.DBus.Error.InvalidArgs"
        );
        assert_eq!(
            Error::io_msg("disk").name().as_str(),
            "org.freedesktop.DBus.Error.IOError"
        );
    }
}
