//! When a peer counts as silent: the decision each side's monitor makes
//! every heartbeat, kept apart from sockets and threads so it can be tested
//! with plain numbers.
//!
//! Silence is measured from the last message this side *read*. A side that
//! was itself frozen (SIGSTOP, a stalled host, a starved process) or whose
//! reader is behind has not read what the peer sent meanwhile: those bytes
//! wait in its socket. Counting that time as the peer's silence made a
//! thawed secondary take over from a healthy primary. So:
//!
//! - bytes waiting unread on the link count as hearing from the peer now;
//! - a monitor tick that comes much later than its period means this side
//!   stalled: silence is counted afresh from the tick (the peer gets a whole
//!   timeout from this side's thaw before it counts as gone).

/// The silence decision of one monitor.
#[derive(Debug)]
pub struct SilenceWatch {
    /// The failover timeout, ms.
    timeout_ms: u64,
    /// A tick later than this after the previous one is a stall of this
    /// side, ms.
    stall_ms: u64,
    /// The previous tick, ms (None: none yet).
    last_tick: Option<u64>,
    /// Silence is not counted from before this instant, ms: this side's
    /// last stall, or the last time unread bytes waited.
    grace_from: u64,
    /// Stalls of this side seen so far.
    stalls: u64,
}

/// What a tick found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The peer was heard recently enough (or this side just thawed).
    Alive,
    /// The peer has been silent for this many ms, at least the timeout.
    Silent(u64),
}

impl SilenceWatch {
    /// A watch for `timeout_ms` of silence, ticked every `period_ms`.
    pub fn new(timeout_ms: u64, period_ms: u64) -> Self {
        Self {
            timeout_ms,
            // A tick late by a quarter of the timeout (and at least four
            // periods) is a stall: shorter delays cannot make a peer look
            // silent for a whole timeout.
            stall_ms: (timeout_ms / 4).max(period_ms.saturating_mul(4)),
            last_tick: None,
            grace_from: 0,
            stalls: 0,
        }
    }

    /// One monitor tick at `now` (ms on a monotonic clock); `heard` is when
    /// the last message from the peer was read, `unread` whether bytes from
    /// the peer wait unread on the link right now.
    pub fn tick(&mut self, now: u64, heard: u64, unread: bool) -> Verdict {
        if let Some(prev) = self.last_tick {
            let gap = now.saturating_sub(prev);
            if gap > self.stall_ms {
                self.stalls += 1;
                self.grace_from = now;
                tracing::warn!(
                    "this side stalled for {gap} ms (frozen or starved): the peer's silence counts from now"
                );
            }
        }
        self.last_tick = Some(now);
        if unread {
            self.grace_from = now;
        }
        let silent = self.silent_since(now, heard);
        if silent >= self.timeout_ms {
            Verdict::Silent(silent)
        } else {
            Verdict::Alive
        }
    }

    /// How long the peer counts as silent at `now` for something last seen
    /// at `seen` (this side's stalls and unread bytes excluded).
    pub fn silent_since(&self, now: u64, seen: u64) -> u64 {
        now.saturating_sub(seen.max(self.grace_from))
    }

    /// Stalls of this side seen so far.
    #[cfg(test)]
    pub fn stalls(&self) -> u64 {
        self.stalls
    }
}

/// Bytes waiting unread in a socket's receive queue (0 when it cannot
/// tell).
pub fn unread_bytes(socket: &impl std::os::fd::AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which refers to
    // a live local of that type; the fd is open for the borrow's lifetime.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    if ret < 0 {
        0
    } else {
        usize::try_from(n).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_past_the_timeout_is_silent() {
        let mut w = SilenceWatch::new(1000, 50);
        let mut now = 0;
        while now < 1000 {
            assert_eq!(w.tick(now, 0, false), Verdict::Alive, "at {now}");
            now += 50;
        }
        assert_eq!(w.tick(1000, 0, false), Verdict::Silent(1000));
    }

    #[test]
    fn hearing_resets_the_silence() {
        let mut w = SilenceWatch::new(1000, 50);
        for now in (0..=2000).step_by(50) {
            assert_eq!(w.tick(now, now.saturating_sub(100), false), Verdict::Alive);
        }
    }

    #[test]
    fn a_stall_of_this_side_is_not_the_peers_silence() {
        // Frozen for 5 s with a 1 s timeout: the peer's messages wait in
        // the socket, so the thaw starts a fresh timeout.
        let mut w = SilenceWatch::new(1000, 50);
        assert_eq!(w.tick(0, 0, false), Verdict::Alive);
        assert_eq!(w.tick(50, 50, false), Verdict::Alive);
        assert_eq!(w.tick(5050, 50, false), Verdict::Alive);
        assert_eq!(w.stalls(), 1);
        // Still nothing read a whole timeout after the thaw: silent, and
        // the silence reported counts from this side's thaw.
        let mut now = 5100;
        while now < 6050 {
            assert_eq!(w.tick(now, 50, false), Verdict::Alive, "at {now}");
            now += 50;
        }
        assert_eq!(w.tick(6050, 50, false), Verdict::Silent(1000));
    }

    #[test]
    fn unread_bytes_count_as_hearing() {
        // The reader is behind (blocked on replay): bytes wait unread.
        let mut w = SilenceWatch::new(1000, 50);
        for now in (0..=3000).step_by(50) {
            assert_eq!(w.tick(now, 0, true), Verdict::Alive);
        }
        // Once drained with nothing new, silence counts from then.
        for now in (3050..4000).step_by(50) {
            assert_eq!(w.tick(now, 0, false), Verdict::Alive, "at {now}");
        }
        assert_eq!(w.tick(4000, 0, false), Verdict::Silent(1000));
    }

    #[test]
    fn late_ticks_under_load_are_not_stalls() {
        // Ticks 150 ms late on a busy host still fail over in time.
        let mut w = SilenceWatch::new(1000, 50);
        let mut now = 0;
        let mut verdict = Verdict::Alive;
        while verdict == Verdict::Alive {
            now += 200;
            verdict = w.tick(now, 0, false);
        }
        assert_eq!(w.stalls(), 0);
        assert_eq!(verdict, Verdict::Silent(1000));
    }

    #[test]
    fn unread_bytes_of_a_socket_are_counted() {
        use std::io::Write;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(unread_bytes(&b), 0);
        a.write_all(b"hello").unwrap();
        assert_eq!(unread_bytes(&b), 5);
    }
}
