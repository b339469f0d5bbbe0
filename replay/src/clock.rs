//! Guest time.
//!
//! Devices never read a host clock. They ask a [`Clock`] for *guest time*, in
//! nanoseconds since the VM was created. The vCPU thread advances a
//! [`GuestClock`] once per stop (from the host's monotonic clock when live,
//! later from the log when replaying), so every device read inside one stop
//! sees the same instant, and tests drive devices by setting it by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A source of guest time.
pub trait Clock: Send + Sync {
    /// Guest time in nanoseconds since the VM was created.
    fn now_ns(&self) -> u64;
}

/// Guest time as set by the vCPU thread at each stop.
///
/// Clones share the same instant. Time never goes backwards: [`GuestClock::advance_to`]
/// ignores an earlier value.
#[derive(Clone, Debug, Default)]
pub struct GuestClock {
    now_ns: Arc<AtomicU64>,
}

impl GuestClock {
    /// A clock at guest time 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves guest time forward to `ns`; returns true if it advanced.
    pub fn advance_to(&self, ns: u64) -> bool {
        self.now_ns.fetch_max(ns, Ordering::AcqRel) < ns
    }
}

impl Clock for GuestClock {
    fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_time_and_time_never_goes_back() {
        let clock = GuestClock::new();
        let view = clock.clone();
        assert_eq!(view.now_ns(), 0);
        assert!(clock.advance_to(1_000));
        assert_eq!(view.now_ns(), 1_000);
        assert!(!clock.advance_to(500));
        assert_eq!(view.now_ns(), 1_000);
        assert!(!clock.advance_to(1_000));
    }
}
