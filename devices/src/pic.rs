//! The i8259A programmable interrupt controller pair of a PC, plus the ELCR.
//!
//! tandem runs without an in-kernel irqchip, so this model is the only thing
//! that decides which vector the guest takes. Devices drive its sixteen input
//! lines through [`crate::IrqLine`]; the VMM asks [`Pic::has_pending`] at each
//! stop and, when the guest can take an interrupt, runs the INTA cycle with
//! [`Pic::acknowledge`] and injects the vector it returns.
//!
//! The model follows QEMU's `i8259.c`, which follows the datasheet:
//!
//! * Each chip keeps IRR, ISR and IMR plus the current line levels. An
//!   edge-triggered line latches IRR on a rising edge; a line whose ELCR bit is
//!   set is level-triggered and its IRR bit follows the line.
//! * Priority is fixed (0 highest) rotated by `priority_add`, which the rotate
//!   commands of OCW2 change. Special mask mode (OCW3) and the special fully
//!   nested mode (ICW4) are honoured.
//! * The slave's INT output is wired to the master's IRQ2 input, so an
//!   external IRQ2 does not exist (ISA routes it to IRQ9); [`Pic::set_irq`]
//!   ignores it.
//! * When the master asks for IRQ2 but the slave has nothing to give, the
//!   slave answers its spurious IRQ7 vector as hardware does. With no master
//!   request [`Pic::acknowledge`] returns `None`: the VMM runs INTA right
//!   after seeing INTR on the same thread, so that means "inject nothing".
//! * Wide accesses split into byte accesses; other offsets read 0xff.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::{lock, read_bytewise, write_bytewise, BusDevice, VmRequest};

const ICW1_INIT: u8 = 0x10; // bit 4 marks ICW1 on the command port
const ICW1_IC4: u8 = 0x01; // an ICW4 follows
const ICW1_SNGL: u8 = 0x02; // single chip, no ICW3
const ICW4_AEOI: u8 = 0x02; // automatic EOI
const ICW4_SFNM: u8 = 0x10; // special fully nested mode
const OCW3_MASK: u8 = 0x18; // bits 4..3 == 01 mark OCW3
const OCW3_TAG: u8 = 0x08;
const OCW3_POLL: u8 = 0x04; // poll command
const OCW3_RR: u8 = 0x02; // OCW3_RIS is valid
const OCW3_RIS: u8 = 0x01; // read ISR (1) or IRR (0)
const OCW3_ESMM: u8 = 0x40; // OCW3_SMM is valid
const OCW3_SMM: u8 = 0x20; // special mask mode on

// OCW2 commands (bits 7..5); 2 is a no-op.
const OCW2_ROTATE_AEOI_CLEAR: u8 = 0;
const OCW2_EOI: u8 = 1;
const OCW2_SPECIFIC_EOI: u8 = 3;
const OCW2_ROTATE_AEOI_SET: u8 = 4;
const OCW2_ROTATE_EOI: u8 = 5;
const OCW2_SET_PRIORITY: u8 = 6;
const OCW2_ROTATE_SPECIFIC_EOI: u8 = 7;

const CASCADE_IRQ: u8 = 2; // the master input the slave's INT drives
const SPURIOUS_IRQ: u8 = 7; // what a chip answers INTA with when it has nothing
const ELCR_MASK_MASTER: u8 = 0xf8; // IRQ 0, 1, 2 are always edge
const ELCR_MASK_SLAVE: u8 = 0xde; // IRQ 8, 13 are always edge

/// Offset of the command port (ICW1, OCW2, OCW3; reads IRR/ISR).
pub const OFFSET_COMMAND: u64 = 0;
/// Offset of the data port (ICW2–4, OCW1; reads IMR).
pub const OFFSET_DATA: u64 = 1;

/// The state of one i8259A.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipState {
    /// Current level of each input line.
    pub line: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// Priority rotation: the line with the highest priority.
    pub priority_add: u8,
    /// Vector base from ICW2 (low three bits clear).
    pub irq_base: u8,
    /// OCW3 read-register select: true reads ISR, false IRR.
    pub read_isr: bool,
    /// OCW3 poll command armed for the next command-port read.
    pub poll: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// Which ICW the data port expects next (0: none, 2, 3 or 4).
    pub init_state: u8,
    /// ICW4 automatic EOI.
    pub auto_eoi: bool,
    /// OCW2 rotate in automatic EOI mode.
    pub rotate_on_auto_eoi: bool,
    /// ICW4 special fully nested mode.
    pub special_fully_nested: bool,
    /// ICW1 said an ICW4 follows.
    pub init4: bool,
    /// ICW1 single mode (no ICW3).
    pub single: bool,
    /// Edge/level control register (set bit: level-triggered).
    pub elcr: u8,
}

