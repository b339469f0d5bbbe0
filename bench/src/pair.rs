//! The protected pair under the bench: a fresh network namespace per pair
//! (lo up; with a bridge and one tap per host when the guest has a NIC), a
//! witness, `tandem primary` pinned to `ctx.cpu` and `tandem secondary`
//! pinned to `ctx.cpu2`, hosts on 127.0.0.1 / 127.0.0.2 inside the
//! namespace so ports never clash. Everything started here is killed and
//! the namespace deleted when the `Pair` drops, on every path.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::netecho::{self, NetNs};
use crate::proc::{self, Lines, Running};
use crate::stats::summary_json;

/// What a pair runs and how it is protected.
pub struct PairSpec<'a> {
    pub guest: &'a Path,
    pub cmdline: &'a str,
    pub mem: &'a str,
    pub disk: Option<&'a Path>,
    /// One NIC (netecho's MAC), on tapa / tapb.
    pub net: bool,
    /// `output_commit`: "received" or "replayed".
    pub commit: &'a str,
    /// `failover_timeout_ms`; `None` keeps the default (2000).
    pub failover_ms: Option<u64>,
    /// `heartbeat_ms`; `None` keeps the default (100).
    pub heartbeat_ms: Option<u64>,
    /// Mirrored storage: host a's and host b's replicas of `disk` (which
    /// then only names the disk); `None`: shared storage.
    pub replicas: Option<[&'a Path; 2]>,
    /// `state_dir` (None: a fresh one per pair); mirrored runs that build
    /// on each other keep their replicas' sidecars here.
    pub state: Option<&'a Path>,
    /// More `[ft]` lines (e.g. `on_guest_crash = "restart-checkpoint"`).
    pub ft_extra: &'a str,
    /// Arbitrate on a 3-member etcd cluster in the pair's namespace instead
    /// of `tandem witness`.
    pub etcd: bool,
}

impl<'a> PairSpec<'a> {
    /// A 32 MiB pair of `guest` booted with `cmdline`: no disk, no NIC,
    /// `received` mode, default timing, shared storage, a fresh state
    /// directory, the witness. Callers change what their figure needs.
    pub fn new(guest: &'a Path, cmdline: &'a str) -> Self {
        Self {
            guest,
            cmdline,
            mem: "32M",
            disk: None,
            net: false,
            commit: "received",
            failover_ms: None,
            heartbeat_ms: None,
            replicas: None,
            state: None,
            ft_extra: "",
            etcd: false,
        }
    }
}

/// The etcd members' client and peer ports (all on 127.0.0.1).
const ETCD_PORTS: [(u16, u16); 3] = [(2379, 2380), (2479, 2480), (2579, 2580)];

/// A running pair; dropping it kills every process and deletes the namespace.
pub struct Pair {
    pub ns: NetNs,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub witness: Option<Running>,
    /// The etcd members, when the pair arbitrates on etcd.
    pub etcd: Vec<Running>,
    pub primary: Option<Running>,
    pub secondary: Option<Running>,
    /// A `tandem pair` that re-protects the VM.
    pub joiner: Option<Running>,
}

static SERIAL: AtomicUsize = AtomicUsize::new(0);

const WITNESS: &str = "127.0.0.1:7500";

/// Reads `r`'s stdout in the background (so that it never blocks on a full
/// pipe), line by line with arrival times.
pub fn watch_stdout(r: &mut Running) -> Lines {
    let lines: Lines = Default::default();
    if let Some(out) = r.stdout.take() {
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), line));
            }
        });
    }
    lines
}

/// Whether a line containing `pat` arrives on `lines` before `deadline`.
pub fn wait_line(lines: &Lines, pat: &str, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(_, l)| l.contains(pat))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The last lines of a process's stderr, for an error message.
pub fn err_tail(r: &Running) -> String {
    let lines = r.err_lines.lock().unwrap_or_else(|e| e.into_inner());
    let tail: Vec<&str> = lines
        .iter()
        .rev()
        .take(2)
        .map(|(_, l)| l.as_str())
        .collect();
    tail.join(" | ")
}

