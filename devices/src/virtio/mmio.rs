//! The virtio-mmio transport, register layout version 2 (virtio 1.2 §4.2.2).
//!
//! One [`MmioTransport`] per device, a [`BusDevice`] over a window of
//! [`MMIO_WINDOW`] bytes (the VMM places device *i* at `0xd000_0000 + i *
//! 0x1000`). Registers below [`CONFIG_SPACE`] take 32-bit aligned accesses
//! only (others read all ones and are ignored); config space takes any width.
//!
//! * **Status** follows §3.1.1: ACKNOWLEDGE, DRIVER, FEATURES_OK (refused,
//!   i.e. left clear, unless the driver's features are a subset of the
//!   device's and include VERSION_1), DRIVER_OK (builds and checks every
//!   ready queue, then activates the device). Writing 0 resets device and
//!   queues. Out-of-order or bit-clearing writes are ignored.
//! * **Broken devices.** A bad queue (QueueReady or DRIVER_OK) or a
//!   [`DeviceError`] from the device sets DEVICE_NEEDS_RESET, raises the
//!   configuration-change interrupt once DRIVER_OK is set and logs a
//!   rate-limited warning; queue notifications are then ignored until reset.
//! * **Interrupts are level-triggered**: the [`IrqLine`] is high exactly while
//!   InterruptStatus is non-zero, and InterruptACK lowers it.
//!
//! **Applying causes.** The VMM routes `Cause::BlockDone` to
//! [`MmioTransport::apply_block_done`] and `Cause::NetRx` to
//! [`MmioTransport::apply_net_rx`]; they reach the typed device, set
//! `INT_VRING` when the used ring changed and drive the line. For anything
//! else, [`MmioTransport::with_device`] / [`MmioTransport::block_mut`] /
//! [`MmioTransport::net_mut`] give direct access, followed by
//! [`MmioTransport::signal_used`] when the used ring changed.

use serde::{Deserialize, Serialize};

