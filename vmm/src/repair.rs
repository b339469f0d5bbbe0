//! Sound repair of a diverged replay (DESIGN point 11).
//!
//! The replayer keeps a *shadow*: guest memory as it was at the last epoch
//! whose hashes matched (E_v), plus every page the recorded sync points
//! since E_v carried. When an epoch diverges, the next sync point S repairs
//! the replay: every page the replayer wrote since E_v gets the content the
//! recorder had at S — the latest carried copy if a sync point carried it
//! (the recorder dirtied it after E_v), else the shadow's (the recorder did
//! not touch it since E_v) — and then S's vCPU and device state are
//! installed as usual. Memory is then the recorder's at S, so S becomes the
//! shadow's new E_v (`vcpu/sync.rs::install_sync_point`), and the repair's
//! own writes are not counted as the replay's. A log with no sync point
//! after the divergence cannot be repaired offline, and the replay says so.

use std::collections::{BTreeMap, BTreeSet};

use tandem_devices::GuestMemoryMmap;
use tandem_replay::log::{Page, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

/// The shadow of the last verified state.
pub struct Shadow {
    /// Guest memory at E_v.
    memory: Vec<u8>,
    /// Pages carried by sync points since E_v: their latest content.
    carried: BTreeMap<u64, Vec<u8>>,
    /// Pages the replayer wrote since E_v.
    written: BTreeSet<u64>,
    /// A divergence waits for the next sync point.
    pub pending: Option<u64>,
}

impl Shadow {
    /// A shadow of `memory` as it is now (the VM's starting state).
    pub fn new(memory: &GuestMemoryMmap, size: u64) -> Result<Self, String> {
        let mut copy = vec![0u8; usize::try_from(size).map_err(|e| e.to_string())?];
        memory
            .read_slice(&mut copy, GuestAddress(0))
            .map_err(|e| format!("shadow copy: {e}"))?;
        Ok(Self {
            memory: copy,
            carried: BTreeMap::new(),
            written: BTreeSet::new(),
            pending: None,
        })
    }

    /// Notes pages the replayer wrote.
    pub fn wrote(&mut self, gfns: impl IntoIterator<Item = u64>) {
        self.written.extend(gfns);
    }

    /// Whether page `gfn` of `memory` holds what the recorder last had in
    /// it: the latest copy a sync point since E_v carried, else its content
    /// at E_v (for a page the recorder did not write since: a write of the
    /// value it already had). False where unknown.
    pub fn unchanged_since_verified(&self, memory: &GuestMemoryMmap, gfn: u64) -> bool {
        let at = (gfn * PAGE_SIZE as u64) as usize;
        let then = match self.carried.get(&gfn) {
            Some(data) => data.as_slice(),
            None => match self.memory.get(at..at + PAGE_SIZE) {
                Some(page) => page,
                None => return false,
            },
        };
        let mut now = vec![0u8; PAGE_SIZE];
        memory
            .read_slice(&mut now, GuestAddress(gfn * PAGE_SIZE as u64))
            .is_ok()
            && now == then
    }

    /// Notes the pages a sync point carried.
    pub fn carried(&mut self, pages: &[Page]) {
        for p in pages {
            self.carried.insert(p.gfn, p.data.clone());
        }
    }

    /// An epoch matched: memory now is the verified state E_v.
    pub fn verified(&mut self, memory: &GuestMemoryMmap, pages: impl IntoIterator<Item = u64>) {
        let touched: BTreeSet<u64> = pages
            .into_iter()
            .chain(self.written.iter().copied())
            .chain(self.carried.keys().copied())
            .collect();
        for gfn in touched {
            let at = (gfn * PAGE_SIZE as u64) as usize;
            if let Some(slot) = self.memory.get_mut(at..at + PAGE_SIZE) {
                if memory
                    .read_slice(slot, GuestAddress(gfn * PAGE_SIZE as u64))
                    .is_err()
                {
                    slot.fill(0);
                }
            }
        }
        self.carried.clear();
        self.written.clear();
    }

    /// Repairs memory before the sync point whose pages are `pages` is
    /// installed; returns the pages restored.
    pub fn repair(&mut self, memory: &GuestMemoryMmap, pages: &[Page]) -> Result<Vec<u64>, String> {
        self.carried(pages);
        let mut restored = Vec::new();
        for &gfn in &self.written {
            let addr = GuestAddress(gfn * PAGE_SIZE as u64);
            let at = (gfn * PAGE_SIZE as u64) as usize;
            let content = match self.carried.get(&gfn) {
                Some(data) => data.as_slice(),
                None => self
                    .memory
                    .get(at..at + PAGE_SIZE)
                    .ok_or_else(|| format!("page {gfn:#x} is outside the shadow"))?,
            };
            memory
                .write_slice(content, addr)
                .map_err(|e| format!("restoring page {gfn:#x}: {e}"))?;
            restored.push(gfn);
        }
        self.pending = None;
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_restores_shadow_and_carried_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        let mut shadow = Shadow::new(&mem, 1 << 16).unwrap();
        // The replay diverges: it writes pages 0 and 2.
        mem.write_obj(9u8, GuestAddress(0)).unwrap();
        mem.write_obj(9u8, GuestAddress(2 * 4096)).unwrap();
        shadow.wrote([0, 2]);
        // The next sync point carries page 2 (the recorder wrote it too).
        let carried = Page {
            gfn: 2,
            data: vec![7u8; 4096],
        };
        shadow.pending = Some(3);
        assert_eq!(shadow.repair(&mem, &[carried]).unwrap(), vec![0, 2]);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0)).unwrap(),
            1,
            "from the shadow"
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(2 * 4096)).unwrap(),
            7,
            "carried"
        );
        assert!(shadow.pending.is_none());
    }

    #[test]
    fn a_page_rewritten_with_what_the_recorder_last_had_is_unchanged() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        let mut shadow = Shadow::new(&mem, 1 << 16).unwrap();
        assert!(shadow.unchanged_since_verified(&mem, 0));
        mem.write_obj(2u8, GuestAddress(0)).unwrap();
        assert!(!shadow.unchanged_since_verified(&mem, 0));
        // A sync point carried page 0 with 2 in it: that is the recorder's.
        let mut data = vec![0u8; 4096];
        data[0] = 2;
        shadow.carried(&[Page { gfn: 0, data }]);
        assert!(shadow.unchanged_since_verified(&mem, 0));
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        assert!(
            !shadow.unchanged_since_verified(&mem, 0),
            "back to the E_v content, which the recorder no longer has"
        );
        assert!(!shadow.unchanged_since_verified(&mem, 1 << 20), "outside");
    }
}
