//! The tools: name, description for a model (what it does, when to use it, what comes back)
//! and input schema. A tool's options are the keys of the D-Bus request dictionary it calls
//! with (`dbus/schema.rs`), in their JSON form (`limits` and `egress` as objects, as the REST
//! bridge takes them), so the schema and the service's parser never disagree; the arguments
//! that are D-Bus method arguments of their own (the workspace, the command, a path) are
//! listed here.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::dbus::schema::{self, Json, Key, Keys, Type};

/// An argument of the tool's own (not in the call's option dictionary).
pub struct Arg {
    pub name: &'static str,
    pub ty: Type,
    pub required: bool,
    pub description: &'static str,
}

const fn arg(name: &'static str, ty: Type, description: &'static str) -> Arg {
    Arg {
        name,
        ty,
        required: true,
        description,
    }
}

const fn opt(name: &'static str, ty: Type, description: &'static str) -> Arg {
    Arg {
        name,
        ty,
        required: false,
        description,
    }
}

pub struct Spec {
    pub name: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub args: &'static [Arg],
    /// The call's option dictionary, and its keys this tool leaves out.
    pub options: Option<(Keys, &'static [&'static str])>,
    pub read_only: bool,
    pub destructive: bool,
}

const WORKSPACE: Arg = arg(
    "workspace",
    Type::Str,
    "The workspace's name (or id), as list_workspaces shows it.",
);
const PROCESS: Arg = arg(
    "process",
    Type::Str,
    "The process's id, as start_process or list_processes gave it.",
);
const PATH: Arg = arg(
    "path",
    Type::Str,
    "The path: relative to the workspace's directory (/workspace in a container), or absolute \
     inside the workspace.",
);
const MAX_OUTPUT: Arg = opt(
    "max_output_bytes",
    Type::U32,
    "Bytes of output to return at most (per stream); what is longer comes back as its head and \
     its tail with a note of what was left out. Default 32768.",
);

