//! The steps of [`Vm::new`](super::Vm::new), one concern each (after
//! Firecracker's `builder.rs`): what the run mode asks for ([`ModePlan`],
//! the one `match` on [`RunMode`]), what the guest sees ([`shape_guest`]),
//! KVM and memory, the vCPU and its CPUID/MSRs, the identity, the outputs,
//! the devices, and a follower's go-live.
//!
//! Size: over 800 lines because every build step of `Vm::new` is here, each a
//! short function.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use tracing::info;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use tandem_devices::pic::{PicBus, PicPort};
use tandem_devices::virtio::block::Block;
use tandem_devices::virtio::mmio::MmioTransport;
use tandem_devices::virtio::net::Net;
use tandem_devices::virtio::VirtioDevice;
use tandem_devices::GuestMemoryMmap;
use tandem_devices::{BusDevice, IrqLine};
use tandem_replay::log::{image_hash, CpuidEntry as LogCpuidEntry, DeviceDesc, Page, VmIdentity};
use tandem_replay::{CauseQueue, GuestClock, LiveInputs, Outputs};

use super::{
    kvm_err, open_kvm, DiskConfig, NetConfig, RunMode, VmError, DEVICE_MODEL_VERSION,
    OLDEST_DEVICE_MODEL_VERSION,
};
use crate::backend::announce::AnnounceSchedule;
use crate::backend::block::{BlockWorker, DiskImage};
use crate::backend::console::Console;
use crate::backend::gate::{FollowerOutputs, GatedOutputs};
use crate::backend::outputs::ReplayOutputs;
use crate::backend::replica::{sidecar_path, Replica};
use crate::backend::tap::{Tap, TapReader};
use crate::backend::LiveOutputs;
use crate::boot::initial_state;
use crate::bus::Bus;
use crate::cpuid::{CpuidEntry, CpuidTable};
use crate::device_manager::{DeviceManager, SerialOutput};
use crate::dirty::DirtyTracker;
use crate::exit::ExitContext;
use crate::journal::{self, Journal, JournalError, RecordOptions, RecordSink, Recorder, Replayer};
use crate::kick::{setup_kick_signal, Kicker};
use crate::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE, VIRTIO_IRQS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::legacy::LegacyDevices;
use crate::loader::{BootEntry, LoaderError};
use crate::position::choice::PositionChoice;
use crate::state::{saved_msrs, SavedMsrs};
use crate::vcpu::{CrashPolicy, GoLiveHooks, KickPolicy, SyncContext};

/// Starts the journal once the VM's identity is known (a recording's log
/// header is that identity).
type JournalStart = Box<dyn FnOnce(&VmIdentity, LiveInputs) -> Result<Journal, JournalError>>;

/// Whom the VM's outputs answer to.
pub(super) enum Role {
    /// Live or recording: the world.
    Solo,
    /// The primary of a pair: held until the secondary acknowledges.
    Primary,
    /// The secondary of a pair: buffered until it goes live.
    Follower,
    /// A replay of a log.
    Replay,
}

/// What one [`RunMode`] asks of the build.
pub(super) struct ModePlan {
    /// Replay and follow: the identity the guest is rebuilt from (the log
    /// header, or the one the primary sent), which the VM must match.
    pub recorded: Option<VmIdentity>,
    /// Whom the outputs answer to.
    pub role: Role,
    /// Kicks, sync points, epochs.
    pub policy: KickPolicy,
    /// Joining a running primary: the memory it pre-copied.
    pub base_pages: Vec<Page>,
    /// The journal: live, recording, or replaying.
    pub start_journal: JournalStart,
    /// A recording's position counter choice (None: not a recording; a
    /// replay or a follower uses the counter its log header names).
    pub position: Option<PositionChoice>,
}

/// The kick policy of a run that takes no sync points of its own.
const NO_SYNC_POINTS: KickPolicy = KickPolicy {
    sync_interval: None,
    min_kick_interval: Duration::ZERO,
    epoch_interval: Duration::ZERO,
    irq_defer: Duration::ZERO,
};

