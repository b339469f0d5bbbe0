//! The VM's devices as the vCPU thread sees them: where causes are applied.
//!
//! [`DeviceManager::apply`] is the one place where a [`Cause`] from the
//! `Inputs` port turns into device-model changes (and, through them, guest
//! memory writes and IRQ line levels), always on the vCPU thread at a stop.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use tandem_devices::lock;
use tandem_devices::snapshot::{Component, SnapshotError, StateCodec, Stateful};
use tandem_devices::virtio::mmio::MmioTransport;
use tandem_replay::{Cause, GuestClock, Outputs};

use crate::backend::replica::{data_hash, Replica, ReplicaError};
use crate::legacy::LegacyDevices;

/// Why a following secondary cannot go on with mirrored storage.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The read this side did on its replica differs from the primary's.
    #[error(
        "replica drift on disk {device}: read request {request} ({len} bytes at sector {sector}) \
         hashes to {ours:#018x} here and {theirs:#018x} on the primary; the chunks are marked \
         for the next re-sync"
    )]
    Drift {
        /// The disk.
        device: u8,
        /// The request.
        request: u64,
        /// Its first sector.
        sector: u64,
        /// Its length.
        len: u32,
        /// Hash of this side's data.
        ours: u64,
        /// Hash logged by the primary.
        theirs: u64,
    },
    /// This side's replica could not be read or written.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// COM1 output as a `Write` for vm-superio: the bytes of the current stop
/// are collected here; the vCPU loop journals them and emits them as an
/// [`Output::Serial`] (or, replaying, emits the recorded ones).
#[derive(Clone, Default)]
pub struct SerialOutput(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why device state could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The saved list of components differs from this VM's.
    #[error(
        "saved device state does not fit this VM: {mismatch} \
         (saved {saved:?}, this VM has {ours:?})"
    )]
    Components {
        /// The first difference found.
        mismatch: ComponentMismatch,
        /// Names in the saved state.
        saved: Vec<String>,
        /// Names here.
        ours: Vec<String>,
    },
    /// A component's bytes do not decode or were refused.
    #[error("device {name}: {reason}")]
    Component {
        /// The component.
        name: String,
        /// Why.
        reason: SnapshotError,
    },
}

/// How a saved list of component names differs from this VM's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComponentMismatch {
    /// The saved state names a component this VM does not have (an extra
    /// or renamed device).
    #[error("component {0} is not a device of this VM")]
    Unknown(String),
    /// The saved state names a component twice.
    #[error("component {0} is saved twice")]
    Repeated(String),
    /// This VM has a component the saved state lacks.
    #[error("component {0} is missing from the saved state")]
    Missing(String),
    /// Same components, different order.
    #[error("component {name} is saved at position {saved_at}, this VM has it at {ours_at}")]
    Misplaced {
        /// The component.
        name: String,
        /// Its index in the saved list.
        saved_at: usize,
        /// Its index in this VM's list.
        ours_at: usize,
    },
}

impl ComponentMismatch {
    /// The first difference between `saved` and `ours`, if any.
    fn find(saved: &[String], ours: &[String]) -> Option<Self> {
        for (i, name) in saved.iter().enumerate() {
            if !ours.contains(name) {
                return Some(Self::Unknown(name.clone()));
            }
            if saved[..i].contains(name) {
                return Some(Self::Repeated(name.clone()));
            }
        }
        if let Some(name) = ours.iter().find(|n| !saved.contains(n)) {
            return Some(Self::Missing(name.clone()));
        }
        let saved_at = saved.iter().zip(ours).position(|(a, b)| a != b)?;
        let name = saved[saved_at].clone();
        let ours_at = ours.iter().position(|n| *n == name).unwrap_or(saved_at);
        Some(Self::Misplaced {
            name,
            saved_at,
            ours_at,
        })
    }
}

/// The encoding of device state in logs, checkpoints and state hashes:
/// bincode 2.0.1's standard configuration (64 MiB decode limit; trailing
/// bytes are ignored, as they always were).
pub struct Bincode;

