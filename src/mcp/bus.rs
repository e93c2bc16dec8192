//! The MCP server's side of the bus: its connections, the workspaces it resolves, and the
//! service's errors in words.
//!
//! A call that may be cancelled (exec, a file read) runs on a connection of its own, leased
//! from a small pool and given back when the call ends: cancelling drops the connection, and the
//! service ends what it was doing for a caller that left the bus (as for any client). So a
//! cancel costs a new connection; a call that ends costs none.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use zbus::OwnedVariant;

use crate::dbus::client::{WorkspacesProxy, connect, workspace_properties};
pub use crate::dbus::client::{manager_on, workspace_id_of as id_of};

/// Spare connections kept for the next calls.
const SPARE: usize = 8;

pub struct Bus {
    address: Option<String>,
    /// For calls that are not cancelled (and the signals).
    shared: zbus::Connection,
    spare: Mutex<Vec<zbus::Connection>>,
    /// Ids of workspaces seen, with their name and type (neither ever changes for an id).
    known: Mutex<HashMap<String, (String, String)>>,
    /// What names (and ids) resolved to last, for `resolve_cached`.
    named: Mutex<HashMap<String, Resolved>>,
}

/// Entries each cache holds at most (then it starts again).
const CACHED: usize = 4096;

/// A workspace as the server checked it: calls go to its id, so the one checked is the one
/// touched even if its name is taken again meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub id: String,
    pub name: String,
    pub workspace_type: String,
    pub path: zbus::OwnedObjectPath,
}

/// A connection of one call; `give_back` returns it to the pool, dropping it closes it.
pub struct Lease(pub zbus::Connection);

impl Bus {
    pub fn new(shared: zbus::Connection, address: Option<String>) -> Self {
        Self {
            address,
            shared,
            spare: Mutex::new(Vec::new()),
            known: Mutex::new(HashMap::new()),
            named: Mutex::new(HashMap::new()),
        }
    }

    pub fn shared(&self) -> &zbus::Connection {
        &self.shared
    }

    /// A connection of its own (a subscription's signals: a reader that falls behind holds up
    /// only its own connection).
    pub async fn own(&self) -> zbus::Result<zbus::Connection> {
        connect(self.address.as_deref()).await
    }

    pub async fn lease(&self) -> zbus::Result<Lease> {
        let spare = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match spare {
            Some(c) => Ok(Lease(c)),
            None => Ok(Lease(connect(self.address.as_deref()).await?)),
        }
    }

    pub fn give_back(&self, lease: Lease) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < SPARE {
            spare.push(lease.0);
        }
    }

    pub async fn manager(&self) -> zbus::Result<WorkspacesProxy<'static>> {
        manager_on(&self.shared).await
    }

    /// Remembers the name and type of workspace `id` (as `ListWorkspaces` gave them).
    pub fn remember(&self, id: &str, name: &str, workspace_type: &str) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= CACHED {
            known.clear();
        }
        known.insert(id.to_owned(), (name.to_owned(), workspace_type.to_owned()));
    }

    /// The name and type of the workspace with id `id`, if this server has seen it.
    pub fn known(&self, id: &str) -> Option<(String, String)> {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// The workspace `key` (name or id) names now.
    pub async fn resolve(&self, key: &str) -> zbus::Result<Resolved> {
        let path = self.manager().await?.get_workspace(key).await?;
        let id = id_of(&path);
        let seen = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        let (name, workspace_type) = match seen {
            Some(k) => k,
            None => {
                let all = self.properties(&path).await?;
                let s = |k: &str| {
                    all.get(k)
                        .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
                        .unwrap_or_default()
                };
                let k = (s("Name"), s("Type"));
                let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
                if known.len() >= CACHED {
                    known.clear();
                }
                known.insert(id.clone(), k.clone());
                k
            }
        };
        Ok(Resolved {
            id,
            name,
            workspace_type,
            path,
        })
    }

    /// `resolve`, answered from what `key` resolved to last when there is that: no bus call.
    /// The answer may be stale only in naming a workspace destroyed since (ids are never
    /// reused, so it never names another): a call to it fails with `NoSuchWorkspace`, and the
    /// caller then `forget`s the key and resolves it afresh. The second value says whether it
    /// came from the cache.
    pub async fn resolve_cached(&self, key: &str) -> zbus::Result<(Resolved, bool)> {
        let cached = self
            .named
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned();
        if let Some(r) = cached {
            return Ok((r, true));
        }
        let r = self.resolve(key).await?;
        let mut named = self.named.lock().unwrap_or_else(PoisonError::into_inner);
        if named.len() >= CACHED {
            named.clear();
        }
        named.insert(key.to_owned(), r.clone());
        Ok((r, false))
    }

    pub fn forget(&self, key: &str) {
        self.named
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Every property of the workspace object at `path`.
    pub async fn properties(
        &self,
        path: &zbus::OwnedObjectPath,
    ) -> zbus::Result<HashMap<String, OwnedVariant>> {
        workspace_properties(&self.shared, path).await
    }
}

/// A failed call, as the model reads it: the service's error name (last part) and its message.
pub fn failure(e: zbus::Error) -> (String, String) {
    let name = match &e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(f) => zbus::DBusError::name(f.as_ref()).to_string(),
        _ => "BusError".to_owned(),
    };
    let code = name.rsplit('.').next().unwrap_or_default().to_owned();
    (code, crate::core::Error::from(e).to_string())
}
