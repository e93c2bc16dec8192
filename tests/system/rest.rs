//! The REST bridge: every documented call, streaming exec, slow and hostile clients.

use std::time::Duration;

use super::*;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Runs curl against the socket-activated bridge; returns (HTTP status, body as JSON or text).
pub fn curl(method: &str, path: &str, token: Option<&str>, args: &str) -> (u16, serde_json::Value) {
    // A body file of its own: tests run at once.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let file = format!(
        "/tmp/aw-body-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let auth = token.map_or(String::new(), |t| format!("-H 'Authorization: Bearer {t}'"));
    let out = sh(&format!(
        "curl -sS -o {file} -w '%{{http_code}}' -X {method} {auth} {args} 'http://127.0.0.1:7600{path}'"
    ));
    let status: u16 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl: {}{}", out.stdout, out.stderr));
    let body = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, json)
}

/// Sets up the bridge as an operator would: its user, the token, the socket.
pub fn bridge_socket_up() {
    ok("systemd-sysusers");
    std::fs::write("/etc/agent-workspaces/api-token", format!("{TOKEN}\n")).unwrap();
    ok("chmod 600 /etc/agent-workspaces/api-token");
    systemctl("start agent-workspaces-http.socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_bridge_serves_the_documented_calls() {
    require_test_host();
    let library = write_library();
    bridge_socket_up();
    let bridge = "agent-workspaces-http.service";
    // Another test may have activated it: stopped, only its socket listens.
    systemctl(&format!("stop {bridge}"));
    assert_ne!(
        sh(&format!("systemctl is-active {bridge}")).stdout.trim(),
        "active"
    );

    // No token, a wrong token: 401, nothing done.
    let (status, body) = curl("GET", "/api/workspaces", None, "");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(
        sh(&format!("systemctl is-active {bridge}")).stdout.trim(),
        "active",
        "socket-activated"
    );
    let (status, _) = curl(
        "POST",
        "/api/workspaces",
        Some("wrong-token-000000000"),
        "-d '{\"name\": \"nope\"}'",
    );
    assert_eq!(status, 401);

    // The documented examples (host and token replaced).
    let name = unique("python-project");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!(
            "-H 'Content-Type: application/json' -d '{{\"name\": \"{name}\", \"workspace_type\": \"container\", \"distro\": \"ubuntu-noble\", \"skills\": [\"python-dev\"], \"init_script\": \"#!/bin/bash\\napt install -y python3 python3-pip\"}}'"
        ),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["status"].as_str()),
        (Some(name.as_str()), Some("pending"))
    );
    assert_eq!(body["skills"], serde_json::json!(["python-dev"]));

    let project = unique("my-project");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!("-d '{{\"name\": \"{project}\", \"template\": \"fullstack\"}}'"),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["template"], "fullstack");
    // A container request may take its distro from the template (the dashboard sends this).
    let explicit = unique("explicit");
    let (status, created) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!(
            "-d '{{\"name\": \"{explicit}\", \"workspace_type\": \"container\", \"template\": \"fullstack\", \"build_on_create\": false}}'"
        ),
    );
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (created["distro"].as_str(), created["status"].as_str()),
        (Some("debian-bookworm"), Some("pending"))
    );
    let (status, _) = curl(
        "DELETE",
        &format!("/api/workspaces/{explicit}"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 204);
    let id = body["id"].as_str().unwrap().to_owned();
    let ready = wait_for(
        "the template workspace to build",
        Duration::from_secs(600),
        || {
            let (_, body) = curl("GET", &format!("/api/workspaces/{id}"), Some(TOKEN), "");
            (body["status"] != "building").then_some(body)
        },
    );
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["error_message"], "");

    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{id}/exec"),
        Some(TOKEN),
        "-d '{\"command\": \"cat /workspace/template-env; echo oops >&2; exit 3\"}'",
    );
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"exit_code": 3, "stdout": "yes\n", "stderr": "oops\n", "timed_out": false})
    );
    let (status, body) = curl(
        "GET",
        &format!("/api/workspaces/{project}/init-log"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200);
    assert!(
        body["content"]
            .as_str()
            .unwrap()
            .contains("== init script finished: exit code 0"),
        "{body}"
    );
    let (status, body) = curl(
        "GET",
        &format!("/api/workspaces/{id}/debug"),
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ready")),
        "{body}"
    );
    assert_eq!(body["machine_state"], "running");
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{id}/rerun-init"),
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (status, body["exit_code"].as_i64()),
        (200, Some(0)),
        "{body}"
    );
    let (status, body) = curl("GET", "/api/templates", Some(TOKEN), "");
    assert_eq!(status, 200);
    assert_eq!(body[0]["name"], "fullstack");

    // PATCH: limits reach the running container's unit at once (0 removes one); the network
    // applies at the next start.
    let unit = format!("agent-workspace-{project}.service");
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"limits\": {\"memory_max\": 536870912, \"tasks_max\": 200}, \"env_vars\": {\"NEW\": \"1\"}}'",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["limits"],
        serde_json::json!({"memory_max": 536870912u64, "cpu_quota_percent": 0, "tasks_max": 200,
                           "idle_pause_secs": 0, "idle_stop_secs": 0})
    );
    assert_eq!(body["env_var_names"], serde_json::json!(["NEW"]));
    assert_eq!(
        systemctl(&format!("show -p MemoryMax -p TasksMax --value {unit}")),
        "536870912\n200\n"
    );
    // Egress rules: an object of two lists, normalized; a bad entry names its key.
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"egress\": {\"allow\": [\"192.0.2.0/24\", \"Deb.Debian.org\"], \"deny\": [\"*.example.com\"]}}'",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["egress"],
        serde_json::json!({"allow": ["192.0.2.0/24", "deb.debian.org"], "deny": ["*.example.com"]})
    );
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"egress\": {\"allow\": [\"169.254.169.254\"]}}'",
    );
    assert_eq!(
        (status, &body["error"]["field"]),
        (400, &serde_json::json!("egress_allow")),
        "{body}"
    );
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"egress\": {\"allow\": [], \"deny\": []}}'",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["egress"], serde_json::json!({"allow": [], "deny": []}));
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"limits\": {\"memory_max\": 0}, \"network\": \"private\"}'",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["limits"]["memory_max"].as_u64(),
            body["network"].as_str()
        ),
        (Some(0), Some("private"))
    );
    assert_eq!(
        systemctl(&format!("show -p MemoryMax -p TasksMax --value {unit}")),
        "infinity\n200\n"
    );
    let net = |expect: &str| {
        let (_, body) = curl(
            "POST",
            &format!("/api/workspaces/{id}/exec"),
            Some(TOKEN),
            "-d '{\"command\": \"echo $(ls /sys/class/net)\"}'",
        );
        assert_eq!(body["exit_code"], 0, "{body}");
        let got = body["stdout"].as_str().unwrap().to_owned();
        assert_eq!(got == "lo\n", expect == "lo", "{expect}: {got}");
    };
    net("the host's interfaces until the next start");
    ok(&format!(
        "busctl call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces StopWorkspace s {project}"
    ));
    net("lo");
    let (status, body) = curl(
        "PATCH",
        "/api/workspaces/host",
        Some(TOKEN),
        "-d '{\"network\": \"private\"}'",
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'network'"),
        "{body}"
    );
    // The key came from the service over D-Bus as data, not parsed from the message.
    assert_eq!(body["error"]["field"], "network", "{body}");
    let (status, body) = curl(
        "PATCH",
        &format!("/api/workspaces/{id}"),
        Some(TOKEN),
        "-d '{\"limits\": {\"memory\": 5}}'",
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'limits.memory'"),
        "{body}"
    );
    assert_eq!(body["error"]["field"], "limits.memory", "{body}");

    // The OpenAPI document, without a token: the checked-in file.
    let (status, doc) = curl("GET", "/api/openapi.json", None, "");
    assert_eq!(status, 200);
    let repo = std::env::var("TESTHOST_REPO").unwrap();
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{repo}/http/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc, checked_in);

    // The list has both, with their status.
    let (status, list) = curl("GET", "/api/workspaces", Some(TOKEN), "");
    assert_eq!(status, 200);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{project} not listed: {list}"));
    assert_eq!(
        (listed["name"].as_str(), listed["status"].as_str()),
        (Some(project.as_str()), Some("ready"))
    );
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == name.as_str())
    );

    // The documented python3 example, in a Debian container whose init script installs it
    // as the documented one does (the Ubuntu archive is out of reach here).
    let py = unique("python-bookworm");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!(
            "-d '{{\"name\": \"{py}\", \"workspace_type\": \"container\", \"distro\": \"debian-bookworm\", \"init_script\": \"#!/bin/bash\\napt install -y python3\"}}'"
        ),
    );
    assert_eq!(status, 201, "{body}");
    if body["status"] == "pending" {
        let (status, body) = curl(
            "POST",
            &format!("/api/workspaces/{py}/build"),
            Some(TOKEN),
            "",
        );
        assert_eq!(status, 202, "{body}");
    }
    let built = wait_for(
        "the python workspace to build",
        Duration::from_secs(600),
        || {
            let (_, body) = curl("GET", &format!("/api/workspaces/{py}"), Some(TOKEN), "");
            (body["status"] != "building" && body["status"] != "pending").then_some(body)
        },
    );
    assert_eq!(built["status"], "ready", "{built}");
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{py}/exec"),
        Some(TOKEN),
        "-d '{\"command\": \"python3 --version\"}'",
    );
    assert_eq!(status, 200, "{body}");
    let version = body["stdout"].as_str().unwrap();
    assert!(
        version.starts_with("Python 3.") && version.ends_with('\n') && version.lines().count() == 1,
        "{body}"
    );
    assert_eq!(
        body,
        serde_json::json!({"exit_code": 0, "stdout": version, "stderr": "", "timed_out": false})
    );
    let (status, _) = curl("DELETE", &format!("/api/workspaces/{py}"), Some(TOKEN), "");
    assert_eq!(status, 204);

    // Errors: 400 naming the field, 404, 409, 413.
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        "-d '{\"name\": \"Bad Name\"}'",
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'name'"),
        "{body}"
    );
    let (status, body) = curl("POST", "/api/workspaces", Some(TOKEN), "-d '{\"name\": 5}'");
    assert_eq!(status, 400, "{body}");
    let (status, body) = curl("GET", "/api/workspaces/no-such-one", Some(TOKEN), "");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!("-d '{{\"name\": \"{project}\"}}'"),
    );
    assert_eq!(status, 409);
    ok("head -c 17000000 /dev/zero > /tmp/aw-big");
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{id}/exec"),
        Some(TOKEN),
        "--data-binary @/tmp/aw-big",
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("too_large"))
    );

    // Without the shipped polkit rule the service refuses the bridge's user: 403.
    let rule = "/usr/share/polkit-1/rules.d/50-agent-workspaces-http.rules";
    let saved = std::fs::read_to_string(rule).unwrap();
    std::fs::remove_file(rule).unwrap();
    let refused = wait_for("polkitd to drop the rule", Duration::from_secs(15), || {
        let (status, body) = curl(
            "POST",
            "/api/workspaces",
            Some(TOKEN),
            "-d '{\"name\": \"refused\"}'",
        );
        (status == 403).then_some(body)
    });
    assert_eq!(refused["error"]["code"], "forbidden");
    std::fs::write(rule, saved).unwrap();
    wait_for(
        "polkitd to load the rule again",
        Duration::from_secs(15),
        || {
            let (status, _) = curl(
                "DELETE",
                &format!("/api/workspaces/{name}"),
                Some(TOKEN),
                "",
            );
            (status == 204).then_some(())
        },
    );

    let (status, _) = curl("DELETE", &format!("/api/workspaces/{id}"), Some(TOKEN), "");
    assert_eq!(status, 204);
    let (status, _) = curl("GET", &format!("/api/workspaces/{id}"), Some(TOKEN), "");
    assert_eq!(status, 404);
    // In case a create slipped through before polkitd dropped the rule.
    curl("DELETE", "/api/workspaces/refused", Some(TOKEN), "");
    std::fs::remove_dir_all(&library).unwrap();
}

