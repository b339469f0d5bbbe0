//! Sync points: the complete machine state and the pages dirtied since
//! the last one, logged by the recorder and installed by the replay, and
//! the memory a joining secondary starts from.

use super::*;

impl Vcpu {
    /// Logs the complete machine state and the pages dirtied since the last
    /// sync point (DESIGN point 6).
    pub(super) fn record_sync_point(
        &mut self,
        halted: bool,
        reason: SyncReason,
    ) -> Result<(), VcpuError> {
        let _timer = super::PhaseTimer::start(&self.live_counters, super::Phase::SyncPoints);
        let began = Instant::now();
        self.serve_precopy()?;
        let vcpu = state::capture(&self.fd, &self.sync.msrs, halted)?;
        let devices = self.devices.capture();
        self.sync.harvest()?;
        let sync = &mut self.sync;
        let mut gfns = sync.tracker.take(sync.consumer);
        // A new secondary joining a running primary needs all of memory: all
        // of it, or (after pre-copy rounds) what changed since the last.
        let full = self
            .full_sync
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        let delta = full && self.precopy.take_final_delta();
        if delta {
            gfns.extend(sync.tracker.take(sync.precopy_consumer));
            gfns.sort_unstable();
            gfns.dedup();
        } else if full {
            gfns = all_gfns(&sync.memory);
        }
        let mut pages = Vec::new();
        for gfn in gfns {
            let mut data = vec![0u8; PAGE_SIZE];
            sync.memory
                .read_slice(&mut data, GuestAddress(gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {gfn:#x}: {e}")))?;
            // A full sync point leaves out zero pages: the joiner starts
            // from zeroed memory (a delta keeps them: they were not zero).
            if full && !delta && data.iter().all(|&b| b == 0) {
                continue;
            }
            pages.push(Page { gfn, data });
        }
        self.stats.sync_points += 1;
        self.live_counters
            .sync_points
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A full sync point asked for at an ordinary kick stop counts as full.
        let reason = if full { SyncReason::Full } else { reason };
        self.live_counters.sync_by_reason[reason as usize]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.sync_pages += pages.len() as u64;
        // Host time, not guest time: the guest clock moves only when a
        // stop applies a time cause, which this stop has not done yet (a
        // sync point at guest time 0 would leave the interval passed).
        self.last_sync_ns = self.since_start_ns();
        if full {
            // The joiner has no checkpoint before this one: neither side
            // may roll back past it.
            if let Some(checkpoints) = self.checkpoints.as_mut() {
                checkpoints.clear();
                self.rollback_times.clear();
            }
            self.full_sync_stop
                .store(self.stop, std::sync::atomic::Ordering::Release);
            // Output from here on waits for the new secondary again.
            self.devices.outputs.protect_from(self.stop);
            tracing::warn!(
                "full sync point at stop {} ({} pages{}) for a joining secondary; guest paused {} ms",
                self.stop,
                pages.len(),
                if delta { " changed since pre-copy" } else { "" },
                began.elapsed().as_millis()
            );
        }
        self.journal
            .sync_point(self.stop, MachineState { vcpu, devices }, pages);
        Ok(())
    }

    /// Answers a pre-copy round asked for by the replication side: the
    /// pages to send (all of them for round 0; then those written since).
    pub(super) fn serve_precopy(&mut self) -> Result<(), VcpuError> {
        let Some(all) = self.precopy.requested() else {
            return Ok(());
        };
        self.sync.harvest()?;
        let sync = &mut self.sync;
        let dirtied = sync.tracker.take(sync.precopy_consumer);
        self.precopy
            .deliver(if all { all_gfns(&sync.memory) } else { dirtied });
        Ok(())
    }

    /// Joining: writes the pre-copied memory (after zeroing, before the
    /// full sync point's pages).
    pub(super) fn install_base_pages(&mut self) -> Result<(), VcpuError> {
        for page in std::mem::take(&mut self.base_pages) {
            self.sync
                .memory
                .write_slice(&page.data, GuestAddress(page.gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("pre-copied page {:#x}: {e}", page.gfn)))?;
        }
        Ok(())
    }

    /// The pre-copy port of this (recording) vCPU, and a reader of guest
    /// memory for the thread that copies it.
    pub fn precopy(
        &self,
    ) -> (
        Arc<crate::precopy::PrecopyPort>,
        crate::precopy::MemoryReader,
    ) {
        (
            self.precopy.clone(),
            crate::precopy::MemoryReader::new(self.sync.memory.clone()),
        )
    }

    /// Joining: memory the primary pre-copied, installed at the join.
    pub fn set_base_pages(&mut self, pages: Vec<Page>) {
        self.base_pages = pages;
    }

    /// Zeroes all guest memory (before installing a full sync point).
    pub(super) fn zero_memory(&mut self) -> Result<(), VcpuError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let zero = vec![0u8; 1 << 20];
        for region in self.sync.memory.iter() {
            let (start, len) = (region.start_addr().0, region.len());
            let mut at = 0;
            while at < len {
                let n = (len - at).min(zero.len() as u64) as usize;
                self.sync
                    .memory
                    .write_slice(&zero[..n], GuestAddress(start + at))
                    .map_err(|e| VcpuError::Memory(format!("zeroing: {e}")))?;
                at += n as u64;
            }
        }
        Ok(())
    }

    /// Ask for a full sync point (all of memory) at the next kick (or now,
    /// if the guest is halted: wake it with the cause queue).
    pub fn full_sync_handles(
        &self,
    ) -> (
        Arc<std::sync::atomic::AtomicBool>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        (self.full_sync.clone(), self.full_sync_stop.clone())
    }

    /// Replaying, at a sync point the landing reached with RIP and digest
    /// as recorded and no divergence waiting for repair: whether the
    /// replay's own state there is the recorded one (the vCPU parts the
    /// epoch hashes cover, every device, and each page the sync point
    /// carries; not xsave, xcrs or debug registers, which the epoch hashes
    /// leave out too). If so nothing is installed, the shadow takes the
    /// pages as the recorded ones, and the epoch stays verified by
    /// execution; if not, that is a divergence at this stop, repaired by
    /// installing it (false).
    pub(super) fn sync_point_verified(
        &mut self,
        stop: u64,
        state: &MachineState,
        pages: &[Page],
    ) -> Result<bool, VcpuError> {
        self.positions.sync_compares += 1;
        if self.positions.flip_at == Some(self.positions.sync_compares) {
            if let Some(page) = pages.first() {
                let at = GuestAddress(page.gfn * PAGE_SIZE as u64);
                let byte: u8 = self.sync.memory.read_obj(at).unwrap_or(0);
                let _ = self.sync.memory.write_obj(!byte, at);
            }
        }
        let ours = state::capture(&self.fd, &self.sync.msrs, state.vcpu.halted)?;
        let theirs = &state.vcpu;
        let mut diffs: Vec<String> = [
            ("vcpu.regs", ours.regs == theirs.regs),
            ("vcpu.sregs", ours.sregs == theirs.sregs),
            ("vcpu.fpu", ours.fpu == theirs.fpu),
            (
                "vcpu.events",
                state::canonical_events_bytes(&ours.events)
                    == state::canonical_events_bytes(&theirs.events),
            ),
            ("vcpu.msrs", ours.msrs == theirs.msrs),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name.to_string())
        .collect();
        let devices = self.devices.capture();
        if devices.len() != state.devices.len() {
            diffs.push("the device list".into());
        }
        for ((name, a), (_, b)) in devices.iter().zip(&state.devices) {
            if a != b {
                diffs.push(format!("dev.{name}"));
            }
        }
        let mut data = vec![0u8; PAGE_SIZE];
        let mut differing = pages.iter().filter_map(|page| {
            let read = self
                .sync
                .memory
                .read_slice(&mut data, GuestAddress(page.gfn * PAGE_SIZE as u64));
            (read.is_err() || data != page.data).then_some(page.gfn)
        });
        if let Some(first) = differing.next() {
            let n = 1 + differing.count();
            diffs.push(format!("{n} pages of the sync point (first {first:#x})"));
        }
        if diffs.is_empty() {
            // As an install would: a later repair restores these pages
            // from the shadow, and the next sync point may not carry them.
            if let Some(shadow) = self.shadow.as_mut() {
                shadow.carried(pages);
            }
            self.stats.sync_points_landed += 1;
            return Ok(true);
        }
        let what = format!(
            "at the sync point of stop {stop}: {} differ",
            diffs.join(", ")
        );
        self.diverged_at_stop(stop, what, "repaired by installing it");
        Ok(false)
    }

    /// Replaying, the sync point the recorder took while its guest slept in
    /// HLT at this stop (a repair it was asked for then): compared where
    /// the replay sleeps at the same HLT with nothing to repair, else
    /// installed. The guest sleeps on either way.
    pub(super) fn sync_point_at_halt(
        &mut self,
        state: &MachineState,
        pages: &[Page],
    ) -> Result<(), VcpuError> {
        let stop = self.stop;
        let compare = !self.lost() && self.unrepaired().is_none();
        self.found();
        self.complete_pending_exit()?;
        if compare && self.sync_point_verified(stop, state, pages)? {
            return Ok(());
        }
        self.install_sync_point(state, pages)
    }

    /// Installs a recorded sync point instead of executing the stretch it
    /// covers.
    pub(super) fn install_sync_point(
        &mut self,
        state: &MachineState,
        pages: &[Page],
    ) -> Result<(), VcpuError> {
        let _timer = super::PhaseTimer::start(&self.live_counters, super::Phase::SyncPoints);
        let mut repaired = false;
        if let Some(shadow) = self.shadow.as_mut() {
            if shadow.pending.is_some() {
                repaired = true;
                self.sync.harvest()?;
                let sync = &mut self.sync;
                shadow.wrote(sync.tracker.take(sync.repair_consumer));
                let restored = shadow
                    .repair(&sync.memory, pages)
                    .map_err(VcpuError::Memory)?;
                // These writes are the repair's, not the replay's own.
                self.epochs.installed.extend(restored.iter().copied());
                let restored = restored.len();
                self.stats.repaired += std::mem::take(&mut self.unrepaired);
                tracing::warn!(
                    "repaired at the sync point of stop {}: {restored} pages restored from the last verified state",
                    self.stop
                );
            } else {
                shadow.carried(pages);
            }
        }
        for page in pages {
            self.sync
                .memory
                .write_slice(&page.data, GuestAddress(page.gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {:#x}: {e}", page.gfn)))?;
        }
        // Repaired, memory is the recorder's at this sync point: the shadow
        // starts again from here, so the next repair restores only what
        // the replay writes from now on (a guest that never verifies an
        // epoch, as Linux with its RDTSC, made every repair restore all it
        // had written since the start).
        if repaired {
            if let Some(shadow) = self.shadow.as_mut() {
                shadow.verified(&self.sync.memory, std::iter::empty());
            }
            // The repair's and the install's own writes are in the VMM's
            // write bitmap: part of this state, not the replay's writes
            // (kept, they were restored again at every later repair: 24671
            // pages each time for the Linux guest).
            self.sync.harvest()?;
            let sync = &mut self.sync;
            sync.tracker.take(sync.repair_consumer);
            // Installed, this side holds the recorder's state: as good as a
            // verified epoch end for the output the primary holds. (The
            // stop before the sync point's: a caller that installs for stop
            // `next` has not moved to it yet.) A guest that diverges again
            // before every epoch end (Linux: RDTSC) released nothing else.
            self.verified_stop
                .fetch_max(self.stop, std::sync::atomic::Ordering::AcqRel);
        }
        state::install(&self.fd, &state.vcpu, &self.sync.msrs)?;
        self.devices.install(&state.devices)?;
        self.epochs.installed.extend(pages.iter().map(|p| p.gfn));
        self.epochs.had_sync = true;
        self.stats.sync_points += 1;
        self.live_counters
            .sync_points
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.sync_pages += pages.len() as u64;
        Ok(())
    }
}
