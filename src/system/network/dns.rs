//! The resolver a container with a network of its own asks: the service, on the container's
//! host end, port 53 (UDP and TCP; `nft.rs` sends every query there, wherever it was
//! addressed). Queries go to the host's own resolvers (`[network] dns`, or `/etc/resolv.conf`)
//! from the host; the container itself reaches no resolver but this one. Each lookup is judged
//! by the container's egress rules (`Policy`): a refused name gets `REFUSED`, and the
//! addresses in the answer for a name a rule is about are handed to the rules (opened for an
//! allowed name, closed for a denied one) before the container sees the answer. Messages are
//! read and written with hickory-proto.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::core::egress::NameVerdict;

/// What a container's egress rules say of its lookups.
#[async_trait]
pub trait Policy: Send + Sync + 'static {
    /// The verdict on a lookup of `name` (lowercase, no trailing dot).
    fn judge(&self, name: &str) -> NameVerdict;
    /// The IPv4 addresses, with their TTLs, that the upstream answered for `name`, judged
    /// `verdict` (`Open` or `Deny`); returns once the rules hold them.
    async fn resolved(&self, name: &str, verdict: NameVerdict, addresses: Vec<(Ipv4Addr, u32)>);
    /// A lookup that was refused.
    fn refused(&self, name: &str);
}

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
    policy: Arc<dyn Policy>,
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
                    let policy = policy.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let ask = || ask_udp(&upstreams, &query);
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            answer = resolve(policy.as_ref(), &query, ask) => {
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
                    let policy = policy.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let serving = serve_tcp(stream, &upstreams, policy.as_ref());
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = tokio::time::timeout(TCP_LIFETIME, serving) => {}
                        }
                    });
                }
            }
        }
        debug!("DNS for {addr} ended");
    });
    Ok(())
}

/// The answer to `query` for the container: refused, or what `ask` got from an upstream,
/// once the rules hold the addresses it names. Nothing for what is no DNS query.
async fn resolve<F, Fut>(policy: &dyn Policy, query: &[u8], ask: F) -> Option<Vec<u8>>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Option<Vec<u8>>>,
{
    let msg = Message::from_vec(query).ok()?;
    let judged: Vec<(String, NameVerdict)> = msg
        .queries()
        .iter()
        .map(|q| {
            let name = q.name().to_ascii().to_ascii_lowercase();
            let name = name.strip_suffix('.').unwrap_or(&name).to_owned();
            let verdict = policy.judge(&name);
            (name, verdict)
        })
        .collect();
    if judged.is_empty() {
        return None;
    }
    let refuse = judged
        .iter()
        .any(|(_, v)| matches!(v, NameVerdict::Refuse | NameVerdict::Deny));
    let learn = judged
        .iter()
        .any(|(_, v)| matches!(v, NameVerdict::Open | NameVerdict::Deny));
    // A denied name is still looked up: its addresses are closed too.
    let only_refused = judged.iter().all(|(_, v)| *v == NameVerdict::Refuse);
    let answer = if only_refused { None } else { ask().await };
    if learn {
        let addresses = answer
            .as_deref()
            .and_then(|a| Message::from_vec(a).ok())
            .filter(|a| a.id() == msg.id())
            .map(|a| a_records(&a))
            .unwrap_or_default();
        for (name, verdict) in &judged {
            if matches!(verdict, NameVerdict::Open | NameVerdict::Deny) {
                policy.resolved(name, *verdict, addresses.clone()).await;
            }
        }
    }
    if !refuse {
        return answer;
    }
    for (name, verdict) in &judged {
        if matches!(verdict, NameVerdict::Refuse | NameVerdict::Deny) {
            policy.refused(name);
        }
    }
    let mut refused = Message::error_msg(msg.id(), msg.op_code(), ResponseCode::Refused);
    refused.set_recursion_desired(msg.recursion_desired());
    for q in msg.queries() {
        refused.add_query(q.clone());
    }
    refused.to_vec().ok()
}

/// The IPv4 addresses of an answer, with their TTLs (whatever name each is for: a CNAME
/// chain's end is the name asked for).
fn a_records(answer: &Message) -> Vec<(Ipv4Addr, u32)> {
    answer
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, r.ttl())),
            _ => None,
        })
        .collect()
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

/// DNS over TCP: each length-prefixed query judged and asked of an upstream over TCP.
async fn serve_tcp(
    mut stream: TcpStream,
    upstreams: &[SocketAddr],
    policy: &dyn Policy,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = stream.read_u16().await? as usize;
        stream.read_exact(&mut buf[..len]).await?;
        let query = &buf[..len];
        let Some(answer) = resolve(policy, query, || ask_tcp(upstreams, query)).await else {
            return Ok(());
        };
        stream.write_u16(answer.len() as u16).await?;
        stream.write_all(&answer).await?;
    }
}

