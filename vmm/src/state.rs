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

/// The SYSENTER MSRs: CS, ESP, EIP.
const SYSENTER_MSRS: [u32; 3] = [0x174, 0x175, 0x176];

/// A canonical value with high bits set, to see whether KVM keeps them.
const WIDE_PATTERN: u64 = 0xffff_ffff_8000_1000;

/// The MSRs saved with a vCPU, and how KVM narrows some of them when they
/// are installed.
///
/// For a guest whose CPUID names AMD, KVM keeps only the low 32 bits of the
/// SYSENTER MSRs that userspace sets, yet may report 64 (an emulated SVM CPU
/// stores what the guest wrote): captured as read, such a value never
/// survives install, and every epoch of a replay differs in it. Capture
/// therefore records what install reproduces.
///
/// It also carries the one segment quirk install must undo: KVM on SVM
/// reports the task register busy (type 11) whatever the VMCB holds
/// (`svm_get_segment`'s "busy flag isn't exposed" workaround), so a state
/// captured from a guest whose TR is an available TSS (type 9, as QEMU's
/// emulated SVM CPU keeps it after `ltr`) would be installed busy: QEMU's
/// I/O permission check then refuses every port a user process opened
/// with `ioperm` (the Linux guest's init took #GP on its `out` in every
/// replay).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedMsrs {
    /// The MSRs, in capture order (the log header lists them).
    pub indices: Vec<u32>,
    /// Bits install keeps, for MSRs it narrows.
    masks: Vec<(u32, u64)>,
    /// KVM reports TR busy on every read: install clears the busy bit it
    /// added (long mode never looks at it; QEMU's I/O check does).
    tr_busy_on_read: bool,
}

/// A 64-bit TSS's type, available; busy adds [`TSS_BUSY`].
const TSS_AVAILABLE: u8 = 9;
/// The busy bit of a TSS descriptor's type.
const TSS_BUSY: u8 = 2;

/// Whether this vCPU's KVM reports TR busy whatever was set: sets an
/// available TSS type, reads it back, and puts the old sregs back.
fn probe_tr_busy_on_read(fd: &VcpuFd) -> Result<bool, StateError> {
    let old = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let mut probe = old;
    probe.tr.type_ = TSS_AVAILABLE;
    fd.set_sregs(&probe).map_err(kvm_err("KVM_SET_SREGS"))?;
    let back = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?.tr.type_;
    fd.set_sregs(&old).map_err(kvm_err("KVM_SET_SREGS"))?;
    Ok(back == TSS_AVAILABLE | TSS_BUSY)
}

impl SavedMsrs {
    /// The MSRs in `indices`, none narrowed.
    pub fn new(indices: Vec<u32>) -> Self {
        Self {
            indices,
            masks: Vec::new(),
            tr_busy_on_read: false,
        }
    }

    /// Finds which SYSENTER MSRs KVM narrows on install, for this vCPU and
    /// its CPUID (set it first), by setting a wide value and reading it back.
    /// Each probed MSR gets its old value back.
    pub fn probe(fd: &VcpuFd, indices: Vec<u32>) -> Result<Self, StateError> {
        let mut masks = Vec::new();
        for index in SYSENTER_MSRS.into_iter().filter(|i| indices.contains(i)) {
            let old = read_msr(fd, index)?;
            write_msr(fd, index, WIDE_PATTERN)?;
            let back = read_msr(fd, index)?;
            write_msr(fd, index, old)?;
            if back == WIDE_PATTERN & 0xffff_ffff {
                masks.push((index, 0xffff_ffff));
            } else if back != WIDE_PATTERN {
                tracing::debug!("MSR {index:#x}: set {WIDE_PATTERN:#x}, read {back:#x}");
            }
        }
        let tr_busy_on_read = probe_tr_busy_on_read(fd)?;
        if tr_busy_on_read {
            tracing::debug!("KVM reports TR busy on every read: install clears the busy bit");
        }
        Ok(Self {
            indices,
            masks,
            tr_busy_on_read,
        })
    }

