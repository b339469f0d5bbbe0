//! virtio-net (virtio 1.2 §5.1): queue 0 receives, queue 1 transmits.
//!
//! No offloads are offered, so every buffer starts with a plain
//! `virtio_net_hdr_v1` (12 bytes, VERSION_1 layout) that the device ignores
//! on TX and writes zeroed, with `num_buffers = 1`, on RX. Mergeable RX
//! buffers are not offered: a frame must fit one RX chain or is dropped.
//!
//! * TX: each chain's readable bytes after the header are one frame, emitted
//!   as [`Output::NetTx`]; frames shorter than an Ethernet header or longer
//!   than 65550 bytes are dropped (counted, rate-limited warning) and their
//!   chains returned all the same.
//! * RX: [`Net::receive`] (a `Cause::NetRx`, through
//!   [`super::mmio::MmioTransport::apply_net_rx`]) queues the frame in a FIFO
//!   of at most [`PENDING_MAX`] frames (beyond that the oldest is dropped and
//!   counted, as a NIC drops) and delivers as many queued frames as there are
//!   RX buffers; the rest go out on the next RX notification. Frames that
//!   arrive before `DRIVER_OK` are dropped, as on a NIC whose link is down.
//!
//! The guest MAC lives only in config space ([`VIRTIO_NET_F_MAC`]).

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_replay::{Output, Outputs};
use virtio_queue::Queue;

use super::queue::{add_used, bufs_len, gather, pop_head, scatter, unpop_head, walk_chain};
use super::VIRTIO_F_VERSION_1;
use super::{
    read_config_bytes, restore_queues, DeviceError, DeviceState, QueueConfig, RateLimit,
    StateError, VirtioDevice,
};
use crate::GuestMemoryMmap;

/// virtio device ID of a network card (§5).
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Feature: `mac` in config space is valid (§5.1.3).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature: `status` in config space is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Config `status`: link up (§5.1.4).
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Length of `virtio_net_hdr_v1` (§5.1.6).
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Smallest frame accepted: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Largest frame accepted (64 KiB plus an Ethernet and VLAN header).
pub const MAX_FRAME: usize = 65550;
/// Received frames kept while the guest has no RX buffer.
pub const PENDING_MAX: usize = 256;
/// Config space: mac (6 bytes) then status (le16).
const CONFIG_LEN: usize = 8;

/// The state of a virtio-net device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// RX and TX queue once activated (empty before).
    pub queues: Vec<QueueConfig>,
    /// Received frames waiting for an RX buffer, oldest first.
    pub pending: Vec<Vec<u8>>,
    /// Received frames dropped (no room, too big, before activation).
    pub rx_dropped: u64,
    /// Transmitted frames dropped (malformed).
    pub tx_dropped: u64,
}

/// A virtio-net device model.
pub struct Net {
    index: u8,
    mac: [u8; 6],
    outputs: Arc<dyn Outputs>,
    acked_features: u64,
    active: Option<(GuestMemoryMmap, Vec<Queue>)>,
    pending: VecDeque<Vec<u8>>,
    rx_dropped: u64,
    tx_dropped: u64,
    warn: RateLimit,
}

impl Net {
    /// Device `index` with guest MAC `mac`, transmitting to `outputs`.
    pub fn new(index: u8, mac: [u8; 6], outputs: Arc<dyn Outputs>) -> Self {
        Self {
            index,
            mac,
            outputs,
            acked_features: 0,
            active: None,
            pending: VecDeque::new(),
            rx_dropped: 0,
            tx_dropped: 0,
            warn: RateLimit::default(),
        }
    }

