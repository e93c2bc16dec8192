//! Calls and what they answer: errors by name, bad arguments, objects and signals, builds,
//! callers that leave.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::Variant;

use crate::core::Error;
use crate::dbus::client::WorkspacesProxy;
use crate::dbus::{BUS_NAME, MANAGER_PATH};

use super::*;

#[tokio::test]
async fn errors_arrive_by_name_with_their_data() {
    let s = service().await;
    let m = s.manager().await;

    let (name, e) = error(m.get_workspace("nope").await.unwrap_err());
    assert_eq!(name, "org.agent.Workspaces.Error.NoSuchWorkspace");
    assert_eq!(e, Error::NoSuchWorkspace("nope".into()));

    s.create(vec![("name", Variant::from("h"))]).await.unwrap();
    let (name, e) = error(
        s.create(vec![("name", Variant::from("h"))])
            .await
            .unwrap_err(),
    );
    assert_eq!(name, "org.agent.Workspaces.Error.WorkspaceExists");
    assert!(matches!(e, Error::WorkspaceExists(_)), "{e:?}");

    let (name, e) = error(m.destroy_workspace("host").await.unwrap_err());
    assert_eq!(name, "org.agent.Workspaces.Error.Protected");
    assert_eq!(e, Error::Protected("host".into()));

    let (name, e) = error(m.build_workspace("h").await.unwrap_err());
    assert_eq!(name, "org.agent.Workspaces.Error.NotSupported");
    assert!(matches!(e, Error::NotSupported(_)), "{e:?}");

    s.create(container("c")).await.unwrap();
    let (name, e) = error(m.exec("c", "true", no_options()).await.unwrap_err());
    assert_eq!(name, "org.agent.Workspaces.Error.NotReady");
    assert_eq!(
        e,
        Error::NotReady {
            workspace: "c".into(),
            status: "pending".into()
        }
    );

    let (name, e) = error(
        s.create(vec![
            ("name", Variant::from("s")),
            ("skills", Variant::from(vec!["zzz"])),
        ])
        .await
        .unwrap_err(),
    );
    assert_eq!(name, "org.agent.Workspaces.Error.NoSuchSkill");
    assert_eq!(e, Error::NoSuchSkill("zzz".into()));

    let (name, e) = error(m.get_template("nope").await.unwrap_err());
    assert_eq!(name, "org.agent.Workspaces.Error.NoSuchTemplate");
    assert_eq!(e, Error::NoSuchTemplate("nope".into()));
}

