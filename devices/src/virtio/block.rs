//! virtio-blk (virtio 1.2 §5.2): one request queue, no host I/O.
//!
//! A queue notification parses every available request. IN (read), OUT
//! (write) and FLUSH requests go out as [`Output::BlockSubmit`] with a
//! per-device request id; the write data is copied from guest memory at the
//! submission stop, so it is part of the device state from then on. The
//! backend answers with [`tandem_replay::Cause::BlockDone`], which the VMM
//! applies with [`Block::complete`] (through
//! [`super::mmio::MmioTransport::apply_block_done`]): read data is copied into
//! the guest's buffers, the status byte written and the chain returned.
//! GET_ID, unknown types and requests that fail validation (out of range,
//! not whole sectors, larger than `seg_max × size_max`, a write to a
//! read-only disk, data buffers of the wrong direction) complete at once, at
//! the stop that saw them.
//!
//! The data of an IN request must be device-writable and that of an OUT
//! request device-readable (§2.7.4.1): an IN whose data is (partly) in
//! device-readable descriptors, i.e. more than the 16 header bytes are
//! readable, or an OUT with device-writable bytes before the status byte,
//! completes with `VIRTIO_BLK_S_IOERR`; nothing is read from or written to
//! its data buffers and nothing goes to the backend.
//!
//! Overlapping requests are serialised in the device: a request whose
//! sectors overlap an earlier in-flight or held write (or, for a write, any
//! earlier request), or a flush while an earlier write is outstanding, waits
//! in a FIFO and is submitted when what it overlaps completes. The backend
//! may therefore run everything it is given in any order.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_replay::{BlockOp, Output, Outputs};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::queue::{add_used, bufs_len, gather, pop_head, scatter, walk_chain, GuestBuf};
use super::VIRTIO_F_VERSION_1;
use super::{
    read_config_bytes, restore_queues, DeviceError, DeviceState, QueueConfig, RateLimit,
    StateError, VirtioDevice,
};
use crate::GuestMemoryMmap;

/// virtio device ID of a block device (§5).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// Segments per request offered in `seg_max`.
pub const SEG_MAX: u32 = 32;
/// Bytes per segment offered in `size_max`.
pub const SIZE_MAX: u32 = 64 * 1024;
/// The largest data transfer of one request (`seg_max × size_max`).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Length of the GET_ID answer (§5.2.6).
pub const ID_BYTES: usize = 20;

/// Feature: `size_max` is valid (§5.2.3).
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// Feature: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the FLUSH command is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request type: read (§5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: usize = 16;
/// Config space offsets (§5.2.4): capacity, size_max, seg_max.
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SIZE_MAX: usize = 8;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_LEN: usize = 16;

/// A request submitted to the backend or held behind an overlapping one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRequest {
    /// The id in [`Output::BlockSubmit`] and the completion.
    pub id: u64,
    /// Head descriptor of the chain.
    pub head: u16,
    /// What the backend is asked to do (write data included).
    pub op: BlockOp,
    /// Device-writable data buffers (reads).
    pub data_bufs: Vec<GuestBuf>,
    /// Guest address of the status byte.
    pub status_addr: u64,
}

/// The state of a virtio-blk device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The request queue once the device is activated.
    pub queue: Option<QueueConfig>,
    /// The id the next request gets.
    pub next_request: u64,
    /// Submitted, not yet completed, in submission order.
    pub in_flight: Vec<BlockRequest>,
    /// Waiting for an overlapping request to complete, oldest first.
    pub held: Vec<BlockRequest>,
}

/// A virtio-blk device model.
pub struct Block {
    index: u8,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    outputs: Arc<dyn Outputs>,
    acked_features: u64,
    active: Option<(GuestMemoryMmap, Queue)>,
    next_request: u64,
    in_flight: Vec<BlockRequest>,
    held: VecDeque<BlockRequest>,
    warn: RateLimit,
}

