//! Tests of [`super`] (mmio.rs), kept apart to keep files short.

use std::sync::{Arc, Mutex};

use tandem_replay::{BlockOp, Output};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::lock;
use crate::pic::{Pic, PicChipState, PicState};
use crate::virtio::block::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use crate::virtio::testutil::{mem, Recorder, TestQueue};

const IRQ: u8 = 5;

struct Rig {
    mem: GuestMemoryMmap,
    pic: Arc<Mutex<Pic>>,
    rec: Arc<Recorder>,
    t: MmioTransport,
}

fn rig(net: bool) -> Rig {
    let mem = mem();
    // IRQ 5 level-triggered, as the VMM programs the ELCR for virtio-mmio.
    let pic = Arc::new(Mutex::new(Pic::from_state(PicState {
        master: PicChipState {
            elcr: 1 << IRQ,
            ..PicChipState::default()
        },
        ..PicState::default()
    })));
    let rec = Recorder::new();
    let device: Box<dyn VirtioDevice> = if net {
        Box::new(Net::new(0, [2, 0, 0, 0, 0, 1], rec.clone()))
    } else {
        Box::new(Block::new(0, 1024, false, "vda".into(), rec.clone()))
    };
    let t = MmioTransport::new(device, mem.clone(), IrqLine::new(pic.clone(), IRQ));
    Rig { mem, pic, rec, t }
}

impl Rig {
    fn rd(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, offset: u64, value: u32) {
        assert_eq!(self.t.write(offset, &value.to_le_bytes()), None);
    }

    fn line(&self) -> bool {
        lock(&self.pic).state().master.line & (1 << IRQ) != 0
    }

