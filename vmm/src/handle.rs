//! [`VmHandle`]: what other threads (fault tolerance, the control socket)
//! may ask of a running VM and read from it, typed. The vCPU keeps its
//! atomics to itself; a handle offers requests (stop, kick, a full or a
//! repair's sync point, the end of a replay, whether held output waits for
//! verified epochs) and [`VmFigures`], a snapshot of the counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tandem_replay::CauseQueue;

use crate::kick::Kicker;
use crate::vcpu::{LiveCounters, Phase, SyncReason};

/// A handle on a running VM, cheap to clone and to share between threads.
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) counters: Arc<LiveCounters>,
    pub(crate) guest_crashes: Arc<AtomicU64>,
    /// 1 + the last epoch a replay found diverged (0: none).
    pub(crate) divergence_epoch: Arc<AtomicU64>,
    pub(crate) verified_stop: Arc<AtomicU64>,
    pub(crate) full_sync_request: Arc<AtomicBool>,
    pub(crate) full_sync_stop: Arc<AtomicU64>,
    /// A sync point (not a full one) is wanted at the next kick stop.
    pub(crate) sync_request: Arc<AtomicBool>,
    /// Held output waits for verified epochs (they end sooner then).
    pub(crate) output_awaits_verification: Arc<AtomicBool>,
    pub(crate) stopper: VmStopper,
    pub(crate) kicker: Kicker,
}

/// The VM's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmFigures {
    /// Deterministic stops.
    pub stops: u64,
    /// Sync points logged or installed.
    pub sync_points: u64,
    /// Epoch ends logged or checked.
    pub epochs: u64,
    /// Epochs verified with no sync point inside.
    pub epochs_verified: u64,
    /// Epochs that matched but held a sync point.
    pub epochs_transferred: u64,
    /// Epochs that diverged.
    pub divergences: u64,
    /// Checkpoints taken (`restart-checkpoint`).
    pub checkpoints: u64,
    /// Guest crashes recovered by rolling back to a checkpoint.
    pub guest_rollbacks: u64,
    /// Guest crashes recovered by rebooting the guest.
    pub guest_reboots: u64,
    /// Guest crashes rebooted so far (all policies).
    pub guest_crashes: u64,
    /// Positioned stops logged or landed.
    pub positioned_stops: u64,
    /// Recording: sync points logged at kick stops that could not be
    /// positioned (no counter, or an uncountable state).
    pub sync_points_unpositioned: u64,
    /// Recording: sync points logged because `--sync-interval` came due.
    pub sync_points_interval: u64,
    /// Recording: sync points asked for (repair requests).
    pub sync_points_requested: u64,
    /// Recording: full sync points for a joining secondary.
    pub sync_points_full: u64,
    /// Recording: sync points instead of positioned stops while the
    /// secondary's replay catches up.
    pub sync_points_catch_up: u64,
    /// Interrupts injected at the guest's own exits (no kick needed).
    pub irq_at_own_exits: u64,
    /// Replaying: the median landing time so far, µs (0: none yet).
    pub landing_p50_us: u64,
    /// Replaying: the 99th percentile landing time so far, µs.
    pub landing_p99_us: u64,
    /// The vCPU thread's wall time so far, ms by phase: in `KVM_RUN`,
    /// ending or checking epochs, logging or installing sync points, asleep
    /// in HLT, leaving stops (brake, waiting for the log).
    pub vcpu_ms_guest: u64,
    /// See `vcpu_ms_guest`.
    pub vcpu_ms_epoch_ends: u64,
    /// See `vcpu_ms_guest`.
    pub vcpu_ms_sync_points: u64,
    /// See `vcpu_ms_guest`.
    pub vcpu_ms_halted: u64,
    /// See `vcpu_ms_guest`.
    pub vcpu_ms_leaving: u64,
}

impl VmHandle {
    /// The counters now.
    pub fn figures(&self) -> VmFigures {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VmFigures {
            stops: get(&c.stops),
            sync_points: get(&c.sync_points),
            epochs: get(&c.epochs),
            epochs_verified: get(&c.epochs_verified),
            epochs_transferred: get(&c.epochs_transferred),
            divergences: get(&c.divergences),
            checkpoints: get(&c.checkpoints),
            guest_rollbacks: get(&c.guest_rollbacks),
            guest_reboots: get(&c.guest_reboots),
            guest_crashes: get(&self.guest_crashes),
            positioned_stops: get(&c.positioned),
            sync_points_unpositioned: get(&c.sync_by_reason[SyncReason::Unpositioned as usize]),
            sync_points_interval: get(&c.sync_by_reason[SyncReason::Interval as usize]),
            sync_points_requested: get(&c.sync_by_reason[SyncReason::Requested as usize]),
            sync_points_full: get(&c.sync_by_reason[SyncReason::Full as usize]),
            sync_points_catch_up: get(&c.sync_by_reason[SyncReason::CatchUp as usize]),
            irq_at_own_exits: get(&c.irq_at_own_exits),
            landing_p50_us: get(&c.landing_p50_us),
            landing_p99_us: get(&c.landing_p99_us),
            vcpu_ms_guest: get(&c.phase_us[Phase::Guest as usize]) / 1000,
            vcpu_ms_epoch_ends: get(&c.phase_us[Phase::EpochEnds as usize]) / 1000,
            vcpu_ms_sync_points: get(&c.phase_us[Phase::SyncPoints as usize]) / 1000,
            vcpu_ms_halted: get(&c.phase_us[Phase::Halted as usize]) / 1000,
            vcpu_ms_leaving: get(&c.phase_us[Phase::Leaving as usize]) / 1000,
        }
    }

