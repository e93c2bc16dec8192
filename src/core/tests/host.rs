//! Host workspaces: create, update, destroy, names, commands and their limits, recovery.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::core::error::Error;
use crate::core::ports::*;
use crate::core::spec::{Changes, ExecLimits, ServiceLimits};
use crate::core::workspace::Status;

use super::*;

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

#[tokio::test]
async fn an_ended_processs_output_is_let_go_though_something_that_left_it_still_writes() {
    use std::sync::atomic::Ordering;
    let f = fixture();
    let id = f
        .manager
        .start_process("host", "escape".into(), Default::default(), None, None)
        .await
        .unwrap();
    let (_, timed_out) = f
        .manager
        .wait_process("host", id, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(!timed_out, "the process ended");
    // Its output is complete (the reader stopped) and the writer that outlived it is cut off
    // (the service's end was closed), within the drain: not when the writer chooses to stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !crate::core::fakes::ESCAPED_WRITER_CUT.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the late writer still writes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, _, complete) = f.manager.read_output("host", id, u64::MAX, 0).unwrap();
    assert!(complete, "its output is over");
}
