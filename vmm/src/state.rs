//! Complete vCPU state (DESIGN point 7) as plain bytes, captured and installed.
//!
//! Regs, sregs, FPU, XSAVE and XCRs (where the host has them), debug
//! registers, `KVM_GET_VCPU_EVENTS` (interrupt shadow, queued interrupt,
//! pending exceptions/NMI) and the MSRs the guest can see, plus the VMM's own
//! "halted at this stop" flag (KVM reports RUNNABLE after a userspace HLT
//! exit). The TSC is deliberately absent: it is host-specific. **Callers
//! complete a pending PIO/MMIO/MSR exit before capturing or installing.**

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::{FromBytes, IntoBytes};

/// MSRs a guest can read back that tandem saves with the vCPU: SYSENTER,
/// PAT, MISC_ENABLE, the SYSCALL set and KERNEL_GS_BASE. (EFER, FS/GS base
/// travel in sregs; the TSC is host time and never travels.)
const GUEST_MSRS: &[u32] = &[
    0x174,
    0x175,
    0x176,
    0x1a0,
    0x277,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
];

/// The saved MSRs this host supports.
pub fn saved_msrs(kvm: &Kvm) -> Vec<u32> {
    let supported = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    GUEST_MSRS
        .iter()
        .copied()
        .filter(|m| supported.contains(m))
        .collect()
}

/// A vCPU's complete state as plain data (the log's form).
pub use tandem_replay::log::VcpuState as VcpuSnapshot;

/// Why state could not be captured or installed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A saved field has the wrong size (a log from another build or host).
    #[error("saved vCPU {what} has {len} bytes, expected {expected}")]
    BadSize {
        /// The field.
        what: &'static str,
        /// Its size.
        len: usize,
        /// What this build expects.
        expected: usize,
    },
    /// The MSR list could not be built.
    #[error("MSR list: {0}")]
    Msrs(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

fn decode<T: FromBytes + IntoBytes + zerocopy::Immutable>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StateError> {
    T::read_from_bytes(bytes).map_err(|_| StateError::BadSize {
        what,
        len: bytes.len(),
        expected: std::mem::size_of::<T>(),
    })
}

// kvm-bindings gives `kvm_fpu` no zerocopy impls; it is plain integers with
// explicit padding fields, so copy its bytes by hand.
fn fpu_to_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    let len = std::mem::size_of::<kvm_fpu>();
    // SAFETY: `fpu` is a live, initialised `kvm_fpu` of `len` bytes; it has
    // no implicit padding (its pad fields are ordinary integers).
    unsafe { std::slice::from_raw_parts((fpu as *const kvm_fpu).cast::<u8>(), len) }.to_vec()
}

fn fpu_from_bytes(bytes: &[u8]) -> Result<kvm_fpu, StateError> {
    let expected = std::mem::size_of::<kvm_fpu>();
    if bytes.len() != expected {
        return Err(StateError::BadSize {
            what: "fpu",
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: exactly `size_of::<kvm_fpu>()` bytes are read, unaligned; every
    // bit pattern is a valid `kvm_fpu` (integers and byte arrays only).
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<kvm_fpu>()) })
}

fn msr_list(indices: &[u32]) -> Result<Msrs, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| StateError::Msrs(format!("{e:?}")))
}

/// Captures the vCPU's complete state.
pub fn capture(fd: &VcpuFd, msrs: &[u32], halted: bool) -> Result<VcpuSnapshot, StateError> {
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let fpu = fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    // XSAVE is hidden from the guest but the host may still keep it; a host
    // without it gives an empty field, which install then skips.
    let xsave = fd
        .get_xsave()
        .map(|x| x.as_bytes().to_vec())
        .unwrap_or_default();
    let xcrs = fd
        .get_xcrs()
        .map(|x| x.as_bytes().to_vec())
        .unwrap_or_default();
    let mut list = msr_list(msrs)?;
    let n = fd.get_msrs(&mut list).map_err(kvm_err("KVM_GET_MSRS"))?;
    let msrs = list
        .as_slice()
        .iter()
        .take(n)
        .map(|e| (e.index, e.data))
        .collect();
    Ok(VcpuSnapshot {
        regs: regs.as_bytes().to_vec(),
        sregs: sregs.as_bytes().to_vec(),
        fpu: fpu_to_bytes(&fpu),
        xsave,
        xcrs,
        debugregs: debugregs.as_bytes().to_vec(),
        events: events.as_bytes().to_vec(),
        msrs,
        halted,
    })
}

/// Installs a captured state.
pub fn install(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), StateError> {
    let sregs: kvm_sregs = decode(&s.sregs, "sregs")?;
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    if !s.xcrs.is_empty() {
        let xcrs: kvm_xcrs = decode(&s.xcrs, "xcrs")?;
        fd.set_xcrs(&xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    if !s.xsave.is_empty() {
        let xsave: kvm_xsave = decode(&s.xsave, "xsave")?;
        // SAFETY: `xsave` is a whole `kvm_xsave` read from a capture of the
        // same layout; KVM reads exactly that struct.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    }
    let fpu = fpu_from_bytes(&s.fpu)?;
    fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    let regs: kvm_regs = decode(&s.regs, "regs")?;
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    let debugregs: kvm_debugregs = decode(&s.debugregs, "debugregs")?;
    fd.set_debug_regs(&debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let list = Msrs::from_entries(&entries).map_err(|e| StateError::Msrs(format!("{e:?}")))?;
    fd.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
    let events: kvm_vcpu_events = decode(&s.events, "vcpu events")?;
    fd.set_vcpu_events(&events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
