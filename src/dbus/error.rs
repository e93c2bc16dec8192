//! How the one error type (`core::Error`) travels over D-Bus, both ways.
//!
//! The service's own conditions are named `org.agent.Workspaces.Error.*`; bad arguments,
//! refusals and I/O failures use the standard `org.freedesktop.DBus.Error.*` names clients
//! already handle. A reply's body is its message alone (`s`), which every client library
//! shows: GLib reads a message only from a body of exactly one string. A caller that asked
//! (`SetErrorData`, `error_data.rs`) gets the variant's data after the message as further
//! strings (for `InvalidArgs`, the key and the reason), so that it gets the same variant back
//! with `Error::from(zbus::Error)` without reading the prose: the bridge, `workspacectl` and
//! the MCP server all ask (`client::connect`).
//!
//! (zbus's `DBusError` derive would put zbus into the core, name every variant under one
//! prefix, and send only a description; so the trait is implemented here by hand.)

use zbus::message::{Header, Message};
use zbus::names::ErrorName;

use super::error_data::ErrorData;
pub use crate::core::Error;
use crate::core::files::FileErrorKind;

pub const PREFIX: &str = "org.agent.Workspaces.Error.";
const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
/// `InvalidArgs` with its data, for a caller that asked: zbus turns the standard name into an
/// error that keeps only the message, so the key travels under the service's own name.
const INVALID_ARGS_DATA: &str = "org.agent.Workspaces.Error.InvalidArgs";
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

/// The data of a reply that came without them (its caller did not ask), read back from its
/// message by the variant's own format, for the variants whose text is made of their data
/// (`No workspace 'NAME' known`); never the key of an `InvalidArgs`, which is data or nothing.
fn data_from_text(name: &str, message: &str) -> Vec<String> {
    if name == INVALID_ARGS || name == INVALID_ARGS_DATA {
        return vec![];
    }
    let marks: Vec<String> = (0..2).map(|i| format!("\u{1}{i}\u{1}")).collect();
    let template = from_reply(name, String::new(), marks.clone()).to_string();
    // The template's text between the marks, and which datum each mark stands for.
    let mut pieces = vec![];
    let mut order = vec![];
    let mut rest = template.as_str();
    while let Some((i, at)) = marks
        .iter()
        .enumerate()
        .filter_map(|(i, m)| rest.find(m.as_str()).map(|at| (i, at)))
        .min_by_key(|(_, at)| *at)
    {
        pieces.push(&rest[..at]);
        order.push(i);
        rest = &rest[at + marks[i].len()..];
    }
    pieces.push(rest);
    if order.is_empty() {
        return vec![];
    }
    let Some(mut text) = message.strip_prefix(pieces[0]) else {
        return vec![];
    };
    let mut found = vec![String::new(); marks.len()];
    for (k, &i) in order.iter().enumerate() {
        let next = pieces[k + 1];
        let end = if k + 1 == order.len() {
            match text.strip_suffix(next) {
                Some(d) => d.len(),
                None => return vec![],
            }
        } else {
            match text.find(next) {
                Some(at) => at,
                None => return vec![],
            }
        };
        found[i] = text[..end].to_owned();
        text = &text[end + next.len()..];
    }
    found.truncate(order.iter().max().map_or(0, |m| m + 1));
    found
}

