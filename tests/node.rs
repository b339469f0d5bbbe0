//! Active/active (`tandem node`): two counter VMs over two hosts, each
//! primary on the host it prefers, each protected by the other host. The
//! loss of a whole host (kill -9 of its node: its VM processes die with it)
//! leaves the survivor running both; the host comes back as secondary of
//! both; `tandem move` hands a VM back without loss.
//!
//! Each host is its own network namespace with its own bridge and taps;
//! both bridges reach the client's bridge through veth pairs (one L2
//! segment, as hosts on one switch), and the hosts replicate over it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pair::*;

const VMS: [(&str, &str, u16); 2] = [("web1", "10.78.0.2", 7410), ("web2", "10.78.0.3", 7420)];

/// The pair file of VM `i` (taps `a{i}`/`b{i}`, ports 7410+/7420+).
fn pair_file(dir: &Path, i: usize) -> PathBuf {
    let (name, ip, port) = VMS[i];
    let (ta, tb) = (format!("a{i}"), format!("b{i}"));
    split_pair_file(
        dir,
        &SplitVm {
            name,
            ip,
            mac: i + 2,
            ports: [port + 1, port + 2],
            taps: [&ta, &tb],
            arbiter: "witness = \"tcp://10.78.0.1:7500\"",
            state: &dir.join(name),
        },
    )
}

/// Role of VM `i` on `host` from its control socket ("" if none answers).
fn role(dir: &Path, i: usize, host: &str) -> String {
    role_at(&dir.join(VMS[i].0).join(format!("{host}.ctl")))
}

fn wait_role(dir: &Path, i: usize, host: &str, want: &str, node: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while role(dir, i, host) != want {
        assert!(
            Instant::now() < deadline,
            "{} on {host} never became {want} (is {:?})\nnode: {}",
            VMS[i].0,
            role(dir, i, host),
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tandem status --cluster`: (exit 0, stdout).
fn cluster_status(cluster: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["status", "--cluster", cluster])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn joined(node: &Proc) -> usize {
    node.stderr().matches("secondary joined at stop").count()
}

#[test]
fn two_hosts_run_a_vm_each_survive_a_host_loss_and_move_a_vm_back() {
    // The client's namespace (and the witness), and one per host.
    let (ns, hosts) = split_hosts("node", &["a", "b"], |h| {
        (0..2).map(|i| format!("{h}{i}")).collect()
    });
    let dir = test_dir("node");
    for i in 0..2 {
        pair_file(&dir, i);
    }
    let cluster = dir.join("cluster.toml");
    std::fs::write(
        &cluster,
        "[[vm]]\nconfig = \"web1.toml\"\nprefer = \"a\"\n\n[[vm]]\nconfig = \"web2.toml\"\nprefer = \"b\"\n",
    )
    .unwrap();
    let cluster_arg = cluster.display().to_string();
    let _witness = spawn_witness_at(&ns, &dir, "10.78.0.1:7500");
    let node_a = Proc::spawn(
        &hosts[0],
        &["node", "--config", &cluster_arg, "--host", "a"],
    );
    let mut node_b = Proc::spawn(
        &hosts[1],
        &["node", "--config", &cluster_arg, "--host", "b"],
    );

    // Each host is primary of the VM it prefers and secondary of the other.
    wait_role(&dir, 0, "a", "primary", &node_a);
    wait_role(&dir, 1, "b", "primary", &node_b);
    wait_role(&dir, 0, "b", "secondary", &node_b);
    wait_role(&dir, 1, "a", "secondary", &node_a);
    let (ok, text) = cluster_status(&cluster_arg);
    assert!(ok, "{text}");
    assert!(
        text.contains("web1: live on a (generation 1), protected by b"),
        "{text}"
    );
    assert!(
        text.contains("web2: live on b (generation 1), protected by a"),
        "{text}"
    );
    let s = ns.udp_socket("10.78.0.1:0");
    let mut replies: [Vec<(u32, u64)>; 2] = Default::default();
    let mut next = [0u32; 2];
    for i in 0..2 {
        let (n, first) = serve_at(&s, VMS[i].1, 0, 5, Duration::from_secs(30), &mut replies[i]);
        assert!(first.is_some(), "{} does not serve", VMS[i].0);
        next[i] = n;
    }

    // Host b is lost: its node and every VM process on it die at once.
    signal(&node_b, libc::SIGKILL);
    let _ = node_b.child.wait();
    let split = next;
    for i in 0..2 {
        let (n, first) = serve_at(
            &s,
            VMS[i].1,
            next[i],
            5,
            Duration::from_secs(30),
            &mut replies[i],
        );
        assert!(
            first.is_some(),
            "{} not served after host b died: {}",
            VMS[i].0,
            node_a.stderr()
        );
        next[i] = n;
        assert_counter_invariants(&replies[i], split[i]);
    }
    assert_eq!(role(&dir, 1, "a"), "primary", "web2 did not move to a");
    let (ok, text) = cluster_status(&cluster_arg);
    assert!(!ok, "a host is gone: not every VM is protected\n{text}");
    assert!(
        text.contains("web2: live on a (generation 2), UNPROTECTED"),
        "{text}"
    );

    // Host b returns: it re-joins both VMs as secondary, while a runs both.
    let before = joined(&node_a);
    node_b = Proc::spawn(
        &hosts[1],
        &["node", "--config", &cluster_arg, "--host", "b"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while joined(&node_a) < before + 2 {
        assert!(
            Instant::now() < deadline,
            "b did not re-join both VMs\na: {}\nb: {}",
            node_a.stderr(),
            node_b.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // web2 goes back to its preferred host, without loss.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["move", "web2", "--config", &cluster_arg, "--to", "b"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("host b is live"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let split2 = next[1];
    let (_, back) = serve_at(
        &s,
        VMS[1].1,
        next[1],
        5,
        Duration::from_secs(30),
        &mut replies[1],
    );
    assert!(
        back.is_some(),
        "web2 not served after the move: {}",
        node_b.stderr()
    );
    assert_counter_invariants(&replies[1], split2);
    wait_role(&dir, 1, "b", "primary", &node_b);
    // a's side of web2 ended cleanly and comes back as b's secondary.
    wait_role(&dir, 1, "a", "secondary", &node_a);
    // Moving it where it is says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["move", "web2", "--config", &cluster_arg, "--to", "b"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already live on host b"),
        "{:?}",
        out
    );
    drop((node_a, node_b));
    let _ = std::fs::remove_dir_all(&dir);
}
