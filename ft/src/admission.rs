//! Connections that have not authenticated yet: how many may be in their
//! handshake at once (overall and per source address), and a reader that
//! holds a handshake to one total deadline.
//!
//! An unauthenticated peer costs a thread and a socket until its handshake
//! ends. Without these limits one peer that dribbles a byte every few
//! seconds, or a crowd of idle ones, keeps the real peer out: a secondary
//! could not join, a witness could not be reached for a claim.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a whole handshake may take, however the peer paces its bytes.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// The largest message accepted before the peer has authenticated (the
/// handshake's own messages are a few dozen bytes).
pub const MAX_PRE_AUTH_MESSAGE: u32 = 4096;

/// How many connections may be in their handshake at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// In all.
    pub total: usize,
    /// From one source address.
    pub per_source: usize,
}

/// The limits for the replication port and the witness: room for a crowd
/// of honest reconnects, not for one source to fill it.
pub const DEFAULT_LIMITS: Limits = Limits {
    total: 64,
    per_source: 8,
};

/// Why a connection was not admitted to its handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many handshakes in progress in all.
    Full { limit: usize },
    /// Too many handshakes in progress from this address.
    SourceFull { source: IpAddr, limit: usize },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full { limit } => {
                write!(f, "{limit} connections are already authenticating")
            }
            Refused::SourceFull { source, limit } => {
                write!(
                    f,
                    "{limit} connections from {source} are already authenticating"
                )
            }
        }
    }
}

/// Counts handshakes in progress.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    pending: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    /// An admission with these limits.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            pending: Mutex::default(),
        })
    }

    /// A place for one handshake from `source`, held until the ticket is
    /// dropped (when the handshake ends, either way).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, Refused> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let total: usize = pending.values().sum();
        if total >= self.limits.total {
            return Err(Refused::Full {
                limit: self.limits.total,
            });
        }
        let from_source = pending.entry(source).or_insert(0);
        if *from_source >= self.limits.per_source {
            return Err(Refused::SourceFull {
                source,
                limit: self.limits.per_source,
            });
        }
        *from_source += 1;
        Ok(Ticket {
            admission: self.clone(),
            source,
        })
    }

    /// Handshakes in progress.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.values().sum()
    }
}

/// One handshake's place; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut pending = self
            .admission
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = pending.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.source);
            }
        }
    }
}

/// Says at most one line a second about refused connections (an attacker
/// opening thousands must not flood the log): `note` returns how many were
/// refused since the last line said, when a line is due.
#[derive(Debug, Default)]
pub struct RefusalLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    /// Counts one refusal; Some(refusals not yet said, this one included)
    /// when it is time to say them.
    pub fn note(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, count) = &mut *state;
        *count += 1;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(count))
    }
}

/// Reads a socket until a total deadline: each read waits only for what is
/// left of it (a socket's own timeout counts per read, so a peer sending a
/// byte just inside it could hold a reader for ever).
pub struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    /// None once lifted: reads wait as the socket's own timeout says.
    deadline: Option<Instant>,
}

impl<'a> DeadlineReader<'a> {
    /// Reads `stream` until `deadline`.
    pub fn new(stream: &'a TcpStream, deadline: Instant) -> Self {
        Self {
            stream,
            deadline: Some(deadline),
        }
    }

    /// The handshake is over: from now on each read waits up to `idle`.
    pub fn lift(&mut self, idle: Duration) -> io::Result<()> {
        self.deadline = None;
        self.stream.set_read_timeout(Some(idle))
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(deadline) = self.deadline else {
            return (&mut &*self.stream).read(buf);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_long());
        }
        self.stream.set_read_timeout(Some(left))?;
        match (&mut &*self.stream).read(buf) {
            // The socket's timeout surfaces as WouldBlock.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(too_long()),
            other => other,
        }
    }
}

fn too_long() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the handshake took too long")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Ipv4Addr, TcpListener};

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn one_source_cannot_take_every_place() {
        let a = Admission::new(Limits {
            total: 4,
            per_source: 2,
        });
        let t1 = a.admit(ip(2)).unwrap();
        let _t2 = a.admit(ip(2)).unwrap();
        assert_eq!(
            a.admit(ip(2)).unwrap_err(),
            Refused::SourceFull {
                source: ip(2),
                limit: 2
            }
        );
        let _t3 = a.admit(ip(3)).unwrap();
        let _t4 = a.admit(ip(1)).unwrap();
        assert_eq!(a.admit(ip(5)).unwrap_err(), Refused::Full { limit: 4 });
        drop(t1);
        assert_eq!(a.pending(), 3);
        assert!(
            a.admit(ip(2)).is_ok(),
            "a finished handshake frees its place"
        );
    }

    #[test]
    fn refusals_are_said_at_most_once_a_second_with_their_count() {
        let log = RefusalLog::default();
        assert_eq!(log.note(), Some(1));
        for _ in 0..99 {
            assert_eq!(log.note(), None);
        }
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(log.note(), Some(100));
    }

    #[test]
    fn a_dribbling_peer_meets_the_total_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dribbler = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            // One byte every 100 ms: each read succeeds well inside any
            // per-read timeout.
            for _ in 0..30 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let (stream, _) = listener.accept().unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let e = DeadlineReader::new(&stream, started + Duration::from_millis(500))
            .read_exact(&mut buf)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        drop(stream);
        dribbler.join().unwrap();
    }
}