/// Every tool, in the order they are listed.
pub const TOOLS: &[Spec] = &[
    Spec {
        name: "list_workspaces",
        title: "List workspaces",
        description: "Lists the workspaces this server may use: each with its name, type \
            (container: an isolated Linux system; host: the server itself), status (pending, \
            building, ready, paused, stopped, error, ...) and distro. Use it first to find a \
            workspace to work in. Returns {workspaces: [...]}.",
        args: &[],
        options: None,
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "get_workspace",
        title: "Show a workspace",
        description: "Shows one workspace's whole record: status, error_message when a build \
            failed, env var names, skills, tools, network, egress rules, limits, snapshots, disk \
            usage. Use it to see why a workspace is in error, or its settings.",
        args: &[WORKSPACE],
        options: None,
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "create_workspace",
        title: "Create a workspace",
        description: "Creates a workspace. A container workspace (workspace_type \"container\", \
            the one to use for untrusted code) is an isolated Linux system built from a distro \
            (ubuntu-noble, ubuntu-jammy, debian-bookworm, arch-linux) or a Library template, \
            then set up by init_script; the call waits for the build (minutes the first time, \
            seconds after), reporting each step as progress, and returns the workspace's \
            record once it is ready (or its error). Cancelling the call destroys the workspace \
            it was building. Set wait to false to return at once while it builds. network \
            \"internet\" gives it a network of its own with egress rules (egress.allow, \
            egress.deny: networks or domain names).",
        args: &[opt(
            "wait",
            Type::Bool,
            "Wait for a container's build to end (default true).",
        )],
        options: Some((schema::CREATE, &["path", "build_on_create"])),
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "destroy_workspace",
        title: "Destroy a workspace",
        description: "Destroys a workspace and everything in it: its files, processes and \
            snapshots. Cannot be undone. Returns {destroyed: NAME}.",
        args: &[WORKSPACE],
        options: None,
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "exec",
        title: "Run a command",
        description: "Runs a shell command in a workspace and waits for it to end: returns \
            exit_code, stdout, stderr and timed_out. The command runs with bash -c (sh where \
            there is no bash) in the workspace's directory unless cwd says otherwise, with the \
            workspace's env vars plus env. Long output comes back as its head and tail with a \
            note of what was left out. For a server or anything that runs longer than \
            timeout_secs, use start_process instead. Cancelling the call ends the command.",
        args: &[
            WORKSPACE,
            arg("command", Type::Str, "The shell command."),
            MAX_OUTPUT,
        ],
        options: Some((schema::EXEC, &[])),
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "start_process",
        title: "Start a background process",
        description: "Starts a command in the background (a server, a watcher, a long build) \
            and returns at once with its process id. Read its output with read_process_output, \
            type into it with write_process_input, end it with signal_process.",
        args: &[WORKSPACE, arg("command", Type::Str, "The shell command.")],
        options: Some((schema::START_PROCESS, &["pty", "cols", "rows"])),
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "read_process_output",
        title: "Read a process's output",
        description: "Reads a background process's output (stdout and stderr together) from \
            offset (0 for the start; then the next_offset of the previous read), waiting up to \
            wait_secs for some to come. Returns output, next_offset, running and exit_code.",
        args: &[
            WORKSPACE,
            PROCESS,
            opt("offset", Type::U64, "Where to read from (default 0)."),
            opt(
                "wait_secs",
                Type::U32,
                "Seconds to wait for output or the end when there is none yet (default 0, at most 60).",
            ),
            MAX_OUTPUT,
        ],
        options: None,
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "write_process_input",
        title: "Write to a process",
        description: "Writes text to a background process's standard input (add \\n to end a \
            line).",
        args: &[
            WORKSPACE,
            PROCESS,
            arg("input", Type::Str, "The text to write."),
        ],
        options: None,
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "signal_process",
        title: "Signal a process",
        description: "Sends a signal to a background process and everything it started: TERM \
            (default) to ask it to end, KILL to end it at once, INT, HUP, ...",
        args: &[
            WORKSPACE,
            PROCESS,
            opt(
                "signal",
                Type::Str,
                "The signal's name (TERM, KILL, INT, HUP, USR1, ...) or number; default TERM.",
            ),
        ],
        options: None,
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "list_processes",
        title: "List background processes",
        description: "Lists a workspace's background processes: id, command, running, \
            exit_code.",
        args: &[WORKSPACE],
        options: None,
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "read_file",
        title: "Read a file",
        description: "Reads a text file in a workspace (from offset, up to length bytes). A \
            file longer than max_output_bytes comes back cut, with the offset to read on from.",
        args: &[WORKSPACE, PATH, MAX_OUTPUT],
        options: Some((schema::READ_FILE, &[])),
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "write_file",
        title: "Write a file",
        description: "Writes text to a file in a workspace, replacing it (or appending with \
            append, or only if new with exclusive); create_parents makes missing directories.",
        args: &[
            WORKSPACE,
            PATH,
            arg("content", Type::Str, "The file's new content."),
        ],
        options: Some((schema::WRITE_FILE, &["size"])),
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "list_directory",
        title: "List a directory",
        description: "Lists a directory in a workspace: each entry's name, type, size, mode and \
            modification time; depth > 1 lists below it too.",
        args: &[WORKSPACE, PATH],
        options: Some((schema::LIST_DIRECTORY, &[])),
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "stat_file",
        title: "Look at a file",
        description: "Shows one file's type, size, mode, owner and modification time (a link \
            itself, not what it points to).",
        args: &[WORKSPACE, PATH],
        options: Some((schema::FILE_IDENTITY, &[])),
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "make_directory",
        title: "Make a directory",
        description: "Makes a directory in a workspace (parents: its missing parents too).",
        args: &[WORKSPACE, PATH],
        options: Some((schema::MAKE_DIRECTORY, &[])),
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "remove_file",
        title: "Remove a file",
        description: "Removes a file, or a directory (recursive: with everything in it).",
        args: &[WORKSPACE, PATH],
        options: Some((schema::REMOVE_FILE, &[])),
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "move_file",
        title: "Move a file",
        description: "Moves or renames a file or directory within a workspace (replace: over \
            an existing one).",
        args: &[
            WORKSPACE,
            arg("from", Type::Str, "The path to move."),
            arg("to", Type::Str, "Its new path."),
        ],
        options: Some((schema::MOVE_FILE, &[])),
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "copy_files",
        title: "Copy files between workspaces",
        description: "Copies a file or a directory (with everything in it) from one workspace \
            to another, or within one: to_path is the directory it is put in (made where \
            missing). Use it to bring results from a fork back, or to share files. Files, \
            directories and links are copied; devices, FIFOs and sockets are left out.",
        args: &[
            WORKSPACE,
            PATH,
            arg(
                "to_workspace",
                Type::Str,
                "The workspace to copy into (the same one to copy within it).",
            ),
            arg("to_path", Type::Str, "The directory to put it in."),
        ],
        options: None,
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "watch_files",
        title: "Wait for file changes",
        description: "Waits up to wait_secs for something to change below a directory (or to \
            a file) of a workspace, then returns what changed: created, modified, deleted and \
            moved paths, relative to it. Use it to wait for a build's output or a log file \
            instead of polling.",
        args: &[
            WORKSPACE,
            PATH,
            opt(
                "wait_secs",
                Type::U32,
                "Seconds to wait for a first change (default 10, at most 60).",
            ),
            opt(
                "max_events",
                Type::U32,
                "Changes to return at most (default 100, at most 1000).",
            ),
        ],
        options: None,
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "snapshot_workspace",
        title: "Snapshot a workspace",
        description: "Takes a snapshot of a container workspace's files under a name: a point \
            to restore to (restore_workspace) or to fork new workspaces from \
            (fork_workspace). Running processes keep running.",
        args: &[WORKSPACE, arg("name", Type::Str, "The snapshot's name.")],
        options: Some((schema::SNAPSHOT, &[])),
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "list_snapshots",
        title: "List snapshots",
        description: "Lists a workspace's snapshots: name, when taken, size.",
        args: &[WORKSPACE],
        options: None,
        read_only: true,
        destructive: false,
    },
    Spec {
        name: "restore_workspace",
        title: "Restore a snapshot",
        description: "Puts a container workspace's files back as a snapshot had them; what \
            changed since is lost and its processes are ended (the container restarts).",
        args: &[
            WORKSPACE,
            arg("snapshot", Type::Str, "The snapshot's name."),
        ],
        options: None,
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "delete_snapshot",
        title: "Delete a snapshot",
        description: "Deletes a snapshot of a workspace (its disk space is freed once no fork \
            uses it). The workspace itself is not changed.",
        args: &[
            WORKSPACE,
            arg("snapshot", Type::Str, "The snapshot's name."),
        ],
        options: None,
        read_only: false,
        destructive: true,
    },
    Spec {
        name: "fork_workspace",
        title: "Fork a workspace",
        description: "Makes a new container workspace from a snapshot of another: a copy that \
            shares the snapshot's files until either changes them (instant). Use it to try \
            several things from one state. Returns the new workspace's record.",
        args: &[
            WORKSPACE,
            arg("snapshot", Type::Str, "The snapshot to fork from."),
        ],
        options: Some((schema::FORK, &[])),
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "pause_workspace",
        title: "Pause a workspace",
        description: "Freezes every process of a container workspace (they use no CPU) until \
            resume_workspace; a command run meanwhile resumes it.",
        args: &[WORKSPACE],
        options: None,
        read_only: false,
        destructive: false,
    },
    Spec {
        name: "resume_workspace",
        title: "Resume a workspace",
        description: "Thaws a paused container workspace: its processes run on where they \
            were.",
        args: &[WORKSPACE],
        options: None,
        read_only: false,
        destructive: false,
    },
];

