//! The output rule of a protected pair (DESIGN "Fault tolerance").
//!
//! On the primary, [`GatedOutputs`] holds every network frame, console byte
//! and disk write until the secondary has acknowledged the log position
//! (the stop) that produced it; disk reads go out at once (their data
//! travels in the log). On the secondary, [`FollowerOutputs`] drops disk
//! I/O (only the live side touches shared storage), discards its own output
//! the primary already released, buffers the rest (bounded), and at go-live
//! emits the buffer and forwards everything from then on. Output is
//! at-least-once: a reply may be seen twice, never contradicted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tandem_replay::{BlockOp, Output, Outputs};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Outputs held by the primary until the secondary has what produced them.
pub struct GatedOutputs {
    inner: Arc<dyn Outputs>,
    stop: Arc<AtomicU64>,
    /// (stop, when held, output), oldest first.
    held: Mutex<VecDeque<(u64, Instant, Output)>>,
    /// Everything produced at stops ≤ this may leave.
    acked: AtomicU64,
    /// Everything up to this stop has left (piggybacked to the secondary).
    released: AtomicU64,
    /// Nothing leaves, acked or not: this primary has not heard its
    /// secondary lately and must re-validate its generation first.
    suspended: AtomicBool,
    /// An output was held since the vCPU last asked.
    newly_held: AtomicBool,
    /// Mirrored storage: disk writes go to this host's own replica at once
    /// (its bitmap covers them; a re-sync repairs whatever a failover left
    /// different), so they are never held.
    mirrored: AtomicBool,
    /// `on_guest_crash = "restart-checkpoint"`: the stop of the newest
    /// checkpoint; nothing produced after it leaves (disk writes included),
    /// so a rollback to it never contradicts the world. `u64::MAX`: not in
    /// that mode.
    checkpointed: AtomicU64,
    /// The highest stop whose output (other than a disk read) has left: a
    /// rollback to an older checkpoint is allowed only if none of its output
    /// has.
    emitted_upto: AtomicU64,
    /// A replay: checkpointing starts at the first checkpoint the log has
    /// (output before it passes, as the recording's did at that stop).
    checkpoint_on_first: AtomicBool,
}

impl GatedOutputs {
    /// Gates `inner`; `stop` is the vCPU's current stop.
    pub fn new(inner: Arc<dyn Outputs>, stop: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            stop,
            held: Mutex::new(VecDeque::new()),
            acked: AtomicU64::new(0),
            released: AtomicU64::new(0),
            suspended: AtomicBool::new(false),
            newly_held: AtomicBool::new(false),
            mirrored: AtomicBool::new(false),
            checkpointed: AtomicU64::new(u64::MAX),
            emitted_upto: AtomicU64::new(0),
            checkpoint_on_first: AtomicBool::new(false),
        }
    }

    /// A replay's gate: it holds output for checkpoints once the log shows
    /// one, so the replay emits what the recording let out.
    pub fn set_checkpointing_on_first(&self) {
        self.checkpoint_on_first.store(true, Ordering::Release);
    }

    /// Holds output (disk writes too, mirrored or not) until a checkpoint
    /// at or after the stop that produced it (`restart-checkpoint`).
    pub fn set_checkpointing(&self) {
        self.checkpointed.store(0, Ordering::Release);
    }

    /// Whether output waits for checkpoints.
    fn checkpointing(&self) -> bool {
        self.checkpointed.load(Ordering::Acquire) != u64::MAX
    }

    /// Everything produced at stops up to this may leave (once acked).
    fn bound(&self) -> u64 {
        self.acked
            .load(Ordering::Acquire)
            .min(self.checkpointed.load(Ordering::Acquire))
    }

    fn emit_now(&self, stop: u64, output: Output) {
        if !matches!(
            output,
            Output::BlockSubmit {
                op: BlockOp::Read { .. },
                ..
            }
        ) {
            self.emitted_upto.fetch_max(stop, Ordering::AcqRel);
        }
        self.inner.emit(output);
    }

    /// Mirrored storage: disk requests are never held.
    pub fn set_mirrored(&self, mirrored: bool) {
        self.mirrored.store(mirrored, Ordering::Release);
    }

    /// Holds everything from now on, acked or not, until [`Self::resume`].
    pub fn suspend(&self) {
        let _held = lock(&self.held);
        self.suspended.store(true, Ordering::Release);
    }

    /// Ends a suspension: what was acked meanwhile leaves now.
    pub fn resume(&self) {
        {
            let _held = lock(&self.held);
            self.suspended.store(false, Ordering::Release);
        }
        self.flush_acked();
    }

    /// Whether output is suspended.
    pub fn suspended(&self) -> bool {
        self.suspended.load(Ordering::Acquire)
    }

    /// Emits what the acks cover (unless suspended).
    fn flush_acked(&self) {
        let mut held = lock(&self.held);
        if self.suspended.load(Ordering::Acquire) {
            return;
        }
        let bound = self.bound();
        while held.front().is_some_and(|(s, _, _)| *s <= bound) {
            if let Some((stop, _, output)) = held.pop_front() {
                self.emit_now(stop, output);
            }
        }
        drop(held);
        self.released.fetch_max(
            bound.min(self.stop.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
    }

    /// The secondary has the log up to stop `acked`: release what it covers.
    pub fn release(&self, acked: u64) {
        let previous = self.acked.fetch_max(acked, Ordering::AcqRel);
        if acked <= previous && acked != u64::MAX {
            return;
        }
        self.flush_acked();
    }

    /// No secondary any more (this side won the arbitration): release
    /// everything, now and from now on.
    pub fn open(&self) {
        self.suspended.store(false, Ordering::Release);
        self.release(u64::MAX);
    }

    /// The highest stop whose outputs have all left.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Acquire)
    }

    /// Outputs waiting for an ack.
    pub fn held(&self) -> usize {
        lock(&self.held).len()
    }

    /// How long the oldest output still held has waited, in milliseconds
    /// (0 when nothing is held).
    pub fn oldest_held_ms(&self) -> u64 {
        lock(&self.held)
            .front()
            .map_or(0, |(_, since, _)| since.elapsed().as_millis() as u64)
    }
}

