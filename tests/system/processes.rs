//! Background processes (`StartProcess`): they outlive the call, take input, give output,
//! end when signalled or when their workspace goes, in host and container workspaces alike.

use std::time::Duration;

use agent_workspaces::dbus::client::{ProcessProxy, WorkspacesProxy};
use futures_util::StreamExt;
use zbus::{Connection, OwnedObjectPath, Variant};

use super::*;

pub(super) async fn process(conn: &Connection, path: OwnedObjectPath) -> ProcessProxy<'static> {
    ProcessProxy::builder(conn)
        .path(path)
        .build()
        .await
        .unwrap()
}

/// Output from `offset` until `want` is in it (or 20 s pass): all of it, and the next offset.
pub(super) async fn output_until(p: &ProcessProxy<'_>, want: &str) -> String {
    let mut all = Vec::new();
    let mut offset = 0;
    for _ in 0..400 {
        let (data, next, ended) = p.read_output(offset, 65536).await.unwrap();
        all.extend(data);
        offset = next;
        if String::from_utf8_lossy(&all).contains(want) || ended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    String::from_utf8(all).unwrap()
}

/// The whole life of one process in `workspace`: output while it runs, input, its exit code
/// in `Wait`, in its properties and in `ProcessExited`, and its entry in `ListProcesses`.
async fn input_output_and_exit(conn: &Connection, m: &WorkspacesProxy<'_>, workspace: &str) {
    let script = "echo started; read line; echo \"got $line\"; echo oops >&2; echo \"$K\"; exit 7";
    let path = m
        .start_process(
            workspace,
            script,
            spec(vec![("env", env_variant(&[("K", "from env")]))]),
        )
        .await
        .unwrap();
    let p = process(conn, path.clone()).await;
    let mut exited = p.receive_process_exited().await.unwrap();
    assert_eq!(output_until(&p, "started").await, "started\n");
    assert!(p.running().await.unwrap(), "it waits for its input");
    assert!(p.started_at().await.unwrap() > 0);
    assert_eq!(p.command().await.unwrap(), script);
    let listed = m.list_processes(workspace).await.unwrap();
    let id = p.id().await.unwrap();
    assert!(
        listed.contains(&(id.clone(), script.to_owned(), true, -1)),
        "{listed:?}"
    );

    p.write_input(b"hello\n").await.unwrap();
    assert_eq!(p.wait(30).await.unwrap(), (7, false));
    let signal = tokio::time::timeout(Duration::from_secs(10), exited.next())
        .await
        .expect("ProcessExited arrives")
        .unwrap();
    assert_eq!(signal.args().unwrap().exit_code, 7);
    assert!(!p.running().await.unwrap());
    assert_eq!(p.exit_code().await.unwrap(), 7);
    assert!(p.ended_at().await.unwrap() >= p.started_at().await.unwrap());
    let (all, next, ended) = p.read_output(0, 65536).await.unwrap();
    assert_eq!(
        String::from_utf8(all).unwrap(),
        "started\ngot hello\noops\nfrom env\n"
    );
    assert!(ended, "all output read from a finished process");
    assert_eq!(p.read_output(next, 10).await.unwrap(), (vec![], next, true));
    assert!(m.list_processes(workspace).await.unwrap().contains(&(
        id,
        script.to_owned(),
        false,
        7
    )));
    assert_error(
        p.write_input(b"late\n").await,
        "org.agent.Workspaces.Error.JobFailed",
        "closed",
    );
}

/// What `count` prints, run in the workspace.
async fn running(m: &WorkspacesProxy<'_>, workspace: &str, count: &str) -> String {
    let (_, out, ..) = m.exec(workspace, count, no_options()).await.unwrap();
    String::from_utf8(out).unwrap().trim().to_owned()
}

/// `Signal` reaches every process of the tree; none is left after.
async fn a_signal_ends_the_whole_tree(conn: &Connection, m: &WorkspacesProxy<'_>, workspace: &str) {
    let marker = format!("sleep 10{}", std::process::id() % 100);
    let path = m
        .start_process(
            workspace,
            &format!("{marker} & {marker}; echo never"),
            no_options(),
        )
        .await
        .unwrap();
    let p = process(conn, path).await;
    let count = format!(
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^{marker}' || true"
    );
    for _ in 0..100 {
        if running(m, workspace, &count).await == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running(m, workspace, &count).await, "2");
    assert_error(
        p.signal(0).await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "signal",
    );
    p.signal(15).await.unwrap();
    assert_eq!(p.wait(30).await.unwrap(), (128 + 15, false));
    assert_eq!(running(m, workspace, &count).await, "0");
    assert!(!output_until(&p, "never").await.contains("never"));
    assert_error(
        p.signal(15).await,
        "org.agent.Workspaces.Error.JobFailed",
        "ended",
    );
}

/// Reads `stream` until `want` has come (20 s at most); everything read.
pub(super) async fn read_until(
    stream: &mut tokio::net::UnixStream,
    seen: &mut Vec<u8>,
    want: &str,
) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(want) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{want:?} within 20 s; got {:?}",
                    String::from_utf8_lossy(seen)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "{want:?} before the end; got {:?}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// A process on a pseudo-terminal: its size, `TERM`, a caller attached through `OpenPty`
/// typing into it and reading it (the output kept so far first), `Resize` (SIGWINCH to the
/// foreground process), and the end of the attachment when the process ends.
async fn on_a_terminal(conn: &Connection, m: &WorkspacesProxy<'_>, workspace: &str) {
    use tokio::io::AsyncWriteExt;
    let script = "stty size; test -t 0 && echo is-a-tty; echo \"term=$TERM\"; \
                  read -r line; echo \"got $line\"; trap 'stty size; exit 3' WINCH; \
                  while :; do sleep 0.1; done";
    let path = m
        .start_process(
            workspace,
            script,
            spec(vec![
                ("pty", Variant::from(true)),
                ("cols", Variant::from(100u16)),
                ("rows", Variant::from(30u16)),
            ]),
        )
        .await
        .unwrap();
    let p = process(conn, path).await;
    assert!(p.pty().await.unwrap());
    let before = output_until(&p, "term=").await;
    let fd = p.open_pty().await.unwrap();
    let std_stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
    std_stream.set_nonblocking(true).unwrap();
    let mut t = tokio::net::UnixStream::from_std(std_stream).unwrap();
    let mut seen = Vec::new();
    // What came before the caller attached comes first.
    read_until(&mut t, &mut seen, "term=xterm-256color\r\n").await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(
        text.starts_with("30 100\r\nis-a-tty\r\n"),
        "{text:?} ({before:?})"
    );
    t.write_all(b"hello\n").await.unwrap();
    read_until(&mut t, &mut seen, "got hello\r\n").await;
    // The terminal echoes what is typed, as terminals do.
    assert!(String::from_utf8_lossy(&seen).contains("hello\r\ngot hello\r\n"));
    p.resize(120, 40).await.unwrap();
    read_until(&mut t, &mut seen, "40 120\r\n").await;
    assert_eq!(p.wait(30).await.unwrap(), (3, false));
    // Once the process has ended and all is sent, the caller reads end of file.
    let mut rest = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut t, &mut rest),
    )
    .await
    .expect("end of file after the process ended")
    .unwrap();
    // (Asked, not read from the proxy's cache, which follows PropertiesChanged a little later.)
    assert_eq!(p.wait(0).await.unwrap(), (3, false));
}

