//! A minimal i8042 keyboard controller (ports 0x60–0x64).
//!
//! tandem guests have no keyboard; this model exists so that probing the
//! controller is harmless and so that the classic "pulse the reset line"
//! command (0xFE to the command port) reboots the machine, which tandem turns
//! into a clean stop ([`VmRequest::Reset`]). The data port reads 0 and the
//! status port reads 0 (output buffer empty, input buffer empty), so drivers
//! see a controller that never has data. Other commands are recorded in the
//! state (for hashing and debugging) and otherwise ignored; offsets 1–3 are
//! not part of the controller and read 0xff.

use serde::{Deserialize, Serialize};

use crate::{fill_ones, BusDevice, VmRequest};

/// Offset of the data port (0x60).
pub const OFFSET_DATA: u64 = 0;
/// Offset of the status/command port (0x64).
pub const OFFSET_COMMAND: u64 = 4;
/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;
/// Status register value: no output data, input buffer empty.
const STATUS_IDLE: u8 = 0x00;

/// The state of the i8042.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The last byte written to the command port.
    pub last_command: Option<u8>,
    /// The last byte written to the data port.
    pub last_data: Option<u8>,
}

/// The i8042 controller.
#[derive(Debug, Default)]
pub struct I8042 {
    state: I8042State,
}

impl I8042 {
    /// A controller after reset.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the device state.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    /// Replaces the device state.
    pub fn set_state(&mut self, state: I8042State) {
        self.state = state;
    }
}

impl BusDevice for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        fill_ones(data);
        match (offset, data.first_mut()) {
            (OFFSET_DATA, Some(b)) => *b = 0,
            (OFFSET_COMMAND, Some(b)) => *b = STATUS_IDLE,
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let &val = data.first()?;
        match offset {
            OFFSET_DATA => self.state.last_data = Some(val),
            OFFSET_COMMAND => {
                self.state.last_command = Some(val);
                if val == CMD_RESET_CPU {
                    return Some(VmRequest::Reset);
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(dev: &mut I8042, off: u64) -> u8 {
        let mut b = [0x55u8];
        dev.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reads() {
        let mut dev = I8042::new();
        assert_eq!(rd(&mut dev, 0), 0);
        assert_eq!(rd(&mut dev, 4), 0);
        for off in 1..=3 {
            assert_eq!(rd(&mut dev, off), 0xff);
        }
        assert_eq!(rd(&mut dev, 5), 0xff);
        let mut empty = [];
        dev.read(0, &mut empty);
    }

    #[test]
    fn reset_command() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(4, &[0xfe]), Some(VmRequest::Reset));
        assert_eq!(dev.write(0, &[0xfe]), None);
        assert_eq!(dev.write(2, &[0xfe]), None);
        assert_eq!(dev.write(4, &[]), None);
    }

    #[test]
    fn other_commands_ignored_and_state() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(4, &[0xaa]), None);
        assert_eq!(dev.write(0, &[0xf4]), None);
        assert_eq!(rd(&mut dev, 4), 0);
        let st = dev.state();
        assert_eq!(st.last_command, Some(0xaa));
        assert_eq!(st.last_data, Some(0xf4));
        let mut other = I8042::new();
        other.set_state(st.clone());
        assert_eq!(other.state(), st);
    }
}