    /// The stop the vCPU is at: a replay has executed up to it.
    pub fn current_stop(&self) -> u64 {
        self.counters.at_stop.load(Ordering::Relaxed)
    }

    /// A replay: the stop of the last epoch it verified (0: none yet).
    pub fn verified_stop(&self) -> u64 {
        self.verified_stop.load(Ordering::Acquire)
    }

    /// A replay: the last epoch it found diverged, if any.
    pub fn last_divergence(&self) -> Option<u64> {
        self.divergence_epoch.load(Ordering::Acquire).checked_sub(1)
    }

    /// A follower that replayed the whole log: everything counts as
    /// verified (a `replayed` commit releases the last output on this).
    pub fn mark_replayed_to_end(&self) {
        self.verified_stop.store(u64::MAX, Ordering::Release);
    }

    /// Recording: asks for a full sync point at the next stop (where a
    /// joining secondary starts).
    pub fn request_full_sync(&self) {
        self.full_sync_request.store(true, Ordering::Release);
    }

    /// Whether a requested full sync point is still to come.
    pub fn full_sync_pending(&self) -> bool {
        self.full_sync_request.load(Ordering::Acquire)
    }

    /// The stop of the last full sync point (published before it is
    /// logged, so a sink can tag its record).
    pub fn last_full_sync_stop(&self) -> u64 {
        self.full_sync_stop.load(Ordering::Acquire)
    }

    /// Kicks the vCPU out of the guest (without positions, when
    /// recording, the stop it makes is a sync point).
    pub fn kick(&self) {
        self.kicker.kick();
    }

    /// Recording: a sync point at the next stop the vCPU is kicked to, even
    /// where positions would place it, or at once if the guest sleeps in
    /// HLT (how a primary answers a repair request: a guest that mostly
    /// sleeps may not be kicked out of a run for a long time).
    pub fn request_sync_point(&self) {
        self.sync_request.store(true, Ordering::Release);
        self.kicker.kick();
        self.stopper.causes.wake();
    }

    /// Recording: whether the primary's held output waits for verified
    /// epochs (`output_commit = "replayed"`); while it does, held output
    /// makes epochs end sooner.
    pub fn set_output_awaits_verification(&self, on: bool) {
        self.output_awaits_verification.store(on, Ordering::Release);
    }

    /// Stops the VM at its next stop; `Vm::run` then returns
    /// `RunOutcome::Stopped`.
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// A stopper alone, for whoever only stops the VM.
    pub fn stopper(&self) -> VmStopper {
        self.stopper.clone()
    }
}

/// Stops a running VM from another thread.
#[derive(Clone)]
pub struct VmStopper {
    pub(crate) flag: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) kicker: crate::kick::Kicker,
    pub(crate) causes: CauseQueue,
}

impl VmStopper {
    /// Asks the vCPU to stop at its next stop (also when halted).
    pub fn stop(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::Release);
        self.kicker.kick();
        self.causes.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_and_requests_read_and_write_the_vcpus_atomics() {
        let counters = Arc::new(LiveCounters::default());
        let causes = tandem_replay::CauseQueue::new(Arc::new(|| {}));
        let kicker = Kicker::default();
        let stop_flag = Arc::new(AtomicBool::new(false));
        let h = VmHandle {
            counters: counters.clone(),
            guest_crashes: Arc::default(),
            divergence_epoch: Arc::default(),
            verified_stop: Arc::default(),
            full_sync_request: Arc::default(),
            full_sync_stop: Arc::default(),
            sync_request: Arc::default(),
            output_awaits_verification: Arc::default(),
            stopper: VmStopper {
                flag: stop_flag.clone(),
                kicker: kicker.clone(),
                causes,
            },
            kicker,
        };
        counters.sync_points.store(7, Ordering::Relaxed);
        assert_eq!(h.figures().sync_points, 7);
        assert_eq!(h.last_divergence(), None);
        h.divergence_epoch.store(4, Ordering::Relaxed);
        assert_eq!(h.last_divergence(), Some(3));
        h.request_full_sync();
        assert!(h.full_sync_pending());
        h.mark_replayed_to_end();
        assert_eq!(h.verified_stop(), u64::MAX);
        h.stop();
        assert!(stop_flag.load(Ordering::Acquire));
    }
}
