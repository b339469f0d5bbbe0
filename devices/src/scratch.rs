//! A test scratch register (port 0x600, 4 bytes).
//!
//! The exit-heavy `piostorm` test guest hammers this port: every access is a
//! PIO exit through the dispatcher, so it exercises recording, replay and
//! state hashing at the highest exit rate. The register is a 32-bit latch:
//! a write of any width at offsets 0–3 stores those bytes (little endian), a
//! read returns them; bytes beyond offset 3 read 0xff and are not stored.
//! Every read and write counts in the state, so a divergence in the number
//! of accesses shows up in the device hash.
//!
//! **Device-model version 2** adds a read-only register right after it
//! (port 0x604, 4 bytes): the device-model version, so a guest can tell
//! which behaviour it runs on. In version 1 those ports are unmapped and
//! read 0xff. It is the guest-visible change the rolling-upgrade test puts
//! behind the version gate: a newer tandem following a version-1 primary
//! must leave them unmapped, as the primary did, or the guest sees its
//! machine change under it.

use serde::{Deserialize, Serialize};

use crate::{BusDevice, VmRequest};

/// Size of the register in bytes.
pub const SCRATCH_SIZE: u64 = 4;
/// Ports the device covers from device-model version 2 (the register,
/// then the version register).
pub const SCRATCH_SIZE_V2: u64 = 8;

/// The state of the scratch register.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchState {
    /// The latched value.
    pub value: u32,
    /// Reads plus writes so far (wrapping).
    pub accesses: u64,
}

/// The scratch register.
#[derive(Debug)]
pub struct Scratch {
    state: ScratchState,
    /// The device-model version it behaves as.
    model: u32,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// A register holding 0, never accessed (device-model version 1).
    pub fn new() -> Self {
        Self::with_model(1)
    }

    /// A register as device-model version `model` has it.
    pub fn with_model(model: u32) -> Self {
        Self {
            state: ScratchState::default(),
            model,
        }
    }

    /// Ports it covers on the bus.
    pub fn ports(&self) -> u64 {
        if self.model >= 2 {
            SCRATCH_SIZE_V2
        } else {
            SCRATCH_SIZE
        }
    }

    /// A copy of the device state.
    pub fn state(&self) -> ScratchState {
        self.state.clone()
    }

    /// Replaces the device state.
    pub fn set_state(&mut self, state: ScratchState) {
        self.state = state;
    }
}

/// The byte index inside the register of byte `i` of an access at `offset`.
fn byte_index(offset: u64, i: u64) -> Option<usize> {
    offset
        .checked_add(i)
        .filter(|&o| o < SCRATCH_SIZE)
        .and_then(|o| usize::try_from(o).ok())
}

impl BusDevice for Scratch {
    fn name(&self) -> &'static str {
        "scratch"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.state.accesses = self.state.accesses.wrapping_add(1);
        let bytes = self.state.value.to_le_bytes();
        let version = self.model.to_le_bytes();
        for (i, b) in (0u64..).zip(data.iter_mut()) {
            let at = offset.saturating_add(i);
            *b = match byte_index(offset, i) {
                Some(idx) => bytes.get(idx).copied().unwrap_or(0xff),
                // The version register (version 2 on).
                None if self.model >= 2 && (SCRATCH_SIZE..SCRATCH_SIZE_V2).contains(&at) => {
                    version[(at - SCRATCH_SIZE) as usize]
                }
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        self.state.accesses = self.state.accesses.wrapping_add(1);
        let mut bytes = self.state.value.to_le_bytes();
        for (i, &v) in (0u64..).zip(data.iter()) {
            if let Some(slot) = byte_index(offset, i).and_then(|idx| bytes.get_mut(idx)) {
                *slot = v;
            }
        }
        self.state.value = u32::from_le_bytes(bytes);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_model_2_adds_a_version_register() {
        let mut v1 = Scratch::with_model(1);
        let mut v2 = Scratch::with_model(2);
        assert_eq!((v1.ports(), v2.ports()), (4, 8));
        let mut b = [0u8; 4];
        v2.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
        v2.write(4, &[9, 9, 9, 9]);
        v2.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2, "read-only");
        v1.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn dword_round_trip() {
        let mut dev = Scratch::new();
        assert_eq!(dev.write(0, &0xdead_beef_u32.to_le_bytes()), None);
        let mut b = [0u8; 4];
        dev.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert_eq!(dev.state().accesses, 2);
    }

    #[test]
    fn narrow_and_unaligned_accesses() {
        let mut dev = Scratch::new();
        dev.write(0, &0x1122_3344_u32.to_le_bytes());
        dev.write(2, &[0xaa]);
        assert_eq!(dev.state().value, 0x11aa_3344);
        dev.write(1, &[0x01, 0x02]);
        assert_eq!(dev.state().value, 0x1102_0144);
        let mut w = [0u8; 2];
        dev.read(2, &mut w);
        assert_eq!(w, [0x02, 0x11]);
        // Bytes past the register: read 0xff, not stored.
        dev.write(3, &[0x77, 0x88, 0x99, 0xaa]);
        assert_eq!(dev.state().value, 0x7702_0144);
        let mut d = [0u8; 4];
        dev.read(2, &mut d);
        assert_eq!(d, [0x02, 0x77, 0xff, 0xff]);
        dev.read(u64::MAX, &mut d);
        assert_eq!(d, [0xff; 4]);
        dev.write(u64::MAX, &[1, 2]);
        assert_eq!(dev.state().value, 0x7702_0144);
    }

    #[test]
    fn counts_every_access_and_state() {
        let mut dev = Scratch::new();
        let mut b = [0u8];
        for _ in 0..5 {
            dev.read(0, &mut b);
            dev.write(0, &[1]);
        }
        assert_eq!(dev.state().accesses, 10);
        let st = ScratchState {
            value: 7,
            accesses: u64::MAX,
        };
        dev.set_state(st.clone());
        assert_eq!(dev.state(), st);
        dev.read(0, &mut b);
        assert_eq!(dev.state().accesses, 0);
        assert_eq!(b, [7]);
    }
}
