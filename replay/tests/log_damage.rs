//! Damaged logs: truncation at every byte, bit flips, wrong magic and
//! version, reordered records, identity mismatch, and fuzzing with
//! proptest. The reader must never panic, must name the frame's offset and
//! record number, and must never allocate much more than the input holds
//! (a counting allocator checks the largest allocation).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use tandem_replay::log::{
    LogError, LogReader, LogWriter, Record, FRAME_HEADER_LEN, MAX_READ_VERSION, MIN_READ_VERSION,
    PREAMBLE_LEN,
};

/// Records the largest single allocation made by this test binary.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// No test here reads more than a few KiB; 4 MiB leaves room for the test
/// harness and proptest.
fn assert_no_huge_allocation() {
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 4 << 20, "an allocation of {largest} bytes");
}

/// Opens `bytes` and reads every record: the records read, then the error
/// that ended reading (None at a clean end).
fn read_all(bytes: &[u8]) -> (Vec<Record>, Option<LogError>) {
    let (reader, _) = match LogReader::open(bytes) {
        Ok(r) => r,
        Err(e) => return (vec![], Some(e)),
    };
    let mut records = vec![];
    for r in reader {
        match r {
            Ok(r) => records.push(r),
            Err(e) => return (records, Some(e)),
        }
    }
    (records, None)
}

/// The (offset, record) an error names, if it names one.
fn position(e: &LogError) -> Option<(u64, u64)> {
    match *e {
        LogError::Corrupt { offset, record, .. } | LogError::TornTail { offset, record, .. } => {
            Some((offset, record))
        }
        _ => None,
    }
}

#[test]
fn truncation_at_every_byte() {
    let (bytes, offsets) = common::sample_log();
    let records = common::records();
    let header_end = offsets[1];
    for cut in 0..=bytes.len() as u64 {
        let (read, err) = read_all(&bytes[..cut as usize]);
        if cut < header_end {
            // Inside the preamble or the identity: the header is torn.
            let (offset, need_frame) = if cut < PREAMBLE_LEN as u64 {
                (0, None)
            } else {
                (PREAMBLE_LEN as u64, Some(header_end - PREAMBLE_LEN as u64))
            };
            match err {
                Some(LogError::TornTail {
                    offset: o,
                    record: 0,
                    have,
                    need,
                }) => {
                    assert_eq!((o, have), (offset, cut - offset), "cut {cut}");
                    let want = match need_frame {
                        None => PREAMBLE_LEN as u64,
                        Some(_) if have < FRAME_HEADER_LEN as u64 => FRAME_HEADER_LEN as u64,
                        Some(n) => n,
                    };
                    assert_eq!(need, want, "cut {cut}");
                }
                other => panic!("cut {cut}: {other:?}"),
            }
            continue;
        }
        // Record n starts at offsets[n]; whole records are those ending by `cut`.
        let whole = offsets[1..].iter().filter(|&&o| o <= cut).count() - 1;
        assert_eq!(read, records[..whole], "cut {cut}");
        if offsets.contains(&cut) {
            assert!(err.is_none(), "cut {cut} at a boundary: {err:?}");
        } else {
            let n = whole + 1;
            let frame_start = offsets[n];
            let frame_len = offsets[n + 1] - frame_start;
            let have = cut - frame_start;
            let need = if have < FRAME_HEADER_LEN as u64 {
                FRAME_HEADER_LEN as u64
            } else {
                frame_len
            };
            match err {
                Some(LogError::TornTail {
                    offset,
                    record,
                    have: h,
                    need: nd,
                }) => assert_eq!(
                    (offset, record, h, nd),
                    (frame_start, n as u64, have, need),
                    "cut {cut}"
                ),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }
    assert_no_huge_allocation();
}

/// The frame holding byte `pos` and its record number.
fn frame_at(offsets: &[u64], pos: u64) -> (u64, u64) {
    let n = offsets[..offsets.len() - 1]
        .iter()
        .rposition(|&o| o <= pos)
        .unwrap();
    (offsets[n], n as u64)
}

fn expect_error_at(bytes: &[u8], offsets: &[u64], pos: u64, what: &str) {
    let (read, err) = read_all(bytes);
    let err = err.unwrap_or_else(|| panic!("{what}: no error"));
    if pos < PREAMBLE_LEN as u64 {
        assert!(
            matches!(
                err,
                LogError::BadMagic { .. } | LogError::UnsupportedVersion { .. }
            ),
            "{what}: {err}"
        );
        return;
    }
    let (offset, record) = frame_at(offsets, pos);
    assert_eq!(position(&err), Some((offset, record)), "{what}: {err}");
    assert_eq!(read, common::records()[..record.saturating_sub(1) as usize]);
}

#[test]
fn a_bit_flip_anywhere_names_its_record() {
    let (bytes, offsets) = common::sample_log();
    // One bit of every byte, the bit rotating with the position.
    for pos in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[pos] ^= 1 << (pos % 8);
        expect_error_at(&damaged, &offsets, pos as u64, &format!("byte {pos}"));
    }
    // Every bit of every length and crc field.
    for &frame in &offsets[..offsets.len() - 1] {
        for pos in frame..frame + FRAME_HEADER_LEN as u64 {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[pos as usize] ^= 1 << bit;
                expect_error_at(&damaged, &offsets, pos, &format!("byte {pos} bit {bit}"));
            }
        }
    }
    assert_no_huge_allocation();
}

