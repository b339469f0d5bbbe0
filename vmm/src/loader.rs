//! Kernel loading: PVH ELF images and Linux bzImages (linux-loader).
//!
//! A PVH ELF (an image with a `XEN_ELFNOTE_PHYS32_ENTRY` note, as Firecracker
//! and QEMU boot a vmlinux, and as tandem's test guests are built) starts in
//! 32-bit protected mode with paging off and `ebx` pointing at an
//! `hvm_start_info`. A bzImage starts at its 64-bit entry with `rsi` pointing at
//! the zero page (`boot_params`). Anything else is refused with a message that
//! says what the file is not.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use tandem_devices::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    e820_map, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, PVH_INFO_START, PVH_MEMMAP_START,
    ZERO_PAGE_START,
};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// `setup_header.header`: "HdrS".
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// Offset of the setup header's magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// `boot_params.hdr.type_of_loader`: "undefined" loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Where a PVH module list goes (after the memory map).
const PVH_MODLIST_START: u64 = PVH_MEMMAP_START + 0x100;

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel or initrd file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{0} is neither a Linux bzImage nor an ELF image with a PVH entry note")]
    UnknownFormat(PathBuf),
    /// An ELF without the PVH note.
    #[error("{0} is an ELF image without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); tandem boots ELF images through PVH only")]
    NoPvhEntry(PathBuf),
    /// linux-loader refused the image.
    #[error("cannot load {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// linux-loader's reason.
        source: linux_loader::loader::Error,
    },
    /// The ELF headers point past the end of the file.
    #[error("{0} is truncated: its ELF headers point past the end of the file")]
    Truncated(PathBuf),
    /// The command line is too long or not printable ASCII.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit in guest memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Writing boot structures to guest memory failed.
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

/// How the vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, `ebx` = `hvm_start_info`.
    Pvh {
        /// Entry point (physical).
        entry: u64,
        /// Address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: `rsi` = zero page.
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
        /// Address of `boot_params`.
        boot_params: u64,
    },
}

/// The format of a kernel file, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF file.
    Elf,
    /// A Linux bzImage.
    BzImage,
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Tells an ELF from a bzImage by their magic numbers.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, LoaderError> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    if file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .map_err(read_err(path))?;
    if file.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::UnknownFormat(path.to_path_buf()))
}

/// Loads `kernel` (and `initrd`) into `mem` and writes the boot structures.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, LoaderError> {
    let mut file = File::open(kernel).map_err(read_err(kernel))?;
    let format = detect_format(&mut file, kernel)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err(kernel))?;
    let load_err = |source| LoaderError::Load {
        path: kernel.to_path_buf(),
        source,
    };

    let cmdline = build_cmdline(cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);

    match format {
        KernelFormat::Elf => {
            match scan_pvh_note(&mut file).map_err(read_err(kernel))? {
                NoteScan::Found => {}
                NoteScan::Absent => return Err(LoaderError::NoPvhEntry(kernel.to_path_buf())),
                NoteScan::Truncated => return Err(LoaderError::Truncated(kernel.to_path_buf())),
            }
            file.seek(SeekFrom::Start(0)).map_err(read_err(kernel))?;
            let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
                .map_err(load_err)?;
            let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
                return Err(LoaderError::NoPvhEntry(kernel.to_path_buf()));
            };
            let initrd = initrd
                .map(|p| load_initrd(mem, p, result.kernel_end, u64::MAX))
                .transpose()?;
            write_pvh_start_info(mem, initrd)?;
            Ok(BootEntry::Pvh {
                entry: entry.raw_value(),
                start_info: PVH_INFO_START,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
                .map_err(load_err)?;
            let Some(header) = result.setup_header else {
                return Err(LoaderError::UnknownFormat(kernel.to_path_buf()));
            };
            let mut params = boot_params {
                hdr: header,
                ..Default::default()
            };
            let initrd = initrd
                .map(|p| {
                    load_initrd(
                        mem,
                        p,
                        result.kernel_end,
                        u64::from(params.hdr.initrd_addr_max),
                    )
                })
                .transpose()?;
            fill_boot_params(
                &mut params,
                mem.last_addr().raw_value() + 1,
                cmdline_len,
                initrd,
            );
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(|e| LoaderError::BootParams(e.to_string()))?;
            Ok(BootEntry::Linux64 {
                entry: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                boot_params: ZERO_PAGE_START,
            })
        }
    }
}

