//! The interface agrees with itself: the served objects, the interface file and the proxies.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::{OwnedObjectPath, Variant};

use crate::dbus::{BUS_NAME, MANAGER_PATH};

use super::*;

/// Methods, signals and properties of the `org.agent.Workspaces*` interfaces in an
/// introspection document: one line each, with every argument's name, type and direction.
fn members(xml: &str) -> BTreeSet<String> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, options).unwrap();
    let mut out = BTreeSet::new();
    for iface in doc.descendants().filter(|n| n.has_tag_name("interface")) {
        let iface_name = iface.attribute("name").unwrap();
        if !iface_name.starts_with(BUS_NAME) {
            continue;
        }
        for m in iface.children().filter(|n| n.is_element()) {
            let kind = m.tag_name().name();
            let name = m.attribute("name").unwrap_or_default();
            let line = match kind {
                "property" => format!(
                    "{} {}",
                    m.attribute("type").unwrap(),
                    m.attribute("access").unwrap()
                ),
                "method" | "signal" => m
                    .children()
                    .filter(|a| a.has_tag_name("arg"))
                    .map(|a| {
                        format!(
                            "{} {} {}",
                            a.attribute("direction").unwrap_or(if kind == "signal" {
                                "out"
                            } else {
                                "in"
                            }),
                            a.attribute("type").unwrap(),
                            a.attribute("name").unwrap_or("?")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => continue,
            };
            out.insert(format!("{iface_name} {kind} {name}({line})"));
        }
    }
    out
}

fn interface_file() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dbus/org.agent.Workspaces.xml"
    ))
    .unwrap()
}

#[tokio::test]
async fn the_served_interfaces_are_the_interface_file() {
    let s = service().await;
    let host = s.manager().await.get_workspace("host").await.unwrap();
    let process = s
        .manager()
        .await
        .start_process("host", "block", no_options())
        .await
        .unwrap();
    let mut served = BTreeSet::new();
    for path in [
        OwnedObjectPath::try_from(MANAGER_PATH).unwrap(),
        host,
        process,
    ] {
        let xml = zbus::fdo::IntrospectableProxy::builder(&s.client)
            .destination(BUS_NAME)
            .path(path)
            .build()
            .await
            .unwrap()
            .introspect()
            .await
            .unwrap();
        served.extend(members(&xml));
    }
    let file = members(&interface_file());
    assert!(file.len() > 40, "the file has the interfaces: {file:#?}");
    let missing: Vec<_> = file.difference(&served).collect();
    let extra: Vec<_> = served.difference(&file).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "in the file, not served: {missing:#?}\nserved, not in the file: {extra:#?}"
    );
}

