//! The record/replay log: what `tandem run --record` writes and the replayer
//! (offline, or live on the secondary) reads.
//!
//! # Layout
//!
//! ```text
//! header:  b"TANDEMLG"  protocol version (u16 LE)  frame(VmIdentity)
//! then:    frame(Record)  frame(Record)  ...
//! frame:   [u32 LE payload length][u32 LE crc32c of payload][payload]
//! payload: [u16 LE kind][u16 LE version][body]
//! ```
//!
//! Bodies are encoded with serde and bincode 2.0.1's standard configuration
//! (little endian, variable-length integers), pinned with `=` in Cargo.toml
//! because the bytes are the format. Golden files under `replay/tests/golden/`
//! freeze them: a change that alters an existing encoding fails those tests.
//! To change a body, add a new `version` for its kind and keep decoding the
//! old one, so that logs recorded by the previous release stay readable. New
//! variants of an enum inside a body ([`Cause`](crate::Cause), [`Check`],
//! [`EndOutcome`]) may only be appended at the end.
//!
//! # Record kinds
//!
//! | kind | version | body                                              |
//! |------|---------|---------------------------------------------------|
//! | 0    | 1       | [`VmIdentity`] (header only)                      |
//! | 0    | 2       | `(VmIdentity, position counter)` (header only; written when the log has positioned stops) |
//! | 1    | 1       | [`Record::Cause`]: `(stop, Cause)`                |
//! | 2    | 1       | [`Record::Watermark`]: `stop`                     |
//! | 3    | 1       | [`Record::SyncPoint`]: `(stop, MachineState, Vec<Page>)` |
//! | 3    | 2       | a sync point too large for one frame: `(stop, MachineState, Vec<Page>, continuations u32)`, then that many kind 7 frames |
//! | 4    | 1       | [`Record::EpochEnd`]: `(epoch, stop, runs, hashes, Scrub)` |
//! | 5    | 1       | [`Record::Check`]: `(stop, Check)`                |
//! | 6    | 1       | [`Record::End`]: `(stop, EndOutcome)`             |
//! | 7    | 1       | continuation of a version 2 sync point: `(stop, index u32 from 1, Vec<Page>)` |
//! | 8    | 1       | [`Record::Positioned`]: `(stop, count, rip, digest)` |
//!
//! These numbers are frozen: never reuse or renumber one.
//!
//! # Record numbers and offsets
//!
//! Every error found while reading names the byte offset of the frame it is
//! in (from the start of the file) and its *record number*, which counts
//! frames: record 0 is the [`VmIdentity`] in the header, record 1 the first
//! [`Record`]. An error in the magic or the protocol version is at offset 0,
//! record 0.
//!
//! # Damage
//!
//! A frame cut short by the end of the input is a [`LogError::TornTail`]: the
//! recorder was killed mid-write, and the replayer replays up to the last
//! watermark and warns. A cut exactly between frames is a valid log that
//! just ends; whether a missing [`Record::End`] matters is the replayer's
//! call. A bad length, crc mismatch, undecodable body, unknown kind or
//! version, or records out of order ([`OrderCheck`]) is a
//! [`LogError::Corrupt`]. The reader never trusts a length from the input:
//! frames are capped at [`MAX_FRAME_LEN`], payloads are read as the bytes
//! arrive rather than allocated up front, and bodies are decoded with a
//! bincode limit scaled to the payload size.

mod file;
mod frame;
mod identity;
#[cfg(test)]
mod limit_tests;
mod reader;
mod record;
mod writer;

pub use file::LogFile;
pub use frame::{FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use identity::{image_hash, CpuidEntry, DeviceDesc, VmIdentity};
pub use reader::LogReader;
pub use record::{
    validate_order, Check, EndOutcome, MachineState, OrderCheck, Page, Record, Scrub, VcpuState,
    PAGE_SIZE,
};
pub use writer::LogWriter;

/// The 8 bytes every log starts with.
pub const MAGIC: [u8; 8] = *b"TANDEMLG";
/// The protocol version this build writes.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build reads.
pub const MIN_READ_VERSION: u16 = 1;
/// The newest protocol version this build reads.
pub const MAX_READ_VERSION: u16 = 1;
/// Bytes before the identity frame: the magic and the protocol version.
pub const PREAMBLE_LEN: usize = MAGIC.len() + 2;

/// Why a log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The input does not start with [`MAGIC`].
    #[error("not a tandem log: it starts with {found:02x?}, not \"TANDEMLG\"")]
    BadMagic {
        /// The first bytes found (up to 8).
        found: Vec<u8>,
    },
    /// The log's protocol version is outside what this build reads.
    #[error("log recorded by protocol version {found}, this build reads {min}–{max}")]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
        /// The oldest version this build reads.
        min: u16,
        /// The newest version this build reads.
        max: u16,
    },
    /// A frame that is whole but wrong: bad length, crc mismatch,
    /// undecodable body, unknown kind or version, or out of order.
    #[error("corrupt log at byte {offset} (record {record}): {reason}")]
    Corrupt {
        /// Byte offset of the frame's start.
        offset: u64,
        /// Record number (0 is the identity, 1 the first record).
        record: u64,
        /// What is wrong.
        reason: String,
    },
    /// The input ends inside a frame: the recorder was killed mid-write.
    #[error(
        "log ends inside record {record} at byte {offset}: {have} of its {need} bytes are there"
    )]
    TornTail {
        /// Byte offset of the frame's start.
        offset: u64,
        /// Record number (0 is the identity, 1 the first record).
        record: u64,
        /// Bytes of the frame (header included) that are there.
        have: u64,
        /// Bytes the frame needs (header included, as far as known).
        need: u64,
    },
    /// Reading or writing the underlying file or stream failed.
    #[error("log I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// Appending would take the log past its size cap; nothing was written.
    #[error("log is full: {need} more bytes would take it past its cap of {max} bytes ({written} written)")]
    Full {
        /// Bytes already in the log.
        written: u64,
        /// Bytes the refused frame needs.
        need: u64,
        /// The cap.
        max: u64,
    },
    /// The writer refuses a record it could not read back.
    #[error("refusing to log an invalid record: {0}")]
    Invalid(String),
}

impl LogError {
    /// True for a [`LogError::TornTail`]: the log is good up to this point.
    pub fn is_torn_tail(&self) -> bool {
        matches!(self, LogError::TornTail { .. })
    }
}
