//! The primary's two leases: the secondary's (pings it echoes; without one
//! the primary holds output) and, with etcd, the arbiter's (renewed every
//! quarter of its TTL; output only while it holds).

use super::*;

impl Replicator {
    /// Half the failover timeout, in ms: how long output may leave on the
    /// strength of the secondary's last echo.
    pub(super) fn lease_span(&self) -> u64 {
        self.params.failover_timeout.as_millis() as u64 / 2
    }

    /// Output may leave as of a ping sent at `sent` (ms since `base`).
    pub(super) fn renew_lease(&self, sent: u64) {
        self.lease_until
            .fetch_max(sent + self.lease_span(), Ordering::AcqRel);
    }

    /// Whether this primary heard its secondary echo a ping less than half
    /// the failover timeout ago.
    pub(super) fn lease_valid(&self) -> bool {
        millis(self.base) < self.lease_until.load(Ordering::Acquire)
    }

    /// A primary whose secondary has not echoed a ping for half the failover
    /// timeout holds everything (output, disk writes); once echoes come
    /// again it re-validates its generation at the arbiter before letting
    /// anything out (it may have been frozen while the other side took
    /// over).
    pub(super) fn check_lease(&self) {
        if !self.attached.load(Ordering::Acquire) {
            return;
        }
        let valid = self.lease_valid();
        if !valid && !self.gate.suspended() {
            warn!(
                "no echo from the secondary for {} ms: holding output and disk writes until the generation is re-validated",
                self.lease_span()
            );
            self.gate.suspend();
        } else if valid && self.gate.suspended() && !self.arbiter_lease_lost.load(Ordering::Acquire)
        {
            let generation = self.generation.load(Ordering::Acquire);
            match self.params.current() {
                Ok(g)
                    if g.generation == generation
                        && g.holder.as_deref() == Some(&self.params.me) =>
                {
                    warn!("generation {generation} re-validated: releasing output again");
                    self.gate.resume();
                }
                Ok(g) if g.generation > generation => {
                    self.params.fence(FenceReason::Superseded(g.to_string()))
                }
                Ok(g) => warn!("the arbiter shows {g}; still holding output"),
                Err(e) => warn!("cannot re-validate the generation ({e}); still holding output"),
            }
        }
    }

    /// With an arbiter that grants leases (etcd), the live side releases
    /// output only while it holds one: this renews it every quarter of its
    /// TTL; a watcher thread acts when it runs out.
    pub(super) fn keep_arbiter_lease(self: &Arc<Self>) {
        let Some(arbiter) = self.params.arbiter.clone() else {
            return;
        };
        let mut watching = false;
        while !self.stepped_down.load(Ordering::Acquire) {
            let generation = self.generation.load(Ordering::Acquire);
            let sent = millis(self.base);
            let every = match arbiter.hold(&self.params.vm_name, generation, &self.params.me) {
                Ok(None) => return,
                Ok(Some(ttl)) => {
                    let trusted = (ttl.as_millis() as f64 * LEASE_TRUST) as u64;
                    self.arbiter_lease_until
                        .store(sent + trusted, Ordering::Release);
                    if self.arbiter_lease_lost.swap(false, Ordering::AcqRel) {
                        warn!("the arbiter lease of generation {generation} is held again");
                        // Attached, the echo check re-validates and
                        // resumes; alone, nothing else would.
                        if !self.attached.load(Ordering::Acquire) {
                            self.gate.resume();
                        }
                    }
                    if !watching {
                        watching = true;
                        // `tandem status`: how long the lease surely holds.
                        let r = self.clone();
                        self.params.board.probe(
                            "arbiter_lease_ms_left",
                            Arc::new(move || {
                                r.arbiter_lease_until
                                    .load(Ordering::Acquire)
                                    .saturating_sub(millis(r.base))
                            }),
                        );
                        let r = self.clone();
                        let _ = std::thread::Builder::new()
                            .name("tandem-lease-watch".into())
                            .spawn(move || r.watch_arbiter_lease());
                    }
                    (ttl / 4).max(Duration::from_millis(100))
                }
                Err(e) => {
                    warn!("cannot renew the arbiter lease of generation {generation}: {e}");
                    Duration::from_millis(200)
                }
            };
            std::thread::sleep(every);
        }
    }

    /// Acts when the arbiter lease runs out (a renewal may block for a
    /// while on an unreachable arbiter, so this thread watches the clock):
    /// nothing more is released, and a secondary that follows is told to go
    /// live (it may still reach the arbiter), after which this side fences.
    pub(super) fn watch_arbiter_lease(self: &Arc<Self>) {
        while !self.stepped_down.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20));
            let until = self.arbiter_lease_until.load(Ordering::Acquire);
            if millis(self.base) < until || self.arbiter_lease_lost.load(Ordering::Acquire) {
                continue;
            }
            self.arbiter_lease_lost.store(true, Ordering::Release);
            self.gate.suspend();
            let generation = self.generation.load(Ordering::Acquire);
            warn!(
                "the arbiter lease of generation {generation} ran out: holding output and disk writes"
            );
            self.params
                .event(&format!("lease-lost generation={generation}"));
            if self.attached.load(Ordering::Acquire) {
                if let Err(e) = self.hand_over(true) {
                    warn!("cannot hand the VM over after losing the lease: {e}");
                }
            }
        }
    }
}

/// How much of a lease's TTL this side counts on (from before the renewal
/// was sent): the rest covers clocks that run at different rates.
pub(super) const LEASE_TRUST: f64 = 0.8;
