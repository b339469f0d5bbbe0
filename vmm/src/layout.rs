//! Guest physical memory layout: where tandem puts what before the first
//! instruction. Values follow Firecracker's x86_64 layout so Linux and PVH
//! guests find things where they expect them.

/// The boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// The (empty) boot IDT, right after the GDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map (follows `hvm_start_info`).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for a Linux boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity-mapped boot page tables (Linux 64-bit entry).
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// PD of the boot page tables.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line tandem passes (Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of conventional memory below the EBDA.
pub const EBDA_START: u64 = 0x9_fc00;
/// Kernels and PVH images load at or above 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Smallest guest memory tandem accepts.
pub const MIN_MEM_SIZE: u64 = 2 << 20;
/// Largest guest memory: one region below the 32-bit MMIO hole, where the
/// virtio-mmio windows live.
pub const MAX_MEM_SIZE: u64 = 3 << 30;

/// First virtio-mmio window, in the 32-bit MMIO hole above RAM.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// ISA IRQs for virtio-mmio devices, in device order: none of 0 (PIT), 1
/// (keyboard), 2 (cascade), 4 (COM1), 8 (RTC) or 12 (mouse).
pub const VIRTIO_IRQS: [u8; 6] = [5, 6, 7, 9, 10, 11];

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// The guest's e820 map for `mem_size` bytes of RAM: conventional memory, the
/// EBDA/BIOS hole, then everything from 1 MiB.
pub fn e820_map(mem_size: u64) -> [(u64, u64, u32); 3] {
    [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
        (
            HIGH_MEMORY_START,
            mem_size.saturating_sub(HIGH_MEMORY_START),
            E820_RAM,
        ),
    ]
}
