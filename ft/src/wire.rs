//! The replication channel's wire format.
//!
//! One TCP connection per pair. Every message is
//! `[u8 tag][u64 LE generation][u32 LE length][payload]`; a message from an
//! older generation than the receiver's is rejected. The primary sends the
//! log itself (the header, then whole log frames, exactly as
//! `tandem run --record` writes them to a file), the stop up to which it has
//! released output, and heartbeats; the secondary sends acks of the
//! watermark it has received, and heartbeats. Any message counts as
//! liveness. The handshake picks the highest protocol version both speak.
//! With a pre-shared key every message is followed by its MAC, and the
//! connection starts with the `Auth*` messages ([`super::channel`]).

use std::io::{self, Read, Write};

use super::auth::{MAC_LEN, NONCE_LEN};

pub mod direction;
pub use direction::{Refused, ToPrimary, ToSecondary, Unexpected};

/// This build's replication protocol versions.
pub const PROTOCOL_MIN: u16 = 1;
/// The newest replication protocol version this build speaks (2: the
/// secondary reports its replay's progress, [`Message::Replayed`]).
pub const PROTOCOL_MAX: u16 = 2;
/// The first version with [`Message::Replayed`].
pub const PROTOCOL_REPLAY_PROGRESS: u16 = 2;
/// Largest payload accepted (a log frame is at most 256 MiB plus header).
pub const MAX_PAYLOAD: u32 = (256 << 20) + 64;

/// A message on the replication channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Secondary → primary: the versions it speaks and the VM it follows.
    Hello {
        /// Oldest version.
        min: u16,
        /// Newest version.
        max: u16,
        /// The VM's name.
        vm: String,
        /// The host entry of the pair file it claims to be (`b`).
        host: String,
    },
    /// Primary → secondary: the version chosen.
    Welcome {
        /// The chosen version.
        version: u16,
    },
    /// Either way: why the connection is refused; then it closes.
    Refuse {
        /// The reason.
        reason: String,
    },
    /// Primary → secondary: log bytes (the header, then whole frames).
    Log(Vec<u8>),
    /// Primary → secondary: output produced at stops ≤ this has left.
    Released(u64),
    /// Secondary → primary: the secondary has the log up to this watermark.
    Ack(u64),
    /// Either way: still here.
    Heartbeat,
    /// Secondary → primary: it has replayed up to this stop and the epoch
    /// ending there verified (`output_commit = "replayed"`).
    Verified(u64),
    /// Secondary → primary (protocol 2): its replay has executed up to
    /// this stop, in either commit mode (the primary's replay-lag brake).
    Replayed(u64),
    /// Secondary → primary: epoch `n` diverged; commit on verified epochs
    /// until one verifies, and take a sync point now so it can repair.
    RepairRequest(u64),
    /// Secondary → primary, on a new connection after the old one broke:
    /// it has `frames` log frames (after the header); send the rest.
    Resume {
        /// The VM's name.
        vm: String,
        /// Frames the secondary has.
        frames: u64,
    },
    /// Primary → joining secondary, before the log: guest pages copied
    /// while the guest runs (pre-copy round `round`, which has `total`
    /// pages to look at, `scanned` of them looked at so far). `pages` is a
    /// run of `[u64 LE gfn][PAGE bytes]` entries.
    Memory {
        /// Round number (0: all of memory).
        round: u32,
        /// Pages in this round.
        total: u64,
        /// Pages of the round looked at up to the end of this message.
        scanned: u64,
        /// The pages (zero pages of round 0 are left out).
        pages: Vec<u8>,
    },
    /// Primary → secondary, with each heartbeat: its clock (ms) when sent.
    Ping(u64),
    /// Secondary → primary, at once: the ping's time echoed. A pong for a
    /// recent ping proves the secondary follows this primary now (acks
    /// read after a freeze are old; pongs say how old).
    Pong(u64),
    /// Secondary → primary, after the welcome (mirrored storage): its
    /// replicas' sidecars ([`super::mirror`] encodes the payload).
    DiskState(Vec<u8>),
    /// Primary → secondary: chunks of a disk for its replica.
    DiskChunks(Vec<u8>),
    /// Primary → secondary: every chunk of the sync is sent.
    DiskDone(Vec<u8>),
    /// Secondary → primary: the sync with this id is durable here.
    DiskSynced(u64),
    /// Primary → secondary (a switch-over): everything is acknowledged and
    /// this primary's vCPU is stopped; win generation g + 1 and go live now.
    StepDown(u64),
    /// Connecting side, first (authenticated channels): its nonce.
    AuthHello {
        /// Fresh random bytes.
        nonce: [u8; NONCE_LEN],
    },
    /// Accepting side: its nonce and its proof of the key.
    AuthChallenge {
        /// Fresh random bytes.
        nonce: [u8; NONCE_LEN],
        /// HMAC(psk, "server" ‖ both nonces).
        proof: [u8; MAC_LEN],
    },
    /// Connecting side: its proof of the key.
    AuthProof {
        /// HMAC(psk, "client" ‖ both nonces).
        proof: [u8; MAC_LEN],
    },
}