/// The kick policy of a recording.
fn recording_policy(options: &RecordOptions) -> KickPolicy {
    KickPolicy {
        sync_interval: Some(options.sync_interval),
        min_kick_interval: options.min_kick_interval,
        epoch_interval: options.epoch_interval,
        irq_defer: options.irq_defer,
    }
}

impl ModePlan {
    /// The one place the run modes are told apart. A replay reads its whole
    /// log here (before anything else is built).
    pub(super) fn new(mode: RunMode) -> Result<Self, VmError> {
        let plan = match mode {
            RunMode::Live => Self {
                recorded: None,
                role: Role::Solo,
                policy: NO_SYNC_POINTS,
                base_pages: Vec::new(),
                start_journal: Box::new(|_, live| Ok(Journal::Live(live))),
                position: None,
            },
            RunMode::Record(options) => Self {
                recorded: None,
                role: Role::Solo,
                policy: recording_policy(&options),
                base_pages: Vec::new(),
                position: Some(options.position),
                start_journal: Box::new(move |identity, live| {
                    let recorder = Recorder::start(options, identity, live)?;
                    Ok(Journal::Record(Box::new(recorder)))
                }),
            },
            RunMode::Primary { options, sink } => Self {
                recorded: None,
                role: Role::Primary,
                policy: recording_policy(&options),
                base_pages: Vec::new(),
                position: Some(options.position),
                start_journal: Box::new(move |_, live| {
                    let recorder = Recorder::start_with_sink(options, sink, live)?;
                    Ok(Journal::Record(Box::new(recorder)))
                }),
            },
            RunMode::Follow {
                identity,
                feed,
                base_pages,
            } => Self {
                recorded: Some(identity),
                role: Role::Follower,
                policy: NO_SYNC_POINTS,
                base_pages,
                position: None,
                start_journal: Box::new(move |_, _live| {
                    Ok(Journal::Replay(Box::new(Replayer::live(feed))))
                }),
            },
            RunMode::Replay { log } => {
                let (identity, summary) = journal::summarize(&log).map_err(VmError::Journal)?;
                Self {
                    recorded: Some(identity),
                    role: Role::Replay,
                    policy: NO_SYNC_POINTS,
                    base_pages: Vec::new(),
                    position: None,
                    start_journal: Box::new(move |_, _live| {
                        let replayer = Replayer::open(&log, &summary)?;
                        Ok(Journal::Replay(Box::new(replayer)))
                    }),
                }
            }
        };
        Ok(plan)
    }
}

/// What the guest will see before anything runs.
pub(super) struct GuestShape {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// The kernel command line (with the virtio tokens).
    pub cmdline: String,
    /// The virtio devices, in device order.
    pub specs: Vec<VirtioSpec>,
}

/// What the guest will see: from the config and the host when live, from
/// the log header when replaying; with the live world's disks and taps
/// opened where the VM has them.
pub(super) fn shape_guest(
    plan: &ModePlan,
    mem_size: u64,
    cmdline: &str,
    disks: &[DiskConfig],
    nets: &[NetConfig],
) -> Result<(GuestShape, Option<LiveWorld>), VmError> {
    let (shape, world) = match &plan.recorded {
        Some(identity) => {
            let specs = identity
                .devices
                .iter()
                .map(VirtioSpec::from_desc)
                .collect::<Result<Vec<_>, _>>()?;
            // A follower has the real disks and taps, for when it goes live.
            let world = if matches!(plan.role, Role::Follower) {
                let (ours, world) = open_live_world(disks, nets)?;
                if ours != specs {
                    return Err(VmError::IdentityMismatch(format!(
                        "the primary's devices are {:?}, this host's {:?}",
                        identity.devices,
                        ours.iter().map(VirtioSpec::desc).collect::<Vec<_>>()
                    )));
                }
                Some(world)
            } else {
                None
            };
            let cmdline = identity.cmdline.clone();
            let shape = GuestShape {
                mem_size: identity.mem_size,
                cmdline,
                specs,
            };
            (shape, world)
        }
        None => {
            let (specs, world) = open_live_world(disks, nets)?;
            let cmdline = with_virtio_tokens(cmdline, specs.len());
            let shape = GuestShape {
                mem_size,
                cmdline,
                specs,
            };
            (shape, Some(world))
        }
    };
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&shape.mem_size) {
        return Err(VmError::MemSize {
            size: shape.mem_size,
            min: MIN_MEM_SIZE >> 20,
            max: MAX_MEM_SIZE >> 20,
        });
    }
    if shape.specs.len() > VIRTIO_IRQS.len() {
        return Err(VmError::TooManyDevices(shape.specs.len()));
    }
    Ok((shape, world))
}

