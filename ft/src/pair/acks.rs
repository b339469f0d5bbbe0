//! The primary's decisions on what its secondary says, without sockets:
//! which acks release held output, when a repair starts and ends. The
//! `tandem-acks` thread ([`super::Replicator::read_acks`]) is the I/O shell
//! around [`AckLedger`].
//!
//! Output commit (DESIGN point 7): by default output produced at stops up
//! to R leaves once the secondary acks the log up to R (`received`); with
//! `output_commit = "replayed"`, or while a divergence is being repaired,
//! only once the secondary has replayed up to R and the epoch ending there
//! verified.

use crate::silence::{SilenceWatch, Verdict};
use crate::wire::{Message, Refused, ToPrimary};

/// What the acks thread does with one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckAction {
    /// A ping sent at this time (ms) was echoed: renew the secondary's
    /// lease from it.
    RenewLease(u64),
    /// The secondary has the log up to this stop: frames up to it are no
    /// longer kept for a resume, and the vCPU's brake eases.
    Acked(u64),
    /// Output produced at stops up to this one may leave.
    Release(u64),
    /// Mirrored storage: the disk sync with this id is durable there.
    DiskSynced(u64),
    /// The secondary's replay diverged at this epoch: take a sync point
    /// now (kick the vCPU) so it can repair.
    Repair(u64),
    /// The secondary's replay has executed up to this stop: the replay-lag
    /// brake eases.
    Replayed(u64),
}

/// The acks thread's state for one secondary.
#[derive(Debug)]
pub struct AckLedger {
    /// `output_commit = "replayed"`: release on verified stops only.
    replayed_commit: bool,
    /// A divergence is being repaired: release on verified stops only,
    /// until a newly verified epoch.
    repairing: bool,
    /// The newest verified stop heard.
    verified: u64,
}

impl AckLedger {
    /// A ledger for a new secondary.
    pub fn new(replayed_commit: bool) -> Self {
        Self {
            replayed_commit,
            repairing: false,
            verified: 0,
        }
    }

    /// Whether output waits for verified epochs right now.
    pub fn on_verified_only(&self) -> bool {
        self.replayed_commit || self.repairing
    }

    /// One message of generation `generation` while this side runs
    /// `current`. Ok: the secondary was heard, and these are the actions.
    pub fn on_message(
        &mut self,
        generation: u64,
        current: u64,
        message: Message,
    ) -> Result<Vec<AckAction>, Refused> {
        if generation < current {
            return Err(Refused::StaleGeneration {
                got: generation,
                following: current,
            });
        }
        let message = ToPrimary::try_from(message).map_err(Refused::Unexpected)?;
        Ok(match message {
            ToPrimary::Pong(sent) => vec![AckAction::RenewLease(sent)],
            ToPrimary::Ack(stop) if self.on_verified_only() => vec![AckAction::Acked(stop)],
            ToPrimary::Ack(stop) => vec![AckAction::Acked(stop), AckAction::Release(stop)],
            ToPrimary::Verified(stop) => {
                let release = self.on_verified_only();
                // Only a newly verified epoch ends a repair: the secondary
                // repeats its last one with its heartbeats.
                if stop > self.verified {
                    self.verified = stop;
                    self.repairing = false;
                }
                if release {
                    vec![AckAction::Release(stop)]
                } else {
                    Vec::new()
                }
            }
            ToPrimary::RepairRequest(epoch) => {
                self.repairing = true;
                vec![AckAction::Repair(epoch)]
            }
            ToPrimary::DiskSynced(id) => vec![AckAction::DiskSynced(id)],
            ToPrimary::Replayed(stop) => vec![AckAction::Replayed(stop)],
            ToPrimary::Heartbeat => Vec::new(),
            ToPrimary::DiskState(_) => {
                return Err(Refused::OutOfPlace {
                    kind: "a disk state",
                    receiver: "the primary",
                    why: "after its handshake (the disk state comes with the hello)",
                })
            }
        })
    }
}

/// Why the primary gives its secondary up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondaryLost {
    /// Nothing heard for this long (ms).
    Silent(u64),
    /// Heard, but no ping echoed for this long (ms): the path or the
    /// secondary is stuck; as good as silent (acks read after a freeze are
    /// old, pongs say how old).
    Unechoed(u64),
}

impl std::fmt::Display for SecondaryLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecondaryLost::Silent(ms) => write!(f, "secondary silent for {ms} ms"),
            SecondaryLost::Unechoed(ms) => {
                write!(f, "no ping echoed by the secondary for {ms} ms")
            }
        }
    }
}

/// The primary monitor's decision: when the secondary counts as gone.
#[derive(Debug)]
pub struct SecondaryWatch {
    watch: SilenceWatch,
    timeout_ms: u64,
}

impl SecondaryWatch {
    /// Gone after `timeout_ms` of silence (or of unechoed pings), looked at
    /// every `period_ms`.
    pub fn new(timeout_ms: u64, period_ms: u64) -> Self {
        Self {
            watch: SilenceWatch::new(timeout_ms, period_ms),
            timeout_ms,
        }
    }

