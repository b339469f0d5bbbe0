//! The secondary's decisions, without sockets, threads or clocks of their
//! own: what each message from the primary means ([`Follower`]), what to
//! send back ([`Reporter`]) and when to go live ([`TakeoverWatch`]). The
//! threads in [`super::secondary`] are I/O shells around these; the unit
//! tests below drive them with message sequences.

use tandem_replay::log::{LogError, Record};

use crate::fence::FenceReason;
use crate::silence::{SilenceWatch, Verdict};
use crate::wire::{Message, Refused, ToPrimary, ToSecondary};

/// What the follow thread does with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Append these bytes to the log pipe (the replay's input).
    WriteLog(Vec<u8>),
    /// The primary has released output up to this stop.
    PrimaryReleased(u64),
    /// Echo this ping (the ack thread sends the pong).
    Echo(u64),
    /// The primary stepped down: go live.
    StepDown,
    /// A joiner's memory, pre-copied before the log.
    Precopy {
        /// Pre-copy round.
        round: u32,
        /// Pages in the round.
        total: u64,
        /// Pages of the round looked at so far.
        scanned: u64,
        /// `[gfn][page]` entries.
        pages: Vec<u8>,
    },
    /// Mirrored storage: apply these chunks to the replicas.
    DiskChunks(Vec<u8>),
    /// Mirrored storage: finish the sync and confirm it.
    DiskDone(Vec<u8>),
    /// Stop following (before the log started): the start fails with this.
    GiveUp(String),
}

/// The follow thread's state: which generation it follows, where the log
/// stands (for a resume) and what the disk sync still needs.
#[derive(Debug)]
pub struct Follower {
    generation: u64,
    /// Mirrored storage: the disk sync is not finished yet (the log must
    /// not start before it is).
    disk_sync_pending: bool,
    /// The log header arrived; each later log message is one frame.
    header_seen: bool,
    /// Frames received after the header: where a new connection resumes.
    frames: u64,
}

impl Follower {
    /// Follows `generation`; `mirrored`: a disk sync comes first.
    pub fn new(generation: u64, mirrored: bool) -> Self {
        Self {
            generation,
            disk_sync_pending: mirrored,
            header_seen: false,
            frames: 0,
        }
    }

    /// The generation followed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the log has started (its header arrived).
    pub fn log_started(&self) -> bool {
        self.header_seen
    }

    /// One message from the primary, of generation `generation`. Ok(None):
    /// liveness only (the caller counts every message as hearing from the
    /// primary).
    pub fn on_message(
        &mut self,
        generation: u64,
        message: Message,
    ) -> Result<Option<Action>, Refused> {
        if generation < self.generation {
            return Err(Refused::StaleGeneration {
                got: generation,
                following: self.generation,
            });
        }
        let message = ToSecondary::try_from(message).map_err(Refused::Unexpected)?;
        let out_of_place = |m: &ToSecondary, why| {
            Err(Refused::OutOfPlace {
                kind: Message::from(m.clone()).kind(),
                receiver: "the secondary",
                why,
            })
        };
        Ok(Some(match message {
            ToSecondary::Log(_) if self.disk_sync_pending => Action::GiveUp(
                "the primary sent its log before syncing the disks: is it configured with storage = \"mirrored\"?".into(),
            ),
            ToSecondary::Log(bytes) => {
                if self.header_seen {
                    self.frames += 1;
                }
                self.header_seen = true;
                Action::WriteLog(bytes)
            }
            ToSecondary::Released(stop) => Action::PrimaryReleased(stop),
            ToSecondary::Ping(sent) => Action::Echo(sent),
            ToSecondary::Heartbeat => return Ok(None),
            ToSecondary::StepDown(g) if g == self.generation => Action::StepDown,
            m @ ToSecondary::StepDown(_) => {
                return out_of_place(&m, "for a generation this side does not follow")
            }
            ToSecondary::Memory {
                round,
                total,
                scanned,
                pages,
            } if !self.header_seen => Action::Precopy {
                round,
                total,
                scanned,
                pages,
            },
            m @ ToSecondary::Memory { .. } => {
                return out_of_place(&m, "after the log started (pre-copy comes before it)")
            }
            ToSecondary::DiskChunks(p) if self.disk_sync_pending => Action::DiskChunks(p),
            ToSecondary::DiskDone(p) if self.disk_sync_pending => {
                self.disk_sync_pending = false;
                Action::DiskDone(p)
            }
            m @ (ToSecondary::DiskChunks(_) | ToSecondary::DiskDone(_)) => {
                return out_of_place(
                    &m,
                    "with no disk sync under way (is this side configured with storage = \"mirrored\"?)",
                )
            }
            ToSecondary::Refuse { reason } if !self.header_seen => {
                Action::GiveUp(format!("the primary refused this secondary: {reason}"))
            }
            m @ ToSecondary::Refuse { .. } => {
                return out_of_place(&m, "after the log started (a resume is refused in its handshake)")
            }
        }))
    }

