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
use crate::backend::tap::{Tap, TapError, TapReader};
use crate::backend::LiveOutputs;
use crate::boot::{initial_state, BootError};
use crate::bus::{Bus, BusError};
use crate::cpuid::CpuidTable;
use crate::device_manager::{DeviceManager, SerialOutput};
use crate::exit::ExitContext;
use crate::kick::{setup_kick_signal, Kicker};
use crate::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE, VIRTIO_IRQS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::legacy::LegacyDevices;
use crate::loader::{load_kernel, LoaderError};
use crate::msr::{route_tsc_msrs, MsrRouting};
use crate::vcpu::{RunOutcome, Vcpu, VcpuError, VcpuStats};

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
    /// A tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
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
    _vm: VmFd,
    _kvm: Kvm,
    _memory: GuestMemoryMmap,
    causes: CauseQueue,
    _tap_readers: Vec<TapReader>,
    cpuid: CpuidTable,
    msr_routing: MsrRouting,
}

impl Vm {
    /// Builds the VM: memory, kernel, devices, vCPU state.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&config.mem_size) {
            return Err(VmError::MemSize {
                size: config.mem_size,
                min: MIN_MEM_SIZE >> 20,
                max: MAX_MEM_SIZE >> 20,
            });
        }
        let virtio_count = config.disks.len() + config.nets.len();
        if virtio_count > VIRTIO_IRQS.len() {
            return Err(VmError::TooManyDevices(virtio_count));
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
        let cmdline = with_virtio_tokens(&config.cmdline, virtio_count);
        let kvm = open_kvm(&config.kvm_path)?;
        setup_kick_signal().map_err(kvm_err("kick signal handler"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let memory = create_memory(&vm, config.mem_size)?;
        let entry = load_kernel(&memory, &config.kernel, config.initrd.as_deref(), &cmdline)?;
        let msr_routing = route_tsc_msrs(&kvm, &vm);
        info!("{msr_routing}");

        let cpuid = CpuidTable::for_host(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let vcpu_fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        configure_vcpu(&vcpu_fd, &cpuid, &memory, entry)?;
        let tsc_khz = vcpu_fd.get_tsc_khz().unwrap_or(1_000_000);

        let clock = GuestClock::new();
        let rtc_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let kicker = Kicker::default();
        let notify = kicker.clone();
        let causes = CauseQueue::new(Arc::new(move || notify.kick()));
        let console = Console::start(config.serial_out)
            .map_err(|e| VmError::Thread(format!("console thread: {e}")))?;
        let mut disk_meta = Vec::new();
        let mut workers = Vec::new();
        for (index, image) in images.into_iter().enumerate() {
            let id = image
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            disk_meta.push((image.capacity_sectors, image.read_only, id));
            let worker = BlockWorker::start(index as u8, image, causes.clone())
                .map_err(|e| VmError::Thread(format!("block worker: {e}")))?;
            workers.push(worker);
        }
        let mut tap_readers = Vec::new();
        for (index, tap) in taps.iter().enumerate() {
            let reader = tap
                .spawn_reader(index as u8, causes.clone())
                .map_err(|e| VmError::Thread(format!("tap reader: {e}")))?;
            tap_readers.push(reader);
        }
        let outputs: Arc<dyn Outputs> = Arc::new(LiveOutputs::new(console, taps, workers));

        let legacy = LegacyDevices::new(&clock, rtc_base, Box::new(SerialOutput(outputs.clone())));
        let mut pio = Bus::new();
        legacy.register(&mut pio)?;
        let mut devices = DeviceManager::new(legacy, clock.clone());
        let mut mmio = Bus::new();
        let mut slot = 0usize;
        for (index, (capacity, read_only, id)) in disk_meta.into_iter().enumerate() {
            let block = Block::new(index as u8, capacity, read_only, id, outputs.clone());
            let t = add_virtio(&mut mmio, &devices, &memory, slot, Box::new(block))?;
            devices.blocks.push(t);
            slot += 1;
        }
        for (index, net) in config.nets.iter().enumerate() {
            let mac = net.mac.unwrap_or(default_mac(index));
            let model = Net::new(index as u8, mac, outputs.clone());
            let t = add_virtio(&mut mmio, &devices, &memory, slot, Box::new(model))?;
            devices.nets.push(t);
            slot += 1;
        }
        let ctx = ExitContext::new(pio, mmio, clock, tsc_khz);

        let start = Instant::now();
        let inputs = Box::new(LiveInputs::new(start, causes.clone()));
        let vcpu = Vcpu::new(vcpu_fd, ctx, devices, inputs, kicker, start);
        Ok(Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _memory: memory,
            causes,
            _tap_readers: tap_readers,
            cpuid,
            msr_routing,
        })
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
    pub fn run(mut self) -> Result<(RunOutcome, VcpuStats), VmError> {
        std::thread::scope(|s| {
            let vcpu = &mut self.vcpu;
            let handle = std::thread::Builder::new()
                .name("tandem-vcpu0".into())
                .spawn_scoped(s, move || vcpu.run())
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
