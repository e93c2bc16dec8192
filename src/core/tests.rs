//! Manager tests over in-memory fakes of every port.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::error::Error;
use super::fakes::*;
use super::manager::Manager;
use super::ports::*;
use super::spec::{BuildLimits, Changes, CreateSpec, ExecLimits, ExecParams, ServiceLimits};
use super::workspace::{Field, Limits, Network, Status, Workspace};

struct Fixture {
    manager: Arc<Manager>,
    store: Arc<MemStore>,
    dirs: Arc<MemDirs>,
    exec: Arc<FakeExec>,
    containers: Arc<FakeContainers>,
    library: Arc<FakeLibrary>,
    events: Arc<EventLog>,
}

fn fixture_with(store: Arc<MemStore>, limits: ServiceLimits) -> Fixture {
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

fn fixture() -> Fixture {
    fixture_with(Arc::default(), ServiceLimits::default())
}

fn spec(name: &str) -> CreateSpec {
    CreateSpec {
        name: Some(name.into()),
        ..Default::default()
    }
}

fn exec(cmd: &str) -> ExecParams {
    ExecParams {
        command: cmd.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn default_host_workspace_always_exists_and_is_protected() {
    let f = fixture();
    let host = f.manager.get("host").unwrap();
    assert_eq!(
        (host.status, host.path.as_path()),
        (Status::Ready, Path::new("/state/host"))
    );
    assert!(f.store.0.lock().unwrap().contains_key("host"), "persisted");
    assert_eq!(
        f.manager.destroy("host").await,
        Err(Error::Protected("host".into()))
    );
}

#[tokio::test]
async fn create_get_by_id_or_name_update_destroy() {
    let f = fixture();
    let mut s = spec("web");
    s.env_vars = Some([("A".to_string(), "1".to_string())].into());
    let ws = f.manager.create(s).await.unwrap();
    assert_eq!(ws.status, Status::Ready);
    assert!(ws.owns_path && ws.path.starts_with("/state/workspaces"));
    assert_eq!(f.manager.get("web").unwrap(), ws);
    assert_eq!(f.manager.get(&ws.id).unwrap(), ws);
    assert_eq!(f.manager.list().len(), 2);
    assert_eq!(f.manager.list()[0].id, "host", "host first");

    let changes = Changes {
        env_vars: Some([("B".to_string(), "2".to_string())].into()),
        ..Default::default()
    };
    let updated = f.manager.update("web", changes).await.unwrap();
    assert_eq!(updated.env_vars.keys().collect::<Vec<_>>(), ["B"]);
    assert_eq!(f.store.0.lock().unwrap()[&ws.id].env_vars, updated.env_vars);

    f.manager.destroy(&ws.id).await.unwrap();
    assert_eq!(
        f.manager.get("web"),
        Err(Error::NoSuchWorkspace("web".into()))
    );
    assert!(!f.store.0.lock().unwrap().contains_key(&ws.id));
    assert!(
        f.dirs
            .0
            .lock()
            .unwrap()
            .contains(&format!("remove {}", ws.path.display()))
    );
    let events = f.events.0.lock().unwrap().clone();
    assert_eq!(events.first(), Some(&Event::Added { id: ws.id.clone() }));
    assert_eq!(events.last(), Some(&Event::Removed { id: ws.id.clone() }));
}

#[tokio::test]
async fn a_chosen_path_is_never_deleted() {
    let f = fixture();
    let mut s = spec("mine");
    s.path = Some("/srv/mine".into());
    let ws = f.manager.create(s).await.unwrap();
    assert!(!ws.owns_path);
    f.manager.destroy("mine").await.unwrap();
    assert!(
        !f.dirs
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("remove"))
    );
}

#[tokio::test]
async fn duplicate_names_and_refused_kinds_change_nothing() {
    let f = fixture();
    f.manager.create(spec("web")).await.unwrap();
    assert!(matches!(
        f.manager.create(spec("web")).await,
        Err(Error::WorkspaceExists(_))
    ));
    assert!(matches!(
        f.manager.create(spec("host")).await,
        Err(Error::WorkspaceExists(_))
    ));
    let mut container = spec("taken");
    container.workspace_type = Some("container".into());
    container.distro = Some("debian-bookworm".into());
    assert!(matches!(
        f.manager.create(container).await,
        Err(Error::WorkspaceExists(_))
    ));
    assert!(matches!(
        f.manager.create(spec("Bad")).await,
        Err(Error::InvalidArgs { .. })
    ));
    assert_eq!(f.manager.list().len(), 2);
    assert_eq!(f.store.0.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_creates_of_one_name_give_one_workspace() {
    let f = fixture();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let m = f.manager.clone();
            tokio::spawn(async move { m.create(spec("same")).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert!(matches!(e, Error::WorkspaceExists(_)), "{e:?}"),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn exec_environment_layers_base_workspace_and_call() {
    let f = fixture();
    let mut s = spec("web");
    s.env_vars = Some(
        [
            ("A".to_string(), "ws".to_string()),
            ("B".to_string(), "ws".to_string()),
        ]
        .into(),
    );
    let ws = f.manager.create(s).await.unwrap();
    let mut p = exec("env");
    p.env = [("B".to_string(), "call".to_string())].into();
    p.cwd = Some("sub".into());
    f.manager
        .exec("web", p, CancellationToken::new())
        .await
        .unwrap();
    let req = f.exec.0.lock().unwrap().remove(0);
    assert_eq!(req.env["A"], "ws");
    assert_eq!(req.env["B"], "call", "the call's env wins");
    assert_eq!(req.env["HOME"], "/root");
    assert!(req.env["PATH"].contains("/usr/bin"));
    assert_eq!(req.cwd, ws.path.join("sub"));
    assert_eq!(req.timeout, Duration::from_secs(300));
}

#[tokio::test]
async fn destroy_kills_running_execs_and_waits_for_them() {
    let f = fixture();
    f.manager.create(spec("web")).await.unwrap();
    let m = f.manager.clone();
    let running =
        tokio::spawn(async move { m.exec("web", exec("block"), CancellationToken::new()).await });
    while f.exec.0.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    f.manager.destroy("web").await.unwrap();
    let result = running.await.unwrap();
    assert!(
        matches!(&result, Err(Error::JobFailed(m)) if m.contains("destroyed")),
        "{result:?}"
    );
    assert_eq!(f.manager.running_execs(), 0);
}

#[tokio::test]
async fn caller_disconnect_cancels_the_exec() {
    let f = fixture();
    let gone = CancellationToken::new();
    let m = f.manager.clone();
    let g = gone.clone();
    let running = tokio::spawn(async move { m.exec("host", exec("block"), g).await });
    while f.exec.0.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    gone.cancel();
    let result = running.await.unwrap();
    assert!(matches!(&result, Err(Error::JobFailed(m)) if m.contains("disconnected")));
}

#[tokio::test]
async fn exec_cap_is_limits_exceeded() {
    let limits = ServiceLimits {
        exec: ExecLimits {
            max_concurrent: 1,
            queue_timeout_secs: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let f = fixture_with(Arc::default(), limits);
    let m = f.manager.clone();
    let blocker = tokio::spawn(async move {
        m.exec("host", exec("block"), CancellationToken::new())
            .await
    });
    while f.exec.0.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    let second = f
        .manager
        .exec("host", exec("true"), CancellationToken::new())
        .await;
    assert!(
        matches!(second, Err(Error::LimitsExceeded(_))),
        "{second:?}"
    );
    f.manager.shutdown();
    assert!(blocker.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn over_the_cap_a_command_waits_for_a_place_then_is_refused() {
    let limits = ServiceLimits {
        exec: ExecLimits {
            max_concurrent: 1,
            queue_timeout_secs: 5,
            ..Default::default()
        },
        ..Default::default()
    };
    let f = fixture_with(Arc::default(), limits);
    let m = f.manager.clone();
    let first =
        tokio::spawn(async move { m.exec("host", exec("hold"), CancellationToken::new()).await });
    while f.exec.0.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    // A second command waits; when the first ends, it runs.
    let m = f.manager.clone();
    let queued =
        tokio::spawn(async move { m.exec("host", exec("true"), CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!queued.is_finished(), "it waits for a place");
    assert_eq!(f.exec.0.lock().unwrap().len(), 1);
    f.exec.1.notify_one();
    assert!(first.await.unwrap().is_ok());
    assert!(queued.await.unwrap().is_ok(), "it ran once the first ended");
    // With the place taken for longer than the queue timeout, it is refused.
    let m = f.manager.clone();
    let _held =
        tokio::spawn(async move { m.exec("host", exec("hold"), CancellationToken::new()).await });
    while f.manager.running_execs() == 0 {
        tokio::task::yield_now().await;
    }
    let refused = f
        .manager
        .exec("host", exec("true"), CancellationToken::new())
        .await;
    assert!(
        matches!(&refused, Err(Error::LimitsExceeded(m)) if m.contains("queue_timeout_secs")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn load_finishes_interrupted_destroys_and_keeps_the_rest() {
    let first = fixture();
    first.manager.create(spec("keep")).await.unwrap();
    let gone = first.manager.create(spec("gone")).await.unwrap();
    let mut half = gone.clone();
    half.status = Status::Destroying;
    first.store.save(&half).unwrap();

    let second = fixture_with(first.store.clone(), ServiceLimits::default());
    assert!(second.manager.get("keep").is_ok());
    assert!(second.manager.get("gone").is_err());
    assert!(!second.store.0.lock().unwrap().contains_key(&gone.id));
    assert!(
        second
            .dirs
            .0
            .lock()
            .unwrap()
            .contains(&format!("remove {}", gone.path.display()))
    );
}

#[tokio::test]
async fn exec_in_a_missing_workspace_and_bad_timeouts() {
    let f = fixture();
    let r = f
        .manager
        .exec("nope", exec("true"), CancellationToken::new())
        .await;
    assert_eq!(r, Err(Error::NoSuchWorkspace("nope".into())));
    let mut p = exec("true");
    p.timeout_secs = Some(0);
    let r = f.manager.exec("host", p, CancellationToken::new()).await;
    assert!(matches!(r, Err(e @ Error::InvalidArgs { .. }) if e.to_string().contains("3600")));
    assert!(f.exec.0.lock().unwrap().is_empty(), "nothing ran");
}

fn container(name: &str, init: &str) -> CreateSpec {
    CreateSpec {
        name: Some(name.into()),
        workspace_type: Some("container".into()),
        distro: Some("debian-bookworm".into()),
        init_script: Some(init.into()),
        ..Default::default()
    }
}

async fn wait_status(f: &Fixture, name: &str, want: Status) -> Workspace {
    for _ in 0..1000 {
        let ws = f.manager.get(name).unwrap();
        if ws.status == want {
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{name} never reached {want}");
}

#[tokio::test]
async fn container_lifecycle_pending_building_ready() {
    let f = fixture();
    let ws = f.manager.create(container("box", "echo hi")).await.unwrap();
    assert_eq!(ws.status, Status::Pending);
    assert_eq!(ws.path, Path::new("/machines/box"));
    assert!(matches!(
        f.manager
            .exec("box", exec("true"), CancellationToken::new())
            .await,
        Err(Error::NotReady { .. })
    ));
    f.manager.build("box", false).await.unwrap();
    assert_eq!(f.manager.get("box").unwrap().status, Status::Building);
    assert!(matches!(
        f.manager.build("box", false).await,
        Err(Error::Busy(_))
    ));
    f.containers.release_build.notify_one();
    wait_status(&f, "box", Status::Ready).await;
    assert_eq!(
        f.containers.calls(),
        ["stop box", "build box", "start box", "init box"]
    );
    f.manager
        .exec("box", exec("ls"), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        f.containers.calls().last().unwrap(),
        "exec box ls in /workspace"
    );
    f.manager.destroy("box").await.unwrap();
    assert!(
        f.containers
            .calls()
            .ends_with(&["stop box".to_string(), "remove box".to_string()])
    );
    assert!(f.manager.get("box").is_err());
}

#[tokio::test]
async fn a_failed_install_changes_neither_the_record_nor_the_properties() {
    let f = fixture();
    let mut s = spec("web");
    s.skills = Some(vec!["a".into()]);
    f.manager.create(s).await.unwrap();
    let events = f.events.0.lock().unwrap().len();
    let change = Changes {
        skills: Some(vec!["b".into(), "disk-full".into()]),
        ..Default::default()
    };
    assert!(matches!(
        f.manager.update("web", change).await,
        Err(Error::Io { .. })
    ));
    let ws = f.manager.get("web").unwrap();
    assert_eq!(ws.skills, ["a"]);
    assert_eq!(
        f.store.0.lock().unwrap()[&ws.id].skills,
        ["a"],
        "record unchanged"
    );
    assert_eq!(
        f.events.0.lock().unwrap().len(),
        events,
        "no PropertiesChanged"
    );
}

#[tokio::test]
async fn a_refused_create_does_not_keep_its_name() {
    let limits = ServiceLimits {
        builds: BuildLimits {
            max_concurrent: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let f = fixture_with(Arc::default(), limits);
    f.manager.create(container("first", "")).await.unwrap();
    f.manager.build("first", false).await.unwrap();
    let mut now = container("second", "");
    now.build_on_create = Some(true);
    assert!(matches!(
        f.manager.create(now).await,
        Err(Error::LimitsExceeded(_))
    ));
    // The name is free again: no WorkspaceExists until a restart.
    f.manager.create(container("second", "")).await.unwrap();
    let mut again = spec("second");
    again.workspace_type = None;
    assert!(matches!(
        f.manager.create(again).await,
        Err(Error::WorkspaceExists(_))
    ));
    f.containers.release_build.notify_one();
}

#[tokio::test]
async fn a_build_says_its_step_and_clears_it_at_the_end() {
    let f = fixture();
    f.manager.create(container("box", "echo hi")).await.unwrap();
    f.manager.build("box", false).await.unwrap();
    // The fake build unit reports "unpack", then waits to be released.
    while f.manager.get("box").unwrap().build_step != "unpack" {
        tokio::task::yield_now().await;
    }
    assert!(
        f.events
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::Changed { fields, .. } if fields == &[Field::BuildStep]))
    );
    f.containers.release_build.notify_one();
    let ws = wait_status(&f, "box", Status::Ready).await;
    assert_eq!(ws.build_step, "", "no step once ready");
}

#[tokio::test]
async fn a_failing_init_script_is_an_error_with_a_message() {
    let f = fixture();
    f.manager.create(container("bad", "fail")).await.unwrap();
    f.manager.build("bad", false).await.unwrap();
    f.containers.release_build.notify_one();
    let ws = wait_status(&f, "bad", Status::Error).await;
    assert!(
        ws.error_message.contains("exit code 1"),
        "{}",
        ws.error_message
    );
    assert_eq!(
        f.store.0.lock().unwrap()[&ws.id].status,
        Status::Error,
        "persisted"
    );
}

#[tokio::test]
async fn build_verbs_on_host_workspaces_are_not_supported() {
    let f = fixture();
    assert!(matches!(
        f.manager.build("host", false).await,
        Err(Error::NotSupported(_))
    ));
    assert!(matches!(
        f.manager.init_log("host", 5).await,
        Err(Error::NotSupported(_))
    ));
}

#[tokio::test]
async fn restart_resumes_a_build_that_was_running() {
    let first = fixture();
    let ws = first.manager.create(container("box", "")).await.unwrap();
    let mut building = ws.clone();
    building.status = Status::Building;
    first.store.save(&building).unwrap();
    let second = fixture_with(first.store.clone(), ServiceLimits::default());
    second.manager.reconcile();
    wait_status(&second, "box", Status::Ready).await;
    let calls = second.containers.calls();
    assert!(
        calls.contains(&"wait_build box".to_string())
            && calls.ends_with(&["start box".to_string()]),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"clean_orphans box".to_string()),
        "{calls:?}"
    );
}

#[tokio::test]
async fn the_default_host_workspace_gets_every_skill() {
    let f = fixture();
    assert_eq!(
        f.library.0.lock().unwrap()[0],
        "/state/host skills=a,b tools="
    );
}

#[tokio::test]
async fn skills_and_tools_are_installed_updated_and_checked() {
    let f = fixture();
    let mut s = spec("web");
    s.skills = Some(vec!["a".into(), "b".into()]);
    s.tools = Some(vec!["t".into()]);
    let ws = f.manager.create(s).await.unwrap();
    let installs = f.library.0.lock().unwrap().clone();
    assert_eq!(
        installs.last().unwrap(),
        &format!("{} skills=a,b tools=t", ws.path.display())
    );
    let mut unknown = spec("other");
    unknown.skills = Some(vec!["zzz".into()]);
    assert_eq!(
        f.manager.create(unknown).await,
        Err(Error::NoSuchSkill("zzz".into()))
    );
    assert!(f.manager.get("other").is_err(), "nothing created");
    let escape = Changes {
        skills: Some(vec!["../x".into()]),
        ..Default::default()
    };
    assert!(matches!(
        f.manager.update("web", escape).await,
        Err(Error::InvalidArgs { .. })
    ));
    let fewer = Changes {
        skills: Some(vec!["b".into()]),
        ..Default::default()
    };
    f.manager.update("web", fewer).await.unwrap();
    assert_eq!(f.manager.get("web").unwrap().skills, ["b"]);
    assert!(
        f.library
            .0
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .ends_with("skills=b tools=t")
    );
}

#[tokio::test]
async fn a_template_gives_defaults_and_builds_at_once() {
    let f = fixture();
    let s = CreateSpec {
        name: Some("from-tpl".into()),
        template: Some("tpl".into()),
        env_vars: Some([("MINE".to_string(), "x".to_string())].into()),
        ..Default::default()
    };
    let ws = f.manager.create(s).await.unwrap();
    assert!(ws.is_container());
    assert_eq!(ws.template, "tpl");
    assert_eq!(ws.skills, ["a"]);
    assert_eq!(ws.env_vars.keys().collect::<Vec<_>>(), ["FROM", "MINE"]);
    assert_eq!(ws.init_script, "echo from template");
    assert_eq!(ws.status, Status::Building, "a template builds at once");
    let missing = CreateSpec {
        name: Some("x".into()),
        template: Some("nope".into()),
        ..Default::default()
    };
    assert_eq!(
        f.manager.create(missing).await,
        Err(Error::NoSuchTemplate("nope".into()))
    );
    assert!(f.manager.get("x").is_err());
}

#[tokio::test]
async fn limits_and_network_change_on_containers_only() {
    let f = fixture();
    f.manager.create(spec("web")).await.unwrap();
    let host = Changes {
        tasks_max: Some(10),
        ..Default::default()
    };
    assert!(matches!(
        f.manager.update("web", host).await,
        Err(e @ Error::InvalidArgs { .. }) if e.to_string().contains("'tasks_max'")
    ));
    let mut s = container("box", "");
    s.memory_max = Some(1 << 30);
    s.tasks_max = Some(100);
    f.manager.create(s).await.unwrap();
    let bad = Changes {
        network: Some("wide".into()),
        memory_max: Some(5),
        ..Default::default()
    };
    assert!(matches!(
        f.manager.update("box", bad).await,
        Err(e @ Error::InvalidArgs { .. }) if e.to_string().contains("'network'")
    ));
    assert_eq!(
        f.manager.get("box").unwrap().limits.memory_max,
        Some(1 << 30),
        "nothing changed"
    );
    let change = Changes {
        network: Some("private".into()),
        memory_max: Some(0),
        cpu_quota_percent: Some(50),
        ..Default::default()
    };
    let ws = f.manager.update("box", change).await.unwrap();
    let want = Limits {
        memory_max: None,
        cpu_quota_percent: Some(50),
        tasks_max: Some(100),
    };
    assert_eq!((ws.network, ws.limits), (Network::Private, want));
    assert_eq!(f.store.0.lock().unwrap()[&ws.id].limits, want, "saved");
    assert_eq!(
        f.containers.calls().last().unwrap(),
        &format!("limits box {want:?}"),
        "given to the running unit"
    );
    let events = f.events.0.lock().unwrap().clone();
    assert!(
        events.contains(&Event::Changed {
            id: ws.id.clone(),
            fields: vec![Field::Network, Field::Limits]
        }),
        "{events:?}"
    );
}
