//! Contract tests of the D-Bus face: the real objects, argument parsing, error names and
//! authorization decisions, served on a private bus (busd, in this process) over the core's
//! fakes and a fake authority. No root, no dbus-daemon, no polkit: `cargo test` runs them.

mod auth;
mod calls;
mod interface;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, Variant};

use crate::core::Error;
use crate::core::fakes::Fakes;
use crate::core::spec::ServiceLimits;
use crate::dbus::BUS_NAME;
use crate::dbus::auth::{Action, Authority, Authorizer, Decision, Remembering, Request};
use crate::dbus::client::{Args, WorkspaceProxy, WorkspacesProxy};
use crate::dbus::objects::EventQueue;

/// What the fake authority was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Asked {
    pub(super) action: Action,
    pub(super) workspace: String,
    pub(super) verb: String,
    pub(super) interactive: bool,
}

/// Answers by action (allowed unless told otherwise) and records every request.
#[derive(Default)]
pub(crate) struct FakeAuthority {
    pub(super) answers: Mutex<HashMap<&'static str, Decision>>,
    pub(super) asked: Mutex<Vec<Asked>>,
}

impl FakeAuthority {
    pub(crate) fn answer(&self, action: Action, decision: Decision) {
        self.answers.lock().unwrap().insert(action.id(), decision);
    }

    pub(super) fn take_asked(&self) -> Vec<Asked> {
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
pub(crate) struct Service {
    pub(crate) address: String,
    pub(crate) fakes: Fakes,
    pub(crate) authority: Arc<FakeAuthority>,
    /// The service's own connection.
    pub(crate) conn: Connection,
    pub(crate) client: Connection,
    pub(crate) _dir: tempfile::TempDir,
}

/// A private bus (busd, in this process) in a directory of its own: the directory, kept as
/// long as the bus is used, and the bus's address.
pub(crate) async fn private_bus() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    let mut bus = busd::bus::Bus::for_address(Some(&format!("unix:path={}", socket.display())))
        .await
        .expect("a private bus");
    let address = bus.address().to_string();
    tokio::spawn(async move { bus.run().await });
    (dir, address)
}

/// The reply to `call`, sent on `conn`, as the bus delivered it (zbus's proxies keep only the
/// message of a standard error name).
pub(crate) async fn reply_to(conn: &zbus::Connection, call: zbus::Message) -> zbus::Message {
    use futures_util::StreamExt;
    let mut replies = zbus::MessageStream::from(conn);
    let serial = call.primary_header().serial_num();
    conn.send(&call).await.unwrap();
    loop {
        let m = replies.next().await.unwrap().unwrap();
        if m.header().reply_serial() == Some(serial) {
            return m;
        }
    }
}

pub(crate) async fn service() -> Service {
    service_with(false).await
}

/// The service; with `remember`, its authority's "yes" answers are reused as polkit's are.
pub(crate) async fn service_with(remember: bool) -> Service {
    let (dir, address) = private_bus().await;

    let conn = crate::dbus::client::bus(Some(&address))
        .await
        .expect("connect to the private bus");
    let fakes = Fakes::default();
    let (events, receiver) = EventQueue::new();
    let manager = fakes.manager(Arc::new(events.clone()), ServiceLimits::default());
    let authority = Arc::new(FakeAuthority::default());
    super::serve_with(
        &conn,
        manager,
        events,
        receiver,
        if remember {
            Authorizer::new(Arc::new(Remembering::new(authority.clone())))
        } else {
            Authorizer::new(authority.clone())
        },
        crate::dbus::ErrorData::default(),
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

/// A client's connection, asking for its errors' data as the service's clients do.
pub(crate) async fn connect(address: &str) -> Connection {
    crate::dbus::client::connect(Some(address))
        .await
        .expect("connect to the private bus")
}

impl Service {
    pub(crate) async fn manager(&self) -> WorkspacesProxy<'static> {
        WorkspacesProxy::new(&self.client).await.unwrap()
    }

    pub(super) async fn workspace(&self, path: &OwnedObjectPath) -> WorkspaceProxy<'static> {
        WorkspaceProxy::builder(&self.client)
            .path(path.clone())
            .build()
            .await
            .unwrap()
    }

    /// Creates a workspace from `(key, value)` pairs; its object path.
    pub(crate) async fn create(
        &self,
        spec: Vec<(&str, Variant<'_>)>,
    ) -> zbus::Result<OwnedObjectPath> {
        let spec: Args<'_> = spec.into_iter().collect();
        self.manager().await.create_workspace(spec).await
    }

    pub(crate) async fn wait_status(&self, path: &OwnedObjectPath, want: &str) {
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

pub(crate) fn container(name: &str) -> Vec<(&str, Variant<'_>)> {
    vec![
        ("name", Variant::from(name)),
        ("workspace_type", Variant::from("container")),
        ("distro", Variant::from("debian-bookworm")),
    ]
}

pub(super) fn fd(f: &std::fs::File) -> zbus::Fd<'_> {
    zbus::Fd::from(f.as_fd())
}

pub(super) fn no_options() -> Args<'static> {
    Args::new()
}

/// The service's error behind a failed call, and the D-Bus name it came with.
pub(super) fn error(e: zbus::Error) -> (String, Error) {
    let name = match &e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(fdo) => zbus::DBusError::name(fdo.as_ref()).to_string(),
        other => panic!("not an error reply: {other:?}"),
    };
    (name, Error::from(e))
}

// ---- the interface file, the served interfaces and the proxies agree ----
