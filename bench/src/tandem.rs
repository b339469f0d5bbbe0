//! tandem workloads, unprotected vs recorded, interleaved run by run; each
//! recording is then replayed and inspected.
//!
//! Size: over 800 lines because the workload table, the runner and the
//! results' JSON for every workload share this file; the JSON (`to_json`)
//! is the next to move out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::ctx::{make_image, Ctx};
use crate::netecho::{self, NetNs};
use crate::pair::{Pair, PairSpec};
use crate::proc::{self, Outcome};
use crate::results::JsonPath;
use crate::stats::{percentile, summary_json};

/// How a workload's work rate is measured.
#[derive(Clone, Debug)]
pub enum Kind {
    /// Fixed work, the guest exits when done: rate = work / wall time.
    Batch,
    /// netecho under a closed-loop UDP echo client (`requests` requests,
    /// one outstanding): rate = requests / client time.
    NetEcho { requests: usize },
}

/// One guest + options, measured live and recorded.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub guest: &'static str,
    pub cmdline: String,
    /// Work per run, in `unit`.
    pub work: f64,
    pub unit: &'static str,
    /// stdout must contain this for the run to count.
    pub expect: &'static str,
    pub disk_bytes: Option<u64>,
    /// Extra recorded configurations: (name, extra `tandem run` options).
    pub variants: Vec<(&'static str, Vec<String>)>,
    pub kind: Kind,
    pub note: &'static str,
    /// Also measured as a protected pair, in both output-commit modes.
    pub pair: bool,
}