/// The state of the PIC pair.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// The master chip (IRQ 0–7, ports 0x20/0x21, ELCR 0x4d0).
    pub master: PicChipState,
    /// The slave chip (IRQ 8–15, ports 0xa0/0xa1, ELCR 0x4d1).
    pub slave: PicChipState,
}

/// Priority level (0 = highest) of the best bit in `mask`, 8 if none.
fn priority(chip: &PicChipState, mask: u8) -> u8 {
    (0..8u8)
        .find(|&p| mask & (1 << chip.line_at(p)) != 0)
        .unwrap_or(8)
}

impl PicChipState {
    /// The line at priority level `p` (rotation applied).
    fn line_at(&self, p: u8) -> u8 {
        p.wrapping_add(self.priority_add) & 7
    }

    /// The line this chip would raise INT for, if any.
    fn pending_irq(&self, is_master: bool) -> Option<u8> {
        let req = priority(self, self.irr & !self.imr);
        if req == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && is_master {
            in_service &= !(1 << CASCADE_IRQ);
        }
        (req < priority(self, in_service)).then_some(self.line_at(req))
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        let high = if level { bit } else { 0 };
        if self.elcr & bit != 0 {
            self.irr = (self.irr & !bit) | high;
        } else if high & !self.line != 0 {
            self.irr |= bit;
        }
        self.line = (self.line & !bit) | high;
    }

