//! Verified lockstep: epoch hashes (DESIGN point 10).
//!
//! An epoch ends at the first deterministic stop after the recorder's epoch
//! timer fired. There, after completing the pending exit, both sides hash a
//! *canonical* state: each vCPU part (never the TSC, never host-specific
//! fields), each device model's state, the pages the recorder dirtied in the
//! epoch (grouped by 2 MiB of guest memory), and a rotating scrub slice of
//! all memory. The recorder logs `EpochEnd`; the replayer recomputes the
//! same hashes at the same stop and names every component that differs. A
//! page the replayer dirtied that is not on the recorder's list is a
//! divergence too.

use std::collections::{BTreeMap, BTreeSet};

use tandem_devices::GuestMemoryMmap;
use tandem_replay::log::{Scrub, VcpuState, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Pages per scrub slice.
pub const SCRUB_PAGES: u32 = 64;
/// Pages per memory hash group (2 MiB).
const GROUP_PAGES: u64 = 512;

/// The hashes of one epoch end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochHashes {
    /// (component, hash), in a fixed order.
    pub components: Vec<(String, u64)>,
    /// The scrub slice.
    pub scrub: Scrub,
}

/// Run-length encodes ascending guest frame numbers.
pub fn encode_runs(gfns: &[u64]) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for &gfn in gfns {
        match runs.last_mut() {
            Some((first, len)) if *first + u64::from(*len) == gfn && *len < u32::MAX => *len += 1,
            _ => runs.push((gfn, 1)),
        }
    }
    runs
}

/// Expands runs back into frame numbers (bounded by `max_pages`, so a
/// hostile log cannot make us allocate without limit).
pub fn decode_runs(runs: &[(u64, u32)], max_pages: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for &(first, len) in runs {
        for gfn in first..first.saturating_add(u64::from(len)) {
            if gfn >= max_pages {
                break;
            }
            out.push(gfn);
        }
    }
    out
}

/// Reads page `gfn` of `memory` into `buf`.
pub(crate) fn page(memory: &GuestMemoryMmap, gfn: u64, buf: &mut [u8]) {
    // A page outside memory (only from a damaged log) hashes as zeros.
    if memory
        .read_slice(buf, GuestAddress(gfn * PAGE_SIZE as u64))
        .is_err()
    {
        buf.fill(0);
    }
}

/// Pages of guest memory, all regions together.
pub(crate) fn memory_pages(memory: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory.iter().map(|r| r.len() / PAGE_SIZE as u64).sum()
}

/// Hashes the canonical state at an epoch end.
pub fn hash_state(
    vcpu: &VcpuState,
    devices: &[(String, Vec<u8>)],
    memory: &GuestMemoryMmap,
    dirtied: &[u64],
    epoch: u64,
    mem_pages: u64,
) -> EpochHashes {
    let mut components = vec![
        ("vcpu.regs".to_string(), xxh3_64(&vcpu.regs)),
        ("vcpu.sregs".to_string(), xxh3_64(&vcpu.sregs)),
        ("vcpu.fpu".to_string(), xxh3_64(&vcpu.fpu)),
        (
            "vcpu.events".to_string(),
            xxh3_64(&crate::state::canonical_events_bytes(&vcpu.events)),
        ),
        ("vcpu.msrs".to_string(), {
            let mut h = Xxh3::new();
            for (index, value) in &vcpu.msrs {
                h.update(&index.to_le_bytes());
                h.update(&value.to_le_bytes());
            }
            h.digest()
        }),
    ];
    components.extend(
        devices
            .iter()
            .map(|(name, bytes)| (format!("dev.{name}"), xxh3_64(bytes))),
    );
    let mut groups: BTreeMap<u64, Xxh3> = BTreeMap::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    for &gfn in dirtied {
        page(memory, gfn, &mut buf);
        let h = groups.entry(gfn / GROUP_PAGES).or_default();
        h.update(&gfn.to_le_bytes());
        h.update(&buf);
    }
    for (group, h) in groups {
        let base = group * GROUP_PAGES * PAGE_SIZE as u64;
        components.push((format!("mem@{base:#x}"), h.digest()));
    }
    let first_gfn = (epoch * u64::from(SCRUB_PAGES)) % mem_pages.max(1);
    let count = SCRUB_PAGES.min(u32::try_from(mem_pages - first_gfn).unwrap_or(SCRUB_PAGES));
    let mut h = Xxh3::new();
    for gfn in first_gfn..first_gfn + u64::from(count) {
        page(memory, gfn, &mut buf);
        h.update(&buf);
    }
    EpochHashes {
        components,
        scrub: Scrub {
            first_gfn,
            count,
            hash: h.digest(),
        },
    }
}

/// What differs between a recorded and a replayed epoch end.
pub fn differences(
    recorded: &[(String, u64)],
    recorded_scrub: &Scrub,
    ours: &EpochHashes,
) -> Vec<String> {
    let theirs: BTreeMap<&str, u64> = recorded.iter().map(|(n, h)| (n.as_str(), *h)).collect();
    let mine: BTreeMap<&str, u64> = ours
        .components
        .iter()
        .map(|(n, h)| (n.as_str(), *h))
        .collect();
    let names: BTreeSet<&str> = theirs.keys().chain(mine.keys()).copied().collect();
    let mut out: Vec<String> = names
        .into_iter()
        .filter(|n| theirs.get(n) != mine.get(n))
        .map(str::to_string)
        .collect();
    if *recorded_scrub != ours.scrub {
        out.push(format!(
            "scrub of pages {:#x}..{:#x}",
            recorded_scrub.first_gfn,
            recorded_scrub.first_gfn + u64::from(recorded_scrub.count)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_and_are_bounded() {
        let gfns = [1, 2, 3, 7, 9, 10];
        let runs = encode_runs(&gfns);
        assert_eq!(runs, vec![(1, 3), (7, 1), (9, 2)]);
        assert_eq!(decode_runs(&runs, 100), gfns.to_vec());
        assert_eq!(decode_runs(&[(5, u32::MAX)], 8), vec![5, 6, 7]);
    }

    #[test]
    fn hashes_name_what_differs() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vcpu = VcpuState::default();
        let devs = vec![("pic".to_string(), vec![1, 2, 3])];
        let a = hash_state(&vcpu, &devs, &mem, &[5], 0, 1024);
        mem.write_obj(0xabu8, GuestAddress(5 * 4096)).unwrap();
        let mut vcpu2 = vcpu.clone();
        vcpu2.regs = vec![9];
        let b = hash_state(&vcpu2, &devs, &mem, &[5], 0, 1024);
        assert_eq!(
            differences(&a.components, &a.scrub, &b),
            vec![
                "mem@0x0".to_string(),
                "vcpu.regs".to_string(),
                "scrub of pages 0x0..0x40".to_string()
            ]
        );
        assert!(differences(&a.components, &a.scrub, &a).is_empty());
    }
}
