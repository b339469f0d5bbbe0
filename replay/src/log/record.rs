//! The records of the log and their encodings.
//!
//! Each [`Record`] variant has its own kind number and version (see the
//! table in the [module docs](super)); its body is a bincode tuple of the
//! variant's fields in declaration order. [`OrderCheck`] is the semantic
//! check the reader applies on top: stop numbers never go backwards, and
//! nothing is logged for a stop the recorder has already left.

use serde::{Deserialize, Serialize};

use super::frame::{bytes, decode_body, encode_frame};
use super::LogError;
use crate::port::Cause;

/// Bytes in a guest page.
pub const PAGE_SIZE: usize = 4096;

pub(crate) const KIND_IDENTITY: u16 = 0;
const KIND_CAUSE: u16 = 1;
const KIND_WATERMARK: u16 = 2;
const KIND_SYNC_POINT: u16 = 3;
const KIND_EPOCH_END: u16 = 4;
const KIND_CHECK: u16 = 5;
const KIND_END: u16 = 6;
/// More pages of the sync point before it (a continuation, kind 7).
const KIND_SYNC_PAGES: u16 = 7;
const KIND_POSITIONED: u16 = 8;
/// The version every kind is written with by this build (a sync point too
/// large for one frame is written as version 2 plus continuations).
pub(crate) const VERSION_1: u16 = 1;
/// The VM identity with its position counter: `(VmIdentity, String)`.
pub(crate) const IDENTITY_VERSION_2: u16 = 2;
/// Sync point version 2: `(stop, MachineState, first pages, continuations)`.
const VERSION_2: u16 = 2;

/// Encoded bytes of one page in a body, at most: gfn (varint, up to 9),
/// length (varint, 3) and the data.
const PAGE_ENCODED_MAX: usize = PAGE_SIZE + 12;
/// Room in a frame for everything in a sync point but its pages (vCPU and
/// device state are a few KiB; this leaves ample margin).
const SYNC_POINT_STATE_ROOM: usize = 16 << 20;
/// Pages per frame of a sync point written as continuations.
const PAGES_PER_FRAME: usize =
    (super::frame::MAX_FRAME_LEN as usize - SYNC_POINT_STATE_ROOM) / PAGE_ENCODED_MAX;

/// The vCPU's complete state at a sync point (DESIGN, contract rule 7).
///
/// The VMM fills the byte vectors from the KVM structs (`kvm_regs`,
/// `kvm_sregs`, ...) and reads them back; the log keeps them opaque.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// `kvm_regs`.
    #[serde(with = "bytes")]
    pub regs: Vec<u8>,
    /// `kvm_sregs`.
    #[serde(with = "bytes")]
    pub sregs: Vec<u8>,
    /// `kvm_fpu`.
    #[serde(with = "bytes")]
    pub fpu: Vec<u8>,
    /// `kvm_xsave`.
    #[serde(with = "bytes")]
    pub xsave: Vec<u8>,
    /// `kvm_xcrs`.
    #[serde(with = "bytes")]
    pub xcrs: Vec<u8>,
    /// `kvm_debugregs`.
    #[serde(with = "bytes")]
    pub debugregs: Vec<u8>,
    /// `kvm_vcpu_events`.
    #[serde(with = "bytes")]
    pub events: Vec<u8>,
    /// The guest-visible MSRs, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The VMM's "halted at this stop" flag.
    pub halted: bool,
}

/// The vCPU and every device model's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// The vCPU.
    pub vcpu: VcpuState,
    /// (component name, serialized device state), in a fixed order.
    pub devices: Vec<(String, Vec<u8>)>,
}

/// One guest page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Guest frame number.
    pub gfn: u64,
    /// The page's [`PAGE_SIZE`] bytes.
    #[serde(with = "bytes")]
    pub data: Vec<u8>,
}

/// The rotating memory scrub of an epoch end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scrub {
    /// First guest frame hashed.
    pub first_gfn: u64,
    /// Pages hashed.
    pub count: u32,
    /// Their hash.
    pub hash: u64,
}

