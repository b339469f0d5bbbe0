//! Mirrored storage (`[ft] storage = "mirrored"`): each host has its own
//! replica of the counter guest's disk. Real processes, real taps, real
//! kill -9; the replicas are files the test reads back.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::pair::*;

/// Replica size: 16 chunks of 64 KiB, so a delta (one chunk: the counter's
/// sector 0) is visibly smaller than a full copy.
const DISK: usize = 1 << 20;

/// A mirrored pair topology: host a's replica `a/disk.img`, host b's
/// `b/disk.img` (same file name: the disk's id), filled as given.
fn mirrored(tag: &str, failover_ms: u64, a_fill: &[u8], b_fill: &[u8]) -> Topology {
    let t = topology_with(tag, failover_ms, "received", "", "storage = \"mirrored\"");
    for (host, fill) in [("a", a_fill), ("b", b_fill)] {
        std::fs::create_dir_all(t.dir.join(host)).unwrap();
        let mut image = fill.to_vec();
        image.resize(DISK, 0);
        std::fs::write(replica(&t, host), image).unwrap();
    }
    let text = std::fs::read_to_string(&t.config).unwrap();
    let text = ["a", "b"].iter().fold(text, |text, host| {
        text.replace(
            &format!("tap = \"tap{host}\" }}"),
            &format!(
                "tap = \"tap{host}\", disk = [\"{}\"] }}",
                replica(&t, host).display()
            ),
        )
    });
    std::fs::write(&t.config, text).unwrap();
    t
}

fn replica(t: &Topology, host: &str) -> PathBuf {
    t.dir.join(host).join("disk.img")
}

/// Sector 0 as the counter guest writes it: magic, then the value.
fn counter_sector(value: u64) -> Vec<u8> {
    let mut s = b"TNDMCNTR".to_vec();
    s.extend_from_slice(&value.to_le_bytes());
    s.resize(512, 0);
    s
}

/// The counter value persisted in a replica.
fn persisted(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"TNDMCNTR",
        "{} has no counter",
        path.display()
    );
    u64::from_le_bytes(bytes[8..16].try_into().unwrap())
}

