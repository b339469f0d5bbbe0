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
use crate::exit::{handle_exit, ExitContext, ExitCounters, ExitOutcome, StopKind};
use crate::journal::{Journal, JournalError};
use crate::kick::{DeadlineTimer, Kicker, VcpuKickTarget};
use crate::state::{self, StateError};

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
}

impl std::fmt::Display for GuestCrash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestCrash::TripleFault { rip } => {
                write!(f, "guest triple-faulted (shutdown) at rip {rip:#x}")
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
            RunOutcome::ReplayEnded(_) => EndOutcome::Stopped,
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
    /// Interrupts injected.
    pub interrupts: u64,
    /// Time spent halted.
    pub halted: Duration,
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
    causes: Vec<Cause>,
    stats: VcpuStats,
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
            causes: Vec::new(),
            stats: VcpuStats::default(),
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
        timer.set_min_interval(self.policy.min_kick_interval);
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
        self.journal.finish(self.stop, outcome.end_outcome())?;
        Ok(outcome)
    }

    fn run_loop(&mut self, timer: &mut DeadlineTimer) -> Result<RunOutcome, VcpuError> {
        loop {
            // (f) re-enter from the current stop, if the log allows it.
            if !self.journal.leave_stop(self.stop)? {
                return Ok(RunOutcome::ReplayEnded(ReplayEnd::AtWatermark {
                    stop: self.stop,
                }));
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
                None
            } else {
                match self.fd.run() {
                    Ok(exit) => match handle_exit(exit, &mut self.ctx) {
                        ExitOutcome::Stop(kind) => Some(kind),
                        ended => {
                            self.stop = next;
                            return self.ended(ended);
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
            match kind {
                Some(_) => self.stats.stops += 1,
                // (c) A kick-induced stop is not reproducible: log the state.
                None if self.journal.recording() => self.record_sync_point()?,
                None => {}
            }
            if kind == Some(StopKind::Hlt) {
                match self.halt()? {
                    Halted::Woken => {}
                    Halted::Crashed(crash) => return Ok(RunOutcome::Crashed(crash)),
                    Halted::ReplayEnded(end) => return Ok(RunOutcome::ReplayEnded(end)),
                }
            }
            self.exit_pending = kind.is_some_and(StopKind::needs_completion);
            self.at_stop()?;
            if let Some(stale) = self
                .journal
                .replayer()
                .and_then(|rep| rep.stale_record(self.stop + 1))
            {
                return Err(stale.into());
            }
            timer.set(self.next_kick_deadline());
        }
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
    fn next_kick_deadline(&self) -> Option<Instant> {
        if self.journal.replayer_ref().is_some() {
            return None;
        }
        let device = self.devices.next_deadline_ns();
        let sync = match (self.journal.recording(), self.policy.sync_interval) {
            (true, Some(every)) => {
                Some(self.last_sync_ns + u64::try_from(every.as_nanos()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        let ns = match (device, sync) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ns.map(|ns| self.start + Duration::from_nanos(ns))
    }

    /// Logs the complete machine state and the pages dirtied since the last
    /// sync point (DESIGN point 6).
    fn record_sync_point(&mut self) -> Result<(), VcpuError> {
        let vcpu = state::capture(&self.fd, &self.sync.msrs, false)?;
        let devices = self.devices.capture();
        let sync = &mut self.sync;
        sync.tracker
            .harvest(&sync.vm, &sync.memory)
            .map_err(|e| VcpuError::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let mut pages = Vec::new();
        for gfn in sync.tracker.take(sync.consumer) {
            let mut data = vec![0u8; PAGE_SIZE];
            sync.memory
                .read_slice(&mut data, GuestAddress(gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {gfn:#x}: {e}")))?;
            pages.push(Page { gfn, data });
        }
        self.stats.sync_points += 1;
        self.stats.sync_pages += pages.len() as u64;
        self.last_sync_ns = self.ctx.clock.now_ns();
        self.journal
            .sync_point(self.stop, MachineState { vcpu, devices }, pages);
        Ok(())
    }

    /// Installs a recorded sync point instead of executing the stretch it
    /// covers.
    fn install_sync_point(
        &mut self,
        state: &MachineState,
        pages: &[Page],
    ) -> Result<(), VcpuError> {
        for page in pages {
            self.sync
                .memory
                .write_slice(&page.data, GuestAddress(page.gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {:#x}: {e}", page.gfn)))?;
        }
        state::install(&self.fd, &state.vcpu)?;
        self.devices.install(&state.devices)?;
        self.stats.sync_points += 1;
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
    fn apply_causes(&mut self) {
        let mut causes = std::mem::take(&mut self.causes);
        self.journal.collect(self.stop, &mut causes);
        for cause in causes.drain(..) {
            self.devices.apply(cause);
        }
        self.causes = causes;
        self.devices.after_causes();
    }

    /// The stop sequence after the exit itself was handled.
    fn at_stop(&mut self) -> Result<(), VcpuError> {
        // Every kick so far is answered by this stop (which looks at time and
        // the queue next); a later one sets `immediate_exit` again.
        self.clear_immediate_exit(VcpuKickTarget::kicks());
        self.apply_causes();
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
        if !self.guest_can_take_interrupt()? {
            self.fd.get_kvm_run().request_interrupt_window = 1;
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
            self.journal.check(self.stop, Check::Injected { vector })?;
        }
        // Another IRQ may be waiting behind this one: come back when the
        // guest can take it.
        let more = self.devices.interrupt_pending();
        self.fd.get_kvm_run().request_interrupt_window = u8::from(more);
        Ok(())
    }

    /// The guest executed HLT: sleep until an interrupt is pending (live:
    /// until the next deadline or external event; replay: on the log only).
    fn halt(&mut self) -> Result<Halted, VcpuError> {
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let since = Instant::now();
        loop {
            self.apply_causes();
            if self.devices.interrupt_pending() {
                break;
            }
            if regs.rflags & RFLAGS_IF == 0 {
                return Ok(Halted::Crashed(GuestCrash::HaltedWithInterruptsDisabled {
                    rip: regs.rip,
                }));
            }
            if let Some(rep) = self.journal.replayer() {
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

/// How a HLT ended.
enum Halted {
    /// An interrupt is pending.
    Woken,
    /// Interrupts were off: nothing can wake the guest.
    Crashed(GuestCrash),
    /// The replay has no more log.
    ReplayEnded(ReplayEnd),
}
