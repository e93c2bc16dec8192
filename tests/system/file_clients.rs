//! A workspace's files through its clients: the REST bridge (driven with curl: ranges, a
//! streamed upload, archives, server-sent events) and `workspacectl` (`cp` both ways and the
//! other file commands).

use std::time::Duration;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_over_rest_with_curl_range_streamed_upload_archives_and_sse_watch() {
    use super::rest::{TOKEN, bridge_socket_up, curl};
    require_test_host();
    bridge_socket_up();
    // A bridge already running may hold another token (make bench's): the next connection
    // starts it afresh with this one.
    systemctl("stop agent-workspaces-http.service");
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("files-rest");
    m.create_workspace(named(&name)).await.unwrap();
    let api = format!("/api/workspaces/{name}");
    let auth = format!("-H 'Authorization: Bearer {TOKEN}'");

    // A streamed upload (curl -T sends the file as it reads it), then a range of it.
    std::fs::write("/tmp/aw-rest-upload.txt", "0123456789".repeat(100_000)).unwrap();
    let (status, body) = curl(
        "PUT",
        &format!("{api}/files?path=src/notes.txt&create_parents=true"),
        Some(TOKEN),
        "-T /tmp/aw-rest-upload.txt",
    );
    assert_eq!(status, 204, "{body}");
    let out = ok(&format!(
        "curl -sS -D - -H 'Range: bytes=10-19' {auth} 'http://127.0.0.1:7600{api}/files?path=src/notes.txt'"
    ));
    assert!(out.starts_with("HTTP/1.1 206"), "{out}");
    assert!(out.contains("content-range: bytes 10-19/1000000"), "{out}");
    assert!(
        out.contains("content-type: text/plain; charset=utf-8"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\n0123456789"), "{out}");
    let etag = out
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_owned();
    let code = ok(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' -H 'If-None-Match: {etag}' {auth} 'http://127.0.0.1:7600{api}/files?path=src/notes.txt'"
    ));
    assert_eq!(code, "304");
    let (status, body) = curl("GET", &format!("{api}/files?path=a%00b"), Some(TOKEN), "");
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("path")),
        "{body}"
    );
    let (status, body) = curl(
        "GET",
        &format!("{api}/files?path=src/nothing"),
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("file_not_found")),
        "{body}"
    );

    // Listing, entry, directory, move, removal.
    let (status, body) = curl(
        "POST",
        &format!("{api}/files/mkdir"),
        Some(TOKEN),
        "-d '{\"path\": \"src/sub\", \"parents\": true}'",
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = curl(
        "POST",
        &format!("{api}/files/move"),
        Some(TOKEN),
        "-d '{\"from\": \"src/notes.txt\", \"to\": \"src/sub/n.txt\"}'",
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = curl(
        "GET",
        &format!("{api}/files/list?path=src&depth=2"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let names: Vec<_> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sub", "sub/n.txt"]);
    let (_, entry) = curl(
        "GET",
        &format!("{api}/files/stat?path=src/sub/n.txt"),
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (entry["type"].as_str(), entry["size"].as_u64()),
        (Some("file"), Some(1_000_000))
    );

    // An archive out (gzip) and back in elsewhere.
    ok(&format!(
        "curl -sS -f -o /tmp/aw-rest.tar.gz {auth} 'http://127.0.0.1:7600{api}/archive?path=src&gzip=true'"
    ));
    assert_eq!(
        ok("tar -tzf /tmp/aw-rest.tar.gz | sort | tr '\\n' ' '"),
        "sub/ sub/n.txt "
    );
    let (status, body) = curl(
        "POST",
        &format!("{api}/archive?path=copy&gzip=true"),
        Some(TOKEN),
        "--data-binary @/tmp/aw-rest.tar.gz",
    );
    assert_eq!(status, 204, "{body}");
    let (_, entry) = curl(
        "GET",
        &format!("{api}/files/stat?path=copy/sub/n.txt"),
        Some(TOKEN),
        "",
    );
    assert_eq!(entry["size"].as_u64(), Some(1_000_000), "{entry}");

    // Changes as server-sent events.
    let mut watch = std::process::Command::new("curl")
        .args(["-sS", "-N", "-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("http://127.0.0.1:7600{api}/files/watch?path=src"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = std::io::BufReader::new(watch.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = curl(
        "DELETE",
        &format!("{api}/files?path=src/sub&recursive=true"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 204);
    let (kind, data) = super::rest::next_event(&mut events).expect("an event");
    assert_eq!(kind, "deleted", "{data}");
    let _ = watch.kill();
    let _ = watch.wait();
    m.destroy_workspace(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspacectl_cp_both_ways_and_the_file_commands() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = ready_container_named(&conn, "files-cp").await;
    let local = format!("/tmp/{name}");
    std::fs::create_dir_all(format!("{local}/src/deep")).unwrap();
    std::fs::write(format!("{local}/src/a.txt"), "a\n").unwrap();
    std::fs::write(format!("{local}/src/deep/b.txt"), "b\n").unwrap();
    std::fs::write(format!("{local}/one.txt"), "one\n").unwrap();
    // In: a directory (DEST missing: it becomes the copy), a file into a directory.
    ok(&format!(
        "workspacectl cp {local}/src {name}:/workspace/src"
    ));
    ok(&format!(
        "workspacectl cp {local}/one.txt {name}:/workspace/src/"
    ));
    assert_eq!(
        ok(&format!("workspacectl cat {name} src/deep/b.txt")),
        "b\n"
    );
    assert_eq!(
        ok(&format!("workspacectl cat {name} /workspace/src/one.txt")),
        "one\n"
    );
    let listing = ok(&format!("workspacectl ls {name} src --depth 2"));
    assert!(
        listing.contains("deep/b.txt") && listing.contains(" one.txt"),
        "{listing}"
    );
    // Out: a directory into one that exists, a file to a new name.
    std::fs::create_dir_all(format!("{local}/out")).unwrap();
    ok(&format!("workspacectl cp {name}:src {local}/out"));
    assert_eq!(
        std::fs::read_to_string(format!("{local}/out/src/deep/b.txt")).unwrap(),
        "b\n"
    );
    ok(&format!(
        "workspacectl cp {name}:src/a.txt {local}/renamed.txt"
    ));
    assert_eq!(
        std::fs::read_to_string(format!("{local}/renamed.txt")).unwrap(),
        "a\n"
    );
    ok(&format!(
        "workspacectl mkdir -p {name} x/y && workspacectl mv {name} src/a.txt x/y/a.txt && workspacectl rm -r {name} src"
    ));
    assert_eq!(
        ok(&format!("workspacectl ls {name} x/y")).lines().count(),
        1
    );
    let missing = sh(&format!("workspacectl cat {name} src/a.txt"));
    assert!(
        missing.code != 0 && missing.stderr.contains("No such file"),
        "{}",
        missing.stderr
    );
    m.destroy_workspace(&name).await.unwrap();
    let _ = std::fs::remove_dir_all(&local);
}
