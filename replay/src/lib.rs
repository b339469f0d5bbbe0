//! tandem-replay: the plain data that crosses the determinism boundary.
//!
//! It holds guest time ([`clock`]), the [`port`]s through which everything
//! crosses the VM boundary, and the record/replay [`log`] format. The
//! `Record`/`Replay` inputs and state hashing land here in the record/replay
//! issue. Nothing in this crate knows about KVM.
#![warn(missing_docs)]

pub mod clock;
pub mod log;
pub mod port;

pub use clock::{Clock, GuestClock};
// `log::Record` stays in its module: `Record` at the root is kept for the
// recording `Inputs` of the record/replay issue.
pub use log::{LogError, LogFile, LogReader, LogWriter, VmIdentity};
pub use port::{BlockOp, Cause, CauseQueue, Inputs, LiveInputs, Output, Outputs};
