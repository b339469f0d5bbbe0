//! Building and running one VM: KVM, memory, the vCPU, devices and boot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::{Arc, Mutex};

use tandem_devices::pic::{PicBus, PicPort};
use tandem_devices::virtio::block::Block;
use tandem_devices::virtio::mmio::MmioTransport;
use tandem_devices::virtio::net::Net;
use tandem_devices::virtio::VirtioDevice;
use tandem_devices::GuestMemoryMmap;
use tandem_devices::{BusDevice, IrqLine};

use tandem_replay::{CauseQueue, GuestClock, LiveInputs, Outputs};

use tracing::info;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::backend::block::{BlockWorker, DiskError, DiskImage};
use crate::backend::console::Console;
use crate::backend::gate::{FollowerOutputs, GatedOutputs};
use crate::backend::outputs::ReplayOutputs;
use crate::backend::replica::{sidecar_path, Replica, ReplicaError};
use crate::backend::tap::{Tap, TapError, TapReader};
use crate::backend::LiveOutputs;
use crate::boot::{initial_state, BootError};
use crate::bus::{Bus, BusError};
use crate::cpuid::{CpuidEntry, CpuidTable};
use crate::device_manager::{DeviceManager, SerialOutput};
use crate::dirty::DirtyTracker;
use crate::exit::ExitContext;
use crate::journal::RecordSink;
use crate::journal::{self, Journal, JournalError, RecordOptions, Recorder, Replayer};
use crate::kick::{setup_kick_signal, Kicker};
use crate::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE, VIRTIO_IRQS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::legacy::LegacyDevices;
use crate::loader::{load_kernel, LoaderError};
use crate::msr::{route_tsc_msrs, MsrRouting};
use crate::state::saved_msrs;
use crate::vcpu::GoLiveHooks;
use crate::vcpu::{DivergenceReport, KickPolicy, SyncContext};
use crate::vcpu::{RunOutcome, Vcpu, VcpuError, VcpuStats};
use std::time::Duration;
use tandem_replay::log::{image_hash, CpuidEntry as LogCpuidEntry, DeviceDesc, VmIdentity};

/// Stops a running VM from another thread.
#[derive(Clone)]
pub struct VmStopper {
    flag: Arc<std::sync::atomic::AtomicBool>,
    kicker: crate::kick::Kicker,
    causes: CauseQueue,
}

impl VmStopper {
    /// Asks the vCPU to stop at its next stop (also when halted).
    pub fn stop(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::Release);
        self.kicker.kick();
        self.causes.wake();
    }
}

/// How a run went.
#[derive(Debug)]
pub struct RunReport {
    /// How the guest ended.
    pub outcome: RunOutcome,
    /// Counters.
    pub stats: VcpuStats,
    /// Replay: epochs that diverged.
    pub divergences: Vec<DivergenceReport>,
    /// Replay: the first diverged epoch no sync point came to repair.
    pub unrepaired: Option<u64>,
}

/// Where KVM lives unless told otherwise.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";

/// What to run.
pub struct VmConfig {
    /// The KVM device (normally /dev/kvm).
    pub kvm_path: PathBuf,
    /// Kernel image: PVH ELF or bzImage.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Where COM1 output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// virtio-blk disks, in device order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in device order (after the disks).
    pub nets: Vec<NetConfig>,
    /// Replay: keep a shadow of the verified state and repair divergences.
    pub repair: bool,
    /// RTC time at creation (Unix seconds); None: the host's clock.
    pub rtc_base: Option<u64>,
    /// Device-model version of a VM started here (None: the newest,
    /// [`DEVICE_MODEL_VERSION`]); pinned to an older one while a pair's
    /// other host still runs an older tandem. Replays ignore it.
    pub device_model: Option<u32>,
    /// Live, recording, or replaying.
    pub mode: RunMode,
    /// A following secondary runs this when it goes live (after its
    /// outputs switched), e.g. to start serving the console.
    pub on_live: Option<Box<dyn FnOnce() + Send>>,
    /// A following secondary records from go-live on to this sink, so a
    /// new secondary can join it.
    pub go_live_record: Option<(RecordOptions, Box<dyn RecordSink>)>,
    /// When a secondary that goes live announces the VM's MACs.
    pub announce: crate::backend::announce::AnnounceSchedule,
    /// Mirrored storage: the directory of the replicas' sidecars (None:
    /// the disks are not mirrored).
    pub mirror: Option<PathBuf>,
    /// What a guest crash does (a replay does what its log did).
    pub on_guest_crash: crate::vcpu::CrashPolicy,
}

