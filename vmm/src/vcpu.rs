//! The vCPU thread: `KVM_RUN`, the stop sequence, interrupt injection, HLT.
//!
//! Every exit goes through [`handle_exit`]; then every stop runs the same
//! sequence (DESIGN point 5): advance guest time, let time-driven devices
//! act, apply queued external events, decide injection from the captured vCPU
//! state (completing a pending PIO/MMIO/MSR exit first), re-enter. On HLT the
//! thread sleeps until the next device deadline or external event; it never
//! busy-spins.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_interrupt;
use kvm_ioctls::VcpuFd;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use tandem_devices::GuestMemoryMmap;
use tandem_replay::log::{Check, EndOutcome, MachineState, Page, PAGE_SIZE};
use tandem_replay::{Cause, Clock};
use tracing::{debug, trace};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::device_manager::DeviceManager;
use crate::device_manager::DeviceStateError;
use crate::dirty::{ConsumerId, DirtyTracker};
use crate::epoch::{decode_runs, differences, encode_runs, hash_state};
use crate::exit::{handle_exit, ExitContext, ExitCounters, ExitOutcome, StopKind};
use crate::journal::{Journal, JournalError, Leave, RecordedEpoch};
use crate::kick::{DeadlineTimer, Kicker, VcpuKickTarget};
use crate::repair::Shadow;
use crate::state::{self, StateError};
use std::collections::BTreeSet;
use tandem_replay::log::Record;

/// KVM_INTERRUPT, which kvm-ioctls does not wrap (it only matters without an
/// in-kernel irqchip).
mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_interrupt;
    vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_interrupt);
}
use ioctls::KVM_INTERRUPT;

const RFLAGS_IF: u64 = 1 << 9;

/// Why a guest stopped on its own: a crash of the guest, not of tandem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestCrash {
    /// KVM reported a shutdown (triple fault).
    TripleFault {
        /// Guest RIP at the shutdown.
        rip: u64,
    },
    /// KVM's instruction emulator gave up.
    EmulationFailure {
        /// Guest RIP.
        rip: u64,
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// HLT with interrupts disabled: nothing can ever wake the vCPU.
    HaltedWithInterruptsDisabled {
        /// Guest RIP after the HLT.
        rip: u64,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The guest reported a panic on the pvpanic port.
    Panicked {
        /// Guest RIP at the report.
        rip: u64,
    },
    /// The guest armed the watchdog and did not pet it in time (a hang).
    WatchdogExpired {
        /// Guest RIP when the expiry was seen.
        rip: u64,
    },
}

/// What happens when the guest crashes (a guest software crash, which
/// lockstep copies to the secondary; not a host failure).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CrashPolicy {
    /// The VM stops; the run ends with the crash.
    #[default]
    Halt,
    /// The guest is rebooted from its boot state (its disks as they are,
    /// guest time going on); the secondary reboots at the same stop. More
    /// than [`REBOOT_LIMIT`] crashes within [`REBOOT_WINDOW_NS`] of guest
    /// time halt instead (a crash loop).
    Reboot,
    /// Rolling checkpoints every `interval_ms` of guest time; output and
    /// disk writes wait for the next checkpoint. A crash rolls the guest
    /// back to the newest checkpoint with its timer interrupt delayed (a
    /// perturbation, so a timing-dependent bug usually does not recur) and
    /// the inputs received since delivered again; a repeat crash within
    /// [`ROLLBACK_WINDOW_NS`] goes one checkpoint further back, then reboots.
    RestartCheckpoint {
        /// Guest milliseconds between checkpoints.
        interval_ms: u32,
    },
}

impl CrashPolicy {
    /// `restart-checkpoint` at the default interval.
    pub const RESTART_CHECKPOINT: CrashPolicy = CrashPolicy::RestartCheckpoint {
        interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
    };

    /// Whether a crash the rollbacks cannot cure reboots the guest.
    fn reboots(self) -> bool {
        matches!(
            self,
            CrashPolicy::Reboot | CrashPolicy::RestartCheckpoint { .. }
        )
    }
}

/// What the VMM does about one guest crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recovery {
    /// End the run.
    Halt,
    /// Reboot from the boot state.
    Reboot,
    /// Roll back to the checkpoint at stop `to`, the timer delayed.
    Rollback { to: u64, timer_delay_ns: u64 },
}

/// Guest milliseconds between checkpoints by default: the latency the
/// output rule adds in `restart-checkpoint` mode is at most this.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u32 = 20;
/// A crash within this much guest time of the last rollback goes one
/// checkpoint further back (10 s).
pub const ROLLBACK_WINDOW_NS: u64 = 10_000_000_000;
/// Held output takes a checkpoint early, but no sooner than this after the
/// last one (guest ns): a reply waits about this long, not a whole interval.
const CHECKPOINT_MIN_GAP_NS: u64 = 2_000_000;

/// Crashes within [`REBOOT_WINDOW_NS`] that are rebooted; one more halts.
pub const REBOOT_LIMIT: usize = 3;
/// The crash-loop window, in guest nanoseconds (60 s).
pub const REBOOT_WINDOW_NS: u64 = 60_000_000_000;

impl std::fmt::Display for GuestCrash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestCrash::TripleFault { rip } => {
                write!(f, "guest triple-faulted (shutdown) at rip {rip:#x}")
            }
            GuestCrash::Panicked { rip } => {
                write!(f, "guest reported a panic (pvpanic) at rip {rip:#x}")
            }
            GuestCrash::WatchdogExpired { rip } => {
                write!(f, "guest hung: its watchdog expired (at rip {rip:#x})")
            }
            GuestCrash::EmulationFailure { rip, suberror } => write!(
                f,
                "KVM could not emulate the guest instruction at rip {rip:#x} (internal error, suberror {suberror})"
            ),
            GuestCrash::HaltedWithInterruptsDisabled { rip } => write!(
                f,
                "guest halted with interrupts disabled at rip {rip:#x}; nothing can wake it"
            ),
            GuestCrash::FailEntry { reason } => {
                write!(f, "KVM could not enter the guest (hardware reason {reason:#x})")
            }
        }
    }
}

/// How a VM run ended, when tandem itself did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote this value to the debug-exit port.
    GuestExit(u8),
    /// The guest reset or powered off the machine.
    Reset,
    /// The guest crashed.
    Crashed(GuestCrash),
    /// A replay ran out of log before the guest ended.
    ReplayEnded(ReplayEnd),
    /// The VMM was asked to stop the VM (a fenced or shut-down pair side).
    Stopped,
}

/// Why a replay stopped before the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayEnd {
    /// The log has no End record (the recorder was cut short): replay went
    /// as far as its last watermark allows.
    AtWatermark {
        /// The last stop replayed.
        stop: u64,
    },
    /// The guest halted and the log holds nothing more to wake it.
    LogExhausted {
        /// The stop where it halted.
        stop: u64,
    },
}

impl RunOutcome {
    /// The log's form of this outcome.
    pub fn end_outcome(&self) -> EndOutcome {
        match self {
            RunOutcome::GuestExit(code) => EndOutcome::GuestExit(*code),
            RunOutcome::Reset => EndOutcome::Reset,
            RunOutcome::Crashed(crash) => EndOutcome::Crashed(crash.to_string()),
            RunOutcome::ReplayEnded(_) | RunOutcome::Stopped => EndOutcome::Stopped,
        }
    }
}

