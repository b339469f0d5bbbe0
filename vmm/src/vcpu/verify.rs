//! Verified lockstep: epoch ends (state hashes and a memory scrub) logged
//! by the recorder and checked by the replay, and repair of divergences.

use super::*;

/// The time to the next epoch end is at least this many times what the
/// last one cost: epoch ends take at most a tenth of the vCPU's time.
const EPOCH_COST_SHARE: u32 = 9;

/// However slow an epoch end was, the next one is at most this far off.
const EPOCH_GAP_MAX: Duration = Duration::from_secs(1);

impl Vcpu {
    /// 1 + the last epoch the replay found diverged (0: none yet).
    pub fn divergence_epoch(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.divergence_epoch.clone()
    }

    /// The stop of the last epoch the replay verified.
    pub fn verified_stop(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.verified_stop.clone()
    }

    /// Keeps a shadow of the verified state so divergences can be repaired.
    pub fn enable_repair(&mut self, size: u64) -> Result<(), VcpuError> {
        self.shadow = Some(Shadow::new(&self.sync.memory, size).map_err(VcpuError::Memory)?);
        Ok(())
    }

    /// An epoch diverged and no sync point came after it to repair from.
    pub fn unrepaired(&self) -> Option<u64> {
        self.shadow.as_ref().and_then(|s| s.pending)
    }

    /// (c) At a deterministic stop: end an epoch when the recorder's timer
    /// fired, or check the one the log holds for this stop.
    pub(super) fn maybe_end_epoch(&mut self) -> Result<(), VcpuError> {
        if self.journal.recording() {
            let now = Instant::now();
            let due = *self
                .epochs
                .deadline
                .get_or_insert(now + self.policy.epoch_interval);
            let min_gap = self.epochs.min_gap.max(Duration::from_millis(1));
            // Held output shortens the epoch, at most to a millisecond,
            // where it waits for a verified epoch (replayed commit): released
            // on acks, or at a repair's sync point, it gains nothing, and
            // each epoch end costs the secondary a check (a Linux pair
            // ended an epoch every 2.3 stops and ran 100 times slower).
            let shortened = self
                .output_awaits_verification
                .load(std::sync::atomic::Ordering::Acquire)
                && self.devices.outputs.pending()
                && self.epochs.last_end.is_none_or(|t| now - t >= min_gap);
            if now >= due || shortened {
                self.epochs.last_end = Some(now);
                self.record_epoch_end()?;
                // An epoch end costs both sides a harvest and hashes: where
                // that is slow (a Linux guest's 17 ms each in the harness's
                // emulated L1, three quarters of both vCPUs' time), the
                // epochs stretch so their ends take at most a tenth of it.
                let cost = now.elapsed();
                self.epochs.min_gap = (cost * EPOCH_COST_SHARE).min(EPOCH_GAP_MAX);
                self.epochs.deadline =
                    Some(Instant::now() + self.policy.epoch_interval.max(self.epochs.min_gap));
            }
            return Ok(());
        }
        let stop = self.stop;
        if let Some(recorded) = self.journal.replayer().and_then(|r| r.take_epoch_end(stop)) {
            self.verify_epoch_end(recorded)?;
        }
        Ok(())
    }

    /// The canonical state's ingredients, after completing the pending exit.
    pub(super) fn epoch_inputs(&mut self) -> Result<EpochInputs, VcpuError> {
        self.complete_pending_exit()?;
        let vcpu = state::capture(&self.fd, &self.sync.msrs, false)?;
        let devices = self.devices.capture();
        self.sync.harvest()?;
        let sync = &mut self.sync;
        let dirtied = sync.tracker.take(sync.epoch_consumer);
        Ok((vcpu, devices, dirtied))
    }

    pub(super) fn mem_pages(&self) -> u64 {
        crate::epoch::memory_pages(&self.sync.memory)
    }