/// How the VM gets its inputs.
pub enum RunMode {
    /// From the world.
    Live,
    /// From the world, and logged.
    Record(RecordOptions),
    /// The primary of a pair: from the world, logged to `sink` (the
    /// replication channel), outputs held until the secondary acknowledges.
    Primary {
        /// Kicks, sync points, epochs.
        options: RecordOptions,
        /// Where the log goes.
        sink: Box<dyn RecordSink>,
    },
    /// The secondary of a pair: replays what the primary sends, and goes
    /// live when the channel closes. Memory, command line, CPUID and RTC
    /// come from the primary's identity; disks and taps from the config.
    Follow {
        /// The primary's identity (the log header it sent).
        identity: VmIdentity,
        /// The records as they arrive.
        feed: std::sync::mpsc::Receiver<tandem_replay::log::Record>,
        /// Joining a running primary: the memory it pre-copied (installed
        /// before its full sync point, which carries what changed since).
        base_pages: Vec<tandem_replay::log::Page>,
    },
    /// From a log. Memory, command line, devices, CPUID and RTC come from its
    /// header; `disks`, `nets`, `cmdline` and `mem_size` of the config are
    /// ignored.
    Replay {
        /// The log.
        log: PathBuf,
    },
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
}

/// A virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap it sends and receives on.
    pub tap: String,
    /// Guest MAC (default 52:54:00:12:34:56 + index).
    pub mac: Option<[u8; 6]>,
}

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing.
    #[error("{0} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization)")]
    NoKvm(PathBuf),
    /// /dev/kvm is not accessible.
    #[error("no permission to open {0}: run as root or add this user to the kvm group")]
    KvmPermission(PathBuf),
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        /// The device.
        path: PathBuf,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The memory size is out of range.
    #[error("guest memory of {size} bytes is out of range: tandem accepts {min} MiB to {max} MiB")]
    MemSize {
        /// Requested.
        size: u64,
        /// Minimum in MiB.
        min: u64,
        /// Maximum in MiB.
        max: u64,
    },
    /// Allocating guest memory failed.
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory {
        /// Requested.
        size: u64,
        /// Why.
        reason: String,
    },
    /// A KVM VM-level ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The kernel could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The initial state could not be written.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Device registration failed (a tandem bug).
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// The CPUID table could not be built.
    #[error("CPUID table: {0}")]
    Cpuid(String),
    /// The vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// More virtio devices than tandem has IRQs for.
    #[error("{0} virtio devices requested; tandem supports at most {max}", max = VIRTIO_IRQS.len())]
    TooManyDevices(usize),
    /// A disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A mirrored disk's replica or sidecar could not be opened.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The log's VM is not this VM.
    #[error("this VM is not the one the log recorded: {0}")]
    IdentityMismatch(String),
    /// The log could not be created or read.
    #[error(transparent)]
    Journal(JournalError),
    /// The vCPU thread could not be started or panicked.
    #[error("vCPU thread: {0}")]
    Thread(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens KVM, naming the problem when it is missing or forbidden.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::NoKvm(path.to_path_buf()))?;
    Kvm::new_with_path(c_path).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm(path.to_path_buf()),
        libc::EACCES | libc::EPERM => VmError::KvmPermission(path.to_path_buf()),
        _ => VmError::KvmOpen {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: the vCPU before the VM fd, the VM before memory.
    vcpu: Vcpu,
    _vm: Arc<VmFd>,
    _kvm: Kvm,
    _memory: GuestMemoryMmap,
    causes: CauseQueue,
    _tap_readers: Vec<TapReader>,
    cpuid: CpuidTable,
    msr_routing: MsrRouting,
    identity: VmIdentity,
    gate: Option<Arc<GatedOutputs>>,
    follower: Option<Arc<FollowerOutputs>>,
    replicas: Vec<Arc<Replica>>,
}