impl StateCodec for Bincode {
    fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
        bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
    }

    fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        let config = bincode::config::standard().with_limit::<{ 64 << 20 }>();
        bincode::serde::decode_from_slice(bytes, config)
            .map(|(v, _)| v)
            .map_err(|e| e.to_string())
    }
}

/// One named component of this VM's device state.
pub type DeviceComponent<'a> = Component<'a, Bincode>;

/// Serial input the UART's FIFO could not take yet (component
/// `serial-pending`).
#[derive(Default)]
struct PendingSerial(VecDeque<u8>);

impl Stateful for PendingSerial {
    type State = VecDeque<u8>;

    fn save_state(&self) -> VecDeque<u8> {
        self.0.clone()
    }

    fn restore_state(&mut self, state: VecDeque<u8>) -> Result<(), String> {
        self.0 = state;
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
    /// Serial input the UART's FIFO could not take yet (behind a lock only
    /// so that it is a component like the devices; see [`Self::components`]).
    pending_serial: std::sync::Mutex<PendingSerial>,
    /// Console bytes written at the current stop.
    pub serial_out: SerialOutput,
    /// Where outputs go.
    pub outputs: Arc<dyn Outputs>,
    /// The current stop, for outputs that are held until the secondary has
    /// the log up to the stop that produced them.
    pub stop: Arc<std::sync::atomic::AtomicU64>,
    /// Mirrored storage: this host's replica of each disk (empty: shared
    /// storage, or none).
    pub replicas: Vec<Arc<Replica>>,
    /// Mirrored and following: each logged completion is performed on this
    /// side's replica at its stop.
    pub mirror_following: bool,
}

impl DeviceManager {
    /// A manager over the legacy devices, driving `clock`; `serial_out` is
    /// the sink the UART was built with.
    pub fn new(
        legacy: LegacyDevices,
        clock: GuestClock,
        serial_out: SerialOutput,
        outputs: Arc<dyn Outputs>,
    ) -> Self {
        Self {
            serial_out,
            outputs,
            stop: Arc::default(),
            legacy,
            blocks: Vec::new(),
            nets: Vec::new(),
            clock,
            pending_serial: std::sync::Mutex::default(),
            replicas: Vec::new(),
            mirror_following: false,
        }
    }

    /// Mirrored storage, following: performs the request a logged
    /// completion finishes on this side's replica. Returns the data to hand
    /// the guest (this side's own read data).
    fn perform_mirrored(
        &mut self,
        device: u8,
        request: u64,
        status: u8,
        logged: Option<(u32, u64)>,
    ) -> Result<Vec<u8>, MirrorError> {
        let (Some(replica), Some(block)) = (
            self.replicas.get(usize::from(device)),
            self.blocks.get(usize::from(device)),
        ) else {
            return Ok(Vec::new());
        };
        let op = lock(block)
            .block_mut()
            .and_then(|b| b.in_flight_op(request).cloned());
        // The primary's request failed: the guest sees that status and no
        // data; a write that failed there may have half-landed, so its
        // chunks count as differing.
        if status != tandem_devices::virtio::block::VIRTIO_BLK_S_OK {
            if let Some(tandem_replay::BlockOp::Write { sector, data }) = &op {
                let _ = replica.mark_suspect(*sector, data.len() as u64);
            }
            return Ok(Vec::new());
        }
        let Some(op) = op else { return Ok(Vec::new()) };
        let (_, data) = replica.perform(&op)?;
        if let (Some((len, theirs)), tandem_replay::BlockOp::Read { sector, .. }) = (logged, &op) {
            let ours = data_hash(&data);
            if ours != theirs || data.len() != len as usize {
                let _ = replica.mark_suspect(*sector, u64::from(len));
                return Err(MirrorError::Drift {
                    device,
                    request,
                    sector: *sector,
                    len,
                    ours,
                    theirs,
                });
            }
        }
        Ok(data)
    }

