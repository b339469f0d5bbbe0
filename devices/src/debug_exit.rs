//! The debug-exit port (0xf4), after QEMU's `isa-debug-exit`.
//!
//! A test guest ends the VM by writing a byte here. QEMU exits with
//! `(v << 1) | 1`; tandem returns the byte itself as
//! [`VmRequest::Exit`], and `tandem run` exits with that status. For a write
//! wider than a byte the low byte counts. Reads return all ones.

use serde::{Deserialize, Serialize};

use crate::{fill_ones, BusDevice, VmRequest};

/// Offset of the exit register.
pub const OFFSET_EXIT: u64 = 0;

/// The state of the debug-exit port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugExitState {
    /// The last value the guest wrote, if any.
    pub last_value: Option<u8>,
}

/// The debug-exit port.
#[derive(Debug, Default)]
pub struct DebugExit {
    state: DebugExitState,
}

impl DebugExit {
    /// A port nobody has written yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the device state.
    pub fn state(&self) -> DebugExitState {
        self.state.clone()
    }

    /// Replaces the device state.
    pub fn set_state(&mut self, state: DebugExitState) {
        self.state = state;
    }
}

impl BusDevice for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        fill_ones(data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if offset != OFFSET_EXIT {
            return None;
        }
        let &val = data.first()?;
        self.state.last_value = Some(val);
        Some(VmRequest::Exit(val))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_exits_with_the_byte() {
        let mut dev = DebugExit::new();
        assert_eq!(dev.write(0, &[0]), Some(VmRequest::Exit(0)));
        assert_eq!(dev.write(0, &[0x2a]), Some(VmRequest::Exit(0x2a)));
        assert_eq!(dev.state().last_value, Some(0x2a));
    }

    #[test]
    fn wide_write_uses_low_byte() {
        let mut dev = DebugExit::new();
        assert_eq!(dev.write(0, &[0x34, 0x12]), Some(VmRequest::Exit(0x34)));
        assert_eq!(dev.write(0, &[0xff, 1, 2, 3]), Some(VmRequest::Exit(0xff)));
        assert_eq!(dev.write(0, &[]), None);
        assert_eq!(dev.write(1, &[1]), None);
    }

    #[test]
    fn reads_all_ones_and_state() {
        let mut dev = DebugExit::new();
        let mut b = [0u8; 4];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
        let st = DebugExitState {
            last_value: Some(3),
        };
        dev.set_state(st.clone());
        assert_eq!(dev.state(), st);
    }
}
