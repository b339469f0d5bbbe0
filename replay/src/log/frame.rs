//! Frames, payload headers and bincode bodies.
//!
//! A frame is `[u32 LE length][u32 LE crc32c][payload]`, the payload
//! `[u16 LE kind][u16 LE version][body]`. Writing builds a whole frame in
//! one buffer; reading takes the 8-byte header, checks the length against
//! [`MAX_FRAME_LEN`] and then reads the payload as its bytes arrive, so a
//! damaged length can never make the reader allocate more than the input
//! holds (plus the growth slack of a `Vec`).

use std::io::{self, Read};

use bincode::config;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::LogError;

/// Bytes of a frame header: length and crc.
pub const FRAME_HEADER_LEN: usize = 8;
/// The largest payload a frame may hold (256 MiB); the reader refuses a
/// longer length before reading or allocating anything for it.
pub const MAX_FRAME_LEN: u32 = 256 << 20;
/// Bytes of the payload header: kind and version.
pub(crate) const PAYLOAD_HEADER_LEN: usize = 4;

/// The initial payload buffer; it grows only as bytes actually arrive.
const INITIAL_READ_CAPACITY: usize = 64 << 10;

/// The bincode configuration of every body (its limit is set per decode).
fn base_config() -> config::Configuration {
    config::standard()
}

/// Encodes a whole frame: header, kind, version, then `body` with bincode.
pub(crate) fn encode_frame<T: Serialize>(
    kind: u16,
    version: u16,
    body: &T,
) -> Result<Vec<u8>, LogError> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    buf.extend_from_slice(&kind.to_le_bytes());
    buf.extend_from_slice(&version.to_le_bytes());
    bincode::serde::encode_into_std_write(body, &mut buf, base_config())
        .map_err(|e| LogError::Invalid(format!("cannot encode kind {kind}: {e}")))?;
    let payload_len = buf.len() - FRAME_HEADER_LEN;
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_LEN)
        .ok_or_else(|| {
            LogError::Invalid(format!(
                "a kind {kind} record of {payload_len} bytes is over the {MAX_FRAME_LEN}-byte frame limit"
            ))
        })?;
    let crc = crc32c::crc32c(&buf[FRAME_HEADER_LEN..]);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Reads into `buf` until it is full or the input ends; returns the count.
pub(crate) fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A frame whose crc matched, split into its parts.
#[derive(Debug)]
pub(crate) struct RawFrame {
    pub kind: u16,
    pub version: u16,
    /// The whole payload; the body is `payload[PAYLOAD_HEADER_LEN..]`.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The bincode body.
    pub fn body(&self) -> &[u8] {
        &self.payload[PAYLOAD_HEADER_LEN..]
    }

    /// Bytes the frame took in the input, header included.
    pub fn frame_len(&self) -> u64 {
        (FRAME_HEADER_LEN + self.payload.len()) as u64
    }
}

