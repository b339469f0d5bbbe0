//! Pre-copy of guest memory to a secondary joining a running primary.
//!
//! The replication side asks for a round; at its next stop (or while it
//! is halted) the vCPU harvests the dirty log and hands over the pages to
//! send: every page for round 0, then the pages written since the previous
//! round. The pages themselves are read by the replication side while the
//! guest runs — a page written during the copy is dirty again and goes in
//! the next round. The last short stop (a full sync point in *delta* mode)
//! carries only the pages written since the last round, with the vCPU and
//! device state, so the guest pauses for a small set of pages, not for all
//! of memory.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tandem_devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use tandem_replay::log::PAGE_SIZE;

#[derive(Default)]
enum Round {
    #[default]
    Idle,
    /// A round is wanted; `all`: every page (round 0).
    Requested { all: bool },
    /// The pages of the round, as guest frame numbers.
    Ready(Vec<u64>),
}

#[derive(Default)]
struct PortState {
    round: Round,
    /// The next full sync point carries only the pages written since the
    /// last round (the joiner has the rest).
    final_delta: bool,
}

/// Where the replication side and the vCPU meet for pre-copy rounds.
#[derive(Default)]
pub struct PrecopyPort {
    state: Mutex<PortState>,
    ready: Condvar,
}

impl PrecopyPort {
    fn lock(&self) -> std::sync::MutexGuard<'_, PortState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for the next round (then kick the vCPU and wake its cause
    /// queue, so a halted guest answers too).
    pub fn request_round(&self, all: bool) {
        self.lock().round = Round::Requested { all };
    }

    /// Waits up to `limit` for the round asked for; None if the vCPU did not
    /// answer in time (the request is withdrawn).
    pub fn wait_round(&self, limit: Duration) -> Option<Vec<u64>> {
        let guard = self.lock();
        let (mut guard, _) = self
            .ready
            .wait_timeout_while(guard, limit, |s| !matches!(s.round, Round::Ready(_)))
            .unwrap_or_else(|p| p.into_inner());
        match std::mem::take(&mut guard.round) {
            Round::Ready(gfns) => Some(gfns),
            _ => None,
        }
    }

    /// Makes the next full sync point a delta over the pre-copied memory.
    pub fn finish_with_delta(&self) {
        self.lock().final_delta = true;
    }

    /// vCPU: the round asked for, if any (`Some(all)`).
    pub(crate) fn requested(&self) -> Option<bool> {
        match self.lock().round {
            Round::Requested { all } => Some(all),
            _ => None,
        }
    }

    /// vCPU: hands over a round's pages.
    pub(crate) fn deliver(&self, gfns: Vec<u64>) {
        self.lock().round = Round::Ready(gfns);
        self.ready.notify_all();
    }

    /// vCPU: whether this full sync point is a delta (and clears it).
    pub(crate) fn take_final_delta(&self) -> bool {
        std::mem::take(&mut self.lock().final_delta)
    }
}

/// Reads guest memory from outside the vCPU thread (pre-copy).
#[derive(Clone)]
pub struct MemoryReader {
    memory: GuestMemoryMmap,
}

impl MemoryReader {
    pub(crate) fn new(memory: GuestMemoryMmap) -> Self {
        Self { memory }
    }

    /// Copies page `gfn` into `out` (PAGE_SIZE bytes). The guest may be
    /// writing it meanwhile: the copy may be torn, and the page is then
    /// dirty and sent again.
    pub fn read_page(&self, gfn: u64, out: &mut [u8]) -> Result<(), String> {
        self.memory
            .read_slice(out, GuestAddress(gfn * PAGE_SIZE as u64))
            .map_err(|e| format!("page {gfn:#x}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_round_goes_from_request_to_delivery_once() {
        let port = Arc::new(PrecopyPort::default());
        assert_eq!(port.requested(), None);
        port.request_round(true);
        assert_eq!(port.requested(), Some(true));
        let vcpu = port.clone();
        let t = std::thread::spawn(move || vcpu.deliver(vec![1, 2, 3]));
        assert_eq!(port.wait_round(Duration::from_secs(5)), Some(vec![1, 2, 3]));
        t.join().unwrap();
        // Taken: nothing pending, nothing more to wait for.
        assert_eq!(port.requested(), None);
        assert_eq!(port.wait_round(Duration::from_millis(10)), None);
        assert!(!port.take_final_delta());
        port.finish_with_delta();
        assert!(port.take_final_delta());
        assert!(!port.take_final_delta());
    }

    #[test]
    fn an_unanswered_request_is_withdrawn() {
        let port = PrecopyPort::default();
        port.request_round(false);
        assert_eq!(port.wait_round(Duration::from_millis(10)), None);
        assert_eq!(port.requested(), None);
    }
}
