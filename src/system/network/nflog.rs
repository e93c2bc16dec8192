//! Denied connections in the journal: the rules hand the first packet of each connection a
//! container's rules refuse to the kernel's NFLOG group `GROUP` (rate-limited there, per
//! container), with the workspace's id as prefix; one thread of the service reads the group
//! (netlink, `NETLINK_NETFILTER`, messages read with rust-netlink's netlink-packet-netfilter)
//! and logs each with `WORKSPACE_ID=`.

use std::io;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigMode, PacketNla, ULogMessage, config_request,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, constants::NETLINK_NETFILTER};
use tracing::{info, warn};

/// The NFLOG group of the service's rules.
pub const GROUP: u16 = 3407;
/// What the rules put before the workspace's id in a log prefix.
pub const PREFIX: &str = "aw-refused ";

/// One refused connection, as read from its first packet.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub workspace_id: String,
    pub destination: Ipv4Addr,
    pub protocol: &'static str,
    pub port: Option<u16>,
}

/// Reads what the rules logged from an NFLOG packet's prefix and payload (its IPv4 header).
pub fn refused(prefix: &str, payload: &[u8]) -> Option<Refused> {
    let workspace_id = prefix.strip_prefix(PREFIX)?.trim().to_owned();
    if payload.len() < 20 || payload[0] >> 4 != 4 {
        return None;
    }
    let destination = Ipv4Addr::new(payload[16], payload[17], payload[18], payload[19]);
    let header = usize::from(payload[0] & 0xf) * 4;
    let (protocol, ported) = match payload[9] {
        6 => ("TCP", true),
        17 => ("UDP", true),
        1 => ("ICMP", false),
        _ => ("IP", false),
    };
    let port = ported
        .then(|| payload.get(header + 2..header + 4))
        .flatten()
        .map(|p| u16::from_be_bytes([p[0], p[1]]));
    Some(Refused {
        workspace_id,
        destination,
        protocol,
        port,
    })
}

/// Starts the reader once (the first container with a network of its own); a failure is
/// logged once and leaves the rules as they are (denied connections are still denied).
pub fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("nflog".into())
            .spawn(|| {
                if let Err(e) = read() {
                    warn!("Denied connections of containers are not logged: cannot read NFLOG group {GROUP}: {e}");
                }
            });
        if let Err(e) = spawned {
            warn!("Cannot start the reader of denied connections: {e}");
        }
    });
}

fn send(socket: &Socket, message: NetlinkMessage<NetfilterMessage>) -> io::Result<()> {
    let mut buf = vec![0; message.header.length as usize];
    message.serialize(&mut buf[..]);
    socket.send(&buf, 0)?;
    Ok(())
}

fn read() -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    // The first 64 bytes of each packet: its IPv4 header and ports.
    send(
        &socket,
        config_request(
            NetfilterProtoFamily::IPv4,
            0,
            vec![ConfigCmd::PfBind.into()],
        ),
    )?;
    send(
        &socket,
        config_request(
            NetfilterProtoFamily::IPv4,
            GROUP,
            vec![ConfigCmd::Bind.into(), ConfigMode::new_packet(64).into()],
        ),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            // A burst the socket had no room for: those are lost, the next are read.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            Err(e) => return Err(e),
        };
        let mut offset = 0;
        while offset < size {
            let Ok(message) = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[offset..size])
            else {
                break;
            };
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(io::Error::other(format!("{e:?}")));
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                    ..
                }) => log(&nlas),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

fn log(nlas: &[PacketNla]) {
    let prefix = nlas.iter().find_map(|n| match n {
        PacketNla::Prefix(p) => Some(p.to_string_lossy().into_owned()),
        _ => None,
    });
    let payload = nlas.iter().find_map(|n| match n {
        PacketNla::Payload(p) => Some(p.as_slice()),
        _ => None,
    });
    if let Some(r) = prefix.zip(payload).and_then(|(p, d)| refused(&p, d)) {
        let to = match r.port {
            Some(port) => format!("{}:{port}", r.destination),
            None => r.destination.to_string(),
        };
        info!(workspace_id = %r.workspace_id, destination = %to, protocol = r.protocol,
              "Refused a connection to {to} ({}): the egress rules do not allow it", r.protocol);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_workspace_and_the_destination() {
        // An IPv4 header (20 bytes) to 192.0.2.7, TCP, then ports 40000 -> 443.
        let mut p = vec![
            0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 213, 0, 2, 192, 0, 2, 7,
        ];
        p.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        assert_eq!(
            refused("aw-refused 0f1e2d3c-4b5a-4987-8765-43210fedcba9", &p),
            Some(Refused {
                workspace_id: "0f1e2d3c-4b5a-4987-8765-43210fedcba9".into(),
                destination: Ipv4Addr::new(192, 0, 2, 7),
                protocol: "TCP",
                port: Some(443),
            })
        );
        p[9] = 1;
        assert_eq!(refused("aw-refused x", &p).unwrap().port, None);
        assert_eq!(refused("someone else's", &p), None);
        assert_eq!(refused("aw-refused x", &p[..12]), None);
    }
}
