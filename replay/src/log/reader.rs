//! [`LogReader`]: checks the header, then yields one [`Record`] per frame.

use std::io::Read;

use super::frame::{decode_body, read_frame, read_full};
use super::identity::VmIdentity;
use super::record::{
    decode_part, OrderCheck, Page, Part, Record, IDENTITY_VERSION_2, KIND_IDENTITY, VERSION_1,
};
use super::{LogError, MAGIC, MAX_READ_VERSION, MIN_READ_VERSION, PREAMBLE_LEN};

/// Reads a log from any [`Read`] (wrap files in a `BufReader`).
///
/// It is an iterator of `Result<Record, LogError>`: `None` where the input
/// ends between two frames, and after the first error, which is final.
/// By default every record passes an [`OrderCheck`]; a record out of order
/// is a [`LogError::Corrupt`].
#[derive(Debug)]
pub struct LogReader<R: Read> {
    inner: R,
    offset: u64,
    record: u64,
    order: OrderCheck,
    check_order: bool,
    watermark: Option<u64>,
    done: bool,
}

impl<R: Read> LogReader<R> {
    /// Reads and checks the header: magic, protocol version, VM identity.
    pub fn open(mut r: R) -> Result<(Self, VmIdentity), LogError> {
        let mut preamble = [0u8; PREAMBLE_LEN];
        let got = read_full(&mut r, &mut preamble)?;
        let magic_len = got.min(MAGIC.len());
        if preamble[..magic_len] != MAGIC[..magic_len] {
            return Err(LogError::BadMagic {
                found: preamble[..magic_len].to_vec(),
            });
        }
        if got < PREAMBLE_LEN {
            return Err(LogError::TornTail {
                offset: 0,
                record: 0,
                have: got as u64,
                need: PREAMBLE_LEN as u64,
            });
        }
        let found = u16::from_le_bytes([preamble[8], preamble[9]]);
        if !(MIN_READ_VERSION..=MAX_READ_VERSION).contains(&found) {
            return Err(LogError::UnsupportedVersion {
                found,
                min: MIN_READ_VERSION,
                max: MAX_READ_VERSION,
            });
        }
        let offset = PREAMBLE_LEN as u64;
        let corrupt = |reason: String| LogError::Corrupt {
            offset,
            record: 0,
            reason,
        };
        let frame = read_frame(&mut r, offset, 0)?.ok_or(LogError::TornTail {
            offset,
            record: 0,
            have: 0,
            need: super::FRAME_HEADER_LEN as u64,
        })?;
        let identity = match (frame.kind, frame.version) {
            (KIND_IDENTITY, VERSION_1) => decode_body::<VmIdentity>(frame.body()),
            (KIND_IDENTITY, IDENTITY_VERSION_2) => decode_body::<(VmIdentity, String)>(frame.body())
                .map(|(identity, position)| VmIdentity {
                    position,
                    ..identity
                }),
            (kind, version) => {
                return Err(corrupt(format!(
                    "expected the VM identity (kind 0 version 1 or 2), found kind {kind} version {version}"
                )))
            }
        }
        .map_err(|e| corrupt(format!("VM identity: {e}")))?;
        let reader = Self {
            inner: r,
            offset: offset + frame.frame_len(),
            record: 1,
            order: OrderCheck::new(),
            check_order: true,
            watermark: None,
            done: false,
        };
        Ok((reader, identity))
    }

    /// Turns the [`OrderCheck`] off (for tools that inspect damaged logs).
    pub fn without_order_check(mut self) -> Self {
        self.check_order = false;
        self
    }

    /// Reads the next record; `Ok(None)` at a clean end of input.
    pub fn read_record(&mut self) -> Result<Option<Record>, LogError> {
        if self.done {
            return Ok(None);
        }
        let result = self.read_inner();
        if !matches!(result, Ok(Some(_))) {
            self.done = true;
        }
        result
    }

    fn read_inner(&mut self) -> Result<Option<Record>, LogError> {
        let (offset, record) = (self.offset, self.record);
        let corrupt = |reason: String| LogError::Corrupt {
            offset,
            record,
            reason,
        };
        let Some(frame) = read_frame(&mut self.inner, offset, record)? else {
            return Ok(None);
        };
        let rec = match decode_part(frame.kind, frame.version, frame.body()).map_err(corrupt)? {
            Part::Whole(rec) => {
                self.offset += frame.frame_len();
                self.record += 1;
                rec
            }
            Part::SyncHead {
                stop,
                state,
                mut pages,
                continuations,
            } => {
                self.offset += frame.frame_len();
                self.record += 1;
                for index in 1..=continuations {
                    pages.extend(self.read_continuation(stop, index)?);
                }
                Record::SyncPoint { stop, state, pages }
            }
            Part::SyncPages { stop, .. } => {
                return Err(corrupt(format!(
                    "sync point pages for stop {stop} with no sync point before them"
                )))
            }
        };
        if self.check_order {
            self.order.check(&rec).map_err(corrupt)?;
        }
        if let Record::Watermark { stop } = rec {
            self.watermark = Some(self.watermark.map_or(stop, |w| w.max(stop)));
        }
        Ok(Some(rec))
    }

    /// Reads continuation `index` of the split sync point at `stop`.
    fn read_continuation(&mut self, stop: u64, index: u32) -> Result<Vec<Page>, LogError> {
        let (offset, record) = (self.offset, self.record);
        let corrupt = |reason: String| LogError::Corrupt {
            offset,
            record,
            reason,
        };
        let frame = read_frame(&mut self.inner, offset, record)?.ok_or(LogError::TornTail {
            offset,
            record,
            have: 0,
            need: super::FRAME_HEADER_LEN as u64,
        })?;
        match decode_part(frame.kind, frame.version, frame.body()).map_err(corrupt)? {
            Part::SyncPages {
                stop: s,
                index: i,
                pages,
            } if (s, i) == (stop, index) => {
                self.offset += frame.frame_len();
                self.record += 1;
                Ok(pages)
            }
            other => Err(corrupt(format!(
                "expected continuation {index} of the sync point at stop {stop}, found {}",
                describe(&other)
            ))),
        }
    }

    /// Byte offset of the next frame: after a clean end, the log's length;
    /// after an error, the start of the frame it names.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The record number the next frame will have.
    pub fn next_record_number(&self) -> u64 {
        self.record
    }

    /// The highest watermark read so far: after a torn tail, replay may run
    /// up to and including this stop.
    pub fn watermark(&self) -> Option<u64> {
        self.watermark
    }
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.read_record().transpose()
    }
}

impl<R: Read> std::iter::FusedIterator for LogReader<R> {}

/// A frame's part, in words, for an error.
fn describe(part: &Part) -> String {
    match part {
        Part::Whole(r) => format!("a kind {} record at stop {}", r.kind(), r.stop()),
        Part::SyncHead { stop, .. } => format!("another sync point (stop {stop})"),
        Part::SyncPages { stop, index, .. } => {
            format!("continuation {index} of the sync point at stop {stop}")
        }
    }
}