/// Reads one frame starting at byte `offset`, record number `record`.
///
/// `Ok(None)` when the input ends exactly at the frame boundary.
pub(crate) fn read_frame<R: Read>(
    r: &mut R,
    offset: u64,
    record: u64,
) -> Result<Option<RawFrame>, LogError> {
    let corrupt = |reason: String| LogError::Corrupt {
        offset,
        record,
        reason,
    };
    let mut header = [0u8; FRAME_HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < FRAME_HEADER_LEN {
        return Err(LogError::TornTail {
            offset,
            record,
            have: got as u64,
            need: FRAME_HEADER_LEN as u64,
        });
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_FRAME_LEN {
        return Err(corrupt(format!(
            "frame length {len} is over the {MAX_FRAME_LEN}-byte limit"
        )));
    }
    if (len as usize) < PAYLOAD_HEADER_LEN {
        return Err(corrupt(format!(
            "frame length {len} is too short for a kind and version"
        )));
    }
    let mut payload = Vec::with_capacity((len as usize).min(INITIAL_READ_CAPACITY));
    let got = r.by_ref().take(u64::from(len)).read_to_end(&mut payload)?;
    if got < len as usize {
        return Err(LogError::TornTail {
            offset,
            record,
            have: (FRAME_HEADER_LEN + got) as u64,
            need: FRAME_HEADER_LEN as u64 + u64::from(len),
        });
    }
    let actual = crc32c::crc32c(&payload);
    if actual != crc {
        return Err(corrupt(format!(
            "crc32c mismatch: frame says {crc:#010x}, payload has {actual:#010x}"
        )));
    }
    Ok(Some(RawFrame {
        kind: u16::from_le_bytes([payload[0], payload[1]]),
        version: u16::from_le_bytes([payload[2], payload[3]]),
        payload,
    }))
}

/// bincode's limit counts in-memory sizes, not encoded bytes: a primitive
/// claims its full width (up to 16 bytes for a u128) however few bytes its
/// variable-length encoding took, so a valid body claims at most this many
/// times its length.
pub(crate) const MAX_CLAIM_PER_BYTE: usize = 16;

/// Decodes a whole body as `T`, refusing trailing bytes.
///
/// The limit is the smallest of 64 KiB, 256 KiB, ... 4 GiB that is at
/// least [`MAX_CLAIM_PER_BYTE`] times the body's length, so whatever the
/// writer produced decodes (an earlier limit sized from the encoded length
/// refused epoch ends with a few hundred page runs). Byte strings (pages,
/// device state) are decoded borrowed from the body, so their lengths are
/// checked against the bytes actually there before anything is copied; a
/// damaged length elsewhere can claim at most the limit, and the frame cap
/// bounds the limit.
pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let claim = body.len().saturating_mul(MAX_CLAIM_PER_BYTE);
    macro_rules! with_limit_tiers {
        ($($limit:expr),*) => {
            $(
                if claim <= $limit {
                    let cfg = base_config().with_limit::<{ $limit }>();
                    return finish(bincode::serde::borrow_decode_from_slice::<T, _>(body, cfg), body.len());
                }
            )*
        };
    }
    with_limit_tiers!(
        1 << 16,
        1 << 18,
        1 << 20,
        1 << 22,
        1 << 24,
        1 << 26,
        1 << 28,
        1 << 30,
        1 << 32
    );
    Err(format!("body of {} bytes is over the limit", body.len()))
}

fn finish<T>(
    result: Result<(T, usize), bincode::error::DecodeError>,
    len: usize,
) -> Result<T, String> {
    match result {
        Ok((value, used)) if used == len => Ok(value),
        Ok((_, used)) => Err(format!("{} trailing bytes after the body", len - used)),
        Err(e) => Err(format!("undecodable body: {e}")),
    }
}

/// Serde helpers that encode a `Vec<u8>` as bincode bytes (length, then the
/// bytes: the same encoding as a sequence of `u8`) and decode it in one copy.
pub(crate) mod bytes {
    use serde::{Deserializer, Serializer};

    /// Serializes `v` as a byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Deserializes a byte string (borrowed from the input where the
    /// decoder can, so its length is checked before the copy).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(body: &(u64, String)) -> Vec<u8> {
        encode_frame(7, 3, body).unwrap()
    }

    #[test]
    fn a_frame_round_trips() {
        let body = (42u64, "hello".to_string());
        let bytes = frame_of(&body);
        let frame = read_frame(&mut &bytes[..], 0, 1).unwrap().unwrap();
        assert_eq!((frame.kind, frame.version), (7, 3));
        assert_eq!(frame.frame_len(), bytes.len() as u64);
        assert_eq!(decode_body::<(u64, String)>(frame.body()).unwrap(), body);
    }

    #[test]
    fn empty_input_is_a_clean_end() {
        assert!(read_frame(&mut &[][..], 0, 1).unwrap().is_none());
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading() {
        let mut bytes = frame_of(&(1, "x".into()));
        bytes[0..4].copy_from_slice(&(MAX_FRAME_LEN + 1).to_le_bytes());
        let err = read_frame(&mut &bytes[..], 10, 2).unwrap_err();
        assert!(
            matches!(err, LogError::Corrupt { offset: 10, record: 2, ref reason } if reason.contains("limit")),
            "{err}"
        );
    }

    #[test]
    fn a_huge_claimed_string_does_not_allocate_it() {
        // varint 0xfc = u32 follows: a string claiming ~1 GiB in a 9-byte body.
        let body = [0xfc, 0x00, 0x00, 0x00, 0x40, b'a', b'b', b'c', b'd'];
        let err = decode_body::<String>(&body).unwrap_err();
        assert!(err.contains("undecodable"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = bincode::serde::encode_to_vec(5u64, base_config()).unwrap();
        body.push(0);
        assert!(decode_body::<u64>(&body).unwrap_err().contains("trailing"));
    }

    #[test]
    fn the_bytes_helper_encodes_like_a_u8_sequence() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Fast(#[serde(with = "super::bytes")] Vec<u8>);
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let plain = bincode::serde::encode_to_vec(&data, base_config()).unwrap();
        let fast = bincode::serde::encode_to_vec(Fast(data.clone()), base_config()).unwrap();
        assert_eq!(plain, fast);
        assert_eq!(decode_body::<Fast>(&plain).unwrap(), Fast(data));
    }
}
