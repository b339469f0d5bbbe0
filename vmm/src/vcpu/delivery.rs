//! Exceptions in the way of positions (GUEST-NOTES "Counting guest
//! instructions"). Two states of a fault need care:
//!
//! - A kick can stop the guest between a fault and its delivery: the
//!   faulting instruction is counted, RIP is still on it and the exception
//!   is pending. A replay cannot stop there (single-step skips it), so a
//!   recorder advances such a kick stop to the handler's entry with a
//!   breakpoint there (delivery counts no instruction: the count is the
//!   stop's). A replay that reaches the recorded count before the delivery
//!   (its own kick landed there) delivers it the same way.
//! - A single step over an instruction that faults (or with an event on its
//!   way in) pushes the step's TF into the exception frame, and the guest's
//!   return from its handler would then take a #DB of ours. The replay
//!   clears that TF in the frame, which is then the frame the recording
//!   pushed.

use kvm_bindings::kvm_sregs;
use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP};

use super::*;
use crate::position::{exception_in_flight, user64};

const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS bit 1: always set.
const RFLAGS_ALWAYS: u64 = 1 << 1;
/// The longest x86 instruction: a trap's frame holds the next RIP.
const MAX_INSN_BYTES: u64 = 15;
const CR0_PE: u64 = 1;
const EFER_LMA: u64 = 1 << 10;
/// How far above RSP a frame with a leaked TF is looked for (the
/// handler's first instruction has run, and may have pushed).
const FRAME_SEARCH_BYTES: u64 = 256;
/// The longest the guest runs toward a handler's entry: a delivery that
/// faults again goes to another handler, where no breakpoint waits.
const DELIVERY_LIMIT: Duration = Duration::from_millis(1);

impl Vcpu {
    /// Recording, at a kick that stopped the guest between a fault and its
    /// delivery: arms a breakpoint at the handler's entry (and a 1 ms
    /// backstop) for one more entry. Some(entry): armed, the caller
    /// re-enters and calls [`Vcpu::end_delivery`] after it.
    pub(super) fn arm_advance_to_handler(&mut self) -> Result<Option<u64>, VcpuError> {
        if !self.journal.recording() || !self.has_position_counter() {
            return Ok(None);
        }
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        if !exception_in_flight(&events) {
            return Ok(None);
        }
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        if user64(&sregs) {
            return Ok(None);
        }
        let Some(entry) = self.handler_entry(&sregs, events.exception.nr) else {
            debug!(
                vector = events.exception.nr,
                "no handler entry to advance a kick to"
            );
            return Ok(None);
        };
        self.arm_delivery(entry)?;
        Ok(Some(entry))
    }

    /// Replaying, at the recorded count with RIP elsewhere: if an exception
    /// is on its way in (this replay's own kick came between the fault and
    /// its delivery), arms the breakpoint at the recorded RIP (the
    /// handler's entry) for one more entry. True: armed.
    pub(super) fn arm_delivery_to(&mut self, rip: u64) -> Result<bool, VcpuError> {
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        if !exception_in_flight(&events) {
            return Ok(false);
        }
        self.arm_delivery(rip)?;
        Ok(true)
    }