/// A cross-check: something the guest observed that follows from the
/// causes. The replayer compares; it never replays these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Check {
    /// An interrupt was injected.
    Injected {
        /// The vector.
        vector: u8,
    },
    /// A port read returned `value`.
    PioRead {
        /// The port.
        port: u16,
        /// The value returned.
        value: u32,
    },
    /// An MMIO read returned `value`.
    MmioRead {
        /// The guest-physical address.
        addr: u64,
        /// The value returned.
        value: u64,
    },
    /// The guest wrote these bytes to its console at this stop. Replay
    /// prints the recorded bytes and compares its own.
    SerialOut {
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The guest crashed at this stop and the VMM rebooted it from its boot
    /// state (`on_guest_crash = "reboot"`): a replay reboots here too.
    GuestReboot {
        /// The crash, in words.
        crash: String,
    },
    /// `on_guest_crash = "restart-checkpoint"`: the VMM took a checkpoint
    /// here (vCPU, devices, memory); a replay takes one here too.
    Checkpoint,
    /// The guest crashed at this stop and the VMM rolled it back to its
    /// checkpoint at stop `to`, delaying its next timer interrupt by
    /// `timer_delay_ns` of guest time (the perturbation): a replay does the
    /// same here.
    GuestRollback {
        /// The crash, in words.
        crash: String,
        /// The stop of the checkpoint returned to.
        to: u64,
        /// How much later than due the next timer interrupt comes.
        timer_delay_ns: u64,
    },
}

/// How a recording ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndOutcome {
    /// The guest asked to exit with this status.
    GuestExit(u8),
    /// The guest reset the machine.
    Reset,
    /// The VMM failed; the reason.
    Crashed(String),
    /// The operator stopped the VM.
    Stopped,
}

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An input applied at stop `stop` (kind 1).
    Cause {
        /// The stop.
        stop: u64,
        /// The input.
        cause: Cause,
    },
    /// The recorder has left stop `stop`: everything for stops ≤ `stop` is
    /// logged (kind 2).
    Watermark {
        /// The stop left.
        stop: u64,
    },
    /// The complete state at a non-reproducible stop (kind 3).
    SyncPoint {
        /// The stop.
        stop: u64,
        /// vCPU and device state.
        state: MachineState,
        /// Pages dirtied since the previous sync point.
        pages: Vec<Page>,
    },
    /// The end of a verified-lockstep epoch (kind 4).
    EpochEnd {
        /// Epoch number.
        epoch: u64,
        /// The stop it ended at.
        stop: u64,
        /// Pages dirtied in the epoch, as (first gfn, run length) runs.
        pages: Vec<(u64, u32)>,
        /// Per-component state hashes.
        hashes: Vec<(String, u64)>,
        /// This epoch's memory scrub.
        scrub: Scrub,
    },
    /// A cross-check at stop `stop` (kind 5).
    Check {
        /// The stop.
        stop: u64,
        /// What the guest observed.
        check: Check,
    },
    /// The recording ended at stop `stop` (kind 6).
    End {
        /// The stop.
        stop: u64,
        /// Why.
        outcome: EndOutcome,
    },
    /// A positioned stop (kind 8): the recorder interrupted the guest after
    /// exactly `count` instructions since the previous stop, at `rip` with
    /// the position digest `digest`. A replay runs to that count, checks
    /// RIP and digest, and applies what the stop carries there: no state is
    /// copied. It is the first record of its stop.
    Positioned {
        /// The stop.
        stop: u64,
        /// Guest instructions since the previous stop, by the log's counter.
        count: u64,
        /// The guest's RIP there.
        rip: u64,
        /// The position digest of the vCPU there.
        digest: u64,
    },
}

impl Record {
    /// The record's kind number in the log.
    pub fn kind(&self) -> u16 {
        match self {
            Record::Cause { .. } => KIND_CAUSE,
            Record::Watermark { .. } => KIND_WATERMARK,
            Record::SyncPoint { .. } => KIND_SYNC_POINT,
            Record::EpochEnd { .. } => KIND_EPOCH_END,
            Record::Check { .. } => KIND_CHECK,
            Record::End { .. } => KIND_END,
            Record::Positioned { .. } => KIND_POSITIONED,
        }
    }

    /// The stop the record belongs to.
    pub fn stop(&self) -> u64 {
        match self {
            Record::Cause { stop, .. }
            | Record::Watermark { stop }
            | Record::SyncPoint { stop, .. }
            | Record::EpochEnd { stop, .. }
            | Record::Check { stop, .. }
            | Record::End { stop, .. }
            | Record::Positioned { stop, .. } => *stop,
        }
    }