    fn negotiate(&mut self) {
        self.wr(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.wr(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in 0..2 {
            self.wr(REG_DEVICE_FEATURES_SEL, sel);
            let f = self.rd(REG_DEVICE_FEATURES);
            self.wr(REG_DRIVER_FEATURES_SEL, sel);
            self.wr(REG_DRIVER_FEATURES, f);
        }
        self.wr(REG_STATUS, 0xb);
        assert_eq!(self.rd(REG_STATUS), 0xb);
    }

    fn queue(&mut self, sel: u32, tq: &TestQueue, size: u32) {
        self.wr(REG_QUEUE_SEL, sel);
        self.wr(REG_QUEUE_NUM, size);
        self.wr(REG_QUEUE_DESC_LOW, tq.desc_table() as u32);
        self.wr(REG_QUEUE_DESC_HIGH, 0);
        self.wr(REG_QUEUE_DRIVER_LOW, tq.avail_ring() as u32);
        self.wr(REG_QUEUE_DEVICE_LOW, tq.used_ring() as u32);
        self.wr(REG_QUEUE_READY, 1);
    }

    /// Handshake with one block queue of 16 at 0x1000.
    fn up(&mut self) -> TestQueue {
        self.negotiate();
        let tq = TestQueue::new(&self.mem, 0x1000, 16);
        self.queue(0, &tq, 16);
        self.wr(REG_STATUS, 0xf);
        assert_eq!(self.rd(REG_STATUS), 0xf);
        tq
    }
}

#[test]
fn identity_registers_and_access_widths() {
    let mut r = rig(false);
    assert_eq!(r.rd(REG_MAGIC), MAGIC_VALUE);
    assert_eq!(r.rd(REG_VERSION), 2);
    assert_eq!(r.rd(REG_DEVICE_ID), 2);
    assert_eq!(r.rd(REG_VENDOR_ID), VENDOR_ID);
    assert_eq!(r.rd(REG_QUEUE_NUM_MAX), 256);
    r.wr(REG_QUEUE_SEL, 1);
    assert_eq!(r.rd(REG_QUEUE_NUM_MAX), 0);
    r.wr(REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.rd(REG_DEVICE_FEATURES), 1); // VERSION_1 is bit 32
                                              // Wrong width or alignment: all ones.
    let mut b = [0u8; 2];
    r.t.read(REG_MAGIC, &mut b);
    assert_eq!(b, [0xff; 2]);
    let mut b = [0u8; 4];
    r.t.read(REG_MAGIC + 1, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Config space takes any width: capacity 1024 sectors.
    let mut cap = [0u8; 8];
    r.t.read(CONFIG_SPACE, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 1024);
    let mut one = [0u8; 1];
    r.t.read(CONFIG_SPACE + 1, &mut one);
    assert_eq!(one, [4]);
    r.t.read(MMIO_WINDOW, &mut one);
    assert_eq!(one, [0xff]);
    let mut net = rig(true);
    assert_eq!(net.rd(REG_DEVICE_ID), 1);
    net.wr(REG_QUEUE_SEL, 1);
    assert_eq!(net.rd(REG_QUEUE_NUM_MAX), 256);
}

#[test]
fn status_handshake_and_feature_negotiation() {
    let mut r = rig(false);
    // DRIVER before ACKNOWLEDGE is ignored.
    r.wr(REG_STATUS, STATUS_DRIVER);
    assert_eq!(r.rd(REG_STATUS), 0);
    r.wr(REG_STATUS, STATUS_ACKNOWLEDGE);
    r.wr(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // A feature the device does not offer: FEATURES_OK stays clear.
    r.wr(REG_DRIVER_FEATURES_SEL, 0);
    r.wr(REG_DRIVER_FEATURES, 1 << 28);
    r.wr(REG_DRIVER_FEATURES_SEL, 1);
    r.wr(REG_DRIVER_FEATURES, 1);
    r.wr(REG_STATUS, 0xb);
    assert_eq!(r.rd(REG_STATUS), 0x3);
    // Without VERSION_1: refused too.
    r.wr(REG_DRIVER_FEATURES_SEL, 0);
    r.wr(REG_DRIVER_FEATURES, 0);
    r.wr(REG_DRIVER_FEATURES_SEL, 1);
    r.wr(REG_DRIVER_FEATURES, 0);
    r.wr(REG_STATUS, 0xb);
    assert_eq!(r.rd(REG_STATUS), 0x3);
    // A subset with VERSION_1: accepted; features are then frozen.
    r.wr(REG_DRIVER_FEATURES, 1);
    r.wr(REG_STATUS, 0xb);
    assert_eq!(r.rd(REG_STATUS), 0xb);
    r.wr(REG_DRIVER_FEATURES, 0);
    assert_eq!(r.t.state().driver_features, 1 << 32);
    // Clearing a bit without a reset is ignored; 0 resets.
    r.wr(REG_STATUS, 0x1);
    assert_eq!(r.rd(REG_STATUS), 0xb);
    r.wr(REG_STATUS, 0);
    assert_eq!(r.rd(REG_STATUS), 0);
    assert_eq!(r.t.state().driver_features, 0);
    // The full handshake activates the device.
    r.up();
    assert!(!r.t.needs_reset());
}

#[test]
fn bad_queue_size_needs_reset() {
    let mut r = rig(false);
    r.negotiate();
    let tq = TestQueue::new(&r.mem, 0x1000, 16);
    r.queue(0, &tq, 100);
    assert_eq!(r.rd(REG_STATUS) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    // No interrupt before DRIVER_OK; the config interrupt comes with it.
    assert!(!r.line());
    r.wr(REG_STATUS, 0xf);
    assert_eq!(r.rd(REG_INTERRUPT_STATUS), INT_CONFIG);
    assert!(r.line());
    // Reset clears everything, including the line.
    r.wr(REG_STATUS, 0);
    assert!(!r.line());
    assert_eq!(r.rd(REG_STATUS), 0);
    assert_eq!(r.rd(REG_QUEUE_READY), 0);
    // An unready queue is not checked.
    r.negotiate();
    r.wr(REG_QUEUE_SEL, 0);
    r.wr(REG_QUEUE_NUM, 512);
    r.wr(REG_STATUS, 0xf);
    assert_eq!(r.rd(REG_STATUS), 0xf);
    r.wr(REG_STATUS, 0);
    // Larger than the maximum, written after QueueReady: found at DRIVER_OK.
    r.negotiate();
    r.queue(0, &tq, 16);
    assert!(!r.t.needs_reset());
    r.wr(REG_QUEUE_NUM, 512);
    r.wr(REG_STATUS, 0xf);
    assert!(r.t.needs_reset());
    assert!(r.line());
}

#[test]
fn completion_raises_a_level_interrupt_until_acked() {
    let mut r = rig(false);
    let mut tq = r.up();
    r.mem
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x8000))
        .unwrap();
    r.mem.write_obj(3u64, GuestAddress(0x8008)).unwrap();
    tq.add_chain(&[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)]);
    r.wr(REG_QUEUE_NOTIFY, 0);
    let out = r.rec.take();
    assert_eq!(
        out,
        vec![Output::BlockSubmit {
            device: 0,
            request: 0,
            op: BlockOp::Read {
                sector: 3,
                len: 512
            }
        }]
    );
    assert!(!r.line());
    assert!(!r.t.apply_net_rx(&[0; 60]));
    assert!(r.t.apply_block_done(0, VIRTIO_BLK_S_OK, &[0x77; 512]));
    assert_eq!(r.rd(REG_INTERRUPT_STATUS), INT_VRING);
    assert!(r.line());
    assert!(lock(&r.pic).has_pending());
    assert_eq!(tq.used_idx(), 1);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0x77);
    r.wr(REG_INTERRUPT_ACK, INT_VRING);
    assert_eq!(r.rd(REG_INTERRUPT_STATUS), 0);
    assert!(!r.line());
    assert!(!lock(&r.pic).has_pending());
    // The state is plain data.
    let st = r.t.state();
    assert!(matches!(st.device, DeviceState::Block(ref b) if b.in_flight.is_empty()));
}

#[test]
fn descriptor_outside_memory_needs_reset_not_panic() {
    let mut r = rig(false);
    let mut tq = r.up();
    tq.add_chain(&[(0x7fff_ffff_f000, 16, false), (0xa000, 1, true)]);
    r.wr(REG_QUEUE_NOTIFY, 0);
    assert!(r.t.needs_reset());
    assert_eq!(r.rd(REG_INTERRUPT_STATUS), INT_CONFIG);
    assert!(r.line());
    // Further notifications are ignored until reset.
    r.mem
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x8000))
        .unwrap();
    tq.add_chain(&[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)]);
    r.wr(REG_QUEUE_NOTIFY, 0);
    assert!(r.rec.take().is_empty());
    r.wr(REG_STATUS, 0);
    assert!(!r.line());
    let mut tq = r.up();
    tq.add_chain(&[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)]);
    r.wr(REG_QUEUE_NOTIFY, 0);
    assert_eq!(r.rec.take().len(), 1);
}