/// A failure of tandem or KVM (not of the guest).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM exited for a reason tandem does not handle.
    #[error("unexpected KVM exit: {0}")]
    UnexpectedExit(String),
    /// The log could not be written, read or followed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// vCPU state could not be captured or installed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Device state could not be installed.
    #[error(transparent)]
    DeviceState(#[from] DeviceStateError),
    /// Guest memory could not be read or written for a sync point.
    #[error("sync point memory: {0}")]
    Memory(String),
    /// A following secondary's replica cannot follow the primary's.
    #[error(transparent)]
    Mirror(#[from] crate::device_manager::MirrorError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

/// What a run counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Exits by kind.
    pub exits: ExitCounters,
    /// Deterministic stops (PIO, MMIO, HLT, IRQ window, MSR).
    pub stops: u64,
    /// Kick-induced stops.
    pub kicked_stops: u64,
    /// Sync points logged (recording) or installed (replaying).
    pub sync_points: u64,
    /// Pages carried by those sync points.
    pub sync_pages: u64,
    /// Epoch ends logged (recording) or checked (replaying).
    pub epochs: u64,
    /// Replayed epochs whose hashes matched with no sync point inside.
    pub epochs_verified: u64,
    /// Replayed epochs that matched but held a sync point: transferred,
    /// not verified.
    pub epochs_transferred: u64,
    /// Replayed epochs whose hashes differed.
    pub divergences: u64,
    /// Divergences repaired.
    pub repaired: u64,
    /// Cross-checks (injected vectors, console bytes) that differed.
    pub check_mismatches: u64,
    /// A live secondary went live at this stop.
    pub went_live_at: Option<u64>,
    /// Interrupts injected.
    pub interrupts: u64,
    /// Time spent halted.
    pub halted: Duration,
    /// Checkpoints taken (`restart-checkpoint`).
    pub checkpoints: u64,
    /// Pages they copied.
    pub checkpoint_pages: u64,
    /// Time they took.
    pub checkpoint_time: Duration,
    /// Crashes recovered by a rollback to a checkpoint.
    pub rollbacks: u64,
}

/// What sync points need besides the vCPU: the VM (for its dirty log),
/// guest memory and the MSR list.
pub struct SyncContext {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub memory: GuestMemoryMmap,
    /// The one dirty-page tracker.
    pub tracker: DirtyTracker,
    /// The sync-point consumer of the tracker.
    pub consumer: ConsumerId,
    /// The epoch consumer of the tracker.
    pub epoch_consumer: ConsumerId,
    /// The repair consumer of the tracker (replay).
    pub repair_consumer: ConsumerId,
    /// The pre-copy consumer of the tracker (recording, for a joiner).
    pub precopy_consumer: ConsumerId,
    /// The checkpoint consumer of the tracker (`restart-checkpoint`).
    pub checkpoint_consumer: ConsumerId,
    /// MSRs saved with the vCPU.
    pub msrs: Vec<u32>,
}

/// Kicks and sync points while recording.
#[derive(Clone, Copy, Debug)]
pub struct KickPolicy {
    /// Take a sync point at least this often (guest time), when recording.
    pub sync_interval: Option<Duration>,
    /// Kick the vCPU at most this often.
    pub min_kick_interval: Duration,
    /// End an epoch (and log its hashes) about this often, when recording.
    pub epoch_interval: Duration,
}

/// Where the epochs stand.
#[derive(Default)]
struct Epochs {
    /// The next epoch's number.
    number: u64,
    /// Recording: when the epoch timer fires.
    deadline: Option<Instant>,
    /// Replaying: pages written by sync-point installs this epoch (the
    /// recorder dirtied them earlier; they are not the replay's own).
    installed: BTreeSet<u64>,
    /// A sync point was installed this epoch.
    had_sync: bool,
    /// Recording: when the last epoch ended.
    last_end: Option<Instant>,
}

/// The vCPU and everything its thread owns.
pub struct Vcpu {
    fd: VcpuFd,
    ctx: ExitContext,
    devices: DeviceManager,
    journal: Journal,
    sync: SyncContext,
    policy: KickPolicy,
    kicker: Kicker,
    start: Instant,
    /// The current stop; every logged event sits at a stop number.
    stop: u64,
    /// Guest time of the last sync point.
    last_sync_ns: u64,
    /// The current stop's PIO/MMIO/MSR exit is not finished in KVM yet.
    exit_pending: bool,
    epochs: Epochs,
    /// Replay only: the last verified state, for repair (None: --no-repair).
    shadow: Option<Shadow>,
    /// Divergences found since the last repair.
    unrepaired: u64,
    /// Replay: the stop of the last epoch whose hashes matched (a live
    /// secondary reports it for `output_commit = "replayed"`).
    verified_stop: Arc<std::sync::atomic::AtomicU64>,
    /// Replay: 1 + the last diverged epoch (0: none), for a live secondary
    /// to report.
    divergence_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// Recording: the next sync point carries all of memory.
    full_sync: Arc<std::sync::atomic::AtomicBool>,
    /// Stop the VM at the next stop (fencing, shutdown).
    stop_request: Arc<std::sync::atomic::AtomicBool>,
    /// Counters readable while the VM runs (`tandem status`).
    live_counters: Arc<LiveCounters>,
    /// Recording: the stop of the last full sync point.
    full_sync_stop: Arc<std::sync::atomic::AtomicU64>,
    /// Recording: pre-copy rounds for a joining secondary.
    precopy: Arc<crate::precopy::PrecopyPort>,
    /// Joining: memory pre-copied from the primary, installed before its
    /// full sync point (which carries only what changed since).
    base_pages: Vec<Page>,
    /// What a guest crash does.
    crash_policy: CrashPolicy,
    /// The boot state (vCPU and devices, non-zero pages) a reboot returns to.
    boot: Option<(MachineState, Vec<Page>)>,
    /// Guest time of each rebooted crash (the crash-loop window).
    crash_times: Vec<u64>,
    /// Guest crashes recovered (rebooted or rolled back), for status.
    guest_crashes: Arc<std::sync::atomic::AtomicU64>,
    /// Rolling checkpoints (`restart-checkpoint`, or a replay that meets a
    /// logged one).
    checkpoints: Option<crate::checkpoint::Checkpoints>,
    /// Guest time of each rollback (the repeat-crash window).
    rollback_times: Vec<u64>,
    /// The guest was rolled back to a checkpoint taken while it slept in
    /// HLT: it sleeps on at the current stop.
    resume_halted: bool,
    causes: Vec<Cause>,
    stats: VcpuStats,
    /// Divergences found while replaying, in order.
    pub divergence_reports: Vec<DivergenceReport>,
    go_live_hooks: Option<GoLiveHooks>,
}

/// Counters other threads may read while the VM runs.
#[derive(Debug, Default)]
pub struct LiveCounters {
    /// Deterministic stops.
    pub stops: std::sync::atomic::AtomicU64,
    /// Sync points logged or installed.
    pub sync_points: std::sync::atomic::AtomicU64,
    /// Epoch ends logged or checked.
    pub epochs: std::sync::atomic::AtomicU64,
    /// Epochs verified with no sync point inside.
    pub epochs_verified: std::sync::atomic::AtomicU64,
    /// Epochs that matched but held a sync point.
    pub epochs_transferred: std::sync::atomic::AtomicU64,
    /// Epochs that diverged.
    pub divergences: std::sync::atomic::AtomicU64,
    /// Checkpoints taken (`restart-checkpoint`).
    pub checkpoints: std::sync::atomic::AtomicU64,
    /// Guest crashes recovered by rolling back to a checkpoint.
    pub guest_rollbacks: std::sync::atomic::AtomicU64,
    /// Guest crashes recovered by rebooting the guest.
    pub guest_reboots: std::sync::atomic::AtomicU64,
}

/// What a live secondary needs to go live.
pub struct GoLiveHooks {
    /// The queue the live world (taps, disk workers, stdin) fills.
    pub causes: tandem_replay::CauseQueue,
    /// Switches outputs to the world (emitting buffered ones) and lets the
    /// taps' frames in.
    pub switch: Box<dyn FnOnce() + Send>,
    /// Going live, record from then on to this sink (a new primary ready
    /// to take its own secondary), with these options.
    pub record: Option<(
        crate::journal::RecordOptions,
        Box<dyn crate::journal::RecordSink>,
    )>,
}

/// One epoch whose replayed state differed from the recorded one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DivergenceReport {
    /// The epoch.
    pub epoch: u64,
    /// The stop it ended at.
    pub stop: u64,
    /// What differs: components, scrub, unlisted pages.
    pub components: Vec<String>,
    /// The recorder's component hashes.
    pub recorded: Vec<(String, u64)>,
    /// The replay's component hashes.
    pub replayed: Vec<(String, u64)>,
}

