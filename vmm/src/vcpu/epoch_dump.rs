//! A debugging aid for finding where a replay first departs from its
//! recording, field by field (the epoch hashes only name a component).
//!
//! With `TANDEM_DEBUG_EPOCHS=FILE`, a recording and a replay each write one
//! text block per epoch end: the stop, every vCPU register word, the saved
//! MSRs, each device's state hash, and every page whose *content* changed
//! since the previous epoch end (a page written with the value it already
//! held does not show). The first `TANDEM_DEBUG_EPOCHS_FULL` epoch ends
//! (default 1) hash all of guest memory, so writes the dirty log missed
//! show too; later ones hash the pages the side saw written (a replay: also
//! those the recording listed and those it installed). `diff` of the two
//! files: the first hunk is the first difference. Never on by default.

use std::fs::File;
use std::io::{BufWriter, Write};

use tandem_devices::GuestMemoryMmap;
use tandem_replay::log::{VcpuState, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_64;

/// `kvm_regs` words, in order.
const REG_NAMES: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags",
];

/// The open dump of one run.
pub(super) struct EpochDump {
    out: BufWriter<File>,
    /// `FILE.index`: one line per block, `epoch N stop S HASH`, so that
    /// the blocks that differ are found without reading them.
    index: BufWriter<File>,
    /// Epoch ends that hash all of memory.
    full_epochs: u64,
    /// Epoch ends written so far.
    written: u64,
    /// Each page's hash at the previous epoch end.
    page_hashes: Vec<u64>,
}

impl EpochDump {
    /// The dump `TANDEM_DEBUG_EPOCHS` names, if any (a file that cannot be
    /// created is reported and the run goes on without it).
    pub(super) fn from_env() -> Option<Self> {
        let path = std::env::var_os("TANDEM_DEBUG_EPOCHS")?;
        let full_epochs = std::env::var("TANDEM_DEBUG_EPOCHS_FULL")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let mut index_path = path.clone();
        index_path.push(".index");
        match File::create(&path).and_then(|f| Ok((f, File::create(&index_path)?))) {
            Ok((f, index)) => Some(Self {
                out: BufWriter::new(f),
                index: BufWriter::new(index),
                full_epochs,
                written: 0,
                page_hashes: Vec::new(),
            }),
            Err(e) => {
                tracing::warn!("TANDEM_DEBUG_EPOCHS: cannot create {path:?}: {e}");
                None
            }
        }
    }

    /// One epoch end's block.
    pub(super) fn epoch(
        &mut self,
        epoch: u64,
        stop: u64,
        vcpu: &VcpuState,
        devices: &[(String, Vec<u8>)],
        memory: &GuestMemoryMmap,
        written: &[u64],
    ) {
        let mem_pages = crate::epoch::memory_pages(memory);
        let mut s = format!("epoch {epoch} stop {stop}\n");
        for (i, w) in words(&vcpu.regs).enumerate() {
            let name = REG_NAMES.get(i).copied().unwrap_or("?");
            s.push_str(&format!(" regs.{name} {w:#x}\n"));
        }
        for (part, bytes) in [
            ("sregs", &vcpu.sregs),
            ("fpu", &vcpu.fpu),
            (
                "events",
                &crate::state::canonical_events_bytes(&vcpu.events),
            ),
            ("debugregs", &vcpu.debugregs),
        ] {
            for (i, w) in words(bytes).enumerate() {
                s.push_str(&format!(" {part}[{}] {w:#x}\n", i * 8));
            }
        }
        for (index, value) in &vcpu.msrs {
            s.push_str(&format!(" msr {index:#x} {value:#x}\n"));
        }
        s.push_str(&format!(" halted {}\n", vcpu.halted));
        for (name, bytes) in devices {
            s.push_str(&format!(" dev.{name} {:#x}\n", xxh3_64(bytes)));
        }
        self.page_hashes.resize(mem_pages as usize, 0);
        let full: Vec<u64>;
        let pages = if self.written < self.full_epochs {
            full = (0..mem_pages).collect();
            &full
        } else {
            written
        };
        let mut changed = Vec::new();
        let mut buf = vec![0u8; PAGE_SIZE];
        for &gfn in pages {
            let Some(slot) = self.page_hashes.get_mut(gfn as usize) else {
                continue;
            };
            crate::epoch::page(memory, gfn, &mut buf);
            let h = xxh3_64(&buf);
            if std::mem::replace(slot, h) != h {
                changed.push((gfn, h));
            }
        }
        changed.sort_unstable();
        changed.dedup();
        for (gfn, h) in changed {
            s.push_str(&format!(" page {gfn:#x} {h:#x}\n"));
        }
        self.written += 1;
        let _ = self.out.write_all(s.as_bytes());
        let _ = self.out.flush();
        let _ = writeln!(
            self.index,
            "epoch {epoch} stop {stop} {:#x}",
            xxh3_64(s.as_bytes())
        );
        let _ = self.index.flush();
    }
}

/// `bytes` as little-endian u64 words (a short tail padded with zeros).
fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    })
}