    /// Applies one cause at the current stop.
    pub fn apply(&mut self, cause: Cause) -> Result<(), MirrorError> {
        match cause {
            Cause::Time(ns) => {
                self.clock.advance_to(ns);
                lock(&self.legacy.pit).poll();
            }
            Cause::SerialInput(bytes) => self.pending_serial_mut().extend(bytes),
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
            } => {
                let data = if self.mirror_following && !self.replicas.is_empty() {
                    self.perform_mirrored(device, request, status, None)?
                } else {
                    data
                };
                self.complete_block(device, request, status, &data);
            }
            Cause::BlockReadHashed {
                device,
                request,
                status,
                len,
                hash,
            } => {
                if self.mirror_following && !self.replicas.is_empty() {
                    let data = self.perform_mirrored(device, request, status, Some((len, hash)))?;
                    self.complete_block(device, request, status, &data);
                } else {
                    // Only a mirrored secondary can replay this: the data
                    // is on its replica, not in the log.
                    tracing::warn!(
                        "disk {device}: a mirrored-storage read completion cannot be replayed without the replica; the guest sees an I/O error"
                    );
                    let ioerr = tandem_devices::virtio::block::VIRTIO_BLK_S_IOERR;
                    self.complete_block(device, request, ioerr, &[]);
                }
            }
        }
        Ok(())
    }

    fn complete_block(&self, device: u8, request: u64, status: u8, data: &[u8]) {
        match self.blocks.get(usize::from(device)) {
            Some(block) => {
                lock(block).apply_block_done(request, status, data);
            }
            None => tracing::warn!("completion for absent disk {device} dropped"),
        }
    }

    /// Work that follows the stop's causes: feed the UART what fits.
    pub fn after_causes(&mut self) {
        let serial = self.legacy.serial.clone();
        let pending = self.pending_serial_mut();
        if !pending.is_empty() {
            let taken = lock(&serial).enqueue_input(pending.make_contiguous());
            pending.drain(..taken);
        }
    }

    fn pending_serial_mut(&mut self) -> &mut VecDeque<u8> {
        let pending = self.pending_serial.get_mut();
        &mut pending.unwrap_or_else(std::sync::PoisonError::into_inner).0
    }

    /// Publishes the current stop.
    pub fn set_stop(&self, stop: u64) {
        self.stop.store(stop, std::sync::atomic::Ordering::Release);
    }

    /// Issues again every disk request still in flight (after going live:
    /// the old primary may never have performed them). Returns how many.
    pub fn reissue_unfinished(&self) -> usize {
        let mut count = 0;
        for (index, block) in self.blocks.iter().enumerate() {
            let state = lock(block).state();
            if let tandem_devices::virtio::DeviceState::Block(b) = state.device {
                for request in b.in_flight {
                    self.outputs.emit(tandem_replay::Output::BlockSubmit {
                        device: index as u8,
                        request: request.id,
                        op: request.op,
                    });
                    count += 1;
                }
            }
        }
        count
    }

    /// The id each disk's next request gets.
    pub fn block_next_ids(&self) -> Vec<u64> {
        self.blocks
            .iter()
            .map(|b| lock(b).block_mut().map_or(0, |b| b.next_request()))
            .collect()
    }

    /// After a rollback to a checkpoint taken `absent_ns` of guest time ago:
    /// request ids handed out since stay retired (`next_ids`, from
    /// [`Self::block_next_ids`] before the rollback), the watchdog does not
    /// count the time the guest did not live through, and the timer's next
    /// interrupt comes no earlier than `timer_at_ns` (the perturbation).
    pub fn resume_after_rollback(&self, next_ids: &[u64], absent_ns: u64, timer_at_ns: u64) {
        for (block, next) in self.blocks.iter().zip(next_ids) {
            if let Some(b) = lock(block).block_mut() {
                b.reserve_ids_below(*next);
            }
        }
        lock(&self.legacy.watchdog).postpone(absent_ns);
        // A tick latched at the checkpoint comes again at the delayed time.
        lock(&self.legacy.pic).withdraw_edge(0);
        lock(&self.legacy.pit).delay_next_irq(timer_at_ns);
    }

