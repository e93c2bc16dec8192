//! Terminals made inside the container: a pseudo-terminal from the agent's own `/dev/ptmx`
//! (nspawn's: the container's own devpts instance), so the command's terminal is a device of
//! the container's `/dev/pts` and has a name there (`tty`, tmux, sudo, `script` work), and the
//! service holds nothing of the host's `/dev/ptmx`. The agent relays between the terminal and
//! the service's pipes: the stdin pipe is typed into the terminal, the terminal's output goes
//! to the stdout pipe; the service's `RESIZE` messages on the connection set its size.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use agent_workspaces_agent::{KEEP, RESIZE, Reply, spawn::Child};

/// A terminal made for a command: the master, which the agent keeps, and the far end, which
/// the command gets as its stdin, stdout and stderr (and controlling terminal).
pub struct Made {
    pub master: OwnedFd,
    pub peer: OwnedFd,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_size(master: RawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the local struct.
    check(unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// A new terminal of `cols` x `rows` from this container's `/dev/ptmx`; its far end is opened
/// from the master (`TIOCGPTPEER`: no path in `/dev/pts` is looked up).
pub fn open(cols: u16, rows: u16) -> io::Result<Made> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: plain syscalls; every non-negative descriptor returned is ours.
    unsafe {
        let master = OwnedFd::from_raw_fd(check(libc::open(c"/dev/ptmx".as_ptr(), flags))?);
        let unlock: libc::c_int = 0;
        check(libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock))?;
        let peer = OwnedFd::from_raw_fd(check(libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            flags,
        ))?);
        set_size(master.as_raw_fd(), cols, rows)?;
        Ok(Made { master, peer })
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = check(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        check(libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        ))
        .map(drop)
    }
}

/// Bytes held for a side that is not ready, at most (then the other side is not read).
const HELD: usize = 64 * 1024;

/// One read or write; `Ok(None)` when it would block.
fn io_once(r: isize) -> io::Result<Option<usize>> {
    if r >= 0 {
        return Ok(Some(r as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(e),
    }
}

fn read_into(fd: &OwnedFd, held: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut buf = [0u8; 16 * 1024];
    let room = (HELD - held.len()).min(buf.len());
    // SAFETY: read into a local buffer of at least `room` bytes.
    let n = io_once(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), room) })?;
    if let Some(n) = n {
        held.extend_from_slice(&buf[..n]);
    }
    Ok(n)
}

fn write_from(fd: &OwnedFd, held: &mut Vec<u8>) -> io::Result<()> {
    // SAFETY: write from the held bytes.
    if let Some(n) =
        io_once(unsafe { libc::write(fd.as_raw_fd(), held.as_ptr().cast(), held.len()) })?
    {
        held.drain(..n);
    }
    Ok(())
}

/// Relays a command's terminal until the command has exited and its output is over: the
/// terminal closed by its last holder (the service kills what the command left once it
/// learns of the exit), or the service no longer reading the output. The command's exit is
/// sent as `Exited` as it happens. Returns whether the service asked to `KEEP` the connection.
pub fn relay(
    conn: &mut UnixStream,
    child: &Child,
    master: OwnedFd,
    input: OwnedFd,
    output: OwnedFd,
    wait: fn(libc::pid_t) -> i32,
) -> bool {
    let mut keep = false;
    let (mut running, mut conn_open, mut master_open, mut input_open) = (true, true, true, true);
    // The service closed its end of the output: what the terminal says is read and dropped.
    let mut output_gone = false;
    let mut to_master = Vec::new();
    let mut to_output = Vec::new();
    if [&master, &input, &output]
        .iter()
        .any(|fd| set_nonblocking(fd).is_err())
    {
        // Without non-blocking ends the relay could hang: the command still gets its end.
        let code = wait(child.pid);
        let _ = std::io::Write::write_all(conn, &Reply::Exited { code }.encode());
        return false;
    }
    loop {
        if !running && (output_gone || (!master_open && to_output.is_empty())) {
            return keep;
        }
        let ev = |on: bool, events: libc::c_short| if on { events } else { 0 };
        let mut fds = [
            libc::pollfd {
                fd: if conn_open { conn.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if running { child.pidfd.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            // A side whose buffer is full is not looked at (its hangup, which poll reports
            // unasked, is found once there is room to read what it still holds).
            libc::pollfd {
                fd: if master_open && (to_output.len() < HELD || !to_master.is_empty()) {
                    master.as_raw_fd()
                } else {
                    -1
                },
                events: ev(to_output.len() < HELD, libc::POLLIN)
                    | ev(!to_master.is_empty(), libc::POLLOUT),
                revents: 0,
            },
            libc::pollfd {
                fd: if input_open && to_master.len() < HELD {
                    input.as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLIN,
                revents: 0,
            },
            // Its error (the service closed its end) is reported whatever is asked.
            libc::pollfd {
                fd: if output_gone { -1 } else { output.as_raw_fd() },
                events: ev(!to_output.is_empty(), libc::POLLOUT),
                revents: 0,
            },
        ];
        // SAFETY: polling descriptors we hold.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing can be relayed any more: the command ends with it, reaped.
            if running {
                crate::end(child);
            }
            return keep;
        }
        let ready = |i: usize, events: libc::c_short| fds[i].revents & events != 0;
        let gone = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
        if ready(0, libc::POLLIN | gone) {
            match control(conn) {
                Some(Control::Keep) => keep = true,
                Some(Control::Resize(cols, rows)) => {
                    let _ = set_size(master.as_raw_fd(), cols, rows);
                }
                Some(Control::Other) => {}
                None => conn_open = false,
            }
        }
        if ready(1, libc::POLLIN) {
            running = false;
            let code = wait(child.pid);
            if conn_open {
                conn_open =
                    std::io::Write::write_all(conn, &Reply::Exited { code }.encode()).is_ok();
            }
        }
        if ready(2, libc::POLLIN | gone) && to_output.len() < HELD {
            match read_into(&master, &mut to_output) {
                // End of file, or EIO: the last holder of the terminal closed it.
                Ok(Some(0)) | Err(_) => master_open = false,
                Ok(_) if output_gone => to_output.clear(),
                Ok(_) => {}
            }
        }
        if ready(2, libc::POLLOUT) && write_from(&master, &mut to_master).is_err() {
            to_master.clear();
        }
        if ready(3, libc::POLLIN | gone) {
            // The service closed the input: a terminal's input stays open, as its own.
            if matches!(read_into(&input, &mut to_master), Ok(Some(0)) | Err(_)) {
                input_open = false;
            }
        }
        if ready(4, gone)
            || (ready(4, libc::POLLOUT) && write_from(&output, &mut to_output).is_err())
        {
            // The service no longer reads the output: nothing left to relay to.
            output_gone = true;
            to_output.clear();
        }
    }
}

enum Control {
    Keep,
    Resize(u16, u16),
    Other,
}

/// One control message from the service; `None` at the connection's end.
fn control(conn: &mut UnixStream) -> Option<Control> {
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(1) if byte[0] == KEEP => Some(Control::Keep),
        Ok(1) if byte[0] == RESIZE => {
            let mut size = [0u8; 4];
            conn.read_exact(&mut size).ok()?;
            Some(Control::Resize(
                u16::from_le_bytes([size[0], size[1]]),
                u16::from_le_bytes([size[2], size[3]]),
            ))
        }
        Ok(1) => Some(Control::Other),
        _ => None,
    }
}
