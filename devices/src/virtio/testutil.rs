//! Test helpers: guest memory, a driver-side split queue writer and a
//! recording [`Outputs`].

use std::sync::{Arc, Mutex};

use tandem_replay::{Output, Outputs};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::queue::{build_queue, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::QueueConfig;
use crate::{lock, GuestMemoryMmap};

/// Size of the test guest memory.
pub const MEM_SIZE: u64 = 0x10_0000;

/// 1 MiB of guest memory at 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Records every output.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<Output>>);

impl Recorder {
    /// A shared recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Takes what was recorded so far.
    pub fn take(&self) -> Vec<Output> {
        std::mem::take(&mut *lock(&self.0))
    }
}

impl Outputs for Recorder {
    fn emit(&self, output: Output) {
        lock(&self.0).push(output);
    }
}

/// The driver side of a split queue laid out at `base`.
pub struct TestQueue {
    mem: GuestMemoryMmap,
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// An empty queue of `size` entries at `base`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let tq = Self {
            mem: mem.clone(),
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
        };
        tq.mem
            .write_obj(0u16, GuestAddress(tq.avail_ring()))
            .unwrap();
        tq.mem
            .write_obj(0u16, GuestAddress(tq.avail_ring() + 2))
            .unwrap();
        tq.mem
            .write_obj(0u16, GuestAddress(tq.used_ring() + 2))
            .unwrap();
        tq
    }

    /// Descriptor table address.
    pub fn desc_table(&self) -> u64 {
        self.base
    }

    /// Available ring address.
    pub fn avail_ring(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }

    /// Used ring address (4-byte aligned).
    pub fn used_ring(&self) -> u64 {
        (self.avail_ring() + 6 + 2 * u64::from(self.size) + 3) & !3
    }

    /// The configuration a driver would write.
    pub fn config(&self, max_size: u16) -> QueueConfig {
        QueueConfig {
            max_size,
            size: self.size,
            ready: true,
            desc_table: self.desc_table(),
            avail_ring: self.avail_ring(),
            used_ring: self.used_ring(),
            ..QueueConfig::default()
        }
    }

    /// The device-side queue for this layout.
    pub fn queue(&self, mem: &GuestMemoryMmap) -> Queue {
        build_queue(mem, &self.config(self.size), 0).unwrap()
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.base + 16 * u64::from(i));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Adds a chain of `(addr, len, writable)` buffers and makes it available.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (n, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            let next = (i + 1) % self.size;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if n + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(i, addr, len, flags, next);
            self.next_desc = next;
        }
        self.make_available(head);
        head
    }

    /// Puts `head` on the available ring.
    pub fn make_available(&mut self, head: u16) {
        let slot = self.avail_ring() + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_ring() + 2))
            .unwrap();
    }

    /// Makes descriptor `i` continue at `next`.
    pub fn set_next(&self, i: u16, next: u16) {
        let at = self.base + 16 * u64::from(i);
        let flags: u16 = self.mem.read_obj(GuestAddress(at + 12)).unwrap();
        self.mem
            .write_obj(flags | VRING_DESC_F_NEXT, GuestAddress(at + 12))
            .unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// The used ring's idx.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_ring() + 2))
            .unwrap()
    }

    /// Used element `n`: (descriptor head, bytes written).
    pub fn used(&self, n: u16) -> (u32, u32) {
        let at = self.used_ring() + 4 + 8 * u64::from(n % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}