    /// INTA on this chip for `irq`.
    fn intack(&mut self, irq: u8) {
        let bit = 1u8 << (irq & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        // A level-triggered request stays in IRR while its line is high.
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    /// ICW1: reset the chip and start the initialisation sequence.
    fn init(&mut self, icw1: u8) {
        *self = PicChipState {
            line: self.line,
            irr: self.irr & self.elcr & self.line,
            elcr: self.elcr,
            init_state: 2,
            init4: icw1 & ICW1_IC4 != 0,
            single: icw1 & ICW1_SNGL != 0,
            ..PicChipState::default()
        };
    }

    fn write_command(&mut self, val: u8) {
        if val & ICW1_INIT != 0 {
            self.init(val);
        } else if val & OCW3_MASK == OCW3_TAG {
            if val & OCW3_POLL != 0 {
                self.poll = true;
            }
            if val & OCW3_RR != 0 {
                self.read_isr = val & OCW3_RIS != 0;
            }
            if val & OCW3_ESMM != 0 {
                self.special_mask = val & OCW3_SMM != 0;
            }
        } else {
            self.write_ocw2(val);
        }
    }

    fn write_ocw2(&mut self, val: u8) {
        let level = val & 7;
        match val >> 5 {
            OCW2_ROTATE_AEOI_CLEAR => self.rotate_on_auto_eoi = false,
            OCW2_ROTATE_AEOI_SET => self.rotate_on_auto_eoi = true,
            cmd @ (OCW2_EOI | OCW2_ROTATE_EOI) => {
                let p = priority(self, self.isr);
                if p != 8 {
                    let irq = self.line_at(p);
                    self.isr &= !(1 << irq);
                    if cmd == OCW2_ROTATE_EOI {
                        self.priority_add = (irq + 1) & 7;
                    }
                }
            }
            OCW2_SPECIFIC_EOI => self.isr &= !(1 << level),
            OCW2_SET_PRIORITY => self.priority_add = (level + 1) & 7,
            OCW2_ROTATE_SPECIFIC_EOI => {
                self.isr &= !(1 << level);
                self.priority_add = (level + 1) & 7;
            }
            // 2: no operation.
            _ => {}
        }
    }

    fn write_data(&mut self, val: u8) {
        match self.init_state {
            2 => {
                self.irq_base = val & 0xf8;
                self.init_state = match (self.single, self.init4) {
                    (false, _) => 3,
                    (true, true) => 4,
                    (true, false) => 0,
                };
            }
            3 => self.init_state = if self.init4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = val & ICW4_AEOI != 0;
                self.special_fully_nested = val & ICW4_SFNM != 0;
                self.init_state = 0;
            }
            _ => self.imr = val,
        }
    }
}

/// The master/slave i8259A pair with its ELCR.
#[derive(Debug, Default)]
pub struct Pic {
    state: PicState,
}

impl Pic {
    /// A PIC pair after power-on: everything zero, all lines edge-triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drives input line `irq` (0–15) to `level`. Lines above 15 and the
    /// cascade line 2 are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => return,
            0..=7 => self.state.master.set_line(irq, level),
            8..=15 => self.state.slave.set_line(irq - 8, level),
            _ => return,
        }
        self.update();
    }

    /// Withdraws an edge-triggered request on master line `irq` (0–7) that
    /// is latched but not yet acknowledged (a timer tick delayed after a
    /// rollback to a checkpoint comes again later). Level-triggered lines
    /// and the cascade are left alone.
    pub fn withdraw_edge(&mut self, irq: u8) {
        let bit = 1u8 << (irq & 7);
        let chip = &mut self.state.master;
        if irq < 8 && irq != CASCADE_IRQ && chip.elcr & bit == 0 {
            chip.irr &= !bit;
        }
    }

    /// Propagates the slave's INT output to the master's IRQ2 input.
    fn update(&mut self) {
        let slave_int = self.state.slave.pending_irq(false).is_some();
        self.state.master.set_line(CASCADE_IRQ, slave_int);
    }

    /// The INTR output: an unmasked request outranks everything in service.
    pub fn has_pending(&self) -> bool {
        self.state.master.pending_irq(true).is_some()
    }

    /// The INTA cycle: the vector to inject, or `None` when INTR is low.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.state.master.pending_irq(true)?;
        let vector = if irq == CASCADE_IRQ {
            let slave_irq = self.state.slave.pending_irq(false);
            if let Some(i) = slave_irq {
                self.state.slave.intack(i);
            }
            let slave_irq = slave_irq.unwrap_or(SPURIOUS_IRQ);
            self.state.slave.irq_base.wrapping_add(slave_irq)
        } else {
            self.state.master.irq_base.wrapping_add(irq)
        };
        self.state.master.intack(irq);
        self.update();
        Some(vector)
    }

    /// Guest read of one byte at `offset` of `port`.
    fn read_port(&mut self, port: PicPort, offset: u64) -> u8 {
        match (port, offset) {
            (PicPort::Elcr, 0) => self.state.master.elcr,
            (PicPort::Elcr, 1) => self.state.slave.elcr,
            (PicPort::Master | PicPort::Slave, OFFSET_DATA) => {
                self.chip_mut(port == PicPort::Master).imr
            }
            (PicPort::Master | PicPort::Slave, OFFSET_COMMAND) => {
                let is_master = port == PicPort::Master;
                let chip = self.chip_mut(is_master);
                if !chip.poll {
                    return if chip.read_isr { chip.isr } else { chip.irr };
                }
                chip.poll = false;
                let Some(irq) = chip.pending_irq(is_master) else {
                    return 0;
                };
                chip.intack(irq);
                self.update();
                0x80 | irq
            }
            _ => 0xff,
        }
    }

    /// Guest write of one byte at `offset` of `port`.
    fn write_port(&mut self, port: PicPort, offset: u64, val: u8) {
        match (port, offset) {
            (PicPort::Elcr, 0) => self.state.master.elcr = val & ELCR_MASK_MASTER,
            (PicPort::Elcr, 1) => self.state.slave.elcr = val & ELCR_MASK_SLAVE,
            (PicPort::Master | PicPort::Slave, OFFSET_COMMAND) => {
                self.chip_mut(port == PicPort::Master).write_command(val)
            }
            (PicPort::Master | PicPort::Slave, OFFSET_DATA) => {
                self.chip_mut(port == PicPort::Master).write_data(val)
            }
            _ => return,
        }
        self.update();
    }

    fn chip_mut(&mut self, master: bool) -> &mut PicChipState {
        let PicState {
            master: m,
            slave: s,
        } = &mut self.state;
        if master {
            m
        } else {
            s
        }
    }

    /// A copy of the device state.
    pub fn state(&self) -> PicState {
        self.state.clone()
    }

    /// Replaces the device state.
    pub fn set_state(&mut self, state: PicState) {
        self.state = state;
    }

    /// A PIC pair with the given state.
    pub fn from_state(state: PicState) -> Self {
        Self { state }
    }
}

/// Which register block of the PIC pair a [`PicBus`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PicPort {
    /// Master command/data (0x20, size 2).
    Master,
    /// Slave command/data (0xa0, size 2).
    Slave,
    /// ELCR master/slave bytes (0x4d0, size 2).
    Elcr,
}

/// One bus range of the shared PIC pair.
pub struct PicBus {
    pic: Arc<Mutex<Pic>>,
    port: PicPort,
}

