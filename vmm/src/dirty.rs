//! The one owner of dirty-page tracking (DESIGN point 12).
//!
//! Guest writes are seen by KVM's dirty log (the memslot is created with
//! `KVM_MEM_LOG_DIRTY_PAGES`); the VMM's own writes (device DMA into guest
//! memory) are seen by vm-memory's atomic bitmap. [`DirtyTracker::harvest`]
//! ORs both into every consumer's bitmap (sync points, epochs, later
//! re-protection and checkpoints), so each consumer sees every page written
//! since it last took its set. Nothing else calls `KVM_GET_DIRTY_LOG`.

use kvm_ioctls::VmFd;
use tandem_devices::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// A consumer of dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerId(usize);

/// Dirty-page bitmaps per consumer over the single guest memory slot.
pub struct DirtyTracker {
    pages: u64,
    consumers: Vec<Vec<u64>>,
}

impl DirtyTracker {
    /// A tracker for `mem_size` bytes of guest memory in slot 0.
    pub fn new(mem_size: u64) -> Self {
        Self {
            pages: mem_size.div_ceil(PAGE_SIZE),
            consumers: Vec::new(),
        }
    }

    /// Adds a consumer whose set starts empty.
    pub fn register(&mut self) -> ConsumerId {
        self.consumers.push(vec![0; self.words()]);
        ConsumerId(self.consumers.len() - 1)
    }

    fn words(&self) -> usize {
        self.pages.div_ceil(64) as usize
    }

    /// Pulls KVM's dirty log and the VMM's write bitmap into every consumer.
    pub fn harvest(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), kvm_ioctls::Error> {
        let words = self.words();
        let mut dirty = vec![0u64; words];
        for (slot, region) in mem.iter().enumerate() {
            let first = (region.start_addr().0 / PAGE_SIZE) as usize;
            let kvm = vm.get_dirty_log(slot as u32, region.len() as usize)?;
            let own = region.get_mmap().bitmap().get_and_reset();
            for (i, word) in kvm.iter().enumerate() {
                let own_word = own.get(i).copied().unwrap_or(0);
                or_bits(&mut dirty, first + i * 64, word | own_word);
            }
        }
        for consumer in &mut self.consumers {
            for (c, d) in consumer.iter_mut().zip(&dirty) {
                *c |= d;
            }
        }
        Ok(())
    }

    /// The pages `id` has not seen yet (as guest frame numbers, ascending);
    /// its set is then empty. Call [`harvest`](Self::harvest) first.
    pub fn take(&mut self, id: ConsumerId) -> Vec<u64> {
        let Some(bits) = self.consumers.get_mut(id.0) else {
            return Vec::new();
        };
        let mut gfns = Vec::new();
        for (w, word) in bits.iter_mut().enumerate() {
            let mut x = std::mem::take(word);
            while x != 0 {
                let b = x.trailing_zeros() as u64;
                gfns.push(w as u64 * 64 + b);
                x &= x - 1;
            }
        }
        gfns
    }
}

/// ORs a 64-bit word of page bits starting at page `first` into `bits`.
fn or_bits(bits: &mut [u64], first: usize, word: u64) {
    if word == 0 {
        return;
    }
    let (w, shift) = (first / 64, first % 64);
    if let Some(slot) = bits.get_mut(w) {
        *slot |= word << shift;
    }
    if shift != 0 {
        if let Some(slot) = bits.get_mut(w + 1) {
            *slot |= word >> (64 - shift);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_see_every_page_once_each() {
        let mut t = DirtyTracker::new(1 << 20);
        let a = t.register();
        let b = t.register();
        for (w, bits) in [(0usize, 0b101u64), (3, 1 << 63)] {
            for c in &mut t.consumers {
                c[w] |= bits;
            }
        }
        assert_eq!(t.take(a), vec![0, 2, 255]);
        assert_eq!(t.take(a), Vec::<u64>::new());
        assert_eq!(t.take(b), vec![0, 2, 255]);
    }

    #[test]
    fn or_bits_handles_unaligned_regions() {
        let mut bits = vec![0u64; 2];
        or_bits(&mut bits, 60, 0b11111);
        assert_eq!(bits, vec![0xf << 60, 1]);
        or_bits(&mut bits, 200, 1); // out of range: ignored
    }
}