    /// Checks what the types cannot say: pages are [`PAGE_SIZE`] bytes,
    /// page runs are non-empty and do not overflow.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Record::SyncPoint { pages, .. } => check_pages(pages),
            Record::EpochEnd { pages, .. } => {
                match pages
                    .iter()
                    .find(|&&(first, len)| len == 0 || first.checked_add(u64::from(len)).is_none())
                {
                    Some((first, len)) => Err(format!("bad page run {first:#x}+{len}")),
                    None => Ok(()),
                }
            }
            Record::Cause { .. }
            | Record::Watermark { .. }
            | Record::Check { .. }
            | Record::End { .. }
            | Record::Positioned { .. } => Ok(()),
        }
    }

    /// Encodes the record as one frame, or (a sync point larger than a
    /// frame) as a version 2 sync point followed by continuation frames.
    /// Each frame is its own buffer, so a link can ship them one by one.
    pub fn encode_frames(&self) -> Result<Vec<Vec<u8>>, LogError> {
        self.encode_frames_split(PAGES_PER_FRAME)
    }

    /// [`Record::encode_frames`] with at most `per_frame` pages in a sync
    /// point's frame before it is split (tests use small numbers).
    pub(crate) fn encode_frames_split(&self, per_frame: usize) -> Result<Vec<Vec<u8>>, LogError> {
        self.validate().map_err(LogError::Invalid)?;
        let v = VERSION_1;
        let frame = match self {
            Record::SyncPoint { stop, state, pages } if pages.len() > per_frame => {
                return encode_split_sync_point(*stop, state, pages, per_frame.max(1))
            }
            Record::Cause { stop, cause } => encode_frame(KIND_CAUSE, v, &(stop, cause)),
            Record::Watermark { stop } => encode_frame(KIND_WATERMARK, v, stop),
            Record::SyncPoint { stop, state, pages } => {
                encode_frame(KIND_SYNC_POINT, v, &(stop, state, pages))
            }
            Record::EpochEnd {
                epoch,
                stop,
                pages,
                hashes,
                scrub,
            } => encode_frame(KIND_EPOCH_END, v, &(epoch, stop, pages, hashes, scrub)),
            Record::Check { stop, check } => encode_frame(KIND_CHECK, v, &(stop, check)),
            Record::End { stop, outcome } => encode_frame(KIND_END, v, &(stop, outcome)),
            Record::Positioned {
                stop,
                count,
                rip,
                digest,
            } => encode_frame(KIND_POSITIONED, v, &(stop, count, rip, digest)),
        }?;
        Ok(vec![frame])
    }

    /// Decodes the body of a frame of `kind` and `version` that stands
    /// alone (not a part of a split sync point).
    #[cfg(test)]
    pub(crate) fn decode(kind: u16, version: u16, body: &[u8]) -> Result<Record, String> {
        match decode_part(kind, version, body)? {
            Part::Whole(record) => Ok(record),
            Part::SyncHead { .. } | Part::SyncPages { .. } => Err(format!(
                "kind {kind} version {version} is part of a split sync point"
            )),
        }
    }
}

/// Encodes a sync point as a version 2 head with the first `per_frame`
/// pages and continuation frames with the rest, `per_frame` each.
fn encode_split_sync_point(
    stop: u64,
    state: &MachineState,
    pages: &[Page],
    per_frame: usize,
) -> Result<Vec<Vec<u8>>, LogError> {
    let mut chunks = pages.chunks(per_frame);
    let first = chunks.next().unwrap_or(&[]);
    let rest: Vec<&[Page]> = chunks.collect();
    let continuations = u32::try_from(rest.len())
        .map_err(|_| LogError::Invalid(format!("a sync point of {} pages", pages.len())))?;
    let mut frames = Vec::with_capacity(rest.len() + 1);
    frames.push(encode_frame(
        KIND_SYNC_POINT,
        VERSION_2,
        &(stop, state, first, continuations),
    )?);
    for (index, chunk) in (1u32..).zip(rest) {
        frames.push(encode_frame(
            KIND_SYNC_PAGES,
            VERSION_1,
            &(stop, index, chunk),
        )?);
    }
    Ok(frames)
}