    fn arm_delivery(&mut self, entry: u64) -> Result<(), VcpuError> {
        self.set_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, entry)?;
        if let Err(e) = self.arm_landing_timer(DELIVERY_LIMIT) {
            let _ = self.set_debug(0, 0);
            return Err(e);
        }
        // The kick that stopped the guest is answered by the stop that
        // follows this entry.
        self.fd.set_kvm_immediate_exit(0);
        Ok(())
    }

    /// After an entry armed by [`Vcpu::arm_advance_to_handler`]: the
    /// backstop and the breakpoint cleared.
    pub(super) fn end_delivery(&mut self) -> Result<(), VcpuError> {
        self.disarm_landing_timer();
        self.set_debug(0, 0)
    }

    /// The linear address of the IDT handler of `vector`: 64-bit and 32-bit
    /// protected-mode interrupt and trap gates, whose code segment is
    /// assumed flat (as landing's breakpoint on a RIP assumes). None: real
    /// mode, a task or 16-bit gate, a gate not present or not mapped.
    fn handler_entry(&self, sregs: &kvm_sregs, vector: u8) -> Option<u64> {
        if sregs.cr0 & CR0_PE == 0 {
            return None;
        }
        let long = sregs.efer & EFER_LMA != 0;
        let size: u64 = if long { 16 } else { 8 };
        let at = u64::from(vector) * size;
        if at + size - 1 > u64::from(sregs.idt.limit) {
            return None;
        }
        let mut gate = [0u8; 16];
        let mask = if long { u64::MAX } else { u64::from(u32::MAX) };
        let gate_at = sregs.idt.base.wrapping_add(at) & mask;
        self.read_linear(gate_at, &mut gate[..size as usize])?;
        let low = u64::from_le_bytes(gate[..8].try_into().ok()?);
        let present = (low >> 47) & 1 == 1;
        let kind = (low >> 40) & 0xf;
        let entry = (low & 0xffff) | ((low >> 48) << 16);
        let high = u64::from(u32::from_le_bytes(gate[8..12].try_into().ok()?));
        match (present, kind) {
            (true, 0xe | 0xf) if long => Some(entry | (high << 32)),
            (true, 0xe | 0xf) => Some(entry),
            _ => None,
        }
    }

    /// Whether an exception, interrupt or NMI is on its way in: a single
    /// step now delivers it and pushes its TF.
    pub(super) fn event_in_flight(&self) -> Result<bool, VcpuError> {
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(exception_in_flight(&events)
            || events.interrupt.injected != 0
            || events.nmi.injected != 0)
    }

    /// Replaying, after a single step from `from_rip`: if the step
    /// delivered an event (one was on its way in, or the stepped
    /// instruction counted `ran` >= 2: it faulted, or trapped as INT n
    /// does, whose frame holds the next RIP), clears the TF the step leaked
    /// into the frame the delivery pushed: a RIP at most an instruction
    /// past `from_rip`, a code selector, and RFLAGS with TF (a TF the
    /// guest set itself during a landing is not told apart). False: an
    /// event was on its way in and no such frame was found (the guest
    /// would take a #DB the recording did not: a divergence). A step that
    /// counted 2 with no frame (STI's shadow runs the next instruction
    /// too) is not one.
    pub(super) fn clear_leaked_tf(
        &mut self,
        from_rip: u64,
        in_flight: bool,
        ran: u64,
    ) -> Result<bool, VcpuError> {
        if !in_flight && ran < 2 {
            return Ok(true);
        }
        let now = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        // A delivery does not change the mode: the frame's word size is
        // the current one's.
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let long = sregs.efer & EFER_LMA != 0;
        let word: u64 = if long { 8 } else { 4 };
        let mask = if long { u64::MAX } else { u64::from(u32::MAX) };
        let from = from_rip & mask;
        let mut frame = [0u8; 24];
        let frame = &mut frame[..3 * word as usize];
        for offset in (0..FRAME_SEARCH_BYTES).step_by(word as usize) {
            let at = now.rsp.wrapping_add(offset) & mask;
            if self.read_linear(at, frame).is_none() {
                break;
            }
            let read = |i: usize| {
                let mut w = [0u8; 8];
                w[..word as usize].copy_from_slice(&frame[i * word as usize..][..word as usize]);
                u64::from_le_bytes(w)
            };
            let (rip, cs, flags) = (read(0), read(1), read(2));
            let pushed_rip = rip.wrapping_sub(from) <= MAX_INSN_BYTES;
            let selector = cs & 0xfffc != 0 && cs >> 16 == 0;
            // Bit 1 of RFLAGS is always set; no flag lies above bit 21.
            let rflags = flags & RFLAGS_ALWAYS != 0 && flags >> 22 == 0;
            if pushed_rip && selector && rflags && flags & RFLAGS_TF != 0 {
                let fixed = (flags & !RFLAGS_TF).to_le_bytes();
                let flags_at = at.wrapping_add(2 * word) & mask;
                if !self.write_linear(flags_at, &fixed[..word as usize]) {
                    return Ok(!in_flight);
                }
                debug!(
                    frame = at,
                    "cleared the single step's TF from an exception frame"
                );
                return Ok(true);
            }
        }
        debug!(
            rip = from_rip,
            in_flight, ran, "a single step: no exception frame with its TF found"
        );
        Ok(!in_flight)
    }

    /// Reads guest memory at a linear address (through the guest's page
    /// tables). None: a page is not mapped.
    fn read_linear(&self, at: u64, buf: &mut [u8]) -> Option<()> {
        let mut done = 0;
        while done < buf.len() {
            let (gpa, n) = self.linear_piece(at.wrapping_add(done as u64), buf.len() - done)?;
            self.sync
                .memory
                .read_slice(&mut buf[done..done + n], GuestAddress(gpa))
                .ok()?;
            done += n;
        }
        Some(())
    }

    /// Writes guest memory at a linear address. False: a page is not
    /// mapped (or not guest memory).
    fn write_linear(&self, at: u64, bytes: &[u8]) -> bool {
        let mut done = 0;
        while done < bytes.len() {
            let Some((gpa, n)) =
                self.linear_piece(at.wrapping_add(done as u64), bytes.len() - done)
            else {
                return false;
            };
            if self
                .sync
                .memory
                .write_slice(&bytes[done..done + n], GuestAddress(gpa))
                .is_err()
            {
                return false;
            }
            done += n;
        }
        true
    }

    /// The guest-physical address of `at` and how many of `len` bytes from
    /// there lie in its page.
    fn linear_piece(&self, at: u64, len: usize) -> Option<(u64, usize)> {
        let t = self.fd.translate_gva(at).ok()?;
        if t.valid == 0 {
            return None;
        }
        let in_page = (PAGE_SIZE as u64 - (at % PAGE_SIZE as u64)) as usize;
        Some((t.physical_address, len.min(in_page)))
    }
}
