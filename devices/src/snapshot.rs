//! Device state as named components: what is captured, hashed and installed.
//!
//! A VM's device state is a list of components, each a name (`pic`,
//! `virtio-blk0`, ...) and the encoded bytes of one model's state. The
//! primary and the secondary hash the bytes of every component and compare
//! the hashes by name, and logs carry the list, so the names, their order and
//! the bytes are part of the log format.
//!
//! * [`Stateful`] is what a device model implements: its state as a plain
//!   serde value, and how to take one back.
//! * [`StateCodec`] turns such values into bytes and back; the VMM supplies
//!   the log's encoding (bincode), so this crate stays free of it.
//! * [`ComponentState`] is the object-safe face of a lockable model, so one
//!   list of [`Component`]s can mix every kind of device.

use std::borrow::Cow;
use std::fmt;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::debug_exit::{DebugExit, DebugExitState};
use crate::i8042::{I8042State, I8042};
use crate::lock;
use crate::pic::{Pic, PicState};
use crate::pit::{Pit, PitState};
use crate::rtc::{Rtc, RtcState};
use crate::scratch::{Scratch, ScratchState};
use crate::serial::{Serial, SerialDeviceState};
use crate::virtio::mmio::{MmioState, MmioTransport};
use crate::watchdog::{Watchdog, WatchdogState};

/// Why one component's state could not be saved or restored.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// The state did not encode.
    #[error("state does not encode: {0}")]
    Encode(String),
    /// The saved bytes do not decode as this component's state.
    #[error("saved bytes do not decode: {0}")]
    Decode(String),
    /// The bytes decode, but the model refuses the state.
    #[error("state refused: {0}")]
    Refused(String),
}

/// A device model whose whole state is a plain serde value.
pub trait Stateful {
    /// The saved state.
    type State: Serialize + DeserializeOwned;

    /// A copy of the current state.
    fn save_state(&self) -> Self::State;

    /// Replaces the state; the reason, if the model cannot take it.
    fn restore_state(&mut self, state: Self::State) -> Result<(), String>;
}

/// How component state becomes bytes and back.
pub trait StateCodec {
    /// Encodes `value`.
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String>;

    /// Decodes bytes made by [`encode`](Self::encode).
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// One component's state as bytes in codec `C`. Restoring takes `&self`:
/// a component is a lockable model shared with the buses.
pub trait ComponentState<C: StateCodec> {
    /// The encoded state.
    fn save(&self) -> Result<Vec<u8>, SnapshotError>;

    /// Decodes `bytes` and installs the state.
    fn restore(&self, bytes: &[u8]) -> Result<(), SnapshotError>;
}

impl<C: StateCodec, T: Stateful> ComponentState<C> for Mutex<T> {
    fn save(&self) -> Result<Vec<u8>, SnapshotError> {
        let state = lock(self).save_state();
        C::encode(&state).map_err(SnapshotError::Encode)
    }

    fn restore(&self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let state = C::decode(bytes).map_err(SnapshotError::Decode)?;
        lock(self)
            .restore_state(state)
            .map_err(SnapshotError::Refused)
    }
}

/// A named component: one entry of a VM's device state.
pub struct Component<'a, C> {
    name: Cow<'static, str>,
    state: &'a dyn ComponentState<C>,
}

impl<'a, C: StateCodec> Component<'a, C> {
    /// Component `name` with state `state`.
    pub fn new(name: impl Into<Cow<'static, str>>, state: &'a dyn ComponentState<C>) -> Self {
        Self {
            name: name.into(),
            state,
        }
    }

    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The encoded state.
    pub fn save(&self) -> Result<Vec<u8>, SnapshotError> {
        self.state.save()
    }

    /// Decodes `bytes` and installs the state.
    pub fn restore(&self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.state.restore(bytes)
    }
}

impl<C> fmt::Debug for Component<'_, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Component").field(&self.name).finish()
    }
}

/// A model whose inherent `state`/`set_state` already have the shape.
macro_rules! stateful {
    ($model:ty, $state:ty) => {
        impl Stateful for $model {
            type State = $state;
            fn save_state(&self) -> $state {
                self.state()
            }
            fn restore_state(&mut self, state: $state) -> Result<(), String> {
                self.set_state(state);
                Ok(())
            }
        }
    };
    ($model:ty, $state:ty, fallible) => {
        impl Stateful for $model {
            type State = $state;
            fn save_state(&self) -> $state {
                self.state()
            }
            fn restore_state(&mut self, state: $state) -> Result<(), String> {
                self.set_state(state).map_err(|e| e.to_string())
            }
        }
    };
}

stateful!(Pic, PicState);
stateful!(Pit, PitState);
stateful!(Rtc, RtcState);
stateful!(Serial, SerialDeviceState, fallible);
stateful!(I8042, I8042State);
stateful!(DebugExit, DebugExitState);
stateful!(Scratch, ScratchState);
stateful!(Watchdog, WatchdogState);
stateful!(MmioTransport, MmioState, fallible);

#[cfg(test)]
mod tests {
    use super::*;

    /// A codec for one-byte states that cannot encode: enough to see each
    /// failure reach the caller as the right [`SnapshotError`].
    struct OneByte;

    impl StateCodec for OneByte {
        fn encode<T: Serialize>(_value: &T) -> Result<Vec<u8>, String> {
            Err("no encoder".into())
        }
        fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
            let [byte] = bytes else {
                return Err(format!("{} bytes, want 1", bytes.len()));
            };
            let de = serde::de::value::U8Deserializer::<serde::de::value::Error>::new(*byte);
            T::deserialize(de).map_err(|e| e.to_string())
        }
    }

    /// Takes levels up to 5.
    struct Level(u8);

    impl Stateful for Level {
        type State = u8;
        fn save_state(&self) -> u8 {
            self.0
        }
        fn restore_state(&mut self, state: u8) -> Result<(), String> {
            if state > 5 {
                return Err(format!("level {state} is above 5"));
            }
            self.0 = state;
            Ok(())
        }
    }

    #[test]
    fn failures_reach_the_caller() {
        let level = Mutex::new(Level(1));
        let c = Component::<OneByte>::new("level", &level);
        assert_eq!(c.name(), "level");
        assert_eq!(format!("{c:?}"), "Component(\"level\")");
        assert_eq!(c.restore(&[3]), Ok(()));
        assert_eq!(lock(&level).0, 3);
        assert_eq!(
            c.restore(&[9]),
            Err(SnapshotError::Refused("level 9 is above 5".into()))
        );
        assert!(matches!(c.restore(&[]), Err(SnapshotError::Decode(_))));
        assert_eq!(lock(&level).0, 3, "a failed restore changes nothing");
        assert_eq!(c.save(), Err(SnapshotError::Encode("no encoder".into())));
        let indexed = format!("level{}", 2);
        assert_eq!(Component::<OneByte>::new(indexed, &level).name(), "level2");
    }
}
