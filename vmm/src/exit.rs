//! The one exit dispatcher.
//!
//! Every `KVM_RUN` exit is reduced here to an [`ExitOutcome`] by
//! [`handle_exit`], a free function over the buses and the raw exit (as in
//! Firecracker's `vcpu.rs`), so unit tests feed it synthetic exits. This is
//! the function where recording, replay, interrupt injection and output gating
//! hook in. A device access the guest gets wrong is answered as hardware
//! would (unmapped reads are all ones, writes are dropped); only a KVM failure
//! or a guest crash ends the VM.

use std::collections::HashSet;

use kvm_ioctls::VcpuExit;
use tandem_devices::VmRequest;
use tandem_replay::{Clock, GuestClock};
use tracing::{debug, trace};

use crate::bus::{Access, Bus};
use crate::msr::{MSR_IA32_TSC, MSR_IA32_TSC_ADJUST};

/// The kind of a deterministic stop: an exit that happens at the same guest
/// instruction on every run of the same guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
    /// The guest executed HLT.
    Hlt,
    /// The interrupt window we asked for opened.
    IrqWindow,
    /// RDMSR/WRMSR routed to userspace.
    Msr,
}

impl StopKind {
    /// KVM finishes these exits only on the next `KVM_RUN`: before reading or
    /// changing vCPU state at such a stop, complete the exit first.
    pub fn needs_completion(self) -> bool {
        matches!(self, StopKind::Pio | StopKind::Mmio | StopKind::Msr)
    }
}

/// What the vCPU loop does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// A stop was handled; run the stop sequence and re-enter the guest.
    Stop(StopKind),
    /// The guest wrote `code` to the debug-exit port.
    GuestExit(u8),
    /// The guest asked for a machine reset (i8042 0xFE).
    Reset,
    /// The guest reported a panic on the pvpanic port.
    GuestPanic,
    /// Triple fault: KVM reported a shutdown.
    Shutdown,
    /// KVM could not continue the guest (emulation failure and the like).
    InternalError,
    /// KVM refused to enter the guest; the hardware reason code.
    FailEntry(u64),
    /// An exit tandem does not expect in this configuration.
    Unexpected(String),
}

/// Counters of what the dispatcher saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub pio: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Interrupt-window exits.
    pub irq_window: u64,
    /// Userspace MSR exits.
    pub msr: u64,
}

/// Everything the dispatcher needs besides the exit itself.
pub struct ExitContext {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Guest time, for the TSC MSR.
    pub clock: GuestClock,
    /// Host TSC frequency in kHz (the guest's TSC MSR ticks at this rate).
    pub tsc_khz: u32,
    /// Counters.
    pub counters: ExitCounters,
    /// Unmapped addresses already logged, so a guest cannot flood the log.
    unmapped_logged: HashSet<(bool, u64)>,
}

impl ExitContext {
    /// A context over the two buses.
    pub fn new(pio: Bus, mmio: Bus, clock: GuestClock, tsc_khz: u32) -> Self {
        Self {
            pio,
            mmio,
            clock,
            tsc_khz,
            counters: ExitCounters::default(),
            unmapped_logged: HashSet::new(),
        }
    }

    fn note_unmapped(&mut self, mmio: bool, addr: u64, write: bool) {
        // At most 256 distinct addresses are remembered; beyond that, silence.
        if self.unmapped_logged.len() < 256 && self.unmapped_logged.insert((mmio, addr)) {
            let space = if mmio { "MMIO" } else { "port" };
            let dir = if write { "write to" } else { "read from" };
            debug!("guest {dir} unmapped {space} {addr:#x} (logged once)");
        }
    }

    /// Guest TSC value derived from guest time.
    fn guest_tsc(&self) -> u64 {
        let ticks = u128::from(self.clock.now_ns()) * u128::from(self.tsc_khz) / 1_000_000;
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }
}

fn on_write(access: Access) -> Option<ExitOutcome> {
    match access {
        Access::Handled(Some(VmRequest::Exit(code))) => Some(ExitOutcome::GuestExit(code)),
        Access::Handled(Some(VmRequest::Reset)) => Some(ExitOutcome::Reset),
        Access::Handled(Some(VmRequest::Panic)) => Some(ExitOutcome::GuestPanic),
        Access::Handled(None) | Access::Unmapped => None,
    }
}

