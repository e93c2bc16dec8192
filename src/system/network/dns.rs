//! The resolver a container with a network of its own asks: the service, on the container's
//! host end, port 53 (UDP and TCP; `nft.rs` sends every query there, wherever it was
//! addressed). Queries go to the host's own resolvers (`[network] dns`, or `/etc/resolv.conf`)
//! from the host; the container itself reaches no resolver but this one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How long an upstream resolver may take to answer one query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// A TCP connection from a container lives at most this long.
const TCP_LIFETIME: Duration = Duration::from_secs(30);
/// Queries of one container in flight at once; more are dropped (the client asks again).
const IN_FLIGHT: usize = 64;
/// The largest DNS message (a TCP one: two length bytes, then up to 65535).
const MAX_MESSAGE: usize = 65535;

/// The host's resolvers: `nameserver` lines of a `resolv.conf`, on port 53.
pub fn resolvers_of(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.split('%').next()?.parse::<IpAddr>().ok())
                .flatten()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Serves DNS on `addr:53` for one container until `cancel`. The sockets are bound before it
/// returns, so a container started next finds its resolver there.
pub async fn serve(
    addr: Ipv4Addr,
    upstreams: Arc<Vec<SocketAddr>>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let at = SocketAddr::from((addr, 53));
    let udp = Arc::new(UdpSocket::bind(at).await?);
    let tcp = TcpListener::bind(at).await?;
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                got = udp.recv_from(&mut buf) => {
                    let Ok((n, from)) = got else { continue };
                    let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                    let query = buf[..n].to_vec();
                    let (udp, upstreams, cancel) = (udp.clone(), upstreams.clone(), cancel.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            answer = ask_udp(&upstreams, &query) => {
                                if let Some(answer) = answer {
                                    let _ = udp.send_to(&answer, from).await;
                                }
                            }
                        }
                    });
                }
                got = tcp.accept() => {
                    let Ok((stream, _)) = got else { continue };
                    let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                    let (upstreams, cancel) = (upstreams.clone(), cancel.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = tokio::time::timeout(TCP_LIFETIME, serve_tcp(stream, &upstreams)) => {}
                        }
                    });
                }
            }
        }
        debug!("DNS for {addr} ended");
    });
    Ok(())
}

/// The first answer of the upstreams, each asked in turn.
async fn ask_udp(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for up in upstreams {
        let local: SocketAddr = match up {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let Ok(sock) = UdpSocket::bind(local).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        // An answer must carry the query's id (the socket is connected, so it comes from
        // the upstream).
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// DNS over TCP: each length-prefixed query relayed to an upstream over TCP.
async fn serve_tcp(mut stream: TcpStream, upstreams: &[SocketAddr]) -> std::io::Result<()> {
    let mut upstream = None;
    for up in upstreams {
        if let Ok(Ok(s)) = tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(up)).await {
            upstream = Some(s);
            break;
        }
    }
    let Some(mut upstream) = upstream else {
        return Ok(());
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = stream.read_u16().await? as usize;
        stream.read_exact(&mut buf[..len]).await?;
        upstream.write_u16(len as u16).await?;
        upstream.write_all(&buf[..len]).await?;
        let back = upstream.read_u16().await? as usize;
        upstream.read_exact(&mut buf[..back]).await?;
        stream.write_u16(back as u16).await?;
        stream.write_all(&buf[..back]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_are_the_nameserver_lines() {
        let r = resolvers_of(
            "# generated\nsearch example.com\nnameserver 10.0.2.3\nnameserver  fe80::1%eth0\n\
             nameserver bogus\noptions edns0\n",
        );
        assert_eq!(
            r,
            vec![
                "10.0.2.3:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse::<SocketAddr>().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn relays_a_query_to_the_first_upstream_that_answers_it() {
        // Nobody listens at the first upstream (refused at once); the second first answers
        // with a wrong id (a spoofed answer), then with the query plus a byte.
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ups = vec![dead_addr, up.local_addr().unwrap()];
        tokio::spawn(async move {
            let mut b = [0u8; 512];
            let (n, from) = up.recv_from(&mut b).await.unwrap();
            up.send_to(&[0xff, 0xff, 9], from).await.unwrap();
            let mut answer = b[..n].to_vec();
            answer.push(0xaa);
            up.send_to(&answer, from).await.unwrap();
        });
        let answer = ask_udp(&ups, &[0x12, 0x34, 1]).await;
        assert_eq!(answer.as_deref(), Some(&[0x12, 0x34, 1, 0xaa][..]));
    }
}
