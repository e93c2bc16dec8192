//! Contract tests of the D-Bus face: the real objects, argument parsing, error names and
//! authorization decisions, served on a private bus (busd, in this process) over the core's
//! fakes and a fake authority. No root, no dbus-daemon, no polkit: `cargo test` runs them.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use zbus::message::{Header, Type as MessageType};
use zbus::{Connection, OwnedObjectPath, Variant};

use super::auth::{Action, Authority, Authorizer, Decision, Request};
use super::client::{Args, WorkspaceProxy, WorkspacesProxy, interactive};
use super::objects::EventQueue;
use super::{BUS_NAME, MANAGER_PATH};
use crate::core::Error;
use crate::core::fakes::Fakes;
use crate::core::spec::ServiceLimits;

/// What the fake authority was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Asked {
    action: Action,
    workspace: String,
    verb: String,
    interactive: bool,
}

/// Answers by action (allowed unless told otherwise) and records every request.
#[derive(Default)]
struct FakeAuthority {
    answers: Mutex<HashMap<&'static str, Decision>>,
    asked: Mutex<Vec<Asked>>,
}

impl FakeAuthority {
    fn answer(&self, action: Action, decision: Decision) {
        self.answers.lock().unwrap().insert(action.id(), decision);
    }

    fn take_asked(&self) -> Vec<Asked> {
        std::mem::take(&mut self.asked.lock().unwrap())
    }
}

#[async_trait]
impl Authority for FakeAuthority {
    async fn decide(&self, _: &Header<'_>, r: Request<'_>) -> crate::core::Result<Decision> {
        self.asked.lock().unwrap().push(Asked {
            action: r.action,
            workspace: r.workspace.to_owned(),
            verb: r.verb.to_owned(),
            interactive: r.interactive,
        });
        let answers = self.answers.lock().unwrap();
        Ok(answers
            .get(r.action.id())
            .copied()
            .unwrap_or(Decision::Allowed))
    }
}

/// The service on a private bus, and a client connection to it.
struct Service {
    address: String,
    fakes: Fakes,
    authority: Arc<FakeAuthority>,
    /// The service's own connection.
    conn: Connection,
    client: Connection,
    _dir: tempfile::TempDir,
}

async fn service() -> Service {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    let mut bus = busd::bus::Bus::for_address(Some(&format!("unix:path={}", socket.display())))
        .await
        .expect("a private bus");
    let address = bus.address().to_string();
    tokio::spawn(async move { bus.run().await });

    let conn = connect(&address).await;
    let fakes = Fakes::default();
    let (events, receiver) = EventQueue::new();
    let manager = fakes.manager(Arc::new(events.clone()), ServiceLimits::default());
    let authority = Arc::new(FakeAuthority::default());
    super::serve_with(
        &conn,
        manager,
        events,
        receiver,
        Authorizer::new(authority.clone()),
    )
    .await
    .expect("serve");
    conn.request_name(BUS_NAME).await.expect("the bus name");
    let client = connect(&address).await;
    Service {
        address,
        fakes,
        authority,
        conn,
        client,
        _dir: dir,
    }
}

async fn connect(address: &str) -> Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .expect("connect to the private bus")
}

impl Service {
    async fn manager(&self) -> WorkspacesProxy<'static> {
        WorkspacesProxy::new(&self.client).await.unwrap()
    }

    async fn workspace(&self, path: &OwnedObjectPath) -> WorkspaceProxy<'static> {
        WorkspaceProxy::builder(&self.client)
            .path(path.clone())
            .build()
            .await
            .unwrap()
    }

    /// Creates a workspace from `(key, value)` pairs; its object path.
    async fn create(&self, spec: Vec<(&str, Variant<'_>)>) -> zbus::Result<OwnedObjectPath> {
        let spec: Args<'_> = spec.into_iter().collect();
        self.manager().await.create_workspace(spec).await
    }

    async fn wait_status(&self, path: &OwnedObjectPath, want: &str) {
        let ws = self.workspace(path).await;
        let mut changes = ws.receive_status_changed().await;
        loop {
            if ws.status().await.unwrap() == want {
                return;
            }
            let next = tokio::time::timeout(Duration::from_secs(30), changes.next()).await;
            assert!(next.is_ok(), "status never became {want}");
        }
    }
}

fn container(name: &str) -> Vec<(&str, Variant<'_>)> {
    vec![
        ("name", Variant::from(name)),
        ("workspace_type", Variant::from("container")),
        ("distro", Variant::from("debian-bookworm")),
    ]
}

fn fd(f: &std::fs::File) -> zbus::Fd<'_> {
    zbus::Fd::from(f.as_fd())
}

fn no_options() -> Args<'static> {
    Args::new()
}

/// The service's error behind a failed call, and the D-Bus name it came with.
fn error(e: zbus::Error) -> (String, Error) {
    let name = match &e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(fdo) => zbus::DBusError::name(fdo.as_ref()).to_string(),
        other => panic!("not an error reply: {other:?}"),
    };
    (name, Error::from(e))
}

// ---- the interface file, the served interfaces and the proxies agree ----

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
    let mut served = BTreeSet::new();
    for path in [OwnedObjectPath::try_from(MANAGER_PATH).unwrap(), host] {
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
    m.stop_workspace("c").await.unwrap();
    m.get_init_log("c", 0).await.unwrap();
    m.get_debug_info("c").await.unwrap();
    m.rerun_init("c", no_options()).await.unwrap();
    m.sync_workspace("h").await.unwrap();
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
    s.fakes.containers.release_build.notify_one();
    wc.rebuild().await.unwrap();
    s.wait_status(&c, "ready").await;
    wc.build().await.unwrap();
    wc.start().await.unwrap();
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

#[tokio::test]
async fn bad_arguments_are_invalid_args_naming_the_key() {
    let s = service().await;
    let m = s.manager().await;
    let invalid = |e: zbus::Error| {
        let (name, e) = error(e);
        assert_eq!(name, "org.freedesktop.DBus.Error.InvalidArgs", "{e}");
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