    /// `sregs` as install gives them to KVM: a TR busy bit that KVM's read
    /// added is taken off again.
    fn sregs_to_install(&self, mut sregs: kvm_sregs) -> kvm_sregs {
        if self.tr_busy_on_read && sregs.tr.type_ == TSS_AVAILABLE | TSS_BUSY {
            sregs.tr.type_ = TSS_AVAILABLE;
        }
        sregs
    }

    /// `value` of MSR `index` as install would reproduce it.
    fn as_installed(&self, index: u32, value: u64) -> u64 {
        self.masks
            .iter()
            .find(|(i, _)| *i == index)
            .map_or(value, |(_, mask)| value & mask)
    }
}

fn read_msr(fd: &VcpuFd, index: u32) -> Result<u64, StateError> {
    let mut list = msr_list(&[index])?;
    match fd.get_msrs(&mut list).map_err(kvm_err("KVM_GET_MSRS"))? {
        1 => Ok(list.as_slice()[0].data),
        _ => Err(StateError::Msrs(format!(
            "KVM refused to read MSR {index:#x}"
        ))),
    }
}

fn write_msr(fd: &VcpuFd, index: u32, data: u64) -> Result<(), StateError> {
    let entry = kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let list = Msrs::from_entries(&[entry]).map_err(|e| StateError::Msrs(format!("{e:?}")))?;
    match fd.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))? {
        1 => Ok(()),
        _ => Err(StateError::Msrs(format!(
            "KVM refused to set MSR {index:#x} to {data:#x}"
        ))),
    }
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

/// Zeroes the fields of `KVM_GET_VCPU_EVENTS` that mean nothing: the
/// vector, error-code flag, code and payload of an exception neither
/// injected nor pending, and the vector of an interrupt not injected. KVM
/// leaves them from the last event it handled, and which events pass
/// through KVM depends on host timing (an exit in the middle of a guest's
/// page-fault delivery makes KVM re-inject it): a Linux guest under SVM
/// showed `#PF` left over in a replay and nothing in its recording, at the
/// same stop. Only comparisons use this form (epoch hashes, a landed sync
/// point's check): capture and install keep what KVM reports, so that a
/// replay's KVM holds the same left-over fields as the recorder's and the
/// frozen position digest, which hashes them, agrees after an install.
pub fn canonical_events(e: &mut kvm_vcpu_events) {
    if e.exception.injected == 0 && e.exception.pending == 0 {
        e.exception.nr = 0;
        e.exception.has_error_code = 0;
        e.exception.error_code = 0;
        e.exception_has_payload = 0;
        e.exception_payload = 0;
    }
    if e.interrupt.injected == 0 {
        e.interrupt.nr = 0;
        e.interrupt.soft = 0;
    }
}

/// Captured `KVM_GET_VCPU_EVENTS` bytes in [`canonical_events`] form (bytes
/// that are not a whole `kvm_vcpu_events` are returned as they are).
pub fn canonical_events_bytes(bytes: &[u8]) -> Vec<u8> {
    match kvm_vcpu_events::read_from_bytes(bytes) {
        Ok(mut e) => {
            canonical_events(&mut e);
            e.as_bytes().to_vec()
        }
        Err(_) => bytes.to_vec(),
    }
}

