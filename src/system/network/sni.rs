//! The name check of connections to an allowed name's addresses on ports 80 and 443: the
//! rules send them to this proxy on the container's host end (`PORT`), which reads the name
//! the connection carries (TLS: the ClientHello's server name, read with tls-parser; HTTP: the
//! Host header, read with httparse), lets it through only when that name is allowed and its
//! own lookups answered the address the connection was for (`SO_ORIGINAL_DST`), and else
//! closes it: so a shared address (a CDN front) opened by an allowed name does not carry
//! another site. A connection that names nothing it can read is closed (fail closed).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The proxy's port on every container's host end.
pub const PORT: u16 = 3129;
/// The most a connection may send before it has named its server.
const FIRST_BYTES_MAX: usize = 16 * 1024;
/// How long it has to do so.
const NAME_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of one container through the proxy at once.
const CONNECTIONS_MAX: usize = 256;

/// Whether a connection to `addr` that names `name` may go on.
pub trait Names: Send + Sync + 'static {
    /// `Err` says why not.
    fn agrees(&self, name: &str, addr: Ipv4Addr) -> Result<(), String>;
    /// A connection that was closed, and why.
    fn refused(&self, to: SocketAddrV4, why: &str);
}

/// What a connection's first bytes name.
#[derive(Debug, PartialEq, Eq)]
pub enum Named {
    Name(String),
    /// More bytes are needed.
    Incomplete,
    /// Nothing this proxy can read a name from.
    Nothing,
}

/// The server name in the first bytes of a connection to port `port`: a TLS ClientHello's
/// server name (443), an HTTP request's Host (80).
pub fn name_in(first: &[u8], port: u16) -> Named {
    let normal = |n: &str| n.trim().trim_end_matches('.').to_ascii_lowercase();
    if port == 443 {
        use tls_parser::{
            SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions,
            parse_tls_plaintext,
        };
        // A TLS connection starts with a handshake record (22).
        match first.first() {
            None => return Named::Incomplete,
            Some(0x16) => {}
            Some(_) => return Named::Nothing,
        }
        return match parse_tls_plaintext(first) {
            Err(tls_parser::nom::Err::Incomplete(_)) => Named::Incomplete,
            Err(_) => Named::Nothing,
            Ok((_, record)) => record
                .msg
                .iter()
                .find_map(|m| match m {
                    TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) => ch.ext,
                    _ => None,
                })
                .and_then(|ext| parse_tls_extensions(ext).ok())
                .and_then(|(_, exts)| {
                    exts.into_iter().find_map(|e| match e {
                        TlsExtension::SNI(names) => names
                            .into_iter()
                            .find(|(t, _)| *t == SNIType::HostName)
                            .and_then(|(_, n)| std::str::from_utf8(n).ok().map(normal)),
                        _ => None,
                    })
                })
                .map_or(Named::Nothing, Named::Name),
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(first) {
        Ok(httparse::Status::Partial) => Named::Incomplete,
        Err(_) => Named::Nothing,
        Ok(httparse::Status::Complete(_)) => request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(|host| {
                // host, host:port, [v6] or [v6]:port
                let host = match host.rsplit_once(':') {
                    Some((h, port))
                        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        h
                    }
                    _ => host,
                };
                normal(host)
            })
            .map_or(Named::Nothing, Named::Name),
    }
}

/// Serves the proxy on `addr:PORT` for one container until `cancel`.
pub async fn serve(
    addr: Ipv4Addr,
    names: Arc<dyn Names>,
    cancel: CancellationToken,
) -> io::Result<()> {
    let listener = TcpListener::bind((addr, PORT)).await?;
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let (names, cancel) = (names.clone(), cancel.clone());
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = relay(stream, names.as_ref()) => {}
                }
            });
        }
    });
    Ok(())
}

/// Where the connection was going before the rules sent it here.
fn original_destination(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    let sin = nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::OriginalDst)
        .map_err(io::Error::from)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

async fn relay(mut inside: TcpStream, names: &dyn Names) -> io::Result<()> {
    let to = original_destination(&inside)?;
    let mut first = Vec::with_capacity(4096);
    let named = tokio::time::timeout(NAME_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            match name_in(&first, to.port()) {
                Named::Incomplete if first.len() < FIRST_BYTES_MAX => {}
                Named::Incomplete => return Named::Nothing,
                done => return done,
            }
            let n = inside.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return Named::Nothing;
            }
            first.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or(Named::Nothing);
    let name = match named {
        Named::Name(n) => n,
        _ => {
            names.refused(to, "it names no server this check can read");
            return Ok(());
        }
    };
    if let Err(why) = names.agrees(&name, *to.ip()) {
        names.refused(to, &format!("it names {name}, {why}"));
        return Ok(());
    }
    let mut outside = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(SocketAddr::V4(to)))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    outside.write_all(&first).await?;
    tokio::io::copy_bidirectional(&mut inside, &mut outside).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_host_of_an_http_request() {
        let r = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: Example.COM:8080\r\n\r\n";
        assert_eq!(name_in(r, 80), Named::Name("example.com".into()));
        assert_eq!(
            name_in(b"GET / HTTP/1.1\r\nHost: a.example", 80),
            Named::Incomplete
        );
        assert_eq!(name_in(b"GET / HTTP/1.1\r\n\r\n", 80), Named::Nothing);
        assert_eq!(name_in(b"\x16\x03\x01 not http", 80), Named::Nothing);
    }

    #[test]
    fn reads_the_server_name_of_a_client_hello() {
        // A TLS 1.2 ClientHello with one extension: server_name "api.example.com".
        let name = b"api.example.com";
        let mut sni = vec![0x00, 0x00]; // extension type: server_name
        let list_len = 3 + name.len();
        sni.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        sni.extend_from_slice(&(list_len as u16).to_be_bytes());
        sni.push(0); // host_name
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7u8; 32]); // random
        hello.push(0); // no session id
        hello.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        hello.extend_from_slice(&[0x01, 0x00]); // compression: null
        hello.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        hello.extend_from_slice(&sni);
        let mut handshake = vec![0x01, 0, 0, 0];
        handshake[1..4].copy_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&hello);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        assert_eq!(name_in(&record, 443), Named::Name("api.example.com".into()));
        assert_eq!(name_in(&record[..30], 443), Named::Incomplete);
        assert_eq!(name_in(b"GET / HTTP/1.1\r\n\r\n", 443), Named::Nothing);
    }
}
