//! Rolling checkpoints for `on_guest_crash = "restart-checkpoint"`.
//!
//! A checkpoint is the vCPU and device state at a logged stop plus guest
//! memory as it was there. Memory is kept as one copy at the newest
//! checkpoint (the shadow) and, for each older one, the pages that changed
//! between it and the next, with their older content (an undo list): taking
//! a checkpoint copies only the pages the [`crate::dirty::DirtyTracker`]
//! says changed. Rolling back writes the shadow's content of every page
//! dirtied since the newest checkpoint, then walks undo lists back to an
//! older one if asked. Both sides of a pair take checkpoints at the same
//! stops (the primary logs `Check::Checkpoint`), so they roll back alike.
//!
//! The output gate holds every output produced after the newest checkpoint
//! (disk writes included), so a rollback to it never contradicts what the
//! world has seen; an older checkpoint is a valid target only while no
//! output produced after it has left (the gate says).

use std::collections::{BTreeMap, VecDeque};

use tandem_devices::GuestMemoryMmap;
use tandem_replay::log::{MachineState, Page};
use tandem_replay::Cause;
use vm_memory::{Bytes, GuestAddress};

use crate::dirty::PAGE_SIZE;

/// Checkpoints kept: the newest and two older ones to fall back to.
pub const CHECKPOINTS_KEPT: usize = 3;

/// One rollback target.
struct Checkpoint {
    stop: u64,
    guest_ns: u64,
    state: MachineState,
    /// The pages that changed between the previous checkpoint and this
    /// one, with their content at the previous one.
    undo: Vec<Page>,
    /// Inputs (network frames, console input) applied after this
    /// checkpoint and before the next: a live side delivers them again after
    /// rolling back here, so a rollback loses no input.
    inputs_after: Vec<Cause>,
}

/// What a rollback restores.
pub struct Rollback {
    /// The machine state at the checkpoint.
    pub state: MachineState,
    /// Guest time at the checkpoint.
    pub guest_ns: u64,
    /// Every page that changed since, with its content at the checkpoint.
    pub pages: Vec<Page>,
    /// Inputs applied since, in order.
    pub inputs: Vec<Cause>,
}

/// The checkpoints of one VM, newest last.
pub struct Checkpoints {
    interval_ns: u64,
    /// Guest memory at the newest checkpoint (empty: none taken yet).
    shadow: Vec<u8>,
    ring: VecDeque<Checkpoint>,
}

impl Checkpoints {
    /// Checkpoints taken every `interval_ns` of guest time.
    pub fn new(interval_ns: u64) -> Self {
        Self {
            interval_ns,
            shadow: Vec::new(),
            ring: VecDeque::new(),
        }
    }

    /// The interval between checkpoints, in guest nanoseconds.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// Guest time since the newest checkpoint (None: there is none).
    pub fn since_newest(&self, now_ns: u64) -> Option<u64> {
        self.ring.back().map(|c| now_ns.saturating_sub(c.guest_ns))
    }

    /// Guest time at which the next checkpoint is due (0: none taken yet).
    pub fn next_due_ns(&self) -> u64 {
        self.ring
            .back()
            .map_or(0, |c| c.guest_ns.saturating_add(self.interval_ns))
    }

    /// Whether a checkpoint is due at guest time `now_ns`.
    pub fn due(&self, now_ns: u64) -> bool {
        self.since_newest(now_ns)
            .is_none_or(|since| since >= self.interval_ns)
    }

    /// The stops of the checkpoints kept, newest first.
    pub fn stops_newest_first(&self) -> Vec<u64> {
        self.ring.iter().rev().map(|c| c.stop).collect()
    }

    /// Forgets every checkpoint (after a reboot, or when a secondary joins
    /// and cannot roll back to anything before its join); the next one
    /// copies all of memory.
    pub fn clear(&mut self) {
        self.ring.clear();
        self.shadow = Vec::new();
    }