/// Captures the vCPU's complete state.
pub fn capture(fd: &VcpuFd, saved: &SavedMsrs, halted: bool) -> Result<VcpuSnapshot, StateError> {
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
    let mut list = msr_list(&saved.indices)?;
    let n = fd.get_msrs(&mut list).map_err(kvm_err("KVM_GET_MSRS"))?;
    let msrs = list
        .as_slice()
        .iter()
        .take(n)
        .map(|e| (e.index, saved.as_installed(e.index, e.data)))
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
pub fn install(fd: &VcpuFd, s: &VcpuSnapshot, saved: &SavedMsrs) -> Result<(), StateError> {
    let sregs = saved.sregs_to_install(decode(&s.sregs, "sregs")?);
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

#[cfg(test)]
mod host_tests {
    use super::*;
    use crate::cpuid::CpuidTable;

    /// A vCPU with the host's CPUID, as tandem creates one.
    fn vcpu(kvm: &Kvm, vm: &kvm_ioctls::VmFd) -> VcpuFd {
        let fd = vm.create_vcpu(0).unwrap();
        let cpuid = CpuidTable::for_host(kvm).unwrap().to_kvm().unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        fd
    }

    fn sysenter_esp(s: &VcpuSnapshot) -> u64 {
        s.msrs.iter().find(|(i, _)| *i == 0x175).unwrap().1
    }

    #[test]
    fn a_captured_sysenter_msr_survives_install_unchanged() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let indices = saved_msrs(&kvm);
        if !indices.contains(&0x175) {
            eprintln!("skipped: this KVM does not save SYSENTER_ESP");
            return;
        }
        let (vm_a, vm_b) = (kvm.create_vm().unwrap(), kvm.create_vm().unwrap());
        let (a, b) = (vcpu(&kvm, &vm_a), vcpu(&kvm, &vm_b));
        let saved = SavedMsrs::probe(&a, indices).unwrap();
        write_msr(&a, 0x175, WIDE_PATTERN).unwrap();
        let captured = capture(&a, &saved, false).unwrap();
        install(&b, &captured, &saved).unwrap();
        let again = capture(&b, &saved, false).unwrap();
        assert_eq!(sysenter_esp(&again), sysenter_esp(&captured));
        assert_eq!(again.msrs, captured.msrs);
    }

    #[test]
    fn events_left_over_from_a_handled_exception_are_not_state() {
        let mut left_over = kvm_vcpu_events::default();
        left_over.exception.nr = 14;
        left_over.exception.has_error_code = 1;
        left_over.exception.error_code = 2;
        left_over.interrupt.nr = 32;
        left_over.interrupt.shadow = 1;
        canonical_events(&mut left_over);
        let mut want = kvm_vcpu_events::default();
        want.interrupt.shadow = 1;
        assert_eq!(left_over.as_bytes(), want.as_bytes());
        // An exception on its way, and an injected interrupt, are kept.
        let mut live = kvm_vcpu_events::default();
        live.exception.pending = 1;
        live.exception.nr = 14;
        live.exception.has_error_code = 1;
        live.exception.error_code = 2;
        live.interrupt.injected = 1;
        live.interrupt.nr = 32;
        let before = live;
        canonical_events(&mut live);
        assert_eq!(live.as_bytes(), before.as_bytes());
    }

    #[test]
    fn a_tr_busy_bit_added_by_kvm_is_taken_off_at_install_only_where_it_adds_one() {
        let mut sregs = kvm_sregs::default();
        sregs.tr.type_ = TSS_AVAILABLE | TSS_BUSY;
        let svm = SavedMsrs {
            tr_busy_on_read: true,
            ..SavedMsrs::default()
        };
        assert_eq!(svm.sregs_to_install(sregs).tr.type_, TSS_AVAILABLE);
        let other = SavedMsrs::default();
        assert_eq!(
            other.sregs_to_install(sregs).tr.type_,
            TSS_AVAILABLE | TSS_BUSY
        );
        // A 16-bit busy TSS (3) is left alone.
        sregs.tr.type_ = 3;
        assert_eq!(svm.sregs_to_install(sregs).tr.type_, 3);
    }

    #[test]
    fn the_tr_probe_leaves_the_vcpu_as_it_was() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let fd = vcpu(&kvm, &vm);
        let before = fd.get_sregs().unwrap();
        let busy = probe_tr_busy_on_read(&fd).unwrap();
        eprintln!("this KVM reports TR busy on every read: {busy}");
        assert_eq!(fd.get_sregs().unwrap().as_bytes(), before.as_bytes());
    }

    #[test]
    fn a_narrowed_msr_is_captured_as_install_keeps_it() {
        let saved = SavedMsrs {
            indices: vec![0x174, 0x175],
            masks: vec![(0x175, 0xffff_ffff)],
            tr_busy_on_read: false,
        };
        assert_eq!(saved.as_installed(0x175, WIDE_PATTERN), 0x8000_1000);
        assert_eq!(saved.as_installed(0x174, WIDE_PATTERN), WIDE_PATTERN);
    }
}