#[test]
fn descriptor_loop_needs_reset() {
    let mut r = rig(false);
    let mut tq = r.up();
    let head = tq.add_chain(&[(0x8000, 16, false), (0x8100, 16, false)]);
    tq.set_next(head + 1, head);
    r.wr(REG_QUEUE_NOTIFY, 0);
    assert!(r.t.needs_reset());
    assert!(r.line());
}

#[test]
fn net_rx_through_the_transport() {
    let mut r = rig(true);
    r.negotiate();
    let mut rx = TestQueue::new(&r.mem, 0x1000, 16);
    let tx = TestQueue::new(&r.mem, 0x2000, 16);
    r.queue(0, &rx, 16);
    r.queue(1, &tx, 16);
    r.wr(REG_STATUS, 0xf);
    assert!(r.t.apply_net_rx(&[0x42; 60]));
    assert!(!r.line());
    rx.add_chain(&[(0x8000, 2048, true)]);
    r.wr(REG_QUEUE_NOTIFY, 0);
    assert!(r.line());
    assert_eq!(rx.used(0).1, 72);
    assert!(r.t.net_mut().is_some() && r.t.block_mut().is_none());
}

/// Random register traffic over random rings never panics.
#[test]
fn no_guest_input_panics() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    let (mut outputs, mut broken) = (0, 0);
    for round in 0..200 {
        let mut r = rig(round % 2 == 1);
        // Descriptor tables and rings full of plausible garbage.
        for i in 0..0x400u64 {
            let desc = [rand() & 0xf_ffff, rand() & 0x1fff, rand() & 7, rand() & 31];
            let at = 0x1000 + i * 16;
            r.mem.write_obj(desc[0], GuestAddress(at)).unwrap();
            r.mem
                .write_obj(desc[1] as u32, GuestAddress(at + 8))
                .unwrap();
            r.mem
                .write_obj(desc[2] as u16, GuestAddress(at + 12))
                .unwrap();
            r.mem
                .write_obj(desc[3] as u16, GuestAddress(at + 14))
                .unwrap();
        }
        r.negotiate();
        for sel in 0..2 {
            r.wr(REG_QUEUE_SEL, sel);
            r.wr(REG_QUEUE_NUM, 1 << (rand() % 6));
            r.wr(REG_QUEUE_DESC_LOW, 0x1000 + sel * 0x1000);
            r.wr(REG_QUEUE_DRIVER_LOW, 0x1200 + sel * 0x1000);
            r.wr(REG_QUEUE_DEVICE_LOW, 0x1800 + sel * 0x1000);
            r.wr(REG_QUEUE_READY, 1);
        }
        r.wr(REG_STATUS, 0xf);
        for _ in 0..200 {
            let offset = rand() % 0x140;
            let value = rand() as u32;
            match rand() % 8 {
                0 => r.wr(REG_QUEUE_NOTIFY, value % 3),
                1 => {
                    r.t.apply_block_done(
                        rand() % 8,
                        (rand() % 4) as u8,
                        &vec![1; (rand() % 2048) as usize],
                    );
                }
                2 => {
                    r.t.apply_net_rx(&vec![2; (rand() % 2000) as usize]);
                }
                3 => {
                    let width = [1usize, 2, 4, 8][(rand() % 4) as usize];
                    let _ = r.t.write(offset, &value.to_le_bytes().repeat(2)[..width]);
                }
                _ => {
                    let width = [1usize, 2, 4, 8][(rand() % 4) as usize];
                    let mut buf = [0u8; 8];
                    r.t.read(offset, &mut buf[..width]);
                }
            }
            // Scribble on the avail rings.
            let ring = 0x1200 + (rand() % 2) * 0x1000;
            r.mem
                .write_obj(rand() as u16, GuestAddress(ring + 2 + 2 * (rand() % 34)))
                .unwrap();
        }
        assert_eq!(r.line(), r.t.state().interrupt_status != 0);
        outputs += r.rec.take().len();
        broken += usize::from(r.t.needs_reset());
    }
    // The rings were processed, not just refused.
    assert!(
        outputs > 0 && broken > 0,
        "outputs {outputs} broken {broken}"
    );
}