/// Opens KVM (with the kick signal's handler set up) and creates the VM.
pub(super) fn create_vm(kvm_path: &Path) -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = open_kvm(kvm_path)?;
    setup_kick_signal().map_err(kvm_err("kick signal handler"))?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    Ok((kvm, vm))
}

/// Allocates guest memory and maps it into `vm`, dirty-logged.
pub(crate) fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let memory_err = |reason: String| VmError::Memory { size, reason };
    let len = usize::try_from(size).map_err(|e| memory_err(e.to_string()))?;
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|e| memory_err(e.to_string()))?;
    for (slot, region) in memory.iter().enumerate() {
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            // The DirtyTracker harvests this log (sync points, epochs).
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        };
        // SAFETY: the region is a live mmap owned by `memory`, which the
        // returned value keeps alive for as long as the VM (Vm drops the VM fd
        // before its memory), and slots do not overlap.
        unsafe { vm.set_user_memory_region(mapping) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(memory)
}

/// The vCPU, set up to boot, and what the identity records of it.
pub(super) struct Cpu {
    /// The vCPU.
    pub fd: VcpuFd,
    /// The CPUID table the guest sees.
    pub cpuid: CpuidTable,
    /// The guest's TSC frequency.
    pub tsc_khz: u32,
    /// MSRs saved with the vCPU.
    pub msrs: SavedMsrs,
}

/// Creates vCPU 0 with its CPUID table (the host's, or exactly the recorded
/// one) and its boot state, and lists the MSRs saved with it.
pub(super) fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    entry: BootEntry,
    recorded: Option<&VmIdentity>,
) -> Result<Cpu, VmError> {
    let cpuid = match recorded {
        // The secondary uses exactly the recorded table, or KVM refuses it.
        Some(identity) => CpuidTable {
            entries: identity.cpuid.iter().map(cpuid_from_log).collect(),
        },
        None => CpuidTable::for_host(kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?,
    };
    let fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    configure_vcpu(&fd, &cpuid, memory, entry)?;
    let tsc_khz = fd.get_tsc_khz().unwrap_or(1_000_000);
    // A probe KVM refuses leaves the MSRs unmasked: never fails the VM.
    let indices = saved_msrs(kvm);
    let msrs = SavedMsrs::probe(&fd, indices.clone()).unwrap_or_else(|e| {
        tracing::warn!("probing the vCPU's SYSENTER MSRs: {e}; capturing them as read");
        SavedMsrs::new(indices)
    });
    Ok(Cpu {
        fd,
        cpuid,
        tsc_khz,
        msrs,
    })
}

fn configure_vcpu(
    fd: &VcpuFd,
    cpuid: &CpuidTable,
    memory: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), VmError> {
    let kvm_cpuid = cpuid
        .to_kvm()
        .map_err(|e| VmError::Cpuid(format!("{e:?}")))?;
    fd.set_cpuid2(&kvm_cpuid)
        .map_err(kvm_err("KVM_SET_CPUID2"))?;
    let base = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let (regs, sregs, fpu) = initial_state(memory, entry, base)?;
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    Ok(())
}

/// What makes this VM the same guest as another (the log header): RTC time
/// and device-model version from the recorded identity or the config. A
/// replay's or follower's VM must be the recorded one.
pub(super) fn identify(
    recorded: Option<&VmIdentity>,
    shape: &GuestShape,
    cpu: &Cpu,
    kernel: &Path,
    rtc_base: Option<u64>,
    device_model: Option<u32>,
    position: String,
) -> Result<VmIdentity, VmError> {
    let rtc_base = match recorded {
        Some(identity) => identity.rtc_base_unix_secs,
        None => rtc_base.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }),
    };
    let image = std::fs::read(kernel).map_err(|source| {
        VmError::Loader(LoaderError::Read {
            path: kernel.to_path_buf(),
            source,
        })
    })?;
    let device_model = match recorded {
        Some(recorded) => recorded.device_model_version,
        None => device_model.unwrap_or(DEVICE_MODEL_VERSION),
    };
    if !(OLDEST_DEVICE_MODEL_VERSION..=DEVICE_MODEL_VERSION).contains(&device_model) {
        return Err(VmError::IdentityMismatch(format!(
            "device-model version {device_model} is not one this build runs ({OLDEST_DEVICE_MODEL_VERSION} to {DEVICE_MODEL_VERSION})"
        )));
    }
    let identity = VmIdentity {
        image_hash: image_hash(&image),
        image_name: kernel.display().to_string(),
        cmdline: shape.cmdline.clone(),
        mem_size: shape.mem_size,
        devices: shape.specs.iter().map(VirtioSpec::desc).collect(),
        cpuid: cpu.cpuid.entries.iter().map(cpuid_to_log).collect(),
        msrs: cpu.msrs.indices.clone(),
        device_model_version: device_model,
        tsc_khz: cpu.tsc_khz,
        rtc_base_unix_secs: rtc_base,
        position,
    };
    if let Some(recorded) = recorded {
        if let Some(what) = recorded.mismatch(&identity) {
            return Err(VmError::IdentityMismatch(what));
        }
    }
    Ok(identity)
}