/// A virtio device as the VM sees it (the same live and in replay).
#[derive(Clone, Debug, PartialEq, Eq)]
enum VirtioSpec {
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

/// Bumped whenever a device model changes guest-visible behaviour: logs
/// and pair identities record it. A VM started here runs this version
/// (unless pinned); a replay or a following secondary runs the version its
/// log names, any from [`OLDEST_DEVICE_MODEL_VERSION`] on, for the VM's
/// whole life — so a newer tandem can follow (and take over from) an older
/// one during a rolling upgrade.
pub const DEVICE_MODEL_VERSION: u32 = 3;
/// The oldest device-model behaviour this build still implements.
pub const OLDEST_DEVICE_MODEL_VERSION: u32 = 1;

/// What the live world contributes to a VM being built.
struct LiveWorld {
    images: Vec<DiskImage>,
    taps: Vec<Arc<Tap>>,
}

impl Vm {
    /// Builds the VM: memory, kernel, devices, vCPU state, and its journal
    /// (live, recording, or replaying a log).
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        // What the guest will see: from the config and the host when live,
        // from the log header when replaying.
        let replay = match &config.mode {
            RunMode::Replay { log } => Some(journal::summarize(log).map_err(VmError::Journal)?),
            RunMode::Follow { identity, .. } => Some((identity.clone(), Default::default())),
            _ => None,
        };
        let following = matches!(config.mode, RunMode::Follow { .. });
        let (mem_size, cmdline, specs, world) = match &replay {
            Some((identity, _)) => {
                let specs = identity
                    .devices
                    .iter()
                    .map(VirtioSpec::from_desc)
                    .collect::<Result<Vec<_>, _>>()?;
                // A follower has the real disks and taps, for when it goes live.
                let world = if following {
                    let (ours, world) = open_live_world(&config)?;
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
                (identity.mem_size, identity.cmdline.clone(), specs, world)
            }
            None => {
                let (specs, world) = open_live_world(&config)?;
                let cmdline = with_virtio_tokens(&config.cmdline, specs.len());
                (config.mem_size, cmdline, specs, Some(world))
            }
        };
        if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size) {
            return Err(VmError::MemSize {
                size: mem_size,
                min: MIN_MEM_SIZE >> 20,
                max: MAX_MEM_SIZE >> 20,
            });
        }
        if specs.len() > VIRTIO_IRQS.len() {
            return Err(VmError::TooManyDevices(specs.len()));
        }

        let kvm = open_kvm(&config.kvm_path)?;
        setup_kick_signal().map_err(kvm_err("kick signal handler"))?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        let memory = create_memory(&vm, mem_size)?;
        let entry = load_kernel(&memory, &config.kernel, config.initrd.as_deref(), &cmdline)?;
        let msr_routing = route_tsc_msrs(&kvm, &vm);
        info!("{msr_routing}");

