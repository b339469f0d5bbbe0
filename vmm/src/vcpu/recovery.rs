//! Guest crashes: the boot state, reboots, rolling checkpoints and
//! rollbacks (`on_guest_crash`), decided live and logged, repeated by a
//! replay.

use super::*;

impl Vcpu {
    /// A hang: the guest watchdog expired at this stop.
    pub(super) fn watchdog_crash(&mut self) -> Option<GuestCrash> {
        self.devices
            .watchdog_expired()
            .then(|| GuestCrash::WatchdogExpired { rip: self.rip() })
    }

    /// The machine as built: vCPU, devices and every non-zero page.
    pub(super) fn capture_boot(&mut self) -> Result<(MachineState, Vec<Page>), VcpuError> {
        let vcpu = state::capture(&self.fd, &self.sync.msrs, false)?;
        let devices = self.devices.capture();
        let mut pages = Vec::new();
        for gfn in all_gfns(&self.sync.memory) {
            let mut data = vec![0u8; PAGE_SIZE];
            self.sync
                .memory
                .read_slice(&mut data, GuestAddress(gfn * PAGE_SIZE as u64))
                .map_err(|e| VcpuError::Memory(format!("page {gfn:#x}: {e}")))?;
            if data.iter().any(|&b| b != 0) {
                pages.push(Page { gfn, data });
            }
        }
        Ok((MachineState { vcpu, devices }, pages))
    }

    /// The guest crashed at the current stop: recover (true: reboot or roll
    /// back) or end the run (false). Live, the policy decides and the log
    /// says so; a replay does what the recording did.
    pub(super) fn recover(&mut self, crash: &GuestCrash) -> Result<bool, VcpuError> {
        let now = self.ctx.clock.now_ns();
        let logged = match self.journal.replayer() {
            Some(rep) => rep.recovery_logged(self.stop),
            None => None,
        };
        let recovery = match logged {
            Some(Some(Check::GuestRollback {
                to, timer_delay_ns, ..
            })) => Recovery::Rollback { to, timer_delay_ns },
            Some(Some(_)) => Recovery::Reboot,
            Some(None) => Recovery::Halt,
            None => {
                if self.journal.replayer_ref().is_some() {
                    // The primary is gone before saying: decide here, live.
                    self.go_live()?;
                }
                let recovery = self.decide_recovery(now);
                let check = match recovery {
                    Recovery::Halt => None,
                    Recovery::Reboot => Some(Check::GuestReboot {
                        crash: crash.to_string(),
                    }),
                    Recovery::Rollback { to, timer_delay_ns } => Some(Check::GuestRollback {
                        crash: crash.to_string(),
                        to,
                        timer_delay_ns,
                    }),
                };
                if let Some(check) = check {
                    self.journal.check(self.stop, check)?;
                }
                recovery
            }
        };
        match recovery {
            Recovery::Halt => Ok(false),
            Recovery::Reboot => self.reboot(crash, now),
            Recovery::Rollback { to, timer_delay_ns } => {
                self.rollback(crash, now, to, timer_delay_ns)
            }
        }
    }