pub fn spec(name: &str) -> Option<&'static Spec> {
    TOOLS.iter().find(|t| t.name == name)
}

pub fn names() -> Vec<&'static str> {
    TOOLS.iter().map(|t| t.name).collect()
}

/// What a key of the service's dictionaries means, for a model; keys without a line here are
/// named by their type alone.
fn key_help(name: &str) -> Option<&'static str> {
    Some(match name {
        "name" => "A name: lowercase letters, digits and hyphens, starting with a letter.",
        "workspace_type" => "container (isolated, for untrusted code) or host (the server itself).",
        "distro" => "ubuntu-noble, ubuntu-jammy, debian-bookworm or arch-linux.",
        "env_vars" => "Environment variables every command sees.",
        "init_script" => "A shell script run once the container is built (idempotent).",
        "skills" | "tools" => "Names from the Library, installed under .opencode/.",
        "template" => "A Library template to start from.",
        "network" => "none, host or internet (a network of its own with egress rules).",
        "allow" => "Networks (10.0.0.0/8) or domain names (*.example.com) it may reach.",
        "deny" => "Networks or domain names it may not reach.",
        "timeout_secs" => "Seconds before the command is ended (timed_out true).",
        "cwd" => "The directory to run in.",
        "env" => "Environment variables for this command only.",
        "stdin" => "Text given to the command's standard input.",
        "offset" => "Byte offset to start at.",
        "length" => "Bytes to read at most.",
        "user" | "group" => "Act as this user or group of the workspace (name or number).",
        "mode" => "Permission bits, as a number (0o644 is 420).",
        "create_parents" | "parents" => "Make missing parent directories.",
        "append" => "Add to the end of the file.",
        "exclusive" => "Fail if the file exists.",
        "recursive" => "Remove a directory with everything in it.",
        "replace" => "Replace what is at the destination.",
        "depth" => "How many levels to list (1: the directory itself).",
        "limit" => "Entries to list at most.",
        _ => return None,
    })
}

fn type_schema(ty: Type) -> Value {
    match ty {
        Type::Str | Type::Bytes => json!({"type": "string"}),
        Type::Bool => json!({"type": "boolean"}),
        Type::U16 => json!({"type": "integer", "minimum": 0, "maximum": 65535}),
        Type::U32 => json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}),
        Type::U64 => json!({"type": "integer", "minimum": 0}),
        Type::Strings => json!({"type": "array", "items": {"type": "string"}}),
        Type::StrMap => {
            json!({"type": "object", "additionalProperties": {"type": "string"}})
        }
    }
}

