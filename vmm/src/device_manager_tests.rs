//! Tests of the device manager's one component list: order, bytes,
//! capture/install agreement and refusals by name.

use super::*;
use tandem_devices::pic::{PicBus, PicPort};
use tandem_devices::virtio::block::Block;
use tandem_devices::virtio::mmio::{REG_STATUS, STATUS_ACKNOWLEDGE, STATUS_DRIVER};
use tandem_devices::virtio::net::Net;
use tandem_devices::{BusDevice, GuestMemoryMmap, IrqLine};
use tandem_replay::Output;
use vm_memory::GuestAddress;

struct NoOutputs;

impl Outputs for NoOutputs {
    fn emit(&self, _output: Output) {}
}

/// A manager as `Vm::new` builds one: legacy devices of `model`, then
/// `disks` virtio-blk and `nets` virtio-net transports.
fn manager(model: u32, disks: u8, nets: u8) -> DeviceManager {
    let clock = GuestClock::new();
    let serial_out = SerialOutput::default();
    let legacy = LegacyDevices::new(&clock, 1_700_000_000, Box::new(serial_out.clone()), model);
    let outputs: Arc<dyn Outputs> = Arc::new(NoOutputs);
    let mut dm = DeviceManager::new(legacy, clock, serial_out, outputs.clone());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let transport = |model: Box<dyn tandem_devices::virtio::VirtioDevice>, irq| {
        Arc::new(std::sync::Mutex::new(MmioTransport::new(
            model,
            mem.clone(),
            IrqLine::new(dm.legacy.pic.clone(), irq),
        )))
    };
    let blocks: Vec<_> = (0..disks)
        .map(|i| {
            let disk = Block::new(i, 2048, false, format!("disk{i}"), outputs.clone());
            transport(Box::new(disk), 5 + i)
        })
        .collect();
    let nets: Vec<_> = (0..nets)
        .map(|i| {
            let net = Net::new(i, [0x52, 0x54, 0, 0x12, 0x34, i], outputs.clone());
            transport(Box::new(net), 10 + i)
        })
        .collect();
    dm.blocks = blocks;
    dm.nets = nets;
    dm
}

/// Drives every component away from its reset state.
fn exercise(dm: &mut DeviceManager) {
    let pic = dm.legacy.pic.clone();
    let mut master = PicBus::new(pic.clone(), PicPort::Master);
    for (offset, value) in [(0, 0x11), (1, 0x20), (1, 0x04), (1, 0x01), (1, 0xfa)] {
        master.write(offset, &[value]);
    }
    {
        let mut pit = lock(&dm.legacy.pit);
        pit.write(3, &[0x34]);
        pit.write(0, &[0x9c]);
        pit.write(0, &[0x2e]);
    }
    dm.apply(Cause::Time(3_000_000)).unwrap();
    lock(&dm.legacy.rtc).write(0, &[0x0b]);
    lock(&dm.legacy.serial).write(1, &[0x01]);
    lock(&dm.legacy.scratch).write(0, &[0x5a, 0xa5, 0x11, 0x22]);
    dm.apply(Cause::SerialInput(vec![b'x'; 100])).unwrap();
    dm.after_causes();
    lock(&dm.legacy.watchdog).write(0, &[1, 0, 0, 0]);
    for t in dm.blocks.iter().chain(&dm.nets) {
        let status = (STATUS_ACKNOWLEDGE | STATUS_DRIVER).to_le_bytes();
        lock(t).write(REG_STATUS, &status);
    }
}

fn names(state: &[(String, Vec<u8>)]) -> Vec<&str> {
    state.iter().map(|(n, _)| n.as_str()).collect()
}

/// The component names and their order are part of the log format and
/// of the state hashes the primary and secondary compare.
#[test]
fn component_order_is_pinned() {
    let dm = manager(3, 2, 2);
    let expected = [
        "pic",
        "pit",
        "rtc",
        "serial",
        "i8042",
        "debug-exit",
        "scratch",
        "serial-pending",
        "watchdog",
        "virtio-blk0",
        "virtio-blk1",
        "virtio-net0",
        "virtio-net1",
    ];
    assert_eq!(dm.component_names(), expected);
    assert_eq!(names(&dm.capture()), expected);
    // Before device-model version 3 there is no watchdog component.
    let dm = manager(2, 1, 0);
    assert_eq!(
        names(&dm.capture()),
        [
            "pic",
            "pit",
            "rtc",
            "serial",
            "i8042",
            "debug-exit",
            "scratch",
            "serial-pending",
            "virtio-blk0",
        ]
    );
}

