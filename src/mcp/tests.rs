//! Contract tests of the MCP server: the SDK's own client over an in-memory stream, against the
//! real D-Bus objects on a private bus over the core's fakes (`dbus::tests`). No root, no
//! polkit, no systemd.

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{CallToolRequest, CallToolRequestParams, ClientRequest};
use rmcp::service::{PeerRequestOptions, RunningService};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Map, Value, json};

use super::*;
use crate::dbus::tests::{Service, connect, service};

async fn server(
    svc: &Service,
    section: Section,
    transport: Transport,
) -> RunningService<RoleClient, ()> {
    let conn = connect(&svc.address).await;
    let shared = Arc::new(Shared {
        bus: Bus::new(conn, Some(svc.address.clone())),
        policy: Policy::new(section, transport, &tools::names()).unwrap(),
        caller: Caller::Uid(1000),
        tokens: Vec::new(),
    });
    let (near, far) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Ok(s) = Server::new(shared).serve(far).await {
            let _ = s.waiting().await;
        }
    });
    ().serve(near).await.expect("the client's initialize")
}

fn params(tool: &'static str, args: Value) -> CallToolRequestParams {
    let Value::Object(map) = args else {
        panic!("arguments must be an object")
    };
    CallToolRequestParams::new(tool).with_arguments(map)
}

async fn call(
    client: &RunningService<RoleClient, ()>,
    tool: &'static str,
    args: Value,
) -> (bool, Value, String) {
    let r = client
        .call_tool(params(tool, args))
        .await
        .expect("a tool result");
    let text = r
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("");
    (
        r.is_error == Some(true),
        r.structured_content.unwrap_or(Value::Null),
        text,
    )
}

#[tokio::test]
async fn tools_are_listed_with_schemas_and_only_the_operators_set() {
    let svc = service().await;
    let all = server(&svc, Section::default(), Transport::Stdio).await;
    let tools = all.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), tools::TOOLS.len());
    let exec = tools.iter().find(|t| t.name == "exec").unwrap();
    assert_eq!(
        exec.input_schema["required"],
        json!(["workspace", "command"])
    );
    assert_eq!(
        exec.input_schema["properties"]["timeout_secs"]["type"],
        "integer"
    );
    assert!(
        exec.description
            .as_deref()
            .unwrap()
            .contains("head and tail")
    );

    let some = Section {
        tools: Some(vec!["list_workspaces".into(), "exec".into()]),
        ..Section::default()
    };
    let narrow = server(&svc, some, Transport::Stdio).await;
    let mut names: Vec<String> = narrow
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["exec", "list_workspaces"]);
    let (error, value, text) = call(&narrow, "list_processes", json!({"workspace": "host"})).await;
    assert!(error, "{text}");
    assert_eq!(value["error"]["code"], "NotAllowedByOperator");
    assert!(text.contains("'list_processes' is not enabled"), "{text}");
}

#[tokio::test]
async fn http_serves_containers_only_and_says_why_it_refuses() {
    let svc = service().await;
    let client = server(&svc, Section::default(), Transport::Http).await;
    let (error, value, _) = call(&client, "list_workspaces", json!({})).await;
    assert!(!error);
    assert_eq!(
        value["workspaces"],
        json!([]),
        "the host workspace is not shown"
    );
    let (error, value, text) = call(
        &client,
        "exec",
        json!({"workspace": "host", "command": "true"}),
    )
    .await;
    assert!(error);
    assert_eq!(value["error"]["outcome"], "refused");
    assert!(
        text.contains("container workspaces only") && text.contains("--allow-host"),
        "{text}"
    );
    assert!(svc.fakes.exec.0.lock().unwrap().is_empty(), "nothing ran");
    let (error, _, text) = call(
        &client,
        "create_workspace",
        json!({"name": "h", "workspace_type": "host"}),
    )
    .await;
    assert!(error && text.contains("host workspace"), "{text}");
    // Asked for no type, a containers-only server makes a container.
    let (error, value, text) = call(
        &client,
        "create_workspace",
        json!({"name": "box", "distro": "debian-bookworm", "wait": false}),
    )
    .await;
    assert!(!error, "{text}");
    assert_eq!(value["workspace_type"], "container");
    assert_eq!(value["name"], "box");
}

