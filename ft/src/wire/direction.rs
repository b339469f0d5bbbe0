//! The replication messages typed by direction, for the steady state of a
//! connection (after the handshake): [`ToSecondary`] is all a primary
//! sends a following secondary, [`ToPrimary`] all a secondary sends back.
//!
//! Both share [`Message`]'s framing (one tag space, one codec); a receiver
//! turns what it read into its own direction's type with `try_from`, and a
//! message of the other direction or of the handshake is an [`Unexpected`]
//! error that names it. Receivers match the typed enums exhaustively, so a
//! new message must be handled (or refused) by name everywhere it can
//! arrive.

use std::fmt;

use super::Message;

/// What a primary sends a secondary that follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToSecondary {
    /// Log bytes: the header, then whole frames.
    Log(Vec<u8>),
    /// Output produced at stops ≤ this has left the primary.
    Released(u64),
    /// Still here.
    Heartbeat,
    /// The primary's clock (ms) when sent: echo it.
    Ping(u64),
    /// A joiner's memory, before the log (see [`Message::Memory`]).
    Memory {
        /// Round number (0: all of memory).
        round: u32,
        /// Pages in this round.
        total: u64,
        /// Pages of the round looked at so far.
        scanned: u64,
        /// `[u64 LE gfn][page]` entries.
        pages: Vec<u8>,
    },
    /// Mirrored storage: chunks of a disk for this host's replica.
    DiskChunks(Vec<u8>),
    /// Mirrored storage: every chunk of the sync is sent.
    DiskDone(Vec<u8>),
    /// A switch-over: go live as the generation after this one, now.
    StepDown(u64),
    /// Why the primary will not serve this secondary (before the log).
    Refuse {
        /// The reason.
        reason: String,
    },
}

/// What a following secondary sends its primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToPrimary {
    /// The log is here up to this watermark.
    Ack(u64),
    /// Replayed up to this stop, and the epoch ending there verified.
    Verified(u64),
    /// The replay has executed up to this stop (protocol 2).
    Replayed(u64),
    /// Epoch `n` diverged: take a sync point so it can be repaired.
    RepairRequest(u64),
    /// A ping's time, echoed.
    Pong(u64),
    /// Still here.
    Heartbeat,
    /// Mirrored storage: this host's replicas, after the welcome.
    DiskState(Vec<u8>),
    /// Mirrored storage: the sync with this id is durable here.
    DiskSynced(u64),
}

/// A message that has no place where it arrived: of the other direction, or
/// of a connection's handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unexpected {
    /// [`Message::kind`] of what arrived.
    pub kind: &'static str,
    /// Who received it: "the secondary" or "the primary".
    pub receiver: &'static str,
}

impl fmt::Display for Unexpected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} received {}, which has no place on a following connection",
            self.receiver, self.kind
        )
    }
}

impl std::error::Error for Unexpected {}

/// A message a receiver does not act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// From a generation older than the one followed: a deposed primary's
    /// leftovers (said, and otherwise ignored).
    StaleGeneration {
        /// The message's generation.
        got: u64,
        /// The generation followed.
        following: u64,
    },
    /// Of the other direction or of a handshake.
    Unexpected(Unexpected),
    /// A message of the right direction where it has no meaning now.
    OutOfPlace {
        /// [`Message::kind`] of the message.
        kind: &'static str,
        /// "the primary" or "the secondary".
        receiver: &'static str,
        /// Why it has no place.
        why: &'static str,
    },
}

impl Refused {
    /// Whether the connection must end (and be resumed on a new one): a
    /// peer that says something meaningless is not listened to further on
    /// the same connection. A stale message only is not acted on.
    pub fn ends_connection(&self) -> bool {
        !matches!(self, Refused::StaleGeneration { .. })
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::StaleGeneration { got, following } => write!(
                f,
                "a message of old generation {got} (following {following}) not acted on"
            ),
            Refused::Unexpected(e) => write!(f, "{e}"),
            Refused::OutOfPlace {
                kind,
                receiver,
                why,
            } => write!(f, "{receiver} received {kind} {why}"),
        }
    }
}

impl TryFrom<Message> for ToSecondary {
    type Error = Unexpected;

    fn try_from(m: Message) -> Result<Self, Unexpected> {
        Ok(match m {
            Message::Log(bytes) => ToSecondary::Log(bytes),
            Message::Released(stop) => ToSecondary::Released(stop),
            Message::Heartbeat => ToSecondary::Heartbeat,
            Message::Ping(sent) => ToSecondary::Ping(sent),
            Message::Memory {
                round,
                total,
                scanned,
                pages,
            } => ToSecondary::Memory {
                round,
                total,
                scanned,
                pages,
            },
            Message::DiskChunks(p) => ToSecondary::DiskChunks(p),
            Message::DiskDone(p) => ToSecondary::DiskDone(p),
            Message::StepDown(g) => ToSecondary::StepDown(g),
            Message::Refuse { reason } => ToSecondary::Refuse { reason },
            other @ (Message::Hello { .. }
            | Message::Welcome { .. }
            | Message::Ack(_)
            | Message::Verified(_)
            | Message::Replayed(_)
            | Message::RepairRequest(_)
            | Message::Resume { .. }
            | Message::Pong(_)
            | Message::DiskState(_)
            | Message::DiskSynced(_)
            | Message::AuthHello { .. }
            | Message::AuthChallenge { .. }
            | Message::AuthProof { .. }) => {
                return Err(Unexpected {
                    kind: other.kind(),
                    receiver: "the secondary",
                })
            }
        })
    }
}

