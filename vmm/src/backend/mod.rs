//! The live world behind the `Inputs`/`Outputs` ports: the console writer,
//! block I/O workers and tap devices.
//!
//! Worker threads here only touch host resources and host buffers. What they
//! produce for the guest goes into the [`CauseQueue`](tandem_replay::CauseQueue)
//! and reaches guest memory only when the vCPU thread applies it at a stop.

pub mod announce;
pub mod block;
pub mod console;
pub mod gate;
pub mod outputs;
pub mod replica;
pub mod sector;
pub mod tap;

pub use outputs::LiveOutputs;