/// Every method of the interface file, called through the client proxies, reaches the service
/// and succeeds: the proxies lack none and send each with the served signature.
#[tokio::test]
async fn the_proxies_call_every_method_of_the_interface_file() {
    let s = service().await;
    let mut calls = zbus::MessageStream::from(&s.conn);
    // Read only at the end: room for every call of the test (a full queue would hold up the
    // service's connection).
    calls.set_max_queued(std::num::NonZeroUsize::new(4096).unwrap());
    let m = s.manager().await;
    let null = || std::fs::File::open("/dev/null").unwrap();
    let (i, o, e) = (null(), null(), null());

    // The manager's methods.
    let h = s.create(vec![("name", Variant::from("h"))]).await.unwrap();
    let c = s.create(container("c")).await.unwrap();
    assert_eq!(m.list_workspaces().await.unwrap().len(), 3);
    assert_eq!(m.get_workspace("h").await.unwrap(), h);
    let env: HashMap<&str, &str> = HashMap::from([("A", "1")]);
    m.update_workspace("h", HashMap::from([("env_vars", Variant::from(env))]))
        .await
        .unwrap();
    assert_eq!(m.exec("h", "true", no_options()).await.unwrap().0, 0);
    let reply = m
        .exec_with_fds("h", "true", fd(&i), fd(&o), fd(&e), no_options())
        .await
        .unwrap();
    assert_eq!(reply.0, 0);
    s.fakes.containers.release_build.notify_one();
    m.build_workspace("c").await.unwrap();
    s.wait_status(&c, "ready").await;
    s.fakes.containers.release_build.notify_one();
    m.rebuild_workspace("c").await.unwrap();
    s.wait_status(&c, "ready").await;
    m.start_workspace("c").await.unwrap();
    m.pause_workspace("c").await.unwrap();
    s.wait_status(&c, "paused").await;
    m.resume_workspace("c").await.unwrap();
    s.wait_status(&c, "ready").await;
    m.snapshot_workspace("c", "s1", no_options()).await.unwrap();
    assert_eq!(m.list_snapshots("c").await.unwrap()[0].0, "s1");
    let forked = m
        .fork_workspace(
            "c",
            "s1",
            HashMap::from([("name", Variant::from("forked"))]),
        )
        .await
        .unwrap();
    assert!(
        forked
            .as_str()
            .starts_with("/org/agent/Workspaces/workspace/")
    );
    let restored_on = s.workspace(&c).await;
    let mut restored = restored_on.receive_restored().await.unwrap();
    m.restore_workspace("c", "s1").await.unwrap();
    let said = tokio::time::timeout(std::time::Duration::from_secs(10), restored.next())
        .await
        .expect("a Restored signal")
        .unwrap();
    assert_eq!(said.args().unwrap().snapshot, "s1");
    m.delete_snapshot("c", "s1").await.unwrap();
    m.stop_workspace("c").await.unwrap();
    m.get_init_log("c", 0).await.unwrap();
    m.get_debug_info("c").await.unwrap();
    m.rerun_init("c", no_options()).await.unwrap();
    m.sync_workspace("h").await.unwrap();
    let p = m.start_process("h", "block", no_options()).await.unwrap();
    assert_eq!(m.list_processes("h").await.unwrap()[0].1, "block");
    let p = crate::dbus::client::ProcessProxy::builder(&s.client)
        .path(p)
        .build()
        .await
        .unwrap();
    assert!(p.running().await.unwrap());
    assert_eq!(p.read_output(0, 10).await.unwrap(), (vec![], 0, false));
    p.write_input(b"x").await.unwrap();
    p.signal(15).await.unwrap();
    assert_eq!(p.wait(0).await.unwrap(), (-1, true));
    assert!(!p.pty().await.unwrap());
    // On a terminal: its size as asked, resized, and a caller attached to it.
    let options = HashMap::from([
        ("pty", Variant::from(true)),
        ("cols", Variant::from(100u16)),
        ("rows", Variant::from(30u16)),
    ]);
    let t = m.start_process("h", "block", options).await.unwrap();
    let t = crate::dbus::client::ProcessProxy::builder(&s.client)
        .path(t)
        .build()
        .await
        .unwrap();
    assert!(t.pty().await.unwrap());
    t.resize(120, 40).await.unwrap();
    let sizes = |v: &[(u16, u16)]| {
        v.iter()
            .map(|&(cols, rows)| crate::core::ports::WindowSize { cols, rows })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        *s.fakes.exec.2.lock().unwrap(),
        sizes(&[(100, 30), (120, 40)])
    );
    let attached = t.open_pty().await.unwrap();
    drop(attached);
    // Without a terminal, neither.
    for e in [
        p.resize(80, 24).await.unwrap_err(),
        p.open_pty().await.map(drop).unwrap_err(),
        m.start_process(
            "h",
            "block",
            HashMap::from([("cols", Variant::from(80u16))]),
        )
        .await
        .unwrap_err(),
    ] {
        let (name, e) = super::error(e);
        assert_eq!(name, "org.agent.Workspaces.Error.InvalidArgs", "{e}");
    }
    drop(m.connect_port("h", 8000).await.unwrap());
    let (name, err) = super::error(m.connect_port("h", 0).await.map(drop).unwrap_err());
    assert_eq!(name, "org.agent.Workspaces.Error.InvalidArgs", "{err}");
    // Files: paths relative to the workspace's directory, content streamed both ways, errors
    // by name with the path.
    let read = |fd: zbus::OwnedFd| {
        let mut s = String::new();
        std::io::Read::read_to_string(
            &mut std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd)),
            &mut s,
        )
        .unwrap();
        s
    };
    let got = read(m.read_file("h", "a.txt", no_options()).await.unwrap());
    assert!(
        got.starts_with("/state/workspaces/") && got.ends_with("/a.txt"),
        "{got}"
    );
    assert_eq!(
        read(m.read_file("h", "/etc/hosts", no_options()).await.unwrap()),
        "/etc/hosts"
    );
    let content = || {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &a, b"data").unwrap();
        b
    };
    let c1 = content();
    m.write_file(
        "h",
        "a.txt",
        zbus::Fd::from(c1.as_fd()),
        HashMap::from([("mode", Variant::from(0o600u32))]),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (entries, truncated) = m.list_directory("h", ".", no_options()).await.unwrap();
    assert_eq!((entries.len(), truncated), (2, true));
    assert_eq!(m.stat_file("h", "/x", no_options()).await.unwrap().0, "/x");
    m.make_directory("h", "d", HashMap::from([("parents", Variant::from(true))]))
        .await
        .unwrap();
    m.remove_file(
        "h",
        "d",
        HashMap::from([("recursive", Variant::from(true))]),
    )
    .await
    .unwrap();
    m.move_file(
        "h",
        "a",
        "b",
        HashMap::from([("replace", Variant::from(true))]),
    )
    .await
    .unwrap();
    assert_eq!(
        read(m.download("h", "/src", no_options()).await.unwrap()),
        "/src"
    );
    let c2 = content();
    m.upload("h", "/dst", zbus::Fd::from(c2.as_fd()), no_options())
        .await
        .unwrap();
    assert_eq!(
        read(m.watch_files("h", "/w", no_options()).await.unwrap()),
        "/w"
    );
    let (name, err) = super::error(
        m.stat_file("h", "/missing", no_options())
            .await
            .unwrap_err(),
    );
    assert_eq!(name, "org.agent.Workspaces.Error.FileNotFound");
    assert!(
        matches!(&err, Error::File { path, .. } if path == "/missing"),
        "{err:?}"
    );
    for (e, field) in [
        (
            m.stat_file("h", "", no_options()).await.unwrap_err(),
            "path",
        ),
        (
            m.move_file("h", "a", &"b".repeat(5000), no_options())
                .await
                .unwrap_err(),
            "to",
        ),
        (
            m.list_directory("h", "/", HashMap::from([("depth", Variant::from(0u32))]))
                .await
                .unwrap_err(),
            "depth",
        ),
        (
            m.read_file(
                "h",
                "/x",
                HashMap::from([("recursive", Variant::from(true))]),
            )
            .await
            .map(drop)
            .unwrap_err(),
            "recursive",
        ),
        (
            m.write_file(
                "h",
                "/x",
                zbus::Fd::from(c1.as_fd()),
                HashMap::from([("mode", Variant::from(0o10000u32))]),
            )
            .await
            .unwrap_err(),
            "mode",
        ),
    ] {
        let (name, err) = super::error(e);
        assert_eq!(
            (name.as_str(), err.field()),
            ("org.agent.Workspaces.Error.InvalidArgs", Some(field)),
            "{err}"
        );
    }
    m.set_error_data(true).await.unwrap();
    assert_eq!(m.list_library().await.unwrap().0, ["a", "b"]);
    assert_eq!(m.list_templates().await.unwrap()[0].0, "tpl");
    assert!(m.get_template("tpl").await.unwrap().contains_key("skills"));
    m.destroy_workspace("h").await.unwrap();
    assert!(!m.version().await.unwrap().is_empty());

    // The workspace object's.
    let h = s.create(vec![("name", Variant::from("h2"))]).await.unwrap();
    let wh = s.workspace(&h).await;
    let wc = s.workspace(&c).await;
    assert_eq!(wh.exec("true", no_options()).await.unwrap().0, 0);
    let reply = wh
        .exec_with_fds("true", fd(&i), fd(&o), fd(&e), no_options())
        .await
        .unwrap();
    assert_eq!(reply.0, 0);
    wh.update(HashMap::from([("skills", Variant::from(vec!["a"]))]))
        .await
        .unwrap();
    wh.sync().await.unwrap();
    drop(wh.connect_port(3000).await.unwrap());
    // Every file method on the workspace objects, the container's relative paths below
    // /workspace.
    assert_eq!(
        read(wc.read_file("x", no_options()).await.unwrap()),
        "/workspace/x"
    );
    let c3 = content();
    wc.write_file("x", zbus::Fd::from(c3.as_fd()), no_options())
        .await
        .unwrap();
    wc.list_directory("/", no_options()).await.unwrap();
    wc.stat_file("/", no_options()).await.unwrap();
    wc.make_directory("/d", no_options()).await.unwrap();
    wc.remove_file("/d", no_options()).await.unwrap();
    wc.move_file("/a", "/b", no_options()).await.unwrap();
    drop(wc.download("/", no_options()).await.unwrap());
    let c4 = content();
    wc.upload("/", zbus::Fd::from(c4.as_fd()), no_options())
        .await
        .unwrap();
    drop(wc.watch_files("/", no_options()).await.unwrap());
    assert!(
        s.fakes
            .containers
            .calls()
            .contains(&"files c Read /workspace/x".to_owned())
    );
    wh.start_process("true", no_options()).await.unwrap();
    assert_eq!(wh.list_processes().await.unwrap().len(), 1);
    s.fakes.containers.release_build.notify_one();
    wc.rebuild().await.unwrap();
    s.wait_status(&c, "ready").await;
    wc.build().await.unwrap();
    wc.start().await.unwrap();
    wc.pause().await.unwrap();
    s.wait_status(&c, "paused").await;
    wc.resume().await.unwrap();
    s.wait_status(&c, "ready").await;
    wc.snapshot("s2", no_options()).await.unwrap();
    assert_eq!(wc.list_snapshots().await.unwrap()[0].0, "s2");
    wc.fork("s2", HashMap::from([("name", Variant::from("forked-2"))]))
        .await
        .unwrap();
    wc.restore("s2").await.unwrap();
    wc.delete_snapshot("s2").await.unwrap();
    wc.stop().await.unwrap();
    wc.get_init_log(10).await.unwrap();
    wc.get_debug_info().await.unwrap();
    wc.rerun_init(no_options()).await.unwrap();
    assert_eq!(wc.distro().await.unwrap(), "debian-bookworm");
    wh.destroy().await.unwrap();

    let file: BTreeSet<String> = members(&interface_file())
        .into_iter()
        .filter(|m| m.contains(" method "))
        .map(|m| m.split('(').next().unwrap().replace(" method ", "."))
        .collect();
    let mut called = BTreeSet::new();
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::ZERO, calls.next()).await {
        let h = msg.header();
        if h.message_type() == MessageType::MethodCall
            && let (Some(iface), Some(member)) = (h.interface(), h.member())
        {
            called.insert(format!("{iface}.{member}"));
        }
    }
    let missing: Vec<_> = file.difference(&called).collect();
    assert!(missing.is_empty(), "never called: {missing:?}");
}

// ---- arguments and errors ----
