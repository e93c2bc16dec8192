//! MCP's exec round trip against D-Bus `Exec`, measured in the same run: `agent-workspaces-mcp`
//! started as an agent starts it (a child speaking MCP on stdio), driven by the SDK's own client
//! (rmcp's), against the same command through `Exec` on the bus. Runs inside the test host
//! against the installed service (`make bench`). Prints the figures and each ratio beside its
//! target, then one line of JSON; asserts nothing but that the calls succeed.

use std::collections::HashMap;

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;

use agent_workspaces::dbus::client::WorkspacesProxy;

// Shared with exec_latency, which uses the rest of it.
#[allow(dead_code)]
mod common;
use common::timing::{Bound, Figures, ROUNDS, WARMUP, report, time_in_turn};

fn exec_args(workspace: &str, command: &str) -> CallToolRequestParams {
    let serde_json::Value::Object(args) =
        serde_json::json!({"workspace": workspace, "command": command})
    else {
        unreachable!("an object")
    };
    CallToolRequestParams::new("exec").with_arguments(args)
}

#[tokio::main]
async fn main() {
    let conn = zbus::Connection::system().await.expect("system bus");
    let m = WorkspacesProxy::new(&conn).await.expect("proxy");
    let mut fig = Figures::default();
    println!("MCP exec against D-Bus Exec ({ROUNDS} runs each, after {WARMUP} warm-up runs)");
    let server = which("agent-workspaces-mcp");
    let client =
        ().serve(TokioChildProcess::new(tokio::process::Command::new(&server)).expect("spawn"))
            .await
            .expect("the MCP session");
    let container = format!("bench-mcp-{}", std::process::id());
    let built = common::build_container(&conn, &m, &container, &[]).await;
    println!(
        "(container {container} built in {:.1} s)",
        built.as_secs_f64()
    );

    for (label, workspace, target) in [
        ("host", "host", Bound::AtMost(1.5)),
        ("container", container.as_str(), Bound::AtMost(1.5)),
    ] {
        let mcp_once = || {
            let client = &client;
            async move {
                let r = client
                    .call_tool(exec_args(workspace, "true"))
                    .await
                    .expect("tools/call");
                assert_ne!(r.is_error, Some(true), "{r:?}");
                let s = r.structured_content.expect("structured content");
                assert_eq!(s["exit_code"], 0, "{s}");
            }
        };
        let dbus_once = || {
            let m = m.clone();
            async move {
                let (code, ..) = m
                    .exec(workspace, "true", HashMap::new())
                    .await
                    .expect("Exec");
                assert_eq!(code, 0);
            }
        };
        // What the server calls: ExecWithFds, with pipes of the caller's.
        let fds_once = || {
            let m = m.clone();
            async move {
                let null = std::fs::File::open("/dev/null").unwrap();
                let (out_r, out_w) = std::io::pipe().unwrap();
                let (err_r, err_w) = std::io::pipe().unwrap();
                let (code, ..) = m
                    .exec_with_fds(
                        workspace,
                        "true",
                        (&null).into(),
                        (&out_w).into(),
                        (&err_w).into(),
                        HashMap::new(),
                    )
                    .await
                    .expect("ExecWithFds");
                assert_eq!(code, 0);
                drop((out_r, err_r, out_w, err_w));
            }
        };
        println!("{label}: timed in turn (D-Bus Exec, D-Bus ExecWithFds, MCP exec):");
        let [dbus, fds, mcp] = time_in_turn(dbus_once, fds_once, mcp_once).await;
        let dbus = report(
            &format!("baseline: Exec('{label}', 'true') through D-Bus"),
            dbus,
        );
        let fds = report(
            &format!("ExecWithFds('{label}', 'true') through D-Bus"),
            fds,
        );
        let mcp = report(&format!("MCP tools/call exec on '{label}' (stdio)"), mcp);
        fig.set(&format!("mcp_exec_{label}_p50_ms"), mcp.p50 * 1e3);
        fig.set(&format!("dbus_exec_{label}_p50_ms"), dbus.p50 * 1e3);
        fig.ratio(
            &format!("mcp_exec_vs_dbus_exec_{label}"),
            mcp.p50 / dbus.p50,
            target,
            &format!("(MCP adds {:.3} ms)", (mcp.p50 - dbus.p50) * 1e3),
        );
        fig.ratio(
            &format!("mcp_exec_vs_dbus_exec_with_fds_{label}"),
            mcp.p50 / fds.p50,
            Bound::Reported,
            "(the call the server makes)",
        );
    }
    // The MCP hop alone: a ping through the same session (JSON-RPC over the child's stdio).
    let ping = report(
        "baseline: MCP ping round trip (stdio)",
        common::timing::time_async(|| async {
            client
                .send_request(rmcp::model::ClientRequest::PingRequest(Default::default()))
                .await
                .expect("ping");
        })
        .await,
    );
    fig.set("mcp_ping_p50_ms", ping.p50 * 1e3);
    client.cancel().await.expect("the session ends");
    m.destroy_workspace(&container).await.expect("destroy");
    println!("{}", serde_json::Value::Object(fig.0));
}

/// A program's path on PATH.
fn which(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed"))
}
