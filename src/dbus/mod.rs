//! The D-Bus face of the service: `org.agent.Workspaces` on the system bus. The only module
//! that knows about D-Bus. Startup order (as machined does it): serve every object, then take
//! the bus name; the daemon then tells systemd it is ready.

pub mod args;
pub mod auth;
pub mod client;
pub mod context;
pub mod error;
pub mod error_data;
pub mod files;
pub mod manager;
pub mod objects;
pub mod process;
pub mod schema;
pub mod workspace;

use std::sync::Arc;

use zbus::Connection;

pub use manager::{BUS_NAME, MANAGER_PATH};

use crate::core::Manager;
use context::{Context, Disconnects};
pub use error_data::ErrorData;
use objects::{EventQueue, EventReceiver};

/// Serves the manager, the ObjectManager and one object per workspace on `conn`, and keeps
/// them in step with `manager`. Does not request the bus name.
/// `error_data` keeps which callers want their errors' data (`error_data.rs`).
pub async fn serve(
    conn: &Connection,
    manager: Arc<Manager>,
    events: EventQueue,
    receiver: EventReceiver,
    error_data: ErrorData,
) -> zbus::Result<()> {
    let auth = auth::Authorizer::polkit(conn).await?;
    serve_with(conn, manager, events, receiver, auth, error_data).await
}

/// `serve`, with the authorizer given (the contract tests give a fake one).
pub async fn serve_with(
    conn: &Connection,
    manager: Arc<Manager>,
    events: EventQueue,
    receiver: EventReceiver,
    auth: auth::Authorizer,
    error_data: ErrorData,
) -> zbus::Result<()> {
    let ctx = Context {
        manager,
        auth,
        disconnects: Disconnects::watch(conn, error_data.clone()).await?,
        events: events.clone(),
        error_data,
    };
    let server = conn.object_server();
    server.at(MANAGER_PATH, zbus::fdo::ObjectManager).await?;
    server
        .at(MANAGER_PATH, manager::ManagerObject::new(ctx.clone()))
        .await?;
    tokio::spawn(receiver.run(conn.clone(), ctx));
    // Objects of the existing workspaces are served before the caller takes the name.
    events.flush().await;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod policy_tests {
    use std::collections::BTreeSet;

    fn read(path: &str) -> String {
        std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    /// The bus policy lets callers reach every method of the interface file, and only those:
    /// a method missing from the policy would be refused by dbus-daemon before polkit is asked.
    #[test]
    fn the_bus_policy_allows_exactly_the_documented_methods() {
        let xml = read("dbus/org.agent.Workspaces.xml");
        let options = roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        };
        let doc = roxmltree::Document::parse_with_options(&xml, options).unwrap();
        let mut methods = BTreeSet::new();
        for iface in doc.descendants().filter(|n| n.has_tag_name("interface")) {
            for m in iface.children().filter(|n| n.has_tag_name("method")) {
                methods.insert(format!(
                    "{}.{}",
                    iface.attribute("name").unwrap(),
                    m.attribute("name").unwrap()
                ));
            }
        }
        let conf = read("dbus/org.agent.Workspaces.conf");
        let doc = roxmltree::Document::parse_with_options(&conf, options).unwrap();
        let allowed: BTreeSet<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("allow"))
            .filter(|n| n.attribute("send_destination") == Some(super::BUS_NAME))
            .filter_map(|n| {
                let iface = n.attribute("send_interface")?;
                let member = n.attribute("send_member")?;
                iface
                    .starts_with(super::BUS_NAME)
                    .then(|| format!("{iface}.{member}"))
            })
            .collect();
        assert_eq!(allowed, methods);
    }

    /// Every action the service asks polkit about is shipped in the policy file, and the file
    /// ships no other: polkit refuses an action it does not know.
    #[test]
    fn the_policy_file_has_exactly_the_actions_asked_for() {
        use super::auth::Action;
        let policy = read("polkit/org.agent.workspaces.policy");
        let shipped: BTreeSet<&str> = policy
            .split("<action id=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .collect();
        let asked: BTreeSet<&str> = [
            Action::Manage,
            Action::Exec,
            Action::ExecHost,
            Action::ReadFiles,
        ]
        .into_iter()
        .map(Action::id)
        .collect();
        assert_eq!(shipped, asked);
    }
}
