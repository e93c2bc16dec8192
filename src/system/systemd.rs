//! systemd and systemd-machined over D-Bus: transient units started and stopped, each call
//! awaited through its job (`JobRemoved`, as machined does); unit state; machines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath, OwnedVariant};
use zbus_systemd::machine1;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

use crate::core::error::{Error, Result};

#[derive(Clone)]
pub struct Systemd {
    conn: Connection,
    manager: ManagerProxy<'static>,
    machines: machine1::ManagerProxy<'static>,
    jobs: Arc<JobWaiters>,
}

/// A job that ended, and its result.
type JobEnd = (OwnedObjectPath, String);

/// Who waits for the jobs of which unit: `JobRemoved` signals of these units are passed on.
#[derive(Default)]
struct JobWaiters(Mutex<HashMap<String, Vec<mpsc::UnboundedSender<JobEnd>>>>);

/// One waiter's registration, removed when it is dropped.
struct JobWaiter<'a> {
    jobs: &'a JobWaiters,
    unit: String,
    tx: mpsc::UnboundedSender<JobEnd>,
}

impl Drop for JobWaiter<'_> {
    fn drop(&mut self) {
        let mut map = self.jobs.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = map.get_mut(&self.unit) {
            list.retain(|tx| !tx.same_channel(&self.tx));
            if list.is_empty() {
                map.remove(&self.unit);
            }
        }
    }
}

impl JobWaiters {
    fn register(
        &self,
        unit: &str,
    ) -> (
        JobWaiter<'_>,
        mpsc::UnboundedReceiver<(OwnedObjectPath, String)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(unit.to_owned())
            .or_default()
            .push(tx.clone());
        let waiter = JobWaiter {
            jobs: self,
            unit: unit.to_owned(),
            tx,
        };
        (waiter, rx)
    }

    fn dispatch(&self, unit: &str, job: OwnedObjectPath, result: String) {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for tx in map.get(unit).into_iter().flatten() {
            let _ = tx.send((job.clone(), result.clone()));
        }
    }
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

/// True when a call failed with the D-Bus error `name`. A method's error comes as
/// `MethodError`, a property's (read through `org.freedesktop.DBus.Properties`) as `FDO`:
/// both are looked at.
fn is_error(e: &zbus::Error, name: &str) -> bool {
    match e {
        zbus::Error::MethodError(n, ..) => n.as_str() == name,
        zbus::Error::FDO(f) => zbus::DBusError::name(f.as_ref()).as_str() == name,
        _ => false,
    }
}

/// State of a unit, as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub active_state: String,
    pub result: String,
    pub control_group: String,
}

/// How often a job is looked at while its `JobRemoved` has not come: only a lost signal (a
/// reconnected bus) makes this matter.
const JOB_FALLBACK_POLL: Duration = Duration::from_secs(5);

