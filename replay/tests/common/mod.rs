//! A sample identity and a small log holding one record of every kind,
//! shared by the golden-file and damage tests. Changing anything here
//! changes the golden file: regenerate it with `TANDEM_BLESS=1`.

#![allow(dead_code)]

use tandem_replay::log::{
    image_hash, Check, CpuidEntry, DeviceDesc, EndOutcome, LogWriter, MachineState, Page, Record,
    Scrub, VcpuState, VmIdentity, PAGE_SIZE,
};
use tandem_replay::Cause;

pub fn identity() -> VmIdentity {
    VmIdentity {
        image_hash: image_hash(b"a tiny test kernel"),
        image_name: "tiny.elf".into(),
        cmdline: "console=ttyS0 panic=-1".into(),
        mem_size: 32 << 20,
        devices: vec![
            DeviceDesc {
                kind: "uart".into(),
                detail: "pio 0x3f8 irq 4".into(),
            },
            DeviceDesc {
                kind: "virtio-blk".into(),
                detail: "mmio 0xd0000000 irq 5 sectors 2048".into(),
            },
        ],
        cpuid: vec![
            CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0xd,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
            },
            CpuidEntry {
                function: 7,
                index: 0,
                flags: 1,
                eax: 0,
                ebx: 0x0000_0001,
                ecx: 0,
                edx: 0,
            },
        ],
        msrs: vec![0x10, 0x174, 0x175, 0x176, 0xc000_0080],
        device_model_version: 1,
        tsc_khz: 2_400_000,
        rtc_base_unix_secs: 1_700_000_000,
        position: String::new(),
    }
}

fn page(gfn: u64) -> Page {
    Page {
        gfn,
        data: (0..PAGE_SIZE)
            .map(|i| (i as u64 * 31 + gfn) as u8)
            .collect(),
    }
}

/// One record of every kind (every `Cause` and `Check` variant too), in a
/// valid order.
pub fn records() -> Vec<Record> {
    vec![
        Record::Cause {
            stop: 1,
            cause: Cause::Time(1_000_000),
        },
        Record::Cause {
            stop: 1,
            cause: Cause::SerialInput(b"hi\n".to_vec()),
        },
        Record::Check {
            stop: 1,
            check: Check::PioRead {
                port: 0x3fd,
                value: 0x61,
            },
        },
        Record::Watermark { stop: 1 },
        Record::Cause {
            stop: 2,
            cause: Cause::NetRx {
                device: 0,
                frame: vec![0xff; 14],
            },
        },
        Record::SyncPoint {
            stop: 3,
            state: MachineState {
                vcpu: VcpuState {
                    regs: vec![1; 144],
                    sregs: vec![2; 312],
                    fpu: vec![3; 16],
                    xsave: vec![],
                    xcrs: vec![4; 8],
                    debugregs: vec![5; 8],
                    events: vec![6; 64],
                    msrs: vec![(0x10, 123_456_789), (0xc000_0080, 0x500)],
                    halted: true,
                },
                devices: vec![
                    ("uart".into(), vec![0x60, 0, 1]),
                    ("pic".into(), vec![0xff, 0x08]),
                ],
            },
            pages: vec![page(0x100)],
        },
        Record::Cause {
            stop: 4,
            cause: Cause::BlockDone {
                device: 0,
                request: 7,
                status: 0,
                data: vec![0xab; 32],
            },
        },
        Record::Check {
            stop: 4,
            check: Check::Injected { vector: 0x24 },
        },
        Record::EpochEnd {
            epoch: 1,
            stop: 5,
            pages: vec![(0x100, 1), (0x200, 16)],
            hashes: vec![("vcpu".into(), 0x0123_4567_89ab_cdef), ("uart".into(), 42)],
            scrub: Scrub {
                first_gfn: 0,
                count: 64,
                hash: 0xdead_beef,
            },
        },
        Record::Check {
            stop: 6,
            check: Check::MmioRead {
                addr: 0xd000_0070,
                value: 0xf,
            },
        },
        Record::Watermark { stop: 6 },
        Record::End {
            stop: 7,
            outcome: EndOutcome::GuestExit(0),
        },
    ]
}

/// A log of `records`; also returns the offset of every frame (the header
/// identity first) and the log's length.
pub fn log_of(records: &[Record]) -> (Vec<u8>, Vec<u64>) {
    let mut w = LogWriter::new(Vec::new(), &identity()).unwrap();
    let mut offsets = vec![tandem_replay::log::PREAMBLE_LEN as u64];
    for r in records {
        offsets.push(w.bytes_written());
        w.append(r).unwrap();
    }
    offsets.push(w.bytes_written());
    (w.into_inner(), offsets)
}

/// The sample log and its frame offsets: `offsets[n]` is where record `n`
/// starts (record 0 is the identity), and the last entry is the length.
pub fn sample_log() -> (Vec<u8>, Vec<u64>) {
    log_of(&records())
}
