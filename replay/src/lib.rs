//! tandem-replay: the plain data that crosses the determinism boundary.
//!
//! It holds guest time ([`clock`]) and the [`port`]s through which
//! everything crosses the VM boundary. The log format, `Record`/`Replay`
//! inputs and state hashing land here in the record/replay issue. Nothing in this crate knows about KVM.
#![warn(missing_docs)]

pub mod clock;
pub mod port;

pub use clock::{Clock, GuestClock};
pub use port::{BlockOp, Cause, CauseQueue, Inputs, LiveInputs, Output, Outputs};