    pub(super) fn record_epoch_end(&mut self) -> Result<(), VcpuError> {
        let _timer = super::PhaseTimer::start(&self.live_counters, super::Phase::EpochEnds);
        let (vcpu, devices, dirtied) = self.epoch_inputs()?;
        let epoch = self.epochs.number;
        self.dump_epoch(epoch, &vcpu, &devices, &dirtied);
        let hashes = hash_state(
            &vcpu,
            &devices,
            &self.sync.memory,
            &dirtied,
            epoch,
            self.mem_pages(),
        );
        self.journal.epoch_end(Record::EpochEnd {
            epoch,
            stop: self.stop,
            pages: encode_runs(&dirtied),
            hashes: hashes.components,
            scrub: hashes.scrub,
        });
        self.epochs.number += 1;
        self.stats.epochs += 1;
        self.live_counters
            .epochs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn verify_epoch_end(&mut self, recorded: RecordedEpoch) -> Result<(), VcpuError> {
        let _timer = super::PhaseTimer::start(&self.live_counters, super::Phase::EpochEnds);
        if self.positions.epoch_flip_at == Some(self.stats.epochs + 1) {
            let last = GuestAddress((self.mem_pages() - 1) * PAGE_SIZE as u64);
            let byte: u8 = self.sync.memory.read_obj(last).unwrap_or(0);
            let _ = self.sync.memory.write_obj(!byte, last);
        }
        let (vcpu, devices, own) = self.epoch_inputs()?;
        let mem_pages = self.mem_pages();
        let listed = decode_runs(&recorded.pages, mem_pages);
        if self.epoch_dump.is_some() {
            let mut written = own.clone();
            written.extend(&listed);
            written.extend(self.epochs.installed.iter().copied());
            self.dump_epoch(recorded.epoch, &vcpu, &devices, &written);
        }
        let ours = hash_state(
            &vcpu,
            &devices,
            &self.sync.memory,
            &listed,
            recorded.epoch,
            mem_pages,
        );
        let mut diffs = differences(&recorded.hashes, &recorded.scrub, &ours);
        let listed_set: BTreeSet<u64> = listed.iter().copied().collect();
        // A page the replay wrote but the recording did not is a divergence
        // only if its content changed: with the shadow of the previous
        // epoch end (no divergence pending), a write of the value the page
        // already held (seen in Linux guests) is told apart.
        let same_value = |g: &u64| {
            self.shadow.as_ref().is_some_and(|s| {
                s.pending.is_none() && s.unchanged_since_verified(&self.sync.memory, *g)
            })
        };
        let extra: Vec<u64> = own
            .iter()
            .copied()
            .filter(|g| !listed_set.contains(g) && !self.epochs.installed.contains(g))
            .filter(|g| !same_value(g))
            .collect();
        if !extra.is_empty() {
            diffs.push(format!(
                "{} pages dirtied by the replay but not the recording (first {:#x})",
                extra.len(),
                extra[0]
            ));
        }
        self.stats.epochs += 1;
        self.live_counters
            .epochs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.epochs.number = recorded.epoch + 1;
        if let Some(shadow) = self.shadow.as_mut() {
            shadow.wrote(own.iter().copied());
        }
        if diffs.is_empty() {
            self.verified_stop
                .fetch_max(self.stop, std::sync::atomic::Ordering::AcqRel);
            if self.epochs.had_sync {
                self.stats.epochs_transferred += 1;
                self.live_counters
                    .epochs_transferred
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                self.stats.epochs_verified += 1;
                self.live_counters
                    .epochs_verified
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(shadow) = self.shadow.as_mut() {
                if shadow.pending.is_none() {
                    let installed = self.epochs.installed.iter().copied();
                    shadow.verified(&self.sync.memory, listed.iter().copied().chain(installed));
                }
            }
        } else {
            tracing::warn!(
                "divergence at epoch {} (stop {}): {} differ",
                recorded.epoch,
                self.stop,
                diffs.join(", ")
            );
            self.divergence_found(DivergenceReport {
                epoch: recorded.epoch,
                stop: self.stop,
                components: diffs,
                recorded: recorded.hashes.clone(),
                replayed: ours.components.clone(),
            });
        }
        self.epochs.installed.clear();
        self.epochs.had_sync = false;
        Ok(())
    }

    /// `TANDEM_DEBUG_EPOCHS`: this epoch end's state, as text.
    fn dump_epoch(
        &mut self,
        epoch: u64,
        vcpu: &tandem_replay::log::VcpuState,
        devices: &[(String, Vec<u8>)],
        written: &[u64],
    ) {
        if let Some(dump) = self.epoch_dump.as_mut() {
            dump.epoch(epoch, self.stop, vcpu, devices, &self.sync.memory, written);
        }
    }

    /// A divergence found at `stop` itself (a landing, a landed sync point)
    /// rather than at an epoch end: reported, with what happens `next`.
    pub(super) fn diverged_at_stop(&mut self, stop: u64, what: String, next: &str) {
        let epoch = self.epochs.number;
        tracing::warn!("divergence at epoch {epoch} (stop {stop}): {what}; {next}");
        self.divergence_found(DivergenceReport {
            epoch,
            stop,
            components: vec![what],
            recorded: Vec::new(),
            replayed: Vec::new(),
        });
    }

    /// A divergence found in `report.epoch`: kept for the repair (the
    /// shadow waits for a sync point), counted, published for a live
    /// secondary's repair request, and reported.
    pub(super) fn divergence_found(&mut self, report: DivergenceReport) {
        if let Some(shadow) = self.shadow.as_mut() {
            shadow.pending.get_or_insert(report.epoch);
            self.unrepaired += 1;
        }
        self.stats.divergences += 1;
        self.live_counters
            .divergences
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.divergence_epoch
            .store(report.epoch + 1, std::sync::atomic::Ordering::Release);
        self.divergence_reports.push(report);
    }
}
