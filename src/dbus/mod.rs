//! The D-Bus face of the service: `org.agent.Workspaces` on the system bus. The only module
//! that knows about D-Bus. Startup order (as machined does it): serve every object, then take
//! the bus name; the daemon then tells systemd it is ready.

pub mod args;
pub mod auth;
pub mod client;
pub mod context;
pub mod error;
pub mod manager;
pub mod objects;
pub mod workspace;

use std::sync::Arc;

use zbus::Connection;

pub use manager::{BUS_NAME, MANAGER_PATH};

use crate::core::Manager;
use context::{Context, Disconnects};
use objects::{EventQueue, EventReceiver};

/// Serves the manager, the ObjectManager and one object per workspace on `conn`, and keeps
/// them in step with `manager`. Does not request the bus name.
pub async fn serve(
    conn: &Connection,
    manager: Arc<Manager>,
    events: EventQueue,
    receiver: EventReceiver,
) -> zbus::Result<()> {
    let ctx = Context {
        manager,
        auth: auth::Authorizer::new(conn).await?,
        disconnects: Disconnects::watch(conn).await?,
        events: events.clone(),
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
