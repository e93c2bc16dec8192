//! MCP: `agent-workspaces-mcp` over stdio and `/mcp` on the bridge, driven by the official MCP
//! Python SDK (`mcp` on PyPI; `mcp_client.py`, installed in a venv of the test host from the
//! wheels `tests/system/mcp-wheels.sh` fetched), against the real service.

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};

use super::rest::{TOKEN, bridge_socket_up};
use super::*;

const VENV: &str = "/var/tmp/aw-mcp-venv";
const SERVER: &str = "/usr/bin/agent-workspaces-mcp";

fn repo() -> String {
    std::env::var("TESTHOST_REPO").expect("run by testhost.sh, which sets TESTHOST_REPO")
}

/// The SDK in a venv of its own, once per run.
fn python() -> String {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if !std::path::Path::new(&format!("{VENV}/bin/python")).exists() {
            ok(&format!(
                "python3 -m venv {VENV} && {VENV}/bin/pip install -q --no-index \
                 --find-links {}/target/mcp-wheels mcp",
                repo()
            ));
        }
    });
    format!("{VENV}/bin/python")
}

/// Runs `steps` through the SDK's client over `transport` ("stdio CMD ARGS" or
/// "http URL [TOKEN]"); what each step saw.
fn drive(transport: &str, steps: Value) -> Vec<Value> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let file = format!(
        "/var/tmp/aw-mcp-steps-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    std::fs::write(&file, steps.to_string()).unwrap();
    let out = sh(&format!(
        "{} {}/tests/system/mcp_client.py {file} {transport}",
        python(),
        repo()
    ));
    let _ = std::fs::remove_file(&file);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("the client's output ({e}): {}\n{}", out.stdout, out.stderr))
}

/// The structured content of a call's result, failing on an error result.
fn content(step: &Value) -> &Value {
    assert!(step.get("exception").is_none(), "{step}");
    let r = &step["result"];
    assert_ne!(r["isError"], true, "{step}");
    &r["structuredContent"]
}