    /// Takes a checkpoint at `stop`: `dirtied` are the pages written since
    /// the previous one (ignored for the first, which copies everything).
    /// Returns the pages copied.
    pub fn take(
        &mut self,
        memory: &GuestMemoryMmap,
        mem_size: u64,
        dirtied: Vec<u64>,
        stop: u64,
        guest_ns: u64,
        state: MachineState,
    ) -> Result<usize, String> {
        let page = PAGE_SIZE as usize;
        let mut undo = Vec::new();
        let copied;
        if self.shadow.is_empty() {
            let mut shadow = vec![0u8; usize::try_from(mem_size).map_err(|e| e.to_string())?];
            for (gfn, chunk) in shadow.chunks_mut(page).enumerate() {
                read_page(memory, gfn as u64, chunk)?;
            }
            self.shadow = shadow;
            self.ring.clear();
            copied = self.shadow.len() / page;
        } else {
            for gfn in &dirtied {
                let Some(slot) = self.page_mut(*gfn) else {
                    continue;
                };
                let before = slot.to_vec();
                read_page(memory, *gfn, slot)?;
                undo.push(Page {
                    gfn: *gfn,
                    data: before,
                });
            }
            copied = undo.len();
        }
        self.ring.push_back(Checkpoint {
            stop,
            guest_ns,
            state,
            undo,
            inputs_after: Vec::new(),
        });
        if self.ring.len() > CHECKPOINTS_KEPT {
            self.ring.pop_front();
            // The oldest kept cannot be undone further.
            if let Some(oldest) = self.ring.front_mut() {
                oldest.undo = Vec::new();
            }
        }
        Ok(copied)
    }

    /// Notes an input applied now (delivered again after a rollback).
    pub fn input_applied(&mut self, cause: &Cause) {
        if let Some(newest) = self.ring.back_mut() {
            newest.inputs_after.push(cause.clone());
        }
    }

    /// Rolls back to the checkpoint at stop `to`: `dirtied` are the pages
    /// written since the newest one. The checkpoints after `to` are
    /// dropped; `to` stays, the newest again.
    pub fn rollback(&mut self, dirtied: &[u64], to: u64) -> Result<Rollback, String> {
        let index = self
            .ring
            .iter()
            .position(|c| c.stop == to)
            .ok_or_else(|| format!("no checkpoint at stop {to} (have {:?})", self.stops()))?;
        // Inputs since `to`, in the order they were applied.
        let inputs: Vec<Cause> = self
            .ring
            .iter_mut()
            .skip(index)
            .flat_map(|c| std::mem::take(&mut c.inputs_after))
            .collect();
        let mut restore: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for gfn in dirtied {
            if let Some(slot) = self.page_mut(*gfn) {
                restore.insert(*gfn, slot.to_vec());
            }
        }
        // Newest first: each undo list holds the content one checkpoint
        // further back, so the last write of a page wins.
        while self.ring.len() > index + 1 {
            let Some(dropped) = self.ring.pop_back() else {
                break;
            };
            for page in dropped.undo {
                if let Some(slot) = self.page_mut(page.gfn) {
                    slot.copy_from_slice(&page.data);
                }
                restore.insert(page.gfn, page.data);
            }
        }
        let target = self
            .ring
            .back()
            .ok_or_else(|| "checkpoint vanished".to_string())?;
        Ok(Rollback {
            state: target.state.clone(),
            guest_ns: target.guest_ns,
            pages: restore
                .into_iter()
                .map(|(gfn, data)| Page { gfn, data })
                .collect(),
            inputs,
        })
    }

    fn stops(&self) -> Vec<u64> {
        self.ring.iter().map(|c| c.stop).collect()
    }

    fn page_mut(&mut self, gfn: u64) -> Option<&mut [u8]> {
        let page = PAGE_SIZE as usize;
        let start = usize::try_from(gfn).ok()?.checked_mul(page)?;
        self.shadow.get_mut(start..start.checked_add(page)?)
    }
}

