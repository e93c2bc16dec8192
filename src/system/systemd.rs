//! systemd and systemd-machined over D-Bus: transient units started and stopped, waiting for
//! the unit to reach its state; unit state; machines.

use std::time::Duration;

use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedVariant};
use zbus_systemd::machine1;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

use crate::core::error::{Error, Result};

#[derive(Clone)]
pub struct Systemd {
    conn: Connection,
    manager: ManagerProxy<'static>,
    machines: machine1::ManagerProxy<'static>,
}

/// A property of a transient unit, as `StartTransientUnit` takes it.
pub fn prop(name: &str, value: impl Into<zbus::Variant<'static>>) -> (String, OwnedVariant) {
    let v: zbus::Variant<'static> = value.into();
    (
        name.to_owned(),
        OwnedVariant::try_from(v).expect("plain values convert without file descriptors"),
    )
}

fn bus_error(what: &str, e: zbus::Error) -> Error {
    Error::JobFailed(format!("{what}: {e}"))
}

/// State of a unit, as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub active_state: String,
    pub result: String,
    pub control_group: String,
}

impl Systemd {
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        let manager = ManagerProxy::new(conn).await?;
        Ok(Self {
            conn: conn.clone(),
            manager,
            machines: machine1::ManagerProxy::new(conn).await?,
        })
    }

    /// Starts a transient unit and waits until it is up (`active`), or, for a oneshot, until it
    /// has finished. The unit's state is polled: systemd 252 did not deliver `JobRemoved` to this
    /// service in the test host (seen: the job finished, the signal never arrived), and a poll
    /// of a few properties costs little next to starting a container or a build.
    pub async fn start_transient(
        &self,
        unit: &str,
        properties: Vec<(String, OwnedVariant)>,
    ) -> Result<()> {
        self.manager
            .start_transient_unit(unit.to_owned(), "fail".to_owned(), properties, Vec::new())
            .await
            .map_err(|e| bus_error(&format!("Cannot start {unit}"), e))?;
        let mut delay = Duration::from_millis(5);
        loop {
            match self.unit_state(unit).await? {
                // Collected after it finished: a oneshot that succeeded (failures stay loaded
                // long enough to be seen as failed, or are reported by their result file).
                None => return Ok(()),
                Some(s) => match s.active_state.as_str() {
                    "active" => return Ok(()),
                    "inactive" if s.result == "success" => return Ok(()),
                    "inactive" | "failed" => {
                        return Err(Error::JobFailed(format!(
                            "{unit} failed with result '{}'",
                            s.result
                        )));
                    }
                    _ => {}
                },
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// Changes properties of a running unit for its lifetime (`systemctl set-property
    /// --runtime`); a unit that is not loaded is left alone.
    pub async fn set_unit_properties(
        &self,
        unit: &str,
        properties: Vec<(String, OwnedVariant)>,
    ) -> Result<()> {
        match self
            .manager
            .set_unit_properties(unit.to_owned(), true, properties)
            .await
        {
            Ok(()) => Ok(()),
            Err(zbus::Error::MethodError(name, ..))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                Ok(())
            }
            Err(e) => Err(bus_error(&format!("Cannot set the limits of {unit}"), e)),
        }
    }

    /// Stops a unit and waits until it is gone or inactive; a unit that is not loaded is
    /// already stopped.
    pub async fn stop(&self, unit: &str) -> Result<()> {
        match self
            .manager
            .stop_unit(unit.to_owned(), "replace".to_owned())
            .await
        {
            Ok(_) => {}
            Err(zbus::Error::MethodError(name, ..))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                return Ok(());
            }
            Err(e) => return Err(bus_error(&format!("Cannot stop {unit}"), e)),
        }
        let mut delay = Duration::from_millis(5);
        while let Some(s) = self.unit_state(unit).await? {
            if matches!(s.active_state.as_str(), "inactive" | "failed") {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
        // A failed transient unit stays loaded until reset; nothing of it must remain.
        let _ = self.manager.reset_failed_unit(unit.to_owned()).await;
        Ok(())
    }

    /// The unit's state, or None when systemd has no such unit loaded.
    pub async fn unit_state(&self, unit: &str) -> Result<Option<UnitState>> {
        let path = match self.manager.get_unit(unit.to_owned()).await {
            Ok(p) => p,
            Err(zbus::Error::MethodError(name, ..))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                return Ok(None);
            }
            Err(e) => return Err(bus_error(&format!("Cannot look up {unit}"), e)),
        };
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus_error(unit, e))?;
        let s = ServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus_error(unit, e))?;
        Ok(Some(UnitState {
            active_state: u.active_state().await.map_err(|e| bus_error(unit, e))?,
            result: s.result().await.unwrap_or_default(),
            control_group: s.control_group().await.unwrap_or_default(),
        }))
    }

    /// Loaded units matching a glob pattern: (name, description, active state).
    pub async fn units_matching(&self, pattern: &str) -> Result<Vec<(String, String, String)>> {
        let units = self
            .manager
            .list_units_by_patterns(Vec::new(), vec![pattern.to_owned()])
            .await
            .map_err(|e| bus_error("Cannot list units", e))?;
        Ok(units.into_iter().map(|u| (u.0, u.1, u.3)).collect())
    }

    /// The leader PID of a registered machine, or None when machined does not know it.
    pub async fn machine_leader(&self, name: &str) -> Result<Option<u32>> {
        match self.machines.get_machine(name.to_owned()).await {
            Ok(path) => {
                let m = machine1::MachineProxy::builder(&self.conn)
                    .path(path)
                    .cache_properties(CacheProperties::No)
                    .build()
                    .await
                    .map_err(|e| bus_error(name, e))?;
                Ok(Some(m.leader().await.map_err(|e| bus_error(name, e))?))
            }
            Err(zbus::Error::MethodError(n, ..))
                if n.as_str() == "org.freedesktop.machine1.NoSuchMachine" =>
            {
                Ok(None)
            }
            Err(e) => Err(bus_error(&format!("Cannot look up machine {name}"), e)),
        }
    }

    /// True when machined knows a machine or an image of this name.
    pub async fn machine_or_image_exists(&self, name: &str) -> Result<bool> {
        if self.machine_leader(name).await?.is_some() {
            return Ok(true);
        }
        match self.machines.get_image(name.to_owned()).await {
            Ok(_) => Ok(true),
            Err(zbus::Error::MethodError(n, ..))
                if n.as_str() == "org.freedesktop.machine1.NoSuchImage" =>
            {
                Ok(false)
            }
            Err(e) => Err(bus_error(&format!("Cannot look up image {name}"), e)),
        }
    }
}
