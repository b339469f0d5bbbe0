//! `tandem switchover`: the live side hands the VM to its secondary
//! without loss and without waiting for failure detection (the failover
//! timeout here is 20 s), the old side re-joins, and the VM is handed back.
//! This is the rolling-upgrade path: stop one host's tandem, upgrade,
//! re-join, switch over, repeat on the other.

mod common;

use std::time::{Duration, Instant};

use common::pair::*;

fn switchover(t: &Topology) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["switchover", "--config"])
        .arg(&t.config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_switchover_hands_the_vm_over_and_back_without_loss_or_failure_detection() {
    const TIMEOUT_MS: u64 = 20_000;
    let mut p = start_pair("swo", TIMEOUT_MS);
    let config = p.t.config.display().to_string();
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 10, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "the pair does not serve");

    let (ok, text) = switchover(&p.t);
    assert!(
        ok,
        "switch-over failed: {text}\na: {}\nb: {}",
        p.primary.stderr(),
        p.secondary.stderr()
    );
    assert!(text.contains("host b is live as generation"), "{text}");
    eprintln!("switch-over: {text}");
    let handed = Instant::now();
    let (next2, served) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    let served = served.expect("b does not serve after the switch-over");
    assert!(
        handed.elapsed() < Duration::from_millis(TIMEOUT_MS / 2),
        "b served only after {:?}: it waited for failure detection",
        served
    );
    assert!(
        p.secondary
            .stderr()
            .contains("the primary stepped down (switch-over)"),
        "{}",
        p.secondary.stderr()
    );
    assert_eq!(
        wait_exit(&mut p.primary, Duration::from_secs(10)),
        Some(0),
        "the old primary did not stop cleanly: {}",
        p.primary.stderr()
    );
    assert_counter_invariants(&replies, next);

    // The old primary's host "is upgraded" and re-joins as secondary.
    let a = Proc::spawn(&p.t.ns, &["pair", "--config", &config, "--host", "a"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.secondary.stderr().contains("secondary joined at stop") {
        assert!(
            Instant::now() < deadline,
            "a never joined b: {}",
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (next3, _) = serve(&s, next2, 5, Duration::from_secs(30), &mut replies);

    // And takes the VM back the same way.
    let (ok, text) = switchover(&p.t);
    assert!(
        ok,
        "switch-back failed: {text}\na: {}\nb: {}",
        a.stderr(),
        p.secondary.stderr()
    );
    assert!(text.contains("host a is live as generation"), "{text}");
    let (_, back) = serve(&s, next3, 5, Duration::from_secs(30), &mut replies);
    assert!(
        back.is_some(),
        "a does not serve after the switch-back: {}",
        a.stderr()
    );
    assert_counter_invariants(&replies, next);
    assert_counter_invariants(&replies, next3);

    // Nothing to switch over to: a clear refusal, and a keeps serving.
    let (ok, text) = switchover(&p.t);
    assert!(!ok && text.contains("nothing to switch over to"), "{text}");
    drop(a);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}
