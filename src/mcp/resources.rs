//! Resources: `workspaces://list` (the workspaces this server may use), and per workspace
//! `workspace://NAME` (its record), `workspace://NAME/init-log` and `workspace://NAME/debug`.
//! A client that subscribes to one is told when it changes: the service's signals
//! (`WorkspaceNew`, `WorkspaceRemoved`, each workspace's `PropertiesChanged`) are followed
//! from the first subscription of a session to its end.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use rmcp::model::{
    ListResourceTemplatesResult, ListResourcesResult, ReadResourceResult, Resource,
    ResourceContents, ResourceTemplate, ResourceUpdatedNotificationParam,
};
use rmcp::service::Peer;
use rmcp::{ErrorData, RoleServer};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::output::HeadTail;
use super::{Policy, Shared, ToolError};
use crate::dbus::client::{dict_json, workspace_json};
use crate::dbus::{BUS_NAME, MANAGER_PATH};

pub const LIST: &str = "workspaces://list";
const PREFIX: &str = "workspace://";

/// What a URI names.
#[derive(Debug, PartialEq, Eq)]
enum Named<'a> {
    List,
    Record(&'a str),
    InitLog(&'a str),
    Debug(&'a str),
}

fn parse(uri: &str) -> Option<Named<'_>> {
    if uri == LIST {
        return Some(Named::List);
    }
    let rest = uri.strip_prefix(PREFIX)?;
    let (name, what) = rest.split_once('/').unwrap_or((rest, ""));
    if name.is_empty() {
        return None;
    }
    match what {
        "" => Some(Named::Record(name)),
        "init-log" => Some(Named::InitLog(name)),
        "debug" => Some(Named::Debug(name)),
        _ => None,
    }
}

fn not_found(uri: &str, why: impl std::fmt::Display) -> ErrorData {
    ErrorData::resource_not_found(format!("{uri}: {why}"), None)
}

/// The workspaces the policy lets this server show, as the list tool and resource give them.
pub async fn shown(shared: &Shared, policy: &Policy) -> Result<Vec<Value>, ToolError> {
    let m = shared.bus.manager().await.map_err(ToolError::bus)?;
    let all = m.list_workspaces().await.map_err(ToolError::bus)?;
    for (id, name, ty, _, _) in &all {
        shared.bus.remember(id, name, ty);
    }
    Ok(all
        .into_iter()
        .filter(|(_, name, ty, _, _)| policy.check_workspace(name, ty).is_ok())
        .map(|(id, name, ty, status, _)| {
            json!({"name": name, "id": id, "workspace_type": ty, "status": status})
        })
        .collect())
}

pub async fn list(shared: &Shared, policy: &Policy) -> Result<ListResourcesResult, ErrorData> {
    let shown = shown(shared, policy)
        .await
        .map_err(|e| ErrorData::internal_error(e.message, None))?;
    let mut all = vec![
        Resource::new(LIST, "workspaces")
            .with_description("The workspaces this server may use: name, type, status.")
            .with_mime_type("application/json"),
    ];
    for w in &shown {
        let name = w["name"].as_str().unwrap_or_default();
        all.push(
            Resource::new(format!("{PREFIX}{name}"), format!("workspace {name}"))
                .with_description("The workspace's record: status, error, settings.")
                .with_mime_type("application/json"),
        );
        if w["workspace_type"] == "container" {
            all.push(
                Resource::new(
                    format!("{PREFIX}{name}/init-log"),
                    format!("{name} init log"),
                )
                .with_description("The build's and the init script's output.")
                .with_mime_type("text/plain"),
            );
        }
    }
    Ok(ListResourcesResult::with_all_items(all))
}

pub fn templates() -> ListResourceTemplatesResult {
    ListResourceTemplatesResult::with_all_items(vec![
        ResourceTemplate::new("workspace://{name}", "workspace")
            .with_description("A workspace's record (JSON).")
            .with_mime_type("application/json"),
        ResourceTemplate::new("workspace://{name}/init-log", "init log")
            .with_description("A container workspace's init log: the build and the init script.")
            .with_mime_type("text/plain"),
        ResourceTemplate::new("workspace://{name}/debug", "debug report")
            .with_description(
                "A workspace's debug report: its unit, machine, tree and last errors (JSON).",
            )
            .with_mime_type("application/json"),
    ])
}

fn json_contents(uri: &str, v: &Value) -> ReadResourceResult {
    ReadResourceResult::new(vec![
        ResourceContents::text(serde_json::to_string_pretty(v).unwrap_or_default(), uri)
            .with_mime_type("application/json"),
    ])
}

pub async fn read(
    shared: &Shared,
    policy: &Policy,
    uri: &str,
) -> Result<ReadResourceResult, ErrorData> {
    let named = parse(uri).ok_or_else(|| not_found(uri, "no such resource"))?;
    let name = match named {
        Named::List => {
            let shown = shown(shared, policy)
                .await
                .map_err(|e| ErrorData::internal_error(e.message, None))?;
            return Ok(json_contents(uri, &json!({"workspaces": shown})));
        }
        Named::Record(n) | Named::InitLog(n) | Named::Debug(n) => n,
    };
    let ws = shared
        .bus
        .resolve(name)
        .await
        .map_err(|e| not_found(uri, ToolError::bus(e).message))?;
    policy
        .check_workspace(&ws.name, &ws.workspace_type)
        .map_err(|r| not_found(uri, r))?;
    let failed = |e: zbus::Error| ErrorData::internal_error(ToolError::bus(e).message, None);
    match named {
        Named::Record(_) => {
            let props = shared.bus.properties(&ws.path).await.map_err(failed)?;
            Ok(json_contents(uri, &workspace_json(&props)))
        }
        Named::InitLog(_) => {
            let m = shared.bus.manager().await.map_err(failed)?;
            let (log, _) = m.get_init_log(&ws.id, 0).await.map_err(failed)?;
            let mut kept = HeadTail::new(policy.max_output_bytes as usize);
            kept.push(log.as_bytes());
            Ok(ReadResourceResult::new(vec![ResourceContents::text(
                kept.finish("the init log").text,
                uri,
            )]))
        }
        Named::Debug(_) => {
            let m = shared.bus.manager().await.map_err(failed)?;
            let d = m.get_debug_info(&ws.id).await.map_err(failed)?;
            Ok(json_contents(uri, &dict_json(&d)))
        }
        Named::List => unreachable!("answered above"),
    }
}

/// A session's subscriptions, and the task that follows the service's signals for them.
pub struct Subscriptions {
    shared: Arc<Shared>,
    uris: Arc<Mutex<BTreeSet<String>>>,
    follower: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        if let Some(t) = self
            .follower
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            t.abort();
        }
    }
}

