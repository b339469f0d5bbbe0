//! Going live: a secondary whose primary is gone (or stepped down) takes
//! inputs from the world and records for a secondary of its own.

use super::*;

impl Vcpu {
    /// Makes a live secondary able to go live: its cause queue and what to
    /// switch when it does.
    pub fn set_go_live(&mut self, hooks: GoLiveHooks) {
        self.go_live_hooks = Some(hooks);
    }

    /// The secondary becomes the primary at the current stop: guest time
    /// continues from the last logged time, inputs come from the world,
    /// outputs go to it (buffered ones first), and disk requests the old
    /// primary never completed are issued again.
    pub(super) fn go_live(&mut self) -> Result<(), VcpuError> {
        let Some(hooks) = self.go_live_hooks.take() else {
            return Err(VcpuError::Journal(JournalError::Diverged {
                stop: self.stop,
                what: "the log ended but this replay cannot go live".into(),
            }));
        };
        if self.lost() {
            return Err(VcpuError::Journal(JournalError::Diverged {
                stop: self.stop,
                what: "a positioned stop diverged and no sync point repaired it before the log ended: this replica's state is wrong, it cannot go live".into(),
            }));
        }
        let now_ns = self.ctx.clock.now_ns();
        let start = Instant::now()
            .checked_sub(Duration::from_nanos(now_ns))
            .unwrap_or_else(Instant::now);
        self.start = start;
        // Measured from the old start: a deferral starts afresh here.
        self.irq_waiting_since = None;
        let live = tandem_replay::LiveInputs::new(start, hooks.causes);
        self.journal = match hooks.record {
            Some((options, sink)) => {
                self.policy = KickPolicy {
                    sync_interval: Some(options.sync_interval),
                    min_kick_interval: options.min_kick_interval,
                    epoch_interval: options.epoch_interval,
                    irq_defer: options.irq_defer,
                };
                self.last_sync_ns = now_ns;
                Journal::Record(Box::new(crate::journal::Recorder::start_with_sink(
                    options, sink, live,
                )?))
            }
            None => Journal::Live(live),
        };
        self.shadow = None;
        (hooks.switch)();
        // Mirrored storage: from here on this side's worker does the I/O.
        self.devices.mirror_following = false;
        let reissued = self.devices.reissue_unfinished();
        self.stats.went_live_at = Some(self.stop);
        tracing::warn!(
            "going live at stop {} (guest time {now_ns} ns); {reissued} disk requests issued again",
            self.stop
        );
        Ok(())
    }
}
