//! workspacectl: round trips, exit codes, live streams and every verb on a container.

use std::time::Duration;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspacectl_round_trips_and_propagates_exit_codes() {
    require_test_host();
    let name = unique("ctl");
    ok(&format!("workspacectl create {name} --env GREETING=hi"));
    assert!(ok("workspacectl list").contains(&name));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl status {name} --json"))).unwrap();
    assert_eq!(
        (status["Status"].as_str(), status["Type"].as_str()),
        (Some("ready"), Some("host"))
    );
    let run = sh(&format!(
        "workspacectl exec {name} -- sh -c 'echo $GREETING; echo err >&2; exit 7'"
    ));
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (7, "hi\n", "err\n")
    );
    let quoted = sh(&format!(
        "workspacectl exec {name} -- printf '%s|' 'a b' \"it's\""
    ));
    assert_eq!(
        quoted.stdout, "a b|it's|",
        "arguments keep their boundaries"
    );
    let timeout = sh(&format!("workspacectl exec {name} --timeout 1 -- sleep 30"));
    assert_eq!(timeout.code, 124);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl --json exec {name} -- echo x"))).unwrap();
    assert_eq!(json["stdout"], "x\n");
    let refused = sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups workspacectl destroy {name}"
    ));
    assert_eq!(refused.code, 1);
    assert!(
        refused
            .stderr
            .contains("Not authorized to destroy workspace"),
        "{}",
        refused.stderr
    );
    let bad = sh(&format!("workspacectl build {name}"));
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("only container workspaces"),
        "{}",
        bad.stderr
    );
    ok(&format!("workspacectl destroy {name}"));
    let gone = sh(&format!("workspacectl status {name}"));
    assert_eq!(gone.code, 1);
    assert!(
        gone.stderr
            .contains(&format!("No workspace '{name}' known")),
        "{}",
        gone.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspacectl_streams_live_and_drives_a_container_through_every_verb() {
    require_test_host();
    let library = write_library();
    let host = unique("ctl-live");
    ok(&format!("workspacectl create {host}"));
    // Output appears while the command runs: it waits for a file made only after the first
    // line was read here.
    let go = format!("/var/tmp/{host}-go");
    let mut child = std::process::Command::new("workspacectl")
        .args(["exec", &host, "--", "sh", "-c"])
        .arg(format!(
            "echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second; exit 9"
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "first\n");
    assert!(child.try_wait().unwrap().is_none(), "still running");
    std::fs::write(&go, "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "second\n");
    assert_eq!(child.wait().unwrap().code(), Some(9));
    std::fs::remove_file(&go).unwrap();
    // The command reads workspacectl's own stdin.
    let piped = sh(&format!(
        "printf 'typed\\n' | workspacectl exec {host} -- tr a-z A-Z"
    ));
    assert_eq!((piped.code, piped.stdout.as_str()), (0, "TYPED\n"));
    ok(&format!("workspacectl destroy {host}"));

    // A container through every verb.
    let name = unique("ctl-box");
    std::fs::write(
        "/var/tmp/ctl-init",
        "#!/bin/sh\necho \"init ran $GREETING\"\n",
    )
    .unwrap();
    ok(&format!(
        "workspacectl create {name} --type container --distro debian-bookworm --env GREETING=hi --skill web --init-script /var/tmp/ctl-init"
    ));
    let status = |name: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&format!("workspacectl --json status {name}"))).unwrap()
    };
    assert_eq!(status(&name)["Status"], "pending");
    ok(&format!("workspacectl build {name}"));
    let wait_ready = |what: &str| {
        let s = wait_for(what, Duration::from_secs(600), || {
            let s = status(&name);
            (s["Status"] != "building" && s["Status"] != "pending").then_some(s)
        });
        assert_eq!(s["Status"], "ready", "{s}");
    };
    wait_ready("the container to build");
    let run = sh(&format!(
        "workspacectl exec {name} -- sh -c 'cat /etc/debian_version >/dev/null; echo $GREETING; exit 3'"
    ));
    assert_eq!((run.code, run.stdout.as_str()), (3, "hi\n"));
    let log = ok(&format!("workspacectl init-log {name}"));
    assert!(log.contains("init ran hi"), "{log}");
    let log: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl --json init-log {name} -n 1"))).unwrap();
    assert!(log["total_lines"].as_u64().unwrap() > 1, "{log}");
    let debug: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl --json debug {name}"))).unwrap();
    assert_eq!(debug["machine_state"], "running", "{debug}");
    let rerun = sh(&format!("workspacectl rerun-init {name}"));
    assert_eq!((rerun.code, rerun.stdout.as_str()), (0, "init ran hi\n"));
    let skills = ok(&format!(
        "workspacectl exec {name} -- ls /workspace/.opencode/skill"
    ));
    assert_eq!(skills, "web\n");
    std::fs::write(library.join("skill/web/SKILL.md"), "# Web v2\n").unwrap();
    ok(&format!("workspacectl sync {name}"));
    let skill = ok(&format!(
        "workspacectl exec {name} -- cat /workspace/.opencode/skill/web/SKILL.md"
    ));
    assert_eq!(skill, "# Web v2\n");
    let templates: serde_json::Value =
        serde_json::from_str(&ok("workspacectl --json templates")).unwrap();
    assert_eq!(templates[0]["name"], "fullstack", "{templates}");
    assert!(ok("workspacectl templates").contains("fullstack"));
    ok(&format!(
        "workspacectl exec {name} -- touch /workspace/old-tree"
    ));
    ok(&format!("workspacectl rebuild {name}"));
    wait_ready("the container to rebuild");
    let fresh = sh(&format!(
        "workspacectl exec {name} -- test -e /workspace/old-tree"
    ));
    assert_eq!(fresh.code, 1, "the rebuilt tree is fresh");

    // Every key of the API has its option: an update with limits and new env vars, a command
    // with its own directory and variables.
    ok(&format!(
        "workspacectl update {name} --memory-max 536870912 --tasks-max 300 --env NEW=1"
    ));
    let s = status(&name);
    assert_eq!(
        (&s["MemoryMax"], &s["TasksMax"], &s["EnvVarNames"]),
        (
            &serde_json::json!(536870912),
            &serde_json::json!(300),
            &serde_json::json!(["NEW"])
        )
    );
    let out = ok(&format!(
        "workspacectl exec {name} --cwd .opencode --env X=2 -- sh -c 'pwd; echo $NEW$X'"
    ));
    assert_eq!(out, "/workspace/.opencode\n12\n");
    // The limits reach the running unit (whether the kernel enforces memory depends on the
    // host's delegated controllers; DebugInfo's limits_enforced says so, tested elsewhere).
    assert_eq!(
        systemctl(&format!(
            "show -p MemoryMax -p TasksMax --value agent-workspace-{name}.service"
        )),
        "536870912\n300\n"
    );
    let bad = sh(&format!("workspacectl update {name} --env NOEQUALS"));
    assert!(bad.code == 1 && bad.stderr.contains("KEY=VALUE"), "{bad:?}");
    ok(&format!("workspacectl stop {name}"));
    assert!(!ok("machinectl list --no-legend").contains(&name));
    ok(&format!("workspacectl start {name}"));
    assert!(ok("machinectl list --no-legend").contains(&name));
    assert!(ok("workspacectl library").contains("web"));
    let t: serde_json::Value =
        serde_json::from_str(&ok("workspacectl --json template fullstack")).unwrap();
    assert_eq!(t["env_var_names"], serde_json::json!(["FROM_TEMPLATE"]));

    ok(&format!("workspacectl destroy {name}"));
    assert_eq!(sh(&format!("workspacectl status {name}")).code, 1);
    std::fs::remove_dir_all(&library).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspacectl_runs_lists_follows_and_kills_background_processes() {
    require_test_host();
    let name = unique("ctlproc");
    ok(&format!("workspacectl create {name}"));
    let id = ok(&format!(
        "workspacectl run --background {name} --env WORD=hello -- sh -c 'echo $WORD; sleep 600'"
    ));
    let id = id.trim();
    assert!(id.parse::<u32>().is_ok(), "prints the process's id: {id:?}");
    let listed = wait_for("the process to be listed", Duration::from_secs(10), || {
        let ps = ok(&format!("workspacectl ps {name}"));
        ps.lines()
            .any(|l| l.starts_with(id) && l.contains("running"))
            .then_some(ps)
    });
    assert!(listed.starts_with("ID"), "{listed}");
    wait_for("its output", Duration::from_secs(10), || {
        (ok(&format!("workspacectl logs {name} {id}")) == "hello\n").then_some(())
    });
    // logs -f follows until the process ends: kill it meanwhile.
    let follow = std::process::Command::new("workspacectl")
        .args(["logs", "-f", &name, id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ok(&format!("workspacectl kill {name} {id} -s 9"));
    let out = follow.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "hello\n");
    let ps: serde_json::Value =
        serde_json::from_str(&ok(&format!("workspacectl --json ps {name}"))).unwrap();
    assert_eq!(ps[0]["exit_code"], 128 + 9, "{ps}");
    assert_eq!(ps[0]["running"], false);
    // run without --background is exec.
    let run = sh(&format!("workspacectl run {name} -- sh -c 'exit 3'"));
    assert_eq!(run.code, 3);
    // shell: a terminal in the workspace. Its input here is a pipe: each line is typed (and
    // echoed, as terminals do); the end of it is Ctrl-D.
    let shell = sh(&format!(
        "printf 'echo sum=$((40+2)); test -t 0 && echo on-a-tty\\nexit 4\\n' | workspacectl shell {name}"
    ));
    assert_eq!(shell.code, 4, "{}", shell.stderr);
    assert!(
        shell.stdout.contains("sum=42\r\non-a-tty\r\n"),
        "{:?}",
        shell.stdout
    );
    let ended = sh(&format!(
        "printf 'echo $((6*7))\\n' | workspacectl shell {name} -- sh"
    ));
    assert_eq!(ended.code, 0, "Ctrl-D at the end of the input ends sh");
    assert!(ended.stdout.contains("42\r\n"), "{:?}", ended.stdout);
    // A background process on a terminal, attached to later.
    let id = ok(&format!("workspacectl run --background --pty {name} -- sh"));
    let attach = sh(&format!(
        "printf 'echo attached-$((1+1))\\n' | workspacectl attach {name} {}",
        id.trim()
    ));
    assert_eq!(attach.code, 0, "{}", attach.stderr);
    assert!(
        attach.stdout.contains("attached-2\r\n"),
        "{:?}",
        attach.stdout
    );
    let plain = sh(&format!("workspacectl attach {name} 1"));
    assert!(
        plain.code != 0 && plain.stderr.contains("has no terminal"),
        "{}",
        plain.stderr
    );
    let gone = sh(&format!("workspacectl logs {name} 999"));
    assert!(
        gone.code != 0 && gone.stderr.contains("No process 999"),
        "{}",
        gone.stderr
    );
    ok(&format!("workspacectl destroy {name}"));
}

/// What is typed before `workspacectl shell` has reached the workspace (type-ahead) reaches the
/// shell there, as at a local terminal (through a real pseudo-terminal: `typeahead.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspacectl_shell_keeps_what_is_typed_ahead() {
    require_test_host();
    let repo = std::env::var("TESTHOST_REPO").expect("run by testhost.sh");
    for mode in ["line", "line", "partial", "partial"] {
        let out = ok(&format!(
            "python3 {repo}/tests/system/typeahead.py {mode} workspacectl shell host"
        ));
        let shown: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let shown = shown["output"].as_str().unwrap();
        assert!(
            shown.contains("TYPED42"),
            "the line typed ahead ({mode}) did not run: {shown:?}"
        );
    }
}