impl Message {
    /// The message's kind, for logs and errors (never its contents). Every
    /// variant is named here, so a new one must be given a name.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "a hello",
            Message::Welcome { .. } => "a welcome",
            Message::Refuse { .. } => "a refusal",
            Message::Log(_) => "log bytes",
            Message::Released(_) => "a release",
            Message::Ack(_) => "an ack",
            Message::Heartbeat => "a heartbeat",
            Message::Verified(_) => "a verified stop",
            Message::Replayed(_) => "a replayed stop",
            Message::RepairRequest(_) => "a repair request",
            Message::Resume { .. } => "a resume",
            Message::Memory { .. } => "pre-copied memory",
            Message::Ping(_) => "a ping",
            Message::Pong(_) => "a pong",
            Message::DiskState(_) => "a disk state",
            Message::DiskChunks(_) => "disk chunks",
            Message::DiskDone(_) => "a disk-sync end",
            Message::DiskSynced(_) => "a disk-sync confirmation",
            Message::StepDown(_) => "a step-down",
            Message::AuthHello { .. } => "an auth hello",
            Message::AuthChallenge { .. } => "an auth challenge",
            Message::AuthProof { .. } => "an auth proof",
        }
    }
}

const TAG_HELLO: u8 = 1;
const TAG_WELCOME: u8 = 2;
const TAG_REFUSE: u8 = 3;
const TAG_LOG: u8 = 4;
const TAG_RELEASED: u8 = 5;
const TAG_ACK: u8 = 6;
const TAG_HEARTBEAT: u8 = 7;
const TAG_VERIFIED: u8 = 8;
const TAG_REPAIR: u8 = 9;
const TAG_RESUME: u8 = 10;
const TAG_AUTH_HELLO: u8 = 11;
const TAG_AUTH_CHALLENGE: u8 = 12;
const TAG_AUTH_PROOF: u8 = 13;
const TAG_MEMORY: u8 = 14;
const TAG_PING: u8 = 15;
const TAG_PONG: u8 = 16;
const TAG_DISK_STATE: u8 = 17;
const TAG_DISK_CHUNKS: u8 = 18;
const TAG_DISK_DONE: u8 = 19;
const TAG_DISK_SYNCED: u8 = 20;
const TAG_STEP_DOWN: u8 = 21;
const TAG_REPLAYED: u8 = 22;

/// Bytes of one page entry of [`Message::Memory`]: gfn, then the page.
pub const PAGE_ENTRY: usize = 8 + tandem_replay::log::PAGE_SIZE;

/// Bytes of a message header: tag, generation, payload length.
pub const HEAD_LEN: usize = 13;

/// Writes one message.
pub fn write(w: &mut impl Write, generation: u64, m: &Message) -> io::Result<()> {
    w.write_all(&encode(generation, m)?)?;
    w.flush()
}