        let cpuid = match &replay {
            // The secondary uses exactly the recorded table, or KVM refuses it.
            Some((identity, _)) => CpuidTable {
                entries: identity.cpuid.iter().map(cpuid_from_log).collect(),
            },
            None => CpuidTable::for_host(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?,
        };
        let vcpu_fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        configure_vcpu(&vcpu_fd, &cpuid, &memory, entry)?;
        let tsc_khz = vcpu_fd.get_tsc_khz().unwrap_or(1_000_000);
        let msrs = saved_msrs(&kvm);
        let rtc_base = match &replay {
            Some((identity, _)) => identity.rtc_base_unix_secs,
            None => config.rtc_base.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
        };
        let image = std::fs::read(&config.kernel).map_err(|source| {
            VmError::Loader(LoaderError::Read {
                path: config.kernel.clone(),
                source,
            })
        })?;
        let device_model = match &replay {
            Some((recorded, _)) => recorded.device_model_version,
            None => config.device_model.unwrap_or(DEVICE_MODEL_VERSION),
        };
        if !(OLDEST_DEVICE_MODEL_VERSION..=DEVICE_MODEL_VERSION).contains(&device_model) {
            return Err(VmError::IdentityMismatch(format!(
                "device-model version {device_model} is not one this build runs ({OLDEST_DEVICE_MODEL_VERSION} to {DEVICE_MODEL_VERSION})"
            )));
        }
        let identity = VmIdentity {
            image_hash: image_hash(&image),
            image_name: config.kernel.display().to_string(),
            cmdline: cmdline.clone(),
            mem_size,
            devices: specs.iter().map(VirtioSpec::desc).collect(),
            cpuid: cpuid.entries.iter().map(cpuid_to_log).collect(),
            msrs: msrs.clone(),
            device_model_version: device_model,
            tsc_khz,
            rtc_base_unix_secs: rtc_base,
        };
        if let Some((recorded, _)) = &replay {
            if let Some(what) = recorded.mismatch(&identity) {
                return Err(VmError::IdentityMismatch(what));
            }
        }

        let clock = GuestClock::new();
        let kicker = Kicker::default();
        let notify = kicker.clone();
        let causes = CauseQueue::new(Arc::new(move || notify.kick()));
        let console = Console::start(config.serial_out)
            .map_err(|e| VmError::Thread(format!("console thread: {e}")))?;
        let mut tap_readers = Vec::new();
        let stop = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut world_taps = Vec::new();
        let mut replicas = Vec::new();
        let outputs: Arc<dyn Outputs> = match world {
            Some(world) => {
                let mut workers = Vec::new();
                for (index, image) in world.images.into_iter().enumerate() {
                    let worker = match &config.mirror {
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
                for (index, tap) in world.taps.iter().enumerate() {
                    let reader = tap
                        .spawn_reader(index as u8, causes.clone())
                        .map_err(|e| VmError::Thread(format!("tap reader: {e}")))?;
                    tap_readers.push(reader);
                }
                world_taps = world.taps.clone();
                Arc::new(LiveOutputs::new(console, world.taps, workers))
            }
            None => Arc::new(ReplayOutputs::new(console)),
        };
        let mut gate = None;
        let mut follower = None;
        let outputs: Arc<dyn Outputs> = match &config.mode {
            RunMode::Primary { .. } => {
                let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
                g.set_mirrored(!replicas.is_empty());
                gate = Some(g.clone());
                g
            }
            RunMode::Follow { .. } => {
                // A replaying secondary reads and discards its tap. Once
                // live it is a primary: its output goes through a gate,
                // open until a new secondary joins.
                causes.set_accepting(false);
                let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
                g.set_mirrored(!replicas.is_empty());
                g.open();
                gate = Some(g.clone());
                let f = Arc::new(FollowerOutputs::new(g, stop.clone()));
                follower = Some(f.clone());
                f
            }
            // Live or recording with restart-checkpoint: output waits for
            // checkpoints, so it needs a gate too (open: no secondary).
            _ if matches!(
                config.on_guest_crash,
                crate::vcpu::CrashPolicy::RestartCheckpoint { .. }
            ) && replay.is_none() =>
            {
                let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
                g.open();
                gate = Some(g.clone());
                g
            }
            // A replay releases output at the recording's checkpoints.
            RunMode::Replay { .. } => {
                let g = Arc::new(GatedOutputs::new(outputs, stop.clone()));
                g.open();
                g.set_checkpointing_on_first();
                g
            }
            _ => outputs,
        };
        if let (Some(g), crate::vcpu::CrashPolicy::RestartCheckpoint { .. }) =
            (&gate, config.on_guest_crash)
        {
            g.set_checkpointing();
        }

        let serial_out = SerialOutput::default();
        let legacy =
            LegacyDevices::new(&clock, rtc_base, Box::new(serial_out.clone()), device_model);
        if replay.is_some() && device_model != DEVICE_MODEL_VERSION {
            info!("running device-model version {device_model}, as the log's VM does");
        }
        let mut pio = Bus::new();
        legacy.register(&mut pio)?;
        let mut devices = DeviceManager::new(legacy, clock.clone(), serial_out, outputs.clone());
        devices.stop = stop;
        devices.replicas = replicas.clone();
        devices.mirror_following = following;
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
            let transport = add_virtio(&mut mmio, &devices, &memory, slot, model)?;
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
        let ctx = ExitContext::new(pio, mmio, clock, tsc_khz);

        let start = Instant::now();
        let live = LiveInputs::new(start, causes.clone());
        let mut base_pages = Vec::new();
        let (journal, policy) = match config.mode {
            RunMode::Live => (
                Journal::Live(live),
                KickPolicy {
                    sync_interval: None,
                    min_kick_interval: Duration::ZERO,
                    epoch_interval: Duration::ZERO,
                },
            ),
            RunMode::Record(options) => {
                let policy = KickPolicy {
                    sync_interval: Some(options.sync_interval),
                    min_kick_interval: options.min_kick_interval,
                    epoch_interval: options.epoch_interval,
                };
                let recorder =
                    Recorder::start(options, &identity, live).map_err(VmError::Journal)?;
                (Journal::Record(Box::new(recorder)), policy)
            }
            RunMode::Primary { options, sink } => {
                let policy = KickPolicy {
                    sync_interval: Some(options.sync_interval),
                    min_kick_interval: options.min_kick_interval,
                    epoch_interval: options.epoch_interval,
                };
                let recorder =
                    Recorder::start_with_sink(options, sink, live).map_err(VmError::Journal)?;
                (Journal::Record(Box::new(recorder)), policy)
            }
            RunMode::Follow {
                feed,
                base_pages: pages,
                ..
            } => {
                base_pages = pages;
                (
                    Journal::Replay(Box::new(Replayer::live(feed))),
                    KickPolicy {
                        sync_interval: None,
                        min_kick_interval: Duration::ZERO,
                        epoch_interval: Duration::ZERO,
                    },
                )
            }
            RunMode::Replay { log } => {
                let summary = replay.map(|(_, s)| s).unwrap_or_default();
                let replayer = Replayer::open(&log, &summary).map_err(VmError::Journal)?;
                (
                    Journal::Replay(Box::new(replayer)),
                    KickPolicy {
                        sync_interval: None,
                        min_kick_interval: Duration::ZERO,
                        epoch_interval: Duration::ZERO,
                    },
                )
            }
        };
        let mut tracker = DirtyTracker::new(mem_size);
        let consumer = tracker.register();
        let epoch_consumer = tracker.register();
        let repair_consumer = tracker.register();
        let precopy_consumer = tracker.register();
        let checkpoint_consumer = tracker.register();
        let sync = SyncContext {
            vm: vm.clone(),
            memory: memory.clone(),
            tracker,
            consumer,
            epoch_consumer,
            repair_consumer,
            precopy_consumer,
            checkpoint_consumer,
            msrs,
        };
        let replaying = matches!(journal, Journal::Replay(_));
        let mut vcpu = Vcpu::new(vcpu_fd, ctx, devices, journal, sync, policy, kicker, start);
        vcpu.set_base_pages(base_pages);
        vcpu.set_crash_policy(config.on_guest_crash);
        if replaying && (config.repair || following) {
            vcpu.enable_repair(mem_size)?;
        }
        if let Some(f) = follower.clone() {
            let queue = causes.clone();
            let macs: Vec<[u8; 6]> = specs
                .iter()
                .filter_map(|s| match s {
                    VirtioSpec::Net { mac } => Some(*mac),
                    VirtioSpec::Block { .. } => None,
                })
                .collect();
            let taps = world_taps.clone();
            let on_live = config.on_live;
            let announce = config.announce;
            vcpu.set_go_live(GoLiveHooks {
                record: config.go_live_record,
                causes: causes.clone(),
                switch: Box::new(move || {
                    let emitted = f.go_live();
                    queue.set_accepting(true);
                    info!("live: {emitted} buffered outputs emitted");
                    crate::backend::announce::spawn(taps, macs, f.addresses(), announce);
                    if let Some(hook) = on_live {
                        hook();
                    }
                }),
            });
        }
        Ok(Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _memory: memory,
            causes,
            _tap_readers: tap_readers,
            cpuid,
            msr_routing,
            identity,
            gate,
            follower,
            replicas,
        })
    }

    /// Mirrored storage: this host's replicas, by disk index (empty
    /// otherwise).
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.clone()
    }