/// The bytes of each component, as the string tables this list
/// replaced produced them (logs and golden files hold these bytes).
#[test]
fn component_bytes_are_pinned() {
    let digest = |dm: &DeviceManager| -> Vec<(String, usize, u64)> {
        dm.capture()
            .into_iter()
            .map(|(n, b)| (n, b.len(), xxhash_rust::xxh3::xxh3_64(&b)))
            .collect()
    };
    let pinned = |list: &[(&str, usize, u64)]| -> Vec<(String, usize, u64)> {
        list.iter()
            .map(|&(n, l, h)| (n.to_string(), l, h))
            .collect()
    };
    let mut dm = manager(3, 2, 1);
    exercise(&mut dm);
    assert_eq!(
        digest(&dm),
        pinned(&[
            ("pic", 32, 0xf10d9ea16eedb5e9),
            ("pit", 57, 0x398f4a7f7c3c101e),
            ("rtc", 138, 0x0ceb571b9bdf14dd),
            ("serial", 74, 0x01ad3a5d053979ff),
            ("i8042", 2, 0x3325230e1f285505),
            ("debug-exit", 1, 0xc44bdff4074eecdb),
            ("scratch", 6, 0x41e0072cc215135b),
            ("serial-pending", 37, 0x1ac0b59dc3f68b9f),
            ("watchdog", 7, 0x20156a5ad1e6604b),
            ("virtio-blk0", 27, 0x6a05fc7c90825ebf),
            ("virtio-blk1", 27, 0x6a05fc7c90825ebf),
            ("virtio-net0", 40, 0x83ee8b4274527a7c),
        ])
    );
    assert_eq!(
        digest(&manager(2, 1, 0)),
        pinned(&[
            ("pic", 32, 0xa057271c9071c99d),
            ("pit", 54, 0x53958bd4f4ed16a8),
            ("rtc", 138, 0x3618f2d2d732eb8f),
            ("serial", 10, 0x2ec2aca54936be35),
            ("i8042", 2, 0x3325230e1f285505),
            ("debug-exit", 1, 0xc44bdff4074eecdb),
            ("scratch", 2, 0x3325230e1f285505),
            ("serial-pending", 1, 0xc44bdff4074eecdb),
            ("virtio-blk0", 27, 0x3acc47702369017e),
        ])
    );
    // Each component is its model's state in the log's encoding.
    let l = &dm.legacy;
    let state = dm.capture();
    let bytes = |name: &str| state.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let enc = |v: &dyn erased::Encode| v.encode();
    assert_eq!(bytes("pic"), enc(&lock(&l.pic).state()));
    assert_eq!(bytes("pit"), enc(&lock(&l.pit).state()));
    assert_eq!(bytes("rtc"), enc(&lock(&l.rtc).state()));
    assert_eq!(bytes("serial"), enc(&lock(&l.serial).state()));
    assert_eq!(bytes("i8042"), enc(&lock(&l.i8042).state()));
    assert_eq!(bytes("debug-exit"), enc(&lock(&l.debug_exit).state()));
    assert_eq!(bytes("scratch"), enc(&lock(&l.scratch).state()));
    let pending: VecDeque<u8> = vec![b'x'; 36].into();
    assert_eq!(bytes("serial-pending"), enc(&pending));
    assert_eq!(bytes("watchdog"), enc(&lock(&l.watchdog).state()));
    assert_eq!(bytes("virtio-blk1"), enc(&lock(&dm.blocks[1]).state()));
    assert_eq!(bytes("virtio-net0"), enc(&lock(&dm.nets[0]).state()));
}

/// Encoding through a trait object, for the table above.
mod erased {
    pub trait Encode {
        fn encode(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap()
        }
    }
}

/// Capture, install into a fresh manager, capture again: the same
/// names, order and bytes. Fails if capture and install disagree.
#[test]
fn install_takes_what_capture_gives() {
    for (model, disks, nets) in [(3, 2, 1), (2, 1, 2), (3, 0, 0)] {
        let mut dm = manager(model, disks, nets);
        exercise(&mut dm);
        lock(&dm.legacy.i8042).write(0, &[0xed]);
        lock(&dm.legacy.debug_exit).write(0, &[0x31]);
        let saved = dm.capture();
        let mut fresh = manager(model, disks, nets);
        let untouched = fresh.capture();
        let still: Vec<&str> = (saved.iter().zip(&untouched))
            .filter(|(a, b)| a.1 == b.1)
            .map(|(a, _)| a.0.as_str())
            .collect();
        assert!(
            still.is_empty(),
            "the exercise left {still:?} as after reset"
        );
        fresh.install(&saved).unwrap();
        assert_eq!(fresh.capture(), saved);
        // The pending input is live state too, not just bytes.
        fresh.after_causes();
        dm.after_causes();
        assert_eq!(fresh.capture(), dm.capture());
    }
}

