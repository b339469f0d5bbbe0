//! Guest software crashes in a protected pair (`[ft] on_guest_crash`,
//! default `reboot`): lockstep copies a crash to the secondary, so instead
//! of the pair going down both sides reboot the guest at the same stop,
//! from its boot state and its (replicated) disk, and stay in lockstep.

mod common;

use std::time::{Duration, Instant};

use common::pair::*;

/// A client of the pair `p` that got `count` counter values: its socket,
/// the replies, the next request id and the highest value so far.
fn serving(p: &Pair, count: usize) -> (std::net::UdpSocket, Vec<(u32, u64)>, u32, u64) {
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, count, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "the pair does not serve");
    let before = replies.iter().map(|&(_, v)| v).max().unwrap();
    (s, replies, next, before)
}

/// Every value answered from request `from` on is above `before`: no value
/// the guest persisted before the `what` was handed out again.
fn assert_values_beyond(replies: &[(u32, u64)], from: u32, before: u64, what: &str) {
    assert!(
        replies
            .iter()
            .filter(|(id, _)| *id >= from)
            .all(|&(_, v)| v > before),
        "a value was handed out again after the {what}: {replies:?}"
    );
}

/// The secondary followed through whatever the guest did: kill -9 the
/// primary, and b serves `count` more requests from `next` with the
/// counter's invariants intact.
fn takes_over_after_kill(
    mut p: Pair,
    s: &std::net::UdpSocket,
    next: u32,
    count: usize,
    replies: &mut Vec<(u32, u64)>,
) {
    p.primary.child.kill().unwrap();
    let _ = p.primary.child.wait();
    let (_, took_over) = serve(s, next, count, Duration::from_secs(30), replies);
    assert!(
        took_over.is_some(),
        "b did not take over: {}",
        p.secondary.stderr()
    );
    assert_counter_invariants(replies, next);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn a_crashed_guest_is_rebooted_on_both_sides_and_keeps_its_counter() {
    let p = start_pair("crash", 1500);
    let (s, mut replies, next, before) = serving(&p, 5);

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
    assert_values_beyond(&replies, next, before, "reboot");
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
    takes_over_after_kill(p, &s, next2, 5, &mut replies);
}

#[test]
fn a_hung_guest_is_caught_by_its_watchdog_and_rebooted() {
    // The guest arms its watchdog and spins without petting it: a hang,
    // not a crash the guest reports. Guest time moves at logged stops, so
    // both sides see the expiry at the same stop and reboot there.
    let p = start_pair("hang", 1500);
    let (s, mut replies, next, _) = serving(&p, 3);
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
    takes_over_after_kill(p, &s, next2, 3, &mut replies);
}

/// A pair whose guest crashes are rolled back to checkpoints.
fn checkpoint_pair(tag: &str) -> Pair {
    start_topology(topology_with(
        tag,
        1500,
        "received",
        "",
        "on_guest_crash = \"restart-checkpoint\"",
    ))
}

/// Waits until both sides' status shows `name` at least `min`; returns
/// both lines.
fn wait_both(p: &Pair, name: &str, min: u64) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (a, b) = (
            status(&p.t, "a").unwrap_or_default(),
            status(&p.t, "b").unwrap_or_default(),
        );
        let has = |line: &str| line.contains(name) && status_figure(line, name) >= min;
        if has(&a) && has(&b) {
            return (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "{name} not at least {min} on both sides:\na: {a}\nb: {b}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn boots(p: &Pair) -> usize {
    p.primary
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("netecho: up"))
        .count()
}

#[test]
fn restart_checkpoint_rolls_a_timing_crash_back_without_a_reboot() {
    // The "fragile" request spends 15 ms of guest time in a window where a
    // timer tick crashes the guest: with a 100 Hz timer, one always lands.
    // Rolled back to its newest checkpoint with the tick delayed and the
    // request delivered again, the guest gets through and answers.
    let p = checkpoint_pair("ckpt");
    let (s, mut replies, next, before) = serving(&p, 5);

    let f = p.t.ns.udp_socket("10.78.0.1:0");
    f.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    f.send_to(b"fragile", format!("{GUEST_IP}:9002")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 64];
    loop {
        if let Ok((n, from)) = f.recv_from(&mut buf) {
            if from.port() == 9002 && &buf[..n] == b"fragile" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the fragile request was never answered: {}",
            p.primary.stderr()
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let err = p.primary.stderr();
    assert!(
        err.contains("guest reported a panic (pvpanic)")
            && err.contains("rolled back to the checkpoint at stop"),
        "{err}\n{:?}",
        p.primary.lines.lock().unwrap()
    );
    assert!(!err.contains("rebooting"), "{err}");
    assert_eq!(boots(&p), 1, "the guest was rebooted: {err}");

    // Both sides rolled back, nothing rebooted, the secondary in step.
    let (a, b) = wait_both(&p, "guest_rollbacks", 1);
    assert_eq!(status_figure(&a, "guest_reboots"), 0, "{a}");
    assert_eq!(status_figure(&b, "guest_reboots"), 0, "{b}");
    assert!(status_figure(&a, "checkpoints") > 0, "{a}");
    assert_eq!(status_figure(&b, "divergences"), 0, "{b}");

    // The counter goes on, no value handed out twice.
    let (next2, again) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    assert!(again.is_some(), "not served after the rollback: {err}");
    assert_values_beyond(&replies, next, before, "rollback");
    // The secondary verifies epochs after the rollback too.
    let b_status = || status(&p.t, "b").unwrap_or_default();
    let verified = status_figure(&b_status(), "epochs_verified");
    let deadline = Instant::now() + Duration::from_secs(15);
    while status_figure(&b_status(), "epochs_verified") <= verified {
        assert!(
            Instant::now() < deadline,
            "b verifies no epoch: {}",
            b_status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_figure(&b_status(), "divergences"), 0);

    // And it can take over.
    takes_over_after_kill(p, &s, next2, 5, &mut replies);
}

#[test]
fn restart_checkpoint_reboots_a_guest_that_crashes_every_time() {
    // The "crash" request crashes the guest whatever the timing: each
    // rollback meets it again, so after going back as far as it may the
    // VMM reboots the guest, which continues from its persisted counter.
    let p = checkpoint_pair("ckptloop");
    let (s, mut replies, next, before) = serving(&p, 3);
    s.send_to(b"crash", format!("{GUEST_IP}:9002")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while boots(&p) < 2 {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot again: {}",
            p.primary.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = p.primary.stderr();
    assert!(
        err.contains("rolled back to the checkpoint at stop") && err.contains("rebooting instead"),
        "{err}"
    );
    let (a, b) = wait_both(&p, "guest_reboots", 1);
    assert_eq!(status_figure(&a, "guest_reboots"), 1, "{a}");
    assert!(status_figure(&a, "guest_rollbacks") >= 1, "{a}");
    assert_eq!(
        status_figure(&a, "guest_rollbacks"),
        status_figure(&b, "guest_rollbacks"),
        "a: {a}\nb: {b}"
    );
    assert_eq!(status_figure(&b, "divergences"), 0, "{b}");
    let (next2, again) = serve(&s, next, 3, Duration::from_secs(30), &mut replies);
    assert!(again.is_some(), "not served after the reboot: {err}");
    assert_values_beyond(&replies, next, before, "reboot");
    takes_over_after_kill(p, &s, next2, 3, &mut replies);
}
