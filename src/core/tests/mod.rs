//! Manager tests over in-memory fakes of every port, by area; the fixture they share.

mod containers;
mod host;
mod library;

use std::sync::Arc;
use std::time::Duration;

use crate::core::fakes::*;
use crate::core::manager::Manager;
use crate::core::spec::{CreateSpec, ExecParams, ServiceLimits};
use crate::core::workspace::{Status, Workspace};

pub(super) struct Fixture {
    pub(super) manager: Arc<Manager>,
    pub(super) store: Arc<MemStore>,
    pub(super) dirs: Arc<MemDirs>,
    pub(super) exec: Arc<FakeExec>,
    pub(super) containers: Arc<FakeContainers>,
    pub(super) library: Arc<FakeLibrary>,
    pub(super) events: Arc<EventLog>,
}

pub(super) fn fixture_with(store: Arc<MemStore>, limits: ServiceLimits) -> Fixture {
    let fakes = Fakes {
        store,
        ..Default::default()
    };
    let events = Arc::new(EventLog::default());
    let manager = fakes.manager(events.clone(), limits);
    let Fakes {
        store,
        dirs,
        exec,
        containers,
        library,
    } = fakes;
    Fixture {
        manager,
        store,
        dirs,
        exec,
        containers,
        library,
        events,
    }
}

pub(super) fn fixture() -> Fixture {
    fixture_with(Arc::default(), ServiceLimits::default())
}

pub(super) fn spec(name: &str) -> CreateSpec {
    CreateSpec {
        name: Some(name.into()),
        ..Default::default()
    }
}

pub(super) fn exec(cmd: &str) -> ExecParams {
    ExecParams {
        command: cmd.into(),
        ..Default::default()
    }
}

pub(super) fn container(name: &str, init: &str) -> CreateSpec {
    CreateSpec {
        name: Some(name.into()),
        workspace_type: Some("container".into()),
        distro: Some("debian-bookworm".into()),
        init_script: Some(init.into()),
        ..Default::default()
    }
}

pub(super) async fn wait_status(f: &Fixture, name: &str, want: Status) -> Workspace {
    for _ in 0..1000 {
        let ws = f.manager.get(name).unwrap();
        if ws.status == want {
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{name} never reached {want}");
}