/// What the parts of a VM share: guest time, the kicker, the queue through
/// which the live world reaches the guest (it kicks the vCPU), and the
/// current stop.
pub(super) struct Handles {
    /// Guest time (clones share it).
    pub clock: GuestClock,
    /// Gets the vCPU out of the guest.
    pub kicker: Kicker,
    /// The live world's causes; a new one kicks the vCPU.
    pub causes: CauseQueue,
    /// The current stop (outputs are held by the stop that produced them).
    pub stop: Arc<AtomicU64>,
}

impl Handles {
    /// New handles, the queue wired to the kicker.
    pub(super) fn new() -> Self {
        let clock = GuestClock::new();
        let kicker = Kicker::default();
        let notify = kicker.clone();
        let causes = CauseQueue::new(Arc::new(move || notify.kick()));
        Self {
            clock,
            kicker,
            causes,
            stop: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Where the guest's outputs go, and the live world behind them.
pub(super) struct OutputSide {
    /// What the devices emit to.
    pub outputs: Arc<dyn Outputs>,
    /// The output gate (a primary's; open when live or following).
    pub gate: Option<Arc<GatedOutputs>>,
    /// The secondary's output buffer.
    pub follower: Option<Arc<FollowerOutputs>>,
    /// The taps' reader threads.
    pub tap_readers: Vec<TapReader>,
    /// The taps.
    pub taps: Vec<Arc<Tap>>,
    /// Mirrored storage: the replicas, by disk index.
    pub replicas: Vec<Arc<Replica>>,
}

/// Starts the console and, where the VM has one, the live world (disk
/// workers, tap readers), and puts the outputs behind what `role` needs.
pub(super) fn start_outputs(
    serial_out: Box<dyn std::io::Write + Send>,
    world: Option<LiveWorld>,
    mirror: Option<&Path>,
    handles: &Handles,
    role: &Role,
    on_guest_crash: CrashPolicy,
) -> Result<OutputSide, VmError> {
    let console =
        Console::start(serial_out).map_err(|e| VmError::Thread(format!("console thread: {e}")))?;
    let side = match world {
        Some(world) => start_world(world, console, mirror, &handles.causes)?,
        None => OutputSide {
            outputs: Arc::new(ReplayOutputs::new(console)),
            gate: None,
            follower: None,
            tap_readers: Vec::new(),
            taps: Vec::new(),
            replicas: Vec::new(),
        },
    };
    Ok(gate_outputs(side, role, handles, on_guest_crash))
}

/// Starts a worker per disk (mirrored to its replica when `mirror` names
/// the sidecars' directory) and a reader per tap.
fn start_world(
    world: LiveWorld,
    console: Console,
    mirror: Option<&Path>,
    causes: &CauseQueue,
) -> Result<OutputSide, VmError> {
    let mut workers = Vec::new();
    let mut replicas = Vec::new();
    for (index, image) in world.images.into_iter().enumerate() {
        let worker = match mirror {
            Some(dir) => {
                let replica = Arc::new(Replica::open(
                    &image.path,
                    image.read_only,
                    &sidecar_path(dir, index),
                )?);
                replicas.push(replica.clone());
                BlockWorker::start_mirrored(index as u8, replica, causes.clone())
            }
            None => BlockWorker::start(index as u8, image, causes.clone()),
        }
        .map_err(|e| VmError::Thread(format!("block worker: {e}")))?;
        workers.push(worker);
    }
    let mut tap_readers = Vec::new();
    for (index, tap) in world.taps.iter().enumerate() {
        let reader = tap
            .spawn_reader(index as u8, causes.clone())
            .map_err(|e| VmError::Thread(format!("tap reader: {e}")))?;
        tap_readers.push(reader);
    }
    let taps = world.taps.clone();
    Ok(OutputSide {
        outputs: Arc::new(LiveOutputs::new(console, world.taps, workers)),
        gate: None,
        follower: None,
        tap_readers,
        taps,
        replicas,
    })
}

/// Puts the outputs behind a gate where `role` (or restart-checkpoint)
/// needs one.
fn gate_outputs(
    mut side: OutputSide,
    role: &Role,
    handles: &Handles,
    on_guest_crash: CrashPolicy,
) -> OutputSide {
    let restart = matches!(on_guest_crash, CrashPolicy::RestartCheckpoint { .. });
    let (outputs, stop) = (side.outputs, &handles.stop);
    side.outputs = match role {
        Role::Primary => {
            let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
            g.set_mirrored(!side.replicas.is_empty());
            side.gate = Some(g.clone());
            g
        }
        Role::Follower => {
            // A replaying secondary reads and discards its tap. Once
            // live it is a primary: its output goes through a gate,
            // open until a new secondary joins.
            handles.causes.set_accepting(false);
            let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
            g.set_mirrored(!side.replicas.is_empty());
            g.open();
            side.gate = Some(g.clone());
            let f = Arc::new(FollowerOutputs::new(g, stop.clone()));
            side.follower = Some(f.clone());
            f
        }
        // Live or recording with restart-checkpoint: output waits for
        // checkpoints, so it needs a gate too (open: no secondary).
        Role::Solo if restart => {
            let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
            g.open();
            side.gate = Some(g.clone());
            g
        }
        // A replay releases output at the recording's checkpoints.
        Role::Replay => {
            let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
            g.open();
            g.set_checkpointing_on_first();
            g
        }
        Role::Solo => outputs,
    };
    if let (Some(g), true) = (&side.gate, restart) {
        g.set_checkpointing();
    }
    side
}

/// The device manager and the vCPU's exit context: the legacy devices on
/// the port bus, the virtio devices on the MMIO bus.
pub(super) fn build_devices(
    handles: &Handles,
    identity: &VmIdentity,
    plan: &ModePlan,
    specs: &[VirtioSpec],
    memory: &GuestMemoryMmap,
    side: &OutputSide,
) -> Result<(DeviceManager, ExitContext), VmError> {
    let serial_out = SerialOutput::default();
    let (legacy, pio) = attach_legacy(handles, identity, plan, serial_out.clone())?;
    let clock = handles.clock.clone();
    let mut devices = DeviceManager::new(legacy, clock.clone(), serial_out, side.outputs.clone());
    devices.stop = handles.stop.clone();
    devices.replicas = side.replicas.clone();
    devices.mirror_following = matches!(plan.role, Role::Follower);
    let mmio = attach_virtio(&mut devices, specs, memory, &side.outputs)?;
    let ctx = ExitContext::new(pio, mmio, clock, identity.tsc_khz);
    Ok((devices, ctx))
}

/// The legacy devices, at the identity's RTC time and device-model
/// version, registered on a new port bus.
fn attach_legacy(
    handles: &Handles,
    identity: &VmIdentity,
    plan: &ModePlan,
    serial_out: SerialOutput,
) -> Result<(LegacyDevices, Bus), VmError> {
    let device_model = identity.device_model_version;
    let legacy = LegacyDevices::new(
        &handles.clock,
        identity.rtc_base_unix_secs,
        Box::new(serial_out),
        device_model,
    );
    if plan.recorded.is_some() && device_model != DEVICE_MODEL_VERSION {
        info!("running device-model version {device_model}, as the log's VM does");
    }
    let mut pio = Bus::new();
    legacy.register(&mut pio)?;
    Ok((legacy, pio))
}

/// The virtio devices, in order, on a new MMIO bus (one window and IRQ
/// each), their transports listed in `devices`.
fn attach_virtio(
    devices: &mut DeviceManager,
    specs: &[VirtioSpec],
    memory: &GuestMemoryMmap,
    outputs: &Arc<dyn Outputs>,
) -> Result<Bus, VmError> {
    let mut mmio = Bus::new();
    let (mut disks, mut nets) = (0u8, 0u8);
    for (slot, spec) in specs.iter().enumerate() {
        let model: Box<dyn VirtioDevice> = match spec.clone() {
            VirtioSpec::Block {
                capacity,
                read_only,
                id,
            } => Box::new(Block::new(disks, capacity, read_only, id, outputs.clone())),
            VirtioSpec::Net { mac } => Box::new(Net::new(nets, mac, outputs.clone())),
        };
        let transport = add_virtio(&mut mmio, devices, memory, slot, model)?;
        match spec {
            VirtioSpec::Block { .. } => {
                devices.blocks.push(transport);
                disks += 1;
            }
            VirtioSpec::Net { .. } => {
                devices.nets.push(transport);
                nets += 1;
            }
        }
    }
    Ok(mmio)
}

/// Puts a virtio device on the MMIO bus at window `slot`, with its IRQ made
/// level-triggered in the ELCR (as firmware does for PCI/virtio lines).
fn add_virtio(
    mmio: &mut Bus,
    devices: &DeviceManager,
    memory: &GuestMemoryMmap,
    slot: usize,
    model: Box<dyn VirtioDevice>,
) -> Result<Arc<Mutex<MmioTransport>>, VmError> {
    let irq = VIRTIO_IRQS[slot];
    let pic = devices.legacy.pic.clone();
    {
        let mut elcr = PicBus::new(pic.clone(), PicPort::Elcr);
        let mut bytes = [0u8; 2];
        elcr.read(0, &mut bytes[..1]);
        elcr.read(1, &mut bytes[1..]);
        let mask = u16::from_le_bytes(bytes) | (1 << irq);
        let [lo, hi] = mask.to_le_bytes();
        elcr.write(0, &[lo]);
        elcr.write(1, &[hi]);
    }
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        model,
        memory.clone(),
        IrqLine::new(pic, irq),
    )));
    let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
    mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
    Ok(transport)
}