/// The workload list for this mode.
pub fn workloads(ctx: &Ctx) -> Vec<Workload> {
    let q = ctx.quick;
    let (csize, crounds) = if q { (16384, 4) } else { (65536, 4) };
    let compute = |hz: u32, variants| Workload {
        name: format!(
            "compute-{}",
            if hz >= 1000 {
                "1kHz".into()
            } else {
                format!("{hz}Hz")
            }
        ),
        guest: "compute",
        cmdline: format!("size={csize} rounds={crounds} hz={hz}"),
        work: f64::from(csize * crounds),
        unit: "B hashed",
        expect: "compute: size=",
        disk_bytes: None,
        variants,
        kind: Kind::Batch,
        note: "CPU-bound; a sync point at every timer interrupt",
        // The 1 kHz pair only in full mode (quick mode stays near 2 min).
        pair: hz == 100 || !q,
    };
    let pio_n: u32 = if q { 20_000 } else { 100_000 };
    let disk_count: u64 = if q { 64 } else { 512 };
    let io_count: u64 = if q { 8192 } else { 32768 };
    let requests = if q { 200 } else { 2000 };
    vec![
        compute(
            100,
            // The checkpoint-mode variants run in full mode only.
            [
                Some((
                    "record-epoch1000",
                    vec!["--epoch-ms".to_string(), "1000".to_string()],
                )),
                (!q).then(checkpointing),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        compute(1000, Vec::new()),
        Workload {
            name: "piostorm".into(),
            guest: "piostorm",
            cmdline: format!("n={pio_n}"),
            work: f64::from(2 * pio_n),
            unit: "port accesses",
            expect: "piostorm: n=",
            disk_bytes: None,
            variants: Vec::new(),
            kind: Kind::Batch,
            note: "I/O exit-bound: one stop per port access",
            pair: true,
        },
        Workload {
            name: "ticker".into(),
            guest: "ticker",
            cmdline: String::new(),
            work: 2000.0,
            unit: "timer ticks",
            expect: "ticks=2000",
            disk_bytes: None,
            variants: Vec::new(),
            kind: Kind::Batch,
            note: "idle, timer-bound (2000 ticks at 1 kHz): wall ratio is ~1 by construction; see the CPU ratio",
            pair: !q,
        },
        Workload {
            name: "diskseq".into(),
            guest: "diskseq",
            cmdline: format!("count={disk_count} chunk=8"),
            work: (2 * disk_count) as f64,
            unit: "sectors written+read",
            expect: "diskseq: sectors=",
            disk_bytes: Some((disk_count * 512).max(1 << 20)),
            variants: Vec::new(),
            kind: Kind::Batch,
            note: "virtio-blk write, flush, read back, verify (about 9 ms of guest CPU per sector)",
            pair: !q,
        },
        Workload {
            name: "diskio".into(),
            guest: "diskseq",
            cmdline: format!("count={io_count} chunk=8 bench=1"),
            work: (2 * io_count) as f64,
            unit: "sectors written+read",
            expect: "diskseq: bench sectors=",
            disk_bytes: Some(io_count * 512),
            variants: Vec::new(),
            kind: Kind::Batch,
            note: "diskseq `bench=1`: the same 4 KiB requests without generating or checking the pattern, so the block path, not guest CPU, sets the pace",
            pair: false,
        },
        Workload {
            name: "netecho".into(),
            guest: "netecho",
            cmdline: format!("ip={}", netecho::GUEST_IP),
            work: requests as f64,
            unit: "UDP echoes",
            expect: "netecho: bye",
            disk_bytes: Some(64 << 10),
            variants: (!q).then(checkpointing).into_iter().collect(),
            kind: Kind::NetEcho { requests },
            note: "closed-loop UDP echo (64 B, one outstanding) from a client on the taps' bridge in their network namespace",
            pair: true,
        },
    ]
}

/// The `restart-checkpoint` variant: recorded, with checkpoints at the
/// default interval and output held until the next one (compared with the
/// plain recorded run for the checkpoints' cost).
fn checkpointing() -> (&'static str, Vec<String>) {
    (
        "restart-checkpoint",
        vec![
            "--on-guest-crash".to_string(),
            "restart-checkpoint".to_string(),
        ],
    )
}

/// Runs this many measured runs per rep (for the progress count).
pub fn runs_per_rep(w: &Workload) -> usize {
    5 + w.variants.len() + if w.pair { 3 } else { 0 }
}

/// One run of the VMM.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub out: Outcome,
    pub ok: bool,
    pub error: String,
    /// Work per second.
    pub rate: f64,
    /// `VcpuStats` fields of the `-v` stats line.
    pub stats: Vec<(String, f64)>,
    /// `tandem log inspect --json` of the recording.
    pub inspect: Option<Value>,
    /// Round-trip times in ms (netecho).
    pub rtts: Vec<f64>,
    /// A pair's primary, sampled from its control socket while the client
    /// ran: `lag_ms` (how long the oldest log frame the secondary has not
    /// acknowledged has waited) and `oldest_held_ms` (how long the oldest
    /// held output has waited), each sample in ms.
    pub lags: Vec<f64>,
    pub held: Vec<f64>,
    /// The seven numbers of the replay summary line (replay runs).
    pub summary: Vec<f64>,
    /// The replay's landing line: positioned stops landed, median and p99
    /// landing time (µs), KVM_RUNs per landing (empty: none landed).
    pub landing: Vec<f64>,
    /// Seconds the VM ran, from the VMM's own log timestamps (the VM built,
    /// or the secondary attached, to "VM stopped"): excludes process start
    /// and, for a pair, waiting for the secondary.
    pub span: Option<f64>,
    /// Batch work / `span`.
    pub span_rate: Option<f64>,
    /// A pair's secondary: its exit status.
    pub secondary_status: Option<i32>,
    /// The guest's expected last line reached stdout (a pair's primary may
    /// exit before releasing its last console bytes).
    pub console_complete: bool,
}

impl Sample {
    fn stat(&self, key: &str) -> Option<f64> {
        self.stats.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// `name: number` pairs of the `VM stopped stats=VcpuStats { .. }` line.
pub fn parse_stats(stderr: &str) -> Vec<(String, f64)> {
    let clean = strip_ansi(stderr);
    let Some(line) = clean.lines().rev().find(|l| l.contains("VcpuStats {")) else {
        return Vec::new();
    };
    let body = &line[line.find("VcpuStats {").unwrap_or(0)..];
    let mut out = Vec::new();
    for part in body.split([',', '{', '}']) {
        if let Some((k, v)) = part.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            let num: String = v
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !num.is_empty() {
                let mut n: f64 = num.parse().unwrap_or(f64::NAN);
                if v.ends_with("ms") {
                    n /= 1e3;
                } else if v.ends_with("µs") || v.ends_with("us") {
                    n /= 1e6;
                } else if v.ends_with("ns") {
                    n /= 1e9;
                }
                out.push((k.to_string(), n));
            }
        }
    }
    out
}

/// Seconds of day of a tracing timestamp at the start of `line`
/// (`2026-11-26T12:57:19.119970Z ...`).
fn timestamp(line: &str) -> Option<f64> {
    let t = line.get(11..)?.split('Z').next()?;
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    (line.as_bytes().get(10) == Some(&b'T')).then_some(h * 3600.0 + m * 60.0 + sec)
}

/// The VM's run time from a `-v` stderr: from the later of "TSC MSRs ..."
/// (logged as the VM is built) and "secondary connected from" (a primary
/// starts its guest once its secondary attached) to "VM stopped".
pub fn parse_span(stderr: &str) -> Option<f64> {
    let clean = strip_ansi(stderr);
    let at = |pat: &str| clean.lines().find(|l| l.contains(pat)).and_then(timestamp);
    let start = match (at("TSC MSRs"), at("secondary connected from")) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b)?,
    };
    let end = at("VM stopped")?;
    let span = if end < start {
        end + 86400.0 - start
    } else {
        end - start
    };
    (span > 0.0).then_some(span)
}

