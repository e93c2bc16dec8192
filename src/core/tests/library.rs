//! The Library: skills, tools and templates.

use crate::core::error::Error;
use crate::core::spec::{Changes, CreateSpec};
use crate::core::workspace::Status;

use super::*;

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