/// The vCPU's dirty-page tracker, one consumer per user, with the VM,
/// memory and MSRs a sync point needs.
pub(super) fn sync_context(
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    mem_size: u64,
    msrs: SavedMsrs,
) -> SyncContext {
    let mut tracker = DirtyTracker::new(mem_size);
    let consumer = tracker.register();
    let epoch_consumer = tracker.register();
    let repair_consumer = tracker.register();
    let precopy_consumer = tracker.register();
    let checkpoint_consumer = tracker.register();
    SyncContext {
        vm,
        memory,
        tracker,
        consumer,
        epoch_consumer,
        repair_consumer,
        precopy_consumer,
        checkpoint_consumer,
        msrs,
    }
}

/// A follower's go-live: switch the outputs to the world, let the taps'
/// frames in, announce the MACs, run `on_live`; record from then on to
/// `record` if given.
pub(super) fn go_live_hooks(
    follower: Arc<FollowerOutputs>,
    causes: &CauseQueue,
    specs: &[VirtioSpec],
    taps: Vec<Arc<Tap>>,
    on_live: Option<Box<dyn FnOnce() + Send>>,
    record: Option<(RecordOptions, Box<dyn RecordSink>)>,
    announce: AnnounceSchedule,
) -> GoLiveHooks {
    let queue = causes.clone();
    let macs: Vec<[u8; 6]> = specs
        .iter()
        .filter_map(|s| match s {
            VirtioSpec::Net { mac } => Some(*mac),
            VirtioSpec::Block { .. } => None,
        })
        .collect();
    GoLiveHooks {
        record,
        causes: causes.clone(),
        switch: Box::new(move || {
            let emitted = follower.go_live();
            queue.set_accepting(true);
            info!("live: {emitted} buffered outputs emitted");
            crate::backend::announce::spawn(taps, macs, follower.addresses(), announce);
            if let Some(hook) = on_live {
                hook();
            }
        }),
    }
}

