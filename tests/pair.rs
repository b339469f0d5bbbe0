//! A protected pair under real faults: primary and secondary processes in a
//! network namespace, the guest's NIC on a tap per host, both taps on one
//! bridge the client sits on, a witness arbiter, shared storage for the
//! guest's disk, and `kill -9` of the primary mid-stream.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::pair::*;
use common::{compute_hash, guest};

#[test]
fn replayed_commit_serves_and_fails_over_too() {
    // Output leaves only once the secondary has replayed and verified it.
    let mut p = start_pair_committing("rep", 1500, "replayed");
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 20, Duration::from_secs(30), &mut replies);
    assert!(
        first.is_some(),
        "nothing answered in replayed mode: {}",
        p.primary.stderr()
    );
    p.primary.child.kill().unwrap();
    let (_, after) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    assert!(
        after.is_some(),
        "no takeover: {}\nprimary: {}",
        p.secondary.stderr(),
        p.primary.stderr()
    );
    assert_counter_invariants(&replies, next);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn kill_usr1_of_the_secondary_leaves_the_primary_serving_unprotected() {
    // With `respawn`, the primary also starts a fresh secondary's command.
    let marker = std::env::temp_dir().join(format!("tandem-respawned-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let p = start_topology(topology_with(
        "u2",
        1500,
        "received",
        "",
        &format!(
            "respawn = \"echo $TANDEM_VM $TANDEM_HOST $TANDEM_PEER > {}\"",
            marker.display()
        ),
    ));
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 20, Duration::from_secs(30), &mut replies);
    signal(&p.secondary, libc::SIGUSR1);
    let (_, first) = serve(&s, next, 20, Duration::from_secs(30), &mut replies);
    assert!(
        first.is_some(),
        "primary stopped serving: {}",
        p.primary.stderr()
    );
    assert_counter_invariants(&replies, next);
    assert!(
        p.primary.stderr().contains("running unprotected"),
        "{}",
        p.primary.stderr()
    );
    std::thread::sleep(Duration::from_millis(300));
    let respawned = std::fs::read_to_string(&marker).unwrap_or_default();
    assert_eq!(respawned.trim(), "counter a b", "respawn did not run");
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn a_frozen_primary_is_replaced_and_fences_itself_when_it_thaws() {
    let mut p = start_pair("u1", 1500);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 20, Duration::from_secs(30), &mut replies);
    signal(&p.primary, libc::SIGUSR1); // freezes it with its sockets open
    let (next2, first) = serve(&s, next, 20, Duration::from_secs(30), &mut replies);
    let first = first.unwrap_or_else(|| panic!("no takeover: {}", p.secondary.stderr()));
    eprintln!("first reply {first:?} after freezing the primary");
    assert_counter_invariants(&replies, next);

    // Thaw the old primary: it sends nothing, ends fenced and says so on
    // its control socket until terminated.
    let frames_before = frames_from_vm(&p.t.ns, "tapa");
    signal(&p.primary, libc::SIGCONT);
    let fenced = wait_fenced(&p.t, "a", Duration::from_secs(20));
    assert!(fenced.contains("reason"), "{fenced}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        frames_from_vm(&p.t.ns, "tapa"),
        frames_before,
        "the fenced primary sent frames"
    );
    signal(&p.primary, libc::SIGTERM);
    let code = wait_exit(&mut p.primary, Duration::from_secs(20));
    assert_eq!(code, Some(124), "old primary: {}", p.primary.stderr());
    let (_, again) = serve(&s, next2, 5, Duration::from_secs(20), &mut replies);
    assert!(again.is_some(), "the new primary stopped serving");
    assert_counter_invariants(&replies, next);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn output_waits_for_the_secondary() {
    // A failover timeout far longer than the stall: no failover, held output.
    let p = start_pair("out", 20_000);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 5, Duration::from_secs(30), &mut replies);
    signal(&p.secondary, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(200));
    let held = counter(&s, 1, next, Duration::from_millis(1500));
    assert!(
        held.is_empty(),
        "a reply left before the secondary had its log: {held:?}"
    );
    // The operator sees how long the reply has waited.
    let mut cmd = common::tandem();
    let config = p.t.config.display().to_string();
    cmd.args(["status", "--config", &config, "--json"]);
    let f = common::run_command(cmd, None, Duration::from_secs(20));
    let primary = f
        .stdout
        .lines()
        .find(|l| l.contains("\"host\":\"a\""))
        .unwrap_or_else(|| panic!("no status from the primary: {f:?}"));
    assert!(status_figure(primary, "held_outputs") > 0, "{primary}");
    assert!(
        status_figure(primary, "oldest_held_ms") >= 1000,
        "{primary}"
    );
    assert!(status_figure(primary, "unacked_frames") > 0, "{primary}");
    assert!(status_figure(primary, "lag_ms") >= 1000, "{primary}");
    signal(&p.secondary, libc::SIGCONT);
    let released = counter(&s, 1, next + 1, Duration::from_secs(5));
    assert!(
        released.iter().any(|(id, _)| *id == next),
        "the held reply never arrived: {released:?}"
    );
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn bad_pair_files_get_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("tandem-badpair-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = NetNs::new("bad");
    let kernel = guest("hello").display().to_string();
    let hosts = |a: &str, b: &str| {
        format!("[hosts]\na = {{ address = \"{a}\" }}\nb = {{ address = \"{b}\" }}\n")
    };
    let vm = format!("[vm]\nkernel = \"{kernel}\"\n");
    let witness = "[ft]\nwitness = \"tcp://127.0.0.1:9\"\n";
    let psk = write_psk(&dir).display().to_string();
    let keyed = format!("[ft]\nwitness = \"tcp://127.0.0.1:9\"\npsk_file = \"{psk}\"\n");
    let open_key = dir.join("open.psk");
    std::fs::write(&open_key, format!("{}\n", "0f".repeat(32))).unwrap();
    let open_key = format!("[ft]\npsk_file = \"{}\"\n", open_key.display());
    // Without --insecure: a pair needs a key, a private one.
    let secure_cases = [
        (
            "no-key",
            format!("{vm}{}{witness}", hosts("127.0.0.1:7401", "127.0.0.2:7402")),
            "no [ft] psk_file is configured",
        ),
        (
            "open-key",
            format!(
                "{vm}{}{open_key}",
                hosts("127.0.0.1:7401", "127.0.0.2:7402")
            ),
            "chmod 600",
        ),
        (
            "keyed-witness-down",
            format!("{vm}{}{keyed}", hosts("127.0.0.1:7401", "127.0.0.2:7402")),
            "witness 127.0.0.1:9 unreachable",
        ),
    ];
    for (name, text, needle) in secure_cases {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let mut cmd = common::tandem();
        cmd.arg("primary")
            .arg("--config")
            .arg(&path)
            .args(["--host", "a"]);
        let f = common::run_command(cmd, None, Duration::from_secs(30));
        common::assert_clean_error(&f, 3, needle);
    }
    let cases = [
        ("no-hosts", vm.clone(), "missing section [hosts]"),
        (
            "unknown-key",
            format!("{vm}kernal = 1\n{}", hosts("127.0.0.1:1", "127.0.0.2:1")),
            ":3:",
        ),
        (
            "bad-address",
            format!("{vm}{}", hosts("nowhere", "127.0.0.2:1")),
            ":4:",
        ),
        (
            "same-address",
            format!("{vm}{}", hosts("127.0.0.1:1", "127.0.0.1:1")),
            "127.0.0.1:1",
        ),
        (
            "neither-host",
            format!("{vm}{}{witness}", hosts("192.0.2.1:1", "192.0.2.2:1")),
            "--host",
        ),
        (
            "no-witness",
            format!("{vm}{}", hosts("127.0.0.1:7401", "127.0.0.2:7402")),
            "--i-accept-split-brain",
        ),
    ];
    for (name, text, needle) in cases {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let f = if name == "neither-host" {
            // In a namespace with only loopback, so neither address is local.
            let mut cmd = ns.command(env!("CARGO_BIN_EXE_tandem"));
            cmd.arg("primary")
                .arg("--config")
                .arg(&path)
                .arg("--insecure");
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            common::run_command(cmd, None, Duration::from_secs(30))
        } else {
            let mut cmd = common::tandem();
            cmd.arg("primary")
                .arg("--config")
                .arg(&path)
                .args(["--host", "a", "--insecure"]);
            common::run_command(cmd, None, Duration::from_secs(30))
        };
        common::assert_clean_error(&f, 3, needle);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kill_9_of_the_primary_hands_over_without_reusing_a_counter_value() {
    let Pair {
        t,
        _witness,
        mut primary,
        secondary,
    } = start_pair("k9", 1500);

    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies: Vec<(u32, u64)> = Vec::new();
    let mut request = 0u32;
    for _ in 0..60 {
        replies.extend(counter(&s, 1, request, Duration::from_secs(2)));
        request += 1;
    }
    assert!(
        replies.len() >= 60,
        "the protected VM did not answer: {replies:?}\n{}",
        primary.stderr()
    );

    primary.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    let mut first_after: Option<Duration> = None;
    while Instant::now() - killed < Duration::from_secs(30) && request < 1000 {
        let got = counter(&s, 1, request, Duration::from_millis(300));
        if first_after.is_none() && got.iter().any(|(id, _)| *id == request) {
            first_after = Some(killed.elapsed());
        }
        replies.extend(got);
        request += 1;
        if first_after.is_some()
            && request % 20 == 0
            && replies.iter().filter(|(id, _)| *id > 60).count() > 40
        {
            break;
        }
    }
    let first_after = first_after.unwrap_or_else(|| {
        panic!(
            "no reply after failover; secondary stderr:\n{}",
            secondary.stderr()
        )
    });
    eprintln!(
        "first reply {first_after:?} after kill -9\nsecondary: {}",
        secondary.stderr()
    );

    // No value handed to two different requests (repeats are exact
    // duplicates), and the new primary continues above everything the
    // client saw.
    assert_counter_invariants(&replies, 60);
    assert!(
        secondary.stderr().contains("going live"),
        "{}",
        secondary.stderr()
    );
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// The bridge port the guest MAC is learned on, if any.
fn fdb_port(ns: &NetNs, mac: &str) -> Option<String> {
    let out = std::process::Command::new("bridge")
        .args(["-n", &ns.name, "fdb", "show", "br", "br0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(mac) && words.next() == Some("dev"))
            .then(|| words.next().map(str::to_string))
            .flatten()
    })
}

#[test]
fn the_announce_moves_the_bridge_port_and_a_client_with_a_full_arp_cache_carries_on() {
    const MAC: &str = "52:54:00:00:78:02";
    let Pair {
        t,
        _witness,
        mut primary,
        secondary,
    } = start_pair("fdb", 1500);
    // The client never asks ARP again: its entry for the guest is permanent.
    ip(
        &t.ns,
        &[
            "neigh",
            "replace",
            GUEST_IP,
            "lladdr",
            MAC,
            "dev",
            "br0",
            "nud",
            "permanent",
        ],
    );
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(20), &mut replies);
    assert!(first.is_some(), "{}", primary.stderr());
    assert_eq!(fdb_port(&t.ns, MAC).as_deref(), Some("tapa"));

    // The client stays silent through the failover, and the guest sends
    // nothing unasked: only the new primary's announce can move the entry.
    primary.child.kill().unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(20);
    while !secondary.stderr().contains("going live") {
        assert!(
            Instant::now() < deadline,
            "no go-live: {}",
            secondary.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let live_seen = Instant::now();
    while fdb_port(&t.ns, MAC).as_deref() != Some("tapb") {
        assert!(
            live_seen.elapsed() < Duration::from_millis(500),
            "the bridge still forwards {MAC} to {:?} {:?} after go-live",
            fdb_port(&t.ns, MAC),
            live_seen.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "go-live seen {:?} after kill -9; bridge entry on tapb {:?} after that",
        live_seen - killed,
        live_seen.elapsed()
    );
    let (_, after) = serve(&s, next, 10, Duration::from_secs(20), &mut replies);
    assert!(
        after.is_some(),
        "the client got no reply: {}",
        secondary.stderr()
    );
    assert_counter_invariants(&replies, next);
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn a_partitioned_replication_link_leaves_exactly_one_side_live() {
    let p = start_pair("part", 1500);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 10, Duration::from_secs(30), &mut replies);
    // Drop the replication link both ways; the witness stays reachable.
    let nft = |args: &str| nft(&p.t.ns, args);
    nft("add table inet tdm");
    nft("add chain inet tdm out { type filter hook output priority 0 ; }");
    nft("add rule inet tdm out tcp dport 7401 drop");
    nft("add rule inet tdm out tcp sport 7401 drop");
    let (next2, first) = serve(&s, next, 20, Duration::from_secs(40), &mut replies);
    assert!(
        first.is_some(),
        "the client stopped being served\nprimary: {}\nsecondary: {}",
        p.primary.stderr(),
        p.secondary.stderr()
    );
    // Exactly one side fenced itself (its control socket says so); the
    // other is live.
    let deadline = Instant::now() + Duration::from_secs(20);
    let fenced = |h: &str| status(&p.t, h).is_some_and(|s| s.contains("\"role\":\"fenced\""));
    while Instant::now() < deadline && !fenced("a") && !fenced("b") {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    match (fenced("a"), fenced("b")) {
        (true, false) | (false, true) => {}
        other => panic!(
            "expected exactly one fenced side, got {other:?}\na: {:?}\nb: {:?}\nprimary: {}\nsecondary: {}",
            status(&p.t, "a"),
            status(&p.t, "b"),
            p.primary.stderr(),
            p.secondary.stderr()
        ),
    }
    let live = if fenced("a") { "b" } else { "a" };
    assert!(
        status(&p.t, live).is_some_and(|s| s.contains("\"role\":\"primary\"")),
        "{:?}",
        status(&p.t, live)
    );
    let (_, again) = serve(&s, next2, 5, Duration::from_secs(20), &mut replies);
    assert!(again.is_some(), "the surviving side stopped serving");
    assert_counter_invariants(&replies, next);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn the_console_socket_is_served_by_the_live_side() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let dir = std::env::temp_dir().join(format!("tandem-pair-con-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("console.sock");
    let t = topology_with(
        "con",
        1500,
        "received",
        &format!("console = \"unix:{}\"", sock.display()),
        "",
    );
    let (_witness, mut primary, secondary) = spawn_pair(&t.ns, &t.dir, &t.config);
    let (p_err, s_err) = (primary.errors.clone(), secondary.errors.clone());
    let connect = |limit: Duration| {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "console socket never served\nprimary: {:?}\nsecondary: {:?}",
                p_err.lock().unwrap(),
                s_err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The console shows what the guest printed, once released.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    while !seen.contains("netecho: up") {
        assert!(
            Instant::now() < deadline,
            "console never showed the guest: {seen:?}"
        );
        let mut c = connect(Duration::from_secs(30));
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(n) = c.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    // After a failover the new live side serves the same path.
    primary.child.kill().unwrap();
    let _ = primary.child.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !secondary.stderr().contains("going live") {
        assert!(
            Instant::now() < deadline,
            "no failover: {}",
            secondary.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    connect(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&t.dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_live_secondary_repairs_a_divergence_with_a_sync_point_from_the_primary() {
    // The rdtsc guest reads the TSC, which replay cannot reproduce: the
    // secondary's epochs diverge, it asks for a sync point, the primary
    // kicks its vCPU (a sync point) and commits on verified epochs
    // meanwhile, and the secondary repairs from it. The replay-lag bound
    // keeps the secondary close enough that its request reaches a primary
    // still running (on a loaded machine it once trailed the ~1 s run by
    // more, repaired at a sync point taken anyway, and the primary exited
    // before the request came).
    let ns = NetNs::new("rep2");
    let dir = test_dir("rdtsc");
    let config = plain_pair_file(
        &dir,
        "rdtsc",
        "hz=20 n=300",
        "32M",
        "failover_timeout_ms = 5000\nmax_replay_lag_ms = 200",
    );
    let (_witness, mut primary, mut secondary) = spawn_pair(&ns, &dir, &config);
    assert_eq!(
        wait_exit(&mut primary, Duration::from_secs(60)),
        Some(0),
        "{}",
        primary.stderr()
    );
    assert_eq!(
        wait_exit(&mut secondary, Duration::from_secs(60)),
        Some(0),
        "{}",
        secondary.stderr()
    );
    let s = secondary.stderr();
    assert!(s.contains("asking the primary for a sync point"), "{s}");
    assert!(s.contains("repaired at the sync point"), "{s}");
    assert!(
        primary.stderr().contains("reports epoch"),
        "{}",
        primary.stderr()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_secondary_joins_a_running_primary_and_takes_over_later() {
    // Lose the secondary (frozen, then killed): the primary runs
    // unprotected. `tandem pair` on that host brings a new secondary back:
    // the arbiter says host a is live, so it joins a's running VM at a full
    // sync point. Then the primary dies and the new secondary takes over;
    // the counter invariants hold across both faults.
    let mut p = start_pair("join", 1500);
    let config = p.t.config.display().to_string();
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 15, Duration::from_secs(30), &mut replies);
    signal(&p.secondary, libc::SIGUSR1);
    let (next, first) = serve(&s, next, 15, Duration::from_secs(30), &mut replies);
    assert!(
        first.is_some(),
        "not served after the secondary's USR1\nprimary: {}\nsecondary: {}",
        p.primary.stderr(),
        p.secondary.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.primary.stderr().contains("running unprotected") {
        assert!(Instant::now() < deadline, "{}", p.primary.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    p.secondary.child.kill().unwrap();
    let _ = p.secondary.child.wait();

    let joined = Proc::spawn(&p.t.ns, &["pair", "--config", &config, "--host", "b"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.primary.stderr().contains("secondary joined at stop") {
        assert!(
            Instant::now() < deadline,
            "no join\nprimary: {}\nnew secondary: {}",
            p.primary.stderr(),
            joined.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        joined.stderr().contains("joining as secondary"),
        "{}",
        joined.stderr()
    );
    let (next2, again) = serve(&s, next, 15, Duration::from_secs(30), &mut replies);
    assert!(again.is_some(), "the re-protected primary stopped serving");

    p.primary.child.kill().unwrap();
    let (_, after) = serve(&s, next2, 15, Duration::from_secs(30), &mut replies);
    assert!(
        after.is_some(),
        "the joined secondary did not take over: {}",
        joined.stderr()
    );
    assert!(
        joined.stderr().contains("going live"),
        "{}",
        joined.stderr()
    );
    assert!(
        joined.stderr().contains("joining the primary at its stop"),
        "{}",
        joined.stderr()
    );
    assert_counter_invariants(&replies, next2);
    // Memory went over in pre-copy rounds; the stop carried only what
    // changed since, and the joiner's memory matched the primary's at every
    // epoch (a wrong page would show up as a divergence).
    let joined_err = joined.stderr();
    assert!(joined_err.contains("pre-copy round 0: "), "{joined_err}");
    assert!(!joined_err.contains("diverged"), "{joined_err}");
    assert!(
        p.primary.stderr().contains("changed since pre-copy"),
        "{}",
        p.primary.stderr()
    );
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn fail_over_re_protect_and_fail_back() {
    // Kill the primary (a): b goes live. Restart a with `tandem pair`: the
    // arbiter says b is live, so a joins b as its secondary. Kill b: a
    // takes the VM back. The counter invariants hold across both failovers.
    let mut p = start_pair("back", 1500);
    let config = p.t.config.display().to_string();
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 15, Duration::from_secs(30), &mut replies);
    p.primary.child.kill().unwrap();
    let _ = p.primary.child.wait();
    let (next2, first) = serve(&s, next, 15, Duration::from_secs(30), &mut replies);
    assert!(
        first.is_some(),
        "b did not take over: {}",
        p.secondary.stderr()
    );

    let mut a = Proc::spawn(&p.t.ns, &["pair", "--config", &config, "--host", "a"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.secondary.stderr().contains("secondary joined at stop") {
        assert!(
            Instant::now() < deadline,
            "a never joined b\nb: {}\na: {}",
            p.secondary.stderr(),
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        a.stderr().contains("joining as secondary"),
        "{}",
        a.stderr()
    );
    let (next3, again) = serve(&s, next2, 15, Duration::from_secs(30), &mut replies);
    assert!(again.is_some(), "b stopped serving after a joined");

    p.secondary.child.kill().unwrap();
    let _ = p.secondary.child.wait();
    let (_, back) = serve(&s, next3, 15, Duration::from_secs(30), &mut replies);
    assert!(back.is_some(), "a did not take the VM back: {}", a.stderr());
    assert!(a.stderr().contains("going live"), "{}", a.stderr());
    assert_counter_invariants(&replies, next);
    assert_counter_invariants(&replies, next3);
    let _ = a.child.kill();
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

/// A number from one `tandem status --json` line.

#[test]
fn tandem_status_reports_both_sides() {
    let p = start_pair("stat", 1500);
    // Rates are sampled each second: give the sampler a full one.
    std::thread::sleep(Duration::from_millis(2500));
    let config = p.t.config.display().to_string();
    let mut cmd = common::tandem();
    cmd.args(["status", "--config", &config, "--json"]);
    let f = common::run_command(cmd, None, Duration::from_secs(20));
    assert_eq!(f.status, 0, "{f:?}");
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{f:?}");
    assert!(
        lines[0].contains("\"host\":\"a\"") && lines[0].contains("\"role\":\"primary\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("\"host\":\"b\"") && lines[1].contains("\"role\":\"secondary\""),
        "{}",
        lines[1]
    );
    assert!(
        lines[0].contains("\"generation\":1") && lines[0].contains("held_outputs"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("last_heartbeat_ms"), "{}", lines[1]);
    for field in [
        "sync_points",
        "epochs_verified",
        "divergences",
        "log_bytes_shipped",
        "log_kbit_s",
        "sync_points_per_s",
    ] {
        assert!(
            lines[0].contains(field) && lines[1].contains(field),
            "{field}: {lines:?}"
        );
    }
    // The primary ships log all the time (timer stops at least).
    let rate = status_figure(lines[0], "log_kbit_s");
    assert!(rate > 0, "log rate 0 while the guest runs: {}", lines[0]);
    // With no position counter (the default), every kick is a sync point
    // counted under its reason.
    assert!(
        status_figure(lines[0], "sync_points_unpositioned") > 0
            && status_figure(lines[0], "sync_points_full") == 0
            && lines[0].contains("irq_at_own_exits"),
        "{}",
        lines[0]
    );
    // The secondary reports how far its replay has executed.
    assert!(
        status_figure(lines[0], "secondary_replayed_stop") > 0
            && status_figure(lines[1], "at_stop") > 0,
        "{lines:?}"
    );
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn a_secondary_whose_replay_falls_behind_brakes_the_primary() {
    // The secondary's replay sleeps 5 ms at every stop (a test hook): it
    // receives and acks the log at once, so only its replay progress can
    // show the primary that it falls behind.
    let t = topology_with("rlag", 3000, "received", "", "max_replay_lag_ms = 300");
    let (_witness, primary) = spawn_waiting_primary(&t);
    let secondary = spawn_secondary_with_hook(&t, "TANDEM_TEST_REPLAY_STALL_US", "5000");
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let mut next = 0;
    // The lag once the secondary has caught up with what the primary ran
    // before its replay started (that backlog is there before the first
    // report, so the brake cannot bound it).
    let mut worst_lag = None;
    let mut looks_after = 0;
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        next = serve(&s, next, 5, Duration::from_secs(10), &mut replies).0;
        line = status(&t, "a").unwrap_or_default();
        if !line.contains("replay_lag_ms") || status_figure(&line, "secondary_replayed_stop") == 0 {
            continue;
        }
        let lag = status_figure(&line, "replay_lag_ms");
        match worst_lag.as_mut() {
            Some(worst) => {
                *worst = lag.max(*worst);
                looks_after += 1;
            }
            None if lag < 1000 => worst_lag = Some(lag),
            None => {}
        }
        if status_figure(&line, "replay_lag_waits") >= 3 && next >= 40 && looks_after >= 5 {
            break;
        }
    }
    eprintln!("primary status: {line}; worst replay lag once caught up {worst_lag:?} ms");
    assert!(
        status_figure(&line, "replay_lag_waits") >= 3,
        "the primary never braked for its secondary's replay: {line}\n{}",
        primary.stderr()
    );
    // Braked, the replay catches up, and stays within a bound near
    // max_replay_lag_ms: the lag counts the time the replay needs at its
    // measured speed (300–400 ms seen; before it did, the primary ran 2,600
    // stops in 0.3 s, braked only when the oldest watermark was 300 ms old,
    // and left the replay 10 s behind).
    assert!(
        worst_lag.is_some() && looks_after >= 5,
        "the replay never caught up: {line}"
    );
    let worst = worst_lag.unwrap_or(u64::MAX);
    assert!(
        worst <= 2000,
        "the replay fell {worst} ms behind with max_replay_lag_ms = 300: {line}"
    );
    assert!(next >= 40, "the guest stopped serving: {} echoes", next);
    assert_counter_invariants(&replies, 0);
    drop(secondary);
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn the_last_output_is_released_when_the_guest_ends() {
    // hello prints one line and exits at once: the primary must hold that
    // line until the secondary has (received / replayed) it, and must not
    // exit before releasing it, in both commit modes.
    for commit in ["received", "replayed"] {
        let ns = NetNs::new(&format!("end{}", &commit[..3]));
        let dir = test_dir(&format!("end-{commit}"));
        let config = plain_pair_file(
            &dir,
            "hello",
            "",
            "16M",
            &format!("failover_timeout_ms = 5000\noutput_commit = \"{commit}\""),
        );
        let (_witness, mut primary, mut secondary) = spawn_pair(&ns, &dir, &config);
        assert_eq!(
            wait_exit(&mut primary, Duration::from_secs(30)),
            Some(0),
            "{commit}: {}",
            primary.stderr()
        );
        assert_eq!(
            wait_exit(&mut secondary, Duration::from_secs(30)),
            Some(0),
            "{commit}: {}",
            secondary.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
        let out = primary.lines.lock().unwrap().join("\n");
        assert_eq!(
            out,
            "hello from tandem",
            "{commit}: primary printed {out:?}\nprimary: {}\nsecondary: {}",
            primary.stderr(),
            secondary.stderr()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_broken_replication_connection_resumes_without_a_failover() {
    // Abort the replication TCP connection (ss -K): the secondary reconnects
    // within the failover timeout and resumes from the frames it has; no
    // side goes live or fences, and a later failover still works.
    let mut p = start_pair("res", 3000);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 10, Duration::from_secs(30), &mut replies);
    let out =
        p.t.ns
            .command("ss")
            .args(["-K", "dst", "127.0.0.1", "dport", "7401"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "ss -K: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (next2, more) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    assert!(
        more.is_some(),
        "the pair stopped serving after the connection broke"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.secondary.stderr().contains("resuming from frame") {
        assert!(
            Instant::now() < deadline,
            "no resume\nprimary: {}\nsecondary: {}",
            p.primary.stderr(),
            p.secondary.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !p.secondary.stderr().contains("going live"),
        "{}",
        p.secondary.stderr()
    );
    assert!(
        !p.primary.stderr().contains("unprotected"),
        "{}",
        p.primary.stderr()
    );
    // The resumed secondary still holds the VM: take over from it.
    p.primary.child.kill().unwrap();
    let (_, after) = serve(&s, next2, 10, Duration::from_secs(30), &mut replies);
    assert!(
        after.is_some(),
        "no takeover after the resume: {}",
        p.secondary.stderr()
    );
    assert_counter_invariants(&replies, next2);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

/// The compute guest's result for `size` bytes and `rounds` rounds (the
/// algorithm in guest-images/compute.c).
#[test]
fn a_joiner_gets_memory_in_pre_copy_rounds_while_the_guest_writes_it() {
    // The primary runs the compute guest alone, rewriting a 256 KiB buffer;
    // a secondary joins it mid-run (pre-copy rounds while the guest
    // runs, then a short stop), the primary is killed, and the joiner
    // finishes the computation with the right result.
    const SIZE: usize = 256 << 10;
    const ROUNDS: u32 = 3;
    let ns = NetNs::new("pcopy");
    let dir = test_dir("pcopy");
    let config = plain_pair_file(
        &dir,
        "compute",
        &format!("size={SIZE} rounds={ROUNDS}"),
        "32M",
        "failover_timeout_ms = 1500",
    );
    let config = config.display().to_string();
    let _witness = spawn_witness(&ns, &dir);
    let mut primary = Proc::spawn(
        &ns,
        &["primary", "--config", &config, "--host", "a", "--alone"],
    );
    // Let it fill and start rewriting the buffer.
    std::thread::sleep(Duration::from_millis(1500));
    let joiner = Proc::spawn(&ns, &["secondary", "--config", &config, "--host", "b"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !primary.stderr().contains("secondary joined at stop") {
        assert!(
            Instant::now() < deadline,
            "no join\nprimary: {}\njoiner: {}",
            primary.stderr(),
            joiner.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The joiner says what it received as it gets to it: on a loaded host
    // its lines come a little after the primary's.
    wait_stderr(
        &joiner,
        "pre-copy round 0: ",
        Duration::from_secs(10),
        &primary,
    );
    wait_stderr(
        &joiner,
        "pre-copy round 1: ",
        Duration::from_secs(10),
        &primary,
    );
    assert!(
        primary.stderr().contains("changed since pre-copy"),
        "{}",
        primary.stderr()
    );
    // Run protected for a while (the joiner verifies every epoch), then
    // lose the primary before the guest is done.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !primary
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("compute:")),
        "the guest finished before the failover; make it longer"
    );
    primary.child.kill().unwrap();
    let _ = primary.child.wait();
    joiner.wait_for("compute: ", Duration::from_secs(60));
    let line = joiner
        .lines
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("compute: "))
        .cloned()
        .unwrap();
    let want = format!("hash={:#018x}", compute_hash(SIZE, ROUNDS));
    assert!(line.contains(&want), "{line} (want {want})");
    let err = joiner.stderr();
    assert!(err.contains("going live"), "{err}");
    assert!(!err.contains("diverged"), "{err}");
    eprintln!("joiner:\n{err}\nprimary:\n{}", primary.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_primary_frozen_for_half_the_timeout_holds_output_until_it_re_validates() {
    // Frozen for longer than half the failover timeout but less than all of
    // it: no failover, but the thawed primary must not release anything on
    // the strength of acks read late; it holds until a fresh echo from the
    // secondary and the arbiter confirm it still holds its generation.
    let p = start_pair("lease", 3000);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 5, Duration::from_secs(20), &mut replies);
    signal(&p.primary, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(2000));
    signal(&p.primary, libc::SIGCONT);
    let (_, more) = serve(&s, next, 10, Duration::from_secs(20), &mut replies);
    assert!(more.is_some(), "{}", p.primary.stderr());
    let err = p.primary.stderr();
    let held = err
        .find("holding output")
        .unwrap_or_else(|| panic!("{err}"));
    let revalidated = err
        .find("re-validated: releasing output again")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(held < revalidated, "{err}");
    assert!(
        !p.secondary.stderr().contains("going live"),
        "{}",
        p.secondary.stderr()
    );
    assert_counter_invariants(&replies, next);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

/// Resident memory of a running process, in KiB (panics with its stderr
/// once it has ended).
fn rss_kib(p: &Proc) -> u64 {
    let pid = p.child.id();
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("process {pid} is gone: {}", p.stderr()))
}

#[test]
fn a_network_flood_while_the_vcpu_waits_does_not_grow_the_primarys_memory() {
    // The secondary stalls, so the primary's brake stops its vCPU; a client
    // floods the guest meanwhile. Frames the vCPU cannot take are dropped
    // (as a NIC drops) instead of queueing without bound.
    let p = start_pair("flood", 20_000);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 3, Duration::from_secs(20), &mut replies);
    let before = rss_kib(&p.primary);
    signal(&p.secondary, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1000));
    let payload = vec![0x5au8; 1400];
    // At least 4 s and 300 MiB (a loaded machine sends slower), at most 20 s.
    let flood_from = Instant::now();
    let mut sent = 0u64;
    let mut peak = before;
    while flood_from.elapsed() < Duration::from_secs(20)
        && (flood_from.elapsed() < Duration::from_secs(4) || sent * 1400 < 300 << 20)
    {
        for _ in 0..256 {
            if s.send_to(&payload, format!("{GUEST_IP}:9")).is_ok() {
                sent += 1;
            }
        }
        peak = peak.max(rss_kib(&p.primary));
    }
    let grown_mib = peak.saturating_sub(before) / 1024;
    let st = status(&p.t, "a").unwrap();
    signal(&p.secondary, libc::SIGCONT);
    eprintln!(
        "flood: {sent} frames of 1400 B sent ({} MiB); primary RSS {} MiB -> peak {} MiB; {st}",
        (sent * 1400) >> 20,
        before / 1024,
        peak / 1024
    );
    assert!(sent * 1400 > 256 << 20, "the flood was too small to tell");
    assert!(status_figure(&st, "inputs_dropped") > 0, "{st}");
    assert!(grown_mib < 64, "the primary grew by {grown_mib} MiB");
    let (_, more) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    assert!(more.is_some(), "{}", p.primary.stderr());
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

#[test]
fn a_full_state_dir_drops_protection_and_the_primary_carries_on() {
    // The secondary's state_dir is a small tmpfs; filling it makes the
    // secondary stop (fenced, saying why) and the primary run on
    // unprotected, its guest still serving.
    let t = topology("full", 1500, "received");
    let small = t.dir.join("b-state");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tandem-test"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let text = std::fs::read_to_string(&t.config).unwrap();
    let state = t.dir.join("state");
    let b_config = t.dir.join("pair-b.toml");
    std::fs::write(
        &b_config,
        text.replace(
            &format!("state_dir = \"{}\"", state.display()),
            &format!("state_dir = \"{}\"", small.display()),
        )
        .replace(
            "tap = \"tapb\" }",
            &format!(
                "tap = \"tapb\", control = \"unix:{}\" }}",
                state.join("b.ctl").display()
            ),
        ),
    )
    .unwrap();
    let _witness = spawn_witness(&t.ns, &t.dir);
    let config = t.config.display().to_string();
    let primary = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
    std::thread::sleep(Duration::from_millis(300));
    let b = b_config.display().to_string();
    let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &b, "--host", "b"]);
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(20), &mut replies);
    assert!(first.is_some(), "{}", primary.stderr());
    // Fill the secondary's state_dir.
    let _ = std::fs::write(small.join("filler"), vec![0u8; 4 << 20]);
    let fenced = wait_fenced(&t, "b", Duration::from_secs(20));
    assert!(fenced.contains("is full"), "{fenced}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !primary.stderr().contains("running unprotected") {
        assert!(Instant::now() < deadline, "{}", primary.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, more) = serve(&s, next, 5, Duration::from_secs(20), &mut replies);
    assert!(more.is_some(), "{}", primary.stderr());
    assert_counter_invariants(&replies, next);
    drop(secondary);
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
#[ignore = "once failed to come up under make test with a CPU hog (cause not found): run by make chaos"]
fn a_secondary_tries_again_when_the_primary_was_too_slow_for_its_handshake() {
    // The primary freezes while it waits for its secondary: the kernel
    // still accepts the connection, so the secondary's handshake times out
    // (10 s). It tries again instead of exiting, and the pair protects the
    // VM once the primary thaws.
    let t = topology("slowhs", 1500, "received");
    let (_witness, primary) = spawn_waiting_primary(&t);
    let config = t.config.display().to_string();
    signal(&primary, libc::SIGSTOP);
    let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &config, "--host", "b"]);
    wait_stderr(
        &secondary,
        "trying again",
        Duration::from_secs(30),
        &primary,
    );
    signal(&primary, libc::SIGCONT);
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, first) = serve(&s, 0, 5, Duration::from_secs(30), &mut replies);
    assert!(first.is_some(), "{}", primary.stderr());
    // The secondary really follows: it takes over.
    let mut primary = primary;
    primary.child.kill().unwrap();
    let _ = primary.child.wait();
    let (_, after) = serve(&s, next, 5, Duration::from_secs(30), &mut replies);
    assert!(after.is_some(), "no takeover: {}", secondary.stderr());
    assert_counter_invariants(&replies, next);
    let _ = std::fs::remove_dir_all(&t.dir);
}