impl TryFrom<Message> for ToPrimary {
    type Error = Unexpected;

    fn try_from(m: Message) -> Result<Self, Unexpected> {
        Ok(match m {
            Message::Ack(stop) => ToPrimary::Ack(stop),
            Message::Verified(stop) => ToPrimary::Verified(stop),
            Message::Replayed(stop) => ToPrimary::Replayed(stop),
            Message::RepairRequest(epoch) => ToPrimary::RepairRequest(epoch),
            Message::Pong(sent) => ToPrimary::Pong(sent),
            Message::Heartbeat => ToPrimary::Heartbeat,
            Message::DiskState(p) => ToPrimary::DiskState(p),
            Message::DiskSynced(id) => ToPrimary::DiskSynced(id),
            other @ (Message::Hello { .. }
            | Message::Welcome { .. }
            | Message::Refuse { .. }
            | Message::Log(_)
            | Message::Released(_)
            | Message::Resume { .. }
            | Message::Memory { .. }
            | Message::Ping(_)
            | Message::DiskChunks(_)
            | Message::DiskDone(_)
            | Message::StepDown(_)
            | Message::AuthHello { .. }
            | Message::AuthChallenge { .. }
            | Message::AuthProof { .. }) => {
                return Err(Unexpected {
                    kind: other.kind(),
                    receiver: "the primary",
                })
            }
        })
    }
}

impl From<ToSecondary> for Message {
    fn from(m: ToSecondary) -> Message {
        match m {
            ToSecondary::Log(bytes) => Message::Log(bytes),
            ToSecondary::Released(stop) => Message::Released(stop),
            ToSecondary::Heartbeat => Message::Heartbeat,
            ToSecondary::Ping(sent) => Message::Ping(sent),
            ToSecondary::Memory {
                round,
                total,
                scanned,
                pages,
            } => Message::Memory {
                round,
                total,
                scanned,
                pages,
            },
            ToSecondary::DiskChunks(p) => Message::DiskChunks(p),
            ToSecondary::DiskDone(p) => Message::DiskDone(p),
            ToSecondary::StepDown(g) => Message::StepDown(g),
            ToSecondary::Refuse { reason } => Message::Refuse { reason },
        }
    }
}

impl From<ToPrimary> for Message {
    fn from(m: ToPrimary) -> Message {
        match m {
            ToPrimary::Ack(stop) => Message::Ack(stop),
            ToPrimary::Verified(stop) => Message::Verified(stop),
            ToPrimary::Replayed(stop) => Message::Replayed(stop),
            ToPrimary::RepairRequest(epoch) => Message::RepairRequest(epoch),
            ToPrimary::Pong(sent) => Message::Pong(sent),
            ToPrimary::Heartbeat => Message::Heartbeat,
            ToPrimary::DiskState(p) => Message::DiskState(p),
            ToPrimary::DiskSynced(id) => Message::DiskSynced(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_direction_round_trips_through_the_codec() {
        let to_secondary = [
            ToSecondary::Log(vec![1, 2]),
            ToSecondary::Released(7),
            ToSecondary::Heartbeat,
            ToSecondary::Ping(9),
            ToSecondary::StepDown(3),
            ToSecondary::DiskDone(vec![4]),
        ];
        for m in to_secondary {
            let bytes = super::super::encode(5, &m.clone().into()).unwrap();
            let (g, back) = super::super::read(&mut bytes.as_slice()).unwrap();
            assert_eq!((g, ToSecondary::try_from(back)), (5, Ok(m)));
        }
        for m in [
            ToPrimary::Ack(4),
            ToPrimary::Pong(8),
            ToPrimary::DiskSynced(2),
        ] {
            let bytes = super::super::encode(5, &m.clone().into()).unwrap();
            let (_, back) = super::super::read(&mut bytes.as_slice()).unwrap();
            assert_eq!(ToPrimary::try_from(back), Ok(m));
        }
    }

    #[test]
    fn a_message_of_the_other_direction_is_named_not_taken() {
        let e = ToSecondary::try_from(Message::Ack(3)).unwrap_err();
        assert_eq!(e.kind, "an ack");
        assert!(
            e.to_string().contains("the secondary received an ack"),
            "{e}"
        );
        let e = ToPrimary::try_from(Message::Log(vec![])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the primary received log bytes, which has no place on a following connection"
        );
        // The handshake is not the steady state either way.
        assert!(ToPrimary::try_from(Message::Resume {
            vm: "a".into(),
            frames: 0
        })
        .is_err());
        assert!(ToSecondary::try_from(Message::Welcome { version: 1 }).is_err());
    }
}
