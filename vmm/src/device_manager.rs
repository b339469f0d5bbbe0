//! The VM's devices as the vCPU thread sees them: where causes are applied.
//!
//! [`DeviceManager::apply`] is the one place where a [`Cause`] from the
//! `Inputs` port turns into device-model changes (and, through them, guest
//! memory writes and IRQ line levels), always on the vCPU thread at a stop.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use tandem_devices::lock;
use tandem_devices::virtio::mmio::MmioTransport;
use tandem_replay::{Cause, GuestClock, Output, Outputs};

use crate::legacy::LegacyDevices;

/// COM1 output as a `Write` for vm-superio: every byte becomes an
/// [`Output::Serial`].
pub struct SerialOutput(pub Arc<dyn Outputs>);

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.emit(Output::Serial(buf.to_vec()));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// All devices of one VM.
pub struct DeviceManager {
    /// PIC, PIT, RTC, UART and friends.
    pub legacy: LegacyDevices,
    /// virtio-blk transports, by disk index.
    pub blocks: Vec<Arc<std::sync::Mutex<MmioTransport>>>,
    /// virtio-net transports, by net index.
    pub nets: Vec<Arc<std::sync::Mutex<MmioTransport>>>,
    clock: GuestClock,
    /// Serial input the UART's FIFO could not take yet.
    pending_serial: VecDeque<u8>,
}

impl DeviceManager {
    /// A manager over the legacy devices, driving `clock`.
    pub fn new(legacy: LegacyDevices, clock: GuestClock) -> Self {
        Self {
            legacy,
            blocks: Vec::new(),
            nets: Vec::new(),
            clock,
            pending_serial: VecDeque::new(),
        }
    }

    /// Applies one cause at the current stop.
    pub fn apply(&mut self, cause: Cause) {
        match cause {
            Cause::Time(ns) => {
                self.clock.advance_to(ns);
                lock(&self.legacy.pit).poll();
            }
            Cause::SerialInput(bytes) => self.pending_serial.extend(bytes),
            Cause::NetRx { device, frame } => match self.nets.get(usize::from(device)) {
                Some(net) => {
                    lock(net).apply_net_rx(&frame);
                }
                None => tracing::warn!("frame for absent net device {device} dropped"),
            },
            Cause::BlockDone {
                device,
                request,
                status,
                data,
            } => match self.blocks.get(usize::from(device)) {
                Some(block) => {
                    lock(block).apply_block_done(request, status, &data);
                }
                None => tracing::warn!("completion for absent disk {device} dropped"),
            },
        }
    }

    /// Work that follows the stop's causes: feed the UART what fits.
    pub fn after_causes(&mut self) {
        if !self.pending_serial.is_empty() {
            let taken =
                lock(&self.legacy.serial).enqueue_input(self.pending_serial.make_contiguous());
            self.pending_serial.drain(..taken);
        }
    }

    /// Whether the PIC asserts INTR.
    pub fn interrupt_pending(&self) -> bool {
        lock(&self.legacy.pic).has_pending()
    }

    /// The INTA cycle: the vector to inject, if any.
    pub fn acknowledge_interrupt(&self) -> Option<u8> {
        lock(&self.legacy.pic).acknowledge()
    }

    /// Guest time of the next device deadline.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        lock(&self.legacy.pit).next_deadline_ns()
    }
}