    /// The connection broke: resume after the frames already here.
    pub fn resume_from(&self) -> u64 {
        self.frames
    }
}

/// What the decode thread does with one read of the log pipe.
// One value per read, moved straight on: boxing the record would add an
// allocation per record for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decoded {
    /// Hand the record to the replay; `covers`: the log is here up to this
    /// stop (a watermark; the End record covers everything), so ack it.
    Record {
        /// The record.
        record: Record,
        /// The stop now covered, if the record moves it.
        covers: Option<u64>,
    },
    /// The pipe ended: the monitor closed it after winning the next
    /// generation (dropping the feed lets the replay go live).
    End,
    /// The stream cannot be decoded: a secondary that cannot follow must not
    /// go live on its own; it fences, and the primary carries on
    /// unprotected.
    Fence(FenceReason),
}

/// The decode thread's decision on one read.
pub fn decoded(read: Result<Option<Record>, LogError>) -> Decoded {
    match read {
        Ok(Some(record)) => {
            let covers = match record {
                Record::Watermark { stop } => Some(stop),
                Record::End { .. } => Some(u64::MAX),
                _ => None,
            };
            Decoded::Record { record, covers }
        }
        Ok(None) => Decoded::End,
        Err(e) => Decoded::Fence(FenceReason::DamagedStream(e.to_string())),
    }
}

/// The ack thread's state: what it reported last, so each report goes once
/// and repeats only with heartbeats.
#[derive(Debug, Default)]
pub struct Reporter {
    /// The newest watermark acked (none before the first arrives: an ack of
    /// stop 0 then would claim records this side does not have).
    acked: Option<u64>,
    /// The newest verified stop reported (0: none).
    verified: u64,
    /// Divergences reported (the epoch + 1 of the newest).
    divergence: u64,
    /// Pings echoed (send time + 1 of the newest).
    echoed: u64,
    /// The newest replayed stop reported (0: none).
    replayed: u64,
    /// A repair asked for and no epoch verified since (the verified stop
    /// when it was asked): the primary holds output until one is.
    repairing: Option<u64>,
}

/// What the ack thread sees when it wakes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// The newest watermark received (none before the first).
    pub received: Option<u64>,
    /// The newest verified stop of the replay (0: none).
    pub verified: u64,
    /// The newest diverged epoch + 1 (0: none).
    pub diverged: u64,
    /// The newest ping's send time + 1 (0: none).
    pub ping: u64,
    /// The stop the replay has executed up to, when a report of it is due
    /// (None: not due, or the primary's protocol has no such message).
    pub replayed: Option<u64>,
}

