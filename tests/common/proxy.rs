//! A userspace fault proxy on a replication path, inside a test namespace.
//!
//! It forwards TCP connections from `listen` to `upstream`. The direction
//! from upstream (the side that accepts: a primary) is parsed message by
//! message — a 13-byte header (tag, generation, payload length), the
//! payload, and a 32-byte MAC on every message but the first (the auth
//! challenge) — so faults hit whole messages: delays and stalls, and, armed
//! once, a flipped bit, a duplicate, a reordered pair, a truncation, or a
//! message replayed from an earlier connection.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netns::NetNs;

const HEAD_LEN: usize = 13;
/// The tag after each sealed message when the pair encrypts (the default,
/// ChaCha20-Poly1305), and when it only authenticates (HMAC-SHA256).
const AEAD_TAG_LEN: usize = 16;
const MAC_TAG_LEN: usize = 32;
const TAG_LOG: u8 = 4;

/// A fault applied to the next log message (then the proxy forwards
/// faithfully again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Corruption {
    /// Flip one bit of its payload.
    FlipBit,
    /// Send it twice.
    Duplicate,
    /// Send the message after it first.
    Reorder,
    /// Send half of it, then close the connection.
    Truncate,
    /// Send a log message captured on an earlier connection (one sealed
    /// under an earlier session key) in front of it.
    ReplayOld,
}

/// What the proxy is doing.
#[derive(Default)]
pub struct ProxyState {
    /// Connections accepted.
    pub connections: AtomicU32,
    /// Log messages forwarded from upstream (all connections).
    pub log_messages: AtomicU32,
    /// Corruptions carried out.
    pub injected: AtomicU32,
    armed: Mutex<Option<Corruption>>,
    /// Every message is held this long before it goes on, until `.1`.
    delay: Mutex<Option<(Duration, Instant)>>,
    /// Nothing goes on before this.
    stall_until: Mutex<Option<Instant>>,
    /// The last log message seen, and on which connection.
    captured: Mutex<Option<(u32, Vec<u8>)>>,
    /// Every byte forwarded from upstream, once [`ProxyState::record`] was
    /// called (at most 256 MiB): what a tap on the link would see.
    recording: Mutex<Option<Vec<u8>>>,
    /// The pair behind it does not encrypt (`[ft] encrypt = false`).
    mac_only: std::sync::atomic::AtomicBool,
}

impl ProxyState {
    /// The pair behind it only authenticates (its tags are longer).
    #[allow(dead_code)]
    pub fn mac_only(&self) {
        self.mac_only.store(true, Ordering::SeqCst);
    }

    fn tag_len(&self) -> usize {
        if self.mac_only.load(Ordering::SeqCst) {
            MAC_TAG_LEN
        } else {
            AEAD_TAG_LEN
        }
    }

    /// Starts keeping every byte forwarded from upstream.
    #[allow(dead_code)]
    pub fn record(&self) {
        *self.recording.lock().unwrap() = Some(Vec::new());
    }

    /// Whether `needle` appeared in what was kept.
    #[allow(dead_code)]
    pub fn recorded_contains(&self, needle: &[u8]) -> bool {
        self.recording
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|r| r.windows(needle.len()).any(|w| w == needle))
    }

    /// Bytes kept so far.
    #[allow(dead_code)]
    pub fn recorded_len(&self) -> usize {
        self.recording.lock().unwrap().as_ref().map_or(0, Vec::len)
    }

    /// Applies `c` to the next log message.
    pub fn arm(&self, c: Corruption) {
        *self.armed.lock().unwrap() = Some(c);
    }

    /// Whether an armed corruption is still waiting for a message.
    pub fn armed(&self) -> bool {
        self.armed.lock().unwrap().is_some()
    }

    /// Holds every message `by` for the next `span`.
    pub fn delay(&self, by: Duration, span: Duration) {
        *self.delay.lock().unwrap() = Some((by, Instant::now() + span));
    }

    /// Forwards nothing for `span`.
    pub fn stall(&self, span: Duration) {
        *self.stall_until.lock().unwrap() = Some(Instant::now() + span);
    }

    fn take(&self, c: Corruption) -> bool {
        let mut armed = self.armed.lock().unwrap();
        if *armed == Some(c) {
            *armed = None;
            true
        } else {
            false
        }
    }
}

