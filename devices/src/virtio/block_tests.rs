//! Tests of [`super`] (block.rs), kept apart to keep files short.

use super::*;
use crate::virtio::testutil::{mem, Recorder, TestQueue};

const HDR: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0xa000;

fn setup(read_only: bool) -> (GuestMemoryMmap, TestQueue, Arc<Recorder>, Block) {
    let m = mem();
    let tq = TestQueue::new(&m, 0x1000, 16);
    let rec = Recorder::new();
    let mut b = Block::new(3, 64, read_only, "disk-0".into(), rec.clone());
    b.activate(m.clone(), vec![tq.queue(&m)]).unwrap();
    (m, tq, rec, b)
}

fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    m.write_obj(kind, GuestAddress(at)).unwrap();
    m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
    m.read_obj(GuestAddress(at)).unwrap()
}

fn submitted(rec: &Recorder) -> Vec<(u64, BlockOp)> {
    rec.take()
        .into_iter()
        .map(|o| match o {
            Output::BlockSubmit {
                device: 3,
                request,
                op,
            } => (request, op),
            other => panic!("unexpected output {other:?}"),
        })
        .collect()
}

#[test]
fn read_is_submitted_and_completion_copies_data() {
    let (m, mut tq, rec, mut b) = setup(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 5);
    let head = tq.add_chain(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
    assert_eq!(b.queue_notify(0), Ok(false));
    assert_eq!(
        submitted(&rec),
        vec![(
            0,
            BlockOp::Read {
                sector: 5,
                len: 1024
            }
        )]
    );
    assert_eq!(b.in_flight_ids(), vec![0]);
    assert_eq!(b.complete(0, VIRTIO_BLK_S_OK, &[0x5a; 1024]), Ok(true));
    assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_OK);
    let mut got = [0u8; 1024];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0x5a; 1024]);
    assert_eq!(tq.used_idx(), 1);
    assert_eq!(tq.used(0), (u32::from(head), 1025));
    assert!(b.in_flight_ids().is_empty());
    // A second completion of the same id is unknown and ignored.
    assert_eq!(b.complete(0, VIRTIO_BLK_S_OK, &[]), Ok(false));
}

#[test]
fn read_completion_of_the_wrong_length_is_an_ioerr() {
    let (m, mut tq, _rec, mut b) = setup(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    tq.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    b.queue_notify(0).unwrap();
    assert_eq!(b.complete(0, VIRTIO_BLK_S_OK, &[1; 4096]), Ok(true));
    assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_IOERR);
    // Never more than the buffer holds.
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), 0);
    assert_eq!(tq.used(0).1, 513);
}

#[test]
fn write_data_is_captured_at_submission() {
    let (m, mut tq, rec, mut b) = setup(false);
    // Header and data in one readable buffer, status in the data's tail.
    header(&m, HDR, VIRTIO_BLK_T_OUT, 2);
    m.write_slice(&[7u8; 512], GuestAddress(HDR + 16)).unwrap();
    tq.add_chain(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
    b.queue_notify(0).unwrap();
    m.write_slice(&[9u8; 512], GuestAddress(HDR + 16)).unwrap();
    let ops = submitted(&rec);
    assert_eq!(
        ops,
        vec![(
            0,
            BlockOp::Write {
                sector: 2,
                data: vec![7; 512]
            }
        )]
    );
    let DeviceState::Block(st) = b.state() else {
        panic!()
    };
    assert_eq!(st.in_flight[0].op, ops[0].1);
    assert_eq!(b.complete(0, VIRTIO_BLK_S_OK, &[]), Ok(true));
    assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(tq.used(0).1, 1);
}

#[test]
fn flush_get_id_and_unknown_types() {
    let (m, mut tq, rec, mut b) = setup(false);
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    tq.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(b.queue_notify(0), Ok(false));
    assert_eq!(submitted(&rec), vec![(0, BlockOp::Flush)]);

    header(&m, HDR + 0x100, VIRTIO_BLK_T_GET_ID, 0);
    tq.add_chain(&[
        (HDR + 0x100, 16, false),
        (DATA, 20, true),
        (STATUS + 8, 1, true),
    ]);
    assert_eq!(b.queue_notify(0), Ok(true));
    let mut id = [0xffu8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"disk-0");
    assert_eq!(id[6..], [0; 14]);
    assert_eq!(status(&m, STATUS + 8), VIRTIO_BLK_S_OK);
    assert_eq!(tq.used(0).1, 21);

    header(&m, HDR + 0x200, 77, 0);
    m.write_obj(0xffu8, GuestAddress(STATUS + 16)).unwrap();
    tq.add_chain(&[(HDR + 0x200, 16, false), (STATUS + 16, 1, true)]);
    assert_eq!(b.queue_notify(0), Ok(true));
    assert_eq!(status(&m, STATUS + 16), VIRTIO_BLK_S_UNSUPP);
    assert!(rec.take().is_empty());
}

#[test]
fn read_only_writes_and_out_of_range_requests_fail_at_once() {
    let (m, mut tq, rec, mut b) = setup(true);
    assert_ne!(b.avail_features() & VIRTIO_BLK_F_RO, 0);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    tq.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(b.queue_notify(0), Ok(true));
    assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_IOERR);
    // Capacity is 64 sectors: 63 + 2 does not fit, nor does an overflow.
    for sector in [63, u64::MAX] {
        header(&m, HDR, VIRTIO_BLK_T_IN, sector);
        tq.add_chain(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        assert_eq!(b.queue_notify(0), Ok(true));
        assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_IOERR);
    }
    // Not a whole number of sectors.
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    tq.add_chain(&[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)]);
    assert_eq!(b.queue_notify(0), Ok(true));
    assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_IOERR);
    assert!(rec.take().is_empty());
    assert_eq!(tq.used_idx(), 4);
}

