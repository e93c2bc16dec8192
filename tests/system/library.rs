//! The Library: skills, tools and templates into host and container workspaces.

use std::time::Duration;

use zbus::Variant;

use super::*;

fn mode_of(path: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_gives_workspaces_their_skills_tools_and_templates() {
    require_test_host();
    let library = write_library();
    let conn = bus().await;
    let m = manager(&conn).await;

    // A host workspace gets exactly its skills and tools, with their modes.
    let name = unique("lib");
    let skills = Variant::from(vec!["python-dev", "web"]);
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(name.as_str())),
            ("skills", skills),
            ("tools", Variant::from(vec!["lint"])),
        ]))
        .await
        .unwrap();
    let ws = workspace(&conn, &path).await;
    let dir = ws.path().await.unwrap();
    assert_eq!(
        ok(&format!("ls {dir}/.opencode/skill")),
        "python-dev\nweb\n"
    );
    assert_eq!(ok(&format!("ls {dir}/.opencode/tool")), "lint\n");
    assert_eq!(
        mode_of(&format!("{dir}/.opencode/skill/python-dev/scripts/run.sh")),
        0o755
    );
    assert_eq!(mode_of(&format!("{dir}/.opencode/tool/lint")), 0o755);

    // Removing a skill from the list and syncing removes it; Sync reads the Library afresh.
    m.update_workspace(&name, spec(vec![("skills", Variant::from(vec!["web"]))]))
        .await
        .unwrap();
    std::fs::write(library.join("skill/web/SKILL.md"), "# Web v2\n").unwrap();
    m.sync_workspace(&name).await.unwrap();
    assert_eq!(ok(&format!("ls {dir}/.opencode/skill")), "web\n");
    assert_eq!(
        ok(&format!("cat {dir}/.opencode/skill/web/SKILL.md")),
        "# Web v2\n"
    );

    // The default host workspace gets every skill of the Library.
    m.sync_workspace("host").await.unwrap();
    assert_eq!(
        ok(&format!("ls {STATE}/host/.opencode/skill")),
        "python-dev\nweb\n"
    );

    // Names that leave the Library or the workspace, and unknown entries: refused, no change.
    let before = m.list_workspaces().await.unwrap();
    let invalid = "org.freedesktop.DBus.Error.InvalidArgs";
    for bad in ["../../etc", "/etc", "..", ".hidden"] {
        assert_error(
            m.create_workspace(spec(vec![
                ("name", Variant::from("escape")),
                ("skills", Variant::from(vec![bad])),
            ]))
            .await,
            invalid,
            "'skills'",
        );
    }
    assert_error(
        m.update_workspace(
            &name,
            spec(vec![("tools", Variant::from(vec!["../tool/lint"]))]),
        )
        .await,
        invalid,
        "'tools'",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("unknown")),
            ("skills", Variant::from(vec!["nope"])),
        ]))
        .await,
        "org.agent.Workspaces.Error.NoSuchSkill",
        "nope",
    );
    assert_error(
        m.create_workspace(spec(vec![
            ("name", Variant::from("unknown")),
            ("template", Variant::from("nope")),
        ]))
        .await,
        "org.agent.Workspaces.Error.NoSuchTemplate",
        "nope",
    );
    assert_eq!(m.list_workspaces().await.unwrap(), before);
    assert_eq!(
        ok(&format!("ls {dir}/.opencode/tool")),
        "lint\n",
        "unchanged"
    );

    // Templates: the malformed one is left out of the list and reported when asked for.
    let templates = m.list_templates().await.unwrap();
    assert_eq!(
        templates,
        [(
            "fullstack".to_string(),
            "Web and Python".to_string(),
            "debian-bookworm".to_string()
        )]
    );
    let t = m.get_template("fullstack").await.unwrap();
    assert_eq!(
        Vec::<String>::try_from(t["env_var_names"].try_clone().unwrap()).unwrap(),
        ["FROM_TEMPLATE"],
        "names only, no values"
    );
    let broken = m.get_template("broken").await;
    assert_error(
        broken,
        "org.agent.Workspaces.Error.LibraryError",
        "malformed template 'broken'",
    );

    // A container created from the template builds at once with its init script, merged env,
    // skills and tools.
    let boxed = unique("tpl");
    let path = m
        .create_workspace(spec(vec![
            ("name", Variant::from(boxed.as_str())),
            ("template", Variant::from("fullstack")),
            ("env_vars", env_variant(&[("MINE", "1")])),
            ("skills", Variant::from(vec!["python-dev"])),
        ]))
        .await
        .unwrap();
    assert_eq!(
        wait_built(&conn, &boxed, Duration::from_secs(600)).await,
        "ready"
    );
    let from_template = workspace(&conn, &path).await;
    assert_eq!(from_template.workspace_type().await.unwrap(), "container");
    let template_prop: String = from_template
        .inner()
        .get_property("Template")
        .await
        .unwrap();
    assert_eq!(template_prop, "fullstack");
    let (code, out, err, ..) = m
        .exec(
            &boxed,
            "cat /workspace/template-env; echo $MINE $FROM_TEMPLATE; ls /workspace/.opencode/skill /workspace/.opencode/tool",
            no_options(),
        )
        .await
        .unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "yes\n1 yes\n/workspace/.opencode/skill:\npython-dev\nweb\n\n/workspace/.opencode/tool:\nlint\n"
    );

    for n in [&name, &boxed] {
        m.destroy_workspace(n).await.unwrap();
    }
    std::fs::remove_dir_all(&library).unwrap();
}