    /// Device index (the `device` of its outputs and causes).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The guest MAC address (config space).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Frames waiting for an RX buffer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn drop_warn(&mut self, what: &str, len: usize) {
        if self.warn.hit() {
            tracing::warn!(
                device = self.index,
                len,
                "virtio-net: {what}, frame dropped"
            );
        }
    }

    /// Applies a received frame (a `Cause::NetRx`); true when the used ring
    /// changed. See the module doc for queueing and drops.
    pub fn receive(&mut self, frame: &[u8]) -> Result<bool, DeviceError> {
        if self.active.is_none() {
            // A NIC whose driver has not started drops traffic; hosts send
            // some (IPv6 router solicitations) as soon as the tap is up.
            self.rx_dropped = self.rx_dropped.wrapping_add(1);
            tracing::debug!(
                device = self.index,
                "virtio-net: frame before DRIVER_OK dropped"
            );
            return Ok(false);
        }
        if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            self.rx_dropped = self.rx_dropped.wrapping_add(1);
            self.drop_warn("received frame of a bad size", frame.len());
            return Ok(false);
        }
        self.pending.push_back(frame.to_vec());
        if self.pending.len() > PENDING_MAX {
            self.pending.pop_front();
            self.rx_dropped = self.rx_dropped.wrapping_add(1);
            self.drop_warn("no RX buffer and the pending queue is full", frame.len());
        }
        self.deliver_pending()
    }

    /// Moves pending frames into available RX buffers.
    fn deliver_pending(&mut self) -> Result<bool, DeviceError> {
        let mut used = false;
        while let Some(frame) = self.pending.pop_front() {
            let Some((mem, queues)) = self.active.as_mut() else {
                self.pending.push_front(frame);
                break;
            };
            let Some(queue) = queues.get_mut(usize::from(RX_QUEUE)) else {
                self.pending.push_front(frame);
                break;
            };
            let Some(head) = pop_head(queue, mem)? else {
                self.pending.push_front(frame);
                break;
            };
            let chain = walk_chain(mem, queue, head)?;
            if !chain.readable.is_empty() {
                return Err(DeviceError::Malformed("readable descriptor in an RX chain"));
            }
            let total = NET_HDR_LEN.saturating_add(frame.len());
            if bufs_len(&chain.writable) < total as u64 {
                // Leave the buffer for a smaller frame.
                unpop_head(queue);
                self.rx_dropped = self.rx_dropped.wrapping_add(1);
                self.drop_warn("received frame larger than the RX buffer", frame.len());
                continue;
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
            scatter(mem, &chain.writable, 0, &hdr)?;
            scatter(mem, &chain.writable, NET_HDR_LEN as u64, &frame)?;
            let len = u32::try_from(total).map_err(|_| DeviceError::Oversize)?;
            add_used(queue, mem, head, len)?;
            used = true;
        }
        Ok(used)
    }

    /// Sends every available TX chain.
    fn transmit(&mut self) -> Result<bool, DeviceError> {
        let mut used = false;
        while let Some((mem, queues)) = self.active.as_mut() {
            let Some(queue) = queues.get_mut(usize::from(TX_QUEUE)) else {
                break;
            };
            let Some(head) = pop_head(queue, mem)? else {
                break;
            };
            let chain = walk_chain(mem, queue, head)?;
            let total = bufs_len(&chain.readable);
            let frame_len = total.saturating_sub(NET_HDR_LEN as u64);
            let ok = total >= NET_HDR_LEN as u64
                && (MIN_FRAME as u64..=MAX_FRAME as u64).contains(&frame_len);
            let frame = if ok {
                let len = usize::try_from(frame_len).map_err(|_| DeviceError::Oversize)?;
                Some(gather(mem, &chain.readable, NET_HDR_LEN as u64, len)?)
            } else {
                None
            };
            add_used(queue, mem, head, 0)?;
            used = true;
            match frame {
                Some(frame) => self.outputs.emit(Output::NetTx {
                    device: self.index,
                    frame,
                }),
                None => {
                    self.tx_dropped = self.tx_dropped.wrapping_add(1);
                    let len = usize::try_from(frame_len).unwrap_or(usize::MAX);
                    self.drop_warn("transmitted frame of a bad size", len);
                }
            }
        }
        Ok(used)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), DeviceError> {
        if queues.len() != self.queue_max_sizes().len() {
            return Err(DeviceError::BadQueue(0));
        }
        self.active = Some((mem, queues));
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE => self.deliver_pending(),
            TX_QUEUE => self.transmit(),
            _ => {
                if self.warn.hit() {
                    tracing::warn!(
                        device = self.index,
                        index,
                        "virtio-net notify of a missing queue"
                    );
                }
                Ok(false)
            }
        }
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.active = None;
        self.pending.clear();
    }

    fn state(&self) -> DeviceState {
        DeviceState::Net(NetState {
            acked_features: self.acked_features,
            queues: self
                .active
                .iter()
                .flat_map(|(_, qs)| qs.iter().map(|q| q.state().into()))
                .collect(),
            pending: self.pending.iter().cloned().collect(),
            rx_dropped: self.rx_dropped,
            tx_dropped: self.tx_dropped,
        })
    }

    fn set_state(&mut self, mem: &GuestMemoryMmap, state: DeviceState) -> Result<(), StateError> {
        let DeviceState::Net(st) = state else {
            return Err(StateError::WrongDevice);
        };
        if st.pending.len() > PENDING_MAX {
            return Err(StateError::TooManyPending(st.pending.len(), PENDING_MAX));
        }
        let queues = restore_queues(mem, &st.queues, &[QUEUE_SIZE, QUEUE_SIZE])?;
        self.acked_features = st.acked_features & self.avail_features();
        self.active = queues.map(|qs| (mem.clone(), qs));
        self.pending = st.pending.into();
        self.rx_dropped = st.rx_dropped;
        self.tx_dropped = st.tx_dropped;
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::{mem, Recorder, TestQueue};
    use vm_memory::{Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn setup() -> (GuestMemoryMmap, TestQueue, TestQueue, Arc<Recorder>, Net) {
        let m = mem();
        let rx = TestQueue::new(&m, 0x1000, 16);
        let tx = TestQueue::new(&m, 0x2000, 16);
        let rec = Recorder::new();
        let mut n = Net::new(1, MAC, rec.clone());
        n.activate(m.clone(), vec![rx.queue(&m), tx.queue(&m)])
            .unwrap();
        (m, rx, tx, rec, n)
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        vec![fill; len]
    }

    #[test]
    fn tx_strips_the_header_and_emits_the_frame() {
        let (m, _rx, mut tx, rec, mut n) = setup();
        m.write_slice(&[0xee; NET_HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        m.write_slice(&frame(60, 0xab), GuestAddress(0x9000))
            .unwrap();
        let head = tx.add_chain(&[(0x8000, 12, false), (0x9000, 60, false)]);
        // Too short a frame: dropped, its chain returned all the same.
        tx.add_chain(&[(0x8000, 12 + 10, false)]);
        assert_eq!(n.queue_notify(TX_QUEUE), Ok(true));
        assert_eq!(
            rec.take(),
            vec![Output::NetTx {
                device: 1,
                frame: frame(60, 0xab)
            }]
        );
        assert_eq!(tx.used_idx(), 2);
        assert_eq!(tx.used(0), (u32::from(head), 0));
        let DeviceState::Net(st) = n.state() else {
            panic!()
        };
        assert_eq!(st.tx_dropped, 1);
    }

    #[test]
    fn rx_fills_a_buffer_with_header_and_frame() {
        let (m, mut rx, _tx, _rec, mut n) = setup();
        let head = rx.add_chain(&[(0x8000, 12, true), (0x9000, 1514, true)]);
        assert_eq!(n.receive(&frame(100, 0x11)), Ok(true));
        assert_eq!(rx.used(0), (u32::from(head), 112));
        let mut hdr = [0xffu8; 12];
        m.read_slice(&mut hdr, GuestAddress(0x8000)).unwrap();
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let mut got = vec![0u8; 100];
        m.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(got, frame(100, 0x11));
    }

    #[test]
    fn rx_without_buffers_is_pending_until_the_next_notify() {
        let (m, mut rx, _tx, _rec, mut n) = setup();
        assert_eq!(n.receive(&frame(60, 1)), Ok(false));
        assert_eq!(n.receive(&frame(61, 2)), Ok(false));
        assert_eq!(n.pending_len(), 2);
        rx.add_chain(&[(0x8000, 2048, true)]);
        assert_eq!(n.queue_notify(RX_QUEUE), Ok(true));
        assert_eq!(n.pending_len(), 1);
        assert_eq!(rx.used(0).1, 72);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x8000 + 12)).unwrap(), 1);
        rx.add_chain(&[(0x9000, 2048, true)]);
        assert_eq!(n.queue_notify(RX_QUEUE), Ok(true));
        assert_eq!(n.pending_len(), 0);
        assert_eq!(rx.used(1).1, 73);
        assert_eq!(n.queue_notify(RX_QUEUE), Ok(false));
    }

    #[test]
    fn rx_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
        let (_m, mut rx, _tx, _rec, mut n) = setup();
        rx.add_chain(&[(0x8000, 200, true)]);
        assert_eq!(n.receive(&frame(1500, 1)), Ok(false));
        assert_eq!(rx.used_idx(), 0);
        assert_eq!(n.receive(&frame(100, 2)), Ok(true));
        assert_eq!(rx.used(0).1, 112);
        let DeviceState::Net(st) = n.state() else {
            panic!()
        };
        assert_eq!(st.rx_dropped, 1);
    }

    #[test]
    fn pending_queue_is_bounded_and_drops_the_oldest() {
        let (_m, _rx, _tx, _rec, mut n) = setup();
        for i in 0..PENDING_MAX + 3 {
            n.receive(&frame(60, i as u8)).unwrap();
        }
        let DeviceState::Net(st) = n.state() else {
            panic!()
        };
        assert_eq!(st.pending.len(), PENDING_MAX);
        assert_eq!(st.pending[0], frame(60, 3));
        assert_eq!(st.rx_dropped, 3);
        // Bad sizes and frames before activation are dropped too.
        n.receive(&frame(10, 0)).unwrap();
        n.reset();
        assert_eq!(n.receive(&frame(60, 0)), Ok(false));
        assert_eq!(n.pending_len(), 0);
    }

    #[test]
    fn config_space_has_the_mac_and_link_up() {
        let (_m, _rx, _tx, _rec, n) = setup();
        let mut c = [0u8; 8];
        n.read_config(0, &mut c);
        assert_eq!(c[..6], MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_ne!(n.avail_features() & VIRTIO_NET_F_MAC, 0);
    }

    #[test]
    fn readable_rx_buffers_break_the_device() {
        let (_m, mut rx, _tx, _rec, mut n) = setup();
        rx.add_chain(&[(0x8000, 2048, false)]);
        assert!(matches!(
            n.receive(&frame(60, 0)),
            Err(DeviceError::Malformed(_))
        ));
    }
}