#[test]
fn state_round_trips_with_in_flight_requests() {
    let mut r = rig(false);
    let mut tq = r.up();
    r.mem
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x8000))
        .unwrap();
    tq.add_chain(&[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)]);
    r.wr(REG_QUEUE_NOTIFY, 0);
    assert_eq!(r.rec.take().len(), 1);
    let st = r.t.state();
    // A second transport over the same memory takes the state and completes
    // the request the first one submitted.
    let mut s = rig(false);
    s.mem = r.mem.clone();
    s.t = MmioTransport::new(
        Box::new(Block::new(0, 1024, false, "vda".into(), s.rec.clone())),
        r.mem.clone(),
        IrqLine::new(s.pic.clone(), IRQ),
    );
    s.t.set_state(st.clone()).unwrap();
    assert_eq!(s.t.state(), st);
    assert!(s.t.apply_block_done(0, VIRTIO_BLK_S_OK, &[5; 512]));
    assert_eq!(tq.used_idx(), 1);
    assert!(s.line());
    // Wrong device type or queue count: refused.
    let mut n = rig(true);
    assert!(n.t.set_state(st).is_err());
}

mod fuzz {
    //! Descriptor chains and rings come from guest memory, which the guest
    //! controls: random bytes there, random register writes, notifies and
    //! completions must never panic the transport or the devices.
    use super::*;
    use proptest::prelude::*;

    fn register() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..0x40).prop_map(|i| i * 4),
            Just(REG_QUEUE_NOTIFY),
            Just(REG_STATUS),
            Just(REG_INTERRUPT_ACK),
            (0x100u64..0x140),
        ]
    }

    proptest! {
        #[test]
        fn random_rings_and_registers_never_panic(
            net in any::<bool>(),
            ring in prop::collection::vec(any::<u8>(), 0x1000),
            data in prop::collection::vec(any::<u8>(), 0..0x2000),
            regs in prop::collection::vec((register(), any::<u32>()), 0..40),
            completions in prop::collection::vec((any::<u64>(), any::<u8>(), 0usize..600), 0..8),
        ) {
            let mut r = rig(net);
            let _tq = r.up();
            // The queue's descriptor table, avail and used rings, with
            // whatever the guest put there, and data pages after them.
            r.mem.write_slice(&ring, GuestAddress(0x1000)).unwrap();
            r.mem.write_slice(&data, GuestAddress(0x3000)).unwrap();
            r.wr(REG_QUEUE_NOTIFY, 0);
            for (offset, value) in regs {
                let _ = r.t.write(offset, &value.to_le_bytes());
                let mut b = [0u8; 4];
                r.t.read(offset, &mut b);
            }
            r.wr(REG_QUEUE_NOTIFY, 0);
            r.wr(REG_QUEUE_NOTIFY, 1);
            for (request, status, len) in completions {
                let bytes = vec![0xa5u8; len];
                if net {
                    let _ = r.t.apply_net_rx(&bytes);
                } else {
                    let _ = r.t.apply_block_done(request, status, &bytes);
                }
                r.t.signal_used();
            }
            let _ = r.rec.take();
        }
    }
}