/// Handles one `KVM_RUN` exit.
pub fn handle_exit(exit: VcpuExit<'_>, ctx: &mut ExitContext) -> ExitOutcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.counters.pio += 1;
            trace!(port, len = data.len(), "pio in");
            if ctx.pio.read(u64::from(port), data) == Access::Unmapped {
                ctx.note_unmapped(false, u64::from(port), false);
            }
            ExitOutcome::Stop(StopKind::Pio)
        }
        VcpuExit::IoOut(port, data) => {
            ctx.counters.pio += 1;
            trace!(port, len = data.len(), "pio out");
            let access = ctx.pio.write(u64::from(port), data);
            if access == Access::Unmapped {
                ctx.note_unmapped(false, u64::from(port), true);
            }
            on_write(access).unwrap_or(ExitOutcome::Stop(StopKind::Pio))
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.counters.mmio += 1;
            if ctx.mmio.read(addr, data) == Access::Unmapped {
                ctx.note_unmapped(true, addr, false);
            }
            ExitOutcome::Stop(StopKind::Mmio)
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.counters.mmio += 1;
            let access = ctx.mmio.write(addr, data);
            if access == Access::Unmapped {
                ctx.note_unmapped(true, addr, true);
            }
            on_write(access).unwrap_or(ExitOutcome::Stop(StopKind::Mmio))
        }
        VcpuExit::Hlt => {
            ctx.counters.hlt += 1;
            ExitOutcome::Stop(StopKind::Hlt)
        }
        VcpuExit::IrqWindowOpen => {
            ctx.counters.irq_window += 1;
            ExitOutcome::Stop(StopKind::IrqWindow)
        }
        VcpuExit::X86Rdmsr(msr) => {
            ctx.counters.msr += 1;
            match msr.index {
                MSR_IA32_TSC => *msr.data = ctx.guest_tsc(),
                MSR_IA32_TSC_ADJUST => *msr.data = 0,
                // Only the MSRs tandem filters come here; anything else is #GP.
                _ => *msr.error = 1,
            }
            ExitOutcome::Stop(StopKind::Msr)
        }
        VcpuExit::X86Wrmsr(msr) => {
            ctx.counters.msr += 1;
            // Guest writes to the TSC are accepted and ignored: guest time is
            // tandem's, and it never jumps.
            *msr.error = u8::from(!matches!(msr.index, MSR_IA32_TSC | MSR_IA32_TSC_ADJUST));
            ExitOutcome::Stop(StopKind::Msr)
        }
        VcpuExit::Shutdown => ExitOutcome::Shutdown,
        VcpuExit::InternalError => ExitOutcome::InternalError,
        VcpuExit::FailEntry(reason, _cpu) => ExitOutcome::FailEntry(reason),
        VcpuExit::SystemEvent(kind, _) => ExitOutcome::Unexpected(format!("system event {kind}")),
        other => ExitOutcome::Unexpected(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::{MsrExitReason, ReadMsrExit, WriteMsrExit};
    use std::sync::{Arc, Mutex};
    use tandem_devices::debug_exit::DebugExit;
    use tandem_devices::scratch::Scratch;
    use tandem_devices::SharedDevice;

    fn context() -> ExitContext {
        let mut pio = Bus::new();
        let exit: SharedDevice = Arc::new(Mutex::new(DebugExit::new()));
        pio.insert(exit, 0xf4, 1).unwrap();
        let scratch: SharedDevice = Arc::new(Mutex::new(Scratch::new()));
        pio.insert(scratch, 0x600, 4).unwrap();
        ExitContext::new(pio, Bus::new(), GuestClock::new(), 2_000_000)
    }

    #[test]
    fn pio_reaches_devices_and_unmapped_ports_read_all_ones() {
        let mut ctx = context();
        let out = 0x1234_5678u32.to_le_bytes();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x600, &out), &mut ctx),
            ExitOutcome::Stop(StopKind::Pio)
        );
        let mut back = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x600, &mut back), &mut ctx),
            ExitOutcome::Stop(StopKind::Pio)
        );
        assert_eq!(u32::from_le_bytes(back), 0x1234_5678);

        let mut unmapped = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x1234, &mut unmapped), &mut ctx),
            ExitOutcome::Stop(StopKind::Pio)
        );
        assert_eq!(unmapped, [0xff, 0xff]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x1234, &[1]), &mut ctx),
            ExitOutcome::Stop(StopKind::Pio)
        );
        assert_eq!(ctx.counters.pio, 4);
    }

    #[test]
    fn debug_exit_port_ends_the_vm_with_the_written_value() {
        let mut ctx = context();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0xf4, &[42]), &mut ctx),
            ExitOutcome::GuestExit(42)
        );
    }

    #[test]
    fn unmapped_mmio_reads_all_ones() {
        let mut ctx = context();
        let mut data = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &mut ctx),
            ExitOutcome::Stop(StopKind::Mmio)
        );
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn tsc_msr_comes_from_guest_time_and_other_msrs_fault() {
        let mut ctx = context();
        ctx.clock.advance_to(1_500_000); // 1.5 ms at 2 GHz
        let (mut error, mut data) = (0u8, 0u64);
        let read = ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: MSR_IA32_TSC,
            data: &mut data,
        };
        assert_eq!(
            handle_exit(VcpuExit::X86Rdmsr(read), &mut ctx),
            ExitOutcome::Stop(StopKind::Msr)
        );
        assert_eq!((error, data), (0, 3_000_000));

        let read = ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x1b,
            data: &mut data,
        };
        handle_exit(VcpuExit::X86Rdmsr(read), &mut ctx);
        assert_eq!(error, 1);

        let mut werror = 1u8;
        let write = WriteMsrExit {
            error: &mut werror,
            reason: MsrExitReason::Filter,
            index: MSR_IA32_TSC,
            data: 5,
        };
        handle_exit(VcpuExit::X86Wrmsr(write), &mut ctx);
        assert_eq!(werror, 0);
        assert_eq!(ctx.counters.msr, 3);
    }

    #[test]
    fn crash_exits_end_the_vm() {
        let mut ctx = context();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &mut ctx),
            ExitOutcome::Shutdown
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &mut ctx),
            ExitOutcome::InternalError
        );
        assert_eq!(
            handle_exit(VcpuExit::Hlt, &mut ctx),
            ExitOutcome::Stop(StopKind::Hlt)
        );
        assert!(StopKind::Pio.needs_completion());
        assert!(!StopKind::Hlt.needs_completion());
    }
}
