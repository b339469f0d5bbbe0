//! Tap devices for virtio-net in live mode.
//!
//! tandem opens the named tap (`IFF_TAP | IFF_NO_PI`) and configures nothing
//! else on the host: not its MAC (the guest MAC lives only in the virtio-net
//! config), not its addresses, not its bridge. A reader thread turns received
//! frames into `Cause::NetRx`; transmit happens on the vCPU thread with a
//! non-blocking write (a full tap queue drops the frame, as a NIC would).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tandem_replay::{Cause, CauseQueue};

/// `TUNSETIFF` = _IOW('T', 202, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Largest frame read from a tap (64 KiB plus an Ethernet header).
const MAX_FRAME: usize = 65_550;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in an interface name.
    #[error("tap name {0:?} is not a valid interface name (1 to 15 bytes, no '/' or spaces)")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    /// TUNSETIFF failed (no such tap and no right to create one, busy...).
    #[error("cannot attach to tap {name}: {source}")]
    Attach {
        /// The tap.
        name: String,
        /// The error.
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap.
pub struct Tap {
    file: File,
    /// Its name.
    pub name: String,
    dropped_tx: AtomicU64,
}

impl Tap {
    /// Attaches to the tap `name` (the kernel creates it if it does not exist
    /// and we may; tests create theirs with `ip tuntap add`).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq
        // matches in layout and size (16-byte name, then the flags union of
        // 24 bytes); `req` lives across the call and the fd is open.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
            dropped_tx: AtomicU64::new(0),
        })
    }

    /// Sends one frame without blocking; a full queue or a down link drops it.
    pub fn send(&self, frame: &[u8]) {
        if let Err(e) = (&self.file).write(frame) {
            let n = self.dropped_tx.fetch_add(1, Ordering::Relaxed);
            if n == 0 || n.is_power_of_two() {
                tracing::warn!(
                    "tap {}: dropped transmitted frame ({} so far): {e}",
                    self.name,
                    n + 1
                );
            }
        }
    }

    /// Starts the reader thread for virtio-net device `device`.
    pub fn spawn_reader(
        self: &Arc<Self>,
        device: u8,
        queue: CauseQueue,
    ) -> std::io::Result<TapReader> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tap, flag) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("tandem-tap{device}"))
            .spawn(move || tap.read_loop(device, &queue, &flag))?;
        Ok(TapReader {
            stop,
            thread: Some(thread),
        })
    }

    fn read_loop(&self, device: u8, queue: &CauseQueue, stop: &AtomicBool) {
        let mut buf = vec![0u8; MAX_FRAME];
        while !stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1; a 100 ms timeout lets the
            // loop see `stop`.
            let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
            if ready <= 0 {
                continue;
            }
            match (&self.file).read(&mut buf) {
                Ok(0) => return,
                Ok(n) => queue.push(Cause::NetRx {
                    device,
                    frame: buf[..n].to_vec(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("tap {}: read failed, receive stopped: {e}", self.name);
                    return;
                }
            }
        }
    }
}

/// The reader thread of a tap; stops when dropped.
pub struct TapReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for TapReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_touching_the_host() {
        for name in ["", "a/b", "has space", "sixteen-chars-xx"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::BadName(_))),
                "{name:?}"
            );
        }
    }
}