/// Runs a proxy from `listen` to `upstream` inside `ns`, in the background,
/// for as long as the test process lives.
pub fn start(ns: &NetNs, listen: &str, upstream: &str) -> Arc<ProxyState> {
    let state = Arc::new(ProxyState::default());
    let path = format!("/var/run/netns/{}", ns.name);
    let (listen, upstream) = (listen.to_string(), upstream.to_string());
    let s = state.clone();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this
        // thread's network namespace (threads it starts inherit it).
        let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
        let listener = TcpListener::bind(&listen).expect("bind proxy");
        bound_tx.send(()).unwrap();
        for down in listener.incoming() {
            let Ok(down) = down else { continue };
            // From the client's own address, as a proxy on the path would
            // appear (the primary checks who connects).
            let from = down.peer_addr().map(|a| a.ip()).ok();
            let Ok(up) = upstream
                .parse()
                .map_err(|_| std::io::Error::other("upstream is not IP:PORT"))
                .and_then(|to| super::netns::connect_from(from, to))
            else {
                continue;
            };
            let n = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
            let (up2, down2) = (up.try_clone().unwrap(), down.try_clone().unwrap());
            // Towards upstream: as is.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &down2, &mut &up2);
                let _ = up2.shutdown(Shutdown::Both);
                let _ = down2.shutdown(Shutdown::Both);
            });
            let s = s.clone();
            std::thread::spawn(move || {
                forward(&up, &down, n, &s);
                let _ = up.shutdown(Shutdown::Both);
                let _ = down.shutdown(Shutdown::Both);
            });
        }
    });
    bound_rx.recv().expect("proxy thread");
    state
}

fn read_message(up: &TcpStream, tag_len: usize) -> Option<Vec<u8>> {
    let mut head = [0u8; HEAD_LEN];
    (&*up).read_exact(&mut head).ok()?;
    let len = u32::from_le_bytes(head[9..13].try_into().unwrap()) as usize;
    let mut message = head.to_vec();
    message.resize(HEAD_LEN + len + tag_len, 0);
    (&*up).read_exact(&mut message[HEAD_LEN..]).ok()?;
    Some(message)
}

fn is_log(message: &[u8], tag_len: usize) -> bool {
    message[0] == TAG_LOG && message.len() > HEAD_LEN + tag_len
}

/// Upstream → downstream, message by message, with the faults asked for.
fn forward(up: &TcpStream, down: &TcpStream, connection: u32, s: &ProxyState) {
    for index in 0u64.. {
        // The first message (the auth challenge) is not sealed.
        let tag_len = if index > 0 { s.tag_len() } else { 0 };
        let Some(mut message) = read_message(up, tag_len) else {
            return;
        };
        if let Some((by, until)) = *s.delay.lock().unwrap() {
            if Instant::now() < until {
                std::thread::sleep(by);
            }
        }
        let stall = *s.stall_until.lock().unwrap();
        if let Some(until) = stall {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        let mut out: Vec<u8> = Vec::new();
        if is_log(&message, tag_len) {
            s.log_messages.fetch_add(1, Ordering::SeqCst);
            let earlier = s
                .captured
                .lock()
                .unwrap()
                .clone()
                .filter(|(c, _)| *c < connection);
            if s.take(Corruption::FlipBit) {
                let len = message.len() - tag_len - HEAD_LEN;
                message[HEAD_LEN + len / 2] ^= 0x10;
                s.injected.fetch_add(1, Ordering::SeqCst);
            } else if s.take(Corruption::Duplicate) {
                out.extend_from_slice(&message);
                s.injected.fetch_add(1, Ordering::SeqCst);
            } else if s.take(Corruption::Truncate) {
                let _ = (&*down).write_all(&message[..message.len() / 2]);
                s.injected.fetch_add(1, Ordering::SeqCst);
                return;
            } else if s.take(Corruption::Reorder) {
                let Some(next) = read_message(up, tag_len) else {
                    return;
                };
                out.extend_from_slice(&next);
                s.injected.fetch_add(1, Ordering::SeqCst);
            } else if let Some((_, old)) = earlier.filter(|_| s.take(Corruption::ReplayOld)) {
                out.extend_from_slice(&old);
                s.injected.fetch_add(1, Ordering::SeqCst);
            } else if *s.armed.lock().unwrap() == Some(Corruption::ReplayOld) {
                // Nothing from an earlier session yet: end this one (the
                // secondary reconnects) and replay on the next.
                *s.captured.lock().unwrap() = Some((connection, message.clone()));
                let _ = (&*down).write_all(&message);
                return;
            }
            *s.captured.lock().unwrap() = Some((connection, message.clone()));
        }
        out.extend_from_slice(&message);
        if let Some(r) = s.recording.lock().unwrap().as_mut() {
            if r.len() < 256 << 20 {
                r.extend_from_slice(&out);
            }
        }
        if (&*down).write_all(&out).is_err() {
            return;
        }
    }
}
