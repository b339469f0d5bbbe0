//! Split-virtqueue helpers shared by the devices (virtio 1.2 §2.7).
//!
//! virtio-queue's [`Queue`] keeps the ring indices and writes the used ring;
//! this module checks a queue's configuration at activation, pops heads off
//! the available ring and walks descriptor chains strictly: every descriptor
//! index below the queue size, no more descriptors than the queue holds (a
//! loop), no indirect descriptors (not offered), no zero-length buffers, every
//! buffer inside guest memory, readable buffers before writable ones. Any
//! violation is a [`DeviceError`].

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{DeviceError, QueueConfig};
use crate::GuestMemoryMmap;

/// Size of one descriptor table entry (virtio 1.2 §2.7.5).
pub const DESC_SIZE: u64 = 16;
/// Descriptor flag: the chain continues at `next` (§2.7.5).
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (§2.7.5).
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds an indirect table (§2.7.5.3).
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Available ring: flags, idx and used_event around the ring (§2.7.6).
const AVAIL_RING_OVERHEAD: u64 = 6;
/// Bytes per available-ring entry.
const AVAIL_ELEM_SIZE: u64 = 2;
/// Used ring: flags, idx and avail_event around the ring (§2.7.8).
const USED_RING_OVERHEAD: u64 = 6;
/// Bytes per used-ring entry.
const USED_ELEM_SIZE: u64 = 8;

/// One guest buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestBuf {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A walked descriptor chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<GuestBuf>,
    /// Device-writable buffers, in order (after all readable ones).
    pub writable: Vec<GuestBuf>,
}