    /// The primary's output gate (pair mode).
    pub fn gate(&self) -> Option<Arc<GatedOutputs>> {
        self.gate.clone()
    }

    /// Guest crashes rebooted so far.
    pub fn guest_crashes(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.vcpu.guest_crashes()
    }

    /// 1 + the last epoch a replay found diverged (0: none).
    pub fn divergence_epoch(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.vcpu.divergence_epoch()
    }

    /// Kicks the vCPU out of the guest: when recording, the stop it makes
    /// is a sync point (how a primary answers a repair request).
    pub fn kicker(&self) -> crate::kick::Kicker {
        self.vcpu.kicker()
    }

    /// Counters readable while the VM runs.
    pub fn live_counters(&self) -> Arc<crate::vcpu::LiveCounters> {
        self.vcpu.live_counters()
    }

    /// Stops the VM at its next stop, from any thread; `run` then returns
    /// `RunOutcome::Stopped`.
    pub fn stopper(&self) -> VmStopper {
        VmStopper {
            flag: self.vcpu.stop_request(),
            kicker: self.vcpu.kicker(),
            causes: self.causes.clone(),
        }
    }

    /// Pre-copy rounds for a joining secondary: where to ask for them, and
    /// a reader of guest memory to copy the pages with.
    pub fn precopy(
        &self,
    ) -> (
        Arc<crate::precopy::PrecopyPort>,
        crate::precopy::MemoryReader,
    ) {
        self.vcpu.precopy()
    }