use super::block::Block;
use super::net::Net;
use super::queue::build_queue;
use super::{
    DeviceError, DeviceState, QueueConfig, RateLimit, StateError, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::{fill_ones, BusDevice, GuestMemoryMmap, IrqLine, VmRequest};

/// Size of the MMIO window of one device.
pub const MMIO_WINDOW: u64 = 0x1000;
/// "virt" in little-endian ASCII (§4.2.2).
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID: "QEMU", which Linux and the test guests accept.
pub const VENDOR_ID: u32 = 0x554d_4551;

/// Register offsets (§4.2.2, Table 4.1).
pub const REG_MAGIC: u64 = 0x000;
/// Version.
pub const REG_VERSION: u64 = 0x004;
/// DeviceID.
pub const REG_DEVICE_ID: u64 = 0x008;
/// VendorID.
pub const REG_VENDOR_ID: u64 = 0x00c;
/// DeviceFeatures (32 bits selected by DeviceFeaturesSel).
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel.
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel.
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// QueueSel.
pub const REG_QUEUE_SEL: u64 = 0x030;
/// QueueNumMax.
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum.
pub const REG_QUEUE_NUM: u64 = 0x038;
/// QueueReady.
pub const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// InterruptStatus.
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK.
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Status.
pub const REG_STATUS: u64 = 0x070;
/// QueueDescLow.
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh.
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow (available ring).
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh.
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow (used ring).
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh.
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// SHMLenLow: all ones, no shared memory regions.
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
/// SHMLenHigh.
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
/// ConfigGeneration.
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of device config space.
pub const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The guest has a driver.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
/// The driver gave up.
pub const STATUS_FAILED: u32 = 0x80;
/// InterruptStatus: a used ring changed (§4.2.2).
pub const INT_VRING: u32 = 1;
/// InterruptStatus: configuration changed (or NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// The transport registers plus the device state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Queue configuration as the driver wrote it (live indices are in `device`).
    pub queues: Vec<QueueConfig>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device model.
    pub device: DeviceState,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: IrqLine,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    interrupt_status: u32,
    config_generation: u32,
    warn: RateLimit,
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    *value = if high {
        (*value & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (*value & !0xffff_ffff) | u64::from(half)
    };
}

fn half(value: u64, high: bool) -> u32 {
    (if high { value >> 32 } else { value }) as u32
}

impl MmioTransport {
    /// `device` behind a fresh transport raising `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqLine) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueConfig::new(m))
            .collect();
        Self {
            device,
            mem,
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            config_generation: 0,
            warn: RateLimit::default(),
        }
    }

    /// The device model.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Runs `f` on the device; call [`Self::signal_used`] if it changed a used ring.
    pub fn with_device<R>(&mut self, f: impl FnOnce(&mut dyn VirtioDevice) -> R) -> R {
        f(self.device.as_mut())
    }

    /// The virtio-blk device, if that is what this transport carries.
    pub fn block_mut(&mut self) -> Option<&mut Block> {
        self.device.as_any_mut().downcast_mut::<Block>()
    }

    /// The virtio-net device, if that is what this transport carries.
    pub fn net_mut(&mut self) -> Option<&mut Net> {
        self.device.as_any_mut().downcast_mut::<Net>()
    }

    /// Applies `Cause::BlockDone`; false if this is not a virtio-blk device.
    pub fn apply_block_done(&mut self, request: u64, status: u8, data: &[u8]) -> bool {
        let Some(block) = self.block_mut() else {
            return false;
        };
        let result = block.complete(request, status, data);
        self.device_result(result);
        true
    }

    /// Applies `Cause::NetRx`; false if this is not a virtio-net device.
    pub fn apply_net_rx(&mut self, frame: &[u8]) -> bool {
        let Some(net) = self.net_mut() else {
            return false;
        };
        let result = net.receive(frame);
        self.device_result(result);
        true
    }

    /// Sets `INT_VRING` (a used ring changed) and raises the line.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_VRING;
        self.update_irq();
    }

    /// Whether the device has set DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.status & STATUS_NEEDS_RESET != 0
    }

    /// The IRQ line this transport drives.
    pub fn irq(&self) -> u8 {
        self.irq.irq()
    }

    /// A serialisable copy of transport and device state.
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            device: self.device.state(),
        }
    }

    /// Replaces transport and device state (sync point, re-protection) and
    /// drives the line to match InterruptStatus (a no-op when the PIC state
    /// restored beside it already has that level).
    pub fn set_state(&mut self, state: MmioState) -> Result<(), StateError> {
        let maxes = self.device.queue_max_sizes();
        if state.queues.len() != maxes.len() {
            return Err(StateError::QueueCount(state.queues.len(), maxes.len()));
        }
        if let Some(i) = (0u16..)
            .zip(state.queues.iter().zip(maxes))
            .find_map(|(i, (q, &max))| (q.max_size != max).then_some(i))
        {
            return Err(StateError::Queue(DeviceError::BadQueue(i)));
        }
        self.device.set_state(&self.mem, state.device)?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = state.queues;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        self.update_irq();
        Ok(())
    }

    fn update_irq(&self) {
        self.irq.set_level(self.interrupt_status != 0);
    }

    fn device_result(&mut self, result: Result<bool, DeviceError>) {
        match result {
            Ok(true) => self.signal_used(),
            Ok(false) => {}
            Err(e) => self.set_needs_reset(e),
        }
    }

    fn set_needs_reset(&mut self, err: DeviceError) {
        if self.warn.hit() {
            tracing::warn!(
                device = self.device.device_type(),
                irq = self.irq.irq(),
                "virtio device needs reset: {err}"
            );
        }
        self.status |= STATUS_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt_status |= INT_CONFIG;
            self.update_irq();
        }
    }

    fn active(&self) -> bool {
        self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET) == STATUS_DRIVER_OK
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.update_irq();
    }

    fn ignore(&mut self, what: &'static str, offset: u64, value: u32) {
        if self.warn.hit() {
            tracing::warn!(offset, value, "virtio-mmio: {what} ignored");
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status & !STATUS_NEEDS_RESET;
        let mut new = value & !STATUS_NEEDS_RESET;
        let needs = |bit: u32, before: u32| new & bit == 0 || new & before != 0;
        let in_order = new & old == old
            && needs(STATUS_DRIVER, STATUS_ACKNOWLEDGE)
            && needs(STATUS_FEATURES_OK, STATUS_DRIVER)
            && needs(STATUS_DRIVER_OK, STATUS_FEATURES_OK);
        if !in_order {
            self.ignore("out-of-order status write", REG_STATUS, value);
            return;
        }
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let avail = self.device.avail_features();
            let f = self.driver_features;
            if f & !avail == 0 && f & VIRTIO_F_VERSION_1 != 0 {
                self.device.ack_features(f);
            } else {
                new &= !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            }
        }
        self.status = new | (self.status & STATUS_NEEDS_RESET);
        if new & added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.needs_reset() {
            self.interrupt_status |= INT_CONFIG;
            self.update_irq();
            return;
        }
        let built: Result<Vec<_>, _> = (0u16..)
            .zip(self.queues.iter())
            .map(|(i, c)| build_queue(&self.mem, c, i))
            .collect();
        let result = built.and_then(|queues| self.device.activate(self.mem.clone(), queues));
        if let Err(e) = result {
            self.set_needs_reset(e);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.selected_queue().copied();
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 | 1 => half(self.device.avail_features(), self.device_features_sel == 1),
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_NUM => q.map_or(0, |q| u32::from(q.size)),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                q.map_or(0, |q| half(q.desc_table, offset == REG_QUEUE_DESC_HIGH))
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                q.map_or(0, |q| half(q.avail_ring, offset == REG_QUEUE_DRIVER_HIGH))
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                q.map_or(0, |q| half(q.used_ring, offset == REG_QUEUE_DEVICE_HIGH))
            }
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        // Linux clears QueueReady when it deletes queues, sometimes before
        // the reset; the running device keeps its own copy either way.
        let clearing_ready = offset == REG_QUEUE_READY && value == 0;
        if self.status & STATUS_DRIVER_OK != 0 && !clearing_ready {
            self.ignore("queue configuration after DRIVER_OK", offset, value);
            return;
        }
        let index = u16::try_from(self.queue_sel).unwrap_or(u16::MAX);
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else {
            return self.ignore("configuration of a missing queue", offset, value);
        };
        match offset {
            REG_QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(u16::MAX),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                set_half(&mut q.desc_table, offset == REG_QUEUE_DESC_HIGH, value)
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                set_half(&mut q.avail_ring, offset == REG_QUEUE_DRIVER_HIGH, value)
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                set_half(&mut q.used_ring, offset == REG_QUEUE_DEVICE_HIGH, value)
            }
            REG_QUEUE_READY => {
                q.ready = value == 1;
                let config = *q;
                if config.ready {
                    if let Err(e) = build_queue(&mem, &config, index) {
                        self.set_needs_reset(e);
                    }
                }
            }
            _ => {}
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => {
                let negotiating =
                    self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER;
                match self.driver_features_sel {
                    0 | 1 if negotiating => set_half(
                        &mut self.driver_features,
                        self.driver_features_sel == 1,
                        value,
                    ),
                    _ => self.ignore("DriverFeatures write", offset, value),
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            REG_QUEUE_NOTIFY => {
                if !self.active() {
                    return;
                }
                match u16::try_from(value) {
                    Ok(index) => {
                        let result = self.device.queue_notify(index);
                        self.device_result(result);
                    }
                    Err(_) => self.ignore("notify of a missing queue", offset, value),
                }
            }
            REG_INTERRUPT_ACK => {
                self.interrupt_status &= !value;
                self.update_irq();
            }
            REG_STATUS => self.set_status(value),
            _ => self.ignore("write to a read-only or unknown register", offset, value),
        }
    }
}

impl BusDevice for MmioTransport {
    fn name(&self) -> &'static str {
        "virtio-mmio"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
            if offset
                .checked_add(len)
                .is_some_and(|end| end <= MMIO_WINDOW)
            {
                self.device.read_config(offset - CONFIG_SPACE, data);
            } else {
                fill_ones(data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            fill_ones(data);
            return;
        }
        let value = self.read_reg(offset);
        for (d, s) in data.iter_mut().zip(value.to_le_bytes()) {
            *d = s;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if offset >= CONFIG_SPACE {
            let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
            if offset
                .checked_add(len)
                .is_some_and(|end| end <= MMIO_WINDOW)
            {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return None;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(bytes)),
            _ => self.ignore("register access that is not 32-bit aligned", offset, 0),
        }
        None
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