    /// One look at `now` (ms): last heard at `heard`, the newest echoed
    /// ping sent at `echoed`; `unread`: bytes wait on the link (this side's
    /// own stalls and acks waiting unread are not the secondary's
    /// silence); `attached`: the secondary follows (a joiner echoes no
    /// pings yet).
    pub fn tick(
        &mut self,
        now: u64,
        heard: u64,
        echoed: u64,
        unread: bool,
        attached: bool,
    ) -> Option<SecondaryLost> {
        if let Verdict::Silent(ms) = self.watch.tick(now, heard, unread) {
            return Some(SecondaryLost::Silent(ms));
        }
        let unechoed = self.watch.silent_since(now, echoed);
        (attached && unechoed >= self.timeout_ms).then_some(SecondaryLost::Unechoed(unechoed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secondary_that_hears_but_echoes_no_ping_is_lost_once_attached() {
        let mut w = SecondaryWatch::new(1000, 100);
        let mut lost = None;
        for now in (100..=1500).step_by(100) {
            // Heard every tick (acks), the last echo at 0.
            lost = w.tick(now, now, 0, false, true);
            if lost.is_some() {
                break;
            }
        }
        assert_eq!(lost, Some(SecondaryLost::Unechoed(1000)));
        assert_eq!(
            lost.map(|l| l.to_string()).as_deref(),
            Some("no ping echoed by the secondary for 1000 ms")
        );
        // A joiner (not attached yet) echoes nothing and is not lost for it.
        let mut w = SecondaryWatch::new(1000, 100);
        for now in (100..=3000).step_by(100) {
            assert_eq!(w.tick(now, now, 0, false, false), None);
        }
    }

    #[test]
    fn a_silent_secondary_is_lost_after_the_timeout() {
        let mut w = SecondaryWatch::new(1000, 100);
        let mut lost = None;
        let mut now = 0;
        while lost.is_none() {
            now += 100;
            lost = w.tick(now, 0, now, false, true);
        }
        assert_eq!((now, lost), (1000, Some(SecondaryLost::Silent(1000))));
    }

    #[test]
    fn an_ack_releases_output_up_to_its_stop() {
        let mut l = AckLedger::new(false);
        assert_eq!(
            l.on_message(2, 2, Message::Ack(40)),
            Ok(vec![AckAction::Acked(40), AckAction::Release(40)])
        );
        // A verification releases nothing more on received commit.
        assert_eq!(l.on_message(2, 2, Message::Verified(30)), Ok(vec![]));
    }

    #[test]
    fn replayed_commit_releases_on_verified_stops_only() {
        let mut l = AckLedger::new(true);
        assert_eq!(
            l.on_message(1, 1, Message::Ack(40)),
            Ok(vec![AckAction::Acked(40)])
        );
        assert_eq!(
            l.on_message(1, 1, Message::Verified(35)),
            Ok(vec![AckAction::Release(35)])
        );
    }

    #[test]
    fn a_repair_holds_output_until_a_newly_verified_epoch() {
        let mut l = AckLedger::new(false);
        l.on_message(1, 1, Message::Verified(20)).unwrap();
        assert_eq!(
            l.on_message(1, 1, Message::RepairRequest(3)),
            Ok(vec![AckAction::Repair(3)])
        );
        assert_eq!(
            l.on_message(1, 1, Message::Ack(50)),
            Ok(vec![AckAction::Acked(50)]),
            "held while repairing"
        );
        // The secondary's heartbeat repeats its last verification: that
        // one must not end the repair.
        assert_eq!(
            l.on_message(1, 1, Message::Verified(20)),
            Ok(vec![AckAction::Release(20)])
        );
        assert!(l.on_verified_only());
        assert_eq!(
            l.on_message(1, 1, Message::Verified(45)),
            Ok(vec![AckAction::Release(45)])
        );
        assert!(!l.on_verified_only(), "a newly verified epoch ends it");
        assert_eq!(
            l.on_message(1, 1, Message::Ack(60)),
            Ok(vec![AckAction::Acked(60), AckAction::Release(60)])
        );
    }

    #[test]
    fn a_stale_generation_is_rejected() {
        let mut l = AckLedger::new(false);
        let r = l.on_message(1, 2, Message::Ack(99)).unwrap_err();
        assert_eq!(
            r,
            Refused::StaleGeneration {
                got: 1,
                following: 2
            }
        );
        assert!(!r.ends_connection());
    }

    #[test]
    fn pongs_renew_the_lease_and_disk_syncs_are_passed_on() {
        let mut l = AckLedger::new(false);
        assert_eq!(
            l.on_message(1, 1, Message::Pong(1234)),
            Ok(vec![AckAction::RenewLease(1234)])
        );
        assert_eq!(
            l.on_message(1, 1, Message::DiskSynced(7)),
            Ok(vec![AckAction::DiskSynced(7)])
        );
        assert_eq!(l.on_message(1, 1, Message::Heartbeat), Ok(vec![]));
    }

    #[test]
    fn an_unknown_message_is_an_error_that_ends_the_connection() {
        let mut l = AckLedger::new(false);
        for m in [
            Message::Log(vec![1]),
            Message::StepDown(1),
            Message::Welcome { version: 1 },
            Message::DiskState(vec![]),
        ] {
            let kind = m.kind();
            let r = l.on_message(1, 1, m).unwrap_err();
            assert!(r.ends_connection(), "{kind}");
            assert!(r.to_string().contains(kind), "{r}");
        }
    }
}
