//! Keeps the bus objects in step with the core: one object per workspace, added and removed as
//! the core reports, with `PropertiesChanged` and the manager's signals. Events are applied in
//! order by one task; a method that changed something waits (`flush`) until its events are on
//! the bus before it replies, so a client that gets the reply can use the object at once.

use tokio::sync::{mpsc, oneshot};
use tracing::warn;
use zbus::object_server::InterfaceRef;
use zbus::{Connection, OwnedObjectPath};

use super::context::Context;
use super::manager::{MANAGER_PATH, ManagerObject};
use super::process::{ProcessObject, process_path};
use super::workspace::WorkspaceObject;
use crate::core::names::bus_label_escape;
use crate::core::ports::{Event, Events};
use crate::core::workspace::Field;

/// `/org/agent/Workspaces/workspace/<bus-label-escaped id>`.
pub fn workspace_path(id: &str) -> OwnedObjectPath {
    let path = format!("{MANAGER_PATH}/workspace/{}", bus_label_escape(id));
    // The escaped label holds only [A-Za-z0-9_], so the path is always valid.
    OwnedObjectPath::try_from(path).unwrap_or_else(|_| {
        OwnedObjectPath::try_from(MANAGER_PATH).expect("constant path is valid")
    })
}

enum Msg {
    Event(Event),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct EventQueue {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Events for EventQueue {
    fn emit(&self, event: Event) {
        let _ = self.tx.send(Msg::Event(event));
    }
}

impl EventQueue {
    pub fn new() -> (Self, EventReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, EventReceiver { rx })
    }

    /// Returns once every event emitted before this call is on the bus.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

pub struct EventReceiver {
    rx: mpsc::UnboundedReceiver<Msg>,
}

impl EventReceiver {
    /// Serves the objects of the workspaces that exist now, then applies events until the queue
    /// closes.
    pub async fn run(mut self, conn: Connection, ctx: Context) {
        for ws in ctx.manager.list() {
            add(&conn, &ctx, &ws.id).await;
        }
        while let Some(msg) = self.rx.recv().await {
            match msg {
                Msg::Flush(done) => {
                    let _ = done.send(());
                }
                Msg::Event(event) => {
                    if let Err(e) = apply(&conn, &ctx, event).await {
                        warn!("Cannot update the bus objects: {e}");
                    }
                }
            }
        }
    }
}

async fn add(conn: &Connection, ctx: &Context, id: &str) -> bool {
    let object = WorkspaceObject::new(id.to_owned(), ctx.clone());
    match conn.object_server().at(workspace_path(id), object).await {
        Ok(existing) => existing.is_none(),
        Err(e) => {
            warn!(
                workspace_id = id,
                "Cannot serve the object of workspace {id}: {e}"
            );
            false
        }
    }
}

async fn manager_ref(conn: &Connection) -> zbus::Result<InterfaceRef<ManagerObject>> {
    conn.object_server()
        .interface::<_, ManagerObject>(MANAGER_PATH)
        .await
}

async fn apply(conn: &Connection, ctx: &Context, event: Event) -> zbus::Result<()> {
    match event {
        Event::Added { id } => {
            if add(conn, ctx, &id).await {
                let m = manager_ref(conn).await?;
                ManagerObject::workspace_new(m.signal_emitter(), &id, workspace_path(&id)).await?;
            }
        }
        Event::Removed { id } => {
            let path = workspace_path(&id);
            if conn
                .object_server()
                .remove::<WorkspaceObject, _>(&path)
                .await?
            {
                let m = manager_ref(conn).await?;
                ManagerObject::workspace_removed(m.signal_emitter(), &id, path).await?;
            }
        }
        Event::ProcessAdded { id, process } => {
            let object = ProcessObject::new(id.clone(), process, ctx.clone());
            conn.object_server()
                .at(process_path(&id, process), object)
                .await?;
        }
        Event::ProcessExited { id, process } => {
            let Ok(info) = ctx.manager.process_info(&id, process) else {
                // Forgotten since; its `ProcessRemoved` event follows.
                return Ok(());
            };
            let iface = conn
                .object_server()
                .interface::<_, ProcessObject>(process_path(&id, process))
                .await?;
            let object = iface.get().await;
            let emitter = iface.signal_emitter();
            object.running_changed(emitter).await?;
            object.exit_code_changed(emitter).await?;
            object.ended_at_changed(emitter).await?;
            ProcessObject::process_exited(emitter, info.exit_code).await?;
        }
        Event::Restored { id, snapshot } => {
            let iface = conn
                .object_server()
                .interface::<_, WorkspaceObject>(workspace_path(&id))
                .await?;
            WorkspaceObject::restored(iface.signal_emitter(), &snapshot).await?;
        }
        Event::ProcessRemoved { id, process } => {
            conn.object_server()
                .remove::<ProcessObject, _>(process_path(&id, process))
                .await?;
        }
        Event::Changed { id, fields } => {
            if ctx.manager.get(&id).is_err() {
                // Removed since; its `Removed` event follows.
                return Ok(());
            }
            let iface = conn
                .object_server()
                .interface::<_, WorkspaceObject>(workspace_path(&id))
                .await?;
            let object = iface.get().await;
            let emitter = iface.signal_emitter();
            for field in fields {
                match field {
                    Field::Status => object.status_changed(emitter).await?,
                    Field::ErrorMessage => object.error_message_changed(emitter).await?,
                    Field::EnvVarNames => object.env_var_names_changed(emitter).await?,
                    Field::Skills => object.skills_changed(emitter).await?,
                    Field::Tools => object.tools_changed(emitter).await?,
                    Field::Network => object.network_changed(emitter).await?,
                    Field::Egress => {
                        object.egress_allow_changed(emitter).await?;
                        object.egress_deny_changed(emitter).await?;
                    }
                    Field::BuildStep => object.build_step_changed(emitter).await?,
                    Field::Snapshots => object.snapshots_changed(emitter).await?,
                    Field::Limits => {
                        object.idle_pause_secs_changed(emitter).await?;
                        object.idle_stop_secs_changed(emitter).await?;
                        object.memory_max_changed(emitter).await?;
                        object.c_p_u_quota_percent_changed(emitter).await?;
                        object.tasks_max_changed(emitter).await?;
                    }
                }
            }
        }
    }
    Ok(())
}