#[tokio::test]
async fn host_processes_run_in_the_background_take_input_and_end_by_signal() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    input_output_and_exit(&conn, &m, "host").await;
    a_signal_ends_the_whole_tree(&conn, &m, "host").await;
    on_a_terminal(&conn, &m, "host").await;

    // A cap per workspace: the 33rd running process is refused, by name.
    let name = unique("procs");
    m.create_workspace(named(&name)).await.unwrap();
    let mut started = Vec::new();
    for _ in 0..32 {
        started.push(
            m.start_process(&name, "sleep 600", no_options())
                .await
                .unwrap(),
        );
    }
    assert_error(
        m.start_process(&name, "sleep 600", no_options()).await,
        "org.agent.Workspaces.Error.LimitsExceeded",
        "at most 32",
    );
    // Destroying the workspace ends them all, and their objects go.
    m.destroy_workspace(&name).await.unwrap();
    let p = process(&conn, started[0].clone()).await;
    assert!(p.running().await.is_err(), "the object is gone");
    assert_error(
        m.list_processes(&name).await,
        "org.agent.Workspaces.Error.NoSuchWorkspace",
        &name,
    );
}

#[tokio::test]
async fn container_processes_run_inside_and_end_with_their_container() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "cproc").await;
    input_output_and_exit(&conn, &m, &name).await;
    a_signal_ends_the_whole_tree(&conn, &m, &name).await;
    on_a_terminal(&conn, &m, &name).await;

    // A rebuild ends them (the container stops for it).
    let path = m
        .start_process(&name, "sleep 600", no_options())
        .await
        .unwrap();
    let p = process(&conn, path).await;
    m.rebuild_workspace(&name).await.unwrap();
    let (code, timed_out) = p.wait(60).await.unwrap();
    assert!(!timed_out && code != 0, "ended by the rebuild: {code}");
    assert_eq!(
        wait_built(&conn, &name, Duration::from_secs(1200)).await,
        "ready"
    );

    // It runs inside, in the container's /workspace.
    let path = m
        .start_process(&name, "pwd; sleep 600", no_options())
        .await
        .unwrap();
    let p = process(&conn, path).await;
    assert_eq!(output_until(&p, "/workspace").await, "/workspace\n");
    // Stopping the container ends it.
    m.stop_workspace(&name).await.unwrap();
    let (code, timed_out) = p.wait(30).await.unwrap();
    assert!(!timed_out && code != 0, "ended with the container: {code}");
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_over_rest() {
    use super::rest::{TOKEN, bridge_socket_up, curl};
    require_test_host();
    bridge_socket_up();
    let json = "-H 'Content-Type: application/json'";
    let base = "/api/workspaces/host/processes";
    let (status, p) = curl(
        "POST",
        base,
        Some(TOKEN),
        &format!(
            r#"{json} -d '{{"command": "echo ready; read x; echo \"got $x\"; sleep 600", "env": {{"A": "1"}}}}'"#
        ),
    );
    assert_eq!(status, 201, "{p}");
    assert_eq!(p["running"], true);
    let id = p["id"].as_str().unwrap().to_owned();
    let one = format!("{base}/{id}");

    // Output as it comes: offsets move on, nothing is read twice.
    let read = |offset: u64| {
        curl(
            "GET",
            &format!("{one}/output?offset={offset}"),
            Some(TOKEN),
            "",
        )
    };
    let mut text = String::new();
    let mut offset = 0;
    for _ in 0..200 {
        let (status, out) = read(offset);
        assert_eq!(status, 200, "{out}");
        text.push_str(out["data"].as_str().unwrap());
        offset = out["next_offset"].as_u64().unwrap();
        if text.contains("ready") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(text, "ready\n");
    let (status, _) = curl(
        "POST",
        &format!("{one}/input"),
        Some(TOKEN),
        &format!(r#"{json} -d '{{"data": "hi\n"}}'"#),
    );
    assert_eq!(status, 204);
    for _ in 0..200 {
        let (_, out) = read(offset);
        text.push_str(out["data"].as_str().unwrap());
        offset = out["next_offset"].as_u64().unwrap();
        if text.contains("got") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(text, "ready\ngot hi\n");
    let (status, list) = curl("GET", base, Some(TOKEN), "");
    assert_eq!(status, 200);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == id.as_str() && p["running"] == true),
        "{list}"
    );

    // Refusals name what is wrong.
    let (status, e) = curl(
        "POST",
        &format!("{one}/signal"),
        Some(TOKEN),
        &format!(r#"{json} -d '{{"signal": "TERM"}}'"#),
    );
    assert_eq!(
        (status, e["error"]["field"].as_str()),
        (400, Some("signal")),
        "{e}"
    );
    let (status, e) = curl("GET", &format!("{base}/999999"), Some(TOKEN), "");
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{e}"
    );
    let (status, e) = curl("GET", &format!("{base}/x/output"), Some(TOKEN), "");
    assert_eq!(
        (status, e["error"]["field"].as_str()),
        (400, Some("pid")),
        "{e}"
    );

    // SIGTERM through the API; then DELETE of a finished one is a no-op.
    let (status, _) = curl(
        "POST",
        &format!("{one}/signal"),
        Some(TOKEN),
        &format!(r#"{json} -d '{{"signal": 15}}'"#),
    );
    assert_eq!(status, 204);
    let mut ended = serde_json::Value::Null;
    for _ in 0..200 {
        let (_, p) = curl("GET", &one, Some(TOKEN), "");
        if p["running"] == false {
            ended = p;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ended["exit_code"], 128 + 15, "{ended}");
    let (status, _) = curl("DELETE", &one, Some(TOKEN), "");
    assert_eq!(status, 204);

    // Output followed as server-sent events, to the exit.
    let (_, p) = curl(
        "POST",
        base,
        Some(TOKEN),
        &format!(
            r#"{json} -d '{{"command": "for i in 1 2 3; do echo line$i; sleep 0.3; done; exit 4"}}'"#
        ),
    );
    let stream = ok(&format!(
        "curl -sN --max-time 30 -H 'Authorization: Bearer {TOKEN}' -H 'Accept: text/event-stream' 'http://127.0.0.1:7600{base}/{}/output'",
        p["id"].as_str().unwrap()
    ));
    let mut text = String::new();
    let mut last = String::new();
    for block in stream
        .split("\n\n")
        .filter(|b| !b.trim().is_empty() && !b.starts_with(':'))
    {
        let event = block
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap_or_default();
        let data = block
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_default();
        if event == "output" {
            text.push_str(serde_json::from_str::<String>(data).unwrap().as_str());
        }
        last = format!("{event} {data}");
    }
    assert_eq!(text, "line1\nline2\nline3\n", "{stream}");
    assert_eq!(last, r#"exit {"exit_code":4}"#, "{stream}");

    // DELETE of a running one ends it.
    let (_, p) = curl(
        "POST",
        base,
        Some(TOKEN),
        &format!(r#"{json} -d '{{"command": "sleep 600"}}'"#),
    );
    let other = format!("{base}/{}", p["id"].as_str().unwrap());
    let (status, _) = curl("DELETE", &other, Some(TOKEN), "");
    assert_eq!(status, 204);
    let (_, p) = curl("GET", &other, Some(TOKEN), "");
    assert_eq!(
        (p["running"].as_bool(), p["exit_code"].as_i64()),
        (Some(false), Some(128 + 9)),
        "{p}"
    );
}

/// `GET /api/workspaces/{id}/terminal`: a login shell on a terminal over a WebSocket, the
/// token as a subprotocol (as a browser gives it), its size from the query and from a resize
/// frame, its exit code at the end; a client that goes away hangs the shell up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_over_a_websocket() {
    use super::rest::{TOKEN, bridge_socket_up, curl};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    require_test_host();
    bridge_socket_up();
    let hex: String = TOKEN.bytes().map(|b| format!("{b:02x}")).collect();
    let connect = || async {
        let mut req = "ws://127.0.0.1:7600/api/workspaces/host/terminal?cols=90&rows=20"
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "sec-websocket-protocol",
            format!("agent-workspaces.terminal, bearer.{hex}")
                .parse()
                .unwrap(),
        );
        let (ws, response) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "agent-workspaces.terminal"
        );
        ws
    };
    let mut ws = connect().await;
    let mut shown = Vec::new();
    let mut exit = None;
    async fn until(
        ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
        shown: &mut Vec<u8>,
        exit: &mut Option<String>,
        want: &str,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(shown).contains(want) && exit.is_none() {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => shown.extend_from_slice(&b),
                Ok(Some(Ok(Message::Text(t)))) => *exit = Some(t.to_string()),
                Ok(Some(Ok(_))) => {}
                other => panic!(
                    "{want:?}: {other:?}; shown {:?}",
                    String::from_utf8_lossy(shown)
                ),
            }
        }
    }
    ws.send(Message::binary(
        b"stty size; echo \"term=$TERM\"\n".to_vec(),
    ))
    .await
    .unwrap();
    until(&mut ws, &mut shown, &mut exit, "term=xterm-256color").await;
    assert!(
        String::from_utf8_lossy(&shown).contains("20 90\r\nterm=xterm-256color\r\n"),
        "{:?}",
        String::from_utf8_lossy(&shown)
    );
    ws.send(Message::text(r#"{"cols": 100, "rows": 30}"#))
        .await
        .unwrap();
    ws.send(Message::binary(b"stty size\n".to_vec()))
        .await
        .unwrap();
    until(&mut ws, &mut shown, &mut exit, "30 100\r\n").await;
    ws.send(Message::binary(b"exit 5\n".to_vec()))
        .await
        .unwrap();
    until(&mut ws, &mut shown, &mut exit, "never shown").await;
    assert_eq!(exit.as_deref(), Some(r#"{"exit_code":5}"#));
    assert!(
        matches!(ws.next().await, Some(Ok(Message::Close(_)))),
        "a normal close follows"
    );

    // A client that goes away: the shell is hung up (bash ends at SIGHUP: 128+1).
    let mut ws = connect().await;
    ws.send(Message::binary(b"echo ready\n".to_vec()))
        .await
        .unwrap();
    let (mut shown, mut exit) = (Vec::new(), None);
    until(&mut ws, &mut shown, &mut exit, "ready\r\n").await;
    // This test's terminal: the one running the login shell (started by no other test).
    let login = "command -v bash >/dev/null && exec bash -l; exec sh -l";
    let (_, list) = curl("GET", "/api/workspaces/host/processes", Some(TOKEN), "");
    let ours: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["command"] == login && p["running"] == true)
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ours.len(), 1, "{list}");
    drop(ws);
    let path = format!("/api/workspaces/host/processes/{}", ours[0]);
    let ended = wait_for("the shell to be hung up", Duration::from_secs(20), || {
        let (status, p) = curl("GET", &path, Some(TOKEN), "");
        assert_eq!(status, 200);
        (p["running"] == false).then_some(p)
    });
    assert_eq!(ended["exit_code"], 129, "{ended}");
    // Without an upgrade: 426, by name.
    let (status, body) = curl("GET", "/api/workspaces/host/terminal", Some(TOKEN), "");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (426, Some("upgrade_required"))
    );
}