impl Outputs for GatedOutputs {
    fn protect_from(&self, stop: u64) {
        let _held = lock(&self.held);
        self.acked.store(stop.saturating_sub(1), Ordering::Release);
    }

    fn pending(&self) -> bool {
        !lock(&self.held).is_empty()
    }

    fn take_newly_held(&self) -> bool {
        self.newly_held.swap(false, Ordering::AcqRel)
    }

    fn flush(&self) {
        self.inner.flush();
    }

    fn emit(&self, output: Output) {
        let stop = self.stop.load(Ordering::Acquire);
        let immediate = match &output {
            Output::BlockSubmit {
                op: BlockOp::Read { .. },
                ..
            } => true,
            Output::BlockSubmit { .. } => {
                self.mirrored.load(Ordering::Acquire) && !self.checkpointing()
            }
            _ => false,
        };
        let suspended = self.suspended.load(Ordering::Acquire);
        if immediate || (!suspended && stop <= self.bound()) {
            self.emit_now(stop, output);
            return;
        }
        lock(&self.held).push_back((stop, Instant::now(), output));
        self.newly_held.store(true, Ordering::Release);
        // An ack (or a resume) may have raced in between: release again
        // under the lock.
        if stop <= self.bound() {
            self.flush_acked();
        }
    }

    fn checkpoint_taken(&self, stop: u64) {
        if !self.checkpointing() && self.checkpoint_on_first.swap(false, Ordering::AcqRel) {
            self.checkpointed.store(stop, Ordering::Release);
        }
        if self.checkpointing() {
            self.checkpointed.fetch_max(stop, Ordering::AcqRel);
            self.flush_acked();
        }
    }

    fn discard_after(&self, stop: u64) -> bool {
        let mut held = lock(&self.held);
        if self.emitted_upto.load(Ordering::Acquire) > stop {
            return false;
        }
        held.retain(|(s, _, _)| *s <= stop);
        if self.checkpointing() {
            self.checkpointed.fetch_min(stop, Ordering::AcqRel);
        }
        true
    }
}

/// Most outputs a replaying secondary buffers for go-live.
pub const FOLLOWER_BUFFER_MAX: usize = 4096;

/// A replaying secondary's outputs.
pub struct FollowerOutputs {
    inner: Arc<dyn Outputs>,
    stop: Arc<AtomicU64>,
    /// The primary has released everything produced at stops ≤ this.
    released: AtomicU64,
    buffer: Mutex<VecDeque<(u64, Output)>>,
    live: std::sync::atomic::AtomicBool,
    dropped: AtomicU64,
    /// IPv4 addresses the guest used in its own (suppressed) frames, per
    /// NIC, for gratuitous ARP at go-live.
    addresses: Mutex<Vec<(u8, [u8; 4])>>,
}

