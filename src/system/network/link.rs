//! The host's side of container networks, through the tools that own it: `ip` (iproute2)
//! for links and addresses, `nft` for the table, `getifaddrs` to read what is there. All
//! blocking: called off the event loop.

use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::{Command, Stdio};

use super::nft::LINK_PREFIX;

/// Runs `program args` with `input` on its standard input; its error output is the error.
fn run(program: &str, args: &[&str], input: &str) -> io::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Replaces the service's nftables table as `script` says, in one transaction.
pub fn nft(script: &str) -> io::Result<()> {
    run("nft", &["-f", "-"], script)
}

/// Gives the host end `link` (made by nspawn) its address and brings it up.
pub fn configure_host_end(link: &str, host: Ipv4Addr) -> io::Result<()> {
    run(
        "ip",
        &["-batch", "-"],
        &format!("addr replace {host}/30 dev {link}\nlink set {link} up\n"),
    )
}

/// Configures the container's end (`host0`) from inside its network namespace, entered
/// through the leader's pidfd on a thread of its own that ends afterwards (a thread's
/// namespace is its own; `ip` started there inherits it, and nothing else of the container:
/// not its mount namespace, not its user namespace, not its files).
pub fn configure_inside(
    leader: BorrowedFd<'_>,
    host: Ipv4Addr,
    inside: Ipv4Addr,
) -> io::Result<()> {
    let fd = leader.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a plain syscall on a descriptor borrowed for the scope.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot enter the container's network namespace: {e}"),
                ));
            }
            run(
                "ip",
                &["-batch", "-"],
                &format!(
                    "addr replace {inside}/30 dev host0\nlink set host0 up\n\
                     route replace default via {host} dev host0\n"
                ),
            )
        })
        .join()
        .unwrap_or_else(|_| {
            Err(io::Error::other(
                "the thread that configures host0 panicked",
            ))
        })
    })
}

/// The container links on the host, with their IPv4 address if they have one (from netlink,
/// so in this process's network namespace, whatever `/sys` was mounted for).
pub fn links() -> io::Result<Vec<(String, Option<Ipv4Addr>)>> {
    let mut found: Vec<(String, Option<Ipv4Addr>)> = Vec::new();
    for a in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if !a.interface_name.starts_with(LINK_PREFIX) {
            continue;
        }
        let v4 = a
            .address
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
        match found.iter_mut().find(|(n, _)| *n == a.interface_name) {
            Some(entry) => entry.1 = entry.1.or(v4),
            None => found.push((a.interface_name, v4)),
        }
    }
    Ok(found)
}

/// Removes a container link (both its ends: a veth pair goes whole).
pub fn delete(link: &str) -> io::Result<()> {
    run("ip", &["link", "delete", "dev", link], "")
}

/// Turns IPv4 forwarding on; true when it was off. Containers' traffic is forwarded; the
/// table forwards nothing into a container that it did not start, and nothing between them.
pub fn enable_forwarding() -> io::Result<bool> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(PATH, "1")?;
    Ok(true)
}