fn described(mut schema: Value, description: Option<&str>) -> Value {
    if let Some(d) = description {
        schema["description"] = Value::String(d.to_owned());
    }
    schema
}

fn key_schema(k: &Key, place: Json) -> Value {
    described(type_schema(k.ty), key_help(place.json_name(k.name)))
}

impl Spec {
    /// The top-level argument names its input schema has (its own arguments, the option
    /// keys it takes, and `limits`/`egress` where it has keys there).
    pub fn argument_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        let options = self.options.iter().flat_map(|(keys, except)| {
            let members = keys
                .keys
                .iter()
                .filter(|k| k.json == Json::Member && !except.contains(&k.name))
                .map(|k| k.name);
            members.chain(keys.nested().into_iter().filter_map(Json::object))
        });
        self.args.iter().map(|a| a.name).chain(options)
    }

    /// The JSON Schema of the tool's arguments.
    pub fn input_schema(&self) -> Arc<Map<String, Value>> {
        let mut props = Map::new();
        let mut required = Vec::new();
        for a in self.args {
            props.insert(
                a.name.to_owned(),
                described(type_schema(a.ty), Some(a.description)),
            );
            if a.required {
                required.push(Value::String(a.name.to_owned()));
            }
        }
        if let Some((keys, except)) = &self.options {
            let kept = |k: &&Key| !except.contains(&k.name);
            for k in keys
                .keys
                .iter()
                .filter(kept)
                .filter(|k| k.json == Json::Member)
            {
                props.insert(k.name.to_owned(), key_schema(k, Json::Member));
            }
            for place in keys.nested() {
                let inner: Map<String, Value> = keys
                    .keys
                    .iter()
                    .filter(kept)
                    .filter(|k| k.json == place)
                    .map(|k| (place.json_name(k.name).to_owned(), key_schema(k, place)))
                    .collect();
                if let Some(object) = place.object() {
                    props.insert(
                        object.to_owned(),
                        json!({"type": "object", "properties": inner, "additionalProperties": false}),
                    );
                }
            }
        }
        let mut schema = Map::new();
        schema.insert("type".into(), json!("object"));
        schema.insert("properties".into(), Value::Object(props));
        if !required.is_empty() {
            schema.insert("required".into(), Value::Array(required));
        }
        schema.insert("additionalProperties".into(), json!(false));
        Arc::new(schema)
    }

    pub fn tool(&self) -> rmcp::model::Tool {
        let mut t = rmcp::model::Tool::new(self.name, self.description, self.input_schema())
            .with_annotations(
                rmcp::model::ToolAnnotations::with_title(self.title)
                    .read_only(self.read_only)
                    .destructive(self.destructive)
                    .open_world(false),
            );
        t.title = Some(self.title.to_owned());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_of_the_service_is_in_the_schema_as_the_service_parses_it() {
        for t in TOOLS {
            let schema = t.input_schema();
            let props = schema["properties"].as_object().unwrap();
            let Some((keys, except)) = &t.options else {
                continue;
            };
            for k in keys.keys.iter().filter(|k| !except.contains(&k.name)) {
                let s = match k.json.object() {
                    None => &props[k.name],
                    Some(o) => &props[o]["properties"][k.json.json_name(k.name)],
                };
                assert_eq!(s["type"], k.ty.json_type(), "{}: {}", t.name, k.name);
            }
            for gone in *except {
                assert!(!props.contains_key(*gone), "{}: {gone}", t.name);
            }
            // A tool's own arguments never shadow an option.
            for a in t.args {
                assert!(keys.get(a.name).is_none(), "{}: {}", t.name, a.name);
            }
        }
        // What a call is checked against is what the schema lists.
        for t in TOOLS {
            let schema = t.input_schema();
            let mut listed: Vec<&str> = schema["properties"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let mut named: Vec<&str> = t.argument_names().collect();
            listed.sort_unstable();
            named.sort_unstable();
            assert_eq!(listed, named, "{}", t.name);
        }
        let create = spec("create_workspace").unwrap().input_schema();
        assert_eq!(
            create["properties"]["limits"]["properties"]["memory_max"]["type"],
            "integer"
        );
        assert_eq!(
            create["properties"]["egress"]["properties"]["allow"]["type"],
            "array"
        );
        assert!(
            !create["properties"]
                .as_object()
                .unwrap()
                .contains_key("path")
        );
    }

    #[test]
    fn the_arguments_a_call_needs_are_required_and_no_others_taken() {
        let exec = spec("exec").unwrap().input_schema();
        assert_eq!(exec["required"], json!(["workspace", "command"]));
        assert_eq!(exec["additionalProperties"], json!(false));
        let names = names();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        for t in TOOLS {
            assert!(t.description.len() > 40, "{} needs a description", t.name);
        }
    }
}