/// One message as it goes on the wire: header, then payload.
pub fn encode(generation: u64, m: &Message) -> io::Result<Vec<u8>> {
    let (tag, payload): (u8, Vec<u8>) = match m {
        Message::Hello { min, max, vm, host } => {
            let mut p = Vec::new();
            p.extend_from_slice(&min.to_le_bytes());
            p.extend_from_slice(&max.to_le_bytes());
            p.extend_from_slice(vm.as_bytes());
            p.push(0);
            p.extend_from_slice(host.as_bytes());
            (TAG_HELLO, p)
        }
        Message::Welcome { version } => (TAG_WELCOME, version.to_le_bytes().to_vec()),
        Message::Refuse { reason } => (TAG_REFUSE, reason.as_bytes().to_vec()),
        Message::Log(bytes) => (TAG_LOG, bytes.clone()),
        Message::Released(stop) => (TAG_RELEASED, stop.to_le_bytes().to_vec()),
        Message::Ack(stop) => (TAG_ACK, stop.to_le_bytes().to_vec()),
        Message::Heartbeat => (TAG_HEARTBEAT, Vec::new()),
        Message::Verified(stop) => (TAG_VERIFIED, stop.to_le_bytes().to_vec()),
        Message::Replayed(stop) => (TAG_REPLAYED, stop.to_le_bytes().to_vec()),
        Message::RepairRequest(epoch) => (TAG_REPAIR, epoch.to_le_bytes().to_vec()),
        Message::Resume { vm, frames } => {
            let mut p = frames.to_le_bytes().to_vec();
            p.extend_from_slice(vm.as_bytes());
            (TAG_RESUME, p)
        }
        Message::AuthHello { nonce } => (TAG_AUTH_HELLO, nonce.to_vec()),
        Message::AuthChallenge { nonce, proof } => {
            (TAG_AUTH_CHALLENGE, [&nonce[..], &proof[..]].concat())
        }
        Message::AuthProof { proof } => (TAG_AUTH_PROOF, proof.to_vec()),
        Message::Ping(t) => (TAG_PING, t.to_le_bytes().to_vec()),
        Message::Pong(t) => (TAG_PONG, t.to_le_bytes().to_vec()),
        Message::DiskState(p) => (TAG_DISK_STATE, p.clone()),
        Message::DiskChunks(p) => (TAG_DISK_CHUNKS, p.clone()),
        Message::DiskDone(p) => (TAG_DISK_DONE, p.clone()),
        Message::DiskSynced(id) => (TAG_DISK_SYNCED, id.to_le_bytes().to_vec()),
        Message::StepDown(g) => (TAG_STEP_DOWN, g.to_le_bytes().to_vec()),
        Message::Memory {
            round,
            total,
            scanned,
            pages,
        } => {
            let mut p = Vec::with_capacity(20 + pages.len());
            p.extend_from_slice(&round.to_le_bytes());
            p.extend_from_slice(&total.to_le_bytes());
            p.extend_from_slice(&scanned.to_le_bytes());
            p.extend_from_slice(pages);
            (TAG_MEMORY, p)
        }
    };
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    let mut bytes = Vec::with_capacity(HEAD_LEN + payload.len());
    bytes.push(tag);
    bytes.extend_from_slice(&generation.to_le_bytes());
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn u64_of(p: &[u8]) -> io::Result<u64> {
    p.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| bad("bad u64 payload"))
}

/// Reads one message: (generation, message). Never trusts a length beyond
/// [`MAX_PAYLOAD`]. (The channel reads through [`read_raw`].)
#[cfg(test)]
pub fn read(r: &mut impl Read) -> io::Result<(u64, Message)> {
    read_with_progress(r, &mut |_, _| {})
}

/// Bytes read between progress reports of a large message.
const PROGRESS_CHUNK: usize = 1 << 20;

