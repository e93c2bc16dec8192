//! Authorization: each call asks for its action, refusals change nothing, challenges, reuse.

use zbus::Variant;

use crate::dbus::auth::{Action, Decision};
use crate::dbus::client::{WorkspacesProxy, interactive};

use super::*;

#[tokio::test]
async fn each_call_asks_for_its_action_and_a_refusal_changes_nothing() {
    let s = service().await;
    let m = s.manager().await;
    let asked = |action, workspace: &str, verb: &str| Asked {
        action,
        workspace: workspace.into(),
        verb: verb.into(),
        interactive: false,
    };

    s.create(vec![("name", Variant::from("h"))]).await.unwrap();
    s.create(container("c")).await.unwrap();
    m.exec("h", "true", no_options()).await.unwrap();
    m.exec("host", "true", no_options()).await.unwrap();
    let _ = m.exec("c", "true", no_options()).await;
    s.create(vec![
        ("name", Variant::from("p")),
        ("path", Variant::from("/srv/p")),
    ])
    .await
    .unwrap();
    assert_eq!(
        s.authority.take_asked(),
        [
            asked(Action::Manage, "h", "create"),
            asked(Action::Manage, "c", "create"),
            asked(Action::ExecHost, "h", "exec in"),
            asked(Action::ExecHost, "host", "exec in"),
            asked(Action::Exec, "c", "exec in"),
            asked(Action::Manage, "p", "create"),
            asked(Action::ExecHost, "p", "choose a host path for"),
        ]
    );

    // Files: reading a container's is an action of its own, changing them is exec; a host
    // workspace's are exec-host either way.
    let _ = m.stat_file("c", "/x", no_options()).await;
    let _ = m.remove_file("c", "/x", no_options()).await;
    let _ = m.stat_file("h", "/x", no_options()).await;
    let _ = m.make_directory("h", "/x", no_options()).await;
    assert_eq!(
        s.authority.take_asked(),
        [
            asked(Action::ReadFiles, "c", "read the files of"),
            asked(Action::Exec, "c", "change the files of"),
            asked(Action::ExecHost, "h", "read the files of"),
            asked(Action::ExecHost, "h", "change the files of"),
        ]
    );

    // Reading needs no authorization.
    m.list_workspaces().await.unwrap();
    m.get_workspace("h").await.unwrap();
    m.list_library().await.unwrap();
    m.list_templates().await.unwrap();
    assert_eq!(s.authority.take_asked(), []);

    s.authority.answer(Action::Manage, Decision::Denied);
    let (name, _) = error(
        s.create(vec![("name", Variant::from("x"))])
            .await
            .unwrap_err(),
    );
    assert_eq!(name, "org.freedesktop.DBus.Error.AccessDenied");
    let (name, _) = error(m.destroy_workspace("h").await.unwrap_err());
    assert_eq!(name, "org.freedesktop.DBus.Error.AccessDenied");
    let names: Vec<String> = m
        .list_workspaces()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.1)
        .collect();
    assert_eq!(names, ["host", "h", "c", "p"]);
}

#[tokio::test]
async fn a_yes_is_reused_briefly_per_connection_and_a_no_never() {
    let s = service_with(true).await;
    let m = s.manager().await;
    s.create(vec![("name", Variant::from("h"))]).await.unwrap();
    s.authority.take_asked();
    for _ in 0..3 {
        m.exec("h", "true", no_options()).await.unwrap();
    }
    assert_eq!(s.authority.take_asked().len(), 1, "one yes, reused");
    // Another workspace, or another verb, is asked on its own.
    m.exec("host", "true", no_options()).await.unwrap();
    s.create(vec![("name", Variant::from("h2"))]).await.unwrap();
    assert_eq!(s.authority.take_asked().len(), 2);
    // Another connection is asked again.
    let other = connect(&s.address).await;
    WorkspacesProxy::new(&other)
        .await
        .unwrap()
        .exec("h", "true", no_options())
        .await
        .unwrap();
    assert_eq!(s.authority.take_asked().len(), 1);
    // A no is asked every time.
    s.authority.answer(Action::Manage, Decision::Denied);
    for _ in 0..2 {
        assert!(m.destroy_workspace("h").await.is_err());
    }
    assert_eq!(s.authority.take_asked().len(), 2);
    // And a yes expires.
    tokio::time::sleep(crate::dbus::auth::ALLOWED_FOR).await;
    m.exec("h", "true", no_options()).await.unwrap();
    assert_eq!(s.authority.take_asked().len(), 1);
}

#[tokio::test]
async fn a_challenge_needs_a_call_that_allows_interactive_authorization() {
    let s = service().await;
    s.authority.answer(Action::ExecHost, Decision::Challenge);
    let (name, _) = error(
        s.manager()
            .await
            .exec("host", "true", no_options())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        name,
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
    );
    assert!(!s.authority.take_asked()[0].interactive);

    // workspacectl's proxies allow it: polkit would ask, and here the challenge is not met.
    let m = interactive::WorkspacesProxy::new(&s.client).await.unwrap();
    let (name, _) = error(m.exec("host", "true", no_options()).await.unwrap_err());
    assert_eq!(name, "org.freedesktop.DBus.Error.AccessDenied");
    assert!(s.authority.take_asked()[0].interactive);
    assert!(s.fakes.exec.0.lock().unwrap().is_empty(), "nothing ran");
}

// ---- objects, properties and signals ----