/// The names of the tools a `list_tools` step saw, in order.
fn tool_names(step: &Value) -> Vec<&str> {
    step["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect()
}

/// The text of an error result.
fn refusal(step: &Value) -> String {
    assert_eq!(step["result"]["isError"], true, "{step}");
    step["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// What `mcp_client.py` steps a whole session through, on a new container `name`.
fn session_steps(name: &str, fork: &str) -> Value {
    json!([
        {"op": "list_tools"},
        {"op": "call", "tool": "create_workspace", "progress": true,
         "args": {"name": name, "workspace_type": "container", "distro": "debian-bookworm",
                  "env_vars": {"GREETING": "hello"}}},
        {"op": "call", "tool": "exec",
         "args": {"workspace": name, "command": "echo $GREETING from mcp; echo oops >&2; exit 3"}},
        {"op": "call", "tool": "write_file",
         "args": {"workspace": name, "path": "notes/plan.txt", "content": "step one\nstep two\n",
                  "create_parents": true}},
        {"op": "call", "tool": "read_file", "args": {"workspace": name, "path": "notes/plan.txt"}},
        {"op": "call", "tool": "list_directory", "args": {"workspace": name, "path": "notes"}},
        {"op": "call", "tool": "start_process",
         "args": {"workspace": name, "command": "for i in 1 2 3; do echo line$i; sleep 0.2; done"}},
        {"op": "call", "tool": "read_process_output",
         "args": {"workspace": name, "process": "$7.process", "wait_secs": 10}},
        {"op": "read_all", "workspace": name, "process": "$7.process", "timeout": 60},
        {"op": "call", "tool": "list_processes", "args": {"workspace": name}},
        {"op": "call", "tool": "snapshot_workspace", "args": {"workspace": name, "name": "planned"}},
        {"op": "call", "tool": "fork_workspace",
         "args": {"workspace": name, "snapshot": "planned", "name": fork}},
        {"op": "call", "tool": "exec", "args": {"workspace": fork, "command": "cat notes/plan.txt"}},
        {"op": "read", "uri": format!("workspace://{name}")},
        {"op": "read", "uri": format!("workspace://{name}/init-log")},
        {"op": "subscribe", "uri": format!("workspace://{name}")},
        {"op": "call", "tool": "pause_workspace", "args": {"workspace": name}},
        {"op": "updates", "uri": format!("workspace://{name}"), "timeout": 20},
        {"op": "call", "tool": "destroy_workspace", "args": {"workspace": fork}},
        {"op": "call", "tool": "destroy_workspace", "args": {"workspace": name}},
    ])
}

/// Checks what `session_steps` saw; `steps[0]` is the initialize.
fn check_session(steps: &[Value], name: &str, fork: &str) {
    let init = &steps[0]["result"];
    assert_eq!(init["serverInfo"]["name"], "agent-workspaces", "{init}");
    assert!(init["capabilities"]["tools"].is_object(), "{init}");
    assert_eq!(
        init["capabilities"]["resources"]["subscribe"], true,
        "{init}"
    );

    let tools = steps[1]["tools"].as_array().expect("tools");
    let exec = tools.iter().find(|t| t["name"] == "exec").expect("exec");
    assert_eq!(
        exec["inputSchema"]["required"],
        json!(["workspace", "command"])
    );
    assert_eq!(exec["inputSchema"]["properties"]["env"]["type"], "object");
    let create = tools
        .iter()
        .find(|t| t["name"] == "create_workspace")
        .unwrap();
    assert_eq!(
        create["inputSchema"]["properties"]["limits"]["properties"]["memory_max"]["type"],
        "integer"
    );
    for t in [
        "read_file",
        "start_process",
        "snapshot_workspace",
        "fork_workspace",
    ] {
        assert!(tools.iter().any(|x| x["name"] == t), "{t}");
    }

    let created = content(&steps[2]);
    assert_eq!(created["status"], "ready", "{created}");
    assert_eq!(created["name"], name);
    let progress = steps[2]["progress"].as_array().unwrap();
    assert!(
        !progress.is_empty(),
        "the build reported no progress: {}",
        steps[2]
    );
    assert!(
        progress[0]["message"].as_str().unwrap().contains(name),
        "{progress:?}"
    );

    let ran = content(&steps[3]);
    assert_eq!(ran["exit_code"], 3, "{ran}");
    assert_eq!(ran["stdout"], "hello from mcp\n");
    assert_eq!(ran["stderr"], "oops\n");
    let text = steps[3]["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("exit_code: 3\n--- stdout ---\nhello"),
        "{text}"
    );

    assert_eq!(content(&steps[4])["written_bytes"], 18);
    let read = content(&steps[5]);
    assert_eq!(read["content"], "step one\nstep two\n");
    assert_eq!(read["more"], false);
    let listed = content(&steps[6]);
    assert_eq!(listed["entries"][0]["name"], "plan.txt", "{listed}");

    let started = content(&steps[7]);
    let process = started["process"].as_str().unwrap().to_owned();
    // Its output, read as it comes: the first read waits for the first line; reading on from
    // each next_offset until the end gives all of it once, and its exit code.
    let first = content(&steps[8]);
    assert!(
        first["output"].as_str().unwrap().starts_with("line1\n"),
        "{first}"
    );
    assert!(steps[9].get("exception").is_none(), "{}", steps[9]);
    assert_eq!(steps[9]["output"], "line1\nline2\nline3\n", "{}", steps[9]);
    let last = steps[9]["reads"].as_array().unwrap().last().unwrap();
    assert_eq!(last["running"], false, "{last}");
    assert_eq!(last["exit_code"], 0, "{last}");
    let processes = content(&steps[10]);
    assert!(
        processes["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["process"] == process.as_str()),
        "{processes}"
    );

    assert_eq!(content(&steps[11])["snapshot"], "planned");
    let forked = content(&steps[12]);
    assert_eq!(forked["name"], fork, "{forked}");
    assert_eq!(content(&steps[13])["stdout"], "step one\nstep two\n");

    let record = &steps[14]["result"]["contents"][0];
    let record: Value = serde_json::from_str(record["text"].as_str().unwrap()).unwrap();
    assert_eq!(record["name"], name);
    let log = steps[15]["result"]["contents"][0]["text"].as_str().unwrap();
    assert!(!log.is_empty(), "{}", steps[15]);

    assert!(steps[16].get("exception").is_none(), "{}", steps[16]);
    assert_eq!(content(&steps[17])["status"], "paused");
    let updates = steps[18]["updates"].as_array().unwrap();
    assert!(
        updates.iter().any(|u| u == &format!("workspace://{name}")),
        "no update of the paused workspace: {}",
        steps[18]
    );
    assert_eq!(content(&steps[19])["destroyed"], fork);
    assert_eq!(content(&steps[20])["destroyed"], name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_works_in_a_container_through_the_sdk_over_stdio() {
    require_test_host();
    let (name, fork) = (unique("mcp-stdio"), unique("mcp-fork"));
    let steps = drive(
        &format!("stdio {SERVER} --containers-only"),
        session_steps(&name, &fork),
    );
    check_session(&steps, &name, &fork);
    // A second process reads the background process's output from the start.
    let conn = bus().await;
    let m = manager(&conn).await;
    assert!(m.get_workspace(&name).await.is_err(), "destroyed");

    // Each call is in the journal: tool, workspace, caller (uid over stdio), outcome.
    let entries = journal(&format!(
        "MESSAGE_ID={} WORKSPACE_NAME={name}",
        agent_workspaces::mcp::audit::MCP_TOOL_CALLED
    ));
    let tools: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["MCP_TOOL"].as_str())
        .collect();
    for t in [
        "create_workspace",
        "exec",
        "write_file",
        "snapshot_workspace",
        "destroy_workspace",
    ] {
        assert!(tools.contains(&t), "{t} not in the journal: {tools:?}");
    }
    let exec = entries.iter().find(|e| e["MCP_TOOL"] == "exec").unwrap();
    assert_eq!(exec["CALLER_UID"], "0", "{exec}");
    assert_eq!(exec["OUTCOME"], "ok", "{exec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_serves_mcp_to_the_token_and_to_no_one_else() {
    require_test_host();
    bridge_socket_up();
    let url = "http://127.0.0.1:7600/mcp";
    // Without the token, or with another: refused before any MCP is spoken.
    let refused = drive(&format!("http {url}"), json!([{"op": "list_tools"}]));
    assert_eq!(refused[0]["op"], "connect", "{refused:?}");
    assert!(refused[0]["exception"].is_string(), "{refused:?}");
    // What the SDK saw: the bridge's 401, before any MCP.
    let initialize = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}"#;
    let (status, body) = super::rest::curl(
        "POST",
        "/mcp",
        None,
        &format!(
            "-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' -d '{initialize}'"
        ),
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let refused = drive(
        &format!("http {url} wrong-token-0123456789"),
        json!([{"op": "list_tools"}]),
    );
    assert!(refused[0].get("exception").is_some(), "{refused:?}");

    let (name, fork) = (unique("mcp-http"), unique("mcp-hfork"));
    let steps = drive(&format!("http {url} {TOKEN}"), session_steps(&name, &fork));
    check_session(&steps, &name, &fork);
    // Containers only by default over HTTP: the host workspace is neither shown nor reachable.
    let steps = drive(
        &format!("http {url} {TOKEN}"),
        json!([
            {"op": "call", "tool": "list_workspaces"},
            {"op": "call", "tool": "exec", "args": {"workspace": "host", "command": "id"}},
        ]),
    );
    let shown = content(&steps[1]);
    assert!(
        !shown["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "host"),
        "{shown}"
    );
    let why = refusal(&steps[2]);
    assert!(why.contains("container workspaces only"), "{why}");
    let entries = journal(&format!(
        "MESSAGE_ID={} MCP_TOOL=exec WORKSPACE_NAME=host",
        agent_workspaces::mcp::audit::MCP_TOOL_CALLED
    ));
    let last = entries.last().expect("the refused call is in the journal");
    assert_eq!(last["TOKEN_NAME"], "api-token", "{last}");
    assert_eq!(last["OUTCOME"], "refused", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_limits_refuse_and_bound_what_a_call_asks() {
    require_test_host();
    let conn = bus().await;
    let name = ready_container_named(&conn, "mcp-limits").await;
    let other = ready_container_named(&conn, "mcp-other").await;
    let server = format!(
        "stdio {SERVER} --containers-only --workspace {name} --max-timeout-secs 5 \
         --max-output-bytes 2000 --tools list_workspaces,exec,read_file"
    );
    let steps = drive(
        &server,
        json!([
            {"op": "list_tools"},
            {"op": "call", "tool": "list_workspaces"},
            {"op": "call", "tool": "exec", "args": {"workspace": "host", "command": "id"}},
            {"op": "call", "tool": "exec", "args": {"workspace": other, "command": "id"}},
            {"op": "call", "tool": "exec", "args": {"workspace": name, "command": "true", "timeout_secs": 10}},
            {"op": "call", "tool": "exec",
             "args": {"workspace": name, "command": "seq 1 20000", "max_output_bytes": 1000}},
            {"op": "call", "tool": "exec", "args": {"workspace": name, "command": "sleep 30"}},
            {"op": "call", "tool": "write_file", "args": {"workspace": name, "path": "x", "content": ""}},
        ]),
    );
    let tools = tool_names(&steps[1]);
    assert_eq!(tools, ["list_workspaces", "exec", "read_file"]);
    let shown = content(&steps[2]);
    assert_eq!(
        shown["workspaces"].as_array().unwrap().len(),
        1,
        "only the named workspace: {shown}"
    );
    assert!(refusal(&steps[3]).contains("not among the workspaces"));
    assert!(refusal(&steps[4]).contains(&format!("'{other}' is not among")));
    assert!(refusal(&steps[5]).contains("timeout_secs 10 is over this MCP server's limit of 5 s"));
    // A long output: its head and its tail, and what was left out between them.
    let long = content(&steps[6]);
    let stdout = long["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("1\n2\n3\n"), "{stdout}");
    assert!(stdout.ends_with("19999\n20000\n"), "{stdout}");
    assert!(stdout.contains("bytes of stdout left out"), "{stdout}");
    assert_eq!(long["stdout_bytes"], 108894);
    assert!(long["stdout_omitted_bytes"].as_u64().unwrap() > 100_000);
    // No timeout asked: the cap is the timeout.
    let slept = content(&steps[7]);
    assert_eq!(slept["timed_out"], true, "{slept}");
    assert_eq!(slept["timeout_secs"], 5);
    assert!(refusal(&steps[8]).contains("'write_file' is not enabled"));
    let refused = journal(&format!(
        "MESSAGE_ID={} WORKSPACE_NAME={other} OUTCOME=refused",
        agent_workspaces::mcp::audit::MCP_TOOL_CALLED
    ));
    assert!(!refused.is_empty(), "the refusal is in the journal");
    for w in [&name, &other] {
        manager(&conn).await.destroy_workspace(w).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_ends_its_command() {
    require_test_host();
    let conn = bus().await;
    let name = ready_container_named(&conn, "mcp-cancel").await;
    let server = format!("stdio {SERVER}");
    let steps = drive(
        &server,
        json!([
            // Abandoned after 1 s: the SDK sends notifications/cancelled.
            {"op": "call", "tool": "exec", "timeout": 1,
             "args": {"workspace": name, "command": "sleep 4; touch /workspace/finished"}},
            {"op": "sleep", "secs": 6},
            {"op": "call", "tool": "exec",
             "args": {"workspace": name, "command": "ls /workspace/finished"}},
        ]),
    );
    assert!(steps[1].get("exception").is_some(), "{}", steps[1]);
    let after = content(&steps[3]);
    assert_ne!(after["exit_code"], 0, "the command ran on: {after}");
    assert!(
        after["stderr"].as_str().unwrap().contains("No such file"),
        "{after}"
    );
    let cancelled = journal(&format!(
        "MESSAGE_ID={} WORKSPACE_NAME={name} OUTCOME=cancelled",
        agent_workspaces::mcp::audit::MCP_TOOL_CALLED
    ));
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");

    // A build cancelled: the workspace being built is destroyed.
    let building = unique("mcp-cbuild");
    let steps = drive(
        &server,
        json!([
            {"op": "call", "tool": "create_workspace", "timeout": 1,
             "args": {"name": building, "workspace_type": "container", "distro": "debian-bookworm",
                      "init_script": "sleep 60"}},
            {"op": "sleep", "secs": 3},
        ]),
    );
    assert!(steps[1].get("exception").is_some(), "{}", steps[1]);
    let m = manager(&conn).await;
    wait_for(
        "the cancelled build's workspace to go",
        Duration::from_secs(60),
        || {
            futures_block(m.get_workspace(&building))
                .is_err()
                .then_some(())
        },
    );
    m.destroy_workspace(&name).await.unwrap();
}

/// A future's output from a synchronous closure (on this multi-threaded runtime).
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_copied_between_workspaces_and_changes_awaited() {
    require_test_host();
    let conn = bus().await;
    let a = ready_container_named(&conn, "mcp-copy-a").await;
    let b = ready_container_named(&conn, "mcp-copy-b").await;
    let steps = drive(
        &format!("stdio {SERVER} --containers-only"),
        json!([
            {"op": "call", "tool": "write_file",
             "args": {"workspace": a, "path": "out/result.txt", "content": "42\n", "create_parents": true}},
            {"op": "call", "tool": "copy_files",
             "args": {"workspace": a, "path": "out", "to_workspace": b, "to_path": "from-a"}},
            {"op": "call", "tool": "exec", "args": {"workspace": b, "command": "cat from-a/result.txt"}},
            {"op": "call", "tool": "make_directory", "args": {"workspace": b, "path": "watched"}},
            {"op": "call", "tool": "start_process",
             "args": {"workspace": b, "command": "sleep 3; echo hi > watched/new.txt"}},
            {"op": "call", "tool": "watch_files", "args": {"workspace": b, "path": "watched", "wait_secs": 20}},
            {"op": "call", "tool": "copy_files",
             "args": {"workspace": a, "path": "out", "to_workspace": "host", "to_path": "x"}},
            // Paged: a character cut at a page's end waits for the next page.
            {"op": "call", "tool": "write_file", "args": {"workspace": a, "path": "h.txt", "content": "héllo"}},
            {"op": "call", "tool": "read_file", "args": {"workspace": a, "path": "h.txt", "length": 2}},
            {"op": "call", "tool": "read_file",
             "args": {"workspace": a, "path": "h.txt", "offset": "$9.next_offset", "length": 100}},
        ]),
    );
    content(&steps[1]);
    assert_eq!(content(&steps[2])["to"]["workspace"], b.as_str());
    assert_eq!(content(&steps[3])["stdout"], "42\n");
    let changes = content(&steps[6]);
    assert!(
        changes["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["path"] == "new.txt" && c["event"] == "created"),
        "{changes}"
    );
    // A copy into a workspace the server may not use is refused like any other use of it.
    assert!(refusal(&steps[7]).contains("container workspaces only"));
    let first = content(&steps[9]);
    assert_eq!(first["content"], "h", "{first}");
    assert_eq!(first["more"], true, "{first}");
    assert_eq!(first["next_offset"], 1, "{first}");
    let rest = content(&steps[10]);
    assert_eq!(rest["content"], "éllo", "{rest}");
    assert_eq!(rest["more"], false, "{rest}");
    for w in [&a, &b] {
        manager(&conn).await.destroy_workspace(w).await.unwrap();
    }
}

/// `[mcp.tokens.NAME]` written into the configuration for one test, the file as it was after.
struct McpTokens {
    original: String,
}

const CONFIG: &str = "/etc/agent-workspaces/config.toml";

impl McpTokens {
    fn add(section: &str) -> Self {
        let original = std::fs::read_to_string(CONFIG).unwrap_or_default();
        std::fs::write(CONFIG, format!("{original}\n{section}\n")).unwrap();
        // The bridge reads the configuration when it starts: the next connection starts it.
        systemctl("stop agent-workspaces-http.service");
        Self { original }
    }
}

impl Drop for McpTokens {
    fn drop(&mut self) {
        let _ = std::fs::write(CONFIG, &self.original);
        systemctl("stop agent-workspaces-http.service");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_token_opens_mcp_alone_under_its_own_limits() {
    require_test_host();
    bridge_socket_up();
    let conn = bus().await;
    let mine = ready_container_named(&conn, "mcp-mine").await;
    let theirs = ready_container_named(&conn, "mcp-theirs").await;
    let token = "agent-one-token-0123456789abcdef";
    let hash = ok(&format!("printf %s {token} | sha256sum | cut -d' ' -f1"));
    let _tokens = McpTokens::add(&format!(
        "[mcp.tokens.agent-one]\nsha256 = \"{}\"\nworkspaces = [\"{mine}\"]\ntools = [\"list_workspaces\", \"exec\"]\nmax_timeout_secs = 5\n",
        hash.trim()
    ));
    let url = "http://127.0.0.1:7600/mcp";
    let steps = drive(
        &format!("http {url} {token}"),
        json!([
            {"op": "list_tools"},
            {"op": "call", "tool": "list_workspaces"},
            {"op": "call", "tool": "exec", "args": {"workspace": mine, "command": "echo mine"}},
            {"op": "call", "tool": "exec", "args": {"workspace": theirs, "command": "echo theirs"}},
            {"op": "call", "tool": "exec", "args": {"workspace": mine, "command": "true", "timeout_secs": 10}},
        ]),
    );
    // The token's own cap, not [mcp]'s.
    assert!(
        refusal(&steps[5]).contains("timeout_secs 10 is over this MCP server's limit of 5 s"),
        "{}",
        steps[5]
    );
    let tools = tool_names(&steps[1]);
    assert_eq!(tools, ["list_workspaces", "exec"]);
    let shown: Vec<&str> = content(&steps[2])["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(shown, [mine.as_str()]);
    assert_eq!(content(&steps[3])["stdout"], "mine\n");
    assert!(refusal(&steps[4]).contains(&format!("'{theirs}' is not among")));
    // The token opens nothing of the REST API.
    let (status, body) = super::rest::curl("GET", "/api/workspaces", Some(token), "");
    assert_eq!(status, 401, "{body}");
    // The API token still reaches both through /mcp (the [mcp] section alone applies to it).
    let steps = drive(
        &format!("http {url} {TOKEN}"),
        json!([{"op": "call", "tool": "exec", "args": {"workspace": theirs, "command": "echo theirs"}}]),
    );
    assert_eq!(content(&steps[1])["stdout"], "theirs\n");
    let entries = journal(&format!(
        "MESSAGE_ID={} WORKSPACE_NAME={theirs} TOKEN_NAME=agent-one",
        agent_workspaces::mcp::audit::MCP_TOOL_CALLED
    ));
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["OUTCOME"], "refused");
    for w in [&mine, &theirs] {
        manager(&conn).await.destroy_workspace(w).await.unwrap();
    }
}