#[tokio::test]
async fn exec_runs_with_the_capped_timeout_and_refuses_more() {
    let svc = service().await;
    let section = Section {
        max_timeout_secs: Some(30),
        ..Section::default()
    };
    let client = server(&svc, section, Transport::Stdio).await;
    let (error, value, text) = call(
        &client,
        "exec",
        json!({"workspace": "host", "command": "true"}),
    )
    .await;
    assert!(!error, "{text}");
    assert_eq!(value["exit_code"], 0);
    assert_eq!(value["timed_out"], false);
    assert_eq!(
        value["timeout_secs"], 30,
        "the cap is the timeout of a call that asks none"
    );
    assert!(text.starts_with("exit_code: 0"), "{text}");
    let ran = svc.fakes.exec.0.lock().unwrap().pop().unwrap();
    assert_eq!(ran.command, "true");
    assert_eq!(ran.timeout, Duration::from_secs(30));
    let (error, value, text) = call(
        &client,
        "exec",
        json!({"workspace": "host", "command": "true", "timeout_secs": 31}),
    )
    .await;
    assert!(error);
    assert_eq!(value["error"]["outcome"], "refused");
    assert!(
        text.contains("timeout_secs 31 is over this MCP server's limit of 30 s"),
        "{text}"
    );
    // A tool without options refuses what its schema does not name.
    let (error, _, text) = call(
        &client,
        "list_processes",
        json!({"workspace": "host", "all": true}),
    )
    .await;
    assert!(
        error && text.contains("all: unknown argument of list_processes"),
        "{text}"
    );
    // Options the service does not know are refused by its own schema, naming them.
    let (error, _, text) = call(
        &client,
        "exec",
        json!({"workspace": "host", "command": "true", "colour": "red"}),
    )
    .await;
    assert!(error && text.contains("colour"), "{text}");
}

#[tokio::test]
async fn a_cancelled_exec_leaves_the_bus_and_the_next_call_works() {
    let svc = service().await;
    let client = server(&svc, Section::default(), Transport::Stdio).await;
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(params(
        "exec",
        json!({"workspace": "host", "command": "block"}),
    )));
    let handle = client
        .peer()
        .send_cancellable_request(request, PeerRequestOptions::no_options())
        .await
        .unwrap();
    // The command is running ("block" waits for its cancel).
    let started = async {
        while svc.fakes.exec.0.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the command started");
    handle.cancel(None).await.unwrap();
    // The service ends the command of the caller that left: the workspace's commands end, so
    // a destroy (which waits for them) of another workspace is not what is checked here; the
    // next exec on the same server runs.
    let (error, value, text) = tokio::time::timeout(
        Duration::from_secs(10),
        call(
            &client,
            "exec",
            json!({"workspace": "host", "command": "true"}),
        ),
    )
    .await
    .expect("the next call answers");
    assert!(!error, "{text}");
    assert_eq!(value["exit_code"], 0);
}

#[tokio::test]
async fn resources_name_the_workspaces_the_server_may_show() {
    let svc = service().await;
    let client = server(&svc, Section::default(), Transport::Stdio).await;
    let list = client.list_all_resources().await.unwrap();
    let uris: Vec<&str> = list.iter().map(|r| r.uri.as_str()).collect();
    assert!(
        uris.contains(&"workspaces://list") && uris.contains(&"workspace://host"),
        "{uris:?}"
    );
    let read = client
        .read_resource(rmcp::model::ReadResourceRequestParams::new(
            "workspace://host",
        ))
        .await
        .unwrap();
    let text = match &read.contents[0] {
        rmcp::model::ResourceContents::TextResourceContents { text, .. } => text.clone(),
        other => panic!("{other:?}"),
    };
    let record: Map<String, Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(record["name"], "host");
    assert_eq!(record["workspace_type"], "host");
    let http = server(&svc, Section::default(), Transport::Http).await;
    let e = http
        .read_resource(rmcp::model::ReadResourceRequestParams::new(
            "workspace://host",
        ))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("container workspaces only"), "{e}");
}

#[tokio::test]
async fn each_http_request_is_served_under_its_own_tokens_limits() {
    let svc = service().await;
    let conn = connect(&svc.address).await;
    let section: Section = toml::from_str(&format!(
        "allow_host = true\n[tokens.agent-1]\nsha256 = \"{}\"\nworkspaces = [\"box\"]\n",
        "ab".repeat(32)
    ))
    .unwrap();
    let tokens = policy::http_tokens(&section, &tools::names()).unwrap();
    let shared = Arc::new(Shared {
        bus: Bus::new(conn, Some(svc.address.clone())),
        policy: Policy::new(section, Transport::Http, &tools::names()).unwrap(),
        caller: Caller::Token("api-token".into()),
        tokens,
    });
    let request = |token: Option<&str>| {
        let mut parts = http::Request::new(()).into_parts().0;
        if let Some(t) = token {
            parts.extensions.insert(TokenName(t.to_owned()));
        }
        let mut ext = rmcp::model::Extensions::new();
        ext.insert(parts);
        ext
    };
    let server = Server::new(shared.clone());
    let (policy, caller) = server.who(&request(Some("agent-1")));
    assert_eq!(caller, Caller::Token("agent-1".into()));
    assert!(policy.check_workspace("web", "container").is_err());
    policy.check_workspace("box", "container").unwrap();
    // The session was opened by agent-1: a request of it with another token gets nothing.
    let (policy, _) = server.who(&request(Some("api-token")));
    assert!(!policy.tool_allowed("list_workspaces"));
    // The API token, in a session of its own: [mcp]'s limits.
    let server = Server::new(shared.clone());
    let (policy, caller) = server.who(&request(Some("api-token")));
    assert_eq!(caller, Caller::Token("api-token".into()));
    policy.check_workspace("web", "host").unwrap();
    // A name no token has (the bridge never sets one): nothing.
    let server = Server::new(shared);
    let (policy, _) = server.who(&request(Some("nobody")));
    assert!(!policy.tool_allowed("exec"));
}