/// Sector range `[start, end)` an operation touches; empty for a flush.
fn range(op: &BlockOp) -> (u64, u64) {
    let (sector, len) = match op {
        BlockOp::Read { sector, len } => (*sector, u64::from(*len)),
        BlockOp::Write { sector, data } => (*sector, u64::try_from(data.len()).unwrap_or(u64::MAX)),
        BlockOp::Flush => return (0, 0),
    };
    (sector, sector.saturating_add(len.div_ceil(SECTOR_SIZE)))
}

/// Must `later` wait for `earlier` to complete?
fn conflicts(later: &BlockOp, earlier: &BlockOp) -> bool {
    let is_write = |op: &BlockOp| matches!(op, BlockOp::Write { .. });
    match (later, earlier) {
        (BlockOp::Flush, e) => is_write(e),
        (_, BlockOp::Flush) => false,
        (l, e) => {
            let ((ls, le), (es, ee)) = (range(l), range(e));
            (is_write(l) || is_write(e)) && ls < ee && es < le
        }
    }
}

impl Block {
    /// Device `index` with `capacity_sectors` 512-byte sectors; `id` is
    /// what GET_ID answers (truncated to 20 bytes, NUL padded).
    pub fn new(
        index: u8,
        capacity_sectors: u64,
        read_only: bool,
        id: String,
        outputs: Arc<dyn Outputs>,
    ) -> Self {
        let mut id_bytes = [0u8; ID_BYTES];
        for (dst, src) in id_bytes.iter_mut().zip(id.bytes()) {
            *dst = src;
        }
        Self {
            index,
            capacity: capacity_sectors,
            read_only,
            id: id_bytes,
            outputs,
            acked_features: 0,
            active: None,
            next_request: 0,
            in_flight: Vec::new(),
            held: VecDeque::new(),
            warn: RateLimit::default(),
        }
    }

    /// Device index (the `device` of its outputs and causes).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// What request `request` (submitted, not yet completed) asks for.
    pub fn in_flight_op(&self, request: u64) -> Option<&BlockOp> {
        self.in_flight
            .iter()
            .find(|r| r.id == request)
            .map(|r| &r.op)
    }

    /// The id the next request gets.
    pub fn next_request(&self) -> u64 {
        self.next_request
    }

    /// Never hands out ids below `next` again (after a rollback to a
    /// checkpoint, completions of requests issued since may still arrive).
    pub fn reserve_ids_below(&mut self, next: u64) {
        self.next_request = self.next_request.max(next);
    }

    /// The request ids submitted and not yet completed.
    pub fn in_flight_ids(&self) -> Vec<u64> {
        self.in_flight.iter().map(|r| r.id).collect()
    }

    /// Applies the completion of request `request` (a `Cause::BlockDone`):
    /// copies `data` into the read buffers, writes `status`, returns the
    /// chain and submits what was held behind it. True when the used ring
    /// changed; an unknown id is logged (rate-limited) and ignored.
    pub fn complete(&mut self, request: u64, status: u8, data: &[u8]) -> Result<bool, DeviceError> {
        let Some(pos) = self.in_flight.iter().position(|r| r.id == request) else {
            if self.warn.hit() {
                tracing::warn!(
                    device = self.index,
                    request,
                    stale = request < self.next_request,
                    "virtio-blk completion for an unknown request ignored"
                );
            }
            return Ok(false);
        };
        let req = self.in_flight.remove(pos);
        let Some(mem) = self.active.as_ref().map(|(m, _)| m.clone()) else {
            return Ok(false);
        };
        let status = match status {
            VIRTIO_BLK_S_OK | VIRTIO_BLK_S_IOERR | VIRTIO_BLK_S_UNSUPP => status,
            _ => VIRTIO_BLK_S_IOERR,
        };
        let (status, written) = match &req.op {
            BlockOp::Read { len, .. } if status == VIRTIO_BLK_S_OK => {
                let written = scatter(&mem, &req.data_bufs, 0, data)?;
                let exact = u64::try_from(data.len()).ok() == Some(u64::from(*len))
                    && bufs_len(&req.data_bufs) == u64::from(*len);
                if !exact && self.warn.hit() {
                    tracing::warn!(
                        device = self.index,
                        request,
                        got = data.len(),
                        want = len,
                        "virtio-blk read completion has the wrong length"
                    );
                }
                let status = if exact { status } else { VIRTIO_BLK_S_IOERR };
                (status, written)
            }
            _ => (status, 0),
        };
        self.finish(req.head, req.status_addr, status, written)?;
        self.release_held();
        Ok(true)
    }

