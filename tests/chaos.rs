//! Chaos: a protected netecho counter VM under one random fault per round
//! (kill -9 of either side or the witness, USR1, SIGSTOP past the failover
//! timeout, a partitioned or lossy replication path, corrupt, stalled or
//! delayed replication messages, a full state_dir under the secondary),
//! re-protected after each, while a client
//! asks for counter values the whole time. Invariants: no counter value is
//! handed to two requests, none a client saw is lost, a side that lost the
//! arbitration emits nothing once the other is live, the VM serves again
//! within a bound, no divergence.
//!
//! `make test` runs one round of each kind (CHAOS_ROUNDS defaults to 16);
//! `make chaos` a long random series that writes RELIABILITY.md
//! (CHAOS_REPORT). CHAOS_SEED replays a series. CHAOS_CRASH_POLICY=
//! restart-checkpoint runs the pair with checkpoints and output held for
//! them. CHAOS_ARBITER=etcd arbitrates on a 3-member etcd cluster.
//! CHAOS_POSITION=auto places kick stops with the position counter
//! (`[ft] position`). CHAOS_STORAGE=mirrored
//! gives each host its own replica of the counter's disk (mirrored storage)
//! instead of one shared image.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd;
use common::netns::NetNs;
use common::pair::*;
use common::proxy::{self, Corruption, ProxyState};

/// Real replication addresses of hosts a and b, and the proxies in front
/// of them (each host reaches its peer through the peer's proxy).
const REAL: [&str; 2] = ["127.0.0.1:7401", "127.0.0.2:7402"];
const PROXY: [&str; 2] = ["127.0.0.3:7401", "127.0.0.4:7402"];
const HOSTS: [&str; 2] = ["a", "b"];
const TAPS: [&str; 2] = ["tapa", "tapb"];
const FAILOVER_MS: u64 = 1500;
/// The VM must answer again within this after any fault.
const SERVICE_BOUND: Duration = Duration::from_secs(25);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9Primary,
    Kill9Secondary,
    Kill9Witness,
    Usr1Primary,
    Usr1Secondary,
    StopPrimaryPastTimeout,
    Partition,
    PacketLoss,
    Corrupt(Corruption),
    Stall,
    Delay,
    FullDisk,
}

const FAULTS: [Fault; 16] = [
    Fault::Kill9Primary,
    Fault::Kill9Secondary,
    Fault::Kill9Witness,
    Fault::Usr1Primary,
    Fault::Usr1Secondary,
    Fault::StopPrimaryPastTimeout,
    Fault::Partition,
    Fault::PacketLoss,
    Fault::Corrupt(Corruption::FlipBit),
    Fault::Corrupt(Corruption::Duplicate),
    Fault::Corrupt(Corruption::Reorder),
    Fault::Corrupt(Corruption::Truncate),
    Fault::Corrupt(Corruption::ReplayOld),
    Fault::Stall,
    Fault::Delay,
    Fault::FullDisk,
];

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every request the client sent and every reply it got, with times.
#[derive(Default)]
struct ClientLog {
    sent: BTreeMap<u32, Instant>,
    replies: Vec<(u32, u64, Instant)>,
}

/// A client asking the counter for values until told to stop.
fn start_client(ns: &NetNs, stop: Arc<AtomicBool>) -> Arc<Mutex<ClientLog>> {
    let log: Arc<Mutex<ClientLog>> = Arc::default();
    let s = ns.udp_socket("10.78.0.1:0");
    let l = log.clone();
    std::thread::spawn(move || {
        let mut id = 0u32;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            l.lock().unwrap().sent.insert(id, Instant::now());
            let got = counter(&s, 7, id, Duration::from_millis(200));
            let now = Instant::now();
            let mut l = l.lock().unwrap();
            for (r, v) in got {
                l.replies.push((r, v, now));
            }
        }
    });
    log
}

/// Each host's own `state_dir`, a small tmpfs (so a round can fill it),
/// unmounted on drop.
struct StateDirs([std::path::PathBuf; 2]);