#[test]
fn in_with_device_readable_data_fails_without_writing() {
    let (m, mut tq, rec, mut b) = setup(false);
    let chains: [&[(u64, u32, bool)]; 3] = [
        // Data descriptor not marked VIRTQ_DESC_F_WRITE (virtio-abuse 5g).
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        // Header and data in one device-readable buffer.
        &[(HDR, 16 + 512, false), (STATUS, 1, true)],
        // Half of the data readable, half writable.
        &[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 512, 512, true),
            (STATUS, 1, true),
        ],
    ];
    for (n, chain) in chains.into_iter().enumerate() {
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        m.write_slice(&[0x11u8; 1024], GuestAddress(DATA)).unwrap();
        m.write_slice(&[0x11u8; 512], GuestAddress(HDR + 16))
            .unwrap();
        let head = tq.add_chain(chain);
        assert_eq!(b.queue_notify(0), Ok(true), "chain {n}");
        assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_IOERR, "chain {n}");
        assert_eq!(tq.used(n as u16), (u32::from(head), 1), "chain {n}");
        let mut got = [0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x11; 1024], "chain {n}");
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(HDR + 16)).unwrap();
        assert_eq!(got, [0x11; 512], "chain {n}");
    }
    assert!(rec.take().is_empty());
    assert!(b.in_flight_ids().is_empty());
    let DeviceState::Block(st) = b.state() else {
        panic!()
    };
    assert_eq!(st.next_request, 0);
    // A well-formed read still works afterwards.
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    tq.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(b.queue_notify(0), Ok(false));
    assert_eq!(
        submitted(&rec),
        vec![(
            0,
            BlockOp::Read {
                sector: 0,
                len: 512
            }
        )]
    );
}

#[test]
fn out_with_device_writable_data_fails_without_reading() {
    let (m, mut tq, rec, mut b) = setup(false);
    let chains: [&[(u64, u32, bool)]; 3] = [
        // Data descriptor marked VIRTQ_DESC_F_WRITE.
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        // Data and status in one device-writable buffer.
        &[(HDR, 16, false), (DATA, 513, true)],
        // Half of the data readable, half writable.
        &[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 512, 512, true),
            (STATUS, 1, true),
        ],
    ];
    for (n, chain) in chains.into_iter().enumerate() {
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        m.write_slice(&[0x22u8; 1024], GuestAddress(DATA)).unwrap();
        let status_addr = chain.last().map(|&(a, l, _)| a + u64::from(l) - 1).unwrap();
        m.write_obj(0xffu8, GuestAddress(status_addr)).unwrap();
        let head = tq.add_chain(chain);
        assert_eq!(b.queue_notify(0), Ok(true), "chain {n}");
        assert_eq!(status(&m, status_addr), VIRTIO_BLK_S_IOERR, "chain {n}");
        assert_eq!(tq.used(n as u16), (u32::from(head), 1), "chain {n}");
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x22; 512], "chain {n}");
    }
    assert!(rec.take().is_empty());
    assert!(b.in_flight_ids().is_empty());
    // A well-formed write still works afterwards.
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    tq.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(b.queue_notify(0), Ok(false));
    assert_eq!(
        submitted(&rec),
        vec![(
            0,
            BlockOp::Write {
                sector: 0,
                data: vec![0x22; 512]
            }
        )]
    );
}