/// `tandem disk verify` of the two replicas: (exit code, stdout).
fn disk_verify(t: &Topology) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["disk", "verify", "--range", "64K"])
        .arg(replica(t, "a"))
        .arg(replica(t, "b"))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_mirrored_pair_copies_the_replica_fails_over_and_re_syncs_only_the_delta() {
    // a's replica holds counter 1000; b's holds garbage and no sidecar
    // says anything about it: the first sync copies all of it. The
    // secondary then performs the boot read of sector 0 on its own
    // replica, checked against the primary's logged hash.
    let t = mirrored("mirror", 1500, &counter_sector(1000), &[0xab; DISK]);
    let config = t.config.display().to_string();
    let mut p = start_topology(t);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    wait_stderr(
        &p.secondary,
        "replicas in sync",
        Duration::from_secs(30),
        &p.primary,
    );
    assert!(
        p.secondary.stderr().contains("16 / 16 chunks copied"),
        "{}",
        p.secondary.stderr()
    );
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 10, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "the pair does not serve");
    assert!(
        replies.iter().all(|&(_, v)| v > 1000),
        "the counter restarted instead of continuing from the replica: {replies:?}"
    );

    // kill -9 of the primary: b goes live on its own replica.
    p.primary.child.kill().unwrap();
    let _ = p.primary.child.wait();
    let (next2, took_over) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    assert!(
        took_over.is_some(),
        "b did not take over: {}",
        p.secondary.stderr()
    );
    assert_counter_invariants(&replies, next);
    let served_by_b = replies.iter().map(|&(_, v)| v).max().unwrap();
    assert!(
        persisted(&replica(&p.t, "b")) >= served_by_b,
        "b replied {served_by_b} without it on its replica"
    );

    // a comes back and joins b: only the chunk either side wrote since the
    // last sync (the counter's) is copied, while b's guest runs.
    let mut a = Proc::spawn(&p.t.ns, &["pair", "--config", &config, "--host", "a"]);
    wait_stderr(
        &a,
        "replicas in sync",
        Duration::from_secs(30),
        &p.secondary,
    );
    assert!(
        a.stderr().contains("1 / 1 chunks copied"),
        "not a one-chunk delta: {}",
        a.stderr()
    );
    wait_stderr(
        &p.secondary,
        "secondary joined at stop",
        Duration::from_secs(30),
        &a,
    );
    let (next3, again) = serve(&s, next2, 10, Duration::from_secs(30), &mut replies);
    assert!(again.is_some(), "b stopped serving after a joined");

    // Fail back: a performed b's writes on its replica while following.
    p.secondary.child.kill().unwrap();
    let _ = p.secondary.child.wait();
    let (_, back) = serve(&s, next3, 10, Duration::from_secs(30), &mut replies);
    assert!(back.is_some(), "a did not take the VM back: {}", a.stderr());
    assert_counter_invariants(&replies, next);
    assert_counter_invariants(&replies, next3);
    let _ = a.child.kill();
    let _ = a.child.wait();
    let last = replies.iter().map(|&(_, v)| v).max().unwrap();
    assert!(
        persisted(&replica(&p.t, "a")) >= last,
        "a's replica is behind the last value it served ({last})"
    );
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn replica_drift_is_caught_at_the_first_read_and_repaired_by_the_next_sync() {
    // Run 1: a full sync, no requests (nothing written), both stopped.
    let t = mirrored("drift", 1500, &counter_sector(50), &[]);
    let config = t.config.display().to_string();
    let (witness, primary, secondary) = spawn_pair(&t.ns, &t.dir, &t.config);
    wait_stderr(
        &secondary,
        "replicas in sync",
        Duration::from_secs(30),
        &primary,
    );
    wait_stderr(
        &primary,
        "replicas are in sync",
        Duration::from_secs(30),
        &secondary,
    );
    primary.wait_for("netecho: up", Duration::from_secs(60));
    drop((primary, secondary, witness));

    // Behind tandem's back, b's replica changes. The sidecars still say the
    // replicas are identical, so the next start copies nothing...
    let mut image = std::fs::read(replica(&t, "b")).unwrap();
    image[..512].copy_from_slice(&counter_sector(7777));
    std::fs::write(replica(&t, "b"), image).unwrap();
    let (code, out) = disk_verify(&t);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("differ: first in range 0 (bytes 0..65536"),
        "{out}"
    );
    let (_witness, primary, mut secondary) = spawn_pair(&t.ns, &t.dir, &t.config);
    // ...and the guest's boot read of sector 0 shows the drift on b.
    wait_stderr(
        &secondary,
        "replica drift on disk 0",
        Duration::from_secs(60),
        &primary,
    );
    assert!(
        wait_exit(&mut secondary, Duration::from_secs(10)).is_some_and(|c| c != 0),
        "the drifting secondary did not stop"
    );
    primary.wait_for("netecho: up", Duration::from_secs(30));
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "the primary stopped serving");
    assert!(replies.iter().all(|&(_, v)| v > 50), "{replies:?}");

    // b comes back: the drifted chunk is in its bitmap, so the re-sync
    // copies it; b follows and can take over with the right counter.
    let b = Proc::spawn(&t.ns, &["pair", "--config", &config, "--host", "b"]);
    wait_stderr(&b, "replicas in sync", Duration::from_secs(30), &primary);
    wait_stderr(
        &primary,
        "secondary joined at stop",
        Duration::from_secs(30),
        &b,
    );
    assert_eq!(
        std::fs::read(replica(&t, "b")).unwrap()[..16],
        std::fs::read(replica(&t, "a")).unwrap()[..16],
        "the re-sync did not repair sector 0"
    );
    // Nothing is written while no request comes: the replicas are equal.
    let (code, out) = disk_verify(&t);
    assert_eq!(code, Some(0), "{out}");
    let (next2, _) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    drop(primary);
    let (_, took_over) = serve(&s, next2, 5, Duration::from_secs(30), &mut replies);
    assert!(took_over.is_some(), "b did not take over: {}", b.stderr());
    assert_counter_invariants(&replies, next2);
    drop(b);
    let _ = std::fs::remove_dir_all(&t.dir);
}
