//! etcd arbitration (`[ft] witness = "etcd://..."`): a real 3-member etcd
//! cluster in the test's network namespace (Debian's etcd-server, installed
//! by `make deps`). The pair's generations live in etcd; losing one member
//! changes nothing; a kill -9 of the primary hands over through another
//! member with no counter value handed out twice; etcd unreachable at start
//! is a clear error.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::pair::*;

const CLIENT: [u16; 3] = [2379, 2479, 2579];
const PEER: [u16; 3] = [2380, 2480, 2580];

fn etcd_member(ns: &NetNs, dir: &std::path::Path, i: usize) -> Proc {
    let cluster: Vec<String> = (0..3)
        .map(|j| format!("m{j}=http://127.0.0.1:{}", PEER[j]))
        .collect();
    let data = dir.join(format!("etcd-m{i}"));
    let client = format!("http://127.0.0.1:{}", CLIENT[i]);
    let peer = format!("http://127.0.0.1:{}", PEER[i]);
    let mut cmd = ns.command("etcd");
    cmd.args(["--name", &format!("m{i}"), "--data-dir"])
        .arg(&data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &cluster.join(",")])
        .args([
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "tandem-test",
        ])
        .args(["--log-level", "error"]);
    Proc::from_command(cmd)
}

/// etcd's `/health` on member `i`, from inside the namespace.
fn healthy(ns: &NetNs, i: usize) -> bool {
    let Ok(mut c) = ns.tcp_connect(&format!("127.0.0.1:{}", CLIENT[i])) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    if c.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    text.contains("\"health\":\"true\"")
}

#[test]
fn a_pair_arbitrated_by_a_three_member_etcd_cluster_fails_over_and_survives_a_member_loss() {
    if std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no etcd binary (make deps installs Debian's etcd-server)");
        return;
    }
    let t = topology_with("etcd", 1500, "received", "", "");
    let endpoints: Vec<String> = CLIENT.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let text = std::fs::read_to_string(&t.config).unwrap().replace(
        "witness = \"tcp://127.0.0.1:7500\"",
        &format!("witness = \"etcd://{}/tandem-test\"", endpoints.join(",")),
    );
    assert!(text.contains("etcd://"), "{text}");
    std::fs::write(&t.config, &text).unwrap();
    let mut members: Vec<Option<Proc>> = (0..3)
        .map(|i| Some(etcd_member(&t.ns, &t.dir, i)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..3).all(|i| healthy(&t.ns, i)) {
        assert!(
            Instant::now() < deadline,
            "the etcd cluster never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let config = t.config.display().to_string();
    let primary = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
    std::thread::sleep(Duration::from_millis(300));
    let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &config, "--host", "b"]);
    primary.wait_for("netecho: up", Duration::from_secs(60));
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(30), &mut replies);
    assert!(
        first.is_some(),
        "the pair does not serve: {}",
        primary.stderr()
    );

    // One member (the first the pair tries) goes: nothing changes.
    drop(members[0].take());
    let (next2, still) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    assert!(still.is_some(), "a lost etcd member stopped the VM");

    // The primary dies: the secondary claims the next generation through
    // another member and goes live.
    let mut primary = primary;
    primary.child.kill().unwrap();
    let _ = primary.child.wait();
    let (next3, took_over) = serve(&s, next2, 5, Duration::from_secs(30), &mut replies);
    assert!(
        took_over.is_some(),
        "b did not take over: {}",
        secondary.stderr()
    );
    assert!(
        secondary.stderr().contains("going live as generation 2"),
        "{}",
        secondary.stderr()
    );
    assert_counter_invariants(&replies, next2);

    // `tandem pair` on a asks etcd who is live and joins b.
    let a = Proc::spawn(&t.ns, &["pair", "--config", &config, "--host", "a"]);
    wait_stderr(
        &secondary,
        "secondary joined at stop",
        Duration::from_secs(30),
        &a,
    );
    assert!(
        a.stderr().contains("joining as secondary"),
        "{}",
        a.stderr()
    );
    let (_, again) = serve(&s, next3, 5, Duration::from_secs(30), &mut replies);
    assert!(again.is_some());
    drop((a, secondary));
    drop(members);
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn etcd_unreachable_at_start_is_a_clear_error() {
    let t = topology_with("etcd-down", 1500, "received", "", "");
    let text = std::fs::read_to_string(&t.config).unwrap().replace(
        "witness = \"tcp://127.0.0.1:7500\"",
        "witness = \"etcd://127.0.0.1:2679/tandem-test\"",
    );
    std::fs::write(&t.config, &text).unwrap();
    let config = t.config.display().to_string();
    let mut p = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
    assert_eq!(
        wait_exit(&mut p, Duration::from_secs(20)),
        Some(3),
        "{}",
        p.stderr()
    );
    let err = p.stderr();
    assert!(
        err.contains("127.0.0.1:2679") && err.contains("unreachable"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&t.dir);
}