/// A virtio device as the VM sees it (the same live and in replay).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum VirtioSpec {
    Block {
        capacity: u64,
        read_only: bool,
        id: String,
    },
    Net {
        mac: [u8; 6],
    },
}

impl VirtioSpec {
    fn desc(&self) -> DeviceDesc {
        match self {
            VirtioSpec::Block {
                capacity,
                read_only,
                id,
            } => DeviceDesc {
                kind: "virtio-blk".into(),
                detail: format!("capacity={capacity},ro={},id={id}", u8::from(*read_only)),
            },
            VirtioSpec::Net { mac } => DeviceDesc {
                kind: "virtio-net".into(),
                detail: format!(
                    "mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
                ),
            },
        }
    }

    fn from_desc(d: &DeviceDesc) -> Result<Self, VmError> {
        let bad =
            || VmError::IdentityMismatch(format!("unreadable device {} {:?}", d.kind, d.detail));
        let field = |key: &str| {
            d.detail
                .split(',')
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        match d.kind.as_str() {
            "virtio-blk" => Ok(VirtioSpec::Block {
                capacity: field("capacity")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(bad)?,
                read_only: field("ro").ok_or_else(bad)? == "1",
                id: field("id").unwrap_or_default().to_string(),
            }),
            "virtio-net" => {
                let text = field("mac").ok_or_else(bad)?;
                let mut mac = [0u8; 6];
                let mut parts = text.split(':');
                for byte in &mut mac {
                    *byte = parts
                        .next()
                        .and_then(|p| u8::from_str_radix(p, 16).ok())
                        .ok_or_else(bad)?;
                }
                Ok(VirtioSpec::Net { mac })
            }
            _ => Err(bad()),
        }
    }
}

/// What the live world contributes to a VM being built.
pub(super) struct LiveWorld {
    images: Vec<DiskImage>,
    taps: Vec<Arc<Tap>>,
}

/// The guest MAC of net device `index` when none is given.
fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

/// Appends one `virtio_mmio.device=4K@BASE:IRQ` token per device (Linux's
/// syntax; tandem's test guests parse the same tokens).
fn with_virtio_tokens(cmdline: &str, count: usize) -> String {
    let mut out = cmdline.to_string();
    for (slot, irq) in VIRTIO_IRQS.iter().enumerate().take(count) {
        let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!(
            "virtio_mmio.device={}K@{base:#x}:{irq}",
            VIRTIO_MMIO_SIZE >> 10
        ));
    }
    out
}

fn open_live_world(
    disks: &[DiskConfig],
    nets: &[NetConfig],
) -> Result<(Vec<VirtioSpec>, LiveWorld), VmError> {
    let count = disks.len() + nets.len();
    if count > VIRTIO_IRQS.len() {
        return Err(VmError::TooManyDevices(count));
    }
    let images = disks
        .iter()
        .map(|d| DiskImage::open(&d.path, d.read_only))
        .collect::<Result<Vec<_>, _>>()?;
    let taps = nets
        .iter()
        .map(|n| Tap::open(&n.tap).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let mut specs: Vec<VirtioSpec> = images
        .iter()
        .map(|image| VirtioSpec::Block {
            capacity: image.capacity_sectors,
            read_only: image.read_only,
            id: image
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
        .collect();
    specs.extend(nets.iter().enumerate().map(|(i, n)| VirtioSpec::Net {
        mac: n.mac.unwrap_or(default_mac(i)),
    }));
    Ok((specs, LiveWorld { images, taps }))
}

fn cpuid_to_log(e: &CpuidEntry) -> LogCpuidEntry {
    LogCpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn cpuid_from_log(e: &LogCpuidEntry) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}