impl FollowerOutputs {
    /// Follows, emitting to `inner` once live.
    pub fn new(inner: Arc<dyn Outputs>, stop: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            stop,
            released: AtomicU64::new(0),
            buffer: Mutex::new(VecDeque::new()),
            live: Default::default(),
            dropped: AtomicU64::new(0),
            addresses: Mutex::new(Vec::new()),
        }
    }

    /// The guest's IPv4 addresses seen so far, as (NIC, address).
    pub fn addresses(&self) -> Vec<(u8, [u8; 4])> {
        lock(&self.addresses).clone()
    }

    fn snoop(&self, device: u8, frame: &[u8]) {
        if let Some(ip) = source_ipv4(frame) {
            let mut seen = lock(&self.addresses);
            if !seen.contains(&(device, ip)) && seen.len() < 64 {
                seen.push((device, ip));
            }
        }
    }

    /// The primary says it released everything up to stop `released`.
    pub fn primary_released(&self, released: u64) {
        self.released.fetch_max(released, Ordering::AcqRel);
        let mut buffer = lock(&self.buffer);
        while buffer.front().is_some_and(|(s, _)| *s <= released) {
            buffer.pop_front();
        }
    }

    /// Go live: emit what the primary may not have released, then forward.
    pub fn go_live(&self) -> usize {
        let mut buffer = lock(&self.buffer);
        let released = self.released.load(Ordering::Acquire);
        let mut emitted = 0;
        for (stop, output) in buffer.drain(..) {
            if stop > released {
                self.inner.emit(output);
                emitted += 1;
            }
        }
        self.live.store(true, Ordering::Release);
        emitted
    }

    /// Outputs lost to the buffer bound.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Outputs for FollowerOutputs {
    fn protect_from(&self, stop: u64) {
        self.inner.protect_from(stop);
    }

    fn checkpoint_taken(&self, stop: u64) {
        self.inner.checkpoint_taken(stop);
    }

    fn discard_after(&self, stop: u64) -> bool {
        lock(&self.buffer).retain(|(s, _)| *s <= stop);
        self.inner.discard_after(stop)
    }

    fn pending(&self) -> bool {
        self.live.load(Ordering::Acquire) && self.inner.pending()
    }

    fn flush(&self) {
        self.inner.flush();
    }

    fn emit(&self, output: Output) {
        if self.live.load(Ordering::Acquire) {
            self.inner.emit(output);
            return;
        }
        if matches!(output, Output::BlockSubmit { .. }) {
            // Shared storage: only the live side does disk I/O.
            return;
        }
        if let Output::NetTx { device, frame } = &output {
            self.snoop(*device, frame);
        }
        let stop = self.stop.load(Ordering::Acquire);
        if stop <= self.released.load(Ordering::Acquire) {
            return;
        }
        let mut buffer = lock(&self.buffer);
        if buffer.len() >= FOLLOWER_BUFFER_MAX {
            buffer.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        buffer.push_back((stop, output));
    }
}

