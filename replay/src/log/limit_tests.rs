//! The writer never produces what the reader refuses: every record kind
//! round-trips at each decode-limit tier boundary and at the largest frame,
//! and a sync point larger than a frame is written as continuations and read
//! back whole.

use super::frame::{read_frame, MAX_CLAIM_PER_BYTE, MAX_FRAME_LEN};
use super::record::{Check, EndOutcome, MachineState, Page, Record, Scrub, PAGE_SIZE};
use super::{LogReader, LogWriter, VmIdentity};
use crate::port::Cause;

/// Body bytes of `record` written as one frame.
fn body_len(record: &Record) -> usize {
    let frames = record.encode_frames_split(usize::MAX).unwrap();
    assert_eq!(frames.len(), 1);
    frames[0].len() - 12
}

/// The record kinds, each grown by `pad` (about one body byte per unit).
/// `runs`: epoch ends made mostly of page runs, the densest claim per
/// encoded byte (2 bytes each, 12 claimed).
fn make(kind: usize, pad: usize, runs: bool) -> Record {
    match kind {
        0 => Record::Cause {
            stop: 7,
            cause: Cause::NetRx {
                device: 0,
                frame: vec![0xab; pad],
            },
        },
        1 => {
            let n = pad / (PAGE_SIZE + 4);
            Record::SyncPoint {
                stop: 7,
                state: MachineState {
                    devices: vec![("pad".into(), vec![1; pad - n * (PAGE_SIZE + 4)])],
                    ..MachineState::default()
                },
                pages: (0..n as u64)
                    .map(|gfn| Page {
                        gfn: gfn % 64,
                        data: vec![gfn as u8; PAGE_SIZE],
                    })
                    .collect(),
            }
        }
        2 => {
            let n = if runs { pad / 2 } else { 0 };
            Record::EpochEnd {
                epoch: 1,
                stop: 7,
                pages: (0..n as u64).map(|_| (5, 1)).collect(),
                hashes: vec![("x".repeat(pad - 2 * n), u64::MAX)],
                scrub: Scrub::default(),
            }
        }
        3 => Record::Check {
            stop: 7,
            check: Check::SerialOut {
                bytes: vec![b'a'; pad],
            },
        },
        _ => Record::End {
            stop: 7,
            outcome: EndOutcome::Crashed("e".repeat(pad)),
        },
    }
}

/// The pad that makes the body of `kind` `target` bytes (or the nearest
/// the varint steps allow).
fn pad_for(kind: usize, target: usize, runs: bool) -> usize {
    // Start below the target: the record's own fields come on top.
    let mut pad = target.saturating_sub(64);
    for _ in 0..8 {
        let len = body_len(&make(kind, pad, runs));
        if len == target {
            break;
        }
        pad = (pad + target).saturating_sub(len);
    }
    pad
}

/// The record of `kind` whose body is `target` bytes.
fn sized(kind: usize, target: usize, runs: bool) -> Record {
    make(kind, pad_for(kind, target, runs), runs)
}

fn round_trip(record: &Record) {
    let bytes = record.encode_frames().unwrap().concat();
    let frame = read_frame(&mut &bytes[..], 0, 1).unwrap().unwrap();
    let back = Record::decode(frame.kind, frame.version, frame.body())
        .unwrap_or_else(|e| panic!("kind {} body {}: {e}", record.kind(), frame.body().len()));
    assert!(back == *record, "kind {} changed", record.kind());
}

#[test]
fn every_kind_round_trips_at_every_limit_tier_boundary() {
    // A tier holds bodies up to limit / MAX_CLAIM_PER_BYTE bytes: 4 KiB,
    // 16 KiB, ... 64 MiB (the next one, 256 MiB, is the frame limit).
    let mut boundary = (1usize << 16) / MAX_CLAIM_PER_BYTE;
    while boundary < MAX_FRAME_LEN as usize {
        for kind in 0..5 {
            // Epoch ends made of page runs up to 4 MiB (larger ones would
            // hold hundreds of MiB of runs in memory).
            let dense = [false, true];
            let variants = if kind == 2 && boundary <= 4 << 20 {
                &dense[..]
            } else {
                &dense[..1]
            };
            for &runs in variants {
                for target in [
                    boundary - 2,
                    boundary - 1,
                    boundary,
                    boundary + 1,
                    boundary + 2,
                ] {
                    round_trip(&sized(kind, target, runs));
                }
            }
        }
        round_trip(&Record::Watermark { stop: u64::MAX });
        boundary *= 4;
    }
}