/// The numbers of the last `replay summary:` line, in order.
pub fn parse_summary(stderr: &str) -> Vec<f64> {
    let clean = strip_ansi(stderr);
    let Some(line) = clean.lines().rev().find(|l| l.contains("replay summary:")) else {
        return Vec::new();
    };
    let tail = &line[line.find("summary:").unwrap_or(0)..];
    tail.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The numbers of the `positioned stops landed:` line: count, median µs,
/// p99 µs, runs per landing.
///
/// ```text
/// tandem: 89 positioned stops landed: median 9742 µs, p99 23171 µs, 72.0 runs each
/// ```
pub fn parse_landing(stderr: &str) -> Vec<f64> {
    let clean = strip_ansi(stderr);
    let Some(line) = clean
        .lines()
        .rev()
        .find(|l| l.contains("positioned stops landed"))
    else {
        return Vec::new();
    };
    // "p99" names a figure, it is not one.
    line.replace("p99", "")
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter_map(|s| s.trim_matches('.').parse().ok())
        .collect()
}

#[cfg(test)]
mod landing_tests {
    #[test]
    fn the_landing_line_parses_without_the_p99_label() {
        let line =
            "tandem: 89 positioned stops landed: median 9742 µs, p99 23171 µs, 72.0 runs each";
        assert_eq!(
            super::parse_landing(line),
            vec![89.0, 9742.0, 23171.0, 72.0]
        );
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

const LIMIT: Duration = Duration::from_secs(180);

/// The configurations measured side by side: unprotected, recorded, and
/// (for workloads with `pair`) the protected pair in each output-commit
/// mode, its primary pinned to `ctx.cpu` and its secondary to `ctx.cpu2`
/// (`Runner::pair`, `crate::pair`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Live,
    Record,
    /// Recorded with `--position auto`.
    RecordPositions,
    PairReceived,
    PairReplayed,
    /// A `received` pair with `[ft] position = "auto"`.
    PairPositions,
}

/// What the positions configurations add to a run.
const POSITION_AUTO: [&str; 2] = ["--position", "auto"];
const PAIR_POSITION_AUTO: &str = "position = \"auto\"";

struct Runner<'a> {
    ctx: &'a Ctx,
    w: &'a Workload,
    ns: Option<&'a NetNs>,
}

impl Runner<'_> {
    fn command(&self, disk: Option<&Path>, record: Option<&Path>, extra: &[String]) -> Command {
        let tandem = self.ctx.tandem.display().to_string();
        let mut cmd = match self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "taskset", "-c"])
                    .arg(self.ctx.cpu.to_string())
                    .arg(&tandem);
                c
            }
            None => self.ctx.pinned(&tandem),
        };
        cmd.args(["run", "-v", "--mem", "32M", "--kernel"])
            .arg(self.ctx.guest(self.w.guest))
            .args(["--cmdline", &self.w.cmdline]);
        if let Some(d) = disk {
            cmd.arg("--disk").arg(d);
        }
        if self.ns.is_some() {
            cmd.args([
                "--net",
                &format!("tap={},mac={}", netecho::TAP, netecho::GUEST_MAC),
            ]);
        }
        if let Some(log) = record {
            cmd.arg("--record").arg(log);
        }
        cmd.args(extra).env("NO_COLOR", "1");
        cmd
    }

    /// One live or recorded run; a recording is inspected afterwards.
    fn run(&self, tag: &str, record: Option<&Path>, extra: &[String]) -> Sample {
        let disk = self.w.disk_bytes.map(|bytes| {
            let path = self.ctx.tmp.join(format!("{}-{tag}.img", self.w.name));
            if let Err(e) = make_image(&path, bytes) {
                eprintln!("tandem-bench: cannot create {}: {e}", path.display());
            }
            path
        });
        if let Some(log) = record {
            let _ = std::fs::remove_file(log);
        }
        let cmd = self.command(disk.as_deref(), record, extra);
        let mut s = Sample::default();
        match &self.w.kind {
            Kind::Batch => {
                s.out = proc::run(cmd, LIMIT);
                s.rate = self.w.work / s.out.wall;
            }
            Kind::NetEcho { requests } => {
                let ns = self.ns.expect("netecho needs its namespace");
                match netecho::drive(ns, cmd, *requests, LIMIT) {
                    Ok(r) => {
                        s.out = r.out;
                        s.rate = *requests as f64 / r.client_secs;
                        s.rtts = r.rtts;
                    }
                    Err((out, e)) => {
                        s.out = out;
                        s.error = e;
                    }
                }
            }
        }
        if let Some(d) = disk {
            let _ = std::fs::remove_file(d);
        }
        s.stats = parse_stats(&s.out.stderr);
        s.span = parse_span(&s.out.stderr);
        if matches!(self.w.kind, Kind::Batch) {
            s.span_rate = s.span.map(|t| self.w.work / t);
        }
        s.console_complete = s.out.stdout.contains(self.w.expect);
        s.ok = s.error.is_empty() && s.out.status == 0 && s.console_complete;
        if !s.ok && s.error.is_empty() {
            s.error = failure(&s.out);
        }
        if let (Some(log), true) = (record, s.ok) {
            s.inspect = inspect(self.ctx, log);
        }
        s
    }

    /// One run as a protected pair: primary on `ctx.cpu`, secondary on
    /// `ctx.cpu2`, with `output_commit = commit`. The guest's exit ends the
    /// primary; the secondary replays to the same end and exits too.
    fn pair(&self, tag: &str, commit: &str, ft_extra: &str) -> Sample {
        let disk = self.w.disk_bytes.map(|bytes| {
            let path = self.ctx.tmp.join(format!("{}-{tag}.img", self.w.name));
            if let Err(e) = make_image(&path, bytes) {
                eprintln!("tandem-bench: cannot create {}: {e}", path.display());
            }
            path
        });
        let guest = self.ctx.guest(self.w.guest);
        let spec = PairSpec {
            disk: disk.as_deref(),
            net: matches!(self.w.kind, Kind::NetEcho { .. }),
            commit,
            ft_extra,
            ..PairSpec::new(&guest, &self.w.cmdline)
        };
        let mut s = Sample::default();
        match Pair::start(self.ctx, &spec) {
            Err(e) => s.error = e,
            Ok(mut pair) => {
                if let Some(primary) = pair.primary.take() {
                    match &self.w.kind {
                        Kind::Batch => {
                            s.out = primary.finish(LIMIT);
                            s.rate = self.w.work / s.out.wall;
                        }
                        Kind::NetEcho { requests } => {
                            let sampler = LagSampler::start(pair.dir.join("state/a.ctl"));
                            let driven =
                                netecho::drive_running(&pair.ns, primary, *requests, LIMIT);
                            (s.lags, s.held) = sampler.stop();
                            match driven {
                                Ok(r) => {
                                    s.out = r.out;
                                    s.rate = *requests as f64 / r.client_secs;
                                    s.rtts = r.rtts;
                                }
                                Err((out, e)) => {
                                    s.out = out;
                                    s.error = e;
                                }
                            }
                        }
                    }
                }
                if let Some(sec) = pair.secondary.take() {
                    let limit = sec.start.elapsed() + Duration::from_secs(30);
                    let out = sec.finish(limit);
                    s.secondary_status = Some(out.status);
                    if s.error.is_empty() && out.status != 0 {
                        s.error = format!("secondary: {}", failure(&out));
                    }
                }
            }
        }
        if let Some(d) = disk {
            let _ = std::fs::remove_file(d);
        }
        s.stats = parse_stats(&s.out.stderr);
        s.span = parse_span(&s.out.stderr);
        if matches!(self.w.kind, Kind::Batch) {
            s.span_rate = s.span.map(|t| self.w.work / t);
        }
        s.console_complete = s.out.stdout.contains(self.w.expect);
        // The guest's exit status (the primary's) says it finished its work;
        // a missing last console line is counted apart, not a failure.
        s.ok = s.error.is_empty() && s.out.status == 0 && s.secondary_status == Some(0);
        if !s.ok && s.error.is_empty() {
            s.error = failure(&s.out);
        }
        s
    }

    fn replay(&self, log: &Path, recorded: &Sample) -> Sample {
        let mut cmd = self.ctx.pinned(&self.ctx.tandem.display().to_string());
        cmd.arg("replay").arg(log).env("NO_COLOR", "1");
        let out = proc::run(cmd, LIMIT);
        let mut s = Sample {
            summary: parse_summary(&out.stderr),
            landing: parse_landing(&out.stderr),
            ..Sample::default()
        };
        s.ok = out.status == 0 && s.summary.len() >= 7;
        if !s.ok {
            s.error = failure(&out);
        } else if out.stdout != recorded.out.stdout {
            s.error = "replayed console differs from the recorded one".into();
        }
        s.out = out;
        s
    }
}