#[test]
fn a_huge_length_with_a_valid_crc_is_refused_without_allocating_it() {
    // A body whose string claims 200 MiB, behind a correct crc: the crc
    // passes, the decoder must refuse it without allocating the claim.
    let (mut bytes, offsets) = common::log_of(&[]);
    // A sync point whose vCPU `regs` bytes claim 200 MiB.
    let mut payload = vec![3, 0, 1, 0, 1]; // kind 3, version 1, stop 1
    payload.push(0xfc); // u32 length follows
    payload.extend_from_slice(&(200u32 << 20).to_le_bytes());
    payload.extend_from_slice(&[0; 64]);
    let frame_start = offsets[1];
    bytes.extend_from_slice(&frame(&payload));
    let (_, err) = read_all(&bytes);
    let err = err.unwrap();
    assert_eq!(position(&err), Some((frame_start, 1)), "{err}");
    assert!(err.to_string().contains("undecodable"), "{err}");

    // An End record whose Crashed(String) claims 200 MiB.
    let mut payload = vec![6, 0, 1, 0, 1, 2, 0xfc];
    payload.extend_from_slice(&(200u32 << 20).to_le_bytes());
    payload.extend_from_slice(b"only a few bytes");
    let mut bytes = common::log_of(&[]).0;
    bytes.extend_from_slice(&frame(&payload));
    let (_, err) = read_all(&bytes);
    let err = err.unwrap();
    assert!(matches!(err, LogError::Corrupt { record: 1, .. }), "{err}");
    assert_no_huge_allocation();
}

#[test]
fn wrong_magic_and_versions_are_refused() {
    let (bytes, _) = common::sample_log();
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(b"NOTALOG!");
    let err = LogReader::open(&bad[..]).unwrap_err();
    assert!(matches!(err, LogError::BadMagic { .. }), "{err}");
    assert!(err.to_string().contains("not a tandem log"));
    // A short file that is not a log prefix is bad magic, not a torn tail.
    assert!(matches!(
        LogReader::open(&b"ELF"[..]),
        Err(LogError::BadMagic { .. })
    ));

    for version in [0u16, MAX_READ_VERSION + 1, u16::MAX] {
        let mut bad = bytes.clone();
        bad[8..10].copy_from_slice(&version.to_le_bytes());
        let err = LogReader::open(&bad[..]).unwrap_err();
        assert!(
            matches!(err, LogError::UnsupportedVersion { found, min, max }
                if found == version && min == MIN_READ_VERSION && max == MAX_READ_VERSION),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("log recorded by protocol version {version}, this build reads 1–1")
        );
    }
}

#[test]
fn an_identity_mismatch_is_named() {
    let (bytes, _) = common::sample_log();
    let (_, recorded) = LogReader::open(&bytes[..]).unwrap();
    let mut here = common::identity();
    assert_eq!(recorded.mismatch(&here), None);
    here.mem_size = 64 << 20;
    let why = recorded.mismatch(&here).unwrap();
    assert!(why.starts_with("memory size"), "{why}");
    here = common::identity();
    here.image_hash[0] ^= 1;
    assert!(recorded.mismatch(&here).unwrap().contains("kernel image"));
}