#[test]
fn an_epoch_end_of_a_few_hundred_runs_decodes() {
    // The case an earlier limit (sized from the encoded length) refused.
    for n in [150usize, 400, 1000, 5000] {
        round_trip(&Record::EpochEnd {
            epoch: 3,
            stop: 9,
            pages: (0..n as u64).map(|i| (i * 2, 1)).collect(),
            hashes: vec![("vcpu".into(), 1), ("pic".into(), 2)],
            scrub: Scrub::default(),
        });
    }
}

#[test]
fn every_kind_round_trips_at_the_largest_frame() {
    // The payload is the kind and version (4 bytes) and the body.
    let largest = MAX_FRAME_LEN as usize - 4;
    for kind in [0, 2, 3, 4] {
        let pad = pad_for(kind, largest, false);
        let r = make(kind, pad, false);
        assert_eq!(body_len(&r), largest, "kind {kind}");
        round_trip(&r);
        // One byte more does not fit a frame: a clean error, never a panic.
        let over = make(kind, pad + 1, false);
        assert!(over.encode_frames().is_err(), "kind {kind}");
    }
}

fn identity() -> VmIdentity {
    VmIdentity {
        image_hash: [1; 32],
        image_name: "guest".into(),
        cmdline: String::new(),
        mem_size: 16 << 20,
        devices: vec![],
        cpuid: vec![],
        msrs: vec![],
        device_model_version: 1,
        tsc_khz: 3_000_000,
        rtc_base_unix_secs: 1,
        position: String::new(),
    }
}

fn pages(n: u64) -> Vec<Page> {
    (0..n)
        .map(|gfn| Page {
            gfn,
            data: vec![(gfn * 7) as u8; PAGE_SIZE],
        })
        .collect()
}

#[test]
fn a_split_sync_point_reads_back_whole_between_other_records() {
    let mut log = Vec::new();
    LogWriter::new(&mut log, &identity()).unwrap();
    let sync = Record::SyncPoint {
        stop: 2,
        state: MachineState::default(),
        pages: pages(10),
    };
    let records = [
        Record::Watermark { stop: 1 },
        sync.clone(),
        Record::Watermark { stop: 2 },
    ];
    let mut frames = 0;
    for r in &records {
        let parts = r.encode_frames_split(3).unwrap();
        frames += parts.len();
        log.extend(parts.concat());
    }
    assert_eq!(
        frames,
        1 + 4 + 1,
        "10 pages at 3 a frame: a head and 3 continuations"
    );
    let (reader, _) = LogReader::open(&log[..]).unwrap();
    let back: Vec<Record> = reader.map(Result::unwrap).collect();
    assert_eq!(back, records);
}

#[test]
fn a_damaged_split_sync_point_is_named() {
    let sync = Record::SyncPoint {
        stop: 2,
        state: MachineState::default(),
        pages: pages(10),
    };
    let parts = sync.encode_frames_split(3).unwrap();
    let header = || {
        let mut log = Vec::new();
        LogWriter::new(&mut log, &identity()).unwrap();
        log
    };
    // A continuation missing: the next frame is something else.
    let mut log = header();
    log.extend(parts[..2].concat());
    log.extend(
        Record::Watermark { stop: 2 }
            .encode_frames()
            .unwrap()
            .concat(),
    );
    let (mut reader, _) = LogReader::open(&log[..]).unwrap();
    let err = reader.read_record().unwrap_err().to_string();
    assert!(err.contains("expected continuation 2"), "{err}");
    // Continuations without a head.
    let mut log = header();
    log.extend(parts[1].clone());
    let (mut reader, _) = LogReader::open(&log[..]).unwrap();
    let err = reader.read_record().unwrap_err().to_string();
    assert!(err.contains("no sync point before them"), "{err}");
    // Cut inside the continuations: a torn tail, as for any cut frame.
    let mut log = header();
    log.extend(parts[..3].concat());
    let (mut reader, _) = LogReader::open(&log[..]).unwrap();
    assert!(matches!(
        reader.read_record(),
        Err(super::LogError::TornTail { .. })
    ));
}

#[test]
fn a_sync_point_larger_than_a_frame_is_written_as_continuations_and_read_back() {
    // 300 MiB of pages: more than one 256 MiB frame holds.
    let n = (300u64 << 20) / PAGE_SIZE as u64;
    let sync = Record::SyncPoint {
        stop: 4,
        state: MachineState::default(),
        pages: pages(n),
    };
    let mut log = Vec::new();
    let mut writer = LogWriter::new(&mut log, &identity()).unwrap();
    writer.append(&Record::Watermark { stop: 3 }).unwrap();
    writer.append(&sync).unwrap();
    writer.append(&Record::Watermark { stop: 4 }).unwrap();
    let (reader, _) = LogReader::open(&log[..]).unwrap();
    let back: Vec<Record> = reader.map(Result::unwrap).collect();
    assert_eq!(back.len(), 3);
    assert!(back[1] == sync, "the sync point changed on the way");
}
