//! The stop sequence (DESIGN point 5) after an exit: apply inputs, decide
//! injection, sleep in HLT, and arm the kick timer before the next entry.

use super::*;

impl Vcpu {
    /// Sleeps in HLT at the current stop until an interrupt wakes the
    /// guest, then runs the rest of the stop. Some: the run ends so.
    pub(super) fn sleep_at_stop(&mut self) -> Result<Option<RunOutcome>, VcpuError> {
        match self.halt()? {
            Halted::Woken => {}
            Halted::Crashed(crash) if self.recover(&crash)? => return Ok(None),
            Halted::Crashed(crash) => return Ok(Some(RunOutcome::Crashed(crash))),
            Halted::ReplayEnded(end) => return Ok(Some(RunOutcome::ReplayEnded(end))),
            Halted::Stopped => return Ok(Some(RunOutcome::Stopped)),
        }
        self.at_stop()?;
        if let Some(crash) = self.watchdog_crash() {
            if self.recover(&crash)? {
                return Ok(None);
            }
            return Ok(Some(RunOutcome::Crashed(crash)));
        }
        Ok(None)
    }

    /// Sets the deadline timer for the guest entry about to happen: the
    /// current policy's kick interval (replay's, or live's once this side
    /// went live) and the next deadline (none while replaying).
    pub(super) fn arm_kick_timer(&mut self, timer: &mut DeadlineTimer) {
        timer.set_min_interval(self.policy.min_kick_interval);
        timer.set(self.next_kick_deadline());
    }

