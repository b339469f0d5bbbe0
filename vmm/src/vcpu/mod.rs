//! The vCPU thread: `KVM_RUN`, the stop sequence, interrupt injection, HLT.
//!
//! Every exit goes through [`handle_exit`]; then every stop runs the same
//! sequence (DESIGN point 5): advance guest time, let time-driven devices
//! act, apply queued external events, decide injection from the captured vCPU
//! state (completing a pending PIO/MMIO/MSR exit first), re-enter. On HLT the
//! thread sleeps until the next device deadline or external event; it never
//! busy-spins.
//!
//! Size: over 800 lines because it holds the vCPU's types (errors, outcomes,
//! counters, the `Vcpu` struct) and the run loop; the stop sequence's parts
//! live in `stop.rs`, `sync.rs`, `verify.rs`, `recovery.rs` and `live.rs`.

mod delivery;
mod epoch_dump;
mod land;
mod live;
mod recovery;
mod stop;
mod sync;
mod verify;

use std::time::{Duration, Instant};

use kvm_bindings::kvm_interrupt;
use kvm_ioctls::{VcpuExit, VcpuFd};
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
    /// Replaying: sync points landed on whose state the replay had reached
    /// by itself (nothing installed; their epochs stay verified).
    pub sync_points_landed: u64,
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
    /// Positioned stops and what landing on them cost.
    pub landing: land::LandingStats,
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
    pub msrs: crate::state::SavedMsrs,
}

impl SyncContext {
    /// Moves KVM's dirty log into the tracker, for every consumer.
    fn harvest(&mut self) -> Result<(), VcpuError> {
        self.tracker
            .harvest(&self.vm, &self.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))
    }
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
    /// Recording: how long a device interrupt may wait for a stop of the
    /// guest's own (an exit with interrupts on, or HLT) before a kick, or
    /// an interrupt-window exit, makes one. Zero: kick at the deadline.
    pub irq_defer: Duration,
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
    /// Recording: the shortest time to the next epoch end, from what the
    /// last one cost (see `verify.rs::EPOCH_COST_SHARE`).
    min_gap: Duration,
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
    /// When the last sync point was taken, in host time since `start`.
    last_sync_ns: u64,
    /// The current stop's PIO/MMIO/MSR exit is not finished in KVM yet.
    exit_pending: bool,
    /// Irq deferral: the current stop was made by a kick or an interrupt
    /// window (not by an exit of the guest's own).
    kicked_stop: bool,
    /// Irq deferral: since when (host time since `start`) a pending
    /// interrupt has waited for the guest to enable interrupts at an exit.
    irq_waiting_since: Option<u64>,
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
    /// A sync point is asked for at the next kick stop (repair).
    sync_request: Arc<std::sync::atomic::AtomicBool>,
    /// Recording: the primary's held output waits for verified epochs
    /// (`output_commit = "replayed"`): only then do held outputs shorten
    /// epochs.
    output_awaits_verification: Arc<std::sync::atomic::AtomicBool>,
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
    /// The position counter (positioned stops), if the run has one.
    positions: land::Positions,
    /// Divergences found while replaying, in order.
    pub divergence_reports: Vec<DivergenceReport>,
    go_live_hooks: Option<GoLiveHooks>,
    /// `TANDEM_DEBUG_EPOCHS`: every epoch end's state, as text.
    epoch_dump: Option<epoch_dump::EpochDump>,
    /// A test hook (`TANDEM_TEST_REPLAY_STALL_US`): a replay sleeps this
    /// long at every stop, so it falls behind its primary.
    replay_stall: Option<Duration>,
    /// `TANDEM_DEBUG_REPLAY_CONSOLE=FILE`: a replay writes the console
    /// bytes its own guest produced there (what it emits is the recorded
    /// bytes; a difference only counts as a cross-check mismatch), also
    /// past the end of the log.
    replay_console: Option<std::fs::File>,
}