/// The variant a reply names, from its message and data.
fn from_reply(name: &str, message: String, data: Vec<String>) -> Error {
    let data = if data.is_empty() {
        data_from_text(name, &message)
    } else {
        data
    };
    let mut data = data.into_iter();
    let mut next = |fallback: &str| data.next().unwrap_or_else(|| fallback.to_owned());
    match name {
        INVALID_ARGS | INVALID_ARGS_DATA => match (data.next(), data.next()) {
            (Some(field), Some(reason)) => Error::InvalidArgs { field, reason },
            // No data (a caller that did not ask): the message, and no key.
            _ => Error::invalid("", message),
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

    /// The message alone: what a caller that did not ask for the data gets.
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        reply(self, call, false)
    }
}

/// The text every client shows.
fn message_of(e: &Error) -> String {
    match e {
        // Its text is the error's own (the name travels as the name).
        Error::Bus { message, .. } => message.clone(),
        _ => e.to_string(),
    }
}

/// The error reply to `call`: the message, then with `data` the variant's data.
fn reply(e: &Error, call: &Header<'_>, data: bool) -> zbus::Result<Message> {
    let message = message_of(e);
    if !data {
        return Message::error(call, zbus::DBusError::name(e)).build(&(message,));
    }
    let reply = match e {
        Error::InvalidArgs { .. } => Message::error(call, INVALID_ARGS_DATA),
        _ => Message::error(call, zbus::DBusError::name(e)),
    };
    match data_of(e)[..] {
        [] => reply.build(&(message,)),
        [a] => reply.build(&(message, a)),
        [a, b, ..] => reply.build(&(message, a, b)),
    }
}

/// An error on its way back to a caller of the service's objects: the message alone, or the
/// data after it for a caller that asked. What every method of the objects returns.
pub struct Reply {
    error: Error,
    wanted: ErrorData,
}

impl Reply {
    /// `error`, with its data for the callers `wanted` lists.
    pub fn new(error: Error, wanted: ErrorData) -> Self {
        Self { error, wanted }
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

pub type Answer<T> = std::result::Result<T, Reply>;

/// Turns a method's result into its answer.
pub trait ForCaller<T> {
    fn for_caller(self, ctx: &super::context::Context) -> Answer<T>;
}

impl<T> ForCaller<T> for Result<T> {
    fn for_caller(self, ctx: &super::context::Context) -> Answer<T> {
        self.map_err(|error| Reply::new(error, ctx.error_data.clone()))
    }
}

impl zbus::DBusError for Reply {
    fn name(&self) -> ErrorName<'_> {
        self.error.name()
    }

    fn description(&self) -> Option<&str> {
        self.error.description()
    }

    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        let wanted = call.sender().is_some_and(|s| self.wanted.wants(s.as_str()));
        reply(&self.error, call, wanted)
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

/// One error of each name the service sends, as it words them (the tests of every client
/// library use it).
pub fn one_of_each() -> Vec<Error> {
    let mut all = vec![
        Error::invalid("limits.memory_max", "must be a non-negative integer"),
        Error::NoSuchWorkspace("web".into()),
        Error::WorkspaceExists("Workspace 'web' already exists".into()),
        Error::NotReady {
            workspace: "box".into(),
            status: "building".into(),
        },
        Error::Busy("Workspace 'box' is busy: a snapshot is being taken".into()),
        Error::LimitsExceeded("Too many commands at once (at most 64)".into()),
        Error::JobFailed("The build of 'box' failed: debootstrap exited 1".into()),
        Error::NotSupported("Workspace 'host' is a host workspace: no container".into()),
        Error::Protected("host".into()),
        Error::NoSuchSkill("nosuch".into()),
        Error::NoSuchTool("nosuch".into()),
        Error::NoSuchTemplate("nosuch".into()),
        Error::NoSuchProcess("3 in workspace 'box'".into()),
        Error::NoSuchSnapshot("No snapshot 'a' of workspace 'box'".into()),
        Error::SnapshotExists("Workspace 'box' has a snapshot 'a' already".into()),
        Error::Library("workspace-template/web.json: expected a JSON object".into()),
        Error::io_msg("Cannot write the record of 'box'"),
        Error::AccessDenied("Not authorized to manage workspace 'box'".into()),
        Error::InteractiveAuthorizationRequired(
            "Authentication is required to manage workspace 'box'".into(),
        ),
    ];
    for (kind, _) in FILE_ERRORS {
        all.push(Error::File {
            kind,
            path: "/workspace/ü x".into(),
            message: format!("'/workspace/ü x' in workspace 'box': {kind:?}"),
        });
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    fn every_variant() -> Vec<Error> {
        let mut all = one_of_each();
        all.push(Error::Bus {
            name: "org.freedesktop.DBus.Error.ServiceUnknown".into(),
            message: "not running".into(),
        });
        all
    }

    struct Failing(Vec<Error>, ErrorData);

    #[zbus::interface(name = "org.agent.Test")]
    impl Failing {
        async fn fail(&self, i: u32) -> std::result::Result<(), Reply> {
            Err(Reply::new(self.0[i as usize].clone(), self.1.clone()))
        }
    }

    /// The reply to `Fail(i)`, as the bus delivered it.
    async fn raw_reply(conn: &zbus::Connection, dest: &str, i: u32) -> Message {
        let call = Message::method_call("/t", "Fail")
            .destination(dest)
            .interface("org.agent.Test")
            .build(&(i,))
            .unwrap();
        crate::dbus::tests::reply_to(conn, call).await
    }

    /// Through a real bus: a caller that did not ask gets a body of one string, the message;
    /// one that asked gets the same variant back, its data whole.
    #[tokio::test]
    async fn every_variant_reaches_both_kinds_of_caller() {
        let (_dir, address) = crate::dbus::tests::private_bus().await;
        let wanted = ErrorData::default();
        let connect = || super::super::client::bus(Some(&address));
        let server = connect().await.unwrap();
        server
            .object_server()
            .at("/t", Failing(every_variant(), wanted.clone()))
            .await
            .unwrap();
        let (plain, asking) = (connect().await.unwrap(), connect().await.unwrap());
        wanted
            .set(asking.unique_name().unwrap().as_str(), true)
            .unwrap();
        let dest = server.unique_name().unwrap().to_string();
        for (i, want) in every_variant().into_iter().enumerate() {
            let call = |conn: &zbus::Connection| {
                let (conn, dest) = (conn.clone(), dest.clone());
                async move {
                    let proxy = zbus::Proxy::new(&conn, dest, "/t", "org.agent.Test")
                        .await
                        .unwrap();
                    proxy
                        .call::<_, _, ()>("Fail", &(i as u32))
                        .await
                        .unwrap_err()
                }
            };
            let e = call(&asking).await;
            assert_eq!(Error::from(e), want);

            // zbus keeps only the message of a standard name: read the reply itself.
            let raw = raw_reply(&plain, &dest, i as u32).await;
            let name = raw.header().error_name().unwrap().to_string();
            assert_eq!(name, want.name().as_str());
            assert_eq!(raw.body().signature().to_string(), "s", "{name}");
            let message: String = raw.body().deserialize().unwrap();
            assert_eq!(message, message_of(&want));
            // What arrives is the same condition and text; only the key of an InvalidArgs
            // and the path of a file error are missing.
            let back = Error::from(zbus::Error::from(raw));
            assert_eq!(back.to_string(), want.to_string(), "{name}");
            if !matches!(want, Error::InvalidArgs { .. } | Error::File { .. }) {
                assert_eq!(back, want);
            }
            assert_eq!(back.field(), None);
        }
    }

    #[test]
    fn one_of_each_has_every_name_once() {
        let mut names: Vec<String> = one_of_each().iter().map(|e| e.name().to_string()).collect();
        for (_, name) in FILE_ERRORS {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        for name in [INVALID_ARGS, ACCESS_DENIED, INTERACTIVE, IO_ERROR] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        let own = names.iter().filter(|n| n.starts_with(PREFIX)).count();
        // 15 conditions of the service's own, and the file errors.
        assert_eq!(own, 15 + FILE_ERRORS.len());
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all);
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
