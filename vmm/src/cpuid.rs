//! The guest's CPUID table.
//!
//! KVM cannot trap RDTSC, RDRAND and friends for userspace, so whatever the
//! guest could use to observe the host behind tandem's back is hidden here
//! instead (DESIGN point 9). The table is computed once on the primary from
//! the host's supported set and kept as plain data ([`CpuidTable`]): the log
//! header carries it so a secondary runs the guest on exactly the same one.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};

/// One CPUID leaf/subleaf as plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuidEntry {
    /// EAX input.
    pub function: u32,
    /// ECX input (subleaf).
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// An output register of a CPUID leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A feature bit tandem hides, with the reason in its name.
#[derive(Clone, Copy, Debug)]
pub struct HiddenBit {
    /// Leaf.
    pub function: u32,
    /// Subleaf (for leaves that have them; 0 otherwise).
    pub index: u32,
    /// Register.
    pub reg: Reg,
    /// Bit number.
    pub bit: u32,
    /// Feature name as in the SDM / Linux's cpufeatures.
    pub name: &'static str,
}

const fn hide(function: u32, index: u32, reg: Reg, bit: u32, name: &'static str) -> HiddenBit {
    HiddenBit {
        function,
        index,
        reg,
        bit,
        name,
    }
}

/// Every feature bit hidden from the guest.
pub const HIDDEN_BITS: &[HiddenBit] = &[
    // Leaf 1: non-deterministic or absent hardware.
    hide(1, 0, Reg::Ecx, 3, "monitor"),
    hide(1, 0, Reg::Ecx, 12, "fma"),
    hide(1, 0, Reg::Ecx, 21, "x2apic"),
    hide(1, 0, Reg::Ecx, 24, "tsc_deadline_timer"),
    hide(1, 0, Reg::Ecx, 26, "xsave"),
    hide(1, 0, Reg::Ecx, 27, "osxsave"),
    hide(1, 0, Reg::Ecx, 28, "avx"),
    hide(1, 0, Reg::Ecx, 29, "f16c"),
    hide(1, 0, Reg::Ecx, 30, "rdrand"),
    hide(1, 0, Reg::Edx, 9, "apic"),
    // Leaf 6: the always-running APIC timer (there is no APIC).
    hide(6, 0, Reg::Eax, 2, "arat"),
    // Leaf 7.0: TSX, RDSEED, AVX2/AVX-512, PKU, WAITPKG, RDPID.
    hide(7, 0, Reg::Ebx, 4, "hle"),
    hide(7, 0, Reg::Ebx, 5, "avx2"),
    hide(7, 0, Reg::Ebx, 11, "rtm"),
    hide(7, 0, Reg::Ebx, 16, "avx512f"),
    hide(7, 0, Reg::Ebx, 17, "avx512dq"),
    hide(7, 0, Reg::Ebx, 18, "rdseed"),
    hide(7, 0, Reg::Ebx, 21, "avx512ifma"),
    hide(7, 0, Reg::Ebx, 26, "avx512pf"),
    hide(7, 0, Reg::Ebx, 27, "avx512er"),
    hide(7, 0, Reg::Ebx, 28, "avx512cd"),
    hide(7, 0, Reg::Ebx, 30, "avx512bw"),
    hide(7, 0, Reg::Ebx, 31, "avx512vl"),
    hide(7, 0, Reg::Ecx, 1, "avx512vbmi"),
    hide(7, 0, Reg::Ecx, 3, "pku"),
    hide(7, 0, Reg::Ecx, 4, "ospke"),
    hide(7, 0, Reg::Ecx, 5, "waitpkg"),
    hide(7, 0, Reg::Ecx, 6, "avx512_vbmi2"),
    hide(7, 0, Reg::Ecx, 9, "vaes"),
    hide(7, 0, Reg::Ecx, 10, "vpclmulqdq"),
    hide(7, 0, Reg::Ecx, 11, "avx512_vnni"),
    hide(7, 0, Reg::Ecx, 12, "avx512_bitalg"),
    hide(7, 0, Reg::Ecx, 14, "avx512_vpopcntdq"),
    hide(7, 0, Reg::Ecx, 22, "rdpid"),
    hide(7, 0, Reg::Edx, 2, "avx512_4vnniw"),
    hide(7, 0, Reg::Edx, 3, "avx512_4fmaps"),
    hide(7, 0, Reg::Edx, 8, "avx512_vp2intersect"),
    hide(7, 0, Reg::Edx, 11, "rtm_always_abort"),
    hide(7, 0, Reg::Edx, 16, "tsxldtrk"),
    hide(7, 0, Reg::Edx, 22, "amx_bf16"),
    hide(7, 0, Reg::Edx, 23, "avx512_fp16"),
    hide(7, 0, Reg::Edx, 24, "amx_tile"),
    hide(7, 0, Reg::Edx, 25, "amx_int8"),
    // Extended leaves: RDTSCP, MONITORX, invariant TSC.
    hide(0x8000_0001, 0, Reg::Ecx, 29, "monitorx"),
    hide(0x8000_0001, 0, Reg::Edx, 27, "rdtscp"),
    hide(0x8000_0007, 0, Reg::Edx, 8, "constant_tsc (invariant TSC)"),
];