/// How long one notification may wait for a client that does not read: then it is dropped.
const NOTIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Subscriptions {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            uris: Arc::default(),
            follower: Mutex::new(None),
        }
    }

    pub async fn subscribe(
        &self,
        policy: &Policy,
        uri: String,
        peer: Peer<RoleServer>,
    ) -> Result<(), ErrorData> {
        // Only what this caller may be shown: reading it is the check.
        read(&self.shared, policy, &uri).await?;
        self.uris
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uri);
        let mut follower = self.follower.lock().unwrap_or_else(PoisonError::into_inner);
        if follower.as_ref().is_none_or(JoinHandle::is_finished) {
            let follow = Follower {
                shared: self.shared.clone(),
                policy: policy.clone(),
                uris: self.uris.clone(),
                peer,
            };
            *follower = Some(tokio::spawn(follow.run()));
        }
        Ok(())
    }

    pub fn unsubscribe(&self, uri: &str) {
        self.uris
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uri);
    }
}

/// Follows the service's signals for one session, on a connection of its own, and tells the
/// client of the changes it subscribed to and may see.
struct Follower {
    shared: Arc<Shared>,
    /// The limits of the caller that subscribed first.
    policy: Policy,
    uris: Arc<Mutex<BTreeSet<String>>>,
    peer: Peer<RoleServer>,
}