/// Samples a pair primary's status (control socket `path`) every 10 ms
/// until stopped.
struct LagSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<f64>, Vec<f64>)>,
}

impl LagSampler {
    fn start(path: PathBuf) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut lags, mut held) = (Vec::new(), Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(status) = control_status(&path) {
                    if let Some(v) = json_u64(&status, "lag_ms") {
                        lags.push(v as f64);
                    }
                    if let Some(v) = json_u64(&status, "oldest_held_ms") {
                        held.push(v as f64);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (lags, held)
        });
        Self { stop, thread }
    }

    fn stop(self) -> (Vec<f64>, Vec<f64>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// One status object from a control socket.
fn control_status(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
    // Only the status is wanted: no command follows.
    s.shutdown(std::net::Shutdown::Write).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// `"key":N` of a flat JSON object.
fn json_u64(text: &str, key: &str) -> Option<u64> {
    let rest = text.split(&format!("\"{key}\":")).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn failure(out: &Outcome) -> String {
    let tail: Vec<&str> = out.stderr.lines().rev().take(2).collect();
    format!(
        "exit {}{}; stdout ends {:?}; stderr ends {:?}",
        out.status,
        if out.timed_out { " (timed out)" } else { "" },
        out.last_line(),
        tail.join(" | ")
    )
}

/// `tandem log inspect LOG --json`.
pub fn inspect(ctx: &Ctx, log: &Path) -> Option<Value> {
    let mut cmd = Command::new(&ctx.tandem);
    cmd.args(["log", "inspect"]).arg(log).arg("--json");
    let out = proc::run(cmd, Duration::from_secs(120));
    serde_json::from_str(&out.stdout).ok()
}

/// Every run of one workload.
#[derive(Default)]
pub struct Runs {
    pub live: Vec<Sample>,
    pub record: Vec<Sample>,
    pub pair_received: Vec<Sample>,
    pub pair_replayed: Vec<Sample>,
    pub replay: Vec<Sample>,
    pub variants: Vec<(String, Vec<Sample>)>,
    /// Recorded with `--position auto`, its replays, and `received` pairs
    /// with `position = "auto"`.
    pub positions: Vec<Sample>,
    pub positions_replay: Vec<Sample>,
    pub pair_positions: Vec<Sample>,
}

/// Measures `w` `reps` times, interleaving live and recorded runs (ABBA
/// order) and replaying each recording. `keep` keeps the last log there.
pub fn measure(
    ctx: &Ctx,
    w: &Workload,
    reps: usize,
    ns: Option<&NetNs>,
    keep: Option<&Path>,
) -> Runs {
    let r = Runner { ctx, w, ns };
    let mut runs = Runs {
        variants: w
            .variants
            .iter()
            .map(|(n, _)| (n.to_string(), Vec::new()))
            .collect(),
        ..Runs::default()
    };
    for rep in 0..reps {
        let log = ctx.tmp.join(format!("{}-{rep}.log", w.name));
        let plog = ctx.tmp.join(format!("{}-{rep}-positions.log", w.name));
        let mut order = vec![Config::Live, Config::Record, Config::RecordPositions];
        if w.pair {
            order.extend([
                Config::PairReceived,
                Config::PairReplayed,
                Config::PairPositions,
            ]);
        }
        if rep % 2 == 1 {
            order.reverse();
        }
        for cfg in order {
            let s = match cfg {
                Config::Live => r.run(&format!("live{rep}"), None, &[]),
                Config::Record => r.run(&format!("rec{rep}"), Some(&log), &[]),
                Config::RecordPositions => {
                    let extra = POSITION_AUTO.map(String::from);
                    r.run(&format!("pos{rep}"), Some(&plog), &extra)
                }
                Config::PairReceived => r.pair(&format!("prcv{rep}"), "received", ""),
                Config::PairReplayed => r.pair(&format!("prep{rep}"), "replayed", ""),
                Config::PairPositions => {
                    r.pair(&format!("ppos{rep}"), "received", PAIR_POSITION_AUTO)
                }
            };
            let label = match cfg {
                Config::Live => "live    ",
                Config::Record => "recorded",
                Config::RecordPositions => "rec pos ",
                Config::PairReceived => "pair rcv",
                Config::PairReplayed => "pair rep",
                Config::PairPositions => "pair pos",
            };
            report(ctx, w, rep, reps, label, &s);
            match cfg {
                Config::Live => runs.live.push(s),
                Config::Record => runs.record.push(s),
                Config::RecordPositions => runs.positions.push(s),
                Config::PairReceived => runs.pair_received.push(s),
                Config::PairReplayed => runs.pair_replayed.push(s),
                Config::PairPositions => runs.pair_positions.push(s),
            }
        }
        let recorded = runs.positions.last().cloned().unwrap_or_default();
        if recorded.ok {
            let s = r.replay(&plog, &recorded);
            report(ctx, w, rep, reps, "replay p", &s);
            runs.positions_replay.push(s);
        }
        let _ = std::fs::remove_file(&plog);
        for (i, (name, extra)) in w.variants.iter().enumerate() {
            let vlog = ctx.tmp.join(format!("{}-{rep}-{name}.log", w.name));
            let s = r.run(&format!("{name}{rep}"), Some(&vlog), extra);
            let _ = std::fs::remove_file(&vlog);
            report(ctx, w, rep, reps, name, &s);
            runs.variants[i].1.push(s);
        }
        let recorded = runs.record.last().cloned().unwrap_or_default();
        let s = if recorded.ok {
            r.replay(&log, &recorded)
        } else {
            Sample {
                error: "nothing to replay (the recorded run failed)".into(),
                ..Sample::default()
            }
        };
        report(ctx, w, rep, reps, "replay  ", &s);
        runs.replay.push(s);
        match keep {
            Some(dest) if rep + 1 == reps => {
                let _ = std::fs::rename(&log, dest);
            }
            _ => {
                let _ = std::fs::remove_file(&log);
            }
        }
    }
    runs
}

fn report(ctx: &Ctx, w: &Workload, rep: usize, reps: usize, label: &str, s: &Sample) {
    let what = format!("{:<14} rep {}/{} {label}", w.name, rep + 1, reps);
    if !s.ok || !s.error.is_empty() {
        ctx.progress(&format!("{what} FAILED: {}", s.error));
        return;
    }
    let mut line = format!("{what} {:>7.3} s wall {:>7.3} s cpu", s.out.wall, s.out.cpu);
    if let Some(span) = s.span {
        line += &format!(" {span:>7.3} s VM");
    }
    if s.secondary_status.is_some() && !s.console_complete {
        line += " (console cut short)";
    }
    if !s.summary.is_empty() {
        line += &format!("  (summary {:?})", s.summary);
    } else {
        line += &format!("  {:.4e} {}/s", s.rate, w.unit);
    }
    if let Some(j) = &s.inspect {
        let mbit = j.num("guest_time.mbit_per_second").unwrap_or(f64::NAN);
        let sp = j.num("sync_points.count").unwrap_or(f64::NAN);
        line += &format!("  log {mbit:.2} Mbit/s, {sp} sync points");
    }
    if let Some(p50) = percentile(&s.rtts, 50.0) {
        line += &format!("  RTT p50 {p50:.2} ms");
    }
    ctx.progress(&line);
}

/// Per-rep pairs (a, b) of successful samples.
fn pairs<'a>(a: &'a [Sample], b: &'a [Sample]) -> impl Iterator<Item = (&'a Sample, &'a Sample)> {
    a.iter().zip(b).filter(|(x, y)| x.ok && y.ok)
}

fn oks(v: &[Sample]) -> impl Iterator<Item = &Sample> {
    v.iter().filter(|s| s.ok)
}

fn inspect_num(s: &Sample, path: &str) -> Option<f64> {
    s.inspect.as_ref()?.num(path)
}

/// Log figures of the recorded samples.
fn log_json(record: &[Sample]) -> Value {
    let with =
        |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<f64> { oks(record).filter_map(f).collect() };
    let secs = |s: &Sample| inspect_num(s, "guest_time.seconds");
    let per_sec = |path: &'static str| move |s: &Sample| Some(inspect_num(s, path)? / secs(s)?);
    let mut kinds = Map::new();
    let names: Vec<String> = record
        .iter()
        .find_map(|s| s.inspect.as_ref())
        .and_then(|j| j.at("records")?.as_object())
        .map(|records| records.keys().cloned().collect())
        .unwrap_or_default();
    for kind in names.iter().filter(|k| *k != "total") {
        let path = format!("records.{kind}.bytes");
        let v = with(&|s| Some(inspect_num(s, &path)? * 8.0 / 1e6 / secs(s)?));
        kinds.insert(kind.clone(), summary_json(&v, "Mbit/s"));
    }
    let pages_per_point = |s: &Sample| {
        Some(inspect_num(s, "sync_points.pages")? / inspect_num(s, "sync_points.count")?)
    };
    let stops_per_s = |s: &Sample| {
        Some((inspect_num(s, "stops.last")? - inspect_num(s, "stops.first")?) / secs(s)?)
    };
    json!({
        "mbit_per_s": summary_json(&with(&|s| inspect_num(s, "guest_time.mbit_per_second")), "Mbit/s"),
        "bytes": summary_json(&with(&|s| inspect_num(s, "file_bytes")), "B"),
        "guest_seconds": summary_json(&with(&secs), "s"),
        "sync_points": summary_json(&with(&|s| inspect_num(s, "sync_points.count")), "count"),
        "sync_points_per_s": summary_json(&with(&per_sec("sync_points.count")), "1/s"),
        "sync_pages_per_point": summary_json(&with(&pages_per_point), "pages"),
        "epochs": summary_json(&with(&|s| inspect_num(s, "epochs.count")), "count"),
        "epochs_per_s": summary_json(&with(&per_sec("epochs.count")), "1/s"),
        "stops_per_s": summary_json(&with(&stops_per_s), "1/s"),
        "mbit_per_s_by_kind": kinds,
    })
}

/// The workload's figures as JSON.
pub fn to_json(w: &Workload, runs: &Runs) -> Value {
    let ratio: Vec<f64> = pairs(&runs.live, &runs.record)
        .map(|(l, r)| r.rate / l.rate)
        .collect();
    let cpu_ratio: Vec<f64> = pairs(&runs.live, &runs.record)
        .map(|(l, r)| l.out.cpu / r.out.cpu)
        .collect();
    let side = |v: &[Sample]| {
        let mut j = json!({
            "wall_s": summary_json(&oks(v).map(|s| s.out.wall).collect::<Vec<_>>(), "s"),
            "cpu_s": summary_json(&oks(v).map(|s| s.out.cpu).collect::<Vec<_>>(), "s"),
            "rate": summary_json(
                &oks(v).map(|s| s.rate).collect::<Vec<_>>(),
                &format!("{}/s", w.unit),
            ),
            "vm_seconds": summary_json(&oks(v).filter_map(|s| s.span).collect::<Vec<_>>(), "s"),
            "failures": v.iter().filter(|s| !s.ok).count(),
        });
        let mut stats = Map::new();
        for key in [
            "stops",
            "kicked_stops",
            "sync_points",
            "epochs",
            "interrupts",
            "pio",
            "mmio",
            "hlt",
            "irq_window",
            "msr",
        ] {
            let vals: Vec<f64> = oks(v).filter_map(|s| s.stat(key)).collect();
            if !vals.is_empty() {
                stats.insert(key.into(), summary_json(&vals, "count"));
            }
        }
        j["vcpu_stats"] = stats.into();
        if v.iter().any(|s| !s.rtts.is_empty()) {
            let p = |q: f64| {
                oks(v)
                    .filter_map(|s| percentile(&s.rtts, q))
                    .collect::<Vec<_>>()
            };
            j["rtt_p50_ms"] = summary_json(&p(50.0), "ms");
            j["rtt_p99_ms"] = summary_json(&p(99.0), "ms");
        }
        for (name, pick) in [
            ("lag", (|s: &Sample| &s.lags) as fn(&Sample) -> &Vec<f64>),
            ("held", |s: &Sample| &s.held),
        ] {
            if v.iter().any(|s| !pick(s).is_empty()) {
                for q in [50.0, 99.0] {
                    let vals: Vec<f64> = oks(v).filter_map(|s| percentile(pick(s), q)).collect();
                    j[format!("{name}_p{q}_ms")] = summary_json(&vals, "ms");
                }
            }
        }
        if let Some(e) = v.iter().find(|s| !s.ok) {
            j["first_error"] = e.error.as_str().into();
        }
        j
    };
    let replay_ratio: Vec<f64> = pairs(&runs.live, &runs.replay)
        .map(|(l, r)| r.out.wall / l.out.wall)
        .collect();
    let summ = |i: usize| -> Vec<f64> {
        oks(&runs.replay)
            .filter_map(|s| s.summary.get(i).copied())
            .collect()
    };
    let replay_walls: Vec<f64> = oks(&runs.replay).map(|s| s.out.wall).collect();
    let replay = json!({
        "wall_s": summary_json(&replay_walls, "s"),
        "replay_over_live_wall": summary_json(&replay_ratio, "ratio"),
        "epochs_verified": summary_json(&summ(3), "count"),
        "epochs_transferred": summary_json(&summ(4), "count"),
        "divergences": summary_json(&summ(5), "count"),
        "console_matches": runs.replay.iter().filter(|s| s.ok && s.error.is_empty()).count(),
        "failures": runs.replay.iter().filter(|s| !s.ok || !s.error.is_empty()).count(),
        "first_error": runs.replay.iter().find(|s| !s.error.is_empty()).map(|s| &s.error),
    });
    let mut j = json!({
        "name": w.name,
        "guest": w.guest,
        "cmdline": w.cmdline,
        "work": w.work,
        "unit": w.unit,
        "note": w.note,
        "live": side(&runs.live),
        "recorded": side(&runs.record),
        "ratio_recorded_over_live": summary_json(&ratio, "ratio"),
    });
    if matches!(w.kind, Kind::Batch) {
        j["ratio_recorded_over_live_vm_time"] =
            summary_json(&vm_ratio(&runs.live, &runs.record), "ratio");
    }
    if w.pair {
        let batch = matches!(w.kind, Kind::Batch);
        for (key, samples) in [
            ("pair_received", &runs.pair_received),
            ("pair_replayed", &runs.pair_replayed),
        ] {
            let ratio = if batch {
                vm_ratio(&runs.live, samples)
            } else {
                pairs(&runs.live, samples)
                    .map(|(l, p)| p.rate / l.rate)
                    .collect()
            };
            let added: Vec<f64> = pairs(&runs.live, samples)
                .map(|(l, p)| p.out.wall - l.out.wall)
                .collect();
            let cut = oks(samples).filter(|s| !s.console_complete).count();
            let mut side = side(samples);
            side["ratio_over_live"] = summary_json(&ratio, "ratio");
            side["ratio_method"] = if batch {
                "per rep: (work / VM run time) of the pair's primary over the same of the unprotected run; VM run time from the VMM's own log timestamps (VM built, or secondary attached, to VM stopped)"
            } else {
                "per rep: UDP echoes/s of the client against the pair over the same against the unprotected run"
            }
            .into();
            side["primary_wall_minus_live_wall_s"] = summary_json(&added, "s");
            side["console_cut_short"] = cut.into();
            if cut > 0 {
                side["console_note"] = format!("{cut} successful run(s) (guest exit status 0, secondary exit 0) where the primary exited without releasing the guest's last console line `{}`", w.expect).into();
            }
            j[key] = side;
        }
    }
    let mut variants = Map::new();
    for (name, samples) in &runs.variants {
        let ratio: Vec<f64> = pairs(&runs.live, samples)
            .map(|(l, v)| v.rate / l.rate)
            .collect();
        let vs_recorded: Vec<f64> = pairs(&runs.record, samples)
            .map(|(r, v)| v.rate / r.rate)
            .collect();
        let mut variant = side(samples);
        variant["ratio_vs_live"] = summary_json(&ratio, "ratio");
        variant["ratio_vs_recorded"] = summary_json(&vs_recorded, "ratio");
        variant["log"] = log_json(samples);
        // Checkpoints taken, and what one costs (the vCPU's own timing).
        let per = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<f64> {
            oks(samples).filter_map(f).collect()
        };
        let count = per(&|s| s.stat("checkpoints").filter(|&n| n > 0.0));
        if !count.is_empty() {
            let ms = per(&|s| Some(s.stat("checkpoint_time")? / s.stat("checkpoints")? * 1e3));
            let pages = per(&|s| Some(s.stat("checkpoint_pages")? / s.stat("checkpoints")?));
            variant["checkpoints"] = summary_json(&count, "count");
            variant["ms_per_checkpoint"] = summary_json(&ms, "ms");
            variant["pages_per_checkpoint"] = summary_json(&pages, "pages");
        }
        variants.insert(name.clone(), variant);
    }
    j["positions"] = positions_json(w, runs, &side);
    j["cpu_ratio_live_over_recorded"] = summary_json(&cpu_ratio, "ratio");
    j["log"] = log_json(&runs.record);
    j["replay"] = replay;
    j["variants"] = variants.into();
    j
}

/// `--position auto` beside `none`: the recorded run, its log and replay
/// (epochs verified, landings), and a `received` pair.
fn positions_json(w: &Workload, runs: &Runs, side: &dyn Fn(&[Sample]) -> Value) -> Value {
    let batch = matches!(w.kind, Kind::Batch);
    let ratio = |a: &[Sample], b: &[Sample]| -> Vec<f64> {
        if batch {
            vm_ratio(a, b)
        } else {
            pairs(a, b).map(|(x, y)| y.rate / x.rate).collect()
        }
    };
    let summ = |i: usize| -> Vec<f64> {
        oks(&runs.positions_replay)
            .filter_map(|s| s.summary.get(i).copied())
            .collect()
    };
    let land = |i: usize| -> Vec<f64> {
        oks(&runs.positions_replay)
            .filter_map(|s| s.landing.get(i).copied())
            .collect()
    };
    let landings_per_s: Vec<f64> = pairs(&runs.positions, &runs.positions_replay)
        .filter_map(|(r, p)| Some(p.landing.first()? / inspect_num(r, "guest_time.seconds")?))
        .collect();
    let replay_over_recorded: Vec<f64> = pairs(&runs.positions, &runs.positions_replay)
        .map(|(r, p)| p.out.wall / r.out.wall)
        .collect();
    let mut j = json!({
        "recorded": side(&runs.positions),
        "ratio_over_live": summary_json(&ratio(&runs.live, &runs.positions), "ratio"),
        "ratio_over_recorded_none": summary_json(&ratio(&runs.record, &runs.positions), "ratio"),
        "log": log_json(&runs.positions),
        "replay": {
            "epochs_verified": summary_json(&summ(3), "count"),
            "epochs_transferred": summary_json(&summ(4), "count"),
            "divergences": summary_json(&summ(5), "count"),
            "landings": summary_json(&land(0), "count"),
            "landings_per_s": summary_json(&landings_per_s, "1/s"),
            "landing_median_us": summary_json(&land(1), "µs"),
            "landing_p99_us": summary_json(&land(2), "µs"),
            "runs_per_landing": summary_json(&land(3), "count"),
            "replay_over_recorded_wall": summary_json(&replay_over_recorded, "ratio"),
            "failures": runs.positions_replay.iter().filter(|s| !s.ok || !s.error.is_empty()).count(),
            "first_error": runs.positions_replay.iter().find(|s| !s.error.is_empty()).map(|s| &s.error),
        },
    });
    if w.pair {
        let mut p = side(&runs.pair_positions);
        p["ratio_over_live"] = summary_json(&ratio(&runs.live, &runs.pair_positions), "ratio");
        p["ratio_over_pair_none"] =
            summary_json(&ratio(&runs.pair_received, &runs.pair_positions), "ratio");
        j["pair_received"] = p;
    }
    j
}

/// Per rep, (work / VM run time) of `b` over the same of `a`.
fn vm_ratio(a: &[Sample], b: &[Sample]) -> Vec<f64> {
    pairs(a, b)
        .filter_map(|(x, y)| Some(y.span_rate? / x.span_rate?))
        .collect()
}

/// What a sync point and an epoch end cost, from the compute workloads:
/// per rep, (overhead at 1 kHz - overhead at 100 Hz) / (extra sync points),
/// overhead = recorded wall - live wall; and (recorded wall at 10 ms epochs
/// - at 1000 ms epochs) / (extra epochs).
pub fn costs(c100: &Runs, c1k: &Runs) -> Value {
    let sp = |s: &Sample| inspect_num(s, "sync_points.count");
    let ep = |s: &Sample| inspect_num(s, "epochs.count");
    let mut sync_cost = Vec::new();
    let mut naive = Vec::new();
    for i in 0..c100.live.len().min(c1k.live.len()) {
        let (l1, r1, l2, r2) = (&c100.live[i], &c100.record[i], &c1k.live[i], &c1k.record[i]);
        if [l1, r1, l2, r2].iter().all(|s| s.ok) {
            let (d1, d2) = (r1.out.wall - l1.out.wall, r2.out.wall - l2.out.wall);
            if let (Some(n1), Some(n2)) = (sp(r1), sp(r2)) {
                if n2 > n1 {
                    sync_cost.push((d2 - d1) / (n2 - n1) * 1e3);
                }
                if n1 > 0.0 {
                    naive.push(d1 / n1 * 1e3);
                }
            }
        }
    }
    let mut epoch_cost = Vec::new();
    if let Some((_, long)) = c100.variants.iter().find(|(n, _)| n == "record-epoch1000") {
        for (r, v) in c100.record.iter().zip(long) {
            if let (true, true, Some(e1), Some(e2)) = (r.ok, v.ok, ep(r), ep(v)) {
                if e1 > e2 {
                    epoch_cost.push((r.out.wall - v.out.wall) / (e1 - e2) * 1e3);
                }
            }
        }
    }
    json!({
        "sync_point_ms": summary_json(&sync_cost, "ms"),
        "sync_point_method": "per rep: ((rec-live wall) at 1 kHz - (rec-live wall) at 100 Hz) / (sync points at 1 kHz - at 100 Hz), compute guest",
        "overhead_per_sync_point_100hz_ms": summary_json(&naive, "ms"),
        "epoch_end_ms": summary_json(&epoch_cost, "ms"),
        "epoch_end_method": "per rep: (recorded wall at --epoch-ms 10 - at --epoch-ms 1000) / (epochs at 10 - at 1000), compute 100 Hz",
    })
}

/// Where the kept log for the micro-benchmarks goes.
pub fn kept_log(ctx: &Ctx) -> PathBuf {
    ctx.tmp.join("kept.log")
}
