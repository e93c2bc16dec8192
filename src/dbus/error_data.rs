//! The callers that asked (`SetErrorData`) for each error's data after its message.
//!
//! Every error reply's body is one string, its message: GLib (gdbus, Gio, every GNOME
//! program) reads a message only from a body of exactly one string, and sd-bus, Qt,
//! dbus-python and zbus read it from there too. The service's own clients want the data as
//! well (the key an `InvalidArgs` is about, for REST's `field`), so a caller may ask for it:
//! from then on its errors carry the message followed by the data strings (`dbus/error.rs`).
//!
//! Asked once per connection, the wish lasts as long as the caller's connection, as
//! systemd's `Subscribe` does: a caller that leaves the bus is forgotten (`Disconnects`), and
//! the list is kept on disk with the bus's id, so a restarted service keeps the wishes of the
//! callers still connected to the same bus (a client of the bridge gets its `field` before
//! and after a restart of the service alike). Unique names are never reused on one bus.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::error::Error;

/// At most this many callers at once (a system bus allows 256 connections per user).
pub const MAX_CALLERS: usize = 4096;

#[derive(Clone, Default)]
pub struct ErrorData {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    callers: BTreeSet<String>,
    /// Where the list is kept, and the bus it belongs to (none in the contract tests).
    file: Option<(PathBuf, String)>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    bus_id: String,
    callers: BTreeSet<String>,
}

impl ErrorData {
    /// The list kept at `path`: what it held for this bus (`bus_id`), less the callers that
    /// are no longer connected (`connected` tells).
    pub async fn kept(path: PathBuf, conn: &zbus::Connection) -> zbus::Result<Self> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let bus_id = dbus.get_id().await?.to_string();
        let mut callers = BTreeSet::new();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) if saved.bus_id == bus_id => {
                    for name in saved.callers.into_iter().take(MAX_CALLERS) {
                        let Ok(bus_name) = zbus::names::BusName::try_from(name.as_str()) else {
                            continue;
                        };
                        if dbus.name_has_owner(bus_name).await.unwrap_or(false) {
                            callers.insert(name);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => warn!("Ignoring {}: {e}", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("Cannot read {}: {e}", path.display()),
        }
        let this = Self {
            inner: Arc::new(Mutex::new(Inner {
                callers,
                file: Some((path, bus_id)),
            })),
        };
        this.lock().save();
        Ok(this)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `sender`'s errors carry their data.
    pub fn wants(&self, sender: &str) -> bool {
        self.lock().callers.contains(sender)
    }

    /// Gives `sender`'s errors their data from now on, or stops.
    pub fn set(&self, sender: &str, on: bool) -> Result<(), Error> {
        let mut inner = self.lock();
        let changed = if on {
            if inner.callers.len() >= MAX_CALLERS && !inner.callers.contains(sender) {
                return Err(Error::LimitsExceeded(format!(
                    "{MAX_CALLERS} callers have asked for error data already"
                )));
            }
            inner.callers.insert(sender.to_owned())
        } else {
            inner.callers.remove(sender)
        };
        if changed {
            inner.save();
        }
        Ok(())
    }

    /// Whether no other caller can be listed.
    pub fn is_full(&self) -> bool {
        self.lock().callers.len() >= MAX_CALLERS
    }

    /// The callers listed now.
    pub fn callers(&self) -> Vec<String> {
        self.lock().callers.iter().cloned().collect()
    }

    /// A caller that left the bus.
    pub fn forget(&self, sender: &str) {
        let mut inner = self.lock();
        if inner.callers.remove(sender) {
            inner.save();
        }
    }
}

impl Inner {
    /// Writes the list whole (a new file renamed over the old), so a crash leaves one or the
    /// other; a failure costs only the wishes of a restart, and is logged.
    fn save(&self) {
        let Some((path, bus_id)) = &self.file else {
            return;
        };
        let saved = Saved {
            bus_id: bus_id.clone(),
            callers: self.callers.clone(),
        };
        let new = path.with_extension("new");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&new, bytes))
            .and_then(|()| std::fs::rename(&new, path));
        if let Err(e) = written {
            warn!(
                "Cannot keep the callers that want error data in {}: {e}",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wish_lasts_until_the_caller_stops_or_leaves() {
        let data = ErrorData::default();
        assert!(!data.wants(":1.7"));
        data.set(":1.7", true).unwrap();
        data.set(":1.8", true).unwrap();
        assert!(data.wants(":1.7") && data.wants(":1.8"));
        data.set(":1.7", false).unwrap();
        data.forget(":1.8");
        assert!(!data.wants(":1.7") && !data.wants(":1.8"));
    }

    #[test]
    fn callers_are_bounded() {
        let data = ErrorData::default();
        for i in 0..MAX_CALLERS {
            data.set(&format!(":1.{i}"), true).unwrap();
        }
        assert!(matches!(
            data.set(":2.0", true),
            Err(Error::LimitsExceeded(_))
        ));
        // One already listed may ask again, and one leaving makes room.
        data.set(":1.0", true).unwrap();
        data.forget(":1.0");
        data.set(":2.0", true).unwrap();
    }

    /// A restarted service keeps the wishes of the callers still on the same bus, and only
    /// theirs; a list from another bus (a reboot) is dropped.
    #[tokio::test]
    async fn a_restart_keeps_the_wishes_of_callers_still_connected() {
        let (dir, address) = crate::dbus::tests::private_bus().await;
        let connect = || super::super::client::bus(Some(&address));
        let (service, stays, leaves) = (
            connect().await.unwrap(),
            connect().await.unwrap(),
            connect().await.unwrap(),
        );
        let name = |c: &zbus::Connection| c.unique_name().unwrap().to_string();
        let (stays_name, leaves_name) = (name(&stays), name(&leaves));
        let path = dir.path().join("error-data.json");
        let data = ErrorData::kept(path.clone(), &service).await.unwrap();
        data.set(&stays_name, true).unwrap();
        data.set(&leaves_name, true).unwrap();
        leaves.close().await.unwrap();
        let dbus = zbus::fdo::DBusProxy::new(&service).await.unwrap();
        let gone = zbus::names::BusName::try_from(leaves_name.as_str()).unwrap();
        while dbus.name_has_owner(gone.clone()).await.unwrap() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        let again = ErrorData::kept(path.clone(), &service).await.unwrap();
        assert!(again.wants(&stays_name));
        assert!(!again.wants(&leaves_name));

        let other_bus = Saved {
            bus_id: "0".repeat(32),
            callers: BTreeSet::from([stays_name.clone()]),
        };
        std::fs::write(&path, serde_json::to_vec(&other_bus).unwrap()).unwrap();
        let after_reboot = ErrorData::kept(path.clone(), &service).await.unwrap();
        assert!(!after_reboot.wants(&stays_name));
        // A damaged file costs the wishes, not the start.
        std::fs::write(&path, b"{").unwrap();
        let damaged = ErrorData::kept(path, &service).await.unwrap();
        assert!(!damaged.wants(&stays_name));
    }
}
