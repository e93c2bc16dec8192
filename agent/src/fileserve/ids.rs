//! Who serves a file request: the server itself, or the user (and group) the request names,
//! looked up in the server's own `/etc/passwd` and `/etc/group` (the container's, inside one).
//! The calling thread takes that user's file system ids and groups for the request (Linux
//! keeps them per thread when set by the raw system calls), so the kernel checks permissions
//! as that user and what is made is theirs; they are given back when the request is served.

use super::{Failure, Result};
use crate::files::FileErrorKind;

/// Bytes of `/etc/passwd` or `/etc/group` read at most.
const MAX_DB: u64 = 4 << 20;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Identity {
    uid: Option<u32>,
    gid: Option<u32>,
    groups: Vec<u32>,
}

/// The lines of a colon-separated database, read bounded (a missing one is empty).
fn db(path: &str) -> Vec<Vec<String>> {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_DB).read_to_string(&mut text);
    }
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_owned).collect())
        .collect()
}

impl Identity {
    /// The user and group named (by name or number); empty: none.
    pub fn resolve(user: &[u8], group: &[u8]) -> Result<Self> {
        Self::resolve_in(user, group, &db("/etc/passwd"), &db("/etc/group"))
    }

    fn resolve_in(
        user: &[u8],
        group: &[u8],
        passwd: &[Vec<String>],
        groups: &[Vec<String>],
    ) -> Result<Self> {
        let mut id = Self::default();
        let text = |b: &[u8], what: &str| {
            std::str::from_utf8(b).map(str::to_owned).map_err(|_| {
                Failure::new(
                    FileErrorKind::Invalid,
                    b"",
                    format!("the {what} is not UTF-8"),
                )
            })
        };
        if !user.is_empty() {
            let user = text(user, "user")?;
            let found = passwd.iter().find(|f| {
                f.len() >= 4 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user))
            });
            let (uid, gid, name) = match (found, user.parse::<u32>()) {
                (Some(f), _) => (f[2].parse().ok(), f[3].parse().ok(), Some(f[0].clone())),
                // A number no entry names: its own number as group too.
                (None, Ok(n)) => (Some(n), Some(n), None),
                (None, Err(_)) => (None, None, None),
            };
            let Some(uid) = uid else {
                return Err(Failure::new(
                    FileErrorKind::Invalid,
                    b"",
                    format!("no user '{user}' in /etc/passwd"),
                ));
            };
            id.uid = Some(uid);
            id.gid = gid;
            if let Some(name) = name {
                id.groups = groups
                    .iter()
                    .filter(|g| g.len() >= 4 && g[3].split(',').any(|m| m == name))
                    .filter_map(|g| g[2].parse().ok())
                    .collect();
            }
        }
        if !group.is_empty() {
            let group = text(group, "group")?;
            let gid = groups
                .iter()
                .find(|g| g.len() >= 3 && g[0] == group)
                .and_then(|g| g[2].parse().ok())
                .or_else(|| group.parse().ok());
            let Some(gid) = gid else {
                return Err(Failure::new(
                    FileErrorKind::Invalid,
                    b"",
                    format!("no group '{group}' in /etc/group"),
                ));
            };
            id.gid = Some(gid);
        }
        if let Some(g) = id.gid
            && !id.groups.contains(&g)
        {
            id.groups.push(g);
        }
        Ok(id)
    }

    /// Takes this identity for the calling thread until the guard is dropped.
    pub fn assume(&self) -> std::io::Result<Guard> {
        if self.uid.is_none() && self.gid.is_none() {
            return Ok(Guard(None));
        }
        // SAFETY: setfsuid(-1) and setfsgid(-1) change nothing and return the current ids;
        // getgroups into a buffer of the size given.
        let before = unsafe {
            let fsuid = libc::syscall(libc::SYS_setfsuid, -1i32 as libc::c_long) as u32;
            let fsgid = libc::syscall(libc::SYS_setfsgid, -1i32 as libc::c_long) as u32;
            let n = libc::getgroups(0, std::ptr::null_mut());
            let mut groups = vec![0 as libc::gid_t; n.max(0) as usize];
            let n = libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr());
            groups.truncate(n.max(0) as usize);
            Saved {
                fsuid,
                fsgid,
                groups,
            }
        };
        let guard = Guard(Some(before));
        if self.uid.is_some() {
            set_groups(&self.groups)?;
        }
        if let Some(g) = self.gid {
            set_fs(libc::SYS_setfsgid, g)?;
        }
        if let Some(u) = self.uid {
            set_fs(libc::SYS_setfsuid, u)?;
        }
        Ok(guard)
    }
}

/// The raw system call: glibc's wrapper would change every thread of the process.
fn set_groups(groups: &[u32]) -> std::io::Result<()> {
    // SAFETY: a list of the length given.
    if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `setfsuid`/`setfsgid` report no error: the id is read back to see it took.
fn set_fs(call: libc::c_long, id: u32) -> std::io::Result<()> {
    // SAFETY: plain system calls on this thread's credentials.
    unsafe {
        libc::syscall(call, id as libc::c_long);
        if libc::syscall(call, -1i32 as libc::c_long) as u32 != id {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    Ok(())
}

struct Saved {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
}

/// Gives the thread its own ids back.
pub struct Guard(Option<Saved>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            let _ = set_fs(libc::SYS_setfsuid, s.fsuid);
            let _ = set_fs(libc::SYS_setfsgid, s.fsgid);
            let _ = set_groups(&s.groups);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<Vec<String>> {
        text.lines()
            .map(|l| l.split(':').map(str::to_owned).collect())
            .collect()
    }

    #[test]
    fn users_and_groups_by_name_or_number() {
        let passwd = lines("root:x:0:0::/root:/bin/bash\nagent:x:1000:1000::/home/agent:/bin/sh");
        let group = lines("root:x:0:\nagent:x:1000:\ndev:x:2000:agent,other\nstaff:x:50:");
        let r =
            |u: &str, g: &str| Identity::resolve_in(u.as_bytes(), g.as_bytes(), &passwd, &group);
        assert_eq!(r("", "").unwrap(), Identity::default());
        let agent = r("agent", "").unwrap();
        assert_eq!((agent.uid, agent.gid), (Some(1000), Some(1000)));
        assert_eq!(agent.groups, vec![2000, 1000]);
        assert_eq!(r("1000", "").unwrap(), agent);
        let other = r("4242", "staff").unwrap();
        assert_eq!(
            (other.uid, other.gid, other.groups),
            (Some(4242), Some(50), vec![50])
        );
        assert_eq!(r("", "60").unwrap().gid, Some(60));
        assert!(r("nosuch", "").is_err());
        assert!(r("", "nosuch").is_err());
    }

    #[test]
    fn an_identity_is_this_threads_only_and_given_back() {
        // SAFETY: reading ids.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root may take another user's ids
        }
        let fsuid = || unsafe { libc::syscall(libc::SYS_setfsuid, -1i32 as libc::c_long) as u32 };
        let id = Identity {
            uid: Some(4242),
            gid: Some(4242),
            groups: vec![4242],
        };
        let (held, check) = std::sync::mpsc::channel();
        let (done, release) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let guard = id.assume().unwrap();
            held.send(fsuid()).unwrap();
            release.recv().unwrap();
            drop(guard);
            fsuid()
        });
        assert_eq!(check.recv().unwrap(), 4242);
        // Another thread keeps its own.
        assert_eq!(fsuid(), 0);
        done.send(()).unwrap();
        assert_eq!(t.join().unwrap(), 0, "given back");
    }
}
