//! Failover while the guest spins without exits (issue: a new live side
//! whose guest never ran again). The guests here never sleep in HLT: the
//! spinner busy-waits between timer interrupts, compute hashes memory with
//! its timer running. A fault (kill -USR1 freezes the primary, kill -9 ends
//! it) lands while the guest spins; the new live side must keep injecting
//! its timer, so the spinner's ticks go on and compute finishes with the
//! right hash.
//!
//! `make test` runs each combination (USR1 / kill -9, `received` /
//! `replayed`) `SPIN_REPS` times (default 1); `make chaos` runs 20.
//! `CHAOS_POSITION=auto` (or `kvm-insn-stat`) runs the pairs with that
//! `[ft] position`.

mod common;

use std::time::{Duration, Instant};

use common::compute_hash;
use common::netns::NetNs;
use common::pair::*;

/// How often each combination runs.
fn reps() -> u32 {
    std::env::var("SPIN_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The `[ft]` line `CHAOS_POSITION` asks for ("" without it).
fn position_line() -> String {
    std::env::var("CHAOS_POSITION")
        .ok()
        .filter(|v| !v.is_empty() && v != "none")
        .map(|v| format!("\nposition = \"{v}\""))
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGUSR1: the primary freezes with its sockets open.
    Freeze,
    /// SIGKILL.
    Kill,
}

/// The highest "spinner: tick N" in `lines`.
fn last_tick(lines: &[String]) -> u32 {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("spinner: tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// A little randomness without a crate: the low bits of the clock.
fn jitter_ms(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos) % max
}

fn fault(p: &Proc, fault: Fault) {
    match fault {
        Fault::Freeze => signal(p, libc::SIGUSR1),
        Fault::Kill => signal(p, libc::SIGKILL),
    }
}

/// One failover of a spinning guest; panics with both sides' stderr when
/// the new live side's guest does not make progress.
fn spinner_failover(tag: &str, commit: &str, how: Fault) {
    let ns = NetNs::new(tag);
    let dir = test_dir(tag);
    let config = plain_pair_file(
        &dir,
        "spinner",
        "hz=100 every=10",
        "16M",
        &format!(
            "failover_timeout_ms = 1000\noutput_commit = \"{commit}\"{}",
            position_line()
        ),
    );
    let (_witness, primary, secondary) = spawn_pair(&ns, &dir, &config);
    // Protected and running: output the secondary has acked.
    primary.wait_for_with("spinner: tick 50", Duration::from_secs(60), &secondary);
    // Land anywhere in the guest's spin (it spins all but a few
    // instructions of each 10 ms tick).
    std::thread::sleep(Duration::from_millis(jitter_ms(400)));
    let seen = last_tick(&primary.lines.lock().unwrap());
    fault(&primary, how);
    // Two seconds of guest time beyond what the primary showed: the new
    // live side injects its timer into a guest that never exits.
    let want = seen + 200;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got = last_tick(&secondary.lines.lock().unwrap());
        if got >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: after {how:?} ({commit}) the new live side's guest stopped at tick {got} (primary showed {seen}, want {want})\nsecondary: {}\nprimary: {}",
            secondary.stderr(),
            primary.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        secondary.stderr().contains("going live"),
        "{}",
        secondary.stderr()
    );
    drop(primary);
    drop(secondary);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_spinning_guest_keeps_its_timer_after_every_kind_of_failover() {
    let mut n = 0;
    for rep in 0..reps() {
        for commit in ["received", "replayed"] {
            for how in [Fault::Freeze, Fault::Kill] {
                let started = Instant::now();
                spinner_failover(&format!("spin{n}"), commit, how);
                eprintln!(
                    "spinner rep {rep} {commit} {how:?}: served on after the failover ({} ms)",
                    started.elapsed().as_millis()
                );
                n += 1;
            }
        }
    }
}

/// compute at 100 Hz, CPU-bound from start to end: the fault lands in its
/// hash loop, and the new live side finishes it with the right result.
fn compute_failover(tag: &str, commit: &str, how: Fault) {
    let (size, rounds) = (65536usize, 8u32);
    let ns = NetNs::new(tag);
    let dir = test_dir(tag);
    let config = plain_pair_file(
        &dir,
        "compute",
        &format!("size={size} rounds={rounds} hz=100"),
        "16M",
        &format!(
            "failover_timeout_ms = 1000\noutput_commit = \"{commit}\"{}",
            position_line()
        ),
    );
    let (_witness, primary, secondary) = spawn_pair(&ns, &dir, &config);
    // The secondary attaches (the pair starts it 300 ms after the
    // primary), then the fault lands somewhere in the hash loop.
    std::thread::sleep(Duration::from_millis(2000 + jitter_ms(1500)));
    let finished_first = primary
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("compute:"));
    assert!(
        !finished_first,
        "compute finished before the fault: make it longer"
    );
    fault(&primary, how);
    let want = format!("hash={:#018x}", compute_hash(size, rounds));
    secondary.wait_for("compute:", Duration::from_secs(120));
    let lines = secondary.lines.lock().unwrap().join("\n");
    assert!(lines.contains(&want), "want {want}, got {lines}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cpu_bound_guest_finishes_its_work_after_a_failover() {
    for rep in 0..reps() {
        for commit in ["received", "replayed"] {
            for how in [Fault::Freeze, Fault::Kill] {
                compute_failover(&format!("cmp{rep}{}{how:?}", &commit[..3]), commit, how);
            }
        }
    }
}