/// Sends `request` as it is on a new connection to the bridge, then returns all the bridge
/// answers until it closes the connection; fails if it has not within 90 seconds.
fn raw_http(request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect("127.0.0.1:7600").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!(
            "the bridge kept the connection open: {e}; so far: {}",
            String::from_utf8_lossy(&out)
        );
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts a streaming exec with curl; its stdout is the event stream.
pub(super) fn sse_exec(workspace: &str, body: &str) -> std::process::Child {
    std::process::Command::new("curl")
        .args(["-sS", "-N", "-X", "POST"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["-H", "Accept: text/event-stream", "-d", body])
        .arg(format!(
            "http://127.0.0.1:7600/api/workspaces/{workspace}/exec"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The next server-sent event: (name, data as JSON); None at the end of the stream.
pub(super) fn next_event(r: &mut impl std::io::BufRead) -> Option<(String, serde_json::Value)> {
    let (mut name, mut data) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            return None;
        }
        let line = line.trim_end_matches('\n');
        if line.is_empty() {
            if !data.is_empty() {
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
        } else if let Some(v) = line.strip_prefix("event:") {
            name = v.trim_start().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_bridge_streams_exec_and_bounds_slow_clients() {
    require_test_host();
    bridge_socket_up();
    let ws = unique("stream");
    let (status, body) = curl(
        "POST",
        "/api/workspaces",
        Some(TOKEN),
        &format!("-d '{{\"name\": \"{ws}\"}}'"),
    );
    assert_eq!(status, 201, "{body}");

    // The first line arrives while the command still runs: it waits for a file that is made
    // only after that line was read here.
    let go = format!("/var/tmp/{ws}-go");
    let mut curl_sse = sse_exec(
        &ws,
        &format!(
            r#"{{"command": "echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second >&2; printf 'no newline'; exit 5"}}"#
        ),
    );
    let mut events = std::io::BufReader::new(curl_sse.stdout.take().unwrap());
    let first = next_event(&mut events).expect("a first event");
    assert_eq!(first, ("stdout".to_owned(), serde_json::json!("first\n")));
    assert!(
        curl_sse.try_wait().unwrap().is_none(),
        "the stream is still open"
    );
    std::fs::write(&go, "").unwrap();
    let mut rest = Vec::new();
    while let Some(ev) = next_event(&mut events) {
        rest.push(ev);
    }
    assert!(curl_sse.wait().unwrap().success());
    let text = |stream: &str| -> String {
        rest.iter()
            .filter(|(n, _)| n == stream)
            .map(|(_, d)| d.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(text("stderr"), "second\n");
    assert_eq!(text("stdout"), "no newline");
    assert_eq!(
        rest.last().unwrap(),
        &(
            "exit".to_owned(),
            serde_json::json!({"exit_code": 5, "timed_out": false})
        )
    );
    std::fs::remove_file(&go).unwrap();

    // stdin, cwd and env reach a streamed command; a timeout is the last event.
    let mut c = sse_exec(
        &ws,
        r#"{"command": "cat; echo \"$K\"", "stdin": "in\n", "env": {"K": "v"}}"#,
    );
    let mut r = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut all = Vec::new();
    while let Some(ev) = next_event(&mut r) {
        all.push(ev);
    }
    c.wait().unwrap();
    let out: String = all
        .iter()
        .filter(|(n, _)| n == "stdout")
        .map(|(_, d)| d.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(out, "in\nv\n");
    let mut c = sse_exec(&ws, r#"{"command": "sleep 30", "timeout_secs": 1}"#);
    let mut r = std::io::BufReader::new(c.stdout.take().unwrap());
    let last = std::iter::from_fn(|| next_event(&mut r)).last();
    c.wait().unwrap();
    assert_eq!(
        last,
        Some((
            "exit".to_owned(),
            serde_json::json!({"exit_code": -1, "timed_out": true})
        ))
    );

    // Refusals before the command starts are plain HTTP errors.
    let (status, body) = curl(
        "POST",
        "/api/workspaces/no-such-one/exec",
        Some(TOKEN),
        "-H 'Accept: text/event-stream' -d '{\"command\": \"true\"}'",
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = curl(
        "POST",
        &format!("/api/workspaces/{ws}/exec"),
        Some(TOKEN),
        "-H 'Accept: text/event-stream' -d '{\"command\": \"true\", \"cwd\": \"/no/such/dir\"}'",
    );
    assert_eq!(status, 400, "{body}");

    // A client that leaves mid-stream ends its command.
    let mut c = sse_exec(&ws, r#"{"command": "echo $$; exec sleep 1000"}"#);
    let mut r = std::io::BufReader::new(c.stdout.take().unwrap());
    let (_, pid) = next_event(&mut r).unwrap();
    let pid: u32 = pid.as_str().unwrap().trim().parse().unwrap();
    assert!(!pid_gone(pid), "the command runs");
    c.kill().unwrap();
    c.wait().unwrap();
    wait_for(
        "the abandoned command to end",
        Duration::from_secs(15),
        || pid_gone(pid).then_some(()),
    );

    // Oversized heads are refused; a client that sends a head or a body too slowly is cut off.
    let big = sh(&format!(
        "curl -sS -w ' %{{http_code}}' -H 'Authorization: Bearer {TOKEN}' -H \"X-Big: $(head -c 20000 /dev/zero | tr '\\0' a)\" http://127.0.0.1:7600/api/templates"
    ));
    let (body, code) = big.stdout.trim().rsplit_once(' ').unwrap();
    assert_eq!(code, "431", "{}", big.stderr);
    let error: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(error["error"]["code"], "header_too_large");
    // A method a path does not take: 405 with the documented body and Allow.
    let wrong = sh(&format!(
        "curl -sS -i -X PUT -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7600/api/templates"
    ));
    assert!(wrong.stdout.starts_with("HTTP/1.1 405"), "{}", wrong.stdout);
    assert!(
        wrong.stdout.to_lowercase().contains("\nallow: get"),
        "{}",
        wrong.stdout
    );
    assert!(
        wrong.stdout.contains("\"method_not_allowed\""),
        "{}",
        wrong.stdout
    );
    let slow_head = raw_http(b"GET /api/templates HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(slow_head, "", "closed without an answer");
    let slow_body = raw_http(
        format!(
            "POST /api/workspaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"na"
        )
        .as_bytes(),
    );
    assert!(slow_body.starts_with("HTTP/1.1 408"), "{slow_body}");
    assert!(slow_body.contains("\"code\":\"timeout\""), "{slow_body}");

    let (status, _) = curl("DELETE", &format!("/api/workspaces/{ws}"), Some(TOKEN), "");
    assert_eq!(status, 204);
}