impl StateDirs {
    fn mount(root: &std::path::Path) -> Self {
        let dirs = [0, 1].map(|i| root.join(format!("state-{}", HOSTS[i])));
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=4m", "tandem-chaos"])
                .arg(d)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount a tmpfs on {}", d.display());
        }
        Self(dirs)
    }
}

impl Drop for StateDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::process::Command::new("umount").arg(d).status();
        }
    }
}

struct Chaos {
    t: Topology,
    configs: [String; 2],
    witness: Option<Proc>,
    /// CHAOS_ARBITER=etcd: the members (None while one is down).
    etcd: Vec<Option<Proc>>,
    hosts: [Option<Proc>; 2],
    proxies: [Arc<ProxyState>; 2],
    /// Last: dropped (unmounted) after the processes using it.
    state_dirs: StateDirs,
}

impl Chaos {
    fn start() -> Self {
        let mirrored = mirrored();
        let mut ft_extra = String::new();
        if mirrored {
            ft_extra += "storage = \"mirrored\"\n";
        }
        if checkpointing() {
            ft_extra += "on_guest_crash = \"restart-checkpoint\"\n";
        }
        if let Some(position) = position() {
            ft_extra += &format!("position = \"{position}\"\n");
        }
        let t = topology_with("chaos", FAILOVER_MS, "received", "", &ft_extra);
        let mut text = std::fs::read_to_string(&t.config).unwrap();
        if spinning() {
            text = text.replace(
                &format!("cmdline = \"ip={GUEST_IP}\""),
                &format!("cmdline = \"ip={GUEST_IP} spin=1\""),
            );
            assert!(text.contains("spin=1"), "{text}");
        }
        assert!(text.contains(REAL[0]) && text.contains(REAL[1]));
        // Host i reaches its peer through the peer's proxy and keeps its
        // state in its own small state_dir; the control sockets stay in
        // `state/`, where the status helper looks.
        let state_dirs = StateDirs::mount(&t.dir);
        let shared_state = t.dir.join("state");
        std::fs::create_dir_all(&shared_state).unwrap();
        for (host, tap) in HOSTS.iter().zip(TAPS) {
            let control = shared_state.join(format!("{host}.ctl"));
            // Mirrored: host i's replica `i/disk.img` (same file name: the
            // disk's id), a copy of the shared image.
            let replica = if mirrored {
                let dir = t.dir.join(host);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::copy(t.dir.join("disk.img"), dir.join("disk.img")).unwrap();
                format!(", disk = [\"{}\"]", dir.join("disk.img").display())
            } else {
                String::new()
            };
            text = text.replace(
                &format!("tap = \"{tap}\" }}"),
                &format!(
                    "tap = \"{tap}\", control = \"unix:{}\"{replica} }}",
                    control.display()
                ),
            );
        }
        if on_etcd() {
            text = text.replace(
                "witness = \"tcp://127.0.0.1:7500\"",
                &etcd::ft_lines(&t.dir, "127.0.0.1", "tandem-chaos"),
            );
            assert!(text.contains("etcd://"), "{text}");
        }
        // Each host names its peer by the proxy's address while the peer's
        // connections arrive from the peer's own: a middlebox, as behind
        // NAT (the address check is tested in tests/security.rs).
        text = text.replace("\n[ft]\n", "\n[ft]\nverify_peer_address = false\n");
        assert!(text.contains("verify_peer_address = false"), "{text}");
        let configs = [0, 1].map(|i| {
            let peer = 1 - i;
            let path = t.dir.join(format!("pair-{}.toml", HOSTS[i]));
            let own = text.replace(REAL[peer], PROXY[peer]).replace(
                &format!("state_dir = \"{}\"", shared_state.display()),
                &format!("state_dir = \"{}\"", state_dirs.0[i].display()),
            );
            assert!(own.contains(&*state_dirs.0[i].to_string_lossy()), "{own}");
            std::fs::write(&path, own).unwrap();
            path.display().to_string()
        });
        let proxies = [0, 1].map(|i| proxy::start(&t.ns, PROXY[i], REAL[i]));
        // The arbiter: the witness, or (CHAOS_ARBITER=etcd) a 3-member etcd
        // cluster, whose "witness" fault kills and restarts one member.
        let (witness, etcd) = if on_etcd() {
            (None, etcd::start_cluster(&t.ns, &t.dir, "127.0.0.1"))
        } else {
            (Some(spawn_witness(&t.ns, &t.dir)), Vec::new())
        };
        let mut c = Chaos {
            t,
            configs,
            witness,
            etcd: etcd.into_iter().map(Some).collect(),
            hosts: [None, None],
            proxies,
            state_dirs,
        };
        c.hosts[0] = Some(c.spawn(0, "primary"));
        std::thread::sleep(Duration::from_millis(300));
        c.hosts[1] = Some(c.spawn(1, "secondary"));
        c.hosts[0]
            .as_ref()
            .unwrap()
            .wait_for("netecho: up", Duration::from_secs(60));
        c
    }

