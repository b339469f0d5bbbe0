//! COM1: a 16550A-style UART (ports 0x3f8–0x3ff) built on `vm_superio::Serial`.
//!
//! vm-superio does the register work; this wrapper adds what tandem needs:
//!
//! * its [`vm_superio::Trigger`] pulses an [`IrqLine`] (IRQ4, edge-triggered
//!   as on ISA) instead of writing an eventfd, so the interrupt reaches the
//!   userspace PIC on the vCPU thread;
//! * input is offered with [`Serial::enqueue_input`], which takes only what
//!   fits in the 64-byte RX FIFO now; the VMM keeps the rest and offers it
//!   again at a later stop, so nothing is lost and both sides of a pair see
//!   the same bytes at the same stops;
//! * the output sink is flushed after every byte (vm-superio does this) so
//!   console output appears promptly; sink errors are logged (the first one,
//!   then every 4096th) and never fail the guest, which sees the byte sent;
//! * the state is a serde struct of its own ([`SerialDeviceState`]);
//!   restoring it does not pulse the IRQ line, since the PIC state restored
//!   beside it already holds whatever that pulse latched.

use std::cell::Cell;
use std::convert::Infallible;
use std::io::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Trigger;

use crate::{BusDevice, IrqLine, VmRequest};

/// Number of registers (ports) of the UART.
pub const SERIAL_PORTS: u64 = 8;
/// Receive FIFO size of the 16550A.
pub const RX_FIFO_SIZE: usize = 64;
/// Modem control register: loopback bit.
const MCR_LOOP: u8 = 0x10;
/// Log one sink error in this many.
const ERROR_LOG_EVERY: u64 = 4096;

/// A [`Trigger`] that pulses an IRQ line of the PIC.
pub struct IrqTrigger {
    line: IrqLine,
    muted: Cell<bool>,
}

impl IrqTrigger {
    /// Pulses `line` on each trigger.
    pub fn new(line: IrqLine) -> Self {
        Self {
            line,
            muted: Cell::new(false),
        }
    }
}

impl Trigger for IrqTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        if !self.muted.get() {
            self.line.pulse();
        }
        Ok(())
    }
}

type Inner = vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// Errors restoring the UART state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SerialError {
    /// The saved RX FIFO holds more than the hardware can.
    #[error("saved RX FIFO holds {0} bytes, at most {RX_FIFO_SIZE} fit")]
    FifoTooLarge(usize),
}

/// The UART registers and RX FIFO (vm-superio's `SerialState`, serialisable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the RX FIFO, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<SerialDeviceState> for SerialState {
    fn from(s: SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// COM1.
pub struct Serial {
    inner: Inner,
    irq: IrqLine,
    write_errors: u64,
}

impl Serial {
    /// A UART after reset that raises `irq` and writes guest output to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Inner::new(IrqTrigger::new(irq.clone()), out),
            irq,
            write_errors: 0,
        }
    }

    /// Offers `bytes` to the RX FIFO; returns how many it took (maybe 0).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.input_room() == 0 {
            return 0;
        }
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// How many bytes [`Serial::enqueue_input`] would take now.
    pub fn input_room(&self) -> usize {
        if self.inner.state().modem_control & MCR_LOOP != 0 {
            // In loopback the UART's input is its own output.
            return 0;
        }
        self.inner.fifo_capacity()
    }

    /// The number of sink write errors so far (host-side, not guest state).
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }

    /// A copy of the device state.
    pub fn state(&self) -> SerialDeviceState {
        self.inner.state().into()
    }

    /// Replaces the device state; keeps the output sink and raises no IRQ.
    pub fn set_state(&mut self, state: SerialDeviceState) -> Result<(), SerialError> {
        if state.in_buffer.len() > RX_FIFO_SIZE {
            return Err(SerialError::FifoTooLarge(state.in_buffer.len()));
        }
        let placeholder: Box<dyn Write + Send> = Box::new(std::io::sink());
        let old = std::mem::replace(
            &mut self.inner,
            Inner::new(IrqTrigger::new(self.irq.clone()), placeholder),
        );
        let out = old.into_writer();
        let trigger = IrqTrigger::new(self.irq.clone());
        trigger.muted.set(true);
        let state: SerialState = state.into();
        match Inner::from_state(&state, trigger, NoEvents, out) {
            Ok(inner) => {
                inner.interrupt_evt().muted.set(false);
                self.inner = inner;
                Ok(())
            }
            // Only a too-large FIFO fails, and that was checked above; the
            // writer is gone with the error, so keep the placeholder.
            Err(_) => Err(SerialError::FifoTooLarge(state.in_buffer.len())),
        }
    }
}