/// What one frame holds: a whole record, or a part of a split sync point.
#[derive(Debug)]
pub(crate) enum Part {
    /// A record in one frame.
    Whole(Record),
    /// A sync point whose pages go on in `continuations` more frames.
    SyncHead {
        /// The stop.
        stop: u64,
        /// vCPU and device state.
        state: MachineState,
        /// The first pages.
        pages: Vec<Page>,
        /// Continuation frames that follow.
        continuations: u32,
    },
    /// Continuation `index` (1, 2, ...) of the sync point at `stop`.
    SyncPages {
        /// The stop.
        stop: u64,
        /// Which continuation.
        index: u32,
        /// Its pages.
        pages: Vec<Page>,
    },
}

/// Decodes the body of a frame of `kind` and `version`.
pub(crate) fn decode_part(kind: u16, version: u16, body: &[u8]) -> Result<Part, String> {
    let record = match (kind, version) {
        (KIND_CAUSE, VERSION_1) => {
            let (stop, cause) = decode_body(body)?;
            Record::Cause { stop, cause }
        }
        (KIND_WATERMARK, VERSION_1) => Record::Watermark {
            stop: decode_body(body)?,
        },
        (KIND_SYNC_POINT, VERSION_1) => {
            let (stop, state, pages) = decode_body(body)?;
            Record::SyncPoint { stop, state, pages }
        }
        (KIND_SYNC_POINT, VERSION_2) => {
            let (stop, state, pages, continuations): (u64, MachineState, Vec<Page>, u32) =
                decode_body(body)?;
            check_pages(&pages)?;
            return Ok(Part::SyncHead {
                stop,
                state,
                pages,
                continuations,
            });
        }
        (KIND_SYNC_PAGES, VERSION_1) => {
            let (stop, index, pages): (u64, u32, Vec<Page>) = decode_body(body)?;
            check_pages(&pages)?;
            return Ok(Part::SyncPages { stop, index, pages });
        }
        (KIND_EPOCH_END, VERSION_1) => {
            let (epoch, stop, pages, hashes, scrub) = decode_body(body)?;
            Record::EpochEnd {
                epoch,
                stop,
                pages,
                hashes,
                scrub,
            }
        }
        (KIND_CHECK, VERSION_1) => {
            let (stop, check) = decode_body(body)?;
            Record::Check { stop, check }
        }
        (KIND_END, VERSION_1) => {
            let (stop, outcome) = decode_body(body)?;
            Record::End { stop, outcome }
        }
        (KIND_POSITIONED, VERSION_1) => {
            let (stop, count, rip, digest) = decode_body(body)?;
            Record::Positioned {
                stop,
                count,
                rip,
                digest,
            }
        }
        (KIND_IDENTITY, _) => return Err("a second VM identity after the header".into()),
        _ => return Err(format!("unknown record kind {kind} version {version}")),
    };
    record.validate()?;
    Ok(Part::Whole(record))
}

/// Every page is [`PAGE_SIZE`] bytes.
fn check_pages(pages: &[Page]) -> Result<(), String> {
    match pages.iter().find(|p| p.data.len() != PAGE_SIZE) {
        Some(p) => Err(format!(
            "page {:#x} has {} bytes, not {PAGE_SIZE}",
            p.gfn,
            p.data.len()
        )),
        None => Ok(()),
    }
}

/// The stateless order rule: a record's stop is never below `prev_stop`,
/// the highest stop of the records before it (None at the start).
pub fn validate_order(prev_stop: Option<u64>, record: &Record) -> Result<(), String> {
    match prev_stop {
        Some(prev) if record.stop() < prev => Err(format!(
            "kind {} record at stop {} after stop {prev}: stops went backwards",
            record.kind(),
            record.stop()
        )),
        _ => Ok(()),
    }
}

/// The order rules the reader applies to each record in turn:
/// [`validate_order`]; after `Watermark { stop: S }` nothing but another
/// watermark may be logged at a stop ≤ S (watermarks never decrease); and
/// nothing follows [`Record::End`].
#[derive(Clone, Debug, Default)]
pub struct OrderCheck {
    last_stop: Option<u64>,
    watermark: Option<u64>,
    ended: bool,
}

