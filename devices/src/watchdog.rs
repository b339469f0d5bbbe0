//! A guest watchdog (I/O port 0x508, 32-bit): the guest arms it with a
//! timeout and must pet it before the timeout passes, or it counts as hung.
//!
//! A 32-bit write of `ms` (1..=600000) arms the watchdog, or pets it: the
//! deadline becomes now + `ms` of guest time. A write of 0 disarms it. A
//! read returns the armed timeout in ms (0: disarmed). Guest time only moves
//! at stops where the log says so, so the expiry is seen at the same stop
//! on both sides of a pair. An expiry is a guest crash (a hang), handled by
//! the `on_guest_crash` policy. Present from device-model version 3.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_replay::Clock;

use crate::{BusDevice, VmRequest};

/// The port.
pub const WATCHDOG_PORT: u64 = 0x508;
/// Longest timeout accepted (10 minutes).
pub const MAX_TIMEOUT_MS: u32 = 600_000;

/// The watchdog's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchdogState {
    /// The armed timeout in ms (0: disarmed).
    pub timeout_ms: u32,
    /// Guest time (ns) by which the guest must pet it.
    pub deadline_ns: Option<u64>,
}

/// The watchdog.
pub struct Watchdog {
    state: WatchdogState,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("state", &self.state)
            .finish()
    }
}

impl Watchdog {
    /// A disarmed watchdog on guest time `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            state: WatchdogState::default(),
            clock,
        }
    }

    /// A copy of the device state.
    pub fn state(&self) -> WatchdogState {
        self.state.clone()
    }

    /// Replaces the device state.
    pub fn set_state(&mut self, state: WatchdogState) {
        self.state = state;
    }

    /// Moves an armed deadline `ns` later (a guest rolled back to a
    /// checkpoint did not live through the time since).
    pub fn postpone(&mut self, ns: u64) {
        if let Some(d) = self.state.deadline_ns.as_mut() {
            *d = d.saturating_add(ns);
        }
    }

    /// When it expires, if armed.
    pub fn deadline_ns(&self) -> Option<u64> {
        self.state.deadline_ns
    }

    /// Whether the deadline has passed (and disarms it: one expiry, one
    /// crash event).
    pub fn take_expired(&mut self) -> bool {
        match self.state.deadline_ns {
            Some(d) if self.clock.now_ns() >= d => {
                self.state = WatchdogState::default();
                true
            }
            _ => false,
        }
    }
}

impl BusDevice for Watchdog {
    fn name(&self) -> &'static str {
        "watchdog"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.state.timeout_ms.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i).copied())
                .unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        // Only a whole 32-bit write counts.
        let ms = u32::from_le_bytes(data.try_into().ok()?);
        if offset != 0 {
            return None;
        }
        if ms == 0 {
            self.state = WatchdogState::default();
        } else {
            let ms = ms.min(MAX_TIMEOUT_MS);
            self.state.timeout_ms = ms;
            self.state.deadline_ns = Some(
                self.clock
                    .now_ns()
                    .saturating_add(u64::from(ms) * 1_000_000),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct FakeClock(AtomicU64);
    impl Clock for FakeClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn expires_unless_petted_and_only_once() {
        let clock = Arc::new(FakeClock(AtomicU64::new(0)));
        let mut w = Watchdog::new(clock.clone());
        assert!(!w.take_expired(), "disarmed");
        w.write(0, &100u32.to_le_bytes());
        clock.0.store(90_000_000, Ordering::Relaxed);
        assert!(!w.take_expired());
        w.write(0, &100u32.to_le_bytes()); // pet: deadline 190 ms
        clock.0.store(150_000_000, Ordering::Relaxed);
        assert!(!w.take_expired());
        clock.0.store(190_000_000, Ordering::Relaxed);
        assert!(w.take_expired());
        assert!(!w.take_expired(), "one expiry, one event");
        let mut b = [0u8; 4];
        w.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        w.write(0, &[1, 2]); // not a 32-bit write: ignored
        assert_eq!(w.deadline_ns(), None);
        w.write(0, &u32::MAX.to_le_bytes());
        w.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), MAX_TIMEOUT_MS);
        w.write(0, &0u32.to_le_bytes());
        assert_eq!(w.deadline_ns(), None);
    }
}