    /// Takes the console bytes written at this stop.
    pub fn take_serial_out(&self) -> Vec<u8> {
        std::mem::take(&mut *lock(&self.serial_out.0))
    }

    /// Whether the PIC asserts INTR.
    pub fn interrupt_pending(&self) -> bool {
        lock(&self.legacy.pic).has_pending()
    }

    /// The INTA cycle: the vector to inject, if any.
    pub fn acknowledge_interrupt(&self) -> Option<u8> {
        lock(&self.legacy.pic).acknowledge()
    }

    /// Every component of the device state, in the order logs and state
    /// hashes use. This is the one list: [`capture`](Self::capture) (and so
    /// the state hashes, which hash what it returns) and
    /// [`install`](Self::install) both walk it, so they cannot disagree.
    pub fn components(&self) -> impl Iterator<Item = DeviceComponent<'_>> {
        let l = &self.legacy;
        let fixed: [DeviceComponent<'_>; 8] = [
            Component::new("pic", &*l.pic),
            Component::new("pit", &*l.pit),
            Component::new("rtc", &*l.rtc),
            Component::new("serial", &*l.serial),
            Component::new("i8042", &*l.i8042),
            Component::new("debug-exit", &*l.debug_exit),
            Component::new("scratch", &*l.scratch),
            Component::new("serial-pending", &self.pending_serial),
        ];
        // The watchdog is a device from device-model version 3 on.
        let watchdog = (l.device_model >= 3).then(|| Component::new("watchdog", &*l.watchdog));
        let blocks = (self.blocks.iter().enumerate())
            .map(|(i, b)| Component::new(format!("virtio-blk{i}"), &**b));
        let nets = (self.nets.iter().enumerate())
            .map(|(i, n)| Component::new(format!("virtio-net{i}"), &**n));
        fixed.into_iter().chain(watchdog).chain(blocks).chain(nets)
    }

    /// The names of [`components`](Self::components), in order.
    pub fn component_names(&self) -> Vec<String> {
        self.components().map(|c| c.name().to_string()).collect()
    }

    /// Every device model's state, in a fixed order, as (component, bytes).
    pub fn capture(&self) -> Vec<(String, Vec<u8>)> {
        self.components()
            .map(|c| {
                // Plain state structs always encode; an empty blob would
                // fail loudly on install rather than silently.
                let bytes = c.save().unwrap_or_else(|e| {
                    tracing::error!("device {}: {e}", c.name());
                    Vec::new()
                });
                (c.name().to_string(), bytes)
            })
            .collect()
    }

    /// Installs states captured by [`capture`](Self::capture) on a VM of the
    /// same shape. The component names must match this VM's exactly, in
    /// order, or nothing is installed; a component whose bytes do not decode
    /// or are refused stops the install there, naming it.
    pub fn install(&mut self, saved: &[(String, Vec<u8>)]) -> Result<(), DeviceStateError> {
        let ours = self.component_names();
        let names: Vec<String> = saved.iter().map(|(n, _)| n.clone()).collect();
        if let Some(mismatch) = ComponentMismatch::find(&names, &ours) {
            return Err(DeviceStateError::Components {
                mismatch,
                saved: names,
                ours,
            });
        }
        for (component, (name, bytes)) in self.components().zip(saved) {
            component
                .restore(bytes)
                .map_err(|reason| DeviceStateError::Component {
                    name: name.clone(),
                    reason,
                })?;
        }
        Ok(())
    }

    /// Guest time of the next device deadline.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let pit = lock(&self.legacy.pit).next_deadline_ns();
        let watchdog = lock(&self.legacy.watchdog).deadline_ns();
        match (pit, watchdog) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the guest watchdog expired (once per expiry).
    pub fn watchdog_expired(&self) -> bool {
        lock(&self.legacy.watchdog).take_expired()
    }
}

#[cfg(test)]
#[path = "device_manager_tests.rs"]
mod tests;
