//! Virtio devices over the virtio-mmio transport (virtio 1.2, split rings).
//!
//! * [`mmio::MmioTransport`] is the [`crate::BusDevice`] the VMM registers
//!   (one 4 KiB window per device); it owns the registers, the status
//!   handshake, the queue configuration before `DRIVER_OK` and the
//!   level-triggered interrupt line.
//! * [`VirtioDevice`] is what a device model implements: features, config
//!   space, activation with the guest's queues, queue notifications.
//! * [`block::Block`] (virtio-blk) and [`net::Net`] (virtio-net) do no host
//!   I/O: requests and frames leave as [`tandem_replay::Output`]s and their
//!   results come back as [`tandem_replay::Cause`]s, which the VMM applies on
//!   the vCPU thread at a stop through [`mmio::MmioTransport::apply_block_done`]
//!   and [`mmio::MmioTransport::apply_net_rx`]. Those raise the interrupt
//!   themselves, so both sides of a pair see the same used rings, interrupt
//!   status and IRQ levels at the same stops.
//!
//! A guest that breaks the device (a descriptor outside guest memory, a
//! chain loop, a zero-length buffer, a malformed request layout, a bad queue
//! configuration) gets what the spec offers for that (virtio 1.2 §2.1.2):
//! the transport sets `DEVICE_NEEDS_RESET`, raises a configuration-change
//! interrupt, logs one rate-limited warning and ignores the queues until the
//! driver resets the device. Nothing a guest writes panics the VMM.
//!
//! Descriptor chains are walked here ([`queue::walk_chain`]) rather than with
//! virtio-queue's iterator, which ends a broken chain silently; virtio-queue's
//! [`Queue`] keeps the ring indices and writes the used ring.

use std::any::Any;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueState};

use crate::GuestMemoryMmap;

pub mod block;
pub mod mmio;
pub mod net;
pub mod queue;

#[cfg(test)]
mod testutil;

/// Feature bit: the device complies with virtio 1.x (virtio 1.2 §6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Log a guest-triggerable warning the first time and then once every this many.
pub const WARN_EVERY: u64 = 1000;

/// Ways a guest can break a device; the transport answers each with
/// `DEVICE_NEEDS_RESET`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// A queue the driver marked ready is not usable (size, alignment, rings outside memory).
    #[error("queue {0} is misconfigured")]
    BadQueue(u16),
    /// The available ring index moved further than the queue size.
    #[error("available ring index is out of range")]
    AvailIndex,
    /// A descriptor index is not below the queue size.
    #[error("descriptor index {0} out of range")]
    DescriptorIndex(u16),
    /// A chain has more descriptors than the queue: it loops.
    #[error("descriptor chain loops")]
    ChainLoop,
    /// An indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered).
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    Indirect,
    /// A descriptor of length zero.
    #[error("zero-length descriptor")]
    ZeroLength,
    /// A buffer or ring that is not entirely in guest memory.
    #[error("buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    OutsideMemory {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The chain's total length overflows or exceeds what the device accepts.
    #[error("descriptor chain too long")]
    Oversize,
    /// The request layout is malformed (e.g. no status byte, readable after writable).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// Errors restoring a saved device or transport state.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The state belongs to another kind of device.
    #[error("saved state is for another device type")]
    WrongDevice,
    /// The saved queues do not match the device's.
    #[error("saved state has {0} queues, the device has {1}")]
    QueueCount(usize, usize),
    /// A saved queue is invalid.
    #[error("saved queue is invalid: {0}")]
    Queue(DeviceError),
    /// The saved RX backlog is larger than the device keeps.
    #[error("saved state holds {0} pending frames, at most {1} fit")]
    TooManyPending(usize, usize),
}

