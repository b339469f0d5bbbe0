//! Building and running one VM: KVM, memory, the vCPU, devices and boot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::Arc;
use tandem_devices::GuestMemoryMmap;

use tandem_replay::{CauseQueue, GuestClock, LiveInputs, Outputs};
use tracing::info;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::backend::console::Console;
use crate::backend::LiveOutputs;
use crate::boot::{initial_state, BootError};
use crate::bus::{Bus, BusError};
use crate::cpuid::CpuidTable;
use crate::device_manager::{DeviceManager, SerialOutput};
use crate::exit::ExitContext;
use crate::kick::{setup_kick_signal, Kicker};
use crate::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE};
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
        let kvm = open_kvm(&config.kvm_path)?;
        setup_kick_signal().map_err(kvm_err("kick signal handler"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let memory = create_memory(&vm, config.mem_size)?;
        let entry = load_kernel(
            &memory,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
        )?;
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
        let outputs: Arc<dyn Outputs> = Arc::new(LiveOutputs::new(console, Vec::new(), Vec::new()));

        let legacy = LegacyDevices::new(&clock, rtc_base, Box::new(SerialOutput(outputs)));
        let mut pio = Bus::new();
        legacy.register(&mut pio)?;
        let devices = DeviceManager::new(legacy, clock.clone());
        let ctx = ExitContext::new(pio, Bus::new(), clock, tsc_khz);

        let start = Instant::now();
        let inputs = Box::new(LiveInputs::new(start, causes.clone()));
        let vcpu = Vcpu::new(vcpu_fd, ctx, devices, inputs, kicker, start);
        Ok(Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _memory: memory,
            causes,
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
            flags: 0,
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
