//! Templates from the Library and how a create request is merged over one.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::spec::CreateSpec;

/// `workspace-template/<name>.json` in the Library.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub distro: Option<String>,
    #[serde(default)]
    pub workspace_type: Option<String>,
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default)]
    pub init_script: Option<String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub egress_allow: Option<Vec<String>>,
    #[serde(default)]
    pub egress_deny: Option<Vec<String>>,
    #[serde(default)]
    pub memory_max: Option<u64>,
    #[serde(default)]
    pub cpu_quota_percent: Option<u32>,
    #[serde(default)]
    pub tasks_max: Option<u64>,
}

fn union(base: &[String], extra: Option<Vec<String>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in base.iter().cloned().chain(extra.unwrap_or_default()) {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// The template supplies defaults, the request overrides them: env vars merged over the
/// template's, skills and tools united without duplicates, `init_script` and `distro` replaced.
/// A template means a container workspace unless the request says otherwise, and it builds at
/// once unless the request says `build_on_create = false`.
pub fn merge(t: &Template, request: CreateSpec) -> CreateSpec {
    let mut env = t.env_vars.clone();
    env.extend(request.env_vars.unwrap_or_default());
    let workspace_type = request
        .workspace_type
        .or_else(|| t.workspace_type.clone())
        .or_else(|| Some("container".to_owned()));
    let container = workspace_type.as_deref() == Some("container");
    CreateSpec {
        name: request.name,
        distro: request.distro.or_else(|| t.distro.clone()),
        env_vars: Some(env),
        init_script: request.init_script.or_else(|| t.init_script.clone()),
        skills: Some(union(&t.skills, request.skills)),
        tools: Some(union(&t.tools, request.tools)),
        template: Some(t.name.clone()),
        path: request.path,
        build_on_create: request.build_on_create.or(container.then_some(true)),
        network: request
            .network
            .or_else(|| t.network.clone().filter(|_| container)),
        egress_allow: request
            .egress_allow
            .or_else(|| t.egress_allow.clone().filter(|_| container)),
        egress_deny: request
            .egress_deny
            .or_else(|| t.egress_deny.clone().filter(|_| container)),
        memory_max: request.memory_max.or(t.memory_max.filter(|_| container)),
        cpu_quota_percent: request
            .cpu_quota_percent
            .or(t.cpu_quota_percent.filter(|_| container)),
        tasks_max: request.tasks_max.or(t.tasks_max.filter(|_| container)),
        idle_pause_secs: request.idle_pause_secs,
        idle_stop_secs: request.idle_stop_secs,
        workspace_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            name: "fullstack".into(),
            description: "Node and Python".into(),
            distro: Some("ubuntu-noble".into()),
            skills: vec!["python-dev".into(), "web".into()],
            tools: vec!["lint".into()],
            env_vars: [("A".into(), "t".into()), ("B".into(), "t".into())].into(),
            init_script: Some("echo template".into()),
            ..Default::default()
        }
    }

    #[test]
    fn request_overrides_and_unites() {
        let m = merge(
            &template(),
            CreateSpec {
                name: Some("app".into()),
                env_vars: Some([("B".into(), "r".into()), ("C".into(), "r".into())].into()),
                skills: Some(vec!["web".into(), "docs".into()]),
                distro: Some("debian-bookworm".into()),
                ..Default::default()
            },
        );
        let env = m.env_vars.unwrap();
        assert_eq!(
            (env["A"].as_str(), env["B"].as_str(), env["C"].as_str()),
            ("t", "r", "r")
        );
        assert_eq!(
            m.skills.unwrap(),
            ["python-dev", "web", "docs"],
            "no duplicates, template first"
        );
        assert_eq!(m.tools.unwrap(), ["lint"]);
        assert_eq!(m.distro.as_deref(), Some("debian-bookworm"), "replaced");
        assert_eq!(
            m.init_script.as_deref(),
            Some("echo template"),
            "kept when not given"
        );
        assert_eq!(m.workspace_type.as_deref(), Some("container"));
        assert_eq!(m.build_on_create, Some(true));
        assert_eq!(m.template.as_deref(), Some("fullstack"));
    }

    #[test]
    fn a_host_request_takes_no_container_settings() {
        let mut t = template();
        t.memory_max = Some(1 << 30);
        t.distro = None;
        let m = merge(
            &t,
            CreateSpec {
                name: Some("h".into()),
                workspace_type: Some("host".into()),
                ..Default::default()
            },
        );
        assert_eq!(m.workspace_type.as_deref(), Some("host"));
        assert_eq!((m.build_on_create, m.memory_max), (None, None));
    }

    #[test]
    fn templates_parse_strictly() {
        let t: Template = serde_json::from_str(
            r#"{"name":"x","description":"d","distro":"debian-bookworm","skills":["a"],"tools":[],"env_vars":{"K":"v"},"init_script":"true"}"#,
        )
        .unwrap();
        assert_eq!(t.skills, ["a"]);
        assert!(serde_json::from_str::<Template>(r#"{"name":"x","colour":"red"}"#).is_err());
    }
}