/// Rebuilds live queues from saved ones (each checked as at activation);
/// an empty list means "not activated".
pub fn restore_queues(
    mem: &GuestMemoryMmap,
    saved: &[QueueConfig],
    max_sizes: &[u16],
) -> Result<Option<Vec<Queue>>, StateError> {
    if saved.is_empty() {
        return Ok(None);
    }
    if saved.len() != max_sizes.len() {
        return Err(StateError::QueueCount(saved.len(), max_sizes.len()));
    }
    let mut queues = Vec::with_capacity(saved.len());
    for ((i, config), &max) in (0u16..).zip(saved).zip(max_sizes) {
        if config.max_size != max {
            return Err(StateError::Queue(DeviceError::BadQueue(i)));
        }
        queues.push(queue::build_queue(mem, config, i).map_err(StateError::Queue)?);
    }
    Ok(Some(queues))
}

/// A virtio device model behind a transport.
///
/// Calls happen on the vCPU thread. `queue_notify` and the device's own
/// cause-application methods return whether the used ring changed (the
/// transport then sets `INT_VRING`); an `Err` means the guest broke the device.
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio 1.2 §5: 1 net, 2 block).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers (includes [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`).
    fn ack_features(&mut self, features: u64);
    /// Reads device config space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (read-only fields ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the validated queues (`DRIVER_OK`).
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), DeviceError>;
    /// The driver notified queue `index`; true when the used ring changed.
    fn queue_notify(&mut self, index: u16) -> Result<bool, DeviceError>;
    /// Back to the state after construction (status 0 written).
    fn reset(&mut self);
    /// A serialisable copy of the device state (queues, in-flight work).
    fn state(&self) -> DeviceState;
    /// Replaces the device state (a sync point or re-protection); `mem` is
    /// the guest memory the restored queues live in. Emits nothing: in-flight
    /// requests are the VMM's to re-issue.
    fn set_state(&mut self, mem: &GuestMemoryMmap, state: DeviceState) -> Result<(), StateError>;
    /// For typed access by the VMM (see [`mmio::MmioTransport::block_mut`]).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The state of one device model, for hashing, sync points and re-protection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(block::BlockState),
    /// virtio-net.
    Net(net::NetState),
}

/// A split virtqueue's state (virtio-queue's [`QueueState`], serialisable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size the driver chose (QueueNum).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table guest address.
    pub desc_table: u64,
    /// Available (driver) ring guest address.
    pub avail_ring: u64,
    /// Used (device) ring guest address.
    pub used_ring: u64,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated (never, tandem does not offer it).
    pub event_idx_enabled: bool,
}

impl QueueConfig {
    /// A queue as after reset: size = max, not ready, addresses 0.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }
}

impl From<QueueState> for QueueConfig {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueConfig> for QueueState {
    fn from(c: QueueConfig) -> Self {
        Self {
            max_size: c.max_size,
            next_avail: c.next_avail,
            next_used: c.next_used,
            event_idx_enabled: c.event_idx_enabled,
            size: c.size,
            ready: c.ready,
            desc_table: c.desc_table,
            avail_ring: c.avail_ring,
            used_ring: c.used_ring,
        }
    }
}

/// Counts guest-triggerable events and says which to log: the first, then
/// every [`WARN_EVERY`]th. Host-side bookkeeping, not device state.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateLimit {
    count: u64,
}

impl RateLimit {
    /// Counts one event; true when this one should be logged.
    pub fn hit(&mut self) -> bool {
        let log = self.count % WARN_EVERY == 0;
        self.count = self.count.wrapping_add(1);
        log
    }

    /// Events counted so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Copies `src` (a little-endian config-space image) into `data` at
/// `offset`; bytes past the image read 0.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in (0u64..).zip(data.iter_mut()) {
        *byte = offset
            .checked_add(i)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_logs_first_and_every_thousandth() {
        let mut r = RateLimit::default();
        let logged: Vec<u64> = (0..2500).filter(|_| r.hit()).collect();
        assert_eq!(logged, vec![0, 1000, 2000]);
        assert_eq!(r.count(), 2500);
    }

    #[test]
    fn config_bytes_past_the_end_read_zero() {
        let mut buf = [0xaa; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut buf);
        assert_eq!(buf, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut buf);
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn queue_config_round_trips_through_queue_state() {
        let mut c = QueueConfig::new(256);
        c.size = 64;
        c.next_avail = 7;
        let s: QueueState = c.into();
        assert_eq!(QueueConfig::from(s), c);
    }
}