/// One query over TCP, to the first upstream that answers it.
async fn ask_tcp(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for up in upstreams {
        let asked = async {
            let mut s = TcpStream::connect(up).await?;
            s.write_u16(query.len() as u16).await?;
            s.write_all(query).await?;
            let len = s.read_u16().await? as usize;
            let mut answer = vec![0u8; len];
            s.read_exact(&mut answer).await?;
            std::io::Result::Ok(answer)
        };
        if let Ok(Ok(answer)) = tokio::time::timeout(UPSTREAM_TIMEOUT, asked).await
            && answer.len() >= 2
            && query.len() >= 2
            && answer[..2] == query[..2]
        {
            return Some(answer);
        }
    }
    None
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

    /// Rules for the tests: allow `*.allowed.test`, deny `denied.test`, nothing else; what
    /// the resolver told it is recorded.
    #[derive(Default)]
    struct Rules {
        told: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Policy for Rules {
        fn judge(&self, name: &str) -> NameVerdict {
            crate::core::egress::Egress::of(&["*.allowed.test".into()], &["denied.test".into()])
                .judge_name(name)
        }
        async fn resolved(
            &self,
            name: &str,
            verdict: NameVerdict,
            addresses: Vec<(Ipv4Addr, u32)>,
        ) {
            self.told
                .lock()
                .unwrap()
                .push(format!("{verdict:?} {name} {addresses:?}"));
        }
        fn refused(&self, name: &str) {
            self.told.lock().unwrap().push(format!("refused {name}"));
        }
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        use hickory_proto::op::Query;
        use hickory_proto::rr::{Name, RecordType};
        let mut m = Message::new();
        m.set_id(id);
        m.set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn answer(id: u16, name: &str, addresses: &[(Ipv4Addr, u32)]) -> Vec<u8> {
        use hickory_proto::op::{MessageType, Query};
        use hickory_proto::rr::rdata::A;
        use hickory_proto::rr::{Name, Record, RecordType};
        let name = Name::from_ascii(name).unwrap();
        let mut m = Message::new();
        m.set_id(id);
        m.set_message_type(MessageType::Response);
        m.add_query(Query::query(name.clone(), RecordType::A));
        for (a, ttl) in addresses {
            m.add_answer(Record::from_rdata(name.clone(), *ttl, RData::A(A(*a))));
        }
        m.to_vec().unwrap()
    }

    #[tokio::test]
    async fn lookups_are_judged_and_their_addresses_given_to_the_rules_first() {
        let rules = Rules::default();
        let a = (Ipv4Addr::new(192, 0, 2, 10), 300);
        // An allowed name: asked upstream, its addresses opened, the answer passed on.
        let up = answer(7, "api.allowed.test.", &[a]);
        let got = resolve(&rules, &query(7, "API.Allowed.Test."), || async {
            Some(up.clone())
        })
        .await;
        assert_eq!(got, Some(up));
        // A name no rule allows: refused, never asked upstream.
        let got = resolve(&rules, &query(8, "example.com."), || async {
            panic!("a refused name is not looked up")
        })
        .await
        .unwrap();
        let m = Message::from_vec(&got).unwrap();
        assert_eq!((m.id(), m.response_code()), (8, ResponseCode::Refused));
        assert_eq!(m.queries()[0].name().to_ascii(), "example.com.");
        // A denied name: looked up (its addresses are closed), refused all the same.
        let up = answer(9, "denied.test.", &[a]);
        let got = resolve(&rules, &query(9, "denied.test."), || async { Some(up) }).await;
        let m = Message::from_vec(&got.unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::Refused);
        // An answer with another id teaches nothing.
        let forged = answer(1, "x.allowed.test.", &[(Ipv4Addr::new(192, 0, 2, 66), 60)]);
        resolve(&rules, &query(10, "x.allowed.test."), || async {
            Some(forged)
        })
        .await;
        // What is no DNS message gets no answer.
        assert_eq!(
            resolve(&rules, b"\x01\x02garbage", || async { None }).await,
            None
        );
        assert_eq!(
            *rules.told.lock().unwrap(),
            [
                "Open api.allowed.test [(192.0.2.10, 300)]",
                "refused example.com",
                "Deny denied.test [(192.0.2.10, 300)]",
                "refused denied.test",
                "Open x.allowed.test []",
            ]
        );
    }
}
