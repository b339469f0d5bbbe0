//! Where a vCPU is in its instruction stream: the position counter that
//! lets a replay stop at the very instruction where the recording was
//! interrupted (DESIGN point 5; VMware FT and rr use a retired-branch
//! performance counter for this).
//!
//! [`PositionCounter`] is the one interface; which counter a VM uses is
//! chosen when it is created ([`choose`]):
//!
//! - `kvm-insn-stat`: the vCPU statistic `insn_emulation`
//!   (`KVM_GET_STATS_FD`), which counts every instruction KVM's emulator
//!   runs: exact on hosts whose KVM emulates guest code (the development
//!   machines' nested, paravirtual KVM; see `../shared/GUEST-NOTES.md`),
//!   meaningless where the guest runs natively. It is used only after
//!   [`self_check`] proves it exact on this host.
//! - `none`: no counter; every interrupt is delivered at a sync point.
//!
//! A hardware retired-branch counter (perf events) would be a third
//! implementation of the same trait.
//!
//! This module is the counter, its self-check and the position digest;
//! placing stops at recorded positions is the vCPU's work (`vcpu/land.rs`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

pub mod choice;
pub use choice::PositionChoice;

use crate::kick::{clear_immediate_exit, setup_kick_signal, Kicker, VcpuKickTarget};
use crate::vm::builder::create_memory;

/// `KVM_GET_STATS_FD` (`_IO(KVMIO, 0xce)`).
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
/// The statistic that counts emulated guest instructions.
const INSN_STAT: &str = "insn_emulation";

/// Why a counter cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    /// The host's KVM has no binary statistics or no such statistic.
    #[error("this KVM offers no {0} statistic")]
    NoStatistic(&'static str),
    /// Reading the statistics failed.
    #[error("reading KVM statistics: {0}")]
    Io(#[from] std::io::Error),
    /// A KVM call failed while checking the counter.
    #[error("KVM {what} failed during the counter's self-check: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The counter ran but did not count as the model says it must.
    #[error("the counter is not exact on this host: {0}")]
    Inexact(String),
    /// A log names a counter this build does not know.
    #[error("unknown position counter in the log header: {0:?}")]
    Unknown(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PositionError {
    move |source| PositionError::Kvm { what, source }
}

/// A vCPU's position in its instruction stream: deltas between two reads
/// are exact (the absolute value is not settable and means nothing).
pub trait PositionCounter: Send {
    /// The counter's name, as the log header and `--position` give it.
    fn name(&self) -> &'static str;
    /// The count now.
    fn read(&self) -> Result<u64, PositionError>;
}

/// `insn_emulation` of one vCPU, read with one `pread` (no exit).
pub struct InsnStat {
    stats: File,
    /// Where the value lies in the statistics file.
    at: u64,
}

impl InsnStat {
    /// Opens the statistic of `vcpu`.
    pub fn open(vcpu: &VcpuFd) -> Result<Self, PositionError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file
        // descriptor (or -1) for the vCPU `vcpu` keeps open.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if fd < 0 {
            return Err(PositionError::NoStatistic(INSN_STAT));
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let stats = unsafe { File::from_raw_fd(fd) };
        let at = find_stat(&stats, INSN_STAT)?.ok_or(PositionError::NoStatistic(INSN_STAT))?;
        Ok(Self { stats, at })
    }
}

impl PositionCounter for InsnStat {
    fn name(&self) -> &'static str {
        "kvm-insn-stat"
    }

    fn read(&self) -> Result<u64, PositionError> {
        let mut value = [0u8; 8];
        self.stats.read_exact_at(&mut value, self.at)?;
        Ok(u64::from_ne_bytes(value))
    }
}

/// The file offset of statistic `name`'s value (the binary stats layout:
/// a 24-byte header, descriptors of 16 bytes plus `name_size`, the data).
fn find_stat(stats: &File, name: &str) -> Result<Option<u64>, PositionError> {
    let mut header = [0u8; 24];
    stats.read_exact_at(&mut header, 0)?;
    let word = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (name_size, count) = (word(&header, 4) as usize, word(&header, 8) as usize);
    let (desc_offset, data_offset) = (u64::from(word(&header, 16)), u64::from(word(&header, 20)));
    let desc_size = 16 + name_size;
    if count > 4096 || name_size > 4096 {
        return Err(PositionError::Inexact(format!(
            "implausible statistics header ({count} descriptors, names of {name_size} bytes)"
        )));
    }
    let mut descs = vec![0u8; desc_size * count];
    stats.read_exact_at(&mut descs, desc_offset)?;
    Ok(descs.chunks_exact(desc_size).find_map(|d| {
        let raw = &d[16..];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        (&raw[..end] == name.as_bytes()).then(|| data_offset + u64::from(word(d, 8)))
    }))
}

/// The counter a VM uses, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionPlan {
    /// `kvm-insn-stat` or `none`.
    pub counter: &'static str,
    /// Why (the self-check's figures, or why it failed).
    pub why: String,
}