    /// (request a full sync point, stop of the last full sync point).
    pub fn full_sync_handles(
        &self,
    ) -> (
        Arc<std::sync::atomic::AtomicBool>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        self.vcpu.full_sync_handles()
    }

    /// The stop of the last epoch a replay verified.
    pub fn verified_stop(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.vcpu.verified_stop()
    }

    /// The secondary's output buffer (pair mode).
    pub fn follower(&self) -> Option<Arc<FollowerOutputs>> {
        self.follower.clone()
    }

    /// What makes this VM the same guest as another (the log header).
    pub fn identity(&self) -> &VmIdentity {
        &self.identity
    }

    /// The queue through which the live world reaches the guest.
    pub fn cause_queue(&self) -> CauseQueue {
        self.causes.clone()
    }

    /// The CPUID table the guest sees.
    pub fn cpuid(&self) -> &CpuidTable {
        &self.cpuid
    }

    /// Whether the TSC MSRs exit to userspace on this host.
    pub fn msr_routing(&self) -> &MsrRouting {
        &self.msr_routing
    }

    /// Runs the guest on a named vCPU thread until it exits, resets or crashes.
    pub fn run(mut self) -> Result<RunReport, VmError> {
        std::thread::scope(|s| {
            let vcpu = &mut self.vcpu;
            let handle = std::thread::Builder::new()
                .name("tandem-vcpu0".into())
                .spawn_scoped(s, move || {
                    vcpu.run().map(|(outcome, stats)| RunReport {
                        outcome,
                        stats,
                        divergences: std::mem::take(&mut vcpu.divergence_reports),
                        unrepaired: vcpu.unrepaired(),
                    })
                })
                .map_err(|e| VmError::Thread(e.to_string()))?;
            handle
                .join()
                .map_err(|_| VmError::Thread("the vCPU thread panicked".into()))?
                .map_err(VmError::from)
        })
    }
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

fn open_live_world(config: &VmConfig) -> Result<(Vec<VirtioSpec>, LiveWorld), VmError> {
    let count = config.disks.len() + config.nets.len();
    if count > VIRTIO_IRQS.len() {
        return Err(VmError::TooManyDevices(count));
    }
    let images = config
        .disks
        .iter()
        .map(|d| DiskImage::open(&d.path, d.read_only))
        .collect::<Result<Vec<_>, _>>()?;
    let taps = config
        .nets
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
    specs.extend(
        config
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| VirtioSpec::Net {
                mac: n.mac.unwrap_or(default_mac(i)),
            }),
    );
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

fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
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

fn configure_vcpu(
    fd: &VcpuFd,
    cpuid: &CpuidTable,
    memory: &GuestMemoryMmap,
    entry: crate::loader::BootEntry,
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

/// What capturing dirty pages costs, per page (BENCHMARKS.md figure 9).
#[derive(Clone, Copy, Debug)]
pub struct CaptureCost {
    /// `KVM_GET_DIRTY_LOG` plus the VMM's bitmap, merged and turned into a
    /// page list, per page listed (ns).
    pub harvest_ns_per_page: f64,
    /// Copying each listed page out of guest memory (ns).
    pub copy_ns_per_page: f64,
}

/// Measures [`CaptureCost`] on a VM with `mem_size` bytes of memory after
/// `pages` pages spread over it were written (through guest memory, as a
/// device would; KVM's own dirty log is read all the same). No vCPU runs.
pub fn measure_capture_cost(
    kvm_path: &Path,
    mem_size: u64,
    pages: u64,
) -> Result<CaptureCost, VmError> {
    use crate::dirty::{DirtyTracker, PAGE_SIZE};
    use vm_memory::Bytes;
    let kvm = open_kvm(kvm_path)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let memory = create_memory(&vm, mem_size)?;
    let mut tracker = DirtyTracker::new(mem_size);
    let consumer = tracker.register();
    let harvest_err = |e: kvm_ioctls::Error| VmError::Memory {
        size: mem_size,
        reason: format!("KVM_GET_DIRTY_LOG: {e}"),
    };
    tracker.harvest(&vm, &memory).map_err(harvest_err)?;
    let _ = tracker.take(consumer);
    let total = mem_size / PAGE_SIZE;
    let pages = pages.clamp(1, total);
    let stride = total / pages;
    for i in 0..pages {
        memory
            .write_obj(i as u8 | 1, GuestAddress(i * stride * PAGE_SIZE))
            .map_err(|e| VmError::Memory {
                size: mem_size,
                reason: e.to_string(),
            })?;
    }
    let began = Instant::now();
    tracker.harvest(&vm, &memory).map_err(harvest_err)?;
    let gfns = tracker.take(consumer);
    let harvested = began.elapsed();
    let began = Instant::now();
    let mut copies = Vec::with_capacity(gfns.len());
    for gfn in &gfns {
        let mut data = vec![0u8; PAGE_SIZE as usize];
        memory
            .read_slice(&mut data, GuestAddress(gfn * PAGE_SIZE))
            .map_err(|e| VmError::Memory {
                size: mem_size,
                reason: e.to_string(),
            })?;
        copies.push(data);
    }
    let copied = began.elapsed();
    std::hint::black_box(&copies);
    let listed = gfns.len().max(1) as f64;
    Ok(CaptureCost {
        harvest_ns_per_page: harvested.as_nanos() as f64 / listed,
        copy_ns_per_page: copied.as_nanos() as f64 / listed,
    })
}
