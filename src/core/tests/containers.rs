//! Container workspaces: the build lifecycle, steps, failures, restarts, limits.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::core::error::Error;
use crate::core::ports::*;
use crate::core::spec::{BuildLimits, Changes, ServiceLimits};
use crate::core::workspace::{Field, Limits, Network, Status};

use super::*;

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
        ..Default::default()
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

#[tokio::test]
async fn egress_rules_are_checked_saved_and_given_to_the_running_container() {
    let f = fixture();
    // A new container has a network of its own; a host workspace takes no rules.
    let mut s = container("box", "");
    s.egress_allow = Some(vec!["Deb.Debian.org.".into(), "192.0.2.0/24".into()]);
    let ws = f.manager.create(s).await.unwrap();
    assert_eq!(ws.network, Network::Internet);
    assert_eq!(ws.egress_allow, ["deb.debian.org", "192.0.2.0/24"]);
    let mut h = spec("web");
    h.egress_deny = Some(vec!["example.com".into()]);
    assert!(matches!(
        f.manager.create(h).await,
        Err(e @ Error::InvalidArgs { .. }) if e.to_string().contains("'egress_deny'")
    ));
    // A bad entry names its key and changes nothing (not even the other keys).
    for (allow, says) in [
        (vec!["10.0.0.1/8".to_owned()], "did you mean 10.0.0.0/8"),
        (vec!["169.254.169.254".to_owned()], "link-local"),
        (vec!["not a name".to_owned()], "not a domain name"),
        (
            (0..300).map(|i| format!("h{i}.example.com")).collect(),
            "at most 256",
        ),
    ] {
        let bad = Changes {
            egress_allow: Some(allow),
            memory_max: Some(1 << 20),
            ..Default::default()
        };
        let e = f.manager.update("box", bad).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgs { field, .. } if field == "egress_allow")
                && e.to_string().contains(says),
            "{e}"
        );
    }
    let now = f.manager.get("box").unwrap();
    assert_eq!((now.egress_allow.len(), now.limits.memory_max), (2, None));
    // A change reaches the running container at once and is announced.
    let change = Changes {
        egress_allow: Some(vec![]),
        egress_deny: Some(vec!["*.example.com".into()]),
        ..Default::default()
    };
    let ws = f.manager.update("box", change).await.unwrap();
    assert!(ws.egress_allow.is_empty());
    assert_eq!(
        f.store.0.lock().unwrap()[&ws.id].egress_deny,
        ["*.example.com"]
    );
    assert_eq!(
        f.containers.calls().last().unwrap(),
        "egress box allow [] deny [\"*.example.com\"]"
    );
    assert!(f.events.0.lock().unwrap().contains(&Event::Changed {
        id: ws.id.clone(),
        fields: vec![Field::Egress]
    }));
}

#[tokio::test]
async fn pause_freezes_and_every_use_resumes_first() {
    let f = fixture();
    f.manager.create(container("box", "")).await.unwrap();
    // Not built yet: nothing to pause.
    assert!(matches!(
        f.manager.pause("box").await,
        Err(Error::NotReady { .. })
    ));
    f.manager.build("box", false).await.unwrap();
    f.containers.release_build.notify_one();
    wait_status(&f, "box", Status::Ready).await;
    f.manager.pause("box").await.unwrap();
    assert_eq!(f.manager.get("box").unwrap().status, Status::Paused);
    assert_eq!(f.containers.calls().last().unwrap(), "freeze box");
    // Pausing again changes nothing.
    f.manager.pause("box").await.unwrap();
    assert_eq!(f.containers.calls().last().unwrap(), "freeze box");
    // A command thaws the container before it runs.
    f.manager
        .exec("box", exec("ls"), CancellationToken::new())
        .await
        .unwrap();
    assert!(
        f.containers
            .calls()
            .ends_with(&["thaw box".into(), "exec box ls in /workspace".into()]),
        "{:?}",
        f.containers.calls()
    );
    assert_eq!(f.manager.get("box").unwrap().status, Status::Ready);
    // Resume of a ready workspace does nothing; stop of a paused one thaws it first.
    f.manager.resume("box").await.unwrap();
    assert_eq!(
        f.containers.calls().last().unwrap(),
        "exec box ls in /workspace"
    );
    f.manager.pause("box").await.unwrap();
    f.manager.stop("box").await.unwrap();
    assert!(
        f.containers
            .calls()
            .ends_with(&["thaw box".into(), "stop box".into()])
    );
    assert_eq!(f.manager.get("box").unwrap().status, Status::Ready);
    // Every change of status was announced.
    let statuses = f
        .events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::Changed { fields, .. } if fields.contains(&Field::Status)))
        .count();
    assert!(statuses >= 6, "{statuses}");
    // Host workspaces have nothing to freeze.
    assert!(matches!(
        f.manager.pause("host").await,
        Err(Error::NotSupported(_))
    ));
}

#[tokio::test]
async fn a_paused_record_whose_container_is_not_frozen_is_ready_after_a_restart() {
    let first = fixture();
    let ws = first.manager.create(container("box", "")).await.unwrap();
    let mut paused = ws.clone();
    paused.status = Status::Paused;
    first.store.save(&paused).unwrap();
    let second = fixture_with(first.store.clone(), ServiceLimits::default());
    second.manager.reconcile();
    second.manager.settle_frozen().await;
    assert_eq!(second.manager.get("box").unwrap().status, Status::Ready);
}

/// A built container `box` that pauses after `pause` seconds unused (and stops after `stop`),
/// with the idle watch running.
async fn idle_box(pause: u32, stop: Option<u32>) -> Fixture {
    let f = fixture();
    f.manager.create(container("box", "")).await.unwrap();
    f.manager.build("box", false).await.unwrap();
    f.containers.release_build.notify_one();
    wait_status(&f, "box", Status::Ready).await;
    let changes = Changes {
        idle_pause_secs: Some(pause),
        idle_stop_secs: stop,
        ..Default::default()
    };
    f.manager.update("box", changes).await.unwrap();
    tokio::spawn(f.manager.clone().watch_idle());
    f
}

#[tokio::test(start_paused = true)]
async fn an_idle_container_pauses_then_stops_and_use_resets_its_clock() {
    let f = idle_box(5, Some(20)).await;
    f.manager
        .exec("box", exec("true"), CancellationToken::new())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(f.manager.get("box").unwrap().status, Status::Ready);
    // Used again: the clock starts over.
    f.manager
        .exec("box", exec("true"), CancellationToken::new())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!(f.manager.get("box").unwrap().status, Status::Ready);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(f.manager.get("box").unwrap().status, Status::Paused);
    tokio::time::sleep(std::time::Duration::from_secs(15)).await;
    let calls = f.containers.calls();
    assert!(
        calls.ends_with(&["thaw box".into(), "stop box".into()]),
        "{calls:?}"
    );
    assert_eq!(f.manager.get("box").unwrap().status, Status::Ready);
    // Stopped: nothing more until it is used.
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    assert_eq!(f.containers.calls().len(), calls.len());
}

#[tokio::test(start_paused = true)]
async fn an_open_port_connection_keeps_a_container_from_idling() {
    let f = idle_box(5, None).await;
    let _conn = f.manager.connect_port("box", 8080).await.unwrap();
    f.containers
        .connection_open
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    assert_eq!(f.manager.get("box").unwrap().status, Status::Ready);
    // Closed: idle from then on.
    f.containers
        .connection_open
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!(f.manager.get("box").unwrap().status, Status::Ready);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(f.manager.get("box").unwrap().status, Status::Paused);
}
