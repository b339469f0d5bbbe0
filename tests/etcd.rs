//! etcd arbitration (`[ft] witness = "etcd://..."`): a real 3-member etcd
//! cluster in the test's network namespace (Debian's etcd-server, installed
//! by `make deps`). The pair's generations live in etcd; losing one member
//! changes nothing; a kill -9 of the primary hands over through another
//! member with no counter value handed out twice; etcd unreachable at start
//! is a clear error.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::etcd::*;
use common::pair::*;

#[test]
fn a_pair_arbitrated_by_a_three_member_etcd_cluster_fails_over_and_survives_a_member_loss() {
    let t = topology_with("etcd", 1500, "received", "", "");
    let text = std::fs::read_to_string(&t.config).unwrap().replace(
        "witness = \"tcp://127.0.0.1:7500\"",
        &ft_lines(&t.dir, "127.0.0.1", "tandem-test"),
    );
    assert!(text.contains("etcd://"), "{text}");
    std::fs::write(&t.config, &text).unwrap();
    let mut members: Vec<Option<Proc>> = start_cluster(&t.ns, &t.dir, "127.0.0.1")
        .into_iter()
        .map(Some)
        .collect();
    let config = t.config.display().to_string();
    let primary = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
    std::thread::sleep(Duration::from_millis(300));
    let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &config, "--host", "b"]);
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
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
fn a_primary_cut_off_from_etcd_stops_releasing_and_hands_over_exactly_once() {
    // Hosts a and b are network namespaces of their own on one segment
    // with the client and the 3-member etcd cluster (10.78.0.1). An
    // nftables rule on host a drops its traffic to etcd; a still reaches b.
    // Without renewals a's lease runs out: it holds all output and tells b
    // to go live; b (which reaches etcd) claims generation 2, once.
    have_etcd();
    let (ns, hosts) = split_hosts("etcdcut", &["a", "b"], |h| vec![format!("tap{h}")]);
    let dir = test_dir("etcdcut");
    let config = hosts_pair_file(&dir, "counter", "tapa", "tapb", &dir.join("state"));
    let members = start_cluster(&ns, &dir, "10.78.0.1");
    let config = config.display().to_string();
    let primary = Proc::spawn(&hosts[0], &["primary", "--config", &config, "--host", "a"]);
    std::thread::sleep(Duration::from_millis(300));
    let secondary = Proc::spawn(
        &hosts[1],
        &["secondary", "--config", &config, "--host", "b"],
    );
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    let s = ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(30), &mut replies);
    assert!(
        first.is_some(),
        "the pair does not serve: {}",
        primary.stderr()
    );

    // The live side holds its etcd lease (`tandem status` says how long).
    let status_a = || status_at(&dir.join("state").join("a.ctl")).unwrap_or_default();
    let left = status_figure(&status_a(), "arbiter_lease_ms_left");
    assert!(left > 0 && left <= 3200, "{}", status_a());

    // Host a loses etcd (and only etcd).
    let mut nft = hosts[0].command("nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"table inet cut {\n chain out {\n  type filter hook output priority 0;\n  ip daddr 10.78.0.1 tcp dport { 2379, 2479, 2579 } drop\n }\n}\n",
        )
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft failed");
    let cut = Instant::now();
    wait_stderr(
        &primary,
        "ran out: holding output",
        Duration::from_secs(10),
        &secondary,
    );
    let stopped = cut.elapsed();
    // The lease is 4 s (two failover timeouts, at least 4 s); a counts on
    // 80% of it from the last renewal it sent, so it stops within the lease.
    assert!(
        stopped < Duration::from_secs(4),
        "a kept releasing for {stopped:?} after losing etcd"
    );

    wait_stderr(
        &secondary,
        "going live as generation 2",
        Duration::from_secs(15),
        &primary,
    );
    wait_stderr(
        &primary,
        "fenced: lost the arbiter lease",
        Duration::from_secs(15),
        &secondary,
    );
    let (next2, took_over) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    assert!(
        took_over.is_some(),
        "b does not serve: {}",
        secondary.stderr()
    );
    assert_counter_invariants(&replies, next);
    // Exactly once: b went live once, nobody claimed a third generation.
    std::thread::sleep(Duration::from_millis(500));
    let (_, still) = serve(&s, next2, 3, Duration::from_secs(30), &mut replies);
    assert!(still.is_some());
    assert_eq!(
        secondary
            .stderr()
            .matches("going live as generation")
            .count(),
        1
    );
    assert!(
        !secondary.stderr().contains("generation 3"),
        "{}",
        secondary.stderr()
    );
    assert!(
        !primary.stderr().contains("generation 2"),
        "{}",
        primary.stderr()
    );
    drop((primary, secondary, members));
    let _ = std::fs::remove_dir_all(&dir);
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