impl Systemd {
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        let manager = ManagerProxy::new(conn).await?;
        // One JobRemoved stream for the life of the connection, passed on to the waiters of
        // each unit. (A match rule per call lost signals: zbus's removal of an identical rule
        // from the call before raced the new one's registration.)
        let mut removed = manager.receive_job_removed().await?;
        let jobs = Arc::new(JobWaiters::default());
        let dispatch = Arc::downgrade(&jobs);
        tokio::spawn(async move {
            while let Some(signal) = removed.next().await {
                let Some(jobs) = dispatch.upgrade() else {
                    break;
                };
                if let Ok(a) = signal.args() {
                    tracing::debug!("JobRemoved {} {} {}", a.unit(), a.job(), a.result());
                    jobs.dispatch(a.unit(), a.job().clone(), a.result().clone());
                }
            }
        });
        // systemd sends JobRemoved only to subscribed clients. A second Subscribe on the same
        // connection is refused ("already subscribed"), which is fine.
        if let Err(e) = manager.subscribe().await {
            tracing::debug!("systemd Subscribe: {e}");
        }
        Ok(Self {
            conn: conn.clone(),
            manager,
            machines: machine1::ManagerProxy::new(conn).await?,
            jobs,
        })
    }

    /// Makes the call that queues a job for `unit` and waits until that job ends; returns its
    /// result ("done", "failed", "timeout", "canceled", ...). The waiter is registered before
    /// the call, so the job cannot end unseen; should the signal still be lost, the job is
    /// looked up every few seconds and, once gone, the result is "gone" and the caller decides
    /// by the unit's state.
    async fn await_job<F>(&self, unit: &str, call: F) -> zbus::Result<String>
    where
        F: std::future::Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let (_waiter, mut removed) = self.jobs.register(unit);
        let job = call.await?;
        let id: Option<u32> = job.as_str().rsplit('/').next().and_then(|n| n.parse().ok());
        let mut poll = tokio::time::interval(JOB_FALLBACK_POLL);
        poll.tick().await;
        loop {
            tokio::select! {
                signal = removed.recv() => match signal {
                    Some((j, result)) if j == job => return Ok(result),
                    Some(_) => {}
                    None => return Ok("gone".into()),
                },
                _ = poll.tick() => {
                    let gone = match id {
                        None => true,
                        Some(id) => matches!(self.manager.get_job(id).await, Err(e) if is_error(&e, "org.freedesktop.systemd1.NoSuchJob")),
                    };
                    if gone {
                        tracing::warn!(unit, "Job {job} of {unit} ended without a JobRemoved signal; its unit's state decides");
                        return Ok("gone".into());
                    }
                }
            }
        }
    }

    /// The status texts (`STATUS=`) a service unit reports from now on, as systemd announces
    /// them (`PropertiesChanged` of `StatusText`). Works before the unit exists: its object path
    /// follows from its name, so nothing it says after this call is missed.
    pub async fn watch_status(
        &self,
        unit: &str,
    ) -> Result<impl futures_util::Stream<Item = String> + Send + 'static> {
        let changes = self.unit_changes(unit).await?;
        Ok(changes.filter_map(|signal| async move {
            let args = signal.args().ok()?;
            if args.interface_name().as_str() != "org.freedesktop.systemd1.Service" {
                return None;
            }
            let text = args.changed_properties().get("StatusText")?;
            String::try_from(text.try_clone().ok()?).ok()
        }))
    }

    /// `PropertiesChanged` of a unit's object, from now on. Works before the unit exists: its
    /// object path follows from its name.
    async fn unit_changes(&self, unit: &str) -> Result<zbus::fdo::PropertiesChangedStream> {
        let path = format!(
            "/org/freedesktop/systemd1/unit/{}",
            crate::core::names::bus_label_escape(unit)
        );
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus_error(unit, e))?;
        props
            .receive_properties_changed()
            .await
            .map_err(|e| bus_error(unit, e))
    }

    /// Waits until `unit` is no longer starting, running or stopping (or is not loaded at all),
    /// for a unit this process did not start (a build that outlived a restart of the service).
    /// Awaited through the unit's `PropertiesChanged` (systemd announces `ActiveState`), the
    /// state read again on each; and every few seconds should a signal be lost.
    pub async fn wait_until_stopped(&self, unit: &str) -> Result<()> {
        let mut changes = self.unit_changes(unit).await?;
        let mut poll = tokio::time::interval(JOB_FALLBACK_POLL);
        poll.tick().await;
        loop {
            match self.unit_state(unit).await? {
                Some(s)
                    if matches!(
                        s.active_state.as_str(),
                        "activating" | "active" | "deactivating" | "reloading"
                    ) => {}
                _ => return Ok(()),
            }
            tokio::select! {
                Some(_) = changes.next() => {}
                _ = poll.tick() => {}
            }
        }
    }

    /// Starts a transient unit and waits for its start job: until it is up (`active`), or, for
    /// a oneshot, until it has finished.
    pub async fn start_transient(
        &self,
        unit: &str,
        properties: Vec<(String, OwnedVariant)>,
    ) -> Result<()> {
        let call = self.manager.start_transient_unit(
            unit.to_owned(),
            "fail".to_owned(),
            properties,
            Vec::new(),
        );
        let result = self
            .await_job(unit, call)
            .await
            .map_err(|e| bus_error(&format!("Cannot start {unit}"), e))?;
        match result.as_str() {
            "done" => return Ok(()),
            "gone" => {}
            _ => {
                let why = match self.unit_state(unit).await {
                    Ok(Some(s)) if !s.result.is_empty() && s.result != "success" => {
                        format!("job {result}, unit result '{}'", s.result)
                    }
                    _ => format!("job {result}"),
                };
                return Err(Error::JobFailed(format!("{unit} failed to start ({why})")));
            }
        }
        // The job is gone and its signal was lost: the unit's state says how it went.
        match self.unit_state(unit).await? {
            None => Ok(()),
            Some(s) if s.active_state == "active" => Ok(()),
            Some(s) if s.active_state == "inactive" && s.result == "success" => Ok(()),
            Some(s) => Err(Error::JobFailed(format!(
                "{unit} failed to start ({}, result '{}')",
                s.active_state, s.result
            ))),
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
            Err(e) if is_error(&e, "org.freedesktop.systemd1.NoSuchUnit") => Ok(()),
            Err(e) => Err(bus_error(&format!("Cannot set the limits of {unit}"), e)),
        }
    }

    /// Stops a unit and waits for its stop job; a unit that is not loaded is already stopped.
    pub async fn stop(&self, unit: &str) -> Result<()> {
        let call = self
            .manager
            .stop_unit(unit.to_owned(), "replace".to_owned());
        match self.await_job(unit, call).await {
            Ok(_) => {}
            Err(e) if is_error(&e, "org.freedesktop.systemd1.NoSuchUnit") => {
                return Ok(());
            }
            Err(e) => return Err(bus_error(&format!("Cannot stop {unit}"), e)),
        }
        // A failed transient unit stays loaded until reset; nothing of it must remain.
        let _ = self.manager.reset_failed_unit(unit.to_owned()).await;
        Ok(())
    }

    /// Freezes (`true`) or thaws a running unit's processes through the cgroup freezer
    /// (`FreezeUnit`/`ThawUnit`); systemd answers once the cgroup is frozen or thawed.
    pub async fn freeze(&self, unit: &str, freeze: bool) -> Result<()> {
        let call = if freeze {
            self.manager.freeze_unit(unit.to_owned()).await
        } else {
            self.manager.thaw_unit(unit.to_owned()).await
        };
        call.map_err(|e| {
            let verb = if freeze { "freeze" } else { "thaw" };
            bus_error(&format!("Cannot {verb} {unit}"), e)
        })
    }

    /// The object path of a loaded unit, or None when systemd has no such unit loaded.
    async fn unit_path(&self, unit: &str) -> Result<Option<OwnedObjectPath>> {
        match self.manager.get_unit(unit.to_owned()).await {
            Ok(p) => Ok(Some(p)),
            Err(e) if is_error(&e, "org.freedesktop.systemd1.NoSuchUnit") => Ok(None),
            Err(e) => Err(bus_error(&format!("Cannot look up {unit}"), e)),
        }
    }

    /// The unit's state, or None when systemd has no such unit loaded.
    pub async fn unit_state(&self, unit: &str) -> Result<Option<UnitState>> {
        let Some(path) = self.unit_path(unit).await? else {
            return Ok(None);
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
                match m.leader().await {
                    Ok(pid) => Ok(Some(pid)),
                    // Gone between the two calls (it was terminating): not running.
                    Err(e) if is_error(&e, "org.freedesktop.DBus.Error.UnknownObject") => Ok(None),
                    Err(e) => Err(bus_error(name, e)),
                }
            }
            Err(e) if is_error(&e, "org.freedesktop.machine1.NoSuchMachine") => Ok(None),
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
            Err(e) if is_error(&e, "org.freedesktop.machine1.NoSuchImage") => Ok(false),
            Err(e) => Err(bus_error(&format!("Cannot look up image {name}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_error;

    #[test]
    fn a_property_reads_error_is_recognised_by_its_name() {
        // What a property read on an object that went away returns (the CI failure of stop 17:
        // a machine ending between GetMachine and reading its Leader).
        let gone = zbus::Error::FDO(Box::new(zbus::fdo::Error::UnknownObject(
            "Unknown object '/org/freedesktop/machine1/machine/box'.".into(),
        )));
        assert!(is_error(&gone, "org.freedesktop.DBus.Error.UnknownObject"));
        assert!(!is_error(&gone, "org.freedesktop.machine1.NoSuchMachine"));
        assert!(!is_error(
            &zbus::Error::Failure("x".into()),
            "org.freedesktop.DBus.Error.UnknownObject"
        ));
    }
}