#[test]
fn reordered_records_are_corrupt_at_the_record() {
    let records = common::records();
    // Swap the frames of record 5 (stop 2) and record 6 (stop 3): each
    // frame is intact, but stop 2 now follows stop 3.
    let (bytes, offsets) = common::sample_log();
    let (a, b, end) = (
        offsets[5] as usize,
        offsets[6] as usize,
        offsets[7] as usize,
    );
    let mut swapped = bytes[..a].to_vec();
    swapped.extend_from_slice(&bytes[b..end]);
    swapped.extend_from_slice(&bytes[a..b]);
    swapped.extend_from_slice(&bytes[end..]);
    let (read, err) = read_all(&swapped);
    assert_eq!(read.len(), 5);
    assert_eq!(read[4], records[5]);
    let err = err.unwrap();
    let second_at = a + (end - b);
    assert_eq!(position(&err), Some((second_at as u64, 6)), "{err}");
    assert!(err.to_string().contains("backwards"), "{err}");

    // A cause logged for a stop the watermark already left.
    let late = vec![
        Record::Watermark { stop: 4 },
        Record::Cause {
            stop: 4,
            cause: tandem_replay::Cause::Time(5),
        },
    ];
    let (bytes, offsets) = common::log_of(&late);
    let (read, err) = read_all(&bytes);
    assert_eq!(read.len(), 1);
    assert_eq!(position(&err.unwrap()), Some((offsets[2], 2)));

    // The check can be turned off for inspection tools.
    let (reader, _) = LogReader::open(&swapped[..]).unwrap();
    assert_eq!(reader.without_order_check().count(), records.len());
}

#[test]
fn a_torn_tail_keeps_the_last_watermark() {
    let (bytes, offsets) = common::sample_log();
    // Cut inside the End record: the last watermark was 6.
    let cut = offsets[offsets.len() - 2] as usize + 3;
    let (mut reader, _) = LogReader::open(&bytes[..cut]).unwrap();
    let err = reader.by_ref().find_map(Result::err).unwrap();
    assert!(err.is_torn_tail());
    assert_eq!(reader.watermark(), Some(6));
    assert!(reader.next().is_none(), "errors are final");
}

/// Re-frames `payload` with a correct length and crc.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn header() -> Vec<u8> {
    LogWriter::new(Vec::new(), &common::identity())
        .unwrap()
        .into_inner()
}

proptest! {
    // 256 cases in `make test`; `make fuzz` sets PROPTEST_CASES far higher.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_after_the_header_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = header();
        bytes.extend_from_slice(&tail);
        let _ = read_all(&bytes);
        assert_no_huge_allocation();
    }

    #[test]
    fn arbitrary_payloads_with_valid_crcs_never_panic(
        kind in 0u16..8,
        version in 0u16..3,
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..8),
    ) {
        let mut bytes = header();
        for body in &bodies {
            let mut payload = kind.to_le_bytes().to_vec();
            payload.extend_from_slice(&version.to_le_bytes());
            payload.extend_from_slice(body);
            bytes.extend_from_slice(&frame(&payload));
        }
        let _ = read_all(&bytes);
        assert_no_huge_allocation();
    }

    #[test]
    fn mutated_logs_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        refresh_crcs in any::<bool>(),
    ) {
        let (mut bytes, offsets) = common::sample_log();
        for (at, value) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if refresh_crcs {
            // Recompute each original frame's crc so the damage reaches the
            // decoder (lengths that were edited are left as they are).
            for w in offsets.windows(2) {
                let (start, end) = (w[0] as usize, w[1] as usize);
                let crc = crc32c::crc32c(&bytes[start + 8..end]);
                bytes[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
            }
        }
        let len = cut.index(bytes.len() + 1);
        let (read, err) = read_all(&bytes[..len]);
        if let Some(e) = err {
            // Every error names a frame at or after the records read.
            if let Some((offset, record)) = position(&e) {
                prop_assert!(record as usize >= read.len());
                prop_assert!(offset <= len as u64);
            }
        }
        assert_no_huge_allocation();
    }
}