    /// Writes the status byte and puts the chain on the used ring.
    fn finish(
        &mut self,
        head: u16,
        status_addr: u64,
        status: u8,
        written: u64,
    ) -> Result<(), DeviceError> {
        let Some((mem, queue)) = self.active.as_mut() else {
            return Ok(());
        };
        mem.write_obj(status, GuestAddress(status_addr))
            .map_err(|_| DeviceError::OutsideMemory {
                addr: status_addr,
                len: 1,
            })?;
        let len = u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX);
        add_used(queue, mem, head, len)
    }

    fn submit(&mut self, req: BlockRequest) {
        let blocked = self
            .in_flight
            .iter()
            .chain(self.held.iter())
            .any(|e| conflicts(&req.op, &e.op));
        if blocked {
            self.held.push_back(req);
        } else {
            self.start(req);
        }
    }

    fn start(&mut self, req: BlockRequest) {
        self.outputs.emit(Output::BlockSubmit {
            device: self.index,
            request: req.id,
            op: req.op.clone(),
        });
        self.in_flight.push(req);
    }

    /// Submits every held request that no longer waits for anything.
    fn release_held(&mut self) {
        let mut still: VecDeque<BlockRequest> = VecDeque::new();
        for req in std::mem::take(&mut self.held) {
            let blocked = self
                .in_flight
                .iter()
                .chain(still.iter())
                .any(|e| conflicts(&req.op, &e.op));
            if blocked {
                still.push_back(req);
            } else {
                self.start(req);
            }
        }
        self.held = still;
    }

    /// The status a data request of `len` bytes at `sector` fails with, if any.
    fn check_range(&self, sector: u64, len: u64) -> Option<u8> {
        let fits = len % SECTOR_SIZE == 0
            && len <= MAX_REQUEST_BYTES
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity);
        (!fits).then_some(VIRTIO_BLK_S_IOERR)
    }

    /// Parses and starts (or answers) the request at `head`; true when it
    /// completed at once.
    fn handle_chain(&mut self, mem: &GuestMemoryMmap, head: u16) -> Result<bool, DeviceError> {
        let chain = match &self.active {
            Some((_, queue)) => walk_chain(mem, queue, head)?,
            None => return Ok(false),
        };
        // The status byte is the last byte of the last writable buffer.
        let mut data_bufs = chain.writable.clone();
        let last = data_bufs
            .pop()
            .ok_or(DeviceError::Malformed("no status byte"))?;
        let status_addr = last
            .addr
            .saturating_add(u64::from(last.len.saturating_sub(1)));
        if last.len > 1 {
            data_bufs.push(GuestBuf {
                addr: last.addr,
                len: last.len - 1,
            });
        }
        let header = gather(mem, &chain.readable, 0, HEADER_LEN)?;
        let Ok::<[u8; HEADER_LEN], _>(h) = header.try_into() else {
            return Err(DeviceError::Malformed(
                "request header shorter than 16 bytes",
            ));
        };
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        // Data descriptors of the wrong direction (see the module doc).
        let readable_data = bufs_len(&chain.readable) > HEADER_LEN as u64;
        let writable_data = !data_bufs.is_empty();
        let op = match kind {
            VIRTIO_BLK_T_IN => {
                let len = bufs_len(&data_bufs);
                if let Some(status) = readable_data
                    .then_some(VIRTIO_BLK_S_IOERR)
                    .or_else(|| self.check_range(sector, len))
                {
                    self.finish(head, status_addr, status, 0)?;
                    return Ok(true);
                }
                let len = u32::try_from(len).map_err(|_| DeviceError::Oversize)?;
                BlockOp::Read { sector, len }
            }
            VIRTIO_BLK_T_OUT => {
                let len = bufs_len(&chain.readable).saturating_sub(HEADER_LEN as u64);
                if let Some(status) = writable_data
                    .then_some(VIRTIO_BLK_S_IOERR)
                    .or_else(|| self.check_range(sector, len))
                    .or(self.read_only.then_some(VIRTIO_BLK_S_IOERR))
                {
                    self.finish(head, status_addr, status, 0)?;
                    return Ok(true);
                }
                let len = usize::try_from(len).map_err(|_| DeviceError::Oversize)?;
                let data = gather(mem, &chain.readable, HEADER_LEN as u64, len)?;
                BlockOp::Write { sector, data }
            }
            VIRTIO_BLK_T_FLUSH => BlockOp::Flush,
            VIRTIO_BLK_T_GET_ID => {
                let written = scatter(mem, &data_bufs, 0, &self.id)?;
                self.finish(head, status_addr, VIRTIO_BLK_S_OK, written)?;
                return Ok(true);
            }
            _ => {
                self.finish(head, status_addr, VIRTIO_BLK_S_UNSUPP, 0)?;
                return Ok(true);
            }
        };
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        self.submit(BlockRequest {
            id,
            head,
            op,
            data_bufs,
            status_addr,
        });
        Ok(false)
    }

    fn config_image(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[CONFIG_CAPACITY..CONFIG_SIZE_MAX].copy_from_slice(&self.capacity.to_le_bytes());
        c[CONFIG_SIZE_MAX..CONFIG_SEG_MAX].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[CONFIG_SEG_MAX..CONFIG_LEN].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX | ro
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_image(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), DeviceError> {
        let queue = queues.into_iter().next().ok_or(DeviceError::BadQueue(0))?;
        self.active = Some((mem, queue));
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) -> Result<bool, DeviceError> {
        let Some(mem) = self.active.as_ref().map(|(m, _)| m.clone()) else {
            return Ok(false);
        };
        if index != 0 {
            if self.warn.hit() {
                tracing::warn!(
                    device = self.index,
                    index,
                    "virtio-blk notify of a missing queue"
                );
            }
            return Ok(false);
        }
        let mut used = false;
        loop {
            let head = match self.active.as_mut() {
                Some((_, queue)) => pop_head(queue, &mem)?,
                None => None,
            };
            let Some(head) = head else { break };
            used |= self.handle_chain(&mem, head)?;
        }
        Ok(used)
    }

    fn reset(&mut self) {
        // Completions of dropped requests are recognised as stale by id.
        self.acked_features = 0;
        self.active = None;
        self.in_flight.clear();
        self.held.clear();
    }

    fn state(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            acked_features: self.acked_features,
            queue: self.active.as_ref().map(|(_, q)| q.state().into()),
            next_request: self.next_request,
            in_flight: self.in_flight.clone(),
            held: self.held.iter().cloned().collect(),
        })
    }

    fn set_state(&mut self, mem: &GuestMemoryMmap, state: DeviceState) -> Result<(), StateError> {
        let DeviceState::Block(st) = state else {
            return Err(StateError::WrongDevice);
        };
        let saved: Vec<QueueConfig> = st.queue.into_iter().collect();
        let queue =
            restore_queues(mem, &saved, &[QUEUE_SIZE])?.and_then(|qs| qs.into_iter().next());
        self.acked_features = st.acked_features & self.avail_features();
        self.active = queue.map(|q| (mem.clone(), q));
        self.next_request = st.next_request;
        self.in_flight = st.in_flight;
        self.held = st.held.into();
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
