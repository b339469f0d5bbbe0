//! Golden files freeze the log format: the same records must encode to the
//! committed bytes, and the committed bytes must decode to the same records.
//! Regenerate with `TANDEM_BLESS=1 cargo test -p tandem-replay --test
//! log_golden` only when the format change is deliberate (a new version of
//! a kind, with the old one still decoded).

mod common;

use std::path::PathBuf;

use tandem_replay::log::{LogReader, MAGIC, PROTOCOL_VERSION};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check_golden(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = golden(name);
    if std::env::var_os("TANDEM_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return bytes.to_vec();
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run with TANDEM_BLESS=1 to create it",
            path.display()
        )
    });
    if committed != bytes {
        let first = committed
            .iter()
            .zip(bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(committed.len().min(bytes.len()));
        panic!(
            "{} differs from this build's encoding at byte {first} ({} vs {} bytes): \
             the log format changed; add a new record version instead, or bless \
             with TANDEM_BLESS=1 if the change is deliberate",
            path.display(),
            committed.len(),
            bytes.len()
        );
    }
    committed
}

#[test]
fn every_kind_matches_the_golden_file() {
    let (bytes, _) = common::sample_log();
    let committed = check_golden("v1-every-kind.bin", &bytes);

    // The committed file decodes to the same identity and records.
    let (reader, identity) = LogReader::open(&committed[..]).unwrap();
    assert_eq!(identity, common::identity());
    let records: Vec<_> = reader.collect::<Result<_, _>>().unwrap();
    assert_eq!(records, common::records());
}

#[test]
fn the_header_layout_is_as_documented() {
    let (bytes, offsets) = common::sample_log();
    assert_eq!(&bytes[..8], &MAGIC);
    assert_eq!(&bytes[8..10], &PROTOCOL_VERSION.to_le_bytes());
    // Each frame: u32 length, u32 crc32c, then u16 kind and u16 version.
    let kinds: Vec<u16> = offsets[..offsets.len() - 1]
        .iter()
        .map(|&o| {
            let o = o as usize;
            let len = u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[o + 4..o + 8].try_into().unwrap());
            assert_eq!(crc, crc32c::crc32c(&bytes[o + 8..o + 8 + len]));
            assert_eq!(o + 8 + len, {
                let next = offsets.iter().find(|&&n| n as usize > o).unwrap();
                *next as usize
            });
            assert_eq!(&bytes[o + 10..o + 12], &1u16.to_le_bytes(), "version 1");
            u16::from_le_bytes([bytes[o + 8], bytes[o + 9]])
        })
        .collect();
    let expected: Vec<u16> = std::iter::once(0)
        .chain(common::records().iter().map(|r| r.kind()))
        .collect();
    assert_eq!(kinds, expected);
    assert_eq!(expected, [0, 1, 1, 5, 2, 1, 3, 1, 5, 4, 5, 2, 6]);
}

/// A log with positioned stops: the identity of version 2 (with its
/// position counter) and kind 8 records.
fn positioned_log() -> (
    tandem_replay::log::VmIdentity,
    Vec<tandem_replay::log::Record>,
    Vec<u8>,
) {
    use tandem_replay::log::{EndOutcome, LogWriter, Record};
    let identity = tandem_replay::log::VmIdentity {
        position: "kvm-insn-stat; kernel 6.18.44; pvm_emul_batch 1024; 14011 counted".into(),
        ..common::identity()
    };
    let records = vec![
        Record::Positioned {
            stop: 3,
            count: 15_000,
            rip: 0x10_10b5,
            digest: 0x0123_4567_89ab_cdef,
        },
        Record::Watermark { stop: 3 },
        Record::Positioned {
            stop: 4,
            count: 0,
            rip: 0x10_10b5,
            digest: 0x0123_4567_89ab_cdef,
        },
        Record::End {
            stop: 5,
            outcome: EndOutcome::GuestExit(0),
        },
    ];
    let mut w = LogWriter::new(Vec::new(), &identity).unwrap();
    for r in &records {
        w.append(r).unwrap();
    }
    (identity, records, w.into_inner())
}

#[test]
fn positioned_stops_and_the_position_header_match_the_golden_file() {
    let (identity, records, bytes) = positioned_log();
    let committed = check_golden("v2-positioned.bin", &bytes);
    let (reader, read) = LogReader::open(&committed[..]).unwrap();
    assert_eq!(read, identity);
    assert_eq!(read.position, identity.position);
    let decoded: Vec<_> = reader.collect::<Result<_, _>>().unwrap();
    assert_eq!(decoded, records);
}

#[test]
fn a_log_without_positions_keeps_the_version_1_header_older_builds_read() {
    let (bytes, _) = common::sample_log();
    // The identity frame (after magic and protocol version): kind 0, version 1.
    assert_eq!(&bytes[18..22], &[0, 0, 1, 0]);
    let (_, _, positioned) = positioned_log();
    assert_eq!(&positioned[18..22], &[0, 0, 2, 0]);
}