/// Picks the counter for `choice` on this host.
pub fn choose(kvm: &Kvm, choice: PositionChoice) -> Result<PositionPlan, PositionError> {
    match choice {
        PositionChoice::None => Ok(PositionPlan {
            counter: "none",
            why: "--position none".into(),
        }),
        PositionChoice::KvmInsnStat => self_check(kvm).map(|c| PositionPlan {
            counter: "kvm-insn-stat",
            why: c.to_string(),
        }),
        PositionChoice::Auto => Ok(match self_check(kvm) {
            Ok(c) => PositionPlan {
                counter: "kvm-insn-stat",
                why: c.to_string(),
            },
            Err(e) => PositionPlan {
                counter: "none",
                why: format!("kvm-insn-stat not used: {e}"),
            },
        }),
    }
}

/// The counter a VM places its stops with, and the log header's words for
/// it (counter name and fingerprint; empty for none).
pub struct VmPosition {
    /// The counter, opened on the VM's vCPU (None: sync points only).
    pub counter: Option<Box<dyn PositionCounter>>,
    /// What the log header records.
    pub header: String,
}

/// The counter for a VM: a replay's is the one its log header names (the
/// host must pass that counter's self-check, else the replay is refused);
/// a recording's is what `choice` picks on this host; other runs have none.
pub fn for_vm(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    recorded: Option<&str>,
    choice: Option<PositionChoice>,
) -> Result<VmPosition, PositionError> {
    let none = || VmPosition {
        counter: None,
        header: String::new(),
    };
    match (recorded, choice) {
        (Some(""), _) | (None, None) | (None, Some(PositionChoice::None)) => Ok(none()),
        (Some(header), _) => {
            if !header.starts_with(INSN_COUNTER) {
                return Err(PositionError::Unknown(header.to_string()));
            }
            self_check(kvm)?;
            Ok(VmPosition {
                counter: Some(Box::new(InsnStat::open(vcpu)?)),
                header: header.to_string(),
            })
        }
        (None, Some(choice)) => {
            let plan = choose(kvm, choice)?;
            tracing::info!("position counter: {} ({})", plan.counter, plan.why);
            if plan.counter != INSN_COUNTER {
                return Ok(none());
            }
            Ok(VmPosition {
                counter: Some(Box::new(InsnStat::open(vcpu)?)),
                header: format!("{INSN_COUNTER}; {}; {}", host_fingerprint(), plan.why),
            })
        }
    }
}

/// The name of the `insn_emulation` counter.
const INSN_COUNTER: &str = "kvm-insn-stat";

/// What the count depends on besides the guest: the host kernel and the
/// emulator's batch size.
fn host_fingerprint() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "kernel {}; pvm_emul_batch {}",
        read("/proc/sys/kernel/osrelease"),
        read("/sys/module/kvm_pvm/parameters/pvm_emul_batch")
    )
}

/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS.RF.
const RFLAGS_RF: u64 = 1 << 16;

