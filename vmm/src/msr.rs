//! Routing the TSC MSRs to userspace.
//!
//! RDTSC cannot be trapped, but RDMSR/WRMSR of `IA32_TSC` can, where the host
//! supports `KVM_CAP_X86_USER_SPACE_MSR` and `KVM_CAP_X86_MSR_FILTER`: a
//! filter denies those MSRs in KVM, and with exit reason FILTER enabled the
//! access becomes a userspace exit (a stop) answered from guest time.

use kvm_bindings::{kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

/// `IA32_TIME_STAMP_COUNTER`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_ADJUST`.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;

/// What the host let tandem set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MsrRouting {
    /// TSC MSR accesses exit to userspace.
    TscToUserspace,
    /// The host lacks a capability; the guest reads KVM's TSC MSR directly.
    Unsupported(String),
}

impl std::fmt::Display for MsrRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MsrRouting::TscToUserspace => write!(f, "TSC MSRs routed to userspace"),
            MsrRouting::Unsupported(why) => write!(f, "TSC MSRs not routed: {why}"),
        }
    }
}

/// Probes the capabilities and installs the filter; never fails the VM.
pub fn route_tsc_msrs(kvm: &Kvm, vm: &VmFd) -> MsrRouting {
    if !kvm.check_extension(Cap::X86UserSpaceMsr) {
        return MsrRouting::Unsupported("no KVM_CAP_X86_USER_SPACE_MSR".into());
    }
    if !kvm.check_extension(Cap::X86MsrFilter) {
        return MsrRouting::Unsupported("no KVM_CAP_X86_MSR_FILTER".into());
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = vm.enable_cap(&cap) {
        return MsrRouting::Unsupported(format!("enabling KVM_CAP_X86_USER_SPACE_MSR: {e}"));
    }
    // A clear bit denies the access in KVM, which (with exit reason FILTER
    // enabled) sends it to userspace. One range per MSR.
    let deny = [0u8; 1];
    let ranges = [MSR_IA32_TSC, MSR_IA32_TSC_ADJUST].map(|base| MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base,
        msr_count: 1,
        bitmap: &deny,
    });
    match vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges) {
        Ok(()) => MsrRouting::TscToUserspace,
        Err(e) => MsrRouting::Unsupported(format!("KVM_X86_SET_MSR_FILTER: {e}")),
    }
}
