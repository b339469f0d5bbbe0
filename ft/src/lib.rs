//! Fault tolerance: the arbiter, the replication channel and the pair.

pub mod admission;
pub mod arbiter;
pub mod auth;
pub mod channel;
pub mod cmd;
pub mod console;
pub mod events;
pub mod exit;
pub mod fence;
pub mod local_socket;
pub mod mirror;
pub mod node;
pub mod pair;
pub mod seal;
pub mod side;
pub mod silence;
pub mod spare;
pub mod status;
pub mod wire;