/// Counters other threads may read while the VM runs.
#[derive(Debug, Default)]
pub struct LiveCounters {
    /// Deterministic stops.
    pub stops: std::sync::atomic::AtomicU64,
    /// The stop the vCPU is at (a replay: executed up to).
    pub at_stop: std::sync::atomic::AtomicU64,
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
    /// Positioned stops logged or landed.
    pub positioned: std::sync::atomic::AtomicU64,
    /// Sync points logged, by [`SyncReason`] (index: the reason as usize).
    pub sync_by_reason: [std::sync::atomic::AtomicU64; SyncReason::COUNT],
    /// Interrupts injected at a stop of the guest's own exit (no kick or
    /// interrupt window needed: what `--irq-defer` aims for).
    pub irq_at_own_exits: std::sync::atomic::AtomicU64,
    /// Replaying: the median and 99th percentile landing time so far, µs.
    pub landing_p50_us: std::sync::atomic::AtomicU64,
    /// See `landing_p50_us`.
    pub landing_p99_us: std::sync::atomic::AtomicU64,
    /// Where the vCPU thread's wall time went, µs by [`Phase`] (index: the
    /// phase as usize): what makes a slow pair slow.
    pub phase_us: [std::sync::atomic::AtomicU64; Phase::COUNT],
}

