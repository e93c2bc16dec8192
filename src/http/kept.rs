//! Connections to the ports inside kept for a next request (the port proxy's keep-alive):
//! what a GET through the proxy would otherwise pay each time is a `ConnectPort` (a D-Bus call
//! and a polkit check), a TCP connection and an HTTP handshake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;

use super::AppState;

/// Connections kept for reuse, per workspace at most (each also holds one of its places).
const KEPT_PER_WORKSPACE: usize = 8;

pub(super) type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// Connections to the ports inside waiting, unused, for a next request: by the workspace as
/// the URL names it and the port; each closed after `PortLimits::keep`, all of them when any
/// workspace's status changes (it stopped, paused, was rebuilt: `cut_on_status_changes`).
#[derive(Clone, Default)]
pub(super) struct Kept(Arc<Mutex<KeptMap>>, Arc<std::sync::atomic::AtomicU64>);

/// By the workspace as the URL names it and the port: since when each waits, and it.
type KeptMap = HashMap<(String, u16), Vec<(tokio::time::Instant, Sender)>>;

impl Kept {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, KeptMap> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A kept connection to `key` that can take a request now.
    pub(super) fn take(&self, key: &(String, u16), keep: Duration) -> Option<Sender> {
        let mut dropped = Vec::new();
        let found = {
            let mut kept = self.lock();
            let list = kept.get_mut(key)?;
            let mut found = None;
            while let Some((since, sender)) = list.pop() {
                if since.elapsed() < keep && sender.is_ready() {
                    found = Some(sender);
                    break;
                }
                dropped.push(sender);
            }
            if list.is_empty() {
                kept.remove(key);
            }
            found
        };
        drop(dropped);
        found
    }

    /// Keeps `sender` for reuse once its answer has been read whole (it is ready again), if
    /// its workspace keeps fewer than `KEPT_PER_WORKSPACE`; waits at most `wait` for that.
    pub(super) fn give_back(
        &self,
        key: (String, u16),
        mut sender: Sender,
        wait: Duration,
        keep: Duration,
    ) {
        let this = self.clone();
        // A connection from before a cut (a status change) is not kept after it.
        let cuts = self.1.load(std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            if !matches!(tokio::time::timeout(wait, sender.ready()).await, Ok(Ok(()))) {
                return;
            }
            {
                let mut kept = this.lock();
                if this.1.load(std::sync::atomic::Ordering::SeqCst) != cuts {
                    return;
                }
                let of_workspace: usize = kept
                    .iter()
                    .filter(|((w, _), _)| *w == key.0)
                    .map(|(_, l)| l.len())
                    .sum();
                if of_workspace >= KEPT_PER_WORKSPACE {
                    return;
                }
                kept.entry(key)
                    .or_default()
                    .push((tokio::time::Instant::now(), sender));
            }
            tokio::time::sleep(keep).await;
            this.sweep(keep);
        });
    }

    /// Closes the kept connections unused for `keep`.
    fn sweep(&self, keep: Duration) {
        let mut dropped = Vec::new();
        {
            let mut kept = self.lock();
            for list in kept.values_mut() {
                let (fresh, old): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|(since, _)| since.elapsed() < keep);
                *list = fresh;
                dropped.extend(old);
            }
            kept.retain(|_, l| !l.is_empty());
        }
        drop(dropped);
    }

    /// Closes every kept connection.
    pub(super) fn cut_all(&self) {
        let all = {
            let mut kept = self.lock();
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::mem::take(&mut *kept)
        };
        drop(all);
    }
}