    /// Host time since the VM started (this side's start, moved at a go-live
    /// so that it agrees with guest time there), in nanoseconds.
    pub(super) fn since_start_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// When the deadline timer should kick next: the next device deadline
    /// and, when recording, the next forced sync point. Replay takes no kicks.
    pub(super) fn next_kick_deadline(&mut self) -> Option<Instant> {
        if self.journal.replayer_ref().is_some() {
            return None;
        }
        let device = self.devices.next_deadline_ns();
        self.journal.set_deadline(device);
        // Irq deferral: a deadline that passes while the guest runs is
        // applied at the guest's next exit; only if none comes in time does
        // a kick make a stop for it (and one for an interrupt still waiting
        // for the guest to enable interrupts).
        let defer = duration_ns(self.policy.irq_defer);
        let device = device.map(|ns| ns.saturating_add(defer));
        // (None once the window is asked for: its exit makes the stop.)
        let window_asked = self.fd.get_kvm_run().request_interrupt_window != 0;
        let waiting = self
            .irq_waiting_since
            .filter(|_| defer > 0 && !window_asked)
            .map(|ns| ns.saturating_add(defer));
        let sync = match (self.journal.recording(), self.policy.sync_interval) {
            (true, Some(every)) => {
                Some(self.last_sync_ns + u64::try_from(every.as_nanos()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        // Held output needs a checkpoint even from a guest that makes no
        // exits of its own (one spinning on a write's completion).
        let checkpoint = self
            .checkpoints
            .as_ref()
            .filter(|_| self.devices.outputs.pending())
            .map(|c| c.next_due_ns());
        let ns = [device, waiting, sync, checkpoint]
            .into_iter()
            .flatten()
            .min();
        ns.map(|ns| self.start + Duration::from_nanos(ns))
    }

    /// Console bytes the guest wrote at this stop: emitted live, journaled
    /// when recording; replaying, the recorded bytes are emitted and the
    /// replay's own are only compared with them.
    pub(super) fn console_output(&mut self) -> Result<(), VcpuError> {
        let bytes = self.devices.take_serial_out();
        if bytes.is_empty() {
            return Ok(());
        }
        let stop = self.stop;
        if let Some(own) = self.replay_console.as_mut() {
            use std::io::Write;
            let _ = own.write_all(&bytes);
        }
        let emitted = match self.journal.replayer() {
            Some(rep) => match rep.take_serial_out(stop) {
                Some(recorded) => {
                    if recorded != bytes {
                        self.stats.check_mismatches += 1;
                    }
                    recorded
                }
                None => {
                    self.stats.check_mismatches += 1;
                    Vec::new()
                }
            },
            None => {
                if self.journal.recording() {
                    self.journal.check(
                        stop,
                        Check::SerialOut {
                            bytes: bytes.clone(),
                        },
                    )?;
                }
                bytes
            }
        };
        if !emitted.is_empty() {
            self.devices
                .outputs
                .emit(tandem_replay::Output::Serial(emitted));
        }
        Ok(())
    }

    /// Clears `immediate_exit` unless a kick arrived since `kicks_before`
    /// (the handler runs on this thread, so checking after clearing is exact).
    pub(super) fn clear_immediate_exit(&mut self, kicks_before: u64) {
        crate::kick::clear_immediate_exit(&mut self.fd, kicks_before);
    }

    /// Collects this stop's causes from the `Inputs` port and applies them,
    /// in order, through the device models.
    pub(super) fn apply_causes(&mut self) -> Result<(), VcpuError> {
        let mut causes = std::mem::take(&mut self.causes);
        self.journal.collect(self.stop, &mut causes);
        if let Some(checkpoints) = self.checkpoints.as_mut() {
            for cause in &causes {
                if matches!(cause, Cause::NetRx { .. } | Cause::SerialInput(_)) {
                    checkpoints.input_applied(cause);
                }
            }
        }
        let mut result = Ok(());
        for cause in causes.drain(..) {
            if result.is_ok() {
                result = self.devices.apply(cause);
            }
        }
        self.causes = causes;
        self.devices.after_causes();
        Ok(result?)
    }

    /// The stop sequence after the exit itself was handled.
    pub(super) fn at_stop(&mut self) -> Result<(), VcpuError> {
        // Every kick so far is answered by this stop (which looks at time and
        // the queue next); a later one sets `immediate_exit` again.
        self.clear_immediate_exit(VcpuKickTarget::kicks());
        self.apply_causes()?;
        self.decide_injection()
    }

    /// KVM finishes a PIO/MMIO/MSR exit only on the next KVM_RUN: re-enter
    /// with `immediate_exit` so the vCPU state is complete before we read it.
    pub(super) fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        if !std::mem::take(&mut self.exit_pending) {
            return Ok(());
        }
        let kicks = VcpuKickTarget::kicks();
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(VcpuError::Kvm {
                what: "KVM_RUN (completing exit)",
                source: e,
            }),
            Ok(exit) => Err(VcpuError::UnexpectedExit(format!(
                "{exit:?} while completing a pending exit"
            ))),
        };
        self.clear_immediate_exit(kicks);
        result
    }

    /// Whether the guest can take an external interrupt right now, from its
    /// captured state (not from `kvm_run`'s flags).
    pub(super) fn guest_can_take_interrupt(&self) -> Result<bool, VcpuError> {
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        trace!(
            rip = regs.rip,
            rflags = regs.rflags,
            shadow = events.interrupt.shadow,
            injected = events.interrupt.injected,
            "interrupt state"
        );
        Ok(regs.rflags & RFLAGS_IF != 0
            && events.interrupt.shadow == 0
            && events.interrupt.injected == 0
            && !crate::position::exception_in_flight(&events)
            && events.nmi.injected == 0)
    }

    pub(super) fn decide_injection(&mut self) -> Result<(), VcpuError> {
        // Passing stops until a repair: the guest does not run, nothing is
        // injected into its wrong state.
        if self.lost() {
            self.request_window(false);
            return Ok(());
        }
        if !self.devices.interrupt_pending() {
            self.fd.get_kvm_run().request_interrupt_window = 0;
            self.irq_waiting_since = None;
            return Ok(());
        }
        self.complete_pending_exit()?;
        let can = self.guest_can_take_interrupt()?;
        trace!(stop = self.stop, can, "interrupt pending");
        if !can {
            // Deferred: a later exit of the guest's own with interrupts on
            // takes it for free; a kick when the deferral runs out (see
            // `next_kick_deadline`) asks for the window then.
            let now = self.since_start_ns();
            let since = *self.irq_waiting_since.get_or_insert(now);
            let defer = duration_ns(self.policy.irq_defer);
            // Once asked for, the window stays asked for until it opens.
            let window = defer == 0
                || self.kicked_stop
                || self.fd.get_kvm_run().request_interrupt_window != 0
                || now >= since.saturating_add(defer);
            self.request_window(window);
            return Ok(());
        }
        self.irq_waiting_since = None;
        let vector = self.devices.acknowledge_interrupt();
        if let Some(vector) = vector {
            trace!(vector, "inject");
            let irq = kvm_interrupt {
                irq: u32::from(vector),
            };
            // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer,
            // which refers to a live local of exactly that type.
            let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
            if ret < 0 {
                return Err(VcpuError::Kvm {
                    what: "KVM_INTERRUPT",
                    source: kvm_ioctls::Error::last(),
                });
            }
            self.stats.interrupts += 1;
            if !self.kicked_stop {
                self.live_counters
                    .irq_at_own_exits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.note_injection();
            match self.journal.check(self.stop, Check::Injected { vector }) {
                Err(JournalError::Diverged { stop, what }) => {
                    // A cross-check only: the epoch hashes say what differs
                    // and repair fixes it.
                    self.stats.check_mismatches += 1;
                    tracing::warn!("cross-check failed at stop {stop}: {what}");
                }
                other => other?,
            }
        }
        // Another IRQ may be waiting behind this one: come back when the
        // guest can take it.
        let more = self.devices.interrupt_pending();
        self.request_window(more);
        Ok(())
    }

    /// Asks KVM for an interrupt-window exit. Never while replaying: the
    /// recorder's window exits are sync points in the log, installed at the
    /// right stop; a window exit of the replay's own would be a stop the
    /// recording does not have.
    pub(super) fn request_window(&mut self, want: bool) {
        let want = want && self.journal.replayer_ref().is_none();
        self.fd.get_kvm_run().request_interrupt_window = u8::from(want);
    }

    /// The guest executed HLT: sleep until an interrupt is pending (live:
    /// until the next deadline or external event; replay: on the log only).
    pub(super) fn halt(&mut self) -> Result<Halted, VcpuError> {
        let _timer = super::PhaseTimer::start(&self.live_counters, super::Phase::Halted);
        let mut regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let since = Instant::now();
        loop {
            if self.stop_request.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(Halted::Stopped);
            }
            // A secondary joining while the guest sleeps starts from here:
            // a full sync point of the halted vCPU; a repair asked for now
            // is answered here too (a replay installs it at this HLT).
            if let Some(reason) = self.sync_point_due_in_halt() {
                self.record_sync_point(true, reason)?;
            }
            if self.journal.recording() {
                self.serve_precopy()?;
                // A switch-over parks the sleeping guest here.
                self.journal.park_if_held();
                if self.stop_request.load(std::sync::atomic::Ordering::Acquire) {
                    return Ok(Halted::Stopped);
                }
            }
            self.apply_causes()?;
            if let Some(crash) = self.watchdog_crash() {
                return Ok(Halted::Crashed(crash));
            }
            if self.devices.interrupt_pending() {
                break;
            }
            if regs.rflags & RFLAGS_IF == 0 {
                return Ok(Halted::Crashed(GuestCrash::HaltedWithInterruptsDisabled {
                    rip: regs.rip,
                }));
            }
            // The recorder took a sync point while it slept here.
            let stop = self.stop;
            if let Some((state, pages)) = self
                .journal
                .replayer()
                .and_then(|rep| rep.take_sync_point(stop))
            {
                self.sync_point_at_halt(&state, &pages)?;
                regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                continue;
            }
            if let Some(rep) = self.journal.replayer() {
                if rep.is_live() {
                    // The primary may still be halted here too: wait for
                    // what it logs next, or go live if it is gone.
                    if !rep.wait_at(self.stop)? {
                        self.go_live()?;
                    }
                    continue;
                }
                // Everything logged for this stop has been applied.
                if rep.exhausted() {
                    return Ok(Halted::ReplayEnded(ReplayEnd::LogExhausted {
                        stop: self.stop,
                    }));
                }
                let next = rep.next_record().unwrap_or_default();
                return Err(JournalError::Diverged {
                    stop: self.stop,
                    what: format!(
                        "the guest halted and nothing logged for this stop wakes it (the log continues with {next})"
                    ),
                }
                .into());
            }
            let deadline = self.devices.next_deadline_ns();
            if deadline.is_none() {
                debug!("halted with no timer armed: waiting for external input");
            }
            self.journal.wait(deadline);
        }
        self.stats.halted += since.elapsed();
        Ok(Halted::Woken)
    }
}

/// A duration in nanoseconds (saturating).
fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
