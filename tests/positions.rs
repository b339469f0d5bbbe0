//! Positioned stops: with a position counter, a recording logs where each
//! kick interrupted the guest instead of its state, and the replay executes
//! to exactly that point, so every epoch is verified by execution, none
//! transferred. Skips (saying why) where the counter's self-check fails.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::pair::{
    assert_counter_invariants, serve, start_topology, status, status_figure, topology_with,
};
use common::{run_command, run_guest, tandem, Finished};

const LIMIT: Duration = Duration::from_secs(180);
/// `--sync-interval` (ms) long enough that no test run takes an interval
/// sync point: any sync point left is one positions failed to replace.
const NO_INTERVAL_SYNC: &str = "600000";

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tandem-positions-{}-{name}", std::process::id()))
}

/// Why this host cannot run these tests (None: it can).
fn skip_reason() -> Option<String> {
    let mut cmd = tandem();
    cmd.args([
        "run",
        "--kernel",
        "/nonexistent",
        "--position",
        "kvm-insn-stat",
    ]);
    let f = run_command(cmd, None, LIMIT);
    (f.stderr.contains("kvm-insn-stat") && !f.stderr.contains("/nonexistent"))
        .then(|| f.stderr.trim().to_string())
}

/// The numbers of the replay's summary and landing lines.
#[derive(Debug)]
struct Replayed {
    sync_points: u64,
    epochs: u64,
    verified: u64,
    transferred: u64,
    divergences: u64,
    positioned: u64,
}

fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn replayed(f: &Finished) -> Replayed {
    let line = f
        .stderr
        .lines()
        .find(|l| l.starts_with("tandem: replay summary: "))
        .unwrap_or_else(|| panic!("no replay summary: {f:?}"));
    let n = numbers(line);
    assert_eq!(n.len(), 7, "{line}");
    let positioned = f
        .stderr
        .lines()
        .find(|l| l.contains("positioned stops landed"))
        .map_or(0, |l| numbers(l)[0]);
    Replayed {
        sync_points: n[1],
        epochs: n[2],
        verified: n[3],
        transferred: n[4],
        divergences: n[5],
        positioned,
    }
}

/// Records `name` with positions on, replays it, and checks the replay
/// matched the recording with every epoch verified and none transferred.
fn record_and_replay(name: &str, tag: &str, args: &[&str]) -> Option<Replayed> {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: the position counter cannot be used here: {why}");
        return None;
    }
    let log = temp(&format!("{name}-{tag}.log"));
    let log_arg = log.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--record", &log_arg, "--position", "kvm-insn-stat"]);
    all.extend(["--sync-interval", NO_INTERVAL_SYNC]);
    let recorded = run_guest(name, &all, None, LIMIT);
    assert!(recorded.stderr.is_empty(), "{name} recording: {recorded:?}");
    let mut cmd = tandem();
    cmd.arg("replay").arg(&log);
    let replay = run_command(cmd, None, LIMIT);
    assert_eq!(
        replay.stdout, recorded.stdout,
        "{name}: replayed console: {replay:?}"
    );
    assert_eq!(replay.status, recorded.status, "{name}: {replay:?}");
    let r = replayed(&replay);
    assert_eq!(r.divergences, 0, "{name}: {replay:?}");
    assert_eq!(
        r.sync_points, 0,
        "{name}: a kick became a sync point: {replay:?}"
    );
    assert_eq!(r.transferred, 0, "{name}: {replay:?}");
    assert_eq!(r.verified, r.epochs, "{name}: {replay:?}");
    let _ = std::fs::remove_file(log);
    Some(r)
}

#[test]
fn compute_at_100_hz_replays_every_epoch_verified_by_execution() {
    let Some(r) = record_and_replay(
        "compute",
        "100hz",
        &["--cmdline", "size=16384 rounds=2 hz=100"],
    ) else {
        return;
    };
    // Without positions each of these was a sync point.
    assert!(r.positioned >= 40, "{r:?}");
    assert!(r.epochs > 10, "{r:?}");
}

#[test]
fn compute_at_1_khz_replays_every_epoch_verified_by_execution() {
    let Some(r) = record_and_replay(
        "compute",
        "1khz",
        &["--cmdline", "size=16384 rounds=2 hz=1000"],
    ) else {
        return;
    };
    assert!(r.positioned >= 300, "{r:?}");
}

#[test]
fn ticker_and_piostorm_replay_verified_with_positions_on() {
    if record_and_replay("ticker", "", &[]).is_none() {
        return;
    }
    record_and_replay("piostorm", "", &["--cmdline", "n=20000"]);
}

#[test]
fn diskseq_replays_verified_with_positions_on() {
    let image = temp("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let disk = image.display().to_string();
    record_and_replay("diskseq", "", &["--disk", &disk, "--cmdline", "count=64"]);
    let _ = std::fs::remove_file(image);
}

#[test]
fn a_landing_one_instruction_late_is_a_divergence_at_that_stop() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: the position counter cannot be used here: {why}");
        return;
    }
    let log = temp("late.log");
    let log_arg = log.display().to_string();
    let recorded = run_guest(
        "compute",
        &[
            "--cmdline",
            "size=16384 rounds=1 hz=100",
            "--record",
            &log_arg,
            "--position",
            "kvm-insn-stat",
        ],
        None,
        LIMIT,
    );
    assert_eq!(recorded.status, 0, "{recorded:?}");
    let mut cmd = tandem();
    cmd.arg("replay")
        .arg(&log)
        .env("TANDEM_TEST_LAND_LATE", "1");
    let late = run_command(cmd, None, LIMIT);
    assert_eq!(late.status, 121, "{late:?}");
    assert!(
        late.stderr.contains("replay diverged at stop")
            && late
                .stderr
                .contains("positioned stop: at the recorded count"),
        "{late:?}"
    );
    assert!(!late.stderr.contains("panicked"), "{late:?}");
    // The same log lands exactly without the hook.
    let mut cmd = tandem();
    cmd.arg("replay").arg(&log);
    let exact = run_command(cmd, None, LIMIT);
    assert_eq!(exact.status, 0, "{exact:?}");
    assert_eq!(exact.stdout, recorded.stdout);
    let _ = std::fs::remove_file(log);
}

#[test]
fn a_pair_with_positions_verifies_by_execution_and_fails_over_after_kill_9() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: the position counter cannot be used here: {why}");
        return;
    }
    let mut p = start_topology(topology_with(
        "pos1",
        1500,
        "received",
        "",
        "position = \"kvm-insn-stat\"",
    ));
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    // netecho under client traffic: its timer and frames interrupt it.
    let (next, first) = serve(&s, 0, 40, Duration::from_secs(60), &mut replies);
    assert!(first.is_some(), "{}", p.primary.stderr());
    let line = status(&p.t, "b").unwrap_or_default();
    eprintln!("secondary status: {line}");
    let figure = |name| status_figure(&line, name);
    assert!(figure("positioned_stops") > 20, "{line}");
    assert!(figure("epochs_verified") > 20, "{line}");
    assert_eq!(figure("epochs_transferred"), 0, "{line}");
    assert_eq!(figure("divergences"), 0, "{line}");
    let _ = p.primary.child.kill(); // SIGKILL
    let (_, after) = serve(&s, next, 20, Duration::from_secs(60), &mut replies);
    assert!(
        after.is_some(),
        "no reply after the failover: {}",
        p.secondary.stderr()
    );
    assert_counter_invariants(&replies, next);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}
