//! `tandem switchover`: the live side hands the VM to its secondary
//! without loss and without waiting for failure detection (the failover
//! timeout here is 20 s), the old side re-joins, and the VM is handed back.
//! This is the rolling-upgrade path: stop one host's tandem, upgrade,
//! re-join, switch over, repeat on the other.

mod common;

use std::time::{Duration, Instant};

use common::pair::*;

/// What the guest read from the register whose behaviour changed with
/// device-model version 2 (the counter reply's last four bytes).
fn model_probe(s: &std::net::UdpSocket, request: u32) -> u32 {
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&7u32.to_le_bytes());
    req[4..].copy_from_slice(&request.to_le_bytes());
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        s.send_to(&req, format!("{GUEST_IP}:9000")).unwrap();
        while let Ok(n) = s.recv(&mut buf) {
            if n == 20 && buf[..8] == req {
                return u32::from_le_bytes(buf[16..20].try_into().unwrap());
            }
        }
    }
    panic!("no counter reply for probe request {request}");
}

/// Version 1: port 0x604 is unmapped and reads all ones.
const PROBE_V1: u32 = 0xffff_ffff;

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
    // Its stderr is read by a thread of this test: on a loaded machine the
    // line may come after b's first reply (seen once: nothing read yet).
    wait_stderr(
        &p.secondary,
        "the primary stepped down (switch-over)",
        Duration::from_secs(10),
        &p.primary,
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
    wait_stderr(
        &p.secondary,
        "secondary joined at stop",
        Duration::from_secs(30),
        &a,
    );
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

#[test]
fn a_newer_secondary_follows_an_older_primary_and_takes_over_by_switchover() {
    // Host a runs "version N": its VM uses device-model version 1 (the
    // pair file pins it, as an operator does while the hosts run different
    // tandem versions). Host b runs "version N+1": its own file pins
    // nothing, so a VM it started would use version 2; as a secondary it
    // must run the version its primary's VM was started with. The counter
    // guest reads the register whose behaviour changed with every request.
    const TIMEOUT_MS: u64 = 20_000;
    let t = topology_with("upg", TIMEOUT_MS, "received", "device_model = 1", "");
    let new_config = t.dir.join("pair-new.toml");
    let text = std::fs::read_to_string(&t.config).unwrap();
    std::fs::write(&new_config, text.replace("device_model = 1", "")).unwrap();
    let (old, new) = (
        t.config.display().to_string(),
        new_config.display().to_string(),
    );
    let _witness = spawn_witness(&t.ns, &t.dir);
    let primary = Proc::spawn(&t.ns, &["primary", "--config", &old, "--host", "a"]);
    std::thread::sleep(Duration::from_millis(300));
    let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &new, "--host", "b"]);
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 10, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "the mixed-version pair does not serve");
    assert_eq!(model_probe(&s, 1_000_000), PROBE_V1);
    // Let the secondary replay and check the epochs of those requests.
    std::thread::sleep(Duration::from_millis(300));
    let b = status(&t, "b").expect("b answers");
    assert_eq!(status_figure(&b, "device_model"), 1, "{b}");
    assert_eq!(status_figure(&b, "divergences"), 0, "{b}");
    assert!(status_figure(&b, "epochs_verified") > 0, "{b}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["switchover", "--config", &new])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let handed_ms: u64 = text
        .split("handed over in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pause in {text:?}"));
    assert!(
        handed_ms < TIMEOUT_MS / 4,
        "switch-over pause {handed_ms} ms"
    );
    let (next2, served) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    assert!(served.is_some(), "b does not serve: {}", secondary.stderr());
    assert_eq!(
        model_probe(&s, 1_000_001),
        PROBE_V1,
        "the guest saw its device model change when b (newer) took over"
    );
    assert_counter_invariants(&replies, next);
    drop(primary);

    // a "is upgraded" (the new file) and re-joins: it follows version 1 too.
    let a = Proc::spawn(&t.ns, &["pair", "--config", &new, "--host", "a"]);
    wait_stderr(
        &secondary,
        "secondary joined at stop",
        Duration::from_secs(30),
        &a,
    );
    let (_, again) = serve(&s, next2, 10, Duration::from_secs(30), &mut replies);
    assert!(again.is_some());
    std::thread::sleep(Duration::from_millis(300));
    let a_status = status(&t, "a").expect("a answers");
    assert_eq!(status_figure(&a_status, "device_model"), 1, "{a_status}");
    assert_eq!(status_figure(&a_status, "divergences"), 0, "{a_status}");
    assert_counter_invariants(&replies, next2);
    drop((a, secondary));
    let _ = std::fs::remove_dir_all(&t.dir);
}