/// `PT_NOTE`.
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most program headers tandem looks at; real images have a handful.
const MAX_PHDRS: u16 = 64;
/// Largest note segment tandem reads.
const MAX_NOTE_SEGMENT: u64 = 64 << 10;

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// What the program headers of an ELF file say about a PVH entry.
#[derive(Debug, PartialEq, Eq)]
enum NoteScan {
    Found,
    Absent,
    Truncated,
}

/// Looks for a Xen PVH entry note in an ELF64 file without trusting any
/// offset or count in it: hostile headers yield `Absent` or `Truncated`.
fn scan_pvh_note(file: &mut File) -> std::io::Result<NoteScan> {
    let mut ehdr = [0u8; 64];
    if !read_at(file, 0, &mut ehdr)? {
        return Ok(NoteScan::Truncated);
    }
    if ehdr[4] != 2 {
        // Not ELF64 (ELFCLASS64 = 2).
        return Ok(NoteScan::Absent);
    }
    let phoff = le_u64(&ehdr, 0x20);
    let phentsize = u64::from(u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]));
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]).min(MAX_PHDRS);
    if phentsize < 56 {
        return Ok(NoteScan::Absent);
    }
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 56];
        let Some(at) = phoff.checked_add(i * phentsize) else {
            return Ok(NoteScan::Truncated);
        };
        if !read_at(file, at, &mut phdr)? {
            return Ok(NoteScan::Truncated);
        }
        if le_u32(&phdr, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (le_u64(&phdr, 8), le_u64(&phdr, 32).min(MAX_NOTE_SEGMENT));
        let mut notes = vec![0u8; size as usize];
        if !read_at(file, offset, &mut notes)? {
            return Ok(NoteScan::Truncated);
        }
        if notes_have_pvh_entry(&notes) {
            return Ok(NoteScan::Found);
        }
    }
    Ok(NoteScan::Absent)
}

/// Walks the notes of one PT_NOTE segment looking for Xen's PHYS32_ENTRY.
fn notes_have_pvh_entry(notes: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = le_u32(notes, at) as usize;
        let descsz = le_u32(notes, at + 4) as usize;
        let kind = le_u32(notes, at + 8);
        let name = notes.get(at + 12..at + 12 + namesz.min(notes.len()));
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.is_some_and(|n| n.starts_with(b"Xen")) {
            return true;
        }
        let Some(next) = align4(namesz)
            .checked_add(align4(descsz))
            .and_then(|n| n.checked_add(at + 12))
        else {
            return false;
        };
        at = next;
    }
    false
}

