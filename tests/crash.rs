//! Guest software crashes in a protected pair (`[ft] on_guest_crash`,
//! default `reboot`): lockstep copies a crash to the secondary, so instead
//! of the pair going down both sides reboot the guest at the same stop,
//! from its boot state and its (replicated) disk, and stay in lockstep.

mod common;

use std::time::{Duration, Instant};

use common::pair::*;

#[test]
fn a_crashed_guest_is_rebooted_on_both_sides_and_keeps_its_counter() {
    let mut p = start_pair("crash", 1500);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "the pair does not serve");
    let before = replies.iter().map(|&(_, v)| v).max().unwrap();

    // The guest crashes (pvpanic report, then HLT with interrupts off).
    s.send_to(b"crash", format!("{GUEST_IP}:9002")).unwrap();
    p.primary
        .wait_for("netecho: crashing", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(30);
    while p
        .primary
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("netecho: up"))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot again: {}",
            p.primary.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It continues from the value it persisted before the crash.
    let (next2, again) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    assert!(
        again.is_some(),
        "not served after the reboot: {}",
        p.primary.stderr()
    );
    assert!(
        replies
            .iter()
            .filter(|(id, _)| *id >= next)
            .all(|&(_, v)| v > before),
        "a value was handed out again after the reboot: {replies:?}"
    );
    assert!(
        p.primary
            .stderr()
            .contains("guest reported a panic (pvpanic)"),
        "{}",
        p.primary.stderr()
    );
    // Both sides report the crash; the secondary replayed the reboot.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = (
            status(&p.t, "a").unwrap_or_default(),
            status(&p.t, "b").unwrap_or_default(),
        );
        if a.contains("\"guest_crashes\":1") && b.contains("\"guest_crashes\":1") {
            assert_eq!(status_figure(&b, "divergences"), 0, "{b}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "crash not reported on both sides:\na: {a}\nb: {b}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The secondary followed through the reboot: it can take over.
    p.primary.child.kill().unwrap();
    let _ = p.primary.child.wait();
    let (_, took_over) = serve(&s, next2, 5, Duration::from_secs(30), &mut replies);
    assert!(
        took_over.is_some(),
        "b did not take over: {}",
        p.secondary.stderr()
    );
    assert_counter_invariants(&replies, next2);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn a_hung_guest_is_caught_by_its_watchdog_and_rebooted() {
    // The guest arms its watchdog and spins without petting it: a hang,
    // not a crash the guest reports. Guest time moves at logged stops, so
    // both sides see the expiry at the same stop and reboot there.
    let mut p = start_pair("hang", 1500);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 3, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "the pair does not serve");
    s.send_to(b"hang", format!("{GUEST_IP}:9002")).unwrap();
    p.primary
        .wait_for("netecho: hanging", Duration::from_secs(10));
    let (next2, again) = serve(&s, next, 3, Duration::from_secs(30), &mut replies);
    assert!(
        again.is_some(),
        "not served after the hang: {}",
        p.primary.stderr()
    );
    assert!(
        p.primary.stderr().contains("its watchdog expired"),
        "{}",
        p.primary.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status(&p.t, "b")
        .unwrap_or_default()
        .contains("\"guest_crashes\":1")
    {
        assert!(
            Instant::now() < deadline,
            "b did not reboot too: {}",
            p.secondary.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p.primary.child.kill().unwrap();
    let _ = p.primary.child.wait();
    let (_, took_over) = serve(&s, next2, 3, Duration::from_secs(30), &mut replies);
    assert!(
        took_over.is_some(),
        "b did not take over: {}",
        p.secondary.stderr()
    );
    assert_counter_invariants(&replies, next2);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}