impl OrderCheck {
    /// A check at the start of a log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `record` against the records before it and, if it passes,
    /// takes it into account.
    pub fn check(&mut self, record: &Record) -> Result<(), String> {
        if self.ended {
            return Err(format!(
                "kind {} record after the End record",
                record.kind()
            ));
        }
        validate_order(self.last_stop, record)?;
        let stop = record.stop();
        match (record, self.watermark) {
            (Record::Watermark { .. }, _) => self.watermark = Some(stop),
            (_, Some(w)) if stop <= w => {
                return Err(format!(
                    "kind {} record at stop {stop} after watermark {w}: that stop was already left",
                    record.kind()
                ))
            }
            _ => {}
        }
        self.ended = matches!(record, Record::End { .. });
        self.last_stop = Some(stop);
        Ok(())
    }

    /// The highest stop seen.
    pub fn last_stop(&self) -> Option<u64> {
        self.last_stop
    }

    /// The last watermark seen: replay may run up to and including it.
    pub fn watermark(&self) -> Option<u64> {
        self.watermark
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::frame::read_frame;

    fn round_trip(record: &Record) -> Record {
        let bytes = record.encode_frames().unwrap().concat();
        let frame = read_frame(&mut &bytes[..], 0, 1).unwrap().unwrap();
        assert_eq!(frame.kind, record.kind());
        Record::decode(frame.kind, frame.version, frame.body()).unwrap()
    }

    #[test]
    fn every_end_outcome_and_check_round_trips() {
        let outcomes = [
            EndOutcome::GuestExit(3),
            EndOutcome::Reset,
            EndOutcome::Crashed("KVM_RUN failed".into()),
            EndOutcome::Stopped,
        ];
        for outcome in outcomes {
            let r = Record::End { stop: 9, outcome };
            assert_eq!(round_trip(&r), r);
        }
        let checks = [
            Check::Injected { vector: 0x20 },
            Check::PioRead {
                port: 0x3fd,
                value: 0x60,
            },
            Check::MmioRead {
                addr: 0xd000_0000,
                value: u64::MAX,
            },
        ];
        for check in checks {
            let r = Record::Check { stop: 1, check };
            assert_eq!(round_trip(&r), r);
        }
    }

    #[test]
    fn bad_pages_are_refused_on_both_sides() {
        let r = Record::SyncPoint {
            stop: 1,
            state: MachineState::default(),
            pages: vec![Page {
                gfn: 5,
                data: vec![0; 10],
            }],
        };
        assert!(matches!(r.encode_frames(), Err(LogError::Invalid(_))));
        let body = bincode::serde::encode_to_vec(
            (1u64, MachineState::default(), vec![(5u64, vec![0u8; 10])]),
            bincode::config::standard(),
        )
        .unwrap();
        let err = Record::decode(KIND_SYNC_POINT, 1, &body).unwrap_err();
        assert!(err.contains("not 4096"), "{err}");
        let run = Record::EpochEnd {
            epoch: 0,
            stop: 0,
            pages: vec![(u64::MAX, 2)],
            hashes: vec![],
            scrub: Scrub::default(),
        };
        assert!(run.validate().is_err());
    }

    #[test]
    fn unknown_kinds_and_versions_are_named() {
        let err = Record::decode(KIND_WATERMARK, 2, &[0]).unwrap_err();
        assert_eq!(err, "unknown record kind 2 version 2");
        assert!(Record::decode(99, 1, &[0]).is_err());
        assert!(Record::decode(KIND_IDENTITY, 1, &[0]).is_err());
    }

    #[test]
    fn order_rules() {
        let w = |stop| Record::Watermark { stop };
        let c = |stop| Record::Check {
            stop,
            check: Check::Injected { vector: 1 },
        };
        let end = |stop| Record::End {
            stop,
            outcome: EndOutcome::Stopped,
        };
        assert!(validate_order(None, &c(0)).is_ok());
        assert!(validate_order(Some(3), &c(3)).is_ok());
        assert!(validate_order(Some(4), &c(3)).is_err());

        let mut order = OrderCheck::new();
        for r in [c(1), c(1), w(1), w(1), c(2), w(3), c(4), end(4)] {
            order.check(&r).unwrap();
        }
        assert_eq!(order.watermark(), Some(3));
        assert!(order.check(&c(5)).unwrap_err().contains("after the End"));

        let mut order = OrderCheck::new();
        order.check(&w(5)).unwrap();
        assert!(order.check(&c(5)).unwrap_err().contains("already left"));
        assert!(order.check(&w(4)).unwrap_err().contains("backwards"));
        // A refused record leaves the state as it was.
        order.check(&c(6)).unwrap();
    }
}
