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
use tandem_replay::{Cause, Inputs};
use tracing::{debug, trace};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::device_manager::DeviceManager;
use crate::exit::{handle_exit, ExitContext, ExitCounters, ExitOutcome, StopKind};
use crate::kick::{DeadlineTimer, Kicker, VcpuKickTarget};

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
    /// Kick-induced stops (later: sync points).
    pub kicked_stops: u64,
    /// Interrupts injected.
    pub interrupts: u64,
    /// Time spent halted.
    pub halted: Duration,
}

/// The vCPU and everything its thread owns.
pub struct Vcpu {
    fd: VcpuFd,
    ctx: ExitContext,
    devices: DeviceManager,
    inputs: Box<dyn Inputs>,
    kicker: Kicker,
    start: Instant,
    /// Stops so far; every logged event sits at a stop number.
    stop: u64,
    causes: Vec<Cause>,
    stats: VcpuStats,
}

impl Vcpu {
    /// A vCPU ready to run. `start` is the host instant of guest time 0
    /// (for the deadline timer).
    pub fn new(
        fd: VcpuFd,
        ctx: ExitContext,
        devices: DeviceManager,
        inputs: Box<dyn Inputs>,
        kicker: Kicker,
        start: Instant,
    ) -> Self {
        Self {
            fd,
            ctx,
            devices,
            inputs,
            kicker,
            start,
            stop: 0,
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
        let outcome = self.run_loop(&mut timer);
        self.stats.exits = self.ctx.counters;
        outcome.map(|o| (o, self.stats))
    }

    fn run_loop(&mut self, timer: &mut DeadlineTimer) -> Result<RunOutcome, VcpuError> {
        loop {
            let stop = match self.fd.run() {
                Ok(exit) => match handle_exit(exit, &mut self.ctx) {
                    ExitOutcome::Stop(kind) => Some(kind),
                    ExitOutcome::GuestExit(code) => return Ok(RunOutcome::GuestExit(code)),
                    ExitOutcome::Reset => return Ok(RunOutcome::Reset),
                    ExitOutcome::Shutdown => {
                        let rip = self.rip();
                        return Ok(RunOutcome::Crashed(GuestCrash::TripleFault { rip }));
                    }
                    ExitOutcome::InternalError => {
                        let suberror = self.internal_suberror();
                        let rip = self.rip();
                        return Ok(RunOutcome::Crashed(GuestCrash::EmulationFailure {
                            rip,
                            suberror,
                        }));
                    }
                    ExitOutcome::FailEntry(reason) => {
                        return Ok(RunOutcome::Crashed(GuestCrash::FailEntry { reason }))
                    }
                    ExitOutcome::Unexpected(what) => return Err(VcpuError::UnexpectedExit(what)),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.stats.kicked_stops += 1;
                    None
                }
                Err(e) => {
                    return Err(VcpuError::Kvm {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            };
            if stop.is_some() {
                self.stats.stops += 1;
            }
            self.stop += 1;
            if stop == Some(StopKind::Hlt) {
                if let Some(crash) = self.halt()? {
                    return Ok(RunOutcome::Crashed(crash));
                }
            }
            self.at_stop(stop.is_some_and(StopKind::needs_completion))?;
            let deadline = self.devices.next_deadline_ns();
            timer.set(deadline.map(|ns| self.start + Duration::from_nanos(ns)));
        }
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
        self.inputs.collect(self.stop, &mut causes);
        for cause in causes.drain(..) {
            self.devices.apply(cause);
        }
        self.causes = causes;
        self.devices.after_causes();
    }

    /// The stop sequence after the exit itself was handled.
    fn at_stop(&mut self, exit_pending: bool) -> Result<(), VcpuError> {
        // Every kick so far is answered by this stop (which looks at time and
        // the queue next); a later one sets `immediate_exit` again.
        self.clear_immediate_exit(VcpuKickTarget::kicks());
        self.apply_causes();
        self.decide_injection(exit_pending)
    }

    /// KVM finishes a PIO/MMIO/MSR exit only on the next KVM_RUN: re-enter
    /// with `immediate_exit` so the vCPU state is complete before we read it.
    fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
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

    fn decide_injection(&mut self, exit_pending: bool) -> Result<(), VcpuError> {
        if !self.devices.interrupt_pending() {
            self.fd.get_kvm_run().request_interrupt_window = 0;
            return Ok(());
        }
        if exit_pending {
            self.complete_pending_exit()?;
        }
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
        }
        // Another IRQ may be waiting behind this one: come back when the
        // guest can take it.
        let more = self.devices.interrupt_pending();
        self.fd.get_kvm_run().request_interrupt_window = u8::from(more);
        Ok(())
    }

    /// The guest executed HLT: sleep until an interrupt is pending. Returns a
    /// crash if interrupts are disabled (nothing could ever wake the guest).
    fn halt(&mut self) -> Result<Option<GuestCrash>, VcpuError> {
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let since = Instant::now();
        loop {
            self.apply_causes();
            if self.devices.interrupt_pending() {
                break;
            }
            if regs.rflags & RFLAGS_IF == 0 {
                return Ok(Some(GuestCrash::HaltedWithInterruptsDisabled {
                    rip: regs.rip,
                }));
            }
            let deadline = self.devices.next_deadline_ns();
            if deadline.is_none() {
                debug!("halted with no timer armed: waiting for external input");
            }
            self.inputs.wait(deadline);
        }
        self.stats.halted += since.elapsed();
        Ok(None)
    }
}