/// Leaves removed entirely: perfmon (0xA), XSAVE state (0xD), processor
/// trace (0x14), AMX (0x1D, 0x1E) and leaf 7 subleaf 1 (AVX-VNNI and more).
const ZEROED_LEAVES: &[(u32, Option<u32>)] = &[
    (0xa, None),
    (0xd, None),
    (0x14, None),
    (0x1d, None),
    (0x1e, None),
    (0x7, Some(1)),
];

/// The KVM paravirtual leaves (kvmclock, PV EOI, async PF, steal time, poll
/// control...): all of them are dropped.
const KVM_LEAVES: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00ff;

/// The guest's CPUID, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidTable {
    /// Entries in the order KVM reported them.
    pub entries: Vec<CpuidEntry>,
}

impl CpuidTable {
    /// Builds the guest table from the host's supported set.
    pub fn from_supported(supported: &CpuId) -> Self {
        let entries = supported
            .as_slice()
            .iter()
            .filter(|e| !KVM_LEAVES.contains(&e.function))
            .map(|e| guest_entry(entry_from_kvm(e)))
            .collect();
        Self { entries }
    }

    /// Reads the host's supported set from KVM and builds the guest table.
    pub fn for_host(kvm: &kvm_ioctls::Kvm) -> Result<Self, kvm_ioctls::Error> {
        Ok(Self::from_supported(
            &kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?,
        ))
    }

    /// The table in KVM's form, for `KVM_SET_CPUID2`.
    pub fn to_kvm(&self) -> Result<CpuId, vmm_sys_util::fam::Error> {
        let raw: Vec<kvm_cpuid_entry2> = self
            .entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&raw)
    }

    /// The entry for `function`/`index`, if present.
    pub fn get(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.entries
            .iter()
            .find(|e| e.function == function && e.index == index)
    }
}

fn entry_from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
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

fn reg_mut(e: &mut CpuidEntry, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Applies tandem's policy to one host entry.
fn guest_entry(mut e: CpuidEntry) -> CpuidEntry {
    let zeroed = ZEROED_LEAVES
        .iter()
        .any(|&(f, sub)| f == e.function && sub.is_none_or(|s| s == e.index));
    if zeroed {
        e.eax = 0;
        e.ebx = 0;
        e.ecx = 0;
        e.edx = 0;
        return e;
    }
    let (function, index) = (e.function, e.index);
    for h in HIDDEN_BITS
        .iter()
        .filter(|h| h.function == function && h.index == index)
    {
        *reg_mut(&mut e, h.reg) &= !(1 << h.bit);
    }
    if e.function == 1 {
        // One CPU, initial APIC id 0, no CLFLUSH-size surprises from the host's
        // topology: logical processor count 1.
        e.ebx &= 0x0000_ffff;
        e.ebx |= 1 << 16;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_like() -> CpuId {
        let all = u32::MAX;
        let entry = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            eax: all,
            ebx: all,
            ecx: all,
            edx: all,
            ..Default::default()
        };
        CpuId::from_entries(&[
            entry(0, 0),
            entry(1, 0),
            entry(6, 0),
            entry(7, 0),
            entry(7, 1),
            entry(0xa, 0),
            entry(0xd, 1),
            entry(0x4000_0000, 0),
            entry(0x4000_0001, 0),
            entry(0x8000_0001, 0),
            entry(0x8000_0007, 0),
        ])
        .unwrap()
    }

    fn bit(t: &CpuidTable, f: u32, i: u32, reg: Reg, b: u32) -> bool {
        let mut e = *t.get(f, i).unwrap();
        *reg_mut(&mut e, reg) & (1 << b) != 0
    }

    #[test]
    fn hides_every_listed_bit_and_keeps_the_rest() {
        let t = CpuidTable::from_supported(&host_like());
        for h in HIDDEN_BITS {
            assert!(
                !bit(&t, h.function, h.index, h.reg, h.bit),
                "{} visible",
                h.name
            );
        }
        // Things the guest needs stay: long mode, PAE, TSC, FPU.
        assert!(bit(&t, 0x8000_0001, 0, Reg::Edx, 29), "lm hidden");
        assert!(bit(&t, 1, 0, Reg::Edx, 6), "pae hidden");
        assert!(bit(&t, 1, 0, Reg::Edx, 4), "tsc hidden");
        assert!(bit(&t, 1, 0, Reg::Edx, 0), "fpu hidden");
    }

    #[test]
    fn drops_kvm_leaves_and_zeroes_perfmon_and_xsave() {
        let t = CpuidTable::from_supported(&host_like());
        assert!(t.get(0x4000_0000, 0).is_none());
        assert!(t.get(0x4000_0001, 0).is_none());
        for (f, i) in [(0xa, 0), (0xd, 1), (7, 1)] {
            let e = t.get(f, i).unwrap();
            assert_eq!(
                (e.eax, e.ebx, e.ecx, e.edx),
                (0, 0, 0, 0),
                "leaf {f:#x}.{i}"
            );
        }
        assert_eq!(t.get(1, 0).unwrap().ebx >> 16, 1);
    }

    #[test]
    fn round_trips_through_kvm_form() {
        let t = CpuidTable::from_supported(&host_like());
        let kvm = t.to_kvm().unwrap();
        assert_eq!(
            CpuidTable {
                entries: kvm.as_slice().iter().map(entry_from_kvm).collect()
            },
            t
        );
    }
}
