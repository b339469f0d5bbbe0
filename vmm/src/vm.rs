//! Building and running one VM: KVM, memory, the vCPU, devices and boot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};
use tandem_devices::GuestMemoryMmap;
use tandem_replay::log::VmIdentity;
use tandem_replay::{CauseQueue, LiveInputs};
use tracing::info;
use vm_memory::GuestAddress;

use crate::backend::block::DiskError;
use crate::backend::gate::{FollowerOutputs, GatedOutputs};
use crate::backend::replica::{Replica, ReplicaError};
use crate::backend::tap::{TapError, TapReader};
use crate::boot::BootError;
use crate::bus::BusError;
use crate::cpuid::CpuidTable;
use crate::journal::{Journal, JournalError, RecordOptions, RecordSink};
use crate::layout::VIRTIO_IRQS;
use crate::loader::{load_kernel, LoaderError};
use crate::msr::{route_tsc_msrs, MsrRouting};
use crate::vcpu::{DivergenceReport, RunOutcome, Vcpu, VcpuError, VcpuStats};

pub(crate) mod builder;

use builder::{
    build_devices, create_memory, create_vcpu, create_vm, go_live_hooks, identify, shape_guest,
    start_outputs, sync_context, Handles, ModePlan, Role,
};

pub use crate::handle::VmStopper;

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
    /// The position counter the run needs cannot be used here.
    #[error("position counter: {0}")]
    Position(crate::position::PositionError),
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

/// Bumped whenever a device model changes guest-visible behaviour: logs
/// and pair identities record it. A VM started here runs this version
/// (unless pinned); a replay or a following secondary runs the version its
/// log names, any from [`OLDEST_DEVICE_MODEL_VERSION`] on, for the VM's
/// whole life — so a newer tandem can follow (and take over from) an older
/// one during a rolling upgrade.
pub const DEVICE_MODEL_VERSION: u32 = 3;
/// The oldest device-model behaviour this build still implements.
pub const OLDEST_DEVICE_MODEL_VERSION: u32 = 1;

impl Vm {
    /// Builds the VM: memory, kernel, devices, vCPU state, and its journal
    /// (live, recording, or replaying a log). Each step is a function in
    /// `vm/builder.rs`; `ModePlan::new` there is the one place the run
    /// modes differ.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        let plan = ModePlan::new(config.mode)?;
        let following = matches!(plan.role, Role::Follower);
        let (shape, world) = shape_guest(
            &plan,
            config.mem_size,
            &config.cmdline,
            &config.disks,
            &config.nets,
        )?;

        let (kvm, vm) = create_vm(&config.kvm_path)?;
        let memory = create_memory(&vm, shape.mem_size)?;
        let entry = load_kernel(
            &memory,
            &config.kernel,
            config.initrd.as_deref(),
            &shape.cmdline,
        )?;
        let msr_routing = route_tsc_msrs(&kvm, &vm);
        info!("{msr_routing}");
        let cpu = create_vcpu(&kvm, &vm, &memory, entry, plan.recorded.as_ref())?;
        let recorded_position = plan.recorded.as_ref().map(|i| i.position.as_str());
        let position = crate::position::for_vm(&kvm, &cpu.fd, recorded_position, plan.position)
            .map_err(VmError::Position)?;
        let identity = identify(
            plan.recorded.as_ref(),
            &shape,
            &cpu,
            &config.kernel,
            config.rtc_base,
            config.device_model,
            position.header,
        )?;

        let handles = Handles::new();
        let side = start_outputs(
            config.serial_out,
            world,
            config.mirror.as_deref(),
            &handles,
            &plan.role,
            config.on_guest_crash,
        )?;
        let (devices, ctx) =
            build_devices(&handles, &identity, &plan, &shape.specs, &memory, &side)?;

        let start = Instant::now();
        let live = LiveInputs::new(start, handles.causes.clone());
        let journal = (plan.start_journal)(&identity, live).map_err(VmError::Journal)?;
        let sync = sync_context(vm.clone(), memory.clone(), shape.mem_size, cpu.msrs);
        let replaying = matches!(journal, Journal::Replay(_));
        let (policy, kicker) = (plan.policy, handles.kicker.clone());
        let mut vcpu = Vcpu::new(cpu.fd, ctx, devices, journal, sync, policy, kicker, start);
        vcpu.set_base_pages(plan.base_pages);
        vcpu.set_position_counter(position.counter);
        vcpu.set_crash_policy(config.on_guest_crash);
        if replaying && (config.repair || following) {
            vcpu.enable_repair(shape.mem_size)?;
        }
        if let Some(f) = side.follower.clone() {
            vcpu.set_go_live(go_live_hooks(
                f,
                &handles.causes,
                &shape.specs,
                side.taps,
                config.on_live,
                config.go_live_record,
                config.announce,
            ));
        }
        Ok(Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _memory: memory,
            causes: handles.causes,
            _tap_readers: side.tap_readers,
            cpuid: cpu.cpuid,
            msr_routing,
            identity,
            gate: side.gate,
            follower: side.follower,
            replicas: side.replicas,
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

    /// A typed handle on this VM for other threads: requests (stop, kick,
    /// a full sync point) and a snapshot of its counters.
    pub fn handle(&self) -> crate::handle::VmHandle {
        let (full_sync_request, full_sync_stop) = self.vcpu.full_sync_handles();
        crate::handle::VmHandle {
            counters: self.vcpu.live_counters(),
            guest_crashes: self.vcpu.guest_crashes(),
            divergence_epoch: self.vcpu.divergence_epoch(),
            verified_stop: self.vcpu.verified_stop(),
            full_sync_request,
            full_sync_stop,
            sync_request: self.vcpu.sync_request(),
            output_awaits_verification: self.vcpu.output_awaits_verification(),
            stopper: self.stopper(),
            kicker: self.vcpu.kicker(),
        }
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
