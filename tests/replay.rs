//! Record, then replay: the replayed guest prints exactly what the recorded
//! one printed and exits the same way, with no host I/O of its own.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{guest, run_command, run_guest, tandem, Finished};

const LIMIT: Duration = Duration::from_secs(120);
const REPLAY_TRUNCATED: i32 = 122;

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tandem-replay-{}-{name}", std::process::id()))
}

/// The numbers of `tandem replay`'s summary line.
#[derive(Debug)]
struct Summary {
    sync_points: u64,
    epochs: u64,
    divergences: u64,
    repaired: u64,
}

/// Parses the summary and checks nothing else is on stderr but divergence
/// reports.
fn summary(f: &Finished) -> Summary {
    let line = f
        .stderr
        .lines()
        .find(|l| l.starts_with("tandem: replay summary: "))
        .unwrap_or_else(|| panic!("no replay summary: {f:?}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // "S stops, P sync points, E epochs (V verified, T transferred), D divergences (R repaired)"
    assert_eq!(numbers.len(), 7, "{line}");
    Summary {
        sync_points: numbers[1],
        epochs: numbers[2],
        divergences: numbers[5],
        repaired: numbers[6],
    }
}

/// The replay verified every epoch: no divergence, nothing but the summary.
fn assert_verified(f: &Finished) -> Summary {
    let s = summary(f);
    assert_eq!(s.divergences, 0, "{f:?}");
    assert_eq!(f.stderr.lines().count(), 1, "{f:?}");
    s
}

fn replay(log: &PathBuf, extra: &[&str]) -> Finished {
    let mut cmd = tandem();
    cmd.arg("replay").arg(log).args(extra);
    run_command(cmd, None, LIMIT)
}

/// Records `name` with `args`, replays it, and checks both runs agree.
fn record_and_replay(name: &str, args: &[&str]) -> (Finished, Finished) {
    let log = temp(&format!("{name}.log"));
    let log_arg = log.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--record", &log_arg]);
    let recorded = run_guest(name, &all, None, LIMIT);
    assert!(recorded.stderr.is_empty(), "{name} recording: {recorded:?}");
    let replayed = replay(&log, &[]);
    assert_eq!(
        replayed.stdout, recorded.stdout,
        "{name}: replayed console differs"
    );
    assert_eq!(replayed.status, recorded.status, "{name}: {replayed:?}");
    assert_verified(&replayed);
    let _ = std::fs::remove_file(log);
    (recorded, replayed)
}

#[test]
fn hello_replays() {
    let (r, _) = record_and_replay("hello", &[]);
    assert_eq!(r.stdout, "hello from tandem\n");
}

#[test]
fn compute_replays_through_sync_points() {
    // At 1 kHz the exit-free hash loop is cut by a kick (a sync point) at
    // every timer deadline.
    let (r, replayed) = record_and_replay("compute", &["--cmdline", "size=16384 rounds=2 hz=1000"]);
    assert!(r.stdout.contains("hash=0xafc65f4c2bf98d10"), "{r:?}");
    assert!(summary(&replayed).epochs > 10, "{replayed:?}");
}

/// The `ticks=N` compute printed.
fn ticks(f: &Finished) -> u64 {
    f.stdout
        .rsplit("ticks=")
        .next()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ticks in {f:?}"))
}

#[test]
fn a_short_sync_interval_before_the_guest_starts_its_timer_keeps_its_ticks() {
    // The first interval sync point comes before the guest programs its
    // PIT: the interval's kick must still come again, and the PIT's after
    // it (the guest once saw no tick at all: the timer took the overdue
    // sync deadline, set again, for the one it had fired).
    let (r, replayed) = record_and_replay(
        "compute",
        &[
            "--cmdline",
            "size=16384 rounds=2 hz=1000",
            "--sync-interval",
            "20",
            "--irq-defer",
            "0",
        ],
    );
    assert!(ticks(&r) > 50, "{r:?}");
    assert!(summary(&replayed).sync_points > 5, "{replayed:?}");
}

#[test]
fn with_irq_defer_timer_interrupts_wait_for_the_guests_own_exits() {
    // piostorm with spin=300 exits about every 1.5 ms, interrupts on: at
    // 1 kHz nearly every tick would be a kick, each a sync point (3209
    // sync points for 3503 ticks in a run of n=2000 without deferral).
    // With a 20 ms deferral the ticks are injected at the guest's own
    // exits, and the replay still reproduces them.
    let (r, replayed) = record_and_replay(
        "piostorm",
        &[
            "--cmdline",
            "n=1000 hz=1000 spin=300",
            "--irq-defer",
            "20000",
        ],
    );
    let ticks = ticks(&r);
    assert!(ticks > 300, "{r:?}");
    let s = summary(&replayed);
    assert!(
        s.sync_points * 10 < ticks,
        "{} sync points for {ticks} ticks: {replayed:?}",
        s.sync_points
    );
}

#[test]
fn piostorm_replays() {
    record_and_replay("piostorm", &["--cmdline", "n=20000"]);
}

#[test]
fn ticker_replay_reproduces_the_recorded_time_not_the_live_one() {
    // The checksum folds in RTC and PIT reads. Record with the RTC set to
    // 2001-09-09 (a known offset from now): a live run now gives another
    // checksum, and the replay gives the recorded one.
    let log = temp("ticker.log");
    let log_arg = log.display().to_string();
    let recorded = run_guest(
        "ticker",
        &["--rtc-base", "1000000000", "--record", &log_arg],
        None,
        LIMIT,
    );
    assert_eq!(recorded.status, 0, "{recorded:?}");
    let live = run_guest("ticker", &[], None, LIMIT);
    assert_ne!(
        live.stdout, recorded.stdout,
        "a live run matched the recording by chance"
    );
    let replayed = replay(&log, &[]);
    assert_eq!(replayed.status, 0, "{replayed:?}");
    assert_eq!(replayed.stdout, recorded.stdout);
    assert!(assert_verified(&replayed).epochs > 50, "{replayed:?}");
    // Replay never waits for host time: 2000 ticks take ~2 s live.
    assert!(
        replayed.wall < recorded.wall,
        "{:?} vs {:?}",
        replayed.wall,
        recorded.wall
    );
    let _ = std::fs::remove_file(log);
}

#[test]
fn serial_input_is_replayed_from_the_log() {
    let log = temp("echo.log");
    let log_arg = log.display().to_string();
    let recorded = run_guest(
        "echo",
        &["--record", &log_arg],
        Some(b"recorded words\nquit\n"),
        LIMIT,
    );
    assert_eq!(recorded.status, 0, "{recorded:?}");
    assert!(recorded.stdout.contains("echo: recorded words"));
    // Replay reads no stdin: its input comes from the log.
    let replayed = replay(&log, &[]);
    assert_eq!(replayed.stdout, recorded.stdout);
    assert_eq!(replayed.status, 0);
    assert_verified(&replayed);
    let _ = std::fs::remove_file(log);
}

#[test]
fn diskseq_replays_without_touching_the_disk() {
    let image = temp("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let disk = image.display().to_string();
    let log = temp("diskseq.log");
    let log_arg = log.display().to_string();
    let recorded = run_guest(
        "diskseq",
        &[
            "--disk",
            &disk,
            "--cmdline",
            "count=64",
            "--record",
            &log_arg,
        ],
        None,
        LIMIT,
    );
    assert_eq!(recorded.status, 0, "{recorded:?}");
    // The replay gets its read data from the log: the image can go.
    std::fs::remove_file(&image).unwrap();
    let replayed = replay(&log, &[]);
    assert_eq!(replayed.stdout, recorded.stdout);
    assert_eq!(replayed.status, 0, "{replayed:?}");
    assert_verified(&replayed);
    let _ = std::fs::remove_file(log);
}

#[test]
fn a_torn_log_replays_to_its_last_watermark_with_a_warning() {
    let log = temp("torn.log");
    let log_arg = log.display().to_string();
    let recorded = run_guest("ticker", &["--record", &log_arg], None, LIMIT);
    assert_eq!(recorded.status, 0);
    let bytes = std::fs::read(&log).unwrap();
    // Cut the log in the middle (a recorder killed mid-write).
    std::fs::write(&log, &bytes[..bytes.len() / 2 + 3]).unwrap();
    let replayed = replay(&log, &[]);
    assert_eq!(replayed.status, REPLAY_TRUNCATED, "{replayed:?}");
    assert!(replayed.stderr.contains("cut short"), "{replayed:?}");
    assert!(!replayed.stderr.contains("panicked"));
    assert!(
        !replayed.stdout.contains("ticks=2000"),
        "replayed past the cut"
    );
    let _ = std::fs::remove_file(log);
}

#[test]
fn a_corrupt_or_foreign_log_is_refused_with_one_line() {
    let log = temp("corrupt.log");
    let log_arg = log.display().to_string();
    assert_eq!(
        run_guest("hello", &["--record", &log_arg], None, LIMIT).status,
        0
    );
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x40;
    std::fs::write(&log, &bytes).unwrap();
    let f = replay(&log, &[]);
    common::assert_clean_error(&f, 3, "corrupt log at byte");

    std::fs::write(&log, b"definitely not a log").unwrap();
    let f = replay(&log, &[]);
    common::assert_clean_error(&f, 3, "not a tandem log");

    // A log of one guest refuses another guest's image.
    assert_eq!(
        run_guest("hello", &["--record", &log_arg], None, LIMIT).status,
        0
    );
    let ticker = guest("ticker").display().to_string();
    let f = replay(&log, &["--kernel", &ticker]);
    common::assert_clean_error(&f, 3, "not the one the log recorded");
    let _ = std::fs::remove_file(log);
}

/// The first epoch a replay reports as diverged.
fn first_divergence(f: &Finished) -> u64 {
    let line = f
        .stderr
        .lines()
        .find(|l| l.starts_with("tandem: divergences at epochs "))
        .unwrap_or_else(|| panic!("no divergence reported: {f:?}"));
    line["tandem: divergences at epochs ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn rdtsc_divergence_is_detected_at_its_epoch_and_repaired() {
    // RDTSC cannot be trapped: the replay reads other values, so its memory
    // differs from the recording's until a sync point repairs it.
    let log = temp("rdtsc.log");
    let log_arg = log.display().to_string();
    // Few timer ticks (so few kick-induced sync points) and short epochs:
    // epochs end between an RDTSC and the next sync point.
    let recorded = run_guest(
        "rdtsc",
        &[
            "--cmdline",
            "hz=20",
            "--epoch-ms",
            "2",
            "--record",
            &log_arg,
        ],
        None,
        LIMIT,
    );
    assert_eq!(recorded.status, 0, "{recorded:?}");

    // Without repair: the divergence is reported, naming the epoch and what
    // differs, and the dump file is written.
    let unrepaired = replay(&log, &["--no-repair"]);
    let epoch = first_divergence(&unrepaired);
    assert!(unrepaired.stderr.contains("mem@"), "{unrepaired:?}");
    let dump = PathBuf::from(format!("{}.divergence.txt", log.display()));
    let text = std::fs::read_to_string(&dump).unwrap();
    assert!(text.starts_with(&format!("epoch {epoch} stop ")), "{text}");
    assert!(
        text.contains("recorded") && text.contains("replayed"),
        "{text}"
    );

    // With repair (the default): the same epoch is found first, every
    // divergence is repaired, and the output is the recording's.
    let repaired = replay(&log, &[]);
    assert_eq!(first_divergence(&repaired), epoch, "{repaired:?}");
    let s = summary(&repaired);
    assert!(s.divergences >= 1 && s.repaired == s.divergences, "{s:?}");
    assert_eq!(repaired.status, 0, "{repaired:?}");
    assert_eq!(repaired.stdout, recorded.stdout);
    let _ = std::fs::remove_file(dump);
    let _ = std::fs::remove_file(log);
}

#[test]
fn a_crash_looping_guest_is_rebooted_three_times_then_halted_and_replays_so() {
    // `triple` triple-faults on every boot: with `--on-guest-crash reboot`
    // tandem reboots it from its boot state three times, then (a crash
    // loop) ends the run with the crash. The replay reboots at the same
    // stops because the log says so.
    let log = temp("triple-reboot.log");
    let log_arg = log.display().to_string();
    let recorded = run_guest(
        "triple",
        &["--on-guest-crash", "reboot", "--record", &log_arg],
        None,
        LIMIT,
    );
    assert_eq!(
        recorded.stdout.matches("triple: faulting").count(),
        4,
        "{recorded:?}"
    );
    assert_eq!(recorded.status, 120, "{recorded:?}");
    assert!(
        recorded.stderr.contains("guest triple-faulted"),
        "{recorded:?}"
    );
    let replayed = replay(&log, &[]);
    assert_eq!(replayed.stdout, recorded.stdout, "{replayed:?}");
    assert_eq!(replayed.status, recorded.status, "{replayed:?}");
    assert_eq!(summary(&replayed).divergences, 0, "{replayed:?}");
    // Without the option the first crash ends the run.
    let halted = run_guest("triple", &[], None, LIMIT);
    assert_eq!(halted.stdout.matches("triple: faulting").count(), 1);
    let _ = std::fs::remove_file(log);
}

#[test]
fn restart_checkpoint_rolls_back_then_reboots_a_crash_loop_and_replays_so() {
    // Under restart-checkpoint each triple fault first rolls the guest back
    // to a checkpoint (where it faults again: the bug is not timing), then
    // reboots it, until the crash loop ends the run. The replay takes the
    // same checkpoints and rolls back at the same stops from the log.
    let log = temp("triple-checkpoint.log");
    let log_arg = log.display().to_string();
    let recorded = run_guest(
        "triple",
        &[
            "--on-guest-crash",
            "restart-checkpoint",
            "--record",
            &log_arg,
        ],
        None,
        LIMIT,
    );
    assert_eq!(recorded.status, 120, "{recorded:?}");
    assert!(
        recorded
            .stderr
            .contains("rolled back to the checkpoint at stop")
            && recorded
                .stderr
                .contains("rebooting the guest from its boot state")
            && recorded.stderr.contains("not rebooting again"),
        "{recorded:?}"
    );
    let replayed = replay(&log, &[]);
    assert_eq!(replayed.stdout, recorded.stdout, "{replayed:?}");
    assert_eq!(replayed.status, recorded.status, "{replayed:?}");
    assert_eq!(summary(&replayed).divergences, 0, "{replayed:?}");
    let _ = std::fs::remove_file(log);

    // Output waits for checkpoints; a guest that exits still says all.
    let hello = run_guest(
        "hello",
        &["--on-guest-crash", "restart-checkpoint"],
        None,
        LIMIT,
    );
    assert_eq!(hello.status, 0, "{hello:?}");
    assert!(hello.stdout.contains("hello from tandem"), "{hello:?}");
}