/// The reply to `UpdateWorkspace("host", {skills: [nosuch]})` on `conn`, as the bus delivered
/// it: its error name, body signature and strings.
async fn raw_update_error(
    conn: &zbus::Connection,
    changes: Vec<(&str, Variant<'_>)>,
) -> (String, String, Vec<String>) {
    let changes: HashMap<&str, Variant<'_>> = changes.into_iter().collect();
    let call = zbus::Message::method_call(MANAGER_PATH, "UpdateWorkspace")
        .destination(BUS_NAME)
        .interface(BUS_NAME)
        .build(&("host", changes))
        .unwrap();
    let m = reply_to(conn, call).await;
    let name = m.header().error_name().unwrap().to_string();
    let body = m.body();
    let signature = body
        .signature()
        .to_string()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .to_owned();
    let strings = match signature.as_str() {
        "s" => vec![body.deserialize::<String>().unwrap()],
        "ss" => {
            let (a, b) = body.deserialize::<(String, String)>().unwrap();
            vec![a, b]
        }
        "sss" => {
            let (a, b, c) = body.deserialize::<(String, String, String)>().unwrap();
            vec![a, b, c]
        }
        other => panic!("body {other}"),
    };
    (name, signature, strings)
}

/// A caller gets each error's message alone, as every client library reads it, until it asks
/// for the data, and again once it stops.
#[tokio::test]
async fn errors_carry_their_data_only_for_a_caller_that_asked() {
    let s = service().await;
    let plain = crate::dbus::client::bus(Some(&s.address)).await.unwrap();
    let skill = || vec![("skills", Variant::from(vec!["nosuch"]))];
    let key = || vec![("colour", Variant::from("red"))];
    let message = "Skill 'nosuch' is not in the Library";
    assert_eq!(
        raw_update_error(&plain, skill()).await,
        (
            "org.agent.Workspaces.Error.NoSuchSkill".into(),
            "s".into(),
            vec![message.into()]
        )
    );
    let (name, signature, strings) = raw_update_error(&plain, key()).await;
    assert_eq!(
        (name.as_str(), signature.as_str()),
        ("org.freedesktop.DBus.Error.InvalidArgs", "s")
    );
    assert!(
        strings[0].starts_with("Invalid 'colour': unknown key"),
        "{strings:?}"
    );

    let m = WorkspacesProxy::new(&plain).await.unwrap();
    m.set_error_data(true).await.unwrap();
    assert_eq!(
        raw_update_error(&plain, skill()).await,
        (
            "org.agent.Workspaces.Error.NoSuchSkill".into(),
            "ss".into(),
            vec![message.into(), "nosuch".into()]
        )
    );
    let (name, signature, strings) = raw_update_error(&plain, key()).await;
    assert_eq!(
        (name.as_str(), signature.as_str()),
        ("org.agent.Workspaces.Error.InvalidArgs", "sss")
    );
    assert_eq!(strings[1], "colour");
    assert!(strings[2].starts_with("unknown key"), "{strings:?}");

    m.set_error_data(false).await.unwrap();
    assert_eq!(raw_update_error(&plain, skill()).await.1, "s");
}

#[tokio::test]
async fn bad_arguments_are_invalid_args_naming_the_key() {
    let s = service().await;
    let m = s.manager().await;
    let invalid = |e: zbus::Error| {
        let (name, e) = error(e);
        assert_eq!(name, "org.agent.Workspaces.Error.InvalidArgs", "{e}");
        e.field().map(str::to_owned).unwrap_or_default()
    };
    let e = s.create(vec![("colour", Variant::from("red"))]).await;
    assert_eq!(invalid(e.unwrap_err()), "colour");
    let e = s.create(vec![("name", Variant::from(5u32))]).await;
    assert_eq!(invalid(e.unwrap_err()), "name");
    let e = s.create(vec![("name", Variant::from("Not_A_Name"))]).await;
    assert_eq!(invalid(e.unwrap_err()), "name");
    let e = s.create(vec![]).await;
    assert_eq!(invalid(e.unwrap_err()), "name");
    let e = m
        .exec(
            "host",
            "true",
            HashMap::from([("timeout_secs", Variant::from(-1i32))]),
        )
        .await;
    assert_eq!(invalid(e.unwrap_err()), "timeout_secs");
    let e = m
        .update_workspace(
            "host",
            HashMap::from([("memory_max", Variant::from(1u64 << 30))]),
        )
        .await;
    assert!(e.is_err(), "limits are for containers");
    // Nothing of what was refused exists.
    assert_eq!(m.list_workspaces().await.unwrap().len(), 1);
}

// ---- authorization ----

#[tokio::test]
async fn objects_and_signals_follow_the_workspaces() {
    let s = service().await;
    let m = s.manager().await;
    let om = zbus::fdo::ObjectManagerProxy::builder(&s.client)
        .destination(BUS_NAME)
        .path(MANAGER_PATH)
        .build()
        .await
        .unwrap();
    let mut added = om.receive_interfaces_added().await.unwrap();
    let mut removed = om.receive_interfaces_removed().await.unwrap();
    let mut new = m.receive_workspace_new().await.unwrap();
    let mut gone = m.receive_workspace_removed().await.unwrap();

    let env: HashMap<&str, &str> = HashMap::from([("TOKEN", "s3cret")]);
    let path = s
        .create(vec![
            ("name", Variant::from("h")),
            ("env_vars", Variant::from(env)),
        ])
        .await
        .unwrap();
    // The object is there when the reply is.
    let ws = s.workspace(&path).await;
    assert_eq!(ws.name().await.unwrap(), "h");
    assert_eq!(ws.status().await.unwrap(), "ready");
    assert_eq!(ws.env_var_names().await.unwrap(), ["TOKEN"]);
    let id = ws.id().await.unwrap();
    let signal = added.next().await.unwrap();
    assert_eq!(signal.args().unwrap().object_path().as_str(), path.as_str());
    let signal = new.next().await.unwrap();
    assert_eq!(signal.args().unwrap().id, id);
    // Values of env vars are never public.
    let all = format!("{:?}", om.get_managed_objects().await.unwrap());
    assert!(all.contains("TOKEN") && !all.contains("s3cret"), "{all}");

    m.destroy_workspace("h").await.unwrap();
    let signal = removed.next().await.unwrap();
    assert_eq!(signal.args().unwrap().object_path().as_str(), path.as_str());
    let signal = gone.next().await.unwrap();
    assert_eq!(signal.args().unwrap().id, id);
    let (name, _) = error(m.get_workspace(&id).await.unwrap_err());
    assert_eq!(name, "org.agent.Workspaces.Error.NoSuchWorkspace");
    let props = zbus::fdo::PropertiesProxy::builder(&s.client)
        .destination(BUS_NAME)
        .path(path)
        .build()
        .await
        .unwrap();
    let iface =
        zbus::names::InterfaceName::from_static_str_unchecked("org.agent.Workspaces.Workspace");
    let e = props.get_all(iface).await;
    assert!(
        matches!(e, Err(zbus::fdo::Error::UnknownObject(_))),
        "the object is gone: {e:?}"
    );
}

#[tokio::test]
async fn a_build_announces_its_status_and_step() {
    let s = service().await;
    let mut spec = container("c");
    spec.push(("init_script", Variant::from("echo hi")));
    let path = s.create(spec).await.unwrap();
    let props = zbus::fdo::PropertiesProxy::builder(&s.client)
        .destination(BUS_NAME)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();

    s.workspace(&path).await.build().await.unwrap();
    s.fakes.containers.release_build.notify_one();
    // Every PropertiesChanged signal, in order, as (property, value).
    let mut seen = vec![];
    while seen.last() != Some(&("Status".to_owned(), "ready".to_owned())) {
        let signal = changes.next().await.unwrap();
        for (k, v) in signal.args().unwrap().changed_properties() {
            if *k == "Status" || *k == "BuildStep" {
                seen.push((
                    k.to_string(),
                    String::try_from(v.try_clone().unwrap()).unwrap(),
                ));
            }
        }
    }
    let step = |v: &str| ("BuildStep".to_owned(), v.to_owned());
    let status = |v: &str| ("Status".to_owned(), v.to_owned());
    // A signal carries the value when it is sent: steps that pass quicker than the signals
    // are reported once, as the later value. What a client sees is still the build's order.
    seen.dedup();
    let order = ["unpack", "skills", "start", "init", ""];
    let steps: Vec<&str> = seen
        .iter()
        .filter(|(k, _)| k == "BuildStep")
        .map(|(_, v)| v.as_str())
        .collect();
    let mut rest = order.iter();
    assert!(
        steps.iter().all(|s| rest.any(|o| o == s)),
        "steps out of order: {seen:?}"
    );
    // The unit holds at "unpack" until released, so that step is seen; and the step is
    // cleared before the workspace is ready.
    assert_eq!(&seen[..2], [status("building"), step("unpack")]);
    assert_eq!(&seen[seen.len() - 2..], [step(""), status("ready")]);
}

#[tokio::test]
async fn a_caller_that_leaves_the_bus_ends_its_commands() {
    let s = service().await;
    s.create(vec![("name", Variant::from("h"))]).await.unwrap();
    let leaving = connect(&s.address).await;
    let m = WorkspacesProxy::new(&leaving).await.unwrap();
    let call = tokio::spawn(async move { m.exec("h", "block", no_options()).await });
    while s.fakes.exec.0.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    leaving.close().await.unwrap();
    assert!(call.await.unwrap().is_err(), "the caller is gone");
    // Destroying waits for the workspace's commands: it returns once the one above ended.
    let destroyed = tokio::time::timeout(
        Duration::from_secs(60),
        s.manager().await.destroy_workspace("h"),
    )
    .await;
    assert!(matches!(destroyed, Ok(Ok(()))), "{destroyed:?}");
}

#[tokio::test]
async fn a_host_workspace_says_its_network_is_the_hosts() {
    let svc = service().await;
    let host = svc.manager().await.get_workspace("host").await.unwrap();
    assert_eq!(svc.workspace(&host).await.network().await.unwrap(), "host");
    let path = svc
        .create(vec![("name", Variant::from("plain"))])
        .await
        .unwrap();
    assert_eq!(svc.workspace(&path).await.network().await.unwrap(), "host");
    let path = svc.create(container("boxed")).await.unwrap();
    assert_eq!(
        svc.workspace(&path).await.network().await.unwrap(),
        "internet"
    );
}
