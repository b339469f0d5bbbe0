//! Unix sockets (control, console) that only their owner, root and an
//! optional group (`[ft] socket_group`) can use.
//!
//! Three layers, so that no single mistake opens them: a directory this
//! process creates for a socket is mode 0700; the socket is bound under a
//! temporary name, given mode 0600 (0660 and the group with a group) and
//! only then renamed into place, so it is never reachable with the umask's
//! mode; and every client's credentials (`SO_PEERCRED`) are checked when
//! it connects, whatever the file's mode has become since.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Who may use this host's local sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The user this process runs as (the sockets' owner).
    owner: u32,
    /// A group whose members may use them too.
    group: Option<u32>,
}

impl Access {
    /// The owner (this process's user), root, and `group` if given.
    pub fn new(group: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = unsafe { libc::geteuid() };
        Self { owner, group }
    }

    /// Binds a socket at `path` (replacing a stale one) with this access.
    pub fn bind(&self, path: &Path) -> io::Result<UnixListener> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
        }
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.new", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let _ = std::fs::remove_file(&temp);
        let listener = UnixListener::bind(&temp)?;
        let placed = self
            .restrict(&temp)
            .and_then(|()| std::fs::rename(&temp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(listener)
    }

    /// Gives the socket file its mode (and group).
    fn restrict(&self, path: &Path) -> io::Result<()> {
        let mode = match self.group {
            None => 0o600,
            Some(gid) => {
                let c = CString::new(path.as_os_str().as_bytes())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
                // SAFETY: a valid NUL-terminated path; -1 keeps the owner.
                if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                0o660
            }
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }

    /// Whether the client on `stream` may use the socket: Err says who it
    /// is and who may.
    pub fn check(&self, stream: &UnixStream) -> Result<(), String> {
        let (uid, gid) =
            peer_credentials(stream).map_err(|e| format!("cannot tell who the client is: {e}"))?;
        if uid == 0 || uid == self.owner || self.group.is_some_and(|g| g == gid) {
            return Ok(());
        }
        Err(match self.group {
            None => format!(
                "permission denied: uid {uid} is not root or the owner (uid {})",
                self.owner
            ),
            Some(g) => format!(
                "permission denied: uid {uid} (gid {gid}) is not root, the owner (uid {}) or in group {g}",
                self.owner
            ),
        })
    }
}

/// The connected client's user and group (`SO_PEERCRED`).
fn peer_credentials(stream: &UnixStream) -> io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one `ucred` into the buffer of `len` bytes
    // we pass, on a socket descriptor `stream` keeps open.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.uid, cred.gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_socket_is_private_from_birth_whatever_the_umask() {
        let dir = std::env::temp_dir().join(format!("tandem-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("x.ctl");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let bound = Access::new(None).bind(&path);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let _listener = bound.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let parent = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(parent.mode() & 0o777, 0o700);
        // No temporary name is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.ctl")]);
        // Its owner (this process) passes the credentials check.
        let client = UnixStream::connect(&path).unwrap();
        let (server, _) = _listener.accept().unwrap();
        assert_eq!(Access::new(None).check(&server), Ok(()));
        drop(client);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn others_are_refused_by_their_credentials() {
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        // Pretend the sockets belong to someone else: this process (root
        // or not) is then a stranger unless it is root.
        let access = Access {
            owner: me.wrapping_add(1),
            group: None,
        };
        let verdict = access.check(&a);
        if me == 0 {
            assert_eq!(verdict, Ok(()), "root may always");
        } else {
            assert!(verdict.unwrap_err().contains("permission denied"));
        }
        assert_eq!(tandem_config::group_id("root"), Some(0));
        assert_eq!(tandem_config::group_id("no-such-group-tandem"), None);
    }
}
