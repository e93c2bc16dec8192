//! The service as a system service: bus activation, its interface, the journal, restarts,
//! corrupt records, reload.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use zbus::Variant;

use super::*;

const MSG_CREATED: &str = "52d12c4aa538474f87b33f983311001a";

const MSG_DESTROYED: &str = "819011e31a6147de918401f3d54b1c99";

const MSG_EXEC: &str = "67a62a897fde43ffa65994fbd1d33813";

const MSG_CORRUPT: &str = "4168556b63f447afb5dcaf1568d91b57";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_activation_starts_the_service() {
    require_test_host();
    systemctl(&format!("stop {UNIT}"));
    assert_ne!(
        sh(&format!("systemctl is-active {UNIT}")).stdout.trim(),
        "active"
    );
    // As on a fresh install: no Library yet, which is a normal state and warns of nothing.
    let _ = std::fs::remove_dir_all(format!("{STATE}/library"));
    let invocation_before = sh(&format!("systemctl show -p InvocationID --value {UNIT}")).stdout;
    let conn = bus().await;
    let list = manager(&conn).await.list_workspaces().await.unwrap();
    let invocation = sh(&format!("systemctl show -p InvocationID --value {UNIT}")).stdout;
    assert_ne!(invocation, invocation_before, "a new start");
    let warnings: Vec<String> = journal(&format!(
        "_SYSTEMD_INVOCATION_ID={} -p warning",
        invocation.trim()
    ))
    .into_iter()
    .filter_map(|e| e["MESSAGE"].as_str().map(String::from))
    .collect();
    assert!(
        warnings.is_empty(),
        "a start without a Library warned: {warnings:?}"
    );
    assert!(
        list.iter().any(|w| w.0 == "host" && w.3 == "ready"),
        "{list:?}"
    );
    assert_eq!(
        sh(&format!("systemctl is-active {UNIT}")).stdout.trim(),
        "active"
    );
    let version = manager(&conn).await.version().await.unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

/// Interfaces of an introspection document: name -> (members, properties) in a canonical form.
fn interfaces(xml: &str) -> BTreeMap<String, BTreeSet<String>> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc =
        roxmltree::Document::parse_with_options(xml, options).expect("introspection XML parses");
    let mut out = BTreeMap::new();
    for iface in doc.descendants().filter(|n| n.has_tag_name("interface")) {
        let name = iface.attribute("name").unwrap_or_default().to_owned();
        if !name.starts_with("org.agent.") {
            continue;
        }
        let mut members = BTreeSet::new();
        for m in iface.children().filter(|n| n.is_element()) {
            let args: Vec<String> = m
                .children()
                .filter(|n| n.has_tag_name("arg"))
                .map(|a| {
                    format!(
                        "{}:{}:{}",
                        a.attribute("name").unwrap_or("-"),
                        a.attribute("type").unwrap_or("-"),
                        a.attribute("direction").unwrap_or("-")
                    )
                })
                .collect();
            let annotations: Vec<String> = m
                .children()
                .filter(|n| n.has_tag_name("annotation"))
                .map(|a| {
                    format!(
                        "{}={}",
                        a.attribute("name").unwrap_or(""),
                        a.attribute("value").unwrap_or("")
                    )
                })
                .collect();
            members.insert(format!(
                "{} {} type={} access={} args=[{}] annotations=[{}]",
                m.tag_name().name(),
                m.attribute("name").unwrap_or_default(),
                m.attribute("type").unwrap_or("-"),
                m.attribute("access").unwrap_or("-"),
                args.join(","),
                annotations.join(",")
            ));
        }
        out.insert(name, members);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_equals_the_checked_in_xml() {
    require_test_host();
    let conn = bus().await;
    let introspect = |path: String| {
        let conn = conn.clone();
        async move {
            zbus::fdo::IntrospectableProxy::builder(&conn)
                .destination("org.agent.Workspaces")
                .path(path)
                .build()
                .await
                .unwrap()
                .introspect()
                .await
                .unwrap()
        }
    };
    let mut live = interfaces(&introspect("/org/agent/Workspaces".into()).await);
    live.extend(interfaces(
        &introspect("/org/agent/Workspaces/workspace/host".into()).await,
    ));
    let process = manager(&conn)
        .await
        .start_process("host", "sleep 30", no_options())
        .await
        .unwrap();
    live.extend(interfaces(&introspect(process.to_string()).await));
    let installed =
        std::fs::read_to_string("/usr/share/dbus-1/interfaces/org.agent.Workspaces.xml")
            .expect("the interface XML is installed");
    let repo =
        std::env::var("TESTHOST_REPO").expect("run by testhost.sh, which sets TESTHOST_REPO");
    let checked_in =
        std::fs::read_to_string(format!("{repo}/dbus/org.agent.Workspaces.xml")).unwrap();
    assert_eq!(installed, checked_in);
    let documented = interfaces(&checked_in);
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        [
            "org.agent.Workspaces",
            "org.agent.Workspaces.Process",
            "org.agent.Workspaces.Workspace"
        ]
    );
    for (name, members) in &documented {
        let got = live
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not served"));
        let missing: Vec<_> = members.difference(got).collect();
        let extra: Vec<_> = got.difference(members).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: documented but not served: {missing:#?}\nserved but not documented: {extra:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_tells_a_workspace_story_without_secrets() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let name = unique("journal");
    let secret = unique("secret-value");
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(name.as_str())),
            ("env_vars", env_variant(&[("TOKEN", &secret)])),
        ]))
        .await
        .unwrap();
    let id = workspace(&conn, &path).await.id().await.unwrap();
    let stdin_secret = unique("stdin-secret");
    m.exec(
        &name,
        "cat >/dev/null; exit 3",
        spec(vec![(
            "stdin",
            Variant::from(stdin_secret.as_bytes().to_vec()),
        )]),
    )
    .await
    .unwrap();
    m.destroy_workspace(&name).await.unwrap();
    let entries = wait_for("the journal entries", Duration::from_secs(10), || {
        let e = journal(&format!("WORKSPACE_ID={id}"));
        e.iter()
            .any(|e| e["MESSAGE_ID"] == MSG_DESTROYED)
            .then_some(e)
    });
    let ids: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["MESSAGE_ID"].as_str())
        .collect();
    assert_eq!(ids, [MSG_CREATED, MSG_EXEC, MSG_DESTROYED], "{entries:#?}");
    for e in &entries {
        assert_eq!(e["WORKSPACE_NAME"], name.as_str());
        assert_eq!(e["_SYSTEMD_UNIT"], UNIT);
    }
    let exec = &entries[1];
    assert_eq!(exec["EXIT_CODE"], "3");
    assert!(
        exec["DURATION_USEC"]
            .as_str()
            .is_some_and(|d| d.parse::<u64>().is_ok())
    );
    let all = sh("journalctl -b -o export --no-pager").stdout;
    assert!(!all.contains(&secret), "an env value reached the journal");
    assert!(!all.contains(&stdin_secret), "stdin reached the journal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_workspace() {
    require_test_host();
    let conn = bus().await;
    let m = manager(&conn).await;
    let names = [unique("keep"), unique("keep")];
    for n in &names {
        m.create_workspace(spec(vec![
            ("name", Variant::from(n.as_str())),
            ("env_vars", env_variant(&[("VALUE", n)])),
        ]))
        .await
        .unwrap();
    }
    let before = m.list_workspaces().await.unwrap();
    systemctl(&format!("stop {UNIT}"));
    let stopped = systemctl(&format!("show -p Result -p ExecMainStatus {UNIT}"));
    assert_eq!(
        stopped, "Result=success\nExecMainStatus=0\n",
        "SIGTERM is a clean stop: exit 0, no stop timeout, no SIGKILL"
    );
    restart_service();
    let conn = bus().await;
    let m = manager(&conn).await;
    assert_eq!(m.list_workspaces().await.unwrap(), before);
    for n in &names {
        let (_, out, ..) = m.exec(n, "echo $VALUE", HashMap::new()).await.unwrap();
        assert_eq!(
            out,
            format!("{n}\n").into_bytes(),
            "env values survive the restart"
        );
        m.destroy_workspace(n).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_reported_and_skipped() {
    require_test_host();
    let conn = bus().await;
    let keep = unique("intact");
    manager(&conn)
        .await
        .create_workspace(named(&keep))
        .await
        .unwrap();
    let bogus = uuid::Uuid::new_v4();
    let file = format!("{STATE}/records/{bogus}.json");
    std::fs::write(&file, "{\"schema_version\": 1, \"workspace\": {\"id\": ").unwrap();
    restart_service();
    let conn = bus().await;
    let m = manager(&conn).await;
    let list = m.list_workspaces().await.unwrap();
    assert!(list.iter().any(|w| w.1 == keep) && list.iter().any(|w| w.0 == "host"));
    assert!(!list.iter().any(|w| w.0 == bogus.to_string()));
    let reported = wait_for(
        "the corrupt record to be reported",
        Duration::from_secs(10),
        || {
            let e = journal(&format!("MESSAGE_ID={MSG_CORRUPT}"));
            e.into_iter()
                .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains(&file)))
        },
    );
    assert_eq!(reported["PRIORITY"], "4", "reported as a warning");
    assert!(
        std::path::Path::new(&file).exists(),
        "the file is kept for inspection"
    );
    std::fs::remove_file(&file).unwrap();
    m.destroy_workspace(&keep).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_limits_and_a_bad_file_keeps_the_old_ones() {
    require_test_host();
    let config = "/etc/agent-workspaces/config.toml";
    std::fs::create_dir_all("/etc/agent-workspaces").unwrap();
    let original = std::fs::read_to_string(config).unwrap_or_default();
    std::fs::write(
        config,
        format!("[exec]\nmax_timeout_secs = 5\ndefault_timeout_secs = 5\n{original}"),
    )
    .unwrap();
    systemctl(&format!("reload {UNIT}"));
    let conn = bus().await;
    let m = manager(&conn).await;
    assert_error(
        m.exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(6u32))]),
        )
        .await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "1 to 5 seconds",
    );
    std::fs::write(config, "[exec]\nmax_timeout_secs = \"many\"\n").unwrap();
    // (line 2 of this file is the bad one)
    systemctl(&format!("reload {UNIT}"));
    assert_eq!(
        sh(&format!("systemctl is-active {UNIT}")).stdout.trim(),
        "active"
    );
    assert_error(
        m.exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(6u32))]),
        )
        .await,
        "org.freedesktop.DBus.Error.InvalidArgs",
        "1 to 5 seconds",
    );
    let failed = journal(&format!("_SYSTEMD_UNIT={UNIT} PRIORITY=3"));
    assert!(
        failed
            .iter()
            .any(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains("line 2"))),
        "the reload error names the line"
    );
    // A bad file at start is a clear failure, never a silent default.
    let start = sh(&format!("systemctl restart {UNIT}"));
    assert_ne!(start.code, 0);
    let status = sh(&format!("systemctl show -p StatusText --value {UNIT}")).stdout;
    assert!(status.contains("line 2"), "{status}");
    std::fs::write(config, original).unwrap();
    systemctl(&format!("reset-failed {UNIT}"));
    restart_service();
    let conn = bus().await;
    manager(&conn)
        .await
        .exec(
            "host",
            "true",
            spec(vec![("timeout_secs", Variant::from(600u32))]),
        )
        .await
        .unwrap();
}
