//! A controlled switch-over (`tandem switchover`, or a primary that lost its
//! arbiter lease): stop the vCPU at a stop, wait until the secondary has
//! acknowledged the whole log and every held output has left, tell it to go
//! live (`StepDown`), and stop this side once the arbiter shows the
//! secondary live. Nothing is lost and no failure detection is waited for.
//! If the secondary does not take over in time, this side claims the next
//! generation itself and runs on unprotected (the secondary then loses and
//! fences).

use super::*;

impl Replicator {
    /// Serves `tandem switchover` on this side's control socket.
    pub(super) fn offer_switchover(self: &Arc<Self>) {
        let me = self.clone();
        self.params.board.command(
            ControlRequest::Switchover,
            Arc::new(move || me.switchover()),
        );
    }

    /// `tandem switchover`: [`Self::hand_over`] with the lease held.
    fn switchover(&self) -> Result<String, String> {
        self.hand_over(false)
    }

    /// Hands the VM to the secondary; `lease_lost`: this side's arbiter
    /// lease ran out (it cannot reach the arbiter), so once the secondary
    /// is told to go live this side fences itself at once: it could neither
    /// watch the secondary win nor win the VM back.
    pub(super) fn hand_over(&self, lease_lost: bool) -> Result<String, String> {
        if !self.attached.load(Ordering::Acquire) {
            return Err("no secondary follows this side: nothing to switch over to".into());
        }
        if self.stepping_down.swap(true, Ordering::AcqRel) {
            return Err("a switch-over is already under way".into());
        }
        let started = Instant::now();
        let mut quiesced = Duration::ZERO;
        let ready = self.quiesce(lease_lost).and_then(|()| {
            quiesced = started.elapsed();
            self.tell_step_down()
        });
        if let Err(why) = ready {
            self.params.throttle.unhold();
            self.stepping_down.store(false, Ordering::Release);
            return Err(format!(
                "{why}; the switch-over is called off, this side carries on"
            ));
        }
        let generation = self.generation.load(Ordering::Acquire);
        if lease_lost {
            self.stepped_down.store(true, Ordering::Release);
            self.params.event(&format!(
                "stepped-down lease-lost to={} generation={generation}",
                self.params.peer_name
            ));
            self.params.fence(FenceReason::LeaseLost {
                generation,
                to: self.params.peer_name.clone(),
            });
        }
        let live = self.await_successor(generation)?;
        self.stepped_down.store(true, Ordering::Release);
        self.params.event(&format!(
            "switched-over to={} generation={}",
            self.params.peer_name, live
        ));
        self.params
            .board
            .set(Role::SteppedDown, live, "live (took over)");
        self.vm.stop();
        self.params.throttle.unhold();
        let text = format!(
            "host {} is live as generation {live}; this side stopped (vCPU stopped and log acknowledged in {} ms, handed over in {} ms)",
            self.params.peer_name,
            quiesced.as_millis(),
            started.elapsed().as_millis()
        );
        eprintln!("tandem: switched over: {text}");
        Ok(text)
    }

    /// Stops the vCPU at a stop and waits until the secondary has
    /// acknowledged everything and every held output has left (without the
    /// lease nothing held may leave here: the secondary emits it from its
    /// own replay once live). Err: why not, within the failover timeout.
    fn quiesce(&self, lease_lost: bool) -> Result<(), String> {
        let throttle = &self.params.throttle;
        let limit = self.params.failover_timeout;
        throttle.hold();
        self.vm.kick();
        self.causes.wake();
        if !wait_until(limit, || throttle.parked().is_some()) {
            return Err(format!(
                "the vCPU did not stop within {} ms",
                limit.as_millis()
            ));
        }
        // The writer ships the stop's last records within its period.
        std::thread::sleep(Duration::from_millis(20));
        if throttle.parked() == Some(false)
            && !wait_until(limit, || {
                throttle.unacked() == 0 && (lease_lost || self.gate.held() == 0)
            })
        {
            return Err(format!(
                "the secondary did not acknowledge everything within {} ms",
                limit.as_millis()
            ));
        }
        Ok(())
    }

    /// Tells the secondary to go live: the release point, then `StepDown`.
    ///
    /// Halted: the sleeping stop's records are shipped (the secondary sees
    /// them before the step-down on this connection) but no watermark covers
    /// them, so they are never acknowledged as such. Nothing unacknowledged
    /// was released, so the secondary going live from what it has
    /// contradicts nothing; it emits what is still held here from its own
    /// replay.
    fn tell_step_down(&self) -> Result<(), String> {
        let generation = self.generation.load(Ordering::Acquire);
        match &mut *self.link() {
            Link::Attached(tx) => tx
                .send(generation, &Message::Released(self.gate.released()))
                .and_then(|()| tx.send(generation, &Message::StepDown(generation)))
                .map_err(|e| format!("cannot tell the secondary to go live: {e}")),
            Link::Detached | Link::Joining(_) => {
                Err("cannot tell the secondary to go live: the secondary is gone".to_string())
            }
        }
    }

    /// Waits (twice the failover timeout) for the arbiter to show a
    /// generation after `generation`: the secondary live. Nothing may run
    /// here again unless this side wins the VM back: if the secondary does
    /// not go live in time, this side claims the next generation and runs
    /// on unprotected (Err says so). Ok: the secondary's generation.
    fn await_successor(&self, generation: u64) -> Result<u64, String> {
        let deadline = Instant::now() + self.params.failover_timeout * 2;
        loop {
            match self.params.current() {
                Ok(grant) if grant.generation > generation => return Ok(grant.generation),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => break,
            }
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            FenceReason::ArbiterUnreachable(format!("switch-over: arbiter unreachable: {e}"))
        };
        match self.params.claim(generation) {
            Ok(Some(g)) => {
                self.generation.store(g, Ordering::Release);
                self.params
                    .event(&format!("switchover-failed generation={g} unprotected"));
                self.params
                    .board
                    .set(Role::Primary, g, "none (unprotected)");
                self.gate.open();
                self.params.throttle.open();
                self.params.throttle.unhold();
                self.stepping_down.store(false, Ordering::Release);
                Err(format!(
                    "the secondary did not go live in time; this side runs on unprotected as generation {g}"
                ))
            }
            Ok(None) => match self.params.current() {
                Ok(grant) => Ok(grant.generation),
                Err(e) => self.params.fence(unreachable(&e)),
            },
            Err(e) => self.params.fence(unreachable(&e)),
        }
    }
}

/// Polls `done` every millisecond for up to `limit`: whether it came true.
fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}