impl Reporter {
    /// The messages to send now, in order; `heartbeat`: a heartbeat is due
    /// (it repeats the last ack and verification, which a connection that
    /// broke may have lost: the primary takes repeats as no-ops).
    pub fn report(&mut self, now: Progress, heartbeat: bool) -> Vec<ToPrimary> {
        let mut out = Vec::new();
        if now.ping > self.echoed {
            out.push(ToPrimary::Pong(now.ping - 1));
            self.echoed = now.ping;
        }
        if now.diverged > self.divergence {
            out.push(ToPrimary::RepairRequest(now.diverged - 1));
            self.divergence = now.diverged;
            self.repairing = Some(now.verified);
        }
        if now.verified > self.verified {
            out.push(ToPrimary::Verified(now.verified));
            self.verified = now.verified;
            if self.repairing.is_some_and(|at| now.verified > at) {
                self.repairing = None;
            }
        }
        if let Some(stop) = now.replayed.filter(|s| *s > self.replayed) {
            out.push(ToPrimary::Replayed(stop));
            self.replayed = stop;
        }
        if now.received.is_some() && now.received != self.acked {
            self.acked = now.received;
            out.extend(self.acked.map(ToPrimary::Ack));
        }
        if heartbeat {
            out.push(ToPrimary::Heartbeat);
            out.extend(self.acked.map(ToPrimary::Ack));
            if self.verified > 0 {
                out.push(ToPrimary::Verified(self.verified));
            }
        }
        out
    }

    /// Whether a verification is awaited: a repair was asked for and no
    /// epoch verified since (the ack thread then looks every millisecond).
    pub fn repairing(&self) -> bool {
        self.repairing.is_some()
    }

    /// The watermark acked last (the ack thread waits for another).
    pub fn acked(&self) -> Option<u64> {
        self.acked
    }
}

/// Why this side goes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoLive {
    /// The primary was silent this long (ms): a failover.
    PrimarySilent(u64),
    /// The primary stopped itself and handed over (a switch-over): no
    /// failure, so no fence command and no replacement process.
    SteppedDown,
}

/// When the primary counts as gone: silence past the failover timeout (a
/// side's own stalls and unread bytes are not the primary's silence), or a
/// step-down.
#[derive(Debug)]
pub struct TakeoverWatch {
    watch: SilenceWatch,
}

impl TakeoverWatch {
    /// Silence longer than `timeout_ms`, looked at every `period_ms`.
    pub fn new(timeout_ms: u64, period_ms: u64) -> Self {
        Self {
            watch: SilenceWatch::new(timeout_ms, period_ms),
        }
    }

