//! Initial vCPU state for each boot protocol: GDT, segment registers, page
//! tables (Linux 64-bit entry only), general registers and FPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use tandem_devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};
use crate::loader::BootEntry;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Segment descriptor flags/type (bits 8..24 of the high dword, as in Linux's
/// `GDT_ENTRY(flags, base, limit)`).
const CODE64_FLAGS: u16 = 0xa09b;
const CODE32_FLAGS: u16 = 0xc09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;

/// A GDT descriptor from flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The cached form of a GDT descriptor, as `KVM_SET_SREGS` wants it.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// Why the initial state could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write boot {what} to guest memory: {source}")]
pub struct BootError {
    what: &'static str,
    source: vm_memory::GuestMemoryError,
}

fn write_u64s(
    mem: &GuestMemoryMmap,
    at: u64,
    values: &[u64],
    what: &'static str,
) -> Result<(), BootError> {
    for (i, v) in values.iter().enumerate() {
        mem.write_obj(*v, GuestAddress(at + 8 * i as u64))
            .map_err(|source| BootError { what, source })?;
    }
    Ok(())
}

/// The initial register state for `entry`; writes the GDT (and for Linux the
/// identity-mapped page tables) to guest memory.
pub fn initial_state(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    base_sregs: kvm_sregs,
) -> Result<(kvm_regs, kvm_sregs, kvm_fpu), BootError> {
    let code_flags = match entry {
        BootEntry::Pvh { .. } => CODE32_FLAGS,
        BootEntry::Linux64 { .. } => CODE64_FLAGS,
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ];
    write_u64s(mem, BOOT_GDT_START, &gdt, "GDT")?;
    write_u64s(mem, BOOT_IDT_START, &[0], "IDT")?;

    let mut sregs = base_sregs;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    sregs.tr.type_ = 0xb; // busy 32/64-bit TSS, as VMX requires
    sregs.tr.unusable = 0;
    sregs.apic_base = 0;

    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, boot_params } => {
            // Identity-map the first GiB with 2 MiB pages.
            write_u64s(mem, PML4_START, &[PDPTE_START | 0x03], "PML4")?;
            write_u64s(mem, PDPTE_START, &[PDE_START | 0x03], "PDPT")?;
            let pde: Vec<u64> = (0..512u64).map(|i| (i << 21) | 0x83).collect();
            write_u64s(mem, PDE_START, &pde, "PD")?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    Ok((regs, sregs, fpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 1);
        assert_eq!(
            (code64.base, code64.limit, code64.selector),
            (0, 0xffff_ffff, 8)
        );
        assert_eq!(
            (code64.l, code64.db, code64.type_, code64.present),
            (1, 0, 0xb, 1)
        );
        let code32 = segment_from_gdt(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        let data = segment_from_gdt(gdt_entry(DATA_FLAGS, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.s, data.selector), (3, 1, 16));
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn linux_entry_gets_long_mode_and_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let entry = BootEntry::Linux64 {
            entry: 0x10_0200,
            boot_params: 0x7000,
        };
        let (regs, sregs, _) = initial_state(&mem, entry, kvm_sregs::default()).unwrap();
        assert_eq!((regs.rip, regs.rsi), (0x10_0200, 0x7000));
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        let pde1: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde1, (1 << 21) | 0x83);
    }

    #[test]
    fn pvh_entry_is_protected_mode_without_paging() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let entry = BootEntry::Pvh {
            entry: 0x10_000c,
            start_info: 0x6000,
        };
        let (regs, sregs, _) = initial_state(&mem, entry, kvm_sregs::default()).unwrap();
        assert_eq!((regs.rip, regs.rbx), (0x10_000c, 0x6000));
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
        assert_eq!(sregs.efer, 0);
    }
}