/// The position digest (frozen: logs keep it; golden values in the tests):
/// FNV-1a over, in this order, as little-endian u64s, RAX..R15 (the
/// `kvm_regs` order), RFLAGS without RF (and without a TF the VMM set), the
/// `KVM_GET_VCPU_EVENTS` exception (injected, nr, has_error_code, pending,
/// error_code), interrupt (injected, nr, soft, shadow) and NMI (injected,
/// pending, masked) fields, CPL, CS.L and CR3. RIP travels beside it.
pub fn digest(
    regs: &kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
    events: &kvm_bindings::kvm_vcpu_events,
    vmm_set_tf: bool,
) -> u64 {
    let mut rflags = regs.rflags & !RFLAGS_RF;
    if vmm_set_tf {
        rflags &= !RFLAGS_TF;
    }
    let (e, i, n) = (&events.exception, &events.interrupt, &events.nmi);
    let words = [
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.rsp,
        regs.rbp,
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        rflags,
        u64::from(e.injected),
        u64::from(e.nr),
        u64::from(e.has_error_code),
        u64::from(e.pending),
        u64::from(e.error_code),
        u64::from(i.injected),
        u64::from(i.nr),
        u64::from(i.soft),
        u64::from(i.shadow),
        u64::from(n.injected),
        u64::from(n.pending),
        u64::from(n.masked),
        u64::from(sregs.ss.dpl),
        u64::from(sregs.cs.l),
        sregs.cr3,
    ];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in words.iter().flat_map(|w| w.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Whether `kvm-insn-stat` counts the guest in this state, and a replay
/// can land there: not 64-bit CPL3 (native under kvm_pvm, uncounted), no
/// exception between its fault and its delivery (a replay cannot stop
/// there), and a code segment based at 0 (landing's breakpoint takes RIP
/// as a linear address).
pub fn countable(sregs: &kvm_bindings::kvm_sregs, events: &kvm_bindings::kvm_vcpu_events) -> bool {
    !user64(sregs) && !exception_in_flight(events) && sregs.cs.base == 0
}

/// A 64-bit CPL3 state: native under kvm_pvm, not counted.
pub fn user64(sregs: &kvm_bindings::kvm_sregs) -> bool {
    sregs.cs.l == 1 && sregs.ss.dpl == 3
}

/// Whether an exception is on its way into the guest (a fault counted,
/// its delivery not done).
pub fn exception_in_flight(events: &kvm_bindings::kvm_vcpu_events) -> bool {
    events.exception.injected != 0 || events.exception.pending != 0
}

/// What the self-check measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// Instructions counted for the calibration program.
    pub counted: u64,
    /// Kicks that interrupted the kicked run.
    pub kicks: u64,
}

impl std::fmt::Display for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "self-check passed: {} instructions counted as modelled, also with {} kicks",
            self.counted, self.kicks
        )
    }
}

/// Loop iterations of the calibration program.
const LOOPS: [u16; 2] = [3000, 7000];
/// REP STOSB lengths (a pass ends at each multiple of 1024 of RCX).
const REP_BYTES: [u16; 2] = [1000, 5000];

/// The calibration program (16-bit real mode at 0x1000):
/// `mov cx, loops; l: dec cx; jnz l; mov cx, bytes; mov di, 0x4000;
/// cld; rep stosb; out 0xf4, al`.
fn program(loops: u16, bytes: u16) -> Vec<u8> {
    let [l0, l1] = loops.to_le_bytes();
    let [b0, b1] = bytes.to_le_bytes();
    vec![
        0xb9, l0, l1,   // mov cx, loops
        0x49, // l: dec cx
        0x75, 0xfd, // jnz l
        0xb9, b0, b1, // mov cx, bytes
        0xbf, 0x00, 0x40, // mov di, 0x4000
        0xfc, // cld
        0xf3, 0xaa, // rep stosb
        0xe6, 0xf4, // out 0xf4, al
    ]
}

/// The model: instructions counted for `program(loops, bytes)`: the five
/// straight-line ones (three MOVs, CLD, the final OUT), two per loop
/// iteration, and REP STOSB once per pass, a pass ending at each multiple
/// of 1024 of RCX, plus one final pass with RCX = 0 (GUEST-NOTES.md).
fn modelled(loops: u16, bytes: u16) -> u64 {
    let passes = u64::from(bytes).div_ceil(1024) + 1;
    5 + 2 * u64::from(loops) + passes
}

/// Proves `insn_emulation` exact here: the calibration program counts
/// exactly what the model says for several sizes of loop and REP string,
/// and the same program interrupted by random kicks counts the same as
/// without them. Runs in scratch VMs on a thread of its own.
pub fn self_check(kvm: &Kvm) -> Result<Calibration, PositionError> {
    // A thread of its own: the check's vCPU takes the kick signal there,
    // never on the caller's thread.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("tandem-position-check".into())
            .spawn_scoped(scope, || check_on_this_thread(kvm))
            .map_err(PositionError::Io)?
            .join()
            .unwrap_or_else(|_| {
                Err(PositionError::Inexact(
                    "the self-check thread panicked".into(),
                ))
            })
    })
}