fn read_page(memory: &GuestMemoryMmap, gfn: u64, into: &mut [u8]) -> Result<(), String> {
    memory
        .read_slice(into, GuestAddress(gfn * PAGE_SIZE))
        .map_err(|e| format!("page {gfn:#x}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: u64 = 8;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)]).unwrap()
    }

    fn fill(mem: &GuestMemoryMmap, gfn: u64, byte: u8) {
        mem.write_slice(&[byte; PAGE_SIZE as usize], GuestAddress(gfn * PAGE_SIZE))
            .unwrap();
    }

    fn state(tag: u8) -> MachineState {
        MachineState {
            devices: vec![("tag".into(), vec![tag])],
            ..Default::default()
        }
    }

    fn net(n: u8) -> Cause {
        Cause::NetRx {
            device: 0,
            frame: vec![n],
        }
    }

    /// Writes a rollback's pages back, as the vCPU does.
    fn apply(mem: &GuestMemoryMmap, back: &Rollback) {
        for p in &back.pages {
            mem.write_slice(&p.data, GuestAddress(p.gfn * PAGE_SIZE))
                .unwrap();
        }
    }

    fn byte(mem: &GuestMemoryMmap, gfn: u64) -> u8 {
        mem.read_obj(GuestAddress(gfn * PAGE_SIZE)).unwrap()
    }

    #[test]
    fn rolls_memory_state_and_inputs_back_to_any_checkpoint_kept() {
        let mem = memory();
        let size = PAGES * PAGE_SIZE;
        let mut c = Checkpoints::new(20_000_000);
        assert!(c.due(0));
        fill(&mem, 1, 0xa1);
        assert_eq!(
            c.take(&mem, size, vec![], 10, 0, state(1)).unwrap(),
            PAGES as usize
        );
        c.input_applied(&net(1));
        fill(&mem, 1, 0xb1);
        fill(&mem, 2, 0xb2);
        assert!(!c.due(19_000_000));
        assert!(c.due(20_000_000));
        assert_eq!(
            c.take(&mem, size, vec![1, 2], 20, 20_000_000, state(2))
                .unwrap(),
            2
        );
        c.input_applied(&net(2));
        fill(&mem, 2, 0xc2);
        fill(&mem, 3, 0xc3);
        c.take(&mem, size, vec![2, 3], 30, 40_000_000, state(3))
            .unwrap();
        c.input_applied(&net(3));
        // Written after the newest checkpoint.
        fill(&mem, 1, 0xd1);
        assert_eq!(c.stops_newest_first(), vec![30, 20, 10]);

        // Back to the newest: only what changed since.
        let back = c.rollback(&[1], 30).unwrap();
        apply(&mem, &back);
        assert_eq!(back.state, state(3));
        assert_eq!(back.inputs, vec![net(3)]);
        assert_eq!(
            (byte(&mem, 1), byte(&mem, 2), byte(&mem, 3)),
            (0xb1, 0xc2, 0xc3)
        );

        // Two further back: pages as at stop 10, inputs since in order.
        fill(&mem, 4, 0xe4);
        c.input_applied(&net(4));
        let back = c.rollback(&[4], 10).unwrap();
        apply(&mem, &back);
        assert_eq!(back.state, state(1));
        assert_eq!(back.guest_ns, 0);
        assert_eq!(back.inputs, vec![net(1), net(2), net(4)]);
        assert_eq!(
            (byte(&mem, 1), byte(&mem, 2), byte(&mem, 3), byte(&mem, 4)),
            (0xa1, 0, 0, 0)
        );
        assert_eq!(c.stops_newest_first(), vec![10]);
        assert!(c.rollback(&[], 30).is_err(), "dropped by the rollback");
    }

    #[test]
    fn keeps_three_and_the_oldest_cannot_be_undone_past() {
        let mem = memory();
        let size = PAGES * PAGE_SIZE;
        let mut c = Checkpoints::new(1);
        for (i, stop) in [10, 20, 30, 40].into_iter().enumerate() {
            fill(&mem, 5, i as u8 + 1);
            c.take(&mem, size, vec![5], stop, stop, state(i as u8))
                .unwrap();
        }
        assert_eq!(c.stops_newest_first(), vec![40, 30, 20]);
        fill(&mem, 5, 9);
        let back = c.rollback(&[5], 20).unwrap();
        apply(&mem, &back);
        assert_eq!(byte(&mem, 5), 2, "as at stop 20");
        c.clear();
        assert!(c.stops_newest_first().is_empty());
        assert!(c.due(0));
    }
}