impl BusDevice for Serial {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = match offset.checked_add(i) {
                Some(off) if off < SERIAL_PORTS => self.inner.read(off as u8),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        for (i, &val) in (0u64..).zip(data.iter()) {
            let Some(off) = offset.checked_add(i).filter(|&o| o < SERIAL_PORTS) else {
                continue;
            };
            if let Err(e) = self.inner.write(off as u8, val) {
                if self.write_errors % ERROR_LOG_EVERY == 0 {
                    tracing::warn!(
                        errors = self.write_errors + 1,
                        "serial output sink failed, byte dropped: {e}"
                    );
                }
                self.write_errors = self.write_errors.wrapping_add(1);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::lock;
    use crate::pic::Pic;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("gone"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn setup() -> (Arc<Mutex<Pic>>, Sink, Serial) {
        let pic = Arc::new(Mutex::new(Pic::new()));
        let sink = Sink::default();
        let serial = Serial::new(IrqLine::new(pic.clone(), 4), Box::new(sink.clone()));
        (pic, sink, serial)
    }

    fn rd(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn thr_reaches_sink() {
        let (_pic, sink, mut s) = setup();
        for &b in b"hi\n" {
            assert_eq!(s.write(THR, &[b]), None);
        }
        assert_eq!(lock(&sink.0).as_slice(), b"hi\n");
        assert_eq!(rd(&mut s, LSR) & 0x20, 0x20);
        // Past the 8 ports: all ones, writes ignored.
        assert_eq!(rd(&mut s, 8), 0xff);
        assert_eq!(s.write(9, b"x"), None);
        assert_eq!(lock(&sink.0).len(), 3);
    }

    #[test]
    fn input_reads_back_with_data_ready() {
        let (pic, _sink, mut s) = setup();
        assert_eq!(rd(&mut s, LSR) & 0x01, 0);
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(s.input_room(), RX_FIFO_SIZE - 2);
        assert_eq!(rd(&mut s, LSR) & 0x01, 0x01);
        assert_eq!(rd(&mut s, THR), b'a');
        assert_eq!(rd(&mut s, THR), b'b');
        assert_eq!(rd(&mut s, LSR) & 0x01, 0);
        // IER was 0: no interrupt.
        assert_eq!(lock(&pic).state().master.irr, 0);
    }

    #[test]
    fn rx_interrupt_reaches_pic() {
        let (pic, _sink, mut s) = setup();
        s.write(IER, &[0x01]);
        assert_eq!(lock(&pic).state().master.irr, 0);
        assert_eq!(s.enqueue_input(b"z"), 1);
        assert_eq!(lock(&pic).state().master.irr, 1 << 4);
        assert_eq!(rd(&mut s, IIR) & 0x0f, 0x04);
        assert_eq!(lock(&pic).acknowledge(), Some(4));
        assert_eq!(rd(&mut s, THR), b'z');
    }

    #[test]
    fn fifo_full_partial_enqueue() {
        let (_pic, _sink, mut s) = setup();
        let input = vec![7u8; 100];
        assert_eq!(s.enqueue_input(&input), RX_FIFO_SIZE);
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(&input), 0);
        assert_eq!(rd(&mut s, THR), 7);
        assert_eq!(s.enqueue_input(&input), 1);
        assert_eq!(s.enqueue_input(&[]), 0);
    }

    #[test]
    fn state_round_trip_keeps_sink_and_raises_nothing() {
        let (pic, sink, mut s) = setup();
        s.write(IER, &[0x01]);
        s.enqueue_input(b"q");
        let st = s.state();
        assert_eq!(st.in_buffer, b"q");
        lock(&pic).set_state(Default::default());
        let (_p2, _sink2, mut t) = setup();
        t.set_state(st.clone()).unwrap();
        s.set_state(st.clone()).unwrap();
        assert_eq!(t.state(), st);
        assert_eq!(lock(&pic).state().master.irr, 0);
        s.write(THR, b"!");
        assert_eq!(lock(&sink.0).as_slice(), b"!");
        let mut big = st;
        big.in_buffer = vec![0; 65];
        assert_eq!(s.set_state(big), Err(SerialError::FifoTooLarge(65)));
    }

    #[test]
    fn sink_errors_do_not_fail_the_guest() {
        let pic = Arc::new(Mutex::new(Pic::new()));
        let mut s = Serial::new(IrqLine::new(pic, 4), Box::new(Broken));
        assert_eq!(s.write(THR, b"x"), None);
        assert_eq!(s.write(THR, b"y"), None);
        assert_eq!(s.write_errors(), 2);
        assert_eq!(rd(&mut s, LSR) & 0x20, 0x20);
    }
}