    /// One look at `now` (ms): the primary was last heard at `heard`;
    /// `unread`: bytes wait on the connection; `stepped_down`: the primary
    /// said it stepped down.
    pub fn tick(
        &mut self,
        now: u64,
        heard: u64,
        unread: bool,
        stepped_down: bool,
    ) -> Option<GoLive> {
        // A primary that stepped down then falls silent (it stopped) is
        // still a switch-over, not a failure.
        match self.watch.tick(now, heard, unread) {
            _ if stepped_down => Some(GoLive::SteppedDown),
            Verdict::Silent(ms) => Some(GoLive::PrimarySilent(ms)),
            Verdict::Alive => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower() -> Follower {
        Follower::new(4, false)
    }

    #[test]
    fn log_bytes_go_to_the_pipe_and_frames_are_counted_after_the_header() {
        let mut f = follower();
        assert_eq!(
            f.on_message(4, Message::Log(vec![1])),
            Ok(Some(Action::WriteLog(vec![1])))
        );
        assert_eq!(f.resume_from(), 0, "the header is no frame");
        f.on_message(4, Message::Log(vec![2])).unwrap();
        f.on_message(5, Message::Log(vec![3])).unwrap();
        assert_eq!(f.resume_from(), 2);
        assert!(f.log_started());
    }

    #[test]
    fn a_stale_generation_is_rejected_and_changes_nothing() {
        let mut f = follower();
        f.on_message(4, Message::Log(vec![1])).unwrap();
        let r = f.on_message(3, Message::Log(vec![9])).unwrap_err();
        assert_eq!(
            r,
            Refused::StaleGeneration {
                got: 3,
                following: 4
            }
        );
        assert!(!r.ends_connection());
        assert_eq!(f.resume_from(), 0);
        // Nor does a step-down of a deposed primary make this side go live.
        assert!(f.on_message(3, Message::StepDown(3)).is_err());
    }

    #[test]
    fn a_step_down_of_the_followed_generation_goes_live() {
        let mut f = follower();
        assert_eq!(
            f.on_message(4, Message::StepDown(4)),
            Ok(Some(Action::StepDown))
        );
        let r = f.on_message(4, Message::StepDown(2)).unwrap_err();
        assert!(r.ends_connection());
        assert!(
            r.to_string()
                .contains("the secondary received a step-down for a generation"),
            "{r}"
        );
    }

    #[test]
    fn an_unknown_message_is_an_error_never_ignored() {
        let mut f = follower();
        let r = f.on_message(4, Message::Ack(3)).unwrap_err();
        assert!(r.ends_connection());
        assert_eq!(
            r.to_string(),
            "the secondary received an ack, which has no place on a following connection"
        );
        let r = f.on_message(
            4,
            Message::Hello {
                min: 1,
                max: 1,
                vm: "x".into(),
                host: "b".into(),
            },
        );
        assert!(r.is_err());
        // Pre-copy after the log started, disk chunks with no sync.
        f.on_message(4, Message::Log(vec![])).unwrap();
        let memory = Message::Memory {
            round: 0,
            total: 1,
            scanned: 1,
            pages: vec![],
        };
        assert!(f.on_message(4, memory).unwrap_err().ends_connection());
        assert!(f.on_message(4, Message::DiskChunks(vec![])).is_err());
        assert!(f
            .on_message(4, Message::Refuse { reason: "x".into() })
            .is_err());
    }

    #[test]
    fn mirrored_storage_syncs_the_disks_before_the_log() {
        let mut f = Follower::new(1, true);
        assert!(matches!(
            f.on_message(1, Message::Log(vec![])),
            Ok(Some(Action::GiveUp(why))) if why.contains("before syncing the disks")
        ));
        assert_eq!(
            f.on_message(1, Message::DiskChunks(vec![1])),
            Ok(Some(Action::DiskChunks(vec![1])))
        );
        assert_eq!(
            f.on_message(1, Message::DiskDone(vec![2])),
            Ok(Some(Action::DiskDone(vec![2])))
        );
        assert_eq!(
            f.on_message(1, Message::Log(vec![3])),
            Ok(Some(Action::WriteLog(vec![3])))
        );
        assert!(
            f.on_message(1, Message::DiskDone(vec![])).is_err(),
            "one sync"
        );
    }

    #[test]
    fn a_refusal_before_the_log_gives_up_with_its_reason() {
        let mut f = follower();
        let a = f.on_message(
            4,
            Message::Refuse {
                reason: "vm busy".into(),
            },
        );
        assert_eq!(
            a,
            Ok(Some(Action::GiveUp(
                "the primary refused this secondary: vm busy".into()
            )))
        );
        assert_eq!(f.on_message(4, Message::Heartbeat), Ok(None));
        assert_eq!(f.on_message(4, Message::Ping(7)), Ok(Some(Action::Echo(7))));
    }

    #[test]
    fn watermarks_and_the_end_are_acked_and_a_damaged_frame_fences() {
        let covers = |r: Record| match decoded(Ok(Some(r))) {
            Decoded::Record { covers, .. } => covers,
            other => panic!("{other:?}"),
        };
        assert_eq!(covers(Record::Watermark { stop: 9 }), Some(9));
        let end = Record::End {
            stop: 12,
            outcome: tandem_replay::log::EndOutcome::GuestExit(0),
        };
        assert_eq!(covers(end), Some(u64::MAX));
        assert_eq!(
            covers(Record::Cause {
                stop: 3,
                cause: tandem_replay::Cause::Time(5)
            }),
            None
        );
        assert!(matches!(decoded(Ok(None)), Decoded::End));
        let damaged = LogError::Corrupt {
            offset: 100,
            record: 2,
            reason: "crc mismatch".into(),
        };
        match decoded(Err(damaged)) {
            Decoded::Fence(reason) => {
                assert_eq!(reason.event(), "damaged-stream");
                assert!(reason.to_string().contains("crc mismatch"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_is_acked_before_the_first_watermark() {
        let mut r = Reporter::default();
        assert!(r.report(Progress::default(), false).is_empty());
        assert_eq!(
            r.report(Progress::default(), true),
            vec![ToPrimary::Heartbeat]
        );
        let now = Progress {
            received: Some(0),
            ..Progress::default()
        };
        assert_eq!(r.report(now, false), vec![ToPrimary::Ack(0)]);
        assert!(r.report(now, false).is_empty(), "an ack goes once");
    }

    #[test]
    fn acks_and_verifications_repeat_with_heartbeats_only() {
        let mut r = Reporter::default();
        let now = Progress {
            received: Some(12),
            verified: 10,
            diverged: 0,
            ping: 0,
            replayed: None,
        };
        assert_eq!(
            r.report(now, false),
            vec![ToPrimary::Verified(10), ToPrimary::Ack(12)]
        );
        assert!(r.report(now, false).is_empty());
        assert_eq!(
            r.report(now, true),
            vec![
                ToPrimary::Heartbeat,
                ToPrimary::Ack(12),
                ToPrimary::Verified(10)
            ]
        );
    }

    #[test]
    fn pings_are_echoed_and_divergences_reported_once_each() {
        let mut r = Reporter::default();
        let now = Progress {
            received: None,
            verified: 0,
            diverged: 3,
            ping: 101,
            replayed: None,
        };
        assert_eq!(
            r.report(now, false),
            vec![ToPrimary::Pong(100), ToPrimary::RepairRequest(2)]
        );
        assert!(r.report(now, false).is_empty());
    }

    #[test]
    fn a_repair_is_awaited_until_an_epoch_verifies_after_it() {
        let mut r = Reporter::default();
        let at = |verified, diverged| Progress {
            verified,
            diverged,
            ..Progress::default()
        };
        r.report(at(50, 0), false);
        assert!(!r.repairing());
        assert_eq!(
            r.report(at(50, 8), false),
            vec![ToPrimary::RepairRequest(7)]
        );
        assert!(r.repairing(), "a repair asked for");
        // A heartbeat repeats the old verification: still awaited.
        r.report(at(50, 8), true);
        assert!(r.repairing());
        assert_eq!(r.report(at(60, 8), false), vec![ToPrimary::Verified(60)]);
        assert!(!r.repairing(), "verified since");
    }

    #[test]
    fn replay_progress_is_reported_when_due_and_only_when_it_moved() {
        let mut r = Reporter::default();
        let at = |replayed| Progress {
            replayed,
            ..Progress::default()
        };
        assert!(r.report(at(None), false).is_empty(), "not due");
        assert_eq!(r.report(at(Some(40)), false), vec![ToPrimary::Replayed(40)]);
        assert!(r.report(at(Some(40)), false).is_empty(), "it did not move");
        assert!(r.report(at(None), false).is_empty());
        assert_eq!(r.report(at(Some(41)), false), vec![ToPrimary::Replayed(41)]);
    }

    #[test]
    fn silence_past_the_timeout_goes_live_and_a_step_down_at_once() {
        let mut w = TakeoverWatch::new(1000, 100);
        let mut now = 0;
        while now < 900 {
            now += 100;
            assert_eq!(w.tick(now, 0, false, false), None, "at {now} ms");
        }
        let mut verdict = None;
        while verdict.is_none() && now < 2000 {
            now += 100;
            verdict = w.tick(now, 0, false, false);
        }
        assert!(
            matches!(verdict, Some(GoLive::PrimarySilent(ms)) if ms >= 1000),
            "{verdict:?}"
        );
        let mut w = TakeoverWatch::new(1000, 100);
        assert_eq!(w.tick(100, 100, false, true), Some(GoLive::SteppedDown));
        assert_eq!(w.tick(5000, 100, false, true), Some(GoLive::SteppedDown));
    }

    #[test]
    fn unread_bytes_are_the_primary_speaking() {
        let mut w = TakeoverWatch::new(1000, 100);
        for now in (100..=3000).step_by(100) {
            assert_eq!(w.tick(now, 0, true, false), None);
        }
    }
}