impl PicBus {
    /// The `port` block of `pic`.
    pub fn new(pic: Arc<Mutex<Pic>>, port: PicPort) -> Self {
        Self { pic, port }
    }
}

impl BusDevice for PicBus {
    fn name(&self) -> &'static str {
        match self.port {
            PicPort::Master => "pic-master",
            PicPort::Slave => "pic-slave",
            PicPort::Elcr => "pic-elcr",
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut pic = lock(&self.pic);
        read_bytewise(offset, data, |off| pic.read_port(self.port, off));
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let mut pic = lock(&self.pic);
        write_bytewise(offset, data, |off, val| pic.write_port(self.port, off, val));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PIC pair, its master, slave and ELCR ranges.
    struct T(Arc<Mutex<Pic>>, [PicBus; 3]);

    impl T {
        /// The Linux/BIOS initialisation sequence, all lines unmasked.
        fn init() -> Self {
            let pic = Arc::new(Mutex::new(Pic::new()));
            let ports = [PicPort::Master, PicPort::Slave, PicPort::Elcr];
            let mut t = T(pic.clone(), ports.map(|p| PicBus::new(pic.clone(), p)));
            for (icw, base, icw3) in [(0, 0x20, 4), (1, 0x28, 2)] {
                for (off, v) in [(0, 0x11), (1, base), (1, icw3), (1, 0x01), (1, 0x00)] {
                    t.wr(icw, off, v);
                }
            }
            t
        }
        /// Writes `v` at `off` of range 0 (master), 1 (slave) or 2 (ELCR).
        fn wr(&mut self, which: usize, off: u64, v: u8) {
            assert_eq!(self.1[which].write(off, &[v]), None);
        }
        fn rd(&mut self, which: usize, off: u64) -> u8 {
            let mut b = [0u8];
            self.1[which].read(off, &mut b);
            b[0]
        }
        fn set(&self, irq: u8, level: bool) {
            lock(&self.0).set_irq(irq, level);
        }
        fn ack(&self) -> Option<u8> {
            lock(&self.0).acknowledge()
        }
        fn pending(&self) -> bool {
            lock(&self.0).has_pending()
        }
        fn st(&self) -> PicState {
            lock(&self.0).state()
        }
    }

    #[test]
    fn init_sequence_and_edge_ack() {
        let mut t = T::init();
        assert_eq!((t.rd(0, 1), t.rd(0, 0)), (0, 0));
        assert!(!t.pending());
        assert_eq!(t.ack(), None);
        t.set(0, true);
        t.set(0, false);
        assert!(t.pending());
        assert_eq!(t.ack(), Some(0x20));
        // In service now, request gone: nothing more until a new edge.
        assert!(!t.pending());
        assert_eq!(t.st().master.isr, 1);
        t.wr(0, 0, 0x20);
        // A line held high does not re-trigger without a new edge.
        t.set(3, true);
        assert_eq!(t.ack(), Some(0x23));
        t.set(3, true);
        assert!(!t.pending());
    }

    #[test]
    fn masking_priority_eoi_and_nesting() {
        let mut t = T::init();
        t.wr(0, 1, 0x02); // mask IRQ1
        t.set(1, true);
        assert!(!t.pending());
        t.set(4, true);
        t.set(3, true);
        assert_eq!(t.rd(0, 1), 0x02);
        assert_eq!(t.ack(), Some(0x23));
        // IRQ4 is lower priority than IRQ3 in service.
        assert!(!t.pending());
        t.wr(0, 0, 0x20); // non-specific EOI
        t.wr(0, 1, 0x00); // unmask IRQ1
        assert_eq!(t.ack(), Some(0x21));
        assert_eq!(t.st().master.isr, 0x02);
        // EOI, specific EOI, nesting.
        let mut t = T::init();
        t.set(5, true);
        assert_eq!(t.ack(), Some(0x25));
        // A higher-priority request nests.
        t.set(1, true);
        assert!(t.pending());
        assert_eq!(t.ack(), Some(0x21));
        assert_eq!(t.st().master.isr, 0x22);
        t.wr(0, 0, 0x65); // specific EOI for IRQ5
        assert_eq!(t.st().master.isr, 0x02);
        t.wr(0, 0, 0x20);
        assert_eq!(t.st().master.isr, 0);
    }

    #[test]
    fn cascade_from_slave() {
        let mut t = T::init();
        t.set(12, true);
        t.set(12, false);
        assert!(t.pending());
        assert_eq!(t.ack(), Some(0x2c));
        assert_eq!((t.st().slave.isr, t.st().master.isr), (1 << 4, 1 << 2));
        // IRQ8 outranks 12 on the slave, but the master's IRQ2 is in
        // service: blocked until the master EOI.
        t.set(8, true);
        assert!(!t.pending());
        t.wr(1, 0, 0x20);
        t.wr(0, 0, 0x20);
        assert_eq!(t.ack(), Some(0x28));
        // External IRQ2 and lines above 15 do not exist.
        t.set(2, true);
        t.set(16, true);
        assert_eq!(t.st().master.irr, 0);
    }

    #[test]
    fn level_triggered_via_elcr() {
        let mut t = T::init();
        t.wr(2, 0, 0xff); // IRQ 0-2 cannot be level
        t.wr(2, 1, 0xff); // IRQ 8 and 13 cannot be level
        assert_eq!((t.rd(2, 0), t.rd(2, 1)), (0xf8, 0xde));
        t.set(10, true);
        assert_eq!(t.ack(), Some(0x2a));
        // EOI while the line is still high: it asserts again.
        t.wr(0, 0, 0x20);
        assert_eq!(t.st().slave.irr, 1 << 2);
        t.wr(1, 0, 0x20);
        assert!(t.pending());
        assert_eq!(t.ack(), Some(0x2a));
        // The line drops: the request goes away.
        t.set(10, false);
        assert_eq!(t.st().slave.irr, 0);
        t.wr(1, 0, 0x20);
        t.wr(0, 0, 0x20);
        assert!(!t.pending());
        // Master level line 5 stays requested through INTA.
        t.set(5, true);
        assert_eq!(t.ack(), Some(0x25));
        assert_eq!(t.st().master.irr, 1 << 5);
    }

    #[test]
    fn irr_isr_reads_and_poll() {
        let mut t = T::init();
        t.wr(0, 1, 0xff); // mask all: IRR still latches
        t.set(6, true);
        assert_eq!(t.rd(0, 0), 0x40); // IRR by default
        t.wr(0, 0, 0x0b); // OCW3 read ISR
        assert_eq!(t.rd(0, 0), 0);
        t.wr(0, 1, 0x00);
        assert_eq!(t.ack(), Some(0x26));
        assert_eq!(t.rd(0, 0), 0x40);
        t.wr(0, 0, 0x0a); // back to IRR
        assert_eq!(t.rd(0, 0), 0);
        t.wr(0, 0, 0x20);
        // Poll mode: the read acknowledges.
        t.set(7, true);
        t.wr(0, 0, 0x0c);
        assert_eq!(t.rd(0, 0), 0x87);
        assert!(!t.pending());
        t.wr(0, 0, 0x0c);
        assert_eq!(t.rd(0, 0), 0);
        // Unimplemented offsets read 0xff; a wide read splits.
        let mut b = [0u8; 4];
        t.1[0].read(0, &mut b);
        assert_eq!(b[1..], [0, 0xff, 0xff]);
    }

    #[test]
    fn spurious_aeoi_rotation_special_mask_and_state() {
        let mut t = T::init();
        t.set(11, true);
        // Mask the slave line after the master latched IRQ2: the slave has
        // nothing to give and answers IRQ15's vector.
        t.wr(1, 1, 0x08);
        assert!(t.pending());
        assert_eq!(t.ack(), Some(0x2f));
        assert_eq!(t.st().slave.isr, 0);
        t.wr(0, 0, 0x20);
        // AEOI: nothing stays in service.
        for (off, v) in [(0, 0x11), (1, 0x20), (1, 0x04), (1, 0x03)] {
            t.wr(0, off, v);
        }
        t.set(4, true);
        assert_eq!(t.ack(), Some(0x24));
        assert_eq!(t.st().master.isr, 0);
        let st = t.st();
        assert_eq!(Pic::from_state(st.clone()).state(), st);
        // Rotation and special mask mode.
        let mut t = T::init();
        t.wr(0, 0, 0xc4); // set priority: IRQ4 lowest, 5 highest
        t.set(1, true);
        t.set(6, true);
        assert_eq!(t.ack(), Some(0x26));
        t.wr(0, 0, 0xa0); // rotate on non-specific EOI: 6 lowest now
        assert_eq!(t.st().master.priority_add, 7);
        assert_eq!(t.ack(), Some(0x21));
        // Special mask: masking the in-service line lets lower ones through.
        t.set(3, true);
        assert!(!t.pending());
        t.wr(0, 1, 0x02);
        t.wr(0, 0, 0x68);
        assert!(t.pending());
        assert_eq!(t.ack(), Some(0x23));
    }
}