fn check_on_this_thread(kvm: &Kvm) -> Result<Calibration, PositionError> {
    // Blocks the kick signal on this thread (each run unblocks it while its
    // vCPU runs).
    setup_kick_signal()
        .map_err(|e| PositionError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    for (loops, bytes) in [
        (LOOPS[0], REP_BYTES[0]),
        (LOOPS[1], REP_BYTES[0]),
        (LOOPS[0], REP_BYTES[1]),
        (LOOPS[1], 0),
    ] {
        let (counted, _) = run_counted(kvm, loops, bytes, false)?;
        let want = modelled(loops, bytes);
        if counted != want {
            return Err(PositionError::Inexact(format!(
                "a {loops}-iteration loop and a {bytes}-byte REP STOSB counted {counted} instructions, the model says {want}"
            )));
        }
    }
    // On a loaded host the kicking thread may not get to run inside the
    // few milliseconds the program takes: try a few times.
    let mut kicked_run = run_counted(kvm, LOOPS[1], REP_BYTES[1], true)?;
    for _ in 0..4 {
        if kicked_run.1 > 0 {
            break;
        }
        kicked_run = run_counted(kvm, LOOPS[1], REP_BYTES[1], true)?;
    }
    let (kicked, kicks) = kicked_run;
    let (plain, _) = run_counted(kvm, LOOPS[1], REP_BYTES[1], false)?;
    if kicked != plain {
        return Err(PositionError::Inexact(format!(
            "with {kicks} kicks the program counted {kicked}, without {plain}"
        )));
    }
    if kicks == 0 {
        return Err(PositionError::Inexact(
            "no kick landed inside the program (it ran too fast to check)".into(),
        ));
    }
    Ok(Calibration {
        counted: plain,
        kicks,
    })
}

/// Runs the calibration program once in a new VM; `kicked`: another thread
/// kicks the vCPU every few tens of microseconds. The count, and the kicks
/// that interrupted the guest.
fn run_counted(
    kvm: &Kvm,
    loops: u16,
    bytes: u16,
    kicked: bool,
) -> Result<(u64, u64), PositionError> {
    let mut scratch = ScratchVm::new(kvm, &program(loops, bytes))?;
    let vcpu = &mut scratch.vcpu;
    let counter = InsnStat::open(vcpu)?;
    let kicker = Kicker::default();
    let target = VcpuKickTarget::install(vcpu.get_kvm_run(), &kicker)
        .map_err(|e| PositionError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kicking = kicked.then(|| {
        let (kicker, done) = (kicker.clone(), done.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                kicker.kick();
                n += 1;
                // 20–80 µs apart, varied so kicks land all over the program.
                std::thread::sleep(Duration::from_micros(20 + (n * 37) % 60));
            }
        })
    });
    let start = counter.read()?;
    let outcome = run_to_out(vcpu);
    done.store(true, std::sync::atomic::Ordering::Release);
    if let Some(t) = kicking {
        let _ = t.join();
    }
    let counted = counter.read()?.wrapping_sub(start);
    let interrupted = outcome?;
    drop(target);
    Ok((counted, interrupted))
}

/// A VM of 64 KiB with one real-mode vCPU at 0x1000. Field order is drop
/// order, as in `Vm`: the vCPU, the VM, then its memory.
struct ScratchVm {
    vcpu: VcpuFd,
    _vm: kvm_ioctls::VmFd,
    _memory: tandem_devices::GuestMemoryMmap,
}

impl ScratchVm {
    /// Loads `code` at 0x1000 and points the vCPU at it.
    fn new(kvm: &Kvm, code: &[u8]) -> Result<Self, PositionError> {
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let memory =
            create_memory(&vm, 64 << 10).map_err(|e| PositionError::Inexact(e.to_string()))?;
        let scratch = Self {
            vcpu,
            _vm: vm,
            _memory: memory,
        };
        scratch
            ._memory
            .write_slice(code, GuestAddress(0x1000))
            .map_err(|e| PositionError::Inexact(format!("writing the calibration program: {e}")))?;
        let mut sregs = scratch.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        scratch
            .vcpu
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        };
        scratch
            .vcpu
            .set_regs(&regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(scratch)
    }
}

