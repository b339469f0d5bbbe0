//! The PIO and MMIO buses: ordered maps of address ranges to devices.
//!
//! As in Firecracker's `vstate/bus.rs`, a range is refused if it is empty,
//! overflows or overlaps another; lookup takes the last range starting at or
//! below the address and then checks its end, so an access that straddles the
//! end of a range is not sent to the device.

use std::collections::BTreeMap;

use tandem_devices::{lock, SharedDevice, VmRequest};

/// Why a range could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range has length zero.
    #[error("bus range at {base:#x} has length zero")]
    ZeroLength {
        /// Start of the range.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("bus range at {base:#x} with length {len:#x} overflows")]
    Overflow {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps {other} at {other_base:#x}")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Its length.
        len: u64,
        /// The device already there.
        other: &'static str,
        /// Where that device starts.
        other_base: u64,
    },
}

struct BusRange {
    len: u64,
    name: &'static str,
    device: SharedDevice,
}

/// A bus of devices keyed by address range.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

/// What a bus access found.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// A device handled it; a write may carry a request for the whole VM.
    Handled(Option<VmRequest>),
    /// No device covers the whole access.
    Unmapped,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The candidates for overlap: the last range starting below `end`.
        if let Some((&other_base, other)) = self.ranges.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other: other.name,
                    other_base,
                });
            }
        }
        let name = lock(&device).name();
        self.ranges.insert(base, BusRange { len, name, device });
        Ok(())
    }

    /// The device covering `[addr, addr + size)` and the offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&BusRange, u64)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((range, offset))
    }

    /// Name of the device at `addr`, for logs.
    pub fn device_name(&self, addr: u64) -> Option<&'static str> {
        self.resolve(addr, 1).map(|(range, _)| range.name)
    }

    /// A guest read of `data.len()` bytes at `addr`. Unmapped reads are all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Access {
        match self.resolve(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                Access::Handled(None)
            }
            None => {
                data.fill(0xff);
                Access::Unmapped
            }
        }
    }

    /// A guest write of `data` at `addr`. Unmapped writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Access {
        match self.resolve(addr, data.len()) {
            Some((range, offset)) => Access::Handled(lock(&range.device).write(offset, data)),
            None => Access::Unmapped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tandem_devices::BusDevice;

    /// Remembers the last offset and bytes it saw.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            self.last = Some((offset, data.to_vec()));
            (data == [0xee]).then_some(VmRequest::Exit(7))
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let shared: SharedDevice = p.clone();
        (p, shared)
    }

    #[test]
    fn rejects_empty_overflowing_and_overlapping_ranges() {
        let mut bus = Bus::new();
        let (_, d) = probe();
        assert_eq!(
            bus.insert(d.clone(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert!(matches!(
            bus.insert(d.clone(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(d.clone(), 0x10, 0x10).unwrap();
        for (base, len) in [(0x8, 0x9), (0x10, 1), (0x1f, 4), (0x0, 0x100)] {
            assert!(
                matches!(
                    bus.insert(d.clone(), base, len),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x} must overlap"
            );
        }
        bus.insert(d.clone(), 0x20, 1).unwrap();
        bus.insert(d, 0x8, 8).unwrap();
    }

    #[test]
    fn routes_by_offset_and_refuses_straddling_access() {
        let mut bus = Bus::new();
        let (p, d) = probe();
        bus.insert(d, 0x3f8, 8).unwrap();

        let mut data = [0u8; 1];
        assert_eq!(bus.read(0x3fa, &mut data), Access::Handled(None));
        assert_eq!(data, [2]);

        assert_eq!(bus.write(0x3ff, &[5]), Access::Handled(None));
        assert_eq!(p.lock().unwrap().last, Some((7, vec![5])));
        assert_eq!(
            bus.write(0x3f8, &[0xee]),
            Access::Handled(Some(VmRequest::Exit(7)))
        );

        let mut wide = [0u8; 2];
        assert_eq!(bus.read(0x3ff, &mut wide), Access::Unmapped);
        assert_eq!(wide, [0xff, 0xff]);
        assert_eq!(bus.read(0x3f7, &mut data), Access::Unmapped);
        assert_eq!(bus.write(0x400, &[1]), Access::Unmapped);
        assert_eq!(bus.device_name(0x3fc), Some("probe"));
        assert_eq!(bus.device_name(0x400), None);
    }
}