impl Pair {
    /// Starts witness, primary (waiting for its secondary), then secondary.
    pub fn start(ctx: &Ctx, spec: &PairSpec) -> Result<Pair, String> {
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let taps: &[&str] = if spec.net { &["tapa", "tapb"] } else { &[] };
        let ns = NetNs::create(&format!("-p{n}"), taps)?;
        let dir = ctx.tmp.join(format!("pair{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        let config = dir.join("pair.toml");
        let mut pair = Pair {
            ns,
            dir,
            config,
            witness: None,
            etcd: Vec::new(),
            primary: None,
            secondary: None,
            joiner: None,
        };
        std::fs::create_dir_all(&pair.dir).map_err(|e| format!("{}: {e}", pair.dir.display()))?;
        std::fs::write(&pair.config, toml(spec, &pair.dir))
            .map_err(|e| format!("{}: {e}", pair.config.display()))?;
        // The pair's key, as in production (authentication is measured).
        let psk = pair.dir.join("pair.psk");
        let keygen = Command::new(&ctx.tandem)
            .arg("keygen")
            .arg(&psk)
            .output()
            .map_err(|e| format!("tandem keygen: {e}"))?;
        if !keygen.status.success() {
            return Err(format!(
                "tandem keygen: {}",
                String::from_utf8_lossy(&keygen.stderr)
            ));
        }
        // The witness gets the pair's witness key, as in production.
        let witness_key = pair.dir.join("witness.key");
        let derived = Command::new(&ctx.tandem)
            .arg("keygen")
            .arg("--witness-key-for")
            .arg(&pair.config)
            .arg(&witness_key)
            .output()
            .map_err(|e| format!("tandem keygen --witness-key-for: {e}"))?;
        if !derived.status.success() {
            return Err(format!(
                "tandem keygen --witness-key-for: {}",
                String::from_utf8_lossy(&derived.stderr)
            ));
        }

        if spec.etcd {
            pair.start_etcd(ctx)?;
        } else {
            pair.start_witness(ctx, &witness_key)?;
        }
        pair.start_sides(ctx)?;
        Ok(pair)
    }

    /// A 3-member etcd cluster on the secondary's CPU, healthy.
    fn start_etcd(&mut self, ctx: &Ctx) -> Result<(), String> {
        let cluster: Vec<String> = ETCD_PORTS
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        for (i, (client, peer)) in ETCD_PORTS.iter().enumerate() {
            let mut cmd = self.ns.pinned(ctx.cpu2, Path::new("etcd"));
            let client = format!("http://127.0.0.1:{client}");
            let peer = format!("http://127.0.0.1:{peer}");
            cmd.args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(self.dir.join(format!("etcd-m{i}")))
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
                .args(["--initial-cluster-state", "new", "--log-level", "error"]);
            self.etcd
                .push(proc::spawn(cmd).map_err(|e| format!("spawn etcd: {e}"))?);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ETCD_PORTS.iter().all(|(client, _)| {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.ns.name, "curl", "-s", "-m", "1"])
                .arg(format!("http://127.0.0.1:{client}/health"))
                .output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("true"))
        }) {
            if Instant::now() > deadline {
                return Err("the etcd cluster never became healthy".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn start_witness(&mut self, ctx: &Ctx, psk: &Path) -> Result<(), String> {
        let pair = self;
        let mut cmd = pair.ns.pinned(ctx.cpu2, &ctx.tandem);
        cmd.args(["witness", "--listen", WITNESS, "--state"])
            .arg(pair.dir.join("witness.state"))
            .arg("--psk-file")
            .arg(psk);
        let mut witness = proc::spawn(cmd).map_err(|e| format!("spawn witness: {e}"))?;
        let out = watch_stdout(&mut witness);
        pair.witness = Some(witness);
        if !wait_line(
            &out,
            "listening on",
            Instant::now() + Duration::from_secs(10),
        ) {
            return Err("the witness never said `listening on`".into());
        }
        Ok(())
    }

    /// The primary (until it waits for its secondary), then the secondary.
    fn start_sides(&mut self, ctx: &Ctx) -> Result<(), String> {
        let pair = self;

        let primary = proc::spawn(pair.command(ctx, ctx.cpu, "primary"))
            .map_err(|e| format!("spawn primary: {e}"))?;
        let waiting = primary.wait_err(
            "primary waiting for the secondary",
            Instant::now() + Duration::from_secs(20),
        );
        let tail = err_tail(&primary);
        pair.primary = Some(primary);
        if waiting.is_none() {
            return Err(format!(
                "the primary never waited for its secondary: {tail}"
            ));
        }
        let mut secondary = proc::spawn(pair.command(ctx, ctx.cpu2, "secondary"))
            .map_err(|e| format!("spawn secondary: {e}"))?;
        watch_stdout(&mut secondary);
        pair.secondary = Some(secondary);
        Ok(())
    }

    /// `tandem ROLE -v --config C --host a|b` in the namespace, pinned.
    pub fn command(&self, ctx: &Ctx, cpu: usize, role: &str) -> Command {
        let host = if role == "secondary" { "b" } else { "a" };
        let mut cmd = self.ns.pinned(cpu, &ctx.tandem);
        cmd.args([role, "-v", "--config"])
            .arg(&self.config)
            .args(["--host", host])
            .env("NO_COLOR", "1");
        cmd
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for r in [
            self.primary.take(),
            self.joiner.take(),
            self.secondary.take(),
            self.witness.take(),
        ]
        .into_iter()
        .flatten()
        .chain(std::mem::take(&mut self.etcd))
        {
            r.kill();
            let _ = r.finish(Duration::ZERO);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // `ns` drops next: the namespace goes.
    }
}

fn toml(spec: &PairSpec, dir: &Path) -> String {
    let mut vm = format!(
        "[vm]\nname = \"bench\"\nkernel = \"{}\"\ncmdline = \"{}\"\nmem = \"{}\"\n",
        spec.guest.display(),
        spec.cmdline,
        spec.mem
    );
    if let Some(d) = spec.disk {
        vm += &format!("disk = [\"{}\"]\n", d.display());
    }
    let tap = |t: &str| {
        if spec.net {
            format!(", tap = \"{t}\"")
        } else {
            String::new()
        }
    };
    if spec.net {
        vm += &format!("net = [{{ mac = \"{}\" }}]\n", netecho::GUEST_MAC);
    }
    let witness = if spec.etcd {
        let members: Vec<String> = ETCD_PORTS
            .iter()
            .map(|(c, _)| format!("127.0.0.1:{c}"))
            .collect();
        format!("etcd://{}/tandem-bench", members.join(","))
    } else {
        format!("tcp://{WITNESS}")
    };
    let mut ft = format!(
        "[ft]\noutput_commit = \"{}\"\nwitness = \"{witness}\"\nstate_dir = \"{}\"\npsk_file = \"{}\"\n",
        spec.commit,
        spec.state.map_or_else(|| dir.join("state"), Path::to_path_buf).display(),
        dir.join("pair.psk").display()
    );
    if let Some(ms) = spec.failover_ms {
        ft += &format!("failover_timeout_ms = {ms}\n");
    }
    if let Some(ms) = spec.heartbeat_ms {
        ft += &format!("heartbeat_ms = {ms}\n");
    }
    if !spec.ft_extra.is_empty() {
        ft += spec.ft_extra;
        ft += "\n";
    }
    let replica = |i: usize| match spec.replicas {
        Some(r) => format!(", disk = [\"{}\"]", r[i].display()),
        None => String::new(),
    };
    if spec.replicas.is_some() {
        ft += "storage = \"mirrored\"\n";
    }
    format!(
        "{vm}\n[hosts]\na = {{ address = \"127.0.0.1:7401\"{}{} }}\nb = {{ address = \"127.0.0.2:7402\"{}{} }}\n\n{ft}",
        tap("tapa"),
        replica(0),
        tap("tapb"),
        replica(1)
    )
}

/// One failover + re-protection trial.
#[derive(Clone, Debug, Default)]
pub struct Trial {
    /// SIGSTOP of the primary → the secondary's "primary silent" line (ms).
    pub detect_ms: f64,
    /// The silence the secondary reported in that line (ms).
    pub silent_ms: f64,
    /// "primary silent" → "going live at stop" (ms).
    pub catch_up_ms: f64,
    /// "going live at stop" → the first echo reply (ms).
    pub go_live_ms: f64,
    /// SIGSTOP → the first echo reply (ms).
    pub total_ms: f64,
    /// `tandem pair` started → "secondary joined at stop" on the live side (ms).
    pub reprotect_ms: Option<f64>,
    /// "guest paused X ms" of the full sync point.
    pub pause_ms: Option<f64>,
    /// Pages in that full sync point.
    pub pages: Option<f64>,
    /// "secondary joined at stop" → the guest's first echo reply (ms).
    pub first_answer_ms: Option<f64>,
    /// The guest answered an echo after re-protection.
    pub served_after: bool,
    /// A partition: the primary won the next generation and kept the VM.
    pub primary_kept: bool,
    pub error: String,
}

/// The number after `key` in `line` ("silent for 1016 ms" → 1016).
pub fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

fn ms(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

/// The failover timeout of the failover trials.
pub const FAILOVER_MS: u64 = 1000;
/// The aggressive setting's failover timeout and heartbeat (ms).
pub const AGGRESSIVE_FAILOVER_MS: u64 = 100;
pub const AGGRESSIVE_HEARTBEAT_MS: u64 = 20;

/// Starts a netecho pair with `mem`, freezes the primary (SIGSTOP), times
/// the takeover from the client's side and the secondary's stderr, then
/// kills the frozen primary and times `tandem pair --host a` re-protecting.
/// How the primary's host fails in a trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGSTOP: a hung host (its sockets stay open). Re-protection follows.
    Stop,
    /// An nftables rule in the pair's namespace drops the replication
    /// traffic between the hosts (both still reach the witness and the
    /// client): a partition.
    Partition,
    /// kill -9: the peer sees the connection close at once (EOF is only a
    /// hint: it still waits for the failover timeout).
    Kill9,
    /// SIGSTOP with an aggressive setting: `heartbeat_ms` = 20,
    /// `failover_timeout_ms` = 100.
    StopAggressive,
}

/// `fill_mib`: memory the guest fills at boot (netecho `fill=`), so
/// re-protection has that much in use to copy.
/// `etcd`: arbitrate on a 3-member etcd cluster, not `tandem witness`.
pub fn failover_trial(ctx: &Ctx, mem: &str, fault: Fault, fill_mib: u32, etcd: bool) -> Trial {
    let mut t = Trial::default();
    if let Err(e) = trial(ctx, mem, fault, fill_mib, etcd, &mut t) {
        t.error = e;
    }
    t
}

fn trial(
    ctx: &Ctx,
    mem: &str,
    fault: Fault,
    fill_mib: u32,
    etcd: bool,
    t: &mut Trial,
) -> Result<(), String> {
    let disk = ctx.tmp.join(format!("failover-{mem}.img"));
    crate::ctx::make_image(&disk, 64 << 10).map_err(|e| e.to_string())?;
    let guest = ctx.guest("netecho");
    let cmdline = format!("ip={} fill={fill_mib}", netecho::GUEST_IP);
    let spec = PairSpec {
        mem,
        disk: Some(&disk),
        net: true,
        failover_ms: Some(if fault == Fault::StopAggressive {
            AGGRESSIVE_FAILOVER_MS
        } else {
            FAILOVER_MS
        }),
        heartbeat_ms: (fault == Fault::StopAggressive).then_some(AGGRESSIVE_HEARTBEAT_MS),
        etcd,
        ..PairSpec::new(&guest, &cmdline)
    };
    let result = trial_in(ctx, &spec, fault, t);
    let _ = std::fs::remove_file(&disk);
    result
}

fn trial_in(ctx: &Ctx, spec: &PairSpec, fault: Fault, t: &mut Trial) -> Result<(), String> {
    let mut pair = Pair::start(ctx, spec)?;
    let out = watch_stdout(pair.primary.as_mut().ok_or("no primary")?);
    if !wait_line(
        &out,
        "netecho: up",
        Instant::now() + Duration::from_secs(60),
    ) {
        return Err(format!(
            "netecho never came up: {}",
            pair.primary.as_ref().map(err_tail).unwrap_or_default()
        ));
    }
    // The path works and the bridge has learnt the guest's MAC on tapa.
    netecho::client(&pair.ns, 20)?;
    std::thread::sleep(Duration::from_millis(100));

    let primary = pair.primary.as_ref().ok_or("no primary")?;
    let stopped = Instant::now();
    match fault {
        Fault::Stop | Fault::StopAggressive => primary.signal(libc::SIGSTOP),
        Fault::Kill9 => primary.signal(libc::SIGKILL),
        Fault::Partition => {
            // Everything to and from the primary's replication port (the
            // secondary connects to it); the witness's port stays open.
            let rules = "add table inet tdmpart\n\
                add chain inet tdmpart out { type filter hook output priority 0; }\n\
                add rule inet tdmpart out tcp dport 7401 drop\n\
                add rule inet tdmpart out tcp sport 7401 drop\n";
            let mut nft = Command::new("ip")
                .args(["netns", "exec", &pair.ns.name, "nft", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("nft: {e}"))?;
            if let Some(mut input) = nft.stdin.take() {
                use std::io::Write as _;
                input
                    .write_all(rules.as_bytes())
                    .map_err(|e| format!("nft: {e}"))?;
            }
            let status = nft.wait().map_err(|e| format!("nft: {e}"))?;
            if !status.success() {
                return Err("nft could not install the partition".into());
            }
        }
    }
    let reply = netecho::first_reply(
        &pair.ns,
        Duration::from_millis(2),
        stopped + Duration::from_secs(20),
    )?
    .ok_or("no echo answered within 20 s of the SIGSTOP")?;
    let secondary = pair.secondary.as_ref().ok_or("no secondary")?;
    let soon = Instant::now() + Duration::from_secs(5);
    if fault == Fault::Partition {
        // Both sides notice the silence; whichever claims the next
        // generation first keeps the VM (the other fences itself). When the
        // primary wins it releases what it held and runs on unprotected.
        let primary = pair.primary.as_ref().ok_or("no primary")?;
        if let Some((detected, line)) =
            primary.wait_err("running unprotected as generation", Instant::now())
        {
            t.primary_kept = true;
            t.detect_ms = ms(stopped, detected);
            t.silent_ms = number_after(&line, "silent for").unwrap_or(f64::NAN);
            t.catch_up_ms = 0.0;
            t.go_live_ms = ms(detected, reply).max(0.0);
            t.total_ms = ms(stopped, reply);
            t.served_after = true;
            return Ok(());
        }
    }
    let (detected, line) = secondary
        .wait_err("primary silent for", soon)
        .ok_or_else(|| format!("no `primary silent` line: {}", err_tail(secondary)))?;
    let (live, _) = secondary
        .wait_err("going live at stop", soon)
        .ok_or_else(|| format!("no `going live at stop` line: {}", err_tail(secondary)))?;
    t.detect_ms = ms(stopped, detected);
    t.silent_ms = number_after(&line, "silent for").unwrap_or(f64::NAN);
    t.catch_up_ms = ms(detected, live);
    t.go_live_ms = ms(live, reply);
    t.total_ms = ms(stopped, reply);
    if fault != Fault::Stop {
        t.served_after = true;
        return Ok(());
    }

    // Re-protection: the frozen host is lost; its replacement starts with
    // `tandem pair` and joins the new primary.
    if let Some(p) = pair.primary.take() {
        p.kill();
        let _ = p.finish(Duration::ZERO);
    }
    let started = Instant::now();
    let mut joiner = proc::spawn(pair.command(ctx, ctx.cpu, "pair"))
        .map_err(|e| format!("spawn tandem pair: {e}"))?;
    watch_stdout(&mut joiner);
    pair.joiner = Some(joiner);
    let secondary = pair.secondary.as_ref().ok_or("no secondary")?;
    let joined = secondary.wait_err(
        "secondary joined at stop",
        started + Duration::from_secs(60),
    );
    let Some((joined, _)) = joined else {
        return Err(format!(
            "no `secondary joined` line within 60 s: {} / joiner: {}",
            err_tail(secondary),
            pair.joiner.as_ref().map(err_tail).unwrap_or_default()
        ));
    };
    t.reprotect_ms = Some(ms(started, joined));
    // The first answer right after the join (held output waiting on the
    // joiner's first ack would show here).
    let probing = Instant::now();
    t.first_answer_ms = netecho::first_reply_ms(&pair.ns, Duration::from_secs(10))
        .ok()
        .map(|after_probe| ms(joined, probing) + after_probe);
    if let Some((_, l)) = secondary.wait_err("full sync point at stop", Instant::now()) {
        t.pause_ms = number_after(&l, "guest paused");
        t.pages = l.find(" (").and_then(|i| number_after(&l[i..], "("));
    }
    t.served_after = netecho::client(&pair.ns, 5).is_ok();
    Ok(())
}

/// Failover and re-protection figures over the trials at one memory size.
pub fn trials_json(mem: &str, trials: &[Trial]) -> Value {
    let ok: Vec<&Trial> = trials.iter().filter(|t| t.error.is_empty()).collect();
    let col = |f: &dyn Fn(&Trial) -> Option<f64>| -> Vec<f64> {
        ok.iter().filter_map(|t| f(t)).collect()
    };
    json!({
        "mem": mem,
        "trials": trials.len(),
        "failures": trials.len() - ok.len(),
        "first_error": trials.iter().find(|t| !t.error.is_empty()).map(|t| &t.error),
        "detect_ms": summary_json(&col(&|t| Some(t.detect_ms)), "ms"),
        "reported_silence_ms": summary_json(&col(&|t| Some(t.silent_ms)), "ms"),
        "catch_up_ms": summary_json(&col(&|t| Some(t.catch_up_ms)), "ms"),
        "go_live_to_reply_ms": summary_json(&col(&|t| Some(t.go_live_ms)), "ms"),
        "after_detection_ms": summary_json(&col(&|t| Some(t.catch_up_ms + t.go_live_ms)), "ms"),
        "total_ms": summary_json(&col(&|t| Some(t.total_ms)), "ms"),
        "reprotect_ms": summary_json(&col(&|t| t.reprotect_ms), "ms"),
        "reprotect_pause_ms": summary_json(&col(&|t| t.pause_ms), "ms"),
        "reprotect_pages": summary_json(&col(&|t| t.pages), "pages"),
        "first_answer_after_join_ms": summary_json(&col(&|t| t.first_answer_ms), "ms"),
        "served_after_reprotect": ok.iter().filter(|t| t.served_after).count(),
        "primary_kept": ok.iter().filter(|t| t.primary_kept).count(),
    })
}