/// Total length of `bufs` (cannot overflow: at most 2^16 buffers of < 2^32).
pub fn bufs_len(bufs: &[GuestBuf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

fn in_memory(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), DeviceError> {
    let ok = usize::try_from(len).is_ok_and(|l| {
        addr.checked_add(len).is_some()
            && GuestMemoryBackend::check_range(mem, GuestAddress(addr), l)
    });
    if ok {
        Ok(())
    } else {
        Err(DeviceError::OutsideMemory { addr, len })
    }
}

/// Builds the live queue for `config` (queue `index`), checking the size
/// (a power of two ≤ max), the ring alignments and that all three rings lie
/// in guest memory. An unready queue comes back unready and unchecked.
pub fn build_queue(
    mem: &GuestMemoryMmap,
    config: &QueueConfig,
    index: u16,
) -> Result<Queue, DeviceError> {
    let bad = |_| DeviceError::BadQueue(index);
    let mut q = Queue::new(config.max_size).map_err(bad)?;
    if !config.ready {
        return Ok(q);
    }
    q.try_set_size(config.size).map_err(bad)?;
    q.try_set_desc_table_address(GuestAddress(config.desc_table))
        .map_err(bad)?;
    q.try_set_avail_ring_address(GuestAddress(config.avail_ring))
        .map_err(bad)?;
    q.try_set_used_ring_address(GuestAddress(config.used_ring))
        .map_err(bad)?;
    // virtio-queue treats an available ring at 0 as "not ready" and would
    // ignore the queue silently; refuse it instead.
    if config.avail_ring == 0 {
        return Err(DeviceError::BadQueue(index));
    }
    let size = u64::from(config.size);
    in_memory(mem, config.desc_table, DESC_SIZE * size)?;
    in_memory(
        mem,
        config.avail_ring,
        AVAIL_RING_OVERHEAD + AVAIL_ELEM_SIZE * size,
    )?;
    in_memory(
        mem,
        config.used_ring,
        USED_RING_OVERHEAD + USED_ELEM_SIZE * size,
    )?;
    q.set_next_avail(config.next_avail);
    q.set_next_used(config.next_used);
    q.set_ready(true);
    Ok(q)
}

/// Pops the next available head, if any (an unready queue has none).
pub fn pop_head(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<u16>, DeviceError> {
    if !queue.ready() {
        return Ok(None);
    }
    let mut iter = queue.iter(mem).map_err(|_| DeviceError::AvailIndex)?;
    Ok(iter.next().map(|chain| chain.head_index()))
}

/// Puts the last popped head back on the available ring.
pub fn unpop_head(queue: &mut Queue) {
    queue.go_to_previous_position();
}

/// Returns `head` to the driver with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    queue
        .add_used(mem, head, len)
        .map_err(|_| DeviceError::DescriptorIndex(head))
}

/// Walks the chain starting at `head` (see the module doc for the checks).
pub fn walk_chain(mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> Result<Chain, DeviceError> {
    let size = queue.size();
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut index = head;
    let mut total: u64 = 0;
    for _ in 0..size {
        if index >= size {
            return Err(DeviceError::DescriptorIndex(index));
        }
        let desc_addr = queue
            .desc_table()
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(DeviceError::DescriptorIndex(index))?;
        let mut raw = [0u8; DESC_SIZE as usize];
        mem.read_slice(&mut raw, GuestAddress(desc_addr))
            .map_err(|_| DeviceError::OutsideMemory {
                addr: desc_addr,
                len: DESC_SIZE,
            })?;
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        let addr = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        let flags = u16::from_le_bytes([f0, f1]);
        let next = u16::from_le_bytes([n0, n1]);
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(DeviceError::Indirect);
        }
        if len == 0 {
            return Err(DeviceError::ZeroLength);
        }
        in_memory(mem, addr, u64::from(len))?;
        total = total.saturating_add(u64::from(len));
        if total > u64::from(u32::MAX) {
            return Err(DeviceError::Oversize);
        }
        let buf = GuestBuf { addr, len };
        if flags & VRING_DESC_F_WRITE != 0 {
            chain.writable.push(buf);
        } else if chain.writable.is_empty() {
            chain.readable.push(buf);
        } else {
            return Err(DeviceError::Malformed(
                "readable descriptor after a writable one",
            ));
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = next;
    }
    Err(DeviceError::ChainLoop)
}

/// Calls `f(guest_addr, range_in_data)` for each piece of the byte range
/// `[skip, skip + len)` of the concatenated `bufs`; returns the bytes covered.
fn for_each_piece(
    bufs: &[GuestBuf],
    skip: u64,
    len: u64,
    mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), DeviceError>,
) -> Result<u64, DeviceError> {
    let end = skip.saturating_add(len);
    let mut pos: u64 = 0;
    let mut done: u64 = 0;
    for b in bufs {
        let b_end = pos.saturating_add(u64::from(b.len));
        let lo = pos.max(skip);
        let hi = b_end.min(end);
        if lo < hi {
            let from = usize::try_from(lo - skip).map_err(|_| DeviceError::Oversize)?;
            let to = usize::try_from(hi - skip).map_err(|_| DeviceError::Oversize)?;
            f(b.addr.saturating_add(lo - pos), from..to)?;
            done += hi - lo;
        }
        pos = b_end;
        if pos >= end {
            break;
        }
    }
    Ok(done)
}

/// Reads `len` bytes starting `skip` bytes into `bufs` (fewer if they end).
pub fn gather(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    skip: u64,
    len: usize,
) -> Result<Vec<u8>, DeviceError> {
    let mut out = vec![0u8; len];
    let len64 = u64::try_from(len).map_err(|_| DeviceError::Oversize)?;
    let done = for_each_piece(bufs, skip, len64, |addr, range| {
        let piece = out.get_mut(range).ok_or(DeviceError::Oversize)?;
        mem.read_slice(piece, GuestAddress(addr))
            .map_err(|_| outside(addr, piece.len()))
    })?;
    out.truncate(usize::try_from(done).unwrap_or(0));
    Ok(out)
}

/// Writes `data` starting `skip` bytes into `bufs`; stops where they end and
/// returns how many bytes were written.
pub fn scatter(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    skip: u64,
    data: &[u8],
) -> Result<u64, DeviceError> {
    let len = u64::try_from(data.len()).map_err(|_| DeviceError::Oversize)?;
    for_each_piece(bufs, skip, len, |addr, range| {
        let piece = data.get(range).ok_or(DeviceError::Oversize)?;
        mem.write_slice(piece, GuestAddress(addr))
            .map_err(|_| outside(addr, piece.len()))
    })
}

fn outside(addr: u64, len: usize) -> DeviceError {
    DeviceError::OutsideMemory {
        addr,
        len: u64::try_from(len).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::{mem, TestQueue};

    #[test]
    fn walks_a_chain_and_splits_readable_from_writable() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 0x1000, 16);
        let head = tq.add_chain(&[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)]);
        let mut q = tq.queue(&m);
        assert_eq!(pop_head(&mut q, &m), Ok(Some(head)));
        assert_eq!(pop_head(&mut q, &m), Ok(None));
        let c = walk_chain(&m, &q, head).unwrap();
        assert_eq!(
            c.readable,
            vec![GuestBuf {
                addr: 0x8000,
                len: 16
            }]
        );
        assert_eq!(c.writable.len(), 2);
        assert_eq!(bufs_len(&c.writable), 513);
    }

    #[test]
    fn gather_and_scatter_cross_buffer_boundaries() {
        let m = mem();
        let bufs = [
            GuestBuf {
                addr: 0x8000,
                len: 3,
            },
            GuestBuf {
                addr: 0x9000,
                len: 5,
            },
        ];
        assert_eq!(scatter(&m, &bufs, 2, b"abcdefgh").unwrap(), 6);
        assert_eq!(gather(&m, &bufs, 0, 100).unwrap()[2..], *b"abcdef");
        assert_eq!(gather(&m, &bufs, 4, 2).unwrap(), b"cd");
    }

    #[test]
    fn broken_chains_are_errors() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 0x1000, 4);
        // Outside memory.
        let h = tq.add_chain(&[(0xffff_0000, 16, false)]);
        let q = tq.queue(&m);
        assert!(matches!(
            walk_chain(&m, &q, h),
            Err(DeviceError::OutsideMemory { .. })
        ));
        // Zero length.
        let h = tq.add_chain(&[(0x8000, 0, false)]);
        assert_eq!(walk_chain(&m, &q, h), Err(DeviceError::ZeroLength));
        // A loop: descriptor points at itself.
        let h = tq.add_chain(&[(0x8000, 16, false)]);
        tq.set_next(h, h);
        assert_eq!(walk_chain(&m, &q, h), Err(DeviceError::ChainLoop));
        // Head out of range.
        assert_eq!(walk_chain(&m, &q, 9), Err(DeviceError::DescriptorIndex(9)));
        // Readable after writable.
        let mut tq = TestQueue::new(&m, 0x1000, 4);
        let h = tq.add_chain(&[(0x8000, 1, true), (0x8000, 1, false)]);
        let q = tq.queue(&m);
        assert!(matches!(
            walk_chain(&m, &q, h),
            Err(DeviceError::Malformed(_))
        ));
    }

    #[test]
    fn bad_queue_configs_are_refused() {
        let m = mem();
        let mut c = QueueConfig::new(256);
        c.ready = true;
        c.desc_table = 0x1000;
        c.avail_ring = 0x2000;
        c.used_ring = 0x3000;
        c.size = 100;
        assert_eq!(build_queue(&m, &c, 0), Err(DeviceError::BadQueue(0)));
        c.size = 512;
        assert_eq!(build_queue(&m, &c, 0), Err(DeviceError::BadQueue(0)));
        c.size = 256;
        c.used_ring = 0x3001;
        assert_eq!(build_queue(&m, &c, 0), Err(DeviceError::BadQueue(0)));
        c.used_ring = 0xffff_f000;
        assert!(matches!(
            build_queue(&m, &c, 0),
            Err(DeviceError::OutsideMemory { .. })
        ));
        c.used_ring = 0x3000;
        assert!(build_queue(&m, &c, 0).unwrap().ready());
    }
}