impl Follower {
    async fn run(self) {
        let Ok(conn) = self.shared.bus.own().await else {
            return;
        };
        let Ok(mut stream) = signals(conn).await else {
            return;
        };
        while let Some(Ok(msg)) = stream.next().await {
            let header = msg.header();
            let member = header.member().map(|m| m.to_string()).unwrap_or_default();
            let changed = match member.as_str() {
                "WorkspaceNew" | "WorkspaceRemoved" => {
                    let Ok((id, _)) = msg.body().deserialize::<(String, zbus::OwnedObjectPath)>()
                    else {
                        continue;
                    };
                    if self.hidden(&id).await {
                        continue;
                    }
                    let _ =
                        tokio::time::timeout(NOTIFY_WAIT, self.peer.notify_resource_list_changed())
                            .await;
                    vec![LIST.to_owned()]
                }
                "PropertiesChanged" | "Restored" => {
                    let path = header.path().map(|p| p.to_string()).unwrap_or_default();
                    let Some(id) = path
                        .strip_prefix(&format!("{MANAGER_PATH}/workspace/"))
                        .filter(|rest| !rest.contains('/'))
                        .and_then(crate::core::names::bus_label_unescape)
                    else {
                        continue;
                    };
                    let Some((name, _)) = self.visible(&id).await else {
                        continue;
                    };
                    let base = format!("{PREFIX}{name}");
                    vec![
                        format!("{base}/init-log"),
                        format!("{base}/debug"),
                        base,
                        LIST.to_owned(),
                    ]
                }
                _ => continue,
            };
            let subscribed: Vec<String> = {
                let uris = self.uris.lock().unwrap_or_else(PoisonError::into_inner);
                changed.into_iter().filter(|u| uris.contains(u)).collect()
            };
            for uri in subscribed {
                let sent = tokio::time::timeout(
                    NOTIFY_WAIT,
                    self.peer
                        .notify_resource_updated(ResourceUpdatedNotificationParam::new(uri)),
                )
                .await;
                if let Ok(Err(_)) = sent {
                    return; // the session ended
                }
            }
        }
    }

    /// The name and type of workspace `id` when this caller may see it (from what the server
    /// has seen, else asked once).
    async fn visible(&self, id: &str) -> Option<(String, String)> {
        let (name, ty) = match self.shared.bus.known(id) {
            Some(k) => k,
            None => {
                let ws = self.shared.bus.resolve(id).await.ok()?;
                (ws.name, ws.workspace_type)
            }
        };
        self.policy.check_workspace(&name, &ty).ok()?;
        Some((name, ty))
    }

    /// Whether a workspace that came or went is one this caller may not see (one never seen
    /// and gone already is not told of).
    async fn hidden(&self, id: &str) -> bool {
        self.visible(id).await.is_none()
    }
}

/// Every signal the service sends below its manager's path.
async fn signals(conn: zbus::Connection) -> zbus::Result<zbus::MessageStream> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .path_namespace(MANAGER_PATH)
        .build()?;
    zbus::MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(256)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_a_workspace_and_what_of_it() {
        assert_eq!(parse("workspaces://list"), Some(Named::List));
        assert_eq!(parse("workspace://box"), Some(Named::Record("box")));
        assert_eq!(
            parse("workspace://box/init-log"),
            Some(Named::InitLog("box"))
        );
        assert_eq!(parse("workspace://box/debug"), Some(Named::Debug("box")));
        assert_eq!(parse("workspace://box/etc/passwd"), None);
        assert_eq!(parse("workspace://"), None);
        assert_eq!(parse("file:///etc/passwd"), None);
    }
}