#[test]
fn overlapping_requests_are_serialised() {
    let (m, mut tq, rec, mut b) = setup(false);
    let req = |tq: &mut TestQueue, n: u64, kind: u32, sector: u64, len: u32| {
        let hdr = HDR + n * 0x20;
        header(&m, hdr, kind, sector);
        let data = (DATA + n * 0x1000, len, kind == VIRTIO_BLK_T_IN);
        match len {
            0 => tq.add_chain(&[(hdr, 16, false), (STATUS + n, 1, true)]),
            _ => tq.add_chain(&[(hdr, 16, false), data, (STATUS + n, 1, true)]),
        }
    };
    req(&mut tq, 0, VIRTIO_BLK_T_OUT, 0, 4096); // id 0: write 0..8
    req(&mut tq, 1, VIRTIO_BLK_T_IN, 4, 1024); // id 1: read 4..6, overlaps 0
    req(&mut tq, 2, VIRTIO_BLK_T_IN, 20, 512); // id 2: independent read
    req(&mut tq, 3, VIRTIO_BLK_T_OUT, 5, 512); // id 3: write overlapping held read 1
    req(&mut tq, 4, VIRTIO_BLK_T_FLUSH, 0, 0); // id 4: waits for writes 0 and 3
    b.queue_notify(0).unwrap();
    let ids = |ops: Vec<(u64, BlockOp)>| ops.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert_eq!(ids(submitted(&rec)), vec![0, 2]);
    let DeviceState::Block(st) = b.state() else {
        panic!()
    };
    assert_eq!(
        st.held.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    b.complete(2, VIRTIO_BLK_S_OK, &[0; 512]).unwrap();
    assert!(rec.take().is_empty());
    b.complete(0, VIRTIO_BLK_S_OK, &[]).unwrap();
    assert_eq!(ids(submitted(&rec)), vec![1]);
    b.complete(1, VIRTIO_BLK_S_OK, &[0; 1024]).unwrap();
    assert_eq!(ids(submitted(&rec)), vec![3]);
    b.complete(3, VIRTIO_BLK_S_OK, &[]).unwrap();
    assert_eq!(ids(submitted(&rec)), vec![4]);
    b.complete(4, VIRTIO_BLK_S_OK, &[]).unwrap();
    assert_eq!(tq.used_idx(), 5);
}

#[test]
fn reset_drops_in_flight_requests() {
    let (m, mut tq, rec, mut b) = setup(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    tq.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    b.queue_notify(0).unwrap();
    assert_eq!(submitted(&rec).len(), 1);
    b.reset();
    assert_eq!(b.complete(0, VIRTIO_BLK_S_OK, &[0; 512]), Ok(false));
    assert_eq!(tq.used_idx(), 0);
    let DeviceState::Block(st) = b.state() else {
        panic!()
    };
    assert_eq!(st.next_request, 1);
    assert!(st.queue.is_none() && st.in_flight.is_empty());
}

#[test]
fn malformed_requests_break_the_device() {
    let (m, mut tq, _rec, mut b) = setup(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // No writable status byte.
    tq.add_chain(&[(HDR, 16, false)]);
    assert!(matches!(b.queue_notify(0), Err(DeviceError::Malformed(_))));
    // Header too short.
    tq.add_chain(&[(HDR, 8, false), (STATUS, 1, true)]);
    assert!(matches!(b.queue_notify(0), Err(DeviceError::Malformed(_))));
}

#[test]
fn config_space_holds_the_capacity() {
    let (_m, _tq, _rec, b) = setup(false);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    let mut seg = [0u8; 4];
    b.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
}