impl LiveCounters {
    /// Adds the time since `since` to `phase`.
    pub(crate) fn charge(&self, phase: Phase, since: Instant) {
        let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.phase_us[phase as usize].fetch_add(us, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Charges the time until it is dropped to a phase (a function with many
/// ways out).
pub(crate) struct PhaseTimer {
    counters: Arc<LiveCounters>,
    phase: Phase,
    since: Instant,
}

impl PhaseTimer {
    pub(crate) fn start(counters: &Arc<LiveCounters>, phase: Phase) -> Self {
        Self {
            counters: counters.clone(),
            phase,
            since: Instant::now(),
        }
    }
}

impl Drop for PhaseTimer {
    fn drop(&mut self) {
        self.counters.charge(self.phase, self.since);
    }
}

/// What the vCPU thread spends its time on (`LiveCounters::phase_us`).
/// Apart from sync points in HLT the phases do not nest; what is left of the thread's time is the rest
/// of the stop sequence (devices, causes, decisions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// In `KVM_RUN`: the guest's execution and KVM's in-kernel exits
    /// (landings included).
    Guest,
    /// Ending or checking epochs: dirty-page harvest, state capture,
    /// hashing.
    EpochEnds,
    /// Logging or installing sync points.
    SyncPoints,
    /// Asleep with the guest in HLT, and what the halt loop serves (a
    /// sync point taken there counts here and in `SyncPoints`).
    Halted,
    /// Leaving a stop: the primary's brake, a replay waiting for the log.
    Leaving,
}

impl Phase {
    /// How many phases there are.
    pub const COUNT: usize = 5;
}

/// Why a recorder logs a sync point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncReason {
    /// A kick stop that could not be positioned (no position counter, or a
    /// state it cannot count).
    Unpositioned,
    /// `--sync-interval` came due.
    Interval,
    /// Asked for: a secondary's repair request, or a checkpoint's.
    Requested,
    /// A joining secondary starts from it (all of memory, or a pre-copy's
    /// last delta).
    Full,
    /// A kick stop that could have been positioned, while the secondary's
    /// replay catches up (it installs a sync point, it lands on a
    /// position).
    CatchUp,
}

impl SyncReason {
    /// How many reasons there are.
    pub const COUNT: usize = 5;
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
        let journal_replays = journal.replayer_ref().is_some();
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
            kicked_stop: false,
            irq_waiting_since: None,
            epochs: Epochs::default(),
            shadow: None,
            unrepaired: 0,
            verified_stop: Arc::default(),
            divergence_epoch: Arc::default(),
            full_sync: Arc::default(),
            sync_request: Arc::default(),
            output_awaits_verification: Arc::default(),
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
            positions: land::Positions::default(),
            divergence_reports: Vec::new(),
            go_live_hooks: None,
            epoch_dump: epoch_dump::EpochDump::from_env(),
            replay_console: std::env::var_os("TANDEM_DEBUG_REPLAY_CONSOLE")
                .filter(|_| journal_replays)
                .and_then(|path| std::fs::File::create(path).ok()),
            replay_stall: std::env::var("TANDEM_TEST_REPLAY_STALL_US")
                .ok()
                .and_then(|us| us.parse().ok())
                .map(Duration::from_micros),
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

    /// The kicker of this vCPU (a kick-induced stop is a sync point).
    pub fn kicker(&self) -> Kicker {
        self.kicker.clone()
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

    /// The run: DESIGN point 5's stop sequence, one stop after another.
    fn run_loop(&mut self, timer: &mut DeadlineTimer) -> Result<RunOutcome, VcpuError> {
        loop {
            if self.stop_requested() {
                return Ok(RunOutcome::Stopped);
            }
            // Rolled back to a checkpoint taken in HLT: sleep on there.
            if std::mem::take(&mut self.resume_halted) {
                match self.sleep_at_stop()? {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                }
            }
            // (f) re-enter from the current stop, if the log allows it.
            let output_waits = self.devices.outputs.take_newly_held();
            let leaving = Instant::now();
            let leave = self.journal.leave_stop(self.stop, output_waits);
            self.live_counters.charge(Phase::Leaving, leaving);
            match leave? {
                Leave::Enter => {}
                Leave::ReplayEnd => {
                    let stop = self.stop;
                    return Ok(RunOutcome::ReplayEnded(ReplayEnd::AtWatermark { stop }));
                }
                Leave::GoLive => {
                    self.go_live()?;
                    continue;
                }
            }
            // Asked to stop while waiting to leave (a switch-over's hold):
            // the guest does not run again.
            if self.stop_requested() {
                return Ok(RunOutcome::Stopped);
            }
            // (a) the exit, or the sync point that stands for it.
            let kind = match self.next_stop(timer)? {
                Step::Stop(kind) => kind,
                Step::Again => continue,
                Step::Done(outcome) => return Ok(outcome),
            };
            // (b)-(e) the rest of the stop sequence.
            if let Some(outcome) = self.at_new_stop(kind)? {
                return Ok(outcome);
            }
        }
    }

    /// Whether the VM was asked to stop.
    fn stop_requested(&self) -> bool {
        self.stop_request.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Moves the vCPU and the devices to stop `stop`.
    fn set_stop(&mut self, stop: u64) {
        self.stop = stop;
        self.live_counters
            .at_stop
            .store(stop, std::sync::atomic::Ordering::Relaxed);
        self.devices.set_stop(stop);
    }

    /// (a) Runs the guest to its next stop or, replaying, installs the sync
    /// point logged for it.
    fn next_stop(&mut self, timer: &mut DeadlineTimer) -> Result<Step, VcpuError> {
        let next = self.stop + 1;
        let mut landed = false;
        if let Some(at) = self
            .journal
            .replayer()
            .and_then(|rep| rep.take_positioned(next))
        {
            // A sync point logged at the same stop (an interval or repair
            // one) is landed on first, then compared or installed below.
            let sync_here = self
                .journal
                .replayer_ref()
                .is_some_and(|rep| rep.sync_point_next(next));
            if !sync_here {
                if self.lost() {
                    return Ok(Step::Stop(None));
                }
                return self.land(next, at);
            }
            if !self.lost() {
                let step = match self.land(next, at) {
                    // Without repair (no shadow) a miss is an error where
                    // nothing follows to fix it; here the sync point does.
                    Err(VcpuError::Journal(JournalError::Diverged { stop, what })) => {
                        self.landing_missed(stop, what);
                        Step::Stop(None)
                    }
                    other => other?,
                };
                if !matches!(step, Step::Stop(None)) {
                    return Ok(step);
                }
                // A miss leaves the guest lost: this sync point repairs it.
                landed = !self.lost();
            }
        }
        let replayed = self
            .journal
            .replayer()
            .and_then(|rep| rep.take_sync_point(next));
        let Some((state, pages)) = replayed else {
            if self.lost() {
                // The guest's state is wrong: pass the stop without it, or
                // end where the log holds no sync point to repair from (a
                // live log ends only with its primary's End record).
                let ended = self
                    .journal
                    .replayer()
                    .is_some_and(|rep| rep.nothing_more());
                if ended {
                    let stop = self.stop;
                    return Ok(Step::Done(RunOutcome::ReplayEnded(
                        ReplayEnd::LogExhausted { stop },
                    )));
                }
                return Ok(Step::Stop(None));
            }
            return self.run_guest(next, timer);
        };
        self.found();
        // KVM would otherwise finish the previous PIO/MMIO exit on top of
        // the installed state.
        self.complete_pending_exit()?;
        // A divergence found earlier (an epoch end) waits for this sync
        // point's install to be repaired: no comparison then.
        if landed
            && self.unrepaired().is_none()
            && self.sync_point_verified(next, &state, &pages)?
        {
            return Ok(Step::Stop(None));
        }
        self.install_sync_point(&state, &pages)?;
        if !state.vcpu.halted {
            return Ok(Step::Stop(None));
        }
        // Captured while the guest slept in HLT: sleep on here as the
        // recording did (a stop: the count restarts here as it did there).
        self.set_stop(next);
        self.count_stop()?;
        Ok(match self.sleep_at_stop()? {
            Some(outcome) => Step::Done(outcome),
            None => Step::Again,
        })
    }

    /// One `KVM_RUN`, up to the exit that makes stop `next`.
    fn run_guest(&mut self, next: u64, timer: &mut DeadlineTimer) -> Result<Step, VcpuError> {
        // Armed at every entry, whatever led here (a stop, going live, a
        // rollback or reboot): a guest that spins without exits still gets
        // its timer and its checkpoints.
        self.arm_kick_timer(timer);
        // A kick between a fault and its delivery is advanced to the
        // handler's entry with one more entry (delivery.rs).
        let mut advancing: Option<u64> = None;
        let exit = loop {
            self.note_entry();
            let entered = Instant::now();
            let run = self.fd.run();
            self.live_counters.charge(Phase::Guest, entered);
            match run {
                Ok(VcpuExit::Debug(at)) if advancing.is_some() => {
                    if Some(at.pc) != advancing {
                        // KVM reports a #DB to us while our breakpoint is
                        // armed: one of the guest's own is lost.
                        tracing::warn!(
                            pc = at.pc,
                            "a debug exit away from the handler's entry while advancing a kick past a delivery"
                        );
                    }
                    break Ok(None);
                }
                Ok(exit) => break Ok(Some(handle_exit(exit, &mut self.ctx))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if self.journal.replayer().is_some() {
                        // Replay takes no kicks; a stray signal is no stop.
                        self.fd.set_kvm_immediate_exit(0);
                        return Ok(Step::Again);
                    }
                    if advancing.is_none() {
                        advancing = self.arm_advance_to_handler()?;
                        if advancing.is_some() {
                            continue;
                        }
                    }
                    break Ok(None);
                }
                Err(e) => {
                    break Err(VcpuError::Kvm {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            }
        };
        // The exit first: one `handle_exit` already dispatched (a PIO
        // write) must not be hidden behind a failure to clear debug state.
        let exit = exit?;
        if advancing.is_some() {
            self.end_delivery()?;
        }
        let Some(exit) = exit else {
            self.stats.kicked_stops += 1;
            return Ok(Step::Stop(None));
        };
        Ok(match exit {
            // On KVMs that run the guest in the instruction emulator (as on
            // the development machines), the interrupt-window exit lands
            // wherever KVM's loop next breaks, not at a fixed instruction:
            // it is not reproducible, so it is a sync point.
            ExitOutcome::Stop(StopKind::IrqWindow) => Step::Stop(None),
            ExitOutcome::Stop(kind) => Step::Stop(Some(kind)),
            ended => {
                self.set_stop(next);
                let outcome = self.ended(ended)?;
                match self.recovered(outcome)? {
                    Some(outcome) => Step::Done(outcome),
                    None => Step::Again,
                }
            }
        })
    }

    /// A guest crash is recovered where the policy allows (None: the run
    /// goes on); any other outcome ends the run.
    fn recovered(&mut self, outcome: RunOutcome) -> Result<Option<RunOutcome>, VcpuError> {
        match outcome {
            RunOutcome::Crashed(crash) if self.recover(&crash)? => Ok(None),
            outcome => Ok(Some(outcome)),
        }
    }

    /// (b)-(e) The stop an exit (`Some`) or a kick (`None`) made: count or
    /// log it, end an epoch, sleep in HLT, checkpoint, apply inputs, decide
    /// injection. Some: the run ends here.
    fn at_new_stop(&mut self, kind: Option<StopKind>) -> Result<Option<RunOutcome>, VcpuError> {
        self.set_stop(self.stop + 1);
        if let Some(stall) = self.replay_stall.filter(|_| !self.journal.recording()) {
            std::thread::sleep(stall);
        }
        self.kicked_stop = kind.is_none();
        let count = self.count_stop()?;
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
                self.maybe_end_epoch()?;
            }
            // (c) A kick-induced stop: logged where it is (a positioned
            // stop), or, where it cannot be, with the whole state; a sync
            // point due anyway (interval, repair) follows its position, so
            // a replay lands there first and checks it.
            None if self.journal.recording() => {
                let due = self.sync_point_due();
                if due.is_none()
                    && self.has_position_counter()
                    && self.journal.secondary_catching_up()
                {
                    self.record_sync_point(false, SyncReason::CatchUp)?;
                } else if !self.record_positioned(count)? || due.is_some() {
                    self.record_sync_point(false, due.unwrap_or(SyncReason::Unpositioned))?;
                }
            }
            // Passing stops until a repair: their causes are applied, their
            // checks and epoch ends not compared.
            None if self.lost() => {
                let stop = self.stop;
                if let Some(rep) = self.journal.replayer() {
                    let (causes, console) = rep.pass_stop(stop);
                    self.causes.extend(causes);
                    if !console.is_empty() {
                        self.devices
                            .outputs
                            .emit(tandem_replay::Output::Serial(console));
                    }
                }
                // The recorder slept in HLT here and took the repair's sync
                // point then: the causes before it first, as there (those
                // after it come once it is taken: applied after it).
                let sync_here = self
                    .journal
                    .replayer_ref()
                    .is_some_and(|rep| rep.sync_point_next(stop));
                if sync_here {
                    self.apply_causes()?;
                }
                if let Some((state, pages)) = self
                    .journal
                    .replayer()
                    .and_then(|rep| rep.take_sync_point(stop))
                {
                    self.sync_point_at_halt(&state, &pages)?;
                    if state.vcpu.halted {
                        return self.sleep_at_stop();
                    }
                }
            }
            None => {}
        }
        if kind == Some(StopKind::Hlt) {
            self.maybe_checkpoint(true)?;
            match self.halt()? {
                Halted::Woken => {}
                Halted::Crashed(crash) => return self.recovered(RunOutcome::Crashed(crash)),
                Halted::ReplayEnded(end) => return Ok(Some(RunOutcome::ReplayEnded(end))),
                Halted::Stopped => return Ok(Some(RunOutcome::Stopped)),
            }
        }
        self.exit_pending = kind.is_some_and(StopKind::needs_completion);
        if kind != Some(StopKind::Hlt) {
            self.maybe_checkpoint(false)?;
        }
        self.at_stop()?;
        if let Some(crash) = self.watchdog_crash() {
            return self.recovered(RunOutcome::Crashed(crash));
        }
        self.skip_stale_checks()?;
        Ok(None)
    }

    /// Replaying: checks logged for stops already left are skipped (and
    /// counted); their console bytes are shown as the recording's.
    fn skip_stale_checks(&mut self) -> Result<(), VcpuError> {
        let Some(rep) = self.journal.replayer() else {
            return Ok(());
        };
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
        Ok(())
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

    /// Counters readable while the VM runs.
    pub fn live_counters(&self) -> Arc<LiveCounters> {
        self.live_counters.clone()
    }

    /// The flag that stops the VM at its next stop (set it, then kick the
    /// vCPU and wake the cause queue).
    pub fn stop_request(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.stop_request.clone()
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
        // exit union is the one KVM filled in.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }
}

/// The vCPU state, the device states and the pages dirtied this epoch.
type EpochInputs = (state::VcpuSnapshot, Vec<(String, Vec<u8>)>, Vec<u64>);

/// What came of running toward the next stop.
enum Step {
    /// A stop: an exit of this kind, or (None) a kick or a sync point.
    Stop(Option<StopKind>),
    /// No stop was made (a stray signal, a recovered crash, a sleep that
    /// ended): go round again.
    Again,
    /// The run ends.
    Done(RunOutcome),
}

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