/// Runs until the program's OUT to 0xf4; the times KVM_RUN was interrupted.
fn run_to_out(vcpu: &mut VcpuFd) -> Result<u64, PositionError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut interrupted = 0;
    loop {
        if Instant::now() > deadline {
            return Err(PositionError::Inexact(
                "the calibration program did not finish in 20 s".into(),
            ));
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0xf4, _)) => return Ok(interrupted),
            Ok(VcpuExit::Intr) => interrupted += 1,
            Ok(other) => {
                return Err(PositionError::Inexact(format!(
                    "the calibration program stopped with an unexpected exit ({other:?})"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                interrupted += 1;
                clear_immediate_exit(vcpu, VcpuKickTarget::kicks());
            }
            Err(e) => return Err(kvm_err("KVM_RUN")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_counts_rep_passes_at_each_1024_and_one_more() {
        assert_eq!(modelled(0, 1000), 5 + 2);
        assert_eq!(modelled(0, 5000), 5 + 6);
        assert_eq!(modelled(10, 1024), 5 + 20 + 2);
        assert_eq!(modelled(3, 0), 5 + 6 + 1);
    }

    /// The digest is in logs: this value is frozen. If this test fails,
    /// the digest changed and old logs would no longer replay.
    #[test]
    fn the_position_digest_is_frozen() {
        let mut regs = kvm_regs {
            rax: 1,
            rbx: 2,
            rcx: 0x400,
            rsp: 0x8000,
            r15: u64::MAX,
            rip: 0x1234,
            rflags: 0x246 | RFLAGS_RF,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs {
            cr3: 0x9000,
            ..Default::default()
        };
        sregs.cs.l = 1;
        let mut events = kvm_bindings::kvm_vcpu_events::default();
        events.interrupt.shadow = 1;
        let golden = 0x7fa2_3faf_42ff_9852;
        assert_eq!(digest(&regs, &sregs, &events, false), golden);
        // RF, RIP and a TF the VMM set are not part of it.
        regs.rflags &= !RFLAGS_RF;
        regs.rip = 0x5678;
        assert_eq!(digest(&regs, &sregs, &events, false), golden);
        regs.rflags |= RFLAGS_TF;
        assert_eq!(digest(&regs, &sregs, &events, true), golden);
        assert_ne!(digest(&regs, &sregs, &events, false), golden);
        // Every other listed field is.
        regs.rflags &= !RFLAGS_TF;
        events.interrupt.shadow = 0;
        assert_ne!(digest(&regs, &sregs, &events, false), golden);
    }

    #[test]
    fn the_calibration_program_is_what_its_comment_says() {
        let p = program(0x1234, 0x0400);
        assert_eq!(&p[..3], &[0xb9, 0x34, 0x12]);
        assert_eq!(&p[6..9], &[0xb9, 0x00, 0x04]);
        assert_eq!(&p[p.len() - 2..], &[0xe6, 0xf4]);
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    /// kvm_pvm (the development machines' KVM) runs guest code in its
    /// emulator, where `insn_emulation` counts every instruction.
    fn emulating_kvm() -> bool {
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    }

    #[test]
    fn the_counter_counts_the_calibration_program_exactly_where_kvm_emulates() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        if !emulating_kvm() {
            // Elsewhere the self-check must say no, or pass: never panic.
            let plan = choose(&kvm, PositionChoice::Auto).unwrap();
            eprintln!("position counter here: {} ({})", plan.counter, plan.why);
            return;
        }
        setup_kick_signal().unwrap();
        for (loops, bytes) in [(3000u16, 0u16), (3000, 1024), (3000, 2048), (7000, 5000)] {
            let (counted, _) = run_counted(&kvm, loops, bytes, false).unwrap();
            assert_eq!(
                counted,
                modelled(loops, bytes),
                "{loops} loops, {bytes} bytes"
            );
        }
        let c = self_check(&kvm).unwrap();
        assert_eq!(c.counted, modelled(LOOPS[1], REP_BYTES[1]));
        assert!(c.kicks > 0);
        let plan = choose(&kvm, PositionChoice::Auto).unwrap();
        assert_eq!(plan.counter, "kvm-insn-stat", "{}", plan.why);
        assert_eq!(choose(&kvm, PositionChoice::None).unwrap().counter, "none");
    }
}