/// Closes every kept connection whenever a workspace's status changes (it stopped, paused, was
/// rebuilt or destroyed): one kept to a container that is gone would only fail. Runs for the
/// bridge's life.
pub async fn cut_kept_on_status_changes(state: Arc<AppState>) {
    use futures_util::StreamExt;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(crate::dbus::BUS_NAME)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .arg(0, crate::dbus::client::WORKSPACE_IFACE)
        .build();
    let stream = match rule {
        Ok(rule) => zbus::MessageStream::for_match_rule(rule, &state.conn, None).await,
        Err(e) => Err(e),
    };
    let mut changes = match stream {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("Kept port connections will not be cut at status changes: {e}");
            return;
        }
    };
    while let Some(m) = changes.next().await {
        // A message the stream could not read is skipped; the stream goes on.
        let Ok(m) = m else {
            continue;
        };
        let body = m.body();
        let Ok((_, changed, _)) =
            body.deserialize::<(String, HashMap<String, zbus::OwnedVariant>, Vec<String>)>()
        else {
            continue;
        };
        if changed.contains_key("Status") {
            state.ports.kept.cut_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ports::{Idle, PortLimits, PortProxy};
    use super::*;
    use axum::extract::Request;
    use hyper_util::rt::TokioIo;

    /// A keep-alive server on the loopback: `ok` to every request; how many connections it
    /// accepted, and how many of them are closed.
    async fn keep_alive_server() -> (
        u16,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await
                        && n > 0
                    {
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            break;
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (port, accepted, closed)
    }

    async fn connect(port: u16, proxy: &PortProxy) -> Sender {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let tcp = Idle::new(tcp, Duration::from_secs(60), proxy.take("box").unwrap());
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    async fn get(sender: &mut Sender) -> u16 {
        use http_body_util::BodyExt;
        let response = sender
            .send_request(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        status
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}");
    }

    /// A connection whose answer was read is kept and reused for the next request to the same
    /// port; unused past `keep` it is closed; a status change closes every kept one; a
    /// workspace keeps at most `KEPT_PER_WORKSPACE`.
    #[tokio::test]
    async fn connections_are_kept_reused_and_cut() {
        use std::sync::atomic::Ordering;
        let (port, accepted, closed) = keep_alive_server().await;
        let keep = Duration::from_millis(300);
        let proxy = PortProxy::new(PortLimits {
            keep,
            ..PortLimits::default()
        });
        let key = ("box".to_owned(), port);
        assert!(proxy.kept.take(&key, keep).is_none());
        let mut first = connect(port, &proxy).await;
        assert_eq!(get(&mut first).await, 200);
        proxy
            .kept
            .give_back(key.clone(), first, Duration::from_secs(5), keep);
        let kept = proxy.kept.clone();
        let k = key.clone();
        eventually("the connection kept", || kept.lock().contains_key(&k)).await;
        for _ in 0..5 {
            let mut again = proxy.kept.take(&key, keep).expect("a kept connection");
            assert_eq!(get(&mut again).await, 200);
            proxy
                .kept
                .give_back(key.clone(), again, Duration::from_secs(5), keep);
            let (kept, k) = (proxy.kept.clone(), key.clone());
            eventually("kept again", || kept.lock().contains_key(&k)).await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for six requests"
        );
        // Another port of the same workspace has connections of its own.
        assert!(
            proxy
                .kept
                .take(&("box".to_owned(), port + 1), keep)
                .is_none()
        );

        // Unused past `keep`: closed, and its place given back.
        eventually("closed after keep", || closed.load(Ordering::SeqCst) == 1).await;
        assert!(proxy.kept.take(&key, keep).is_none());
        let open = proxy.open.clone();
        eventually("its place given back", || open.lock().unwrap().is_empty()).await;

        // At most KEPT_PER_WORKSPACE wait; a status change closes them all.
        let mut senders = Vec::new();
        for _ in 0..KEPT_PER_WORKSPACE + 2 {
            let mut s = connect(port, &proxy).await;
            assert_eq!(get(&mut s).await, 200);
            senders.push(s);
        }
        for s in senders {
            proxy.kept.give_back(
                key.clone(),
                s,
                Duration::from_secs(5),
                Duration::from_secs(60),
            );
        }
        let (kept, k) = (proxy.kept.clone(), key.clone());
        eventually("kept up to the bound", || {
            kept.lock().get(&k).map(Vec::len) == Some(KEPT_PER_WORKSPACE)
        })
        .await;
        eventually("the ones over the bound closed", || {
            closed.load(Ordering::SeqCst) == 1 + 2
        })
        .await;
        proxy.kept.cut_all();
        eventually("every kept one closed", || {
            closed.load(Ordering::SeqCst) == 1 + KEPT_PER_WORKSPACE + 2
        })
        .await;
        let open = proxy.open.clone();
        eventually("every place given back", || open.lock().unwrap().is_empty()).await;
    }
}