    /// The live side's choice after a crash at guest time `now`.
    pub(super) fn decide_recovery(&mut self, now: u64) -> Recovery {
        if let (CrashPolicy::RestartCheckpoint { .. }, Some(checkpoints)) =
            (self.crash_policy, self.checkpoints.as_ref())
        {
            // A crash soon after a rollback goes one checkpoint further back.
            let recent = self
                .rollback_times
                .iter()
                .filter(|&&t| now.saturating_sub(t) < ROLLBACK_WINDOW_NS)
                .count();
            let interval = checkpoints.interval_ns().max(1);
            match checkpoints.stops_newest_first().get(recent) {
                Some(&to) if self.devices.outputs.discard_after(to) => {
                    // The perturbation: the timer's next interrupt comes
                    // two to four intervals late.
                    let random = std::hash::BuildHasher::hash_one(
                        &std::collections::hash_map::RandomState::new(),
                        self.stop,
                    );
                    let timer_delay_ns = 2 * interval + random % (2 * interval);
                    return Recovery::Rollback { to, timer_delay_ns };
                }
                Some(&to) => tracing::warn!(
                    "guest crashed again: its checkpoint at stop {to} is older than output already released, so it is no rollback target; rebooting instead"
                ),
                None if recent > 0 => tracing::warn!(
                    "guest crashed {} times within {} s of guest time: no older checkpoint to return to; rebooting instead",
                    recent + 1,
                    ROLLBACK_WINDOW_NS / 1_000_000_000
                ),
                None => tracing::warn!("guest crashed before its first checkpoint: rebooting instead"),
            }
        }
        let recent = self
            .crash_times
            .iter()
            .filter(|&&t| now.saturating_sub(t) < REBOOT_WINDOW_NS)
            .count();
        let reboots = self.crash_policy.reboots();
        if reboots && recent >= REBOOT_LIMIT {
            tracing::warn!(
                "guest crashed {} times within {} s of guest time: not rebooting again",
                recent + 1,
                REBOOT_WINDOW_NS / 1_000_000_000
            );
            return Recovery::Halt;
        }
        if reboots {
            Recovery::Reboot
        } else {
            Recovery::Halt
        }
    }