#[test]
fn a_client_without_a_certificate_or_with_a_wrong_password_is_refused_and_the_pair_does_not_start()
{
    // The cluster requires client certificates and has authentication on.
    let t = topology_with("etcd-refuse", 1500, "received", "", "");
    let members = start_cluster(&t.ns, &t.dir, "127.0.0.1");
    let pki = pki(&t.dir);
    let base = std::fs::read_to_string(&t.config).unwrap();
    let witness = format!("witness = \"{}\"", url("127.0.0.1", "tandem-test"));
    let cases = [
        (
            "no certificate",
            format!(
                "{witness}\netcd_ca = \"{}\"\netcd_user = \"{USER}\"\netcd_password_file = \"{}\"\n",
                pki.ca().display(),
                pki.password_file().display()
            ),
            // The certificate alert, or (TLS 1.3) a connection closed
            // after the handshake, with the hint to set a certificate.
            "etcd_cert",
        ),
        (
            "wrong password",
            pki.access_lines().replace(
                &pki.password_file().display().to_string(),
                &pki.wrong_password_file().display().to_string(),
            ) + &witness,
            "wrong user or password",
        ),
        (
            "TLS off towards a TLS cluster",
            witness.clone(),
            "unreachable",
        ),
    ];
    for (case, lines, says) in cases {
        std::fs::write(
            &t.config,
            base.replace("witness = \"tcp://127.0.0.1:7500\"", &lines),
        )
        .unwrap();
        let config = t.config.display().to_string();
        let mut p = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
        assert_eq!(
            wait_exit(&mut p, Duration::from_secs(20)),
            Some(3),
            "{case}: {}",
            p.stderr()
        );
        let err = p.stderr();
        eprintln!("{case}: {}", err.trim());
        assert!(
            err.contains(says) && err.contains("127.0.0.1:2379"),
            "{case}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{case}: not one line: {err}");
        assert!(!err.contains("netecho: up"), "{case}: {err}");
    }
    // The same pair with the right certificate and password starts.
    std::fs::write(
        &t.config,
        base.replace(
            "witness = \"tcp://127.0.0.1:7500\"",
            &ft_lines(&t.dir, "127.0.0.1", "tandem-test"),
        ),
    )
    .unwrap();
    let config = t.config.display().to_string();
    let p = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
    wait_stderr(&p, "waiting for the secondary", Duration::from_secs(20), &p);
    drop((p, members));
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// The pair file `DIR/NAME.toml` of a counter VM whose hosts a and b are
/// the namespaces of `split_hosts` (ports 7401/7402, taps `tap_a`/`tap_b`),
/// arbitrated by the etcd cluster on 10.78.0.1.
fn hosts_pair_file(
    dir: &std::path::Path,
    name: &str,
    tap_a: &str,
    tap_b: &str,
    state: &std::path::Path,
) -> std::path::PathBuf {
    split_pair_file(
        dir,
        &SplitVm {
            name,
            ip: GUEST_IP,
            mac: 2,
            ports: [7401, 7402],
            taps: [tap_a, tap_b],
            arbiter: &ft_lines(dir, "10.78.0.1", "tandem-test"),
            state,
        },
    )
}

/// Role of the VM's slot `slot` from its control socket ("" if none).
fn slot_role(dir: &std::path::Path, slot: &str) -> String {
    role_at(&dir.join(format!("{slot}.ctl")))
}

fn wait_slot_role(dir: &std::path::Path, slot: &str, want: &str, nodes: &[&Proc]) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while slot_role(dir, slot) != want {
        assert!(
            Instant::now() < deadline,
            "slot {slot} never became {want} (is {:?})\n{}",
            slot_role(dir, slot),
            nodes
                .iter()
                .map(|n| n.stderr())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_spare_host_re_protects_a_vm_whose_host_died() {
    // Three hosts (network namespaces on one segment) run `tandem node`
    // as members of an etcd cluster; the VM starts on a (primary) and b
    // (secondary); c is a spare. Host a dies: b takes over, and once a's
    // membership lease expires c takes a's slot and joins b as its
    // secondary, with no operator. Host b then dies too and c carries on:
    // the re-protection was real.
    have_etcd();
    let (ns, hosts) = split_hosts("etcdspare", &["a", "b", "c"], |_| {
        vec!["ta".to_string(), "tb".to_string()]
    });
    let dir = test_dir("etcdspare");
    let state = dir.join("web1");
    hosts_pair_file(&dir, "web1", "ta", "tb", &state);
    let endpoints: Vec<String> = CLIENT.iter().map(|p| format!("10.78.0.1:{p}")).collect();
    let cluster = dir.join("cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "[cluster]\netcd = \"etcd://{}/tandem-cluster\"\n{}\n[[host]]\nname = \"a\"\naddress = \"10.78.0.11\"\n[[host]]\nname = \"b\"\naddress = \"10.78.0.12\"\n[[host]]\nname = \"c\"\naddress = \"10.78.0.13\"\n\n[[vm]]\nconfig = \"web1.toml\"\nprefer = \"a\"\n",
            endpoints.join(","),
            pki(&dir).access_lines()
        ),
    )
    .unwrap();
    let members = start_cluster(&ns, &dir, "10.78.0.1");
    let cluster_arg = cluster.display().to_string();
    let node = |i: usize, name: &str| {
        Proc::spawn(
            &hosts[i],
            &["node", "--config", &cluster_arg, "--host", name],
        )
    };
    let node_a = node(0, "a");
    let mut node_b = node(1, "b");
    let node_c = node(2, "c");
    wait_slot_role(&state, "a", "primary", &[&node_a, &node_b, &node_c]);
    wait_slot_role(&state, "b", "secondary", &[&node_a, &node_b, &node_c]);
    assert!(
        node_c.stderr().contains("member of the cluster"),
        "{}",
        node_c.stderr()
    );
    let s = ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "web1 does not serve");

    // Host a dies (its node and its VM process at once).
    let lost = Instant::now();
    signal(&node_a, libc::SIGKILL);
    let mut node_a = node_a;
    let _ = node_a.child.wait();
    let (next2, again) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    assert!(again.is_some(), "b did not take over: {}", node_b.stderr());
    assert_counter_invariants(&replies, next);
    // c stands in for a and joins b: protected again, with no operator.
    wait_stderr(
        &node_c,
        "standing in for it in slot a",
        Duration::from_secs(30),
        &node_b,
    );
    let stood_in = lost.elapsed();
    wait_slot_role(&state, "a", "secondary", &[&node_b, &node_c]);
    let protected = lost.elapsed();
    eprintln!(
        "host a lost: spare c stood in after {} ms, protected again after {} ms (membership lease {} s)",
        stood_in.as_millis(),
        protected.as_millis(),
        2
    );
    // `make bench` runs this test for its spare figures.
    if let Ok(out) = std::env::var("TANDEM_SPARE_BENCH_OUT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .unwrap();
        writeln!(
            f,
            "{{\"stand_in_ms\": {}, \"protected_ms\": {}}}",
            stood_in.as_millis(),
            protected.as_millis()
        )
        .unwrap();
    }
    assert_eq!(slot_role(&state, "b"), "primary");
    // From the client's namespace, which reaches etcd.
    let status = ns
        .command(env!("CARGO_BIN_EXE_tandem"))
        .args(["status", "--cluster", &cluster_arg])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(
        text.contains("web1: live on b (generation 2), protected by a")
            && text.contains("hosts a=c b=b"),
        "{text}"
    );
    let (next3, still) = serve(&s, next2, 5, Duration::from_secs(30), &mut replies);
    assert!(still.is_some());

    // Host b dies too: c, now a's slot, carries the VM on.
    signal(&node_b, libc::SIGKILL);
    let _ = node_b.child.wait();
    let (_, survived) = serve(&s, next3, 5, Duration::from_secs(30), &mut replies);
    assert!(
        survived.is_some(),
        "c did not take over: {}",
        node_c.stderr()
    );
    assert_counter_invariants(&replies, next2);
    wait_slot_role(&state, "a", "primary", &[&node_c]);
    drop((node_c, members));
    let _ = std::fs::remove_dir_all(&dir);
}