/// The IPv4 source address of an ARP or IPv4 frame, if it has a usable one.
pub fn source_ipv4(frame: &[u8]) -> Option<[u8; 4]> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip: [u8; 4] = match ethertype {
        0x0806 => frame.get(28..32)?.try_into().ok()?,
        0x0800 => frame.get(26..30)?.try_into().ok()?,
        _ => return None,
    };
    // Not 0.0.0.0, not multicast/broadcast.
    (ip != [0; 4] && ip[0] < 224).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Sink(Mutex<Vec<Output>>);
    impl Outputs for Sink {
        fn emit(&self, output: Output) {
            lock(&self.0).push(output);
        }
    }

    fn frame(n: u8) -> Output {
        Output::NetTx {
            device: 0,
            frame: vec![n],
        }
    }

    #[test]
    fn primary_holds_output_until_acked() {
        let sink = Arc::new(Sink::default());
        let stop = Arc::new(AtomicU64::new(5));
        let gate = GatedOutputs::new(sink.clone(), stop.clone());
        gate.emit(frame(1));
        gate.emit(Output::BlockSubmit {
            device: 0,
            request: 0,
            op: BlockOp::Read {
                sector: 0,
                len: 512,
            },
        });
        assert_eq!(lock(&sink.0).len(), 1, "reads go out at once");
        stop.store(7, Ordering::Release);
        gate.emit(frame(2));
        gate.release(5);
        assert_eq!(lock(&sink.0).len(), 2);
        assert_eq!(gate.held(), 1);
        gate.release(7);
        assert_eq!(lock(&sink.0).len(), 3);
        gate.open();
        gate.emit(frame(3));
        assert_eq!(lock(&sink.0).len(), 4);
    }

    #[test]
    fn checkpointing_holds_output_and_writes_until_a_checkpoint_covers_them() {
        let sink = Arc::new(Sink::default());
        let stop = Arc::new(AtomicU64::new(5));
        let gate = GatedOutputs::new(sink.clone(), stop.clone());
        gate.set_mirrored(true);
        gate.set_checkpointing();
        gate.open();
        let write = |request| Output::BlockSubmit {
            device: 0,
            request,
            op: BlockOp::Write {
                sector: 0,
                data: vec![1; 512],
            },
        };
        gate.emit(frame(1));
        gate.emit(write(0));
        assert_eq!(lock(&sink.0).len(), 0, "acked, mirrored, but no checkpoint");
        gate.checkpoint_taken(5);
        assert_eq!(lock(&sink.0).len(), 2);
        assert_eq!(gate.released(), 5);
        // Produced after the checkpoint: a rollback to it drops them.
        stop.store(9, Ordering::Release);
        gate.emit(frame(2));
        gate.emit(write(1));
        assert!(gate.discard_after(5), "nothing after stop 5 has left");
        gate.checkpoint_taken(12);
        assert_eq!(lock(&sink.0).len(), 2, "the dropped output never leaves");
        // Once output after a checkpoint has left, it is no target.
        stop.store(14, Ordering::Release);
        gate.emit(frame(3));
        gate.checkpoint_taken(15);
        assert_eq!(lock(&sink.0).len(), 3);
        assert!(!gate.discard_after(12), "output of stop 14 has left");
        assert!(gate.discard_after(15));
    }

    #[test]
    fn a_follower_drops_buffered_output_a_rollback_undid() {
        let sink = Arc::new(Sink::default());
        let stop = Arc::new(AtomicU64::new(3));
        let follower = FollowerOutputs::new(sink.clone(), stop.clone());
        follower.emit(frame(1));
        stop.store(8, Ordering::Release);
        follower.emit(frame(2));
        assert!(follower.discard_after(5));
        assert_eq!(follower.go_live(), 1, "only stop 3's output is emitted");
        assert_eq!(*lock(&sink.0), vec![frame(1)]);
    }

    #[test]
    fn a_suspended_gate_releases_nothing_until_resumed() {
        let sink = Arc::new(Sink::default());
        let stop = Arc::new(AtomicU64::new(5));
        let gate = GatedOutputs::new(sink.clone(), stop.clone());
        gate.emit(frame(1));
        gate.suspend();
        // Acked while suspended (a thawed primary reading old acks).
        gate.release(5);
        assert_eq!(lock(&sink.0).len(), 0);
        assert_eq!(gate.released(), 0, "nothing left, nothing reported");
        // Output at an acked stop waits too.
        gate.emit(frame(2));
        gate.emit(Output::BlockSubmit {
            device: 0,
            request: 0,
            op: BlockOp::Write {
                sector: 0,
                data: vec![0; 512],
            },
        });
        assert_eq!(lock(&sink.0).len(), 0);
        assert!(gate.suspended());
        gate.resume();
        assert_eq!(lock(&sink.0).len(), 3);
        assert_eq!(gate.released(), 5);
        gate.suspend();
        gate.open();
        assert!(!gate.suspended(), "a side that runs alone holds nothing");
    }

    #[test]
    fn snooping_finds_ipv4_sources() {
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        arp[28..32].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(source_ipv4(&arp), Some([10, 0, 0, 2]));
        let mut ip = vec![0u8; 34];
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        ip[26..30].copy_from_slice(&[10, 0, 0, 3]);
        assert_eq!(source_ipv4(&ip), Some([10, 0, 0, 3]));
        assert_eq!(source_ipv4(&ip[..20]), None);
        ip[26] = 0;
        ip[27..30].copy_from_slice(&[0, 0, 0]);
        assert_eq!(source_ipv4(&ip), None);
    }

    #[test]
    fn follower_discards_released_and_emits_the_rest_at_go_live() {
        let sink = Arc::new(Sink::default());
        let stop = Arc::new(AtomicU64::new(3));
        let f = FollowerOutputs::new(sink.clone(), stop.clone());
        f.emit(frame(1));
        stop.store(9, Ordering::Release);
        f.emit(frame(2));
        f.primary_released(5);
        assert!(lock(&sink.0).is_empty());
        assert_eq!(f.go_live(), 1);
        assert_eq!(*lock(&sink.0), vec![frame(2)]);
        f.emit(frame(3));
        assert_eq!(lock(&sink.0).len(), 2);
    }
}