fn build_cmdline(text: &str) -> Result<Cmdline, LoaderError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    if !text.is_empty() {
        cmdline
            .insert_str(text)
            .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Loads the initrd page-aligned as high as possible, below `addr_max` and
/// the end of memory, above `kernel_end`. Returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), LoaderError> {
    let mut file = File::open(path).map_err(read_err(path))?;
    let size = file.metadata().map_err(read_err(path))?.len();
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let top = mem.last_addr().raw_value().min(addr_max);
    let addr = top
        .checked_add(1)
        .and_then(|end| end.checked_sub(size))
        .ok_or_else(too_large)?
        & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| LoaderError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

/// Fills the fields of the zero page that the loader owns.
fn fill_boot_params(
    params: &mut boot_params,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) {
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = BZIMAGE_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
) -> Result<(), LoaderError> {
    let map = e820_map(mem.last_addr().raw_value() + 1);
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                cmdline_paddr: 0,
                reserved: 0,
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| LoaderError::BootParams(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("tandem-loader-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    /// A minimal bzImage: a setup header (protocol 2.12, loaded high) in four
    /// setup sectors plus the boot sector, then 4 KiB of "kernel".
    fn fake_bzimage() -> Vec<u8> {
        let mut image = vec![0u8; 5 * 512 + 4096];
        image[0x1f1] = 4; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes()); // version
        image[0x211] = 0x01; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[5 * 512] = 0xf4; // hlt, first byte of the kernel
        image
    }

    #[test]
    fn detects_formats_and_refuses_others() {
        let elf = temp_file("elf", b"\x7fELF\x02\x01\x01");
        let bz = temp_file("bz", &fake_bzimage());
        let junk = temp_file("junk", b"this is not a kernel");
        let empty = temp_file("empty", b"");
        for (path, want) in [
            (&elf, Some(KernelFormat::Elf)),
            (&bz, Some(KernelFormat::BzImage)),
        ] {
            assert_eq!(
                detect_format(&mut File::open(path).unwrap(), path).ok(),
                want
            );
        }
        for path in [&junk, &empty] {
            let err = detect_format(&mut File::open(path).unwrap(), path).unwrap_err();
            assert!(err.to_string().contains("neither a Linux bzImage"), "{err}");
        }
    }

    #[test]
    fn bzimage_boot_params_layout() {
        let mem = memory(64 << 20);
        let kernel = temp_file("bzparams", &fake_bzimage());
        let initrd = temp_file("initrd", &[0x5a; 10_000]);
        let entry = load_kernel(&mem, &kernel, Some(&initrd), "console=ttyS0 noapic").unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: 0x10_0200,
                boot_params: ZERO_PAGE_START
            }
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xf4);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        let mut raw = [0u8; 4096];
        mem.read_slice(&mut raw, GuestAddress(ZERO_PAGE_START))
            .unwrap();
        assert_eq!(&raw[0x202..0x206], b"HdrS");
        assert_eq!(raw[0x210], LOADER_TYPE_UNDEFINED);
        assert_eq!(
            u32::from_le_bytes(raw[0x228..0x22c].try_into().unwrap()),
            CMDLINE_START as u32
        );
        assert_eq!(raw[0x1e8], 3, "e820_entries");
        assert_eq!(
            u64::from_le_bytes(raw[0x2d0 + 20..0x2d0 + 28].try_into().unwrap()),
            0x9_fc00
        );
        assert_eq!({ params.hdr.cmdline_size }, 20);
        let (addr, size) = ({ params.hdr.ramdisk_image }, { params.hdr.ramdisk_size });
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(u64::from(addr) + 10_000 <= 64 << 20);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(u64::from(addr))).unwrap(),
            0x5a
        );
        let mut cmd = [0u8; 21];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 noapic\0");
    }

    #[test]
    fn pvh_note_walk_survives_hostile_notes() {
        let mut note = Vec::new();
        for (namesz, descsz, kind, name) in [(4u32, 4u32, 1u32, b"GNU\0"), (4, 4, 18, b"Xen\0")] {
            note.extend_from_slice(&namesz.to_le_bytes());
            note.extend_from_slice(&descsz.to_le_bytes());
            note.extend_from_slice(&kind.to_le_bytes());
            note.extend_from_slice(name);
            note.extend_from_slice(&0x10_0000u32.to_le_bytes());
        }
        assert!(notes_have_pvh_entry(&note));
        assert!(!notes_have_pvh_entry(&note[..20]));
        let mut hostile = note.clone();
        hostile[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!notes_have_pvh_entry(&hostile));
        assert!(!notes_have_pvh_entry(&[]));
    }

    #[test]
    fn truncated_bzimage_and_bad_cmdline_are_errors() {
        let mem = memory(16 << 20);
        let mut image = fake_bzimage();
        image.truncate(0x300);
        let kernel = temp_file("short", &image);
        assert!(matches!(
            load_kernel(&mem, &kernel, None, ""),
            Err(LoaderError::Load { .. })
        ));
        let kernel = temp_file("cmd", &fake_bzimage());
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            load_kernel(&mem, &kernel, None, &long),
            Err(LoaderError::Cmdline(_))
        ));
        let missing = Path::new("/nonexistent/kernel");
        let err = load_kernel(&mem, missing, None, "").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read /nonexistent/kernel"),
            "{err}"
        );
    }
}