impl Vcpu {
    /// A vCPU ready to run. `start` is the host instant of guest time 0
    /// (for the deadline timer).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        fd: VcpuFd,
        ctx: ExitContext,
        devices: DeviceManager,
        journal: Journal,
        sync: SyncContext,
        policy: KickPolicy,
        kicker: Kicker,
        start: Instant,
    ) -> Self {
        Self {
            fd,
            ctx,
            devices,
            journal,
            sync,
            policy,
            kicker,
            start,
            stop: 0,
            last_sync_ns: 0,
            exit_pending: false,
            epochs: Epochs::default(),
            shadow: None,
            unrepaired: 0,
            verified_stop: Arc::default(),
            divergence_epoch: Arc::default(),
            full_sync: Arc::default(),
            stop_request: Arc::default(),
            live_counters: Arc::default(),
            full_sync_stop: Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
            precopy: Arc::default(),
            base_pages: Vec::new(),
            crash_policy: CrashPolicy::Halt,
            boot: None,
            crash_times: Vec::new(),
            guest_crashes: Arc::default(),
            checkpoints: None,
            rollback_times: Vec::new(),
            resume_halted: false,
            causes: Vec::new(),
            stats: VcpuStats::default(),
            divergence_reports: Vec::new(),
            go_live_hooks: None,
        }
    }

    /// Runs the guest on the calling thread until it exits, resets or crashes.
    pub fn run(&mut self) -> Result<(RunOutcome, VcpuStats), VcpuError> {
        let _target =
            VcpuKickTarget::install(self.fd.get_kvm_run(), &self.kicker).map_err(|e| {
                VcpuError::Kvm {
                    what: "kick signal setup",
                    source: e,
                }
            })?;
        let mut timer = DeadlineTimer::start(self.kicker.clone()).map_err(|e| VcpuError::Kvm {
            what: "timer thread start",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EAGAIN)),
        })?;
        // The boot state, for rebooting a crashed guest: taken before
        // anything ran (or a joiner installed the primary's memory), so it
        // is the same on every side of a pair.
        if self.crash_policy.reboots() || self.journal.replayer_ref().is_some() {
            self.boot = Some(self.capture_boot()?);
        }
        // A secondary joining a running primary starts at the primary's
        // full sync point, not at stop 0.
        if let Some(rep) = self.journal.replayer() {
            if let Some(stop) = rep.joined_at() {
                if stop > 1 {
                    tracing::warn!("joining the primary at its stop {stop}");
                    self.stop = stop - 1;
                    // The full sync point carries only non-zero pages, or
                    // only what changed since the pre-copied memory.
                    self.zero_memory()?;
                    self.install_base_pages()?;
                    // Every page was written by the join, not by the replay:
                    // the first epoch checks them against the primary's
                    // hashes, and once it verifies the repair shadow takes
                    // them all as its baseline.
                    let all = all_gfns(&self.sync.memory);
                    self.epochs.installed.extend(all);
                }
            }
        }
        let outcome = match self.run_loop(&mut timer) {
            Ok(outcome) => self.end(outcome),
            Err(e) => {
                let _ = self
                    .journal
                    .finish(self.stop, EndOutcome::Crashed(e.to_string()));
                Err(e)
            }
        };
        self.stats.exits = self.ctx.counters;
        outcome.map(|o| (o, self.stats))
    }

    /// What to do when the guest crashes.
    pub fn set_crash_policy(&mut self, policy: CrashPolicy) {
        self.crash_policy = policy;
        if let CrashPolicy::RestartCheckpoint { interval_ms } = policy {
            self.checkpoints = Some(crate::checkpoint::Checkpoints::new(
                u64::from(interval_ms) * 1_000_000,
            ));
        }
    }

    /// Guest crashes rebooted so far (for `tandem status`).
    pub fn guest_crashes(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.guest_crashes.clone()
    }

    /// A hang: the guest watchdog expired at this stop.
    fn watchdog_crash(&mut self) -> Option<GuestCrash> {
        self.devices
            .watchdog_expired()
            .then(|| GuestCrash::WatchdogExpired { rip: self.rip() })
    }

    /// The machine as built: vCPU, devices and every non-zero page.
    fn capture_boot(&mut self) -> Result<(MachineState, Vec<Page>), VcpuError> {
        let vcpu = state::capture(&self.fd, &self.sync.msrs, false)?;
        let devices = self.devices.capture();
        let mut pages = Vec::new();
        for gfn in all_gfns(&self.sync.memory) {
            let mut data = vec![0u8; PAGE_SIZE];
            self.sync
                .memory
                .read_slice(&mut data, GuestAddress(gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {gfn:#x}: {e}")))?;
            if data.iter().any(|&b| b != 0) {
                pages.push(Page { gfn, data });
            }
        }
        Ok((MachineState { vcpu, devices }, pages))
    }

    /// The guest crashed at the current stop: recover (true: reboot or roll
    /// back) or end the run (false). Live, the policy decides and the log
    /// says so; a replay does what the recording did.
    fn recover(&mut self, crash: &GuestCrash) -> Result<bool, VcpuError> {
        let now = self.ctx.clock.now_ns();
        let logged = match self.journal.replayer() {
            Some(rep) => rep.recovery_logged(self.stop),
            None => None,
        };
        let recovery = match logged {
            Some(Some(Check::GuestRollback {
                to, timer_delay_ns, ..
            })) => Recovery::Rollback { to, timer_delay_ns },
            Some(Some(_)) => Recovery::Reboot,
            Some(None) => Recovery::Halt,
            None => {
                if self.journal.replayer_ref().is_some() {
                    // The primary is gone before saying: decide here, live.
                    self.go_live()?;
                }
                let recovery = self.decide_recovery(now);
                let check = match recovery {
                    Recovery::Halt => None,
                    Recovery::Reboot => Some(Check::GuestReboot {
                        crash: crash.to_string(),
                    }),
                    Recovery::Rollback { to, timer_delay_ns } => Some(Check::GuestRollback {
                        crash: crash.to_string(),
                        to,
                        timer_delay_ns,
                    }),
                };
                if let Some(check) = check {
                    self.journal.check(self.stop, check)?;
                }
                recovery
            }
        };
        match recovery {
            Recovery::Halt => Ok(false),
            Recovery::Reboot => self.reboot(crash, now),
            Recovery::Rollback { to, timer_delay_ns } => {
                self.rollback(crash, now, to, timer_delay_ns)
            }
        }
    }

    /// The live side's choice after a crash at guest time `now`.
    fn decide_recovery(&mut self, now: u64) -> Recovery {
        if let (CrashPolicy::RestartCheckpoint { .. }, Some(checkpoints)) =
            (self.crash_policy, self.checkpoints.as_ref())
        {
            // A crash soon after a rollback goes one checkpoint further back.
            let recent = self
                .rollback_times
                .iter()
                .filter(|&&t| now.saturating_sub(t) < ROLLBACK_WINDOW_NS)
                .count();
            let interval = checkpoints.interval_ns().max(1);
            match checkpoints.stops_newest_first().get(recent) {
                Some(&to) if self.devices.outputs.discard_after(to) => {
                    // The perturbation: the timer's next interrupt comes
                    // two to four intervals late.
                    let random = std::hash::BuildHasher::hash_one(
                        &std::collections::hash_map::RandomState::new(),
                        self.stop,
                    );
                    let timer_delay_ns = 2 * interval + random % (2 * interval);
                    return Recovery::Rollback { to, timer_delay_ns };
                }
                Some(&to) => tracing::warn!(
                    "guest crashed again: its checkpoint at stop {to} is older than output already released, so it is no rollback target; rebooting instead"
                ),
                None if recent > 0 => tracing::warn!(
                    "guest crashed {} times within {} s of guest time: no older checkpoint to return to; rebooting instead",
                    recent + 1,
                    ROLLBACK_WINDOW_NS / 1_000_000_000
                ),
                None => tracing::warn!("guest crashed before its first checkpoint: rebooting instead"),
            }
        }
        let recent = self
            .crash_times
            .iter()
            .filter(|&&t| now.saturating_sub(t) < REBOOT_WINDOW_NS)
            .count();
        let reboots = self.crash_policy.reboots();
        if reboots && recent >= REBOOT_LIMIT {
            tracing::warn!(
                "guest crashed {} times within {} s of guest time: not rebooting again",
                recent + 1,
                REBOOT_WINDOW_NS / 1_000_000_000
            );
            return Recovery::Halt;
        }
        if reboots {
            Recovery::Reboot
        } else {
            Recovery::Halt
        }
    }

    /// Reboots the crashed guest from its boot state.
    fn reboot(&mut self, crash: &GuestCrash, now: u64) -> Result<bool, VcpuError> {
        let Some((state, boot_pages)) = self.boot.clone() else {
            return Ok(false);
        };
        self.crash_times.push(now);
        self.guest_crashes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live_counters
            .guest_reboots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            "guest crash at stop {} ({crash}): rebooting the guest from its boot state",
            self.stop
        );
        // Output held for a checkpoint came from the state the reboot
        // discards (and a disk write issued after the reboot could land
        // under the new guest's reads): it never leaves.
        if let Some(checkpoints) = self.checkpoints.as_mut() {
            if let Some(&newest) = checkpoints.stops_newest_first().first() {
                let _ = self.devices.outputs.discard_after(newest);
            }
            checkpoints.clear();
            self.rollback_times.clear();
        }
        // Every page: the boot image's, zeros elsewhere.
        let mut pages = Vec::new();
        let mut boot = boot_pages.into_iter().peekable();
        for gfn in all_gfns(&self.sync.memory) {
            match boot.peek() {
                Some(p) if p.gfn == gfn => pages.extend(boot.next()),
                _ => pages.push(Page {
                    gfn,
                    data: vec![0u8; PAGE_SIZE],
                }),
            }
        }
        // KVM finishes the crashing exit (a port write) first.
        self.exit_pending = true;
        self.complete_pending_exit()?;
        self.install_sync_point(&state, &pages)?;
        self.resume_halted = false;
        // Both sides rebooted alike: the next sync point need not carry the
        // pages the reboot rewrote (all of memory).
        self.forget_own_writes()?;
        self.request_window(false);
        Ok(true)
    }

    /// Rolls the crashed guest back to its checkpoint at stop `to`, with its
    /// timer interrupt delayed by `timer_delay_ns`.
    fn rollback(
        &mut self,
        crash: &GuestCrash,
        now: u64,
        to: u64,
        timer_delay_ns: u64,
    ) -> Result<bool, VcpuError> {
        // KVM finishes the crashing exit first.
        self.exit_pending = true;
        self.complete_pending_exit()?;
        let next_ids = self.devices.block_next_ids();
        let sync = &mut self.sync;
        sync.tracker
            .harvest(&sync.vm, &sync.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let dirtied = sync.tracker.take(sync.checkpoint_consumer);
        let stop = self.stop;
        let back = self
            .checkpoints
            .as_mut()
            .ok_or_else(|| "this side took no checkpoints".to_string())
            .and_then(|c| c.rollback(&dirtied, to))
            .map_err(|e| {
                VcpuError::Journal(JournalError::Diverged {
                    stop,
                    what: format!("cannot roll back to the checkpoint at stop {to}: {e}"),
                })
            })?;
        // Output produced since never happened (the live side dropped it
        // when it chose the target; a follower drops its buffered copy).
        let _ = self.devices.outputs.discard_after(to);
        self.install_sync_point(&back.state, &back.pages)?;
        self.forget_own_writes()?;
        let absent_ns = now.saturating_sub(back.guest_ns);
        self.devices.resume_after_rollback(
            &next_ids,
            absent_ns,
            now.saturating_add(timer_delay_ns),
        );
        // Live: requests in flight at the checkpoint are issued again (their
        // first completion may have been rolled back), and the inputs since
        // are delivered again. A replay gets both from the log.
        let live = self.journal.replayer_ref().is_none();
        let reissued = if live {
            self.devices.reissue_unfinished()
        } else {
            0
        };
        let inputs = back.inputs.len();
        self.journal.requeue(back.inputs);
        self.rollback_times.push(now);
        self.guest_crashes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live_counters
            .guest_rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.rollbacks += 1;
        tracing::warn!(
            "guest crash at stop {stop} ({crash}): rolled back to the checkpoint at stop {to} ({} ms of guest time earlier, {} pages restored); timer interrupt delayed {} ms{}",
            absent_ns / 1_000_000,
            back.pages.len(),
            timer_delay_ns / 1_000_000,
            if live {
                format!("; {inputs} inputs delivered again, {reissued} disk requests issued again")
            } else {
                String::new()
            }
        );
        self.resume_halted = back.state.vcpu.halted;
        self.request_window(false);
        Ok(true)
    }

    /// After a reboot or rollback, which both sides do alike: the pages it
    /// wrote are no news to the next sync point or checkpoint.
    fn forget_own_writes(&mut self) -> Result<(), VcpuError> {
        let sync = &mut self.sync;
        sync.tracker
            .harvest(&sync.vm, &sync.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let _ = sync.tracker.take(sync.consumer);
        let _ = sync.tracker.take(sync.checkpoint_consumer);
        Ok(())
    }

    /// Takes a checkpoint here if one is due (live) or the log has one
    /// (replay). `halted`: the guest sleeps in HLT at this stop.
    fn maybe_checkpoint(&mut self, halted: bool) -> Result<(), VcpuError> {
        let stop = self.stop;
        let now = self.ctx.clock.now_ns();
        let take = match self.journal.replayer() {
            Some(rep) => rep.take_checkpoint(stop),
            None => {
                let Some(checkpoints) = self.checkpoints.as_ref() else {
                    return Ok(());
                };
                // Held output takes one early, so a reply waits a little,
                // not a whole interval.
                // A guest going to sleep takes one at once: nothing else
                // may come to release its output.
                let due = checkpoints.due(now)
                    || (self.devices.outputs.pending()
                        && (halted
                            || checkpoints
                                .since_newest(now)
                                .is_some_and(|since| since >= CHECKPOINT_MIN_GAP_NS)));
                if due {
                    self.journal.check(stop, Check::Checkpoint)?;
                }
                due
            }
        };
        if !take {
            return Ok(());
        }
        let began = Instant::now();
        self.complete_pending_exit()?;
        let vcpu = state::capture(&self.fd, &self.sync.msrs, halted)?;
        let devices = self.devices.capture();
        let mem_size = self.mem_pages() * PAGE_SIZE as u64;
        let sync = &mut self.sync;
        sync.tracker
            .harvest(&sync.vm, &sync.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let dirtied = sync.tracker.take(sync.checkpoint_consumer);
        // A replay that meets a logged checkpoint keeps them from then on.
        let interval = u64::from(DEFAULT_CHECKPOINT_INTERVAL_MS) * 1_000_000;
        let checkpoints = self
            .checkpoints
            .get_or_insert_with(|| crate::checkpoint::Checkpoints::new(interval));
        let copied = checkpoints
            .take(
                &sync.memory,
                mem_size,
                dirtied,
                stop,
                now,
                MachineState { vcpu, devices },
            )
            .map_err(VcpuError::Memory)?;
        self.devices.outputs.checkpoint_taken(stop);
        self.stats.checkpoints += 1;
        self.stats.checkpoint_pages += copied as u64;
        self.stats.checkpoint_time += began.elapsed();
        self.live_counters
            .checkpoints
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sleeps in HLT at the current stop until an interrupt wakes the
    /// guest, then runs the rest of the stop. Some: the run ends so.
    fn sleep_at_stop(&mut self) -> Result<Option<RunOutcome>, VcpuError> {
        match self.halt()? {
            Halted::Woken => {}
            Halted::Crashed(crash) if self.recover(&crash)? => return Ok(None),
            Halted::Crashed(crash) => return Ok(Some(RunOutcome::Crashed(crash))),
            Halted::ReplayEnded(end) => return Ok(Some(RunOutcome::ReplayEnded(end))),
            Halted::Stopped => return Ok(Some(RunOutcome::Stopped)),
        }
        self.at_stop()?;
        if let Some(crash) = self.watchdog_crash() {
            if self.recover(&crash)? {
                return Ok(None);
            }
            return Ok(Some(RunOutcome::Crashed(crash)));
        }
        Ok(None)
    }

    /// Makes a live secondary able to go live: its cause queue and what to
    /// switch when it does.
    pub fn set_go_live(&mut self, hooks: GoLiveHooks) {
        self.go_live_hooks = Some(hooks);
    }

    /// The secondary becomes the primary at the current stop: guest time
    /// continues from the last logged time, inputs come from the world,
    /// outputs go to it (buffered ones first), and disk requests the old
    /// primary never completed are issued again.
    fn go_live(&mut self) -> Result<(), VcpuError> {
        let Some(hooks) = self.go_live_hooks.take() else {
            return Err(VcpuError::Journal(JournalError::Diverged {
                stop: self.stop,
                what: "the log ended but this replay cannot go live".into(),
            }));
        };
        let now_ns = self.ctx.clock.now_ns();
        let start = Instant::now()
            .checked_sub(Duration::from_nanos(now_ns))
            .unwrap_or_else(Instant::now);
        self.start = start;
        let live = tandem_replay::LiveInputs::new(start, hooks.causes);
        self.journal = match hooks.record {
            Some((options, sink)) => {
                self.policy = KickPolicy {
                    sync_interval: Some(options.sync_interval),
                    min_kick_interval: options.min_kick_interval,
                    epoch_interval: options.epoch_interval,
                };
                self.last_sync_ns = now_ns;
                Journal::Record(Box::new(crate::journal::Recorder::start_with_sink(
                    options, sink, live,
                )?))
            }
            None => Journal::Live(live),
        };
        self.shadow = None;
        (hooks.switch)();
        // Mirrored storage: from here on this side's worker does the I/O.
        self.devices.mirror_following = false;
        let reissued = self.devices.reissue_unfinished();
        self.stats.went_live_at = Some(self.stop);
        tracing::warn!(
            "going live at stop {} (guest time {now_ns} ns); {reissued} disk requests issued again",
            self.stop
        );
        Ok(())
    }

    /// 1 + the last epoch the replay found diverged (0: none yet).
    pub fn divergence_epoch(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.divergence_epoch.clone()
    }

    /// The kicker of this vCPU (a kick-induced stop is a sync point).
    pub fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }

    /// The stop of the last epoch the replay verified.
    pub fn verified_stop(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.verified_stop.clone()
    }

    /// Keeps a shadow of the verified state so divergences can be repaired.
    pub fn enable_repair(&mut self, size: u64) -> Result<(), VcpuError> {
        self.shadow = Some(Shadow::new(&self.sync.memory, size).map_err(VcpuError::Memory)?);
        Ok(())
    }

    /// An epoch diverged and no sync point came after it to repair from.
    pub fn unrepaired(&self) -> Option<u64> {
        self.shadow.as_ref().and_then(|s| s.pending)
    }

    /// Closes the log (recording) or compares with it (replaying).
    fn end(&mut self, outcome: RunOutcome) -> Result<RunOutcome, VcpuError> {
        if let Some(rep) = self.journal.replayer() {
            if let Some((stop, recorded)) = rep.end.clone() {
                let ours = outcome.end_outcome();
                if matches!(outcome, RunOutcome::ReplayEnded(_))
                    || (stop, &recorded) != (self.stop, &ours)
                {
                    tracing::warn!(
                        "replay ended with {ours:?} at stop {}, the recording with {recorded:?} at stop {stop}",
                        self.stop
                    );
                }
            }
        }
        // No rollback can come any more: output held for a checkpoint
        // leaves (the guest's last words before it exits).
        self.devices.outputs.checkpoint_taken(u64::MAX);
        self.journal.finish(self.stop, outcome.end_outcome())?;
        Ok(outcome)
    }

    fn run_loop(&mut self, timer: &mut DeadlineTimer) -> Result<RunOutcome, VcpuError> {
        loop {
            if self.stop_request.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(RunOutcome::Stopped);
            }
            // Rolled back to a checkpoint taken in HLT: sleep on there.
            if std::mem::take(&mut self.resume_halted) {
                if let Some(outcome) = self.sleep_at_stop()? {
                    return Ok(outcome);
                }
                continue;
            }
            // (f) re-enter from the current stop, if the log allows it.
            let output_waits = self.devices.outputs.take_newly_held();
            match self.journal.leave_stop(self.stop, output_waits)? {
                Leave::Enter => {}
                Leave::ReplayEnd => {
                    return Ok(RunOutcome::ReplayEnded(ReplayEnd::AtWatermark {
                        stop: self.stop,
                    }))
                }
                Leave::GoLive => {
                    self.go_live()?;
                    continue;
                }
            }
            // Asked to stop while waiting to leave (a switch-over's hold):
            // the guest does not run again.
            if self.stop_request.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(RunOutcome::Stopped);
            }
            let next = self.stop + 1;
            let replayed_sync = self
                .journal
                .replayer()
                .and_then(|rep| rep.take_sync_point(next));
            // (a) the exit, or the sync point that stands for it.
            let kind = if let Some((state, pages)) = replayed_sync {
                // KVM would otherwise finish the previous PIO/MMIO exit on
                // top of the installed state.
                self.complete_pending_exit()?;
                self.install_sync_point(&state, &pages)?;
                if state.vcpu.halted {
                    // Captured while the guest slept in HLT: sleep on here
                    // as the recording did.
                    self.stop = next;
                    self.devices.set_stop(next);
                    if let Some(outcome) = self.sleep_at_stop()? {
                        return Ok(outcome);
                    }
                    continue;
                }
                None
            } else {
                // Armed at every entry, whatever led here (a stop, going
                // live, a rollback or reboot): a guest that spins without
                // exits still gets its timer and its checkpoints.
                self.arm_kick_timer(timer);
                match self.fd.run() {
                    Ok(exit) => match handle_exit(exit, &mut self.ctx) {
                        // On KVMs that run the guest in the instruction
                        // emulator (as on the development machines), the
                        // interrupt-window exit lands wherever KVM's loop
                        // next breaks, not at a fixed instruction: it is
                        // not reproducible, so it is a sync point.
                        ExitOutcome::Stop(StopKind::IrqWindow) => None,
                        ExitOutcome::Stop(kind) => Some(kind),
                        ended => {
                            self.stop = next;
                            self.devices.set_stop(next);
                            match self.ended(ended)? {
                                RunOutcome::Crashed(crash) if self.recover(&crash)? => continue,
                                outcome => return Ok(outcome),
                            }
                        }
                    },
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                        if self.journal.replayer().is_some() {
                            // Replay takes no kicks; a stray signal is no stop.
                            self.fd.set_kvm_immediate_exit(0);
                            continue;
                        }
                        self.stats.kicked_stops += 1;
                        None
                    }
                    Err(e) => {
                        return Err(VcpuError::Kvm {
                            what: "KVM_RUN",
                            source: e,
                        })
                    }
                }
            };
            self.stop = next;
            self.devices.set_stop(next);
            if tracing::enabled!(tracing::Level::TRACE) {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                trace!(stop = self.stop, ?kind, rip, "stop");
            }
            if kind == Some(StopKind::Pio) {
                self.console_output()?;
            }
            match kind {
                Some(_) => {
                    self.stats.stops += 1;
                    self.live_counters
                        .stops
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // (c) A kick-induced stop is not reproducible: log the state.
                None if self.journal.recording() => self.record_sync_point(false)?,
                None => {}
            }
            if kind.is_some() {
                self.maybe_end_epoch()?;
            }
            if kind == Some(StopKind::Hlt) {
                self.maybe_checkpoint(true)?;
                match self.halt()? {
                    Halted::Woken => {}
                    Halted::Crashed(crash) if self.recover(&crash)? => continue,
                    Halted::Crashed(crash) => return Ok(RunOutcome::Crashed(crash)),
                    Halted::ReplayEnded(end) => return Ok(RunOutcome::ReplayEnded(end)),
                    Halted::Stopped => return Ok(RunOutcome::Stopped),
                }
            }
            self.exit_pending = kind.is_some_and(StopKind::needs_completion);
            if kind != Some(StopKind::Hlt) {
                self.maybe_checkpoint(false)?;
            }
            self.at_stop()?;
            if let Some(crash) = self.watchdog_crash() {
                if self.recover(&crash)? {
                    continue;
                }
                return Ok(RunOutcome::Crashed(crash));
            }
            if let Some(rep) = self.journal.replayer() {
                let (skipped, console) = rep.skip_stale_checks(self.stop + 1);
                if let Some(stale) = rep.stale_record(self.stop + 1) {
                    return Err(stale.into());
                }
                self.stats.check_mismatches += skipped;
                if !console.is_empty() {
                    self.devices
                        .outputs
                        .emit(tandem_replay::Output::Serial(console));
                }
            }
        }
    }

    /// Sets the deadline timer for the guest entry about to happen: the
    /// current policy's kick interval (replay's, or live's once this side
    /// went live) and the next deadline (none while replaying).
    fn arm_kick_timer(&mut self, timer: &mut DeadlineTimer) {
        timer.set_min_interval(self.policy.min_kick_interval);
        timer.set(self.next_kick_deadline());
    }

    /// Maps an exit that ends the VM to its outcome.
    fn ended(&mut self, exit: ExitOutcome) -> Result<RunOutcome, VcpuError> {
        Ok(match exit {
            ExitOutcome::GuestExit(code) => RunOutcome::GuestExit(code),
            ExitOutcome::Reset => RunOutcome::Reset,
            ExitOutcome::Shutdown => {
                RunOutcome::Crashed(GuestCrash::TripleFault { rip: self.rip() })
            }
            ExitOutcome::InternalError => {
                let suberror = self.internal_suberror();
                RunOutcome::Crashed(GuestCrash::EmulationFailure {
                    rip: self.rip(),
                    suberror,
                })
            }
            ExitOutcome::FailEntry(reason) => RunOutcome::Crashed(GuestCrash::FailEntry { reason }),
            ExitOutcome::GuestPanic => {
                RunOutcome::Crashed(GuestCrash::Panicked { rip: self.rip() })
            }
            ExitOutcome::Unexpected(what) => return Err(VcpuError::UnexpectedExit(what)),
            ExitOutcome::Stop(kind) => {
                return Err(VcpuError::UnexpectedExit(format!(
                    "{kind:?} is not an ending"
                )))
            }
        })
    }

    /// When the deadline timer should kick next: the next device deadline
    /// and, when recording, the next forced sync point. Replay takes no kicks.
    fn next_kick_deadline(&mut self) -> Option<Instant> {
        if self.journal.replayer_ref().is_some() {
            return None;
        }
        let device = self.devices.next_deadline_ns();
        self.journal.set_deadline(device);
        let sync = match (self.journal.recording(), self.policy.sync_interval) {
            (true, Some(every)) => {
                Some(self.last_sync_ns + u64::try_from(every.as_nanos()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        // Held output needs a checkpoint even from a guest that makes no
        // exits of its own (one spinning on a write's completion).
        let checkpoint = self
            .checkpoints
            .as_ref()
            .filter(|_| self.devices.outputs.pending())
            .map(|c| c.next_due_ns());
        let ns = [device, sync, checkpoint].into_iter().flatten().min();
        ns.map(|ns| self.start + Duration::from_nanos(ns))
    }

    /// Logs the complete machine state and the pages dirtied since the last
    /// sync point (DESIGN point 6).
    fn record_sync_point(&mut self, halted: bool) -> Result<(), VcpuError> {
        let began = Instant::now();
        self.serve_precopy()?;
        let vcpu = state::capture(&self.fd, &self.sync.msrs, halted)?;
        let devices = self.devices.capture();
        let sync = &mut self.sync;
        sync.tracker
            .harvest(&sync.vm, &sync.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let mut gfns = sync.tracker.take(sync.consumer);
        // A new secondary joining a running primary needs all of memory: all
        // of it, or (after pre-copy rounds) what changed since the last.
        let full = self
            .full_sync
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        let delta = full && self.precopy.take_final_delta();
        if delta {
            gfns.extend(sync.tracker.take(sync.precopy_consumer));
            gfns.sort_unstable();
            gfns.dedup();
        } else if full {
            gfns = all_gfns(&sync.memory);
        }
        let mut pages = Vec::new();
        for gfn in gfns {
            let mut data = vec![0u8; PAGE_SIZE];
            sync.memory
                .read_slice(&mut data, GuestAddress(gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {gfn:#x}: {e}")))?;
            // A full sync point leaves out zero pages: the joiner starts
            // from zeroed memory (a delta keeps them: they were not zero).
            if full && !delta && data.iter().all(|&b| b == 0) {
                continue;
            }
            pages.push(Page { gfn, data });
        }
        self.stats.sync_points += 1;
        self.live_counters
            .sync_points
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.sync_pages += pages.len() as u64;
        self.last_sync_ns = self.ctx.clock.now_ns();
        if full {
            // The joiner has no checkpoint before this one: neither side
            // may roll back past it.
            if let Some(checkpoints) = self.checkpoints.as_mut() {
                checkpoints.clear();
                self.rollback_times.clear();
            }
            self.full_sync_stop
                .store(self.stop, std::sync::atomic::Ordering::Release);
            // Output from here on waits for the new secondary again.
            self.devices.outputs.protect_from(self.stop);
            tracing::warn!(
                "full sync point at stop {} ({} pages{}) for a joining secondary; guest paused {} ms",
                self.stop,
                pages.len(),
                if delta { " changed since pre-copy" } else { "" },
                began.elapsed().as_millis()
            );
        }
        self.journal
            .sync_point(self.stop, MachineState { vcpu, devices }, pages);
        Ok(())
    }

    /// Counters readable while the VM runs.
    pub fn live_counters(&self) -> Arc<LiveCounters> {
        self.live_counters.clone()
    }

    /// The flag that stops the VM at its next stop (set it, then kick the
    /// vCPU and wake the cause queue).
    pub fn stop_request(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.stop_request.clone()
    }

    /// Answers a pre-copy round asked for by the replication side: the
    /// pages to send (all of them for round 0; then those written since).
    fn serve_precopy(&mut self) -> Result<(), VcpuError> {
        let Some(all) = self.precopy.requested() else {
            return Ok(());
        };
        let sync = &mut self.sync;
        sync.tracker
            .harvest(&sync.vm, &sync.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let dirtied = sync.tracker.take(sync.precopy_consumer);
        self.precopy
            .deliver(if all { all_gfns(&sync.memory) } else { dirtied });
        Ok(())
    }

    /// Joining: writes the pre-copied memory (after zeroing, before the
    /// full sync point's pages).
    fn install_base_pages(&mut self) -> Result<(), VcpuError> {
        for page in std::mem::take(&mut self.base_pages) {
            self.sync
                .memory
                .write_slice(&page.data, GuestAddress(page.gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("pre-copied page {:#x}: {e}", page.gfn)))?;
        }
        Ok(())
    }

    /// The pre-copy port of this (recording) vCPU, and a reader of guest
    /// memory for the thread that copies it.
    pub fn precopy(
        &self,
    ) -> (
        Arc<crate::precopy::PrecopyPort>,
        crate::precopy::MemoryReader,
    ) {
        (
            self.precopy.clone(),
            crate::precopy::MemoryReader::new(self.sync.memory.clone()),
        )
    }

    /// Joining: memory the primary pre-copied, installed at the join.
    pub fn set_base_pages(&mut self, pages: Vec<Page>) {
        self.base_pages = pages;
    }

    /// Zeroes all guest memory (before installing a full sync point).
    fn zero_memory(&mut self) -> Result<(), VcpuError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let zero = vec![0u8; 1 << 20];
        for region in self.sync.memory.iter() {
            let (start, len) = (region.start_addr().0, region.len());
            let mut at = 0;
            while at < len {
                let n = (len - at).min(zero.len() as u64) as usize;
                self.sync
                    .memory
                    .write_slice(&zero[..n], GuestAddress(start + at))
                    .map_err(|e| VcpuError::Memory(format!("zeroing: {e}")))?;
                at += n as u64;
            }
        }
        Ok(())
    }

    /// Ask for a full sync point (all of memory) at the next kick (or now,
    /// if the guest is halted: wake it with the cause queue).
    pub fn full_sync_handles(
        &self,
    ) -> (
        Arc<std::sync::atomic::AtomicBool>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        (self.full_sync.clone(), self.full_sync_stop.clone())
    }

    /// Console bytes the guest wrote at this stop: emitted live, journaled
    /// when recording; replaying, the recorded bytes are emitted and the
    /// replay's own are only compared with them.
    fn console_output(&mut self) -> Result<(), VcpuError> {
        let bytes = self.devices.take_serial_out();
        if bytes.is_empty() {
            return Ok(());
        }
        let stop = self.stop;
        let emitted = match self.journal.replayer() {
            Some(rep) => match rep.take_serial_out(stop) {
                Some(recorded) => {
                    if recorded != bytes {
                        self.stats.check_mismatches += 1;
                    }
                    recorded
                }
                None => {
                    self.stats.check_mismatches += 1;
                    Vec::new()
                }
            },
            None => {
                if self.journal.recording() {
                    self.journal.check(
                        stop,
                        Check::SerialOut {
                            bytes: bytes.clone(),
                        },
                    )?;
                }
                bytes
            }
        };
        if !emitted.is_empty() {
            self.devices
                .outputs
                .emit(tandem_replay::Output::Serial(emitted));
        }
        Ok(())
    }

    /// (c) At a deterministic stop: end an epoch when the recorder's timer
    /// fired, or check the one the log holds for this stop.
    fn maybe_end_epoch(&mut self) -> Result<(), VcpuError> {
        if self.journal.recording() {
            let now = Instant::now();
            let due = *self
                .epochs
                .deadline
                .get_or_insert(now + self.policy.epoch_interval);
            // Held output (replayed commit) shortens the epoch, at most to
            // a millisecond.
            let shortened = self.devices.outputs.pending()
                && self
                    .epochs
                    .last_end
                    .is_none_or(|t| now - t >= Duration::from_millis(1));
            if now >= due || shortened {
                self.epochs.last_end = Some(now);
                self.record_epoch_end()?;
                self.epochs.deadline = Some(now + self.policy.epoch_interval);
            }
            return Ok(());
        }
        let stop = self.stop;
        if let Some(recorded) = self.journal.replayer().and_then(|r| r.take_epoch_end(stop)) {
            self.verify_epoch_end(recorded)?;
        }
        Ok(())
    }

    /// The canonical state's ingredients, after completing the pending exit.
    fn epoch_inputs(&mut self) -> Result<EpochInputs, VcpuError> {
        self.complete_pending_exit()?;
        let vcpu = state::capture(&self.fd, &self.sync.msrs, false)?;
        let devices = self.devices.capture();
        let sync = &mut self.sync;
        sync.tracker
            .harvest(&sync.vm, &sync.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let dirtied = sync.tracker.take(sync.epoch_consumer);
        Ok((vcpu, devices, dirtied))
    }

    fn mem_pages(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.sync
            .memory
            .iter()
            .map(|r| {
                use vm_memory::GuestMemoryRegion;
                r.len() / PAGE_SIZE as u64
            })
            .sum()
    }

    fn record_epoch_end(&mut self) -> Result<(), VcpuError> {
        let (vcpu, devices, dirtied) = self.epoch_inputs()?;
        let epoch = self.epochs.number;
        let hashes = hash_state(
            &vcpu,
            &devices,
            &self.sync.memory,
            &dirtied,
            epoch,
            self.mem_pages(),
        );
        self.journal.epoch_end(Record::EpochEnd {
            epoch,
            stop: self.stop,
            pages: encode_runs(&dirtied),
            hashes: hashes.components,
            scrub: hashes.scrub,
        });
        self.epochs.number += 1;
        self.stats.epochs += 1;
        self.live_counters
            .epochs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn verify_epoch_end(&mut self, recorded: RecordedEpoch) -> Result<(), VcpuError> {
        let (vcpu, devices, own) = self.epoch_inputs()?;
        let mem_pages = self.mem_pages();
        let listed = decode_runs(&recorded.pages, mem_pages);
        let ours = hash_state(
            &vcpu,
            &devices,
            &self.sync.memory,
            &listed,
            recorded.epoch,
            mem_pages,
        );
        let mut diffs = differences(&recorded.hashes, &recorded.scrub, &ours);
        let listed_set: BTreeSet<u64> = listed.iter().copied().collect();
        let extra: Vec<u64> = own
            .iter()
            .copied()
            .filter(|g| !listed_set.contains(g) && !self.epochs.installed.contains(g))
            .collect();
        if !extra.is_empty() {
            diffs.push(format!(
                "{} pages dirtied by the replay but not the recording (first {:#x})",
                extra.len(),
                extra[0]
            ));
        }
        self.stats.epochs += 1;
        self.live_counters
            .epochs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.epochs.number = recorded.epoch + 1;
        if let Some(shadow) = self.shadow.as_mut() {
            shadow.wrote(own.iter().copied());
        }
        if diffs.is_empty() {
            self.verified_stop
                .fetch_max(self.stop, std::sync::atomic::Ordering::AcqRel);
            if self.epochs.had_sync {
                self.stats.epochs_transferred += 1;
                self.live_counters
                    .epochs_transferred
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                self.stats.epochs_verified += 1;
                self.live_counters
                    .epochs_verified
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(shadow) = self.shadow.as_mut() {
                if shadow.pending.is_none() {
                    let installed = self.epochs.installed.iter().copied();
                    shadow.verified(&self.sync.memory, listed.iter().copied().chain(installed));
                }
            }
        } else {
            if let Some(shadow) = self.shadow.as_mut() {
                shadow.pending.get_or_insert(recorded.epoch);
                self.unrepaired += 1;
            }
            self.stats.divergences += 1;
            self.live_counters
                .divergences
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.divergence_epoch
                .store(recorded.epoch + 1, std::sync::atomic::Ordering::Release);
            tracing::warn!(
                "divergence at epoch {} (stop {}): {} differ",
                recorded.epoch,
                self.stop,
                diffs.join(", ")
            );
            self.divergence_reports.push(DivergenceReport {
                epoch: recorded.epoch,
                stop: self.stop,
                components: diffs,
                recorded: recorded.hashes.clone(),
                replayed: ours.components.clone(),
            });
        }
        self.epochs.installed.clear();
        self.epochs.had_sync = false;
        Ok(())
    }

    /// Installs a recorded sync point instead of executing the stretch it
    /// covers.
    fn install_sync_point(
        &mut self,
        state: &MachineState,
        pages: &[Page],
    ) -> Result<(), VcpuError> {
        if let Some(shadow) = self.shadow.as_mut() {
            if shadow.pending.is_some() {
                let sync = &mut self.sync;
                sync.tracker
                    .harvest(&sync.vm, &sync.memory)
                    .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
                shadow.wrote(sync.tracker.take(sync.repair_consumer));
                let restored = shadow
                    .repair(&sync.memory, pages)
                    .map_err(VcpuError::Memory)?;
                // These writes are the repair's, not the replay's own.
                self.epochs.installed.extend(restored.iter().copied());
                let restored = restored.len();
                self.stats.repaired += std::mem::take(&mut self.unrepaired);
                tracing::warn!(
                    "repaired at the sync point of stop {}: {restored} pages restored from the last verified state",
                    self.stop
                );
            } else {
                shadow.carried(pages);
            }
        }
        for page in pages {
            self.sync
                .memory
                .write_slice(&page.data, GuestAddress(page.gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {:#x}: {e}", page.gfn)))?;
        }
        state::install(&self.fd, &state.vcpu)?;
        self.devices.install(&state.devices)?;
        self.epochs.installed.extend(pages.iter().map(|p| p.gfn));
        self.epochs.had_sync = true;
        self.stats.sync_points += 1;
        self.live_counters
            .sync_points
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.sync_pages += pages.len() as u64;
        Ok(())
    }

    /// Clears `immediate_exit` unless a kick arrived since `kicks_before`
    /// (the handler runs on this thread, so checking after clearing is exact).
    fn clear_immediate_exit(&mut self, kicks_before: u64) {
        self.fd.set_kvm_immediate_exit(0);
        if VcpuKickTarget::kicks() != kicks_before {
            self.fd.set_kvm_immediate_exit(1);
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
        // exit union is the one KVM filled in.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    /// Collects this stop's causes from the `Inputs` port and applies them,
    /// in order, through the device models.
    fn apply_causes(&mut self) -> Result<(), VcpuError> {
        let mut causes = std::mem::take(&mut self.causes);
        self.journal.collect(self.stop, &mut causes);
        if let Some(checkpoints) = self.checkpoints.as_mut() {
            for cause in &causes {
                if matches!(cause, Cause::NetRx { .. } | Cause::SerialInput(_)) {
                    checkpoints.input_applied(cause);
                }
            }
        }
        let mut result = Ok(());
        for cause in causes.drain(..) {
            if result.is_ok() {
                result = self.devices.apply(cause);
            }
        }
        self.causes = causes;
        self.devices.after_causes();
        Ok(result?)
    }

    /// The stop sequence after the exit itself was handled.
    fn at_stop(&mut self) -> Result<(), VcpuError> {
        // Every kick so far is answered by this stop (which looks at time and
        // the queue next); a later one sets `immediate_exit` again.
        self.clear_immediate_exit(VcpuKickTarget::kicks());
        self.apply_causes()?;
        self.decide_injection()
    }

    /// KVM finishes a PIO/MMIO/MSR exit only on the next KVM_RUN: re-enter
    /// with `immediate_exit` so the vCPU state is complete before we read it.
    fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        if !std::mem::take(&mut self.exit_pending) {
            return Ok(());
        }
        let kicks = VcpuKickTarget::kicks();
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(VcpuError::Kvm {
                what: "KVM_RUN (completing exit)",
                source: e,
            }),
            Ok(exit) => Err(VcpuError::UnexpectedExit(format!(
                "{exit:?} while completing a pending exit"
            ))),
        };
        self.clear_immediate_exit(kicks);
        result
    }

    /// Whether the guest can take an external interrupt right now, from its
    /// captured state (not from `kvm_run`'s flags).
    fn guest_can_take_interrupt(&self) -> Result<bool, VcpuError> {
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        trace!(
            rip = regs.rip,
            rflags = regs.rflags,
            shadow = events.interrupt.shadow,
            injected = events.interrupt.injected,
            "interrupt state"
        );
        Ok(regs.rflags & RFLAGS_IF != 0
            && events.interrupt.shadow == 0
            && events.interrupt.injected == 0
            && events.exception.injected == 0
            && events.nmi.injected == 0)
    }

    fn decide_injection(&mut self) -> Result<(), VcpuError> {
        if !self.devices.interrupt_pending() {
            self.fd.get_kvm_run().request_interrupt_window = 0;
            return Ok(());
        }
        self.complete_pending_exit()?;
        let can = self.guest_can_take_interrupt()?;
        trace!(stop = self.stop, can, "interrupt pending");
        if !can {
            self.request_window(true);
            return Ok(());
        }
        let vector = self.devices.acknowledge_interrupt();
        if let Some(vector) = vector {
            trace!(vector, "inject");
            let irq = kvm_interrupt {
                irq: u32::from(vector),
            };
            // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer,
            // which refers to a live local of exactly that type.
            let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
            if ret < 0 {
                return Err(VcpuError::Kvm {
                    what: "KVM_INTERRUPT",
                    source: kvm_ioctls::Error::last(),
                });
            }
            self.stats.interrupts += 1;
            match self.journal.check(self.stop, Check::Injected { vector }) {
                Err(JournalError::Diverged { stop, what }) => {
                    // A cross-check only: the epoch hashes say what differs
                    // and repair fixes it.
                    self.stats.check_mismatches += 1;
                    tracing::warn!("cross-check failed at stop {stop}: {what}");
                }
                other => other?,
            }
        }
        // Another IRQ may be waiting behind this one: come back when the
        // guest can take it.
        let more = self.devices.interrupt_pending();
        self.request_window(more);
        Ok(())
    }

    /// Asks KVM for an interrupt-window exit. Never while replaying: the
    /// recorder's window exits are sync points in the log, installed at the
    /// right stop; a window exit of the replay's own would be a stop the
    /// recording does not have.
    fn request_window(&mut self, want: bool) {
        let want = want && self.journal.replayer_ref().is_none();
        self.fd.get_kvm_run().request_interrupt_window = u8::from(want);
    }

    /// The guest executed HLT: sleep until an interrupt is pending (live:
    /// until the next deadline or external event; replay: on the log only).
    fn halt(&mut self) -> Result<Halted, VcpuError> {
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let since = Instant::now();
        loop {
            if self.stop_request.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(Halted::Stopped);
            }
            // A secondary joining while the guest sleeps starts from here:
            // a full sync point of the halted vCPU.
            if self.journal.recording() && self.full_sync.load(std::sync::atomic::Ordering::Acquire)
            {
                self.record_sync_point(true)?;
            }
            if self.journal.recording() {
                self.serve_precopy()?;
                // A switch-over parks the sleeping guest here.
                self.journal.park_if_held();
                if self.stop_request.load(std::sync::atomic::Ordering::Acquire) {
                    return Ok(Halted::Stopped);
                }
            }
            self.apply_causes()?;
            if let Some(crash) = self.watchdog_crash() {
                return Ok(Halted::Crashed(crash));
            }
            if self.devices.interrupt_pending() {
                break;
            }
            if regs.rflags & RFLAGS_IF == 0 {
                return Ok(Halted::Crashed(GuestCrash::HaltedWithInterruptsDisabled {
                    rip: regs.rip,
                }));
            }
            if let Some(rep) = self.journal.replayer() {
                if rep.is_live() {
                    // The primary may still be halted here too: wait for
                    // what it logs next, or go live if it is gone.
                    if !rep.wait_at(self.stop)? {
                        self.go_live()?;
                    }
                    continue;
                }
                // Everything logged for this stop has been applied.
                if rep.exhausted() {
                    return Ok(Halted::ReplayEnded(ReplayEnd::LogExhausted {
                        stop: self.stop,
                    }));
                }
                let next = rep.next_record().unwrap_or_default();
                return Err(JournalError::Diverged {
                    stop: self.stop,
                    what: format!(
                        "the guest halted and nothing logged for this stop wakes it (the log continues with {next})"
                    ),
                }
                .into());
            }
            let deadline = self.devices.next_deadline_ns();
            if deadline.is_none() {
                debug!("halted with no timer armed: waiting for external input");
            }
            self.journal.wait(deadline);
        }
        self.stats.halted += since.elapsed();
        Ok(Halted::Woken)
    }
}

/// The vCPU state, the device states and the pages dirtied this epoch.
type EpochInputs = (state::VcpuSnapshot, Vec<(String, Vec<u8>)>, Vec<u64>);

/// How a HLT ended.
enum Halted {
    /// An interrupt is pending.
    Woken,
    /// Interrupts were off: nothing can wake the guest.
    Crashed(GuestCrash),
    /// The replay has no more log.
    ReplayEnded(ReplayEnd),
    /// The VM was asked to stop.
    Stopped,
}

/// Every guest frame number of `memory`.
fn all_gfns(memory: &GuestMemoryMmap) -> Vec<u64> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory
        .iter()
        .flat_map(|r| {
            let first = r.start_addr().0 / PAGE_SIZE as u64;
            first..first + r.len() / PAGE_SIZE as u64
        })
        .collect()
}
