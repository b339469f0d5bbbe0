//! Boots every test guest under real KVM with the real `tandem` binary and
//! checks its console output and exit status.

mod common;

use std::time::Duration;

use common::{compute_hash, run_guest, Finished};

const LIMIT: Duration = Duration::from_secs(120);

fn assert_ok(f: &Finished) {
    assert_eq!(f.status, 0, "{f:?}");
    assert!(f.stderr.is_empty(), "unexpected stderr: {}", f.stderr);
}

#[test]
fn hello_prints_and_exits_zero() {
    let f = run_guest("hello", &[], None, LIMIT);
    assert_ok(&f);
    assert_eq!(f.stdout, "hello from tandem\n");
}

#[test]
fn ticker_takes_exactly_2000_timer_interrupts_without_spinning() {
    let f = run_guest("ticker", &["--mem", "32M"], None, LIMIT);
    assert_ok(&f);
    let line = f.stdout.lines().last().unwrap_or_default();
    assert!(line.starts_with("ticks=2000 checksum=0x"), "{f:?}");
    // 2000 ticks at 1 kHz take about two seconds of guest time, which is
    // host time while live: far less would mean time runs too fast.
    assert!(f.wall >= Duration::from_millis(1900), "{f:?}");
    // HLT sleeps until the next deadline: the VMM must not burn a core
    // while the guest is idle.
    assert!(
        f.cpu < f.wall / 2,
        "tandem used {:?} CPU in {:?}: HLT is spinning",
        f.cpu,
        f.wall
    );
}

#[test]
fn compute_runs_long_mode_and_gets_timer_interrupts_in_exit_free_code() {
    let (size, rounds) = (32768, 3);
    let cmdline = format!("size={size} rounds={rounds} hz=1000");
    let f = run_guest("compute", &["--cmdline", &cmdline], None, LIMIT);
    assert_ok(&f);
    let want = format!(
        "compute: size={size} rounds={rounds} hash={:#018x} ticks=",
        compute_hash(size, rounds)
    );
    let line = f.stdout.lines().last().unwrap_or_default();
    assert!(line.starts_with(&want), "got {line:?}, want {want:?}...");
    // The hash loop makes no exits: only kicks at PIT deadlines can deliver
    // these ticks.
    let ticks: u64 = line.rsplit('=').next().unwrap().parse().unwrap();
    assert!(
        ticks > 10,
        "only {ticks} timer interrupts reached exit-free code"
    );
}

/// The `piostorm` checksum, as documented in guest-images/piostorm.c.
fn piostorm_sum(n: u32) -> u32 {
    (0..n).fold(0x811c_9dc5u32, |sum, i| {
        let v = i.wrapping_mul(0x9e37_79b1).wrapping_add(0x1234_5678);
        (sum ^ v).wrapping_mul(0x0100_0193)
    })
}

#[test]
fn piostorm_round_trips_every_port_access() {
    let n = 50_000;
    let f = run_guest("piostorm", &["--cmdline", &format!("n={n}")], None, LIMIT);
    assert_ok(&f);
    assert_eq!(
        f.stdout.lines().last(),
        Some(format!("piostorm: n={n} sum={:#010x}", piostorm_sum(n)).as_str())
    );
}

#[test]
fn stdin_reaches_the_guest_uart_through_its_interrupt() {
    let input = b"hello tandem\nquit\n";
    let f = run_guest("echo", &[], Some(input), LIMIT);
    assert_ok(&f);
    assert_eq!(f.stdout, "echo: ready\necho: hello tandem\necho: bye\n");
}

#[test]
fn serial_output_can_go_to_a_file() {
    let path = std::env::temp_dir().join(format!("tandem-serial-{}.txt", std::process::id()));
    let serial = format!("file:{}", path.display());
    let f = run_guest("hello", &["--serial", &serial], None, LIMIT);
    assert_ok(&f);
    assert_eq!(f.stdout, "");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "hello from tandem\n"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_faulting_guest_reports_its_exception_and_exits_nonzero() {
    let f = run_guest("divzero", &[], None, LIMIT);
    assert!(f.stdout.contains("exception 0"), "{f:?}");
    assert_ne!(f.status, 0, "{f:?}");
    assert!(f.stderr.is_empty(), "{f:?}");
}

#[test]
fn triple_fault_is_a_guest_crash_with_one_line() {
    let f = run_guest("triple", &[], None, LIMIT);
    assert!(f.stdout.contains("triple: faulting"), "{f:?}");
    common::assert_clean_error(&f, 120, "guest triple-faulted");
}

#[test]
fn a_guest_that_jumps_to_garbage_is_stopped_not_hung() {
    let f = run_guest("badjump", &[], None, LIMIT);
    assert!(f.stdout.contains("badjump: jumping"), "{f:?}");
    assert_eq!(f.status, 120, "{f:?}");
    common::assert_clean_error(&f, 120, "guest");
}