fn mismatch(dm: &mut DeviceManager, saved: &[(String, Vec<u8>)]) -> ComponentMismatch {
    let before = dm.capture();
    match dm.install(saved) {
        Err(DeviceStateError::Components { mismatch, .. }) => {
            assert_eq!(dm.capture(), before, "a refused list installs nothing");
            mismatch
        }
        other => panic!("expected a component mismatch, got {other:?}"),
    }
}

#[test]
fn a_different_component_list_is_refused_by_name() {
    let mut source = manager(3, 1, 1);
    exercise(&mut source);
    let saved = source.capture();
    let mut dm = manager(3, 1, 1);

    let mut missing = saved.clone();
    missing.retain(|(n, _)| n != "watchdog");
    let m = mismatch(&mut dm, &missing);
    assert_eq!(m, ComponentMismatch::Missing("watchdog".into()));

    let mut extra = saved.clone();
    extra.push(("virtio-net1".into(), saved.last().unwrap().1.clone()));
    let m = mismatch(&mut dm, &extra);
    assert_eq!(m, ComponentMismatch::Unknown("virtio-net1".into()));

    let mut renamed = saved.clone();
    renamed[4].0 = "keyboard".into();
    let m = mismatch(&mut dm, &renamed);
    assert_eq!(m, ComponentMismatch::Unknown("keyboard".into()));

    let mut twice = saved.clone();
    twice[1] = twice[0].clone();
    let m = mismatch(&mut dm, &twice);
    assert_eq!(m, ComponentMismatch::Repeated("pic".into()));

    let mut swapped = saved.clone();
    swapped.swap(0, 1);
    let m = mismatch(&mut dm, &swapped);
    let misplaced = ComponentMismatch::Misplaced {
        name: "pit".into(),
        saved_at: 0,
        ours_at: 1,
    };
    assert_eq!(m, misplaced);

    let err = dm.install(&swapped).unwrap_err().to_string();
    assert!(
        err.contains("component pit is saved at position 0"),
        "{err}"
    );

    // A VM of another shape: an older device model, one disk fewer.
    let older = manager(2, 1, 1).capture();
    let m = mismatch(&mut dm, &older);
    assert_eq!(m, ComponentMismatch::Missing("watchdog".into()));
    let m = mismatch(&mut manager(3, 0, 1), &saved);
    assert_eq!(m, ComponentMismatch::Unknown("virtio-blk0".into()));
    let m = mismatch(&mut dm, &[]);
    assert_eq!(m, ComponentMismatch::Missing("pic".into()));
}

#[test]
fn bad_bytes_are_refused_by_name_without_panicking() {
    let mut source = manager(3, 1, 1);
    exercise(&mut source);
    let saved = source.capture();
    let mut dm = manager(3, 1, 1);
    for i in 0..saved.len() {
        let name = saved[i].0.clone();
        let good = saved[i].1.clone();
        let mut garbage = vec![
            Vec::new(),
            good[..good.len() - 1].to_vec(),
            vec![0xff; good.len()],
            vec![0xfc; 64],
        ];
        // Another component's bytes.
        garbage.push(saved[(i + 1) % saved.len()].1.clone());
        for bytes in garbage {
            let mut bad = saved.clone();
            bad[i].1 = bytes;
            match dm.install(&bad) {
                Ok(()) => {}
                Err(DeviceStateError::Component { name: n, reason }) => {
                    assert_eq!(n, name, "{reason}");
                    let text = DeviceStateError::Component { name: n, reason }.to_string();
                    assert!(text.starts_with(&format!("device {name}: ")), "{text}");
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }
    // Truncated state never decodes.
    let mut bad = saved.clone();
    bad[1].1.pop();
    match dm.install(&bad) {
        Err(DeviceStateError::Component {
            name,
            reason: SnapshotError::Decode(_),
        }) => assert_eq!(name, "pit"),
        other => panic!("{other:?}"),
    }
    // State that decodes but that the model refuses.
    let mut serial = lock(&source.legacy.serial).state();
    serial.in_buffer = vec![0; 65];
    let mut bad = saved.clone();
    bad[3].1 = bincode::serde::encode_to_vec(&serial, bincode::config::standard()).unwrap();
    match dm.install(&bad) {
        Err(DeviceStateError::Component {
            name,
            reason: SnapshotError::Refused(why),
        }) => assert_eq!((name.as_str(), why.contains("65 bytes")), ("serial", true)),
        other => panic!("{other:?}"),
    }
    let mut bad = saved.clone();
    let net = bad.iter().position(|(n, _)| n == "virtio-net0").unwrap();
    bad[net - 1].1 = bad[net].1.clone();
    let err = dm.install(&bad).unwrap_err();
    assert!(err.to_string().starts_with("device virtio-blk0: "), "{err}");
    // And the good state still installs afterwards.
    dm.install(&saved).unwrap();
    assert_eq!(dm.capture(), saved);
}