    /// Reboots the crashed guest from its boot state.
    pub(super) fn reboot(&mut self, crash: &GuestCrash, now: u64) -> Result<bool, VcpuError> {
        let Some((state, boot_pages)) = self.boot.clone() else {
            return Ok(false);
        };
        self.crash_times.push(now);
        self.irq_waiting_since = None;
        self.guest_crashes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live_counters
            .guest_reboots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            "guest crash at stop {} ({crash}): rebooting the guest from its boot state",
            self.stop
        );
        // Output held for a checkpoint came from the state the reboot
        // discards (and a disk write issued after the reboot could land
        // under the new guest's reads): it never leaves.
        if let Some(checkpoints) = self.checkpoints.as_mut() {
            if let Some(&newest) = checkpoints.stops_newest_first().first() {
                let _ = self.devices.outputs.discard_after(newest);
            }
            checkpoints.clear();
            self.rollback_times.clear();
        }
        // Every page: the boot image's, zeros elsewhere.
        let mut pages = Vec::new();
        let mut boot = boot_pages.into_iter().peekable();
        for gfn in all_gfns(&self.sync.memory) {
            match boot.peek() {
                Some(p) if p.gfn == gfn => pages.extend(boot.next()),
                _ => pages.push(Page {
                    gfn,
                    data: vec![0u8; PAGE_SIZE],
                }),
            }
        }
        // KVM finishes the crashing exit (a port write) first.
        self.exit_pending = true;
        self.complete_pending_exit()?;
        self.install_sync_point(&state, &pages)?;
        self.resume_halted = false;
        // Both sides rebooted alike: the next sync point need not carry the
        // pages the reboot rewrote (all of memory).
        self.forget_own_writes()?;
        self.request_window(false);
        Ok(true)
    }

    /// Rolls the crashed guest back to its checkpoint at stop `to`, with its
    /// timer interrupt delayed by `timer_delay_ns`.
    pub(super) fn rollback(
        &mut self,
        crash: &GuestCrash,
        now: u64,
        to: u64,
        timer_delay_ns: u64,
    ) -> Result<bool, VcpuError> {
        self.irq_waiting_since = None;
        // KVM finishes the crashing exit first.
        self.exit_pending = true;
        self.complete_pending_exit()?;
        let next_ids = self.devices.block_next_ids();
        self.sync.harvest()?;
        let sync = &mut self.sync;
        let dirtied = sync.tracker.take(sync.checkpoint_consumer);
        let stop = self.stop;
        let back = self
            .checkpoints
            .as_mut()
            .ok_or_else(|| "this side took no checkpoints".to_string())
            .and_then(|c| c.rollback(&dirtied, to))
            .map_err(|e| {
                VcpuError::Journal(JournalError::Diverged {
                    stop,
                    what: format!("cannot roll back to the checkpoint at stop {to}: {e}"),
                })
            })?;
        // Output produced since never happened (the live side dropped it
        // when it chose the target; a follower drops its buffered copy).
        let _ = self.devices.outputs.discard_after(to);
        self.install_sync_point(&back.state, &back.pages)?;
        self.forget_own_writes()?;
        let absent_ns = now.saturating_sub(back.guest_ns);
        self.devices.resume_after_rollback(
            &next_ids,
            absent_ns,
            now.saturating_add(timer_delay_ns),
        );
        // Live: requests in flight at the checkpoint are issued again (their
        // first completion may have been rolled back), and the inputs since
        // are delivered again. A replay gets both from the log.
        let live = self.journal.replayer_ref().is_none();
        let reissued = if live {
            self.devices.reissue_unfinished()
        } else {
            0
        };
        let inputs = back.inputs.len();
        self.journal.requeue(back.inputs);
        self.rollback_times.push(now);
        self.guest_crashes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live_counters
            .guest_rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.rollbacks += 1;
        tracing::warn!(
            "guest crash at stop {stop} ({crash}): rolled back to the checkpoint at stop {to} ({} ms of guest time earlier, {} pages restored); timer interrupt delayed {} ms{}",
            absent_ns / 1_000_000,
            back.pages.len(),
            timer_delay_ns / 1_000_000,
            if live {
                format!("; {inputs} inputs delivered again, {reissued} disk requests issued again")
            } else {
                String::new()
            }
        );
        self.resume_halted = back.state.vcpu.halted;
        self.request_window(false);
        Ok(true)
    }

    /// After a reboot or rollback, which both sides do alike: the pages it
    /// wrote are no news to the next sync point or checkpoint.
    pub(super) fn forget_own_writes(&mut self) -> Result<(), VcpuError> {
        self.sync.harvest()?;
        let sync = &mut self.sync;
        let _ = sync.tracker.take(sync.consumer);
        let _ = sync.tracker.take(sync.checkpoint_consumer);
        Ok(())
    }

    /// Takes a checkpoint here if one is due (live) or the log has one
    /// (replay). `halted`: the guest sleeps in HLT at this stop.
    pub(super) fn maybe_checkpoint(&mut self, halted: bool) -> Result<(), VcpuError> {
        let stop = self.stop;
        let now = self.ctx.clock.now_ns();
        let take = match self.journal.replayer() {
            Some(rep) => rep.take_checkpoint(stop),
            None => {
                let Some(checkpoints) = self.checkpoints.as_ref() else {
                    return Ok(());
                };
                // Held output takes one early, so a reply waits a little,
                // not a whole interval.
                // A guest going to sleep takes one at once: nothing else
                // may come to release its output.
                let due = checkpoints.due(now)
                    || (self.devices.outputs.pending()
                        && (halted
                            || checkpoints
                                .since_newest(now)
                                .is_some_and(|since| since >= CHECKPOINT_MIN_GAP_NS)));
                if due {
                    self.journal.check(stop, Check::Checkpoint)?;
                }
                due
            }
        };
        if !take {
            return Ok(());
        }
        let began = Instant::now();
        self.complete_pending_exit()?;
        let vcpu = state::capture(&self.fd, &self.sync.msrs, halted)?;
        let devices = self.devices.capture();
        let mem_size = self.mem_pages() * PAGE_SIZE as u64;
        self.sync.harvest()?;
        let sync = &mut self.sync;
        let dirtied = sync.tracker.take(sync.checkpoint_consumer);
        // A replay that meets a logged checkpoint keeps them from then on.
        let interval = u64::from(DEFAULT_CHECKPOINT_INTERVAL_MS) * 1_000_000;
        let checkpoints = self
            .checkpoints
            .get_or_insert_with(|| crate::checkpoint::Checkpoints::new(interval));
        let copied = checkpoints
            .take(
                &sync.memory,
                mem_size,
                dirtied,
                stop,
                now,
                MachineState { vcpu, devices },
            )
            .map_err(VcpuError::Memory)?;
        self.devices.outputs.checkpoint_taken(stop);
        self.stats.checkpoints += 1;
        self.stats.checkpoint_pages += copied as u64;
        self.stats.checkpoint_time += began.elapsed();
        self.live_counters
            .checkpoints
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
