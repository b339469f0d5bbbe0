//! tandem-devices: the device models a tandem guest sees.
//!
//! Every device here is plain Rust driven through [`BusDevice`]: it knows
//! nothing of KVM, of host clocks or of file descriptors. The VMM (`vmm/`)
//! owns the bus and calls these models on the vCPU thread at a stop; time
//! comes from a [`tandem_replay::Clock`], interrupts go to the userspace
//! [`pic::Pic`] through an [`IrqLine`]. Each model's state is a plain struct
//! that can be saved, restored and hashed, component by component
//! ([`snapshot`]).
#![warn(missing_docs)]

use std::sync::{Arc, Mutex};

pub mod debug_exit;
pub mod i8042;
pub mod pic;
pub mod pit;
pub mod pvpanic;
pub mod rtc;
pub mod scratch;
pub mod serial;
pub mod snapshot;
pub mod virtio;
pub mod watchdog;

#[cfg(test)]
mod fuzz_tests;

/// Something the guest asked of the whole VM through a device register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// Stop the VM; `tandem run` exits with this status (debug-exit port).
    Exit(u8),
    /// Reset the machine (i8042 command 0xFE); tandem stops the VM cleanly.
    Reset,
    /// The guest reported a panic (pvpanic port): a guest software crash.
    Panic,
}

/// A device on the PIO or MMIO bus.
///
/// `offset` is relative to the base of the range the device was registered
/// at. `data.len()` is the access width (1, 2, 4 or 8). A device that does not
/// implement a register reads as all ones and ignores writes, as hardware
/// does; it never panics on guest input.
pub trait BusDevice: Send {
    /// A short label for logs and metrics.
    fn name(&self) -> &'static str;
    /// Guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write; may ask something of the whole VM.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest>;
}

/// Guest memory as every device and the VMM see it: mmap-backed, with
/// vm-memory's atomic dirty bitmap so the VMM's own writes are tracked.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One input line of the userspace PIC pair, handed to a device that raises it.
#[derive(Clone)]
pub struct IrqLine {
    pic: Arc<Mutex<pic::Pic>>,
    irq: u8,
}

impl IrqLine {
    /// Line `irq` (0–15) of `pic`.
    pub fn new(pic: Arc<Mutex<pic::Pic>>, irq: u8) -> Self {
        Self { pic, irq }
    }

    /// The IRQ number of this line.
    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// Drives the line high or low.
    pub fn set_level(&self, level: bool) {
        lock(&self.pic).set_irq(self.irq, level);
    }

    /// A rising then falling edge (an edge-triggered ISA interrupt).
    pub fn pulse(&self) {
        let mut pic = lock(&self.pic);
        pic.set_irq(self.irq, true);
        pic.set_irq(self.irq, false);
    }
}

/// Locks a device mutex. A poisoned lock means a device panicked earlier on
/// this very thread; the state is still plain data, so carry on with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fills a read buffer with all ones (an unimplemented register).
pub fn fill_ones(data: &mut [u8]) {
    data.fill(0xff);
}

/// Serves a wide read of a byte-wide device as consecutive byte reads, as
/// the ISA bus does: `read_byte(offset)` gives one byte; a byte whose offset
/// would overflow reads 0xff.
pub fn read_bytewise(offset: u64, data: &mut [u8], mut read_byte: impl FnMut(u64) -> u8) {
    for (i, byte) in (0u64..).zip(data.iter_mut()) {
        *byte = offset.checked_add(i).map_or(0xff, &mut read_byte);
    }
}

/// Serves a wide write of a byte-wide device as consecutive byte writes
/// (see [`read_bytewise`]); a byte whose offset would overflow is dropped.
pub fn write_bytewise(offset: u64, data: &[u8], mut write_byte: impl FnMut(u64, u8)) {
    for (i, &byte) in (0u64..).zip(data.iter()) {
        if let Some(off) = offset.checked_add(i) {
            write_byte(off, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_replay::GuestClock;

    /// Every device survives every byte at every offset and width.
    #[test]
    fn no_guest_input_panics() {
        let clock = GuestClock::new();
        let pic = Arc::new(Mutex::new(pic::Pic::new()));
        let line = |irq| IrqLine::new(pic.clone(), irq);
        let mut devices: Vec<Box<dyn BusDevice>> = vec![
            Box::new(pic::PicBus::new(pic.clone(), pic::PicPort::Master)),
            Box::new(pic::PicBus::new(pic.clone(), pic::PicPort::Slave)),
            Box::new(pic::PicBus::new(pic.clone(), pic::PicPort::Elcr)),
            Box::new(pit::Pit::new(Arc::new(clock.clone()), line(0))),
            Box::new(rtc::Rtc::new(Arc::new(clock.clone()), u64::MAX)),
            Box::new(serial::Serial::new(line(4), Box::new(std::io::sink()))),
            Box::new(i8042::I8042::new()),
            Box::new(scratch::Scratch::new()),
            Box::new(debug_exit::DebugExit::new()),
        ];
        let mut ns = 0u64;
        for dev in devices.iter_mut() {
            for offset in (0..10).chain([u64::MAX - 1, u64::MAX]) {
                for val in 0..=255u8 {
                    for width in [1usize, 2, 4, 8] {
                        ns = ns.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        clock.advance_to(ns >> 4);
                        let _ = dev.write(offset, &[val; 8][..width]);
                        let mut buf = [0u8; 8];
                        dev.read(offset, &mut buf[..width]);
                        let mut p = lock(&pic);
                        if p.has_pending() {
                            p.acknowledge();
                        }
                    }
                }
            }
        }
    }
}