    fn spawn(&self, i: usize, role: &str) -> Proc {
        Proc::spawn(
            &self.t.ns,
            &[role, "--config", &self.configs[i], "--host", HOSTS[i]],
        )
    }

    fn status(&self, i: usize) -> String {
        status(&self.t, HOSTS[i]).unwrap_or_default()
    }

    /// The host running the VM live (primary, not fenced), if exactly one.
    fn live(&self) -> Option<usize> {
        let live: Vec<usize> = (0..2)
            .filter(|&i| self.status(i).contains("\"role\":\"primary\""))
            .collect();
        (live.len() == 1).then(|| live[0])
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        // Where every thread of each side waits (thread names say which).
        for (host, p) in HOSTS.iter().zip(&self.hosts) {
            let Some(p) = p else { continue };
            let _ = write!(s, "--- host {host}: {}", p.threads());
        }
        for (host, p) in HOSTS.iter().zip(&self.hosts) {
            if let Some(p) = p {
                let _ = writeln!(s, "--- host {host}:\n{}", p.stderr());
            }
        }
        s
    }

    fn wait(&self, what: &str, limit: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.hosts[i].take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// With positions: host `i` (the secondary) kills itself with SIGKILL
    /// in the middle of its next landing (the fault point
    /// `TANDEM_TEST_FAULT_DIR/kill-in-landing.PID`); if no landing comes
    /// within 5 s (a guest asleep in HLT takes none), it is killed anyway.
    /// True: it died in a landing.
    fn kill_in_landing(&mut self, i: usize) -> bool {
        let Some(mut p) = self.hosts[i].take() else {
            return false;
        };
        let point = fault_dir().join(format!("kill-in-landing.{}", p.child.id()));
        std::fs::write(&point, b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut died = false;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = p.child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                died = status.signal() == Some(libc::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
        let _ = std::fs::remove_file(point);
        died
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(p) = &self.hosts[i] {
            signal(p, sig);
        }
    }

    fn nft(&self, args: &str) {
        nft(&self.t.ns, args);
    }

    /// Drops replication traffic (every packet, or `percent` of them).
    fn drop_replication(&self, percent: Option<u32>) {
        self.nft("add table inet chaos");
        self.nft("add chain inet chaos out { type filter hook output priority 0 ; }");
        let cond = percent.map_or(String::new(), |p| format!("numgen random mod 100 < {p} "));
        for dir in ["dport", "sport"] {
            self.nft(&format!(
                "add rule inet chaos out tcp {dir} {{ 7401, 7402 }} {cond}drop"
            ));
        }
    }

    fn heal(&self) {
        let _ = self
            .t
            .ns
            .command("nft")
            .args(["delete", "table", "inet", "chaos"])
            .output();
    }

    /// Any host that is dead, fenced or frozen is replaced by a fresh
    /// `tandem pair`; then waits until the live side has its secondary.
    fn reprotect(&mut self) {
        // A replacement may itself fail (its join cut by a leftover fault,
        // a fence): keep replacing whatever is not a healthy secondary.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut replaced_at: Option<Instant> = None;
        loop {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for re-protection\n{}",
                self.logs()
            );
            let Some(live) = self.live() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let other = 1 - live;
            let other_status = self.status(other);
            if self.status(live).contains("\"peer\":\"attached\"")
                && other_status.contains("\"role\":\"secondary\"")
            {
                return;
            }
            let running = self.hosts[other]
                .as_mut()
                .is_some_and(|p| p.child.try_wait().ok().flatten().is_none());
            let settling = replaced_at.is_some_and(|t| t.elapsed() < Duration::from_secs(10));
            let broken = !running
                || other_status.contains("\"role\":\"fenced\"")
                || (!settling && !other_status.contains("\"role\":\"secondary\""));
            if broken {
                self.kill(other);
                self.hosts[other] = Some(self.spawn(other, "pair"));
                replaced_at = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What a run found.
#[derive(Default)]
struct Findings {
    rounds: u32,
    by_kind: BTreeMap<Fault, u32>,
    corrupt_injected: u32,
    corrupt_detected: u32,
    fencing_violations: u32,
    /// Frames a thawed old primary emitted after the other side went live.
    late_frames: u64,
    split_brain: u32,
    max_unavailable: Duration,
    divergences: u64,
    /// With positions: secondaries killed (SIGKILL) in the middle of a
    /// landing.
    killed_in_landing: u32,
}

fn resumes(p: &Option<Proc>) -> usize {
    p.as_ref()
        .map_or(0, |p| p.stderr().matches("resuming from frame").count())
}

/// Runs one fault and the recovery from it.
fn round(c: &mut Chaos, fault: Fault, f: &mut Findings, rng: &mut Rng) -> Instant {
    let live = c.live().expect("one live side before the fault");
    let other = 1 - live;
    std::thread::sleep(Duration::from_millis(rng.below(500)));
    let at = Instant::now();
    match fault {
        Fault::Kill9Primary => c.kill(live),
        Fault::Kill9Secondary if position().is_some() => {
            if c.kill_in_landing(other) {
                f.killed_in_landing += 1;
            }
        }
        Fault::Kill9Secondary => c.kill(other),
        Fault::Kill9Witness if on_etcd() => {
            // One member, chosen at random, down for a moment.
            let i = rng.below(3) as usize;
            if let Some(mut m) = c.etcd[i].take() {
                let _ = m.child.kill();
                let _ = m.child.wait();
            }
            std::thread::sleep(Duration::from_millis(300));
            c.etcd[i] = Some(etcd::etcd_member_at(&c.t.ns, &c.t.dir, i, "127.0.0.1"));
        }
        Fault::Kill9Witness => {
            if let Some(mut w) = c.witness.take() {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
            std::thread::sleep(Duration::from_millis(300));
            c.witness = Some(spawn_witness(&c.t.ns, &c.t.dir));
        }
        Fault::Usr1Primary => c.signal(live, libc::SIGUSR1),
        Fault::Usr1Secondary => c.signal(other, libc::SIGUSR1),
        Fault::StopPrimaryPastTimeout => {
            c.signal(live, libc::SIGSTOP);
            c.wait("the secondary to go live", SERVICE_BOUND, |c| {
                c.status(other).contains("\"role\":\"primary\"")
            });
            // From here the old primary's port must stay silent.
            let frames = frames_from_vm(&c.t.ns, TAPS[live]);
            c.signal(live, libc::SIGCONT);
            c.wait("the thawed primary to fence", SERVICE_BOUND, |c| {
                c.status(live).contains("\"role\":\"fenced\"")
            });
            std::thread::sleep(Duration::from_millis(300));
            // SIGSTOP may land while the primary is emitting output it was
            // already allowed to release (acked, so in the new primary's
            // replayed prefix): such late frames are exact duplicates, which
            // the client's check of every reply proves. Counted, not failed.
            f.late_frames += frames_from_vm(&c.t.ns, TAPS[live]).saturating_sub(frames);
        }
        Fault::Partition => {
            c.drop_replication(None);
            c.wait("one side to fence", SERVICE_BOUND, |c| {
                (0..2).any(|i| c.status(i).contains("\"role\":\"fenced\""))
            });
            let fenced = (0..2)
                .find(|&i| c.status(i).contains("\"role\":\"fenced\""))
                .unwrap();
            let frames = frames_from_vm(&c.t.ns, TAPS[fenced]);
            std::thread::sleep(Duration::from_millis(500));
            c.heal();
            std::thread::sleep(Duration::from_millis(300));
            if frames_from_vm(&c.t.ns, TAPS[fenced]) != frames {
                f.fencing_violations += 1;
            }
        }
        Fault::PacketLoss => {
            c.drop_replication(Some(30));
            std::thread::sleep(Duration::from_millis(3000));
            c.heal();
        }
        Fault::Corrupt(kind) => {
            // The secondary reaches the live side through its proxy.
            let proxy = c.proxies[live].clone();
            let before = (
                proxy.injected.load(Ordering::SeqCst),
                resumes(&c.hosts[other]),
            );
            proxy.arm(kind);
            c.wait("the corruption", SERVICE_BOUND, |_| {
                proxy.injected.load(Ordering::SeqCst) > before.0
            });
            f.corrupt_injected += 1;
            // Detected: the secondary dropped the connection and resumed
            // (it never applied the bad message: see the divergence count).
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if resumes(&c.hosts[other]) > before.1 {
                    f.corrupt_detected += 1;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Fault::FullDisk => {
            // The secondary's state_dir fills up: it stops, saying why; the
            // primary runs on unprotected until re-protection (after the
            // operator made room, as here).
            let filler = c.state_dirs.0[other].join("filler");
            let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
            c.wait(
                "the secondary to stop on its full state_dir",
                SERVICE_BOUND,
                |c| c.status(other).contains("is full"),
            );
            let _ = std::fs::remove_file(&filler);
        }
        Fault::Stall => c.proxies[live].stall(Duration::from_millis(FAILOVER_MS / 2)),
        Fault::Delay => c.proxies[live].delay(Duration::from_millis(20), Duration::from_secs(2)),
    }
    *f.by_kind.entry(fault).or_default() += 1;
    // Split brain: two sides live (not fenced) at once, once things settle.
    std::thread::sleep(Duration::from_millis(200));
    if (0..2).all(|i| c.status(i).contains("\"role\":\"primary\"")) {
        c.wait(
            "the extra live side to fence",
            Duration::from_secs(10),
            |c| c.live().is_some(),
        );
        if c.live().is_none() {
            f.split_brain += 1;
        }
    }
    at
}

/// Checks the client's log; returns lost acknowledged outputs (values a
/// client saw that a later answer did not continue from) and panics on a
/// value handed to two requests.
fn check_replies(log: &ClientLog, faults: &[Instant]) -> u64 {
    assert_no_value_reused(log.replies.iter().map(|&(id, value, _)| (id, value)));
    let mut lost = 0;
    for &at in faults {
        let seen = log
            .replies
            .iter()
            .filter(|r| r.2 < at)
            .map(|r| r.1)
            .max()
            .unwrap_or(0);
        lost += log
            .replies
            .iter()
            .filter(|(id, v, _)| log.sent.get(id).is_some_and(|s| *s > at) && *v <= seen)
            .count() as u64;
    }
    lost
}

#[test]
fn chaos_rounds_keep_every_invariant() {
    let rounds: u32 = std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(FAULTS.len() as u32);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!(
        "chaos: {rounds} rounds, CHAOS_SEED={seed}, storage {}",
        if mirrored() { "mirrored" } else { "shared" }
    );
    let started = Instant::now();
    let mut rng = Rng(seed);
    std::fs::create_dir_all(fault_dir()).unwrap();
    std::env::set_var("TANDEM_TEST_FAULT_DIR", fault_dir());
    let mut c = Chaos::start();
    let stop = Arc::new(AtomicBool::new(false));
    let client = start_client(&c.t.ns, stop.clone());
    let mut findings = Findings::default();
    let mut faults = Vec::new();
    for n in 0..rounds {
        // CHAOS_ONLY=Kind,Kind,...: those kinds in turn (to reproduce);
        // else every kind once in the first rounds, then at random.
        let only: Vec<Fault> = std::env::var("CHAOS_ONLY")
            .unwrap_or_default()
            .split(',')
            .filter_map(|k| {
                FAULTS
                    .iter()
                    .find(|f| format!("{f:?}") == k.trim())
                    .copied()
            })
            .collect();
        let fault = if !only.is_empty() {
            only[n as usize % only.len()]
        } else if (n as usize) < FAULTS.len() && rounds as usize >= FAULTS.len() {
            FAULTS[n as usize]
        } else {
            FAULTS[rng.below(FAULTS.len() as u64) as usize]
        };
        let at = round(&mut c, fault, &mut findings, &mut rng);
        faults.push(at);
        // Served again: the first reply to a request sent after the fault.
        let deadline = at + SERVICE_BOUND;
        let back = loop {
            let log = client.lock().unwrap();
            let first = log
                .replies
                .iter()
                .filter(|(id, _, _)| log.sent.get(id).is_some_and(|s| *s > at))
                .map(|r| r.2)
                .min();
            drop(log);
            if let Some(t) = first {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "round {n} ({fault:?}): not served within {SERVICE_BOUND:?}\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let unavailable = back.saturating_duration_since(at);
        findings.max_unavailable = findings.max_unavailable.max(unavailable);
        c.reprotect();
        let live = c.live().unwrap();
        findings.divergences += (0..2)
            .filter(|&i| i != live)
            .map(|i| status_figure(&c.status(i), "divergences"))
            .sum::<u64>();
        findings.rounds += 1;
        eprintln!(
            "round {n}: {fault:?}, served again after {} ms, live side {}",
            unavailable.as_millis(),
            HOSTS[live]
        );
    }
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let log = client.lock().unwrap();
    let lost = check_replies(&log, &faults);
    let summary = format!(
        "rounds: {}, faults: {}, lost acknowledged outputs: {lost}, split-brain: {}, max unavailability: {} ms",
        findings.rounds,
        faults.len(),
        findings.split_brain,
        findings.max_unavailable.as_millis()
    );
    eprintln!("{summary}");
    if position().is_some() {
        eprintln!(
            "positions: {} secondaries killed in the middle of a landing",
            findings.killed_in_landing
        );
    }
    if let Ok(path) = std::env::var("CHAOS_REPORT") {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Reliability\n\nWritten by `make chaos` (tests/chaos.rs) on {}.\n",
            chrono_free_date()
        );
        let _ = writeln!(md, "`{summary}`\n");
        let _ = writeln!(
            md,
            "- seed: `CHAOS_SEED={seed}` (rerun with it to replay the same fault sequence)"
        );
        let _ = writeln!(
            md,
            "- storage: {}",
            if mirrored() {
                "mirrored (`CHAOS_STORAGE=mirrored`: each host its own replica of the counter's disk)"
            } else {
                "shared (one image both hosts reach)"
            }
        );
        if on_etcd() {
            let _ = writeln!(
                md,
                "- arbiter: a 3-member etcd cluster (`CHAOS_ARBITER=etcd`; the witness fault kills one member and restarts it)"
            );
        }
        if spinning() {
            let _ = writeln!(
                md,
                "- guest: netecho spin=1 (`CHAOS_GUEST=spin`: it never sleeps in HLT, busy-waiting between timer ticks)"
            );
        }
        if let Some(position) = position() {
            let _ = writeln!(
                md,
                "- positions: `{position}` (`CHAOS_POSITION`: kicks are positioned stops the secondary lands on, not sync points)"
            );
        }
        if checkpointing() {
            let _ = writeln!(
                md,
                "- crash policy: restart-checkpoint (`CHAOS_CRASH_POLICY`: checkpoints every 20 ms, all output held until the next)"
            );
        }
        let _ = writeln!(
            md,
            "- run time: {} s on this machine",
            started.elapsed().as_secs()
        );
        let _ = writeln!(
            md,
            "- replies checked: {} to {} requests",
            log.replies.len(),
            log.sent.len()
        );
        let _ = writeln!(
            md,
            "- fencing violations (frames from the port of a side fenced by a partition, after it was fenced): {}",
            findings.fencing_violations
        );
        let _ = writeln!(
            md,
            "- late frames from a thawed primary after the other side went live (output it was releasing when SIGSTOP hit; every reply the client got was checked to be an exact duplicate): {}",
            findings.late_frames
        );
        let _ = writeln!(
            md,
            "- divergences seen on a secondary: {} (unrepaired: 0, or the run would have failed)",
            findings.divergences
        );
        if position().is_some() {
            let _ = writeln!(
                md,
                "- secondaries killed (SIGKILL) in the middle of a landing: {} of {} kill -9 faults of the secondary",
                findings.killed_in_landing,
                findings.by_kind.get(&Fault::Kill9Secondary).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            md,
            "- corrupt messages detected / injected: {} / {}\n",
            findings.corrupt_detected, findings.corrupt_injected
        );
        let _ = writeln!(md, "| fault | rounds |\n|---|---|");
        for (kind, n) in &findings.by_kind {
            let _ = writeln!(md, "| {kind:?} | {n} |");
        }
        // The last `make fuzz`, if any.
        let fuzz = concat!(env!("CARGO_MANIFEST_DIR"), "/target/fuzz-report.md");
        let fuzz = std::fs::read_to_string(fuzz)
            .unwrap_or_else(|_| "- fuzzing: no `make fuzz` run on this checkout yet\n".into());
        let _ = writeln!(md, "\n## Fuzzing\n\n{fuzz}");
        // The sections after the fuzzing one (other series, earlier runs)
        // are kept: this run replaces only the headline and its table.
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| {
                let fuzzing = old.find("\n## Fuzzing")? + 1;
                let next = old[fuzzing..].find("\n## ")? + fuzzing;
                Some(old[next..].to_string())
            })
            .unwrap_or_default();
        md.push_str(&kept);
        std::fs::write(&path, md).unwrap();
    }
    assert_eq!(lost, 0, "{summary}");
    assert_eq!(findings.split_brain, 0, "{summary}");
    assert_eq!(findings.fencing_violations, 0, "{summary}");
    assert_eq!(findings.divergences, 0, "{summary}");
    assert_eq!(
        findings.corrupt_detected, findings.corrupt_injected,
        "{summary}"
    );
    drop(log);
    for i in 0..2 {
        c.kill(i);
    }
    let Chaos {
        t,
        state_dirs,
        witness,
        ..
    } = c;
    drop(witness);
    drop(state_dirs); // unmounted before the directory goes
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// `CHAOS_STORAGE=mirrored`: each host has its own replica.
fn mirrored() -> bool {
    std::env::var("CHAOS_STORAGE").is_ok_and(|v| v == "mirrored")
}

/// `CHAOS_ARBITER=etcd`: the pair arbitrates on a 3-member etcd cluster.
fn on_etcd() -> bool {
    std::env::var("CHAOS_ARBITER").is_ok_and(|v| v == "etcd")
}

/// `CHAOS_GUEST=spin`: the guest never sleeps in HLT (netecho spin=1).
fn spinning() -> bool {
    std::env::var("CHAOS_GUEST").is_ok_and(|v| v == "spin")
}

/// Where the chaos runner drops fault-point files for the pair it runs
/// (`TANDEM_TEST_FAULT_DIR`, set for every process it spawns).
fn fault_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tandem-chaos-faults-{}", std::process::id()))
}

/// `CHAOS_POSITION=auto|kvm-insn-stat`: the pair places kick stops with
/// that position counter (`[ft] position`).
fn position() -> Option<String> {
    std::env::var("CHAOS_POSITION")
        .ok()
        .filter(|v| !v.is_empty() && v != "none")
}

/// `CHAOS_CRASH_POLICY=restart-checkpoint`: the pair takes checkpoints and
/// holds all output (disk writes too) until the next one.
fn checkpointing() -> bool {
    std::env::var("CHAOS_CRASH_POLICY").is_ok_and(|v| v == "restart-checkpoint")
}

/// Today's date (UTC) from the system clock, without a date crate.
fn chrono_free_date() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out
}