/// [`read`], calling `progress(done, total)` as a message's payload arrives
/// (every MiB and at the end): a full sync point can be hundreds of MiB.
#[cfg(test)]
pub fn read_with_progress(
    r: &mut impl Read,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<(u64, Message)> {
    let (head, payload) = read_raw(r, progress)?;
    decode(&head, payload)
}

/// Reads one message's header and payload without decoding it (an
/// authenticated channel checks the MAC over these bytes first).
pub fn read_raw(
    r: &mut impl Read,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<([u8; HEAD_LEN], Vec<u8>)> {
    read_raw_limited(r, MAX_PAYLOAD, progress)
}

/// One message of at most `max` payload bytes (before authentication the
/// peer's header is not trusted to size a buffer).
pub fn read_limited(r: &mut impl Read, max: u32) -> io::Result<(u64, Message)> {
    let (head, payload) = read_raw_limited(r, max, &mut |_, _| {})?;
    decode(&head, payload)
}

fn read_raw_limited(
    r: &mut impl Read,
    max: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<([u8; HEAD_LEN], Vec<u8>)> {
    let mut head = [0u8; HEAD_LEN];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[9..13].try_into().unwrap_or([0; 4]));
    if len > max {
        return Err(bad(format!(
            "message of {len} bytes is over the limit of {max}"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    let mut done = 0u64;
    for chunk in payload.chunks_mut(PROGRESS_CHUNK) {
        r.read_exact(chunk)?;
        done += chunk.len() as u64;
        progress(done, u64::from(len));
    }
    Ok((head, payload))
}

fn fixed<const N: usize>(p: &[u8], what: &str) -> io::Result<[u8; N]> {
    p.try_into().map_err(|_| bad(format!("bad {what}")))
}

/// Decodes a message read by [`read_raw`]: (generation, message).
pub fn decode(head: &[u8; HEAD_LEN], payload: Vec<u8>) -> io::Result<(u64, Message)> {
    let generation = u64::from_le_bytes(head[1..9].try_into().unwrap_or([0; 8]));
    let text = |p: Vec<u8>| String::from_utf8(p).map_err(|_| bad("text is not UTF-8"));
    let m = match head[0] {
        TAG_HELLO => {
            if payload.len() < 4 {
                return Err(bad("short hello"));
            }
            // The VM's name, then (after a NUL) the host claimed; an older
            // secondary sends no host.
            let names = &payload[4..];
            let (vm, host) = match names.iter().position(|&b| b == 0) {
                Some(at) => (&names[..at], &names[at + 1..]),
                None => (names, &[][..]),
            };
            Message::Hello {
                min: u16::from_le_bytes([payload[0], payload[1]]),
                max: u16::from_le_bytes([payload[2], payload[3]]),
                vm: text(vm.to_vec())?,
                host: text(host.to_vec())?,
            }
        }
        TAG_WELCOME => Message::Welcome {
            version: u16::from_le_bytes(
                payload
                    .get(..2)
                    .and_then(|p| p.try_into().ok())
                    .ok_or_else(|| bad("short welcome"))?,
            ),
        },
        TAG_REFUSE => Message::Refuse {
            reason: text(payload)?,
        },
        TAG_LOG => Message::Log(payload),
        TAG_RELEASED => Message::Released(u64_of(&payload)?),
        TAG_ACK => Message::Ack(u64_of(&payload)?),
        TAG_HEARTBEAT => Message::Heartbeat,
        TAG_VERIFIED => Message::Verified(u64_of(&payload)?),
        TAG_REPLAYED => Message::Replayed(u64_of(&payload)?),
        TAG_REPAIR => Message::RepairRequest(u64_of(&payload)?),
        TAG_RESUME => {
            if payload.len() < 8 {
                return Err(bad("short resume"));
            }
            Message::Resume {
                frames: u64_of(&payload[..8])?,
                vm: text(payload[8..].to_vec())?,
            }
        }
        TAG_AUTH_HELLO => Message::AuthHello {
            nonce: fixed(&payload, "auth hello")?,
        },
        TAG_AUTH_CHALLENGE => {
            if payload.len() != NONCE_LEN + MAC_LEN {
                return Err(bad("bad auth challenge"));
            }
            Message::AuthChallenge {
                nonce: fixed(&payload[..NONCE_LEN], "auth challenge")?,
                proof: fixed(&payload[NONCE_LEN..], "auth challenge")?,
            }
        }
        TAG_AUTH_PROOF => Message::AuthProof {
            proof: fixed(&payload, "auth proof")?,
        },
        TAG_PING => Message::Ping(u64_of(&payload)?),
        TAG_PONG => Message::Pong(u64_of(&payload)?),
        TAG_DISK_STATE => Message::DiskState(payload),
        TAG_DISK_CHUNKS => Message::DiskChunks(payload),
        TAG_DISK_DONE => Message::DiskDone(payload),
        TAG_DISK_SYNCED => Message::DiskSynced(u64_of(&payload)?),
        TAG_STEP_DOWN => Message::StepDown(u64_of(&payload)?),
        TAG_MEMORY => {
            if payload.len() < 20 || (payload.len() - 20) % PAGE_ENTRY != 0 {
                return Err(bad("bad memory message"));
            }
            Message::Memory {
                round: u32::from_le_bytes(fixed(&payload[..4], "memory round")?),
                total: u64_of(&payload[4..12])?,
                scanned: u64_of(&payload[12..20])?,
                pages: payload[20..].to_vec(),
            }
        }
        tag => return Err(bad(format!("unknown message tag {tag}"))),
    };
    Ok((generation, m))
}

/// The version both sides speak, if any.
pub fn negotiate(min: u16, max: u16) -> Option<u16> {
    let top = max.min(PROTOCOL_MAX);
    (top >= min.max(PROTOCOL_MIN)).then_some(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_message_reports_its_progress_up_to_the_whole() {
        let payload: Vec<u8> = (0..(3 * PROGRESS_CHUNK + 5)).map(|i| i as u8).collect();
        let mut bytes = Vec::new();
        write(&mut bytes, 7, &Message::Log(payload.clone())).unwrap();
        let mut seen = Vec::new();
        let (generation, m) = read_with_progress(&mut bytes.as_slice(), &mut |done, total| {
            seen.push((done, total))
        })
        .unwrap();
        assert_eq!(generation, 7);
        assert!(matches!(m, Message::Log(p) if p == payload));
        let total = seen[0].1;
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
        assert_eq!(seen.last(), Some(&(total, total)));
    }

    #[test]
    fn messages_round_trip() {
        let all = [
            Message::Hello {
                min: 1,
                max: 3,
                vm: "web1".into(),
                host: "b".into(),
            },
            Message::Welcome { version: 1 },
            Message::Refuse {
                reason: "no".into(),
            },
            Message::Log(vec![1, 2, 3]),
            Message::Released(77),
            Message::Ack(99),
            Message::Heartbeat,
            Message::Verified(12),
            Message::Replayed(13),
            Message::RepairRequest(3),
            Message::Resume {
                vm: "web1".into(),
                frames: 42,
            },
            Message::AuthHello { nonce: [3; 32] },
            Message::AuthChallenge {
                nonce: [4; 32],
                proof: [5; 32],
            },
            Message::AuthProof { proof: [6; 32] },
            Message::Ping(11),
            Message::Pong(12),
            Message::DiskState(vec![1, 2]),
            Message::DiskChunks(vec![3]),
            Message::DiskDone(vec![]),
            Message::DiskSynced(13),
            Message::StepDown(14),
            Message::Memory {
                round: 2,
                total: 9,
                scanned: 1,
                pages: vec![7; PAGE_ENTRY],
            },
        ];
        let mut buf = Vec::new();
        for m in &all {
            write(&mut buf, 5, m).unwrap();
        }
        let mut r = &buf[..];
        for m in &all {
            assert_eq!(read(&mut r).unwrap(), (5, m.clone()));
        }
        assert!(read(&mut r).is_err());
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        let mut head = vec![TAG_LOG];
        head.extend_from_slice(&1u64.to_le_bytes());
        head.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read(&mut &head[..]).is_err());
        let mut unknown = vec![99u8];
        unknown.extend_from_slice(&[0; 12]);
        assert!(read(&mut &unknown[..]).is_err());
        let mut short = vec![TAG_ACK];
        short.extend_from_slice(&[0; 8]);
        short.extend_from_slice(&3u32.to_le_bytes());
        short.extend_from_slice(&[1, 2, 3]);
        assert!(read(&mut &short[..]).is_err());
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(1, 5), Some(PROTOCOL_MAX));
        assert_eq!(negotiate(PROTOCOL_MAX + 1, PROTOCOL_MAX + 2), None);
    }
}

#[cfg(test)]
mod fuzz {
    //! Replication messages come from the network: any header and payload
    //! decodes to a message or an error, never a panic, and what decodes
    //! re-encodes to the same message. `make fuzz` runs these with many
    //! more cases.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_message_bytes_decode_or_error(
            tag in 0u8..32,
            generation in any::<u64>(),
            payload in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut head = [0u8; HEAD_LEN];
            head[0] = tag;
            head[1..9].copy_from_slice(&generation.to_le_bytes());
            head[9..13].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            if let Ok((g, m)) = decode(&head, payload) {
                prop_assert_eq!(g, generation);
                // What decodes re-encodes to something that decodes the same.
                let again = encode(g, &m).unwrap();
                let head2: [u8; HEAD_LEN] = again[..HEAD_LEN].try_into().unwrap();
                prop_assert_eq!(decode(&head2, again[HEAD_LEN..].to_vec()).unwrap(), (g, m));
            }
        }

        #[test]
        fn any_stream_reads_or_errors(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut r = &bytes[..];
            while read(&mut r).is_ok() {}
        }

        /// Before authentication: any stream, any claimed length, reads a
        /// message within the limit or errors, and a header claiming more
        /// than the limit is refused before its payload is read.
        #[test]
        fn any_pre_auth_stream_reads_within_the_limit_or_errors(
            claimed in any::<u32>(),
            tag in 0u8..32,
            rest in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let limit = crate::admission::MAX_PRE_AUTH_MESSAGE;
            let mut bytes = vec![tag];
            bytes.extend_from_slice(&[0u8; 8]);
            bytes.extend_from_slice(&claimed.to_le_bytes());
            bytes.extend_from_slice(&rest);
            let mut r = &bytes[..];
            let read = read_limited(&mut r, limit);
            if claimed > limit {
                prop_assert!(read.is_err());
                // Nothing past the header was consumed.
                prop_assert_eq!(r.len(), rest.len());
            }
            while read_limited(&mut r, limit).is_ok() {}
        }
    }
}
