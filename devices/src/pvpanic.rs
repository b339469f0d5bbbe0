//! A paravirtual panic port (I/O port 0x505), after QEMU's ISA pvpanic.
//!
//! A read returns the events the device supports: bit 0 `PANICKED` and
//! bit 1 `CRASH_LOADED`. A write with bit 0 set says the guest panicked
//! ([`VmRequest::Panic`]): a guest software crash, which tandem handles by
//! its `on_guest_crash` policy rather than as a host failure. A write of
//! `CRASH_LOADED` alone (a crash kernel took over) is noted and ignored.
//! Linux's pvpanic driver finds the device through ACPI or PCI, which tandem
//! does not expose: test guests write the port directly. Present from
//! device-model version 3.

use crate::{BusDevice, VmRequest};

/// The port.
pub const PVPANIC_PORT: u64 = 0x505;
/// Event: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event: a crash kernel was loaded.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The panic port (no state of its own).
#[derive(Debug, Default)]
pub struct PvPanic;

impl BusDevice for PvPanic {
    fn name(&self) -> &'static str {
        "pvpanic"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset == 0 && i == 0 {
                PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
            } else {
                0
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let &val = data.first()?;
        (offset == 0 && val & PVPANIC_PANICKED != 0).then_some(VmRequest::Panic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_events_and_a_panic_write_asks_for_crash_handling() {
        let mut dev = PvPanic;
        let mut b = [0u8; 1];
        dev.read(0, &mut b);
        assert_eq!(b[0], 3);
        assert_eq!(dev.write(0, &[PVPANIC_PANICKED]), Some(VmRequest::Panic));
        assert_eq!(dev.write(0, &[PVPANIC_CRASH_LOADED]), None);
        assert_eq!(dev.write(0, &[]), None);
    }
}
