//! tandem-replay: the plain data that crosses the determinism boundary.
//!
//! For now this holds the guest clock port. The log format, the `Inputs` /
//! `Outputs` ports (live, record, replay) and state hashing land here in the
//! record/replay issue. Nothing in this crate knows about KVM.
#![warn(missing_docs)]

pub mod clock;

pub use clock::{Clock, GuestClock};
