//! `tandem-bench`: tandem's macro benchmark harness (`make bench`).
//!
//! Runs the test guests unprotected and recorded, side by side and
//! interleaved, replays and inspects every recording, runs the same images
//! under QEMU (plain TCG vs `-icount rr=record/replay`), and a few
//! micro-benchmarks; writes `bench/results.json` and regenerates the
//! tables in `BENCHMARKS.md`. `tandem-bench report` only regenerates the
//! tables from an existing `bench/results.json`.
//!
//! `BENCH_QUICK=1` (or `--quick`): fewer repetitions, smaller sizes.
//! `BENCH_ONLY=netecho,failover` (a development aid): only those tandem
//! workloads and, with `failover`, `storage`, `throughput` or `crash`, those
//! trials.

mod ctx;
mod micro;
mod netecho;
mod pair;
mod proc;
mod qemu;
mod report;
mod results;
mod stats;
mod storage;
mod tandem;
mod throughput;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ctx::Ctx;
use serde_json::{json, Value};

fn usage() -> ExitCode {
    eprintln!("usage: tandem-bench [--quick] [--no-qemu] [--no-net] | tandem-bench report");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let results = root.join("bench/results.json");
    let md = root.join("BENCHMARKS.md");
    if args.first().map(String::as_str) == Some("report") {
        return match regenerate(&results, &md) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tandem-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let (mut no_qemu, mut no_net) = (false, false);
    for a in &args {
        match a.as_str() {
            "--quick" => quick = true,
            "--no-qemu" => no_qemu = true,
            "--no-net" => no_net = true,
            _ => return usage(),
        }
    }
    match run(&root, quick, no_qemu, no_net) {
        Ok(json) => {
            if let Err(e) = std::fs::write(&results, crate::results::pretty(json)) {
                eprintln!("tandem-bench: cannot write {}: {e}", results.display());
                return ExitCode::FAILURE;
            }
            if let Err(e) = regenerate(&results, &md) {
                eprintln!("tandem-bench: {e}");
                return ExitCode::FAILURE;
            }
            eprintln!(
                "tandem-bench: wrote {} and {}",
                results.display(),
                md.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The current directory if it is the workspace root, else this crate's parent.
fn workspace_root() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join("bench/Cargo.toml").exists() {
        return cwd;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(cwd)
}

fn regenerate(results: &Path, md: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(results)
        .map_err(|e| format!("cannot read {}: {e}", results.display()))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", results.display()))?;
    let old = std::fs::read_to_string(md).unwrap_or_default();
    let new = report::merge(&old, &report::render(&json));
    std::fs::write(md, new).map_err(|e| format!("cannot write {}: {e}", md.display()))
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it in.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 = this thread; the size and pointer describe `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return vec![0];
    }
    // SAFETY: CPU_ISSET only reads the set.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Keeps the harness itself off `cpu` when another CPU is allowed.
fn move_off(cpu: usize, allowed: &[usize]) {
    let others: Vec<usize> = allowed.iter().copied().filter(|&c| c != cpu).collect();
    if others.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in others {
        // SAFETY: c < CPU_SETSIZE (it came from CPU_ISSET over that range).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 = this thread (threads spawned later inherit it).
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
}

fn machine(cpu: usize) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let vmx_svm = has("vmx") || has("svm");
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok());
    json!({
        "nproc": proc::capture("nproc", &[]).parse::<u64>().ok(),
        "cpus_online": cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        "cpu_model": field("model name"),
        "kernel": proc::capture("uname", &["-r"]),
        "mem_gib": mem_kib.map(|k| k as f64 / (1 << 20) as f64),
        "hypervisor_flag": has("hypervisor"),
        "vmx_or_svm_flag": vmx_svm,
        "kvm_nested": has("hypervisor") && !vmx_svm,
        "kvm_note": if vmx_svm {
            "VMX/SVM visible: hardware-backed KVM"
        } else {
            "no VMX/SVM flags: nested, paravirtual KVM running guest code in its instruction emulator (see shared/GUEST-NOTES.md)"
        },
        "dev_kvm": Path::new("/dev/kvm").exists(),
        "pinned_cpu": cpu,
    })
}

fn git(root: &Path) -> Value {
    let r = root.display().to_string();
    let commit = proc::capture("git", &["-C", &r, "rev-parse", "HEAD"]);
    let dirty = !proc::capture(
        "git",
        &["-C", &r, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    let subject = proc::capture("git", &["-C", &r, "log", "-1", "--format=%s"]);
    json!({
        "commit": commit,
        "dirty": dirty,
        "subject": subject.chars().take(100).collect::<String>(),
    })
}

fn run(root: &Path, quick: bool, no_qemu: bool, no_net: bool) -> Result<Value, String> {
    let tandem_bin = root.join("target/release/tandem");
    let guests = root.join("target/guests");
    if !tandem_bin.exists() {
        return Err(format!(
            "{} missing: run `make build` first",
            tandem_bin.display()
        ));
    }
    for g in [
        "compute", "piostorm", "ticker", "diskseq", "netecho", "hello",
    ] {
        if !guests.join(format!("{g}.elf")).exists() {
            return Err(format!(
                "guest {g}.elf missing in {}: run `make guests` first",
                guests.display()
            ));
        }
    }
    let allowed = allowed_cpus();
    let cpu = allowed.first().copied().unwrap_or(0);
    let cpu2 = allowed.get(1).copied().unwrap_or(cpu);
    // Describe the machine before the harness narrows its own affinity.
    let machine = machine(cpu);
    move_off(cpu, &allowed);
    let tmp = std::env::temp_dir().join(format!("tandem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let ctx = Ctx {
        root: root.to_path_buf(),
        tandem: tandem_bin,
        guests,
        tmp: tmp.clone(),
        quick,
        cpu,
        cpu2,
        done: Cell::new(0),
        planned: Cell::new(0),
        started: Instant::now(),
    };
    let result = measure_all(&ctx, machine, no_qemu, no_net);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Memory the "in use" re-protection trials fill (netecho `fill=`): about 6 s
/// of guest time on the emulator-based development hosts.
const FILL_MIB: u32 = 64;

/// Failover (SIGSTOP of the primary) and re-protection trials, 32 MiB and
/// 256 MiB netecho guests (nearly empty, and with [`FILL_MIB`] in use)
/// interleaved.
fn failover(ctx: &Ctx, (n32, n256): (usize, usize)) -> Value {
    let mut t32 = Vec::new();
    let mut t256 = Vec::new();
    let mut t256_filled = Vec::new();
    // Filling takes seconds of guest time: full mode only.
    let n_filled = ctx.reps(n256, 0);
    for i in 0..n32.max(n256) {
        for (mem, fill, n, out) in [
            ("32M", 0, n32, &mut t32),
            ("256M", 0, n256, &mut t256),
            ("256M", FILL_MIB, n_filled, &mut t256_filled),
        ] {
            if i >= n {
                continue;
            }
            let t = pair::failover_trial(ctx, mem, pair::Fault::Stop, fill, false);
            let what = format!("failover {mem:<5} ({fill} MiB in use) trial {}/{n}", i + 1);
            if t.error.is_empty() {
                ctx.progress(&format!(
                    "{what} detect {:.0} ms (silence {:.0}), catch-up {:.1} ms, go-live→reply {:.1} ms, total {:.0} ms; re-protect {} ms, pause {} ms ({} pages)",
                    t.detect_ms,
                    t.silent_ms,
                    t.catch_up_ms,
                    t.go_live_ms,
                    t.total_ms,
                    t.reprotect_ms.map_or("?".into(), |x| format!("{x:.0}")),
                    t.pause_ms.map_or("?".into(), |x| format!("{x:.0}")),
                    t.pages.map_or("?".into(), |x| format!("{x:.0}")),
                ));
            } else {
                ctx.progress(&format!("{what} FAILED: {}", t.error));
            }
            out.push(t);
        }
    }
    // The same failover after a partition (nftables drop of the
    // replication traffic) and after kill -9, 32 MiB guest.
    let mut by_fault = Vec::new();
    // And SIGSTOP with the pair arbitrated by a 3-member etcd cluster
    // instead of the witness (when etcd is installed).
    let etcd = Command::new("etcd").arg("--version").output().is_ok();
    for (fault, key, on_etcd) in [
        (pair::Fault::Partition, "partition_32m", false),
        (pair::Fault::Kill9, "kill9_32m", false),
        (pair::Fault::StopAggressive, "aggressive_32m", false),
        (pair::Fault::Stop, "etcd_32m", true),
    ] {
        // The etcd cluster takes seconds to start: full mode only.
        if on_etcd && (!etcd || ctx.quick) {
            continue;
        }
        let n = ctx.reps(5, 1);
        let mut trials = Vec::new();
        for i in 0..n {
            let t = pair::failover_trial(ctx, "32M", fault, 0, on_etcd);
            if t.error.is_empty() {
                ctx.progress(&format!(
                    "failover {key} trial {}/{n}: detect {:.0} ms, after detection {:.1} ms, total {:.0} ms",
                    i + 1,
                    t.detect_ms,
                    t.catch_up_ms + t.go_live_ms,
                    t.total_ms
                ));
            } else {
                ctx.progress(&format!(
                    "failover {key} trial {}/{n} FAILED: {}",
                    i + 1,
                    t.error
                ));
            }
            trials.push(t);
        }
        by_fault.push((key, pair::trials_json("32M", &trials)));
    }
    let spare = if etcd && !ctx.quick {
        spare_takeover(ctx)
    } else {
        Value::Null
    };
    let mut out = json!({
        "spare": spare,
        "failover_timeout_ms": pair::FAILOVER_MS,
        "heartbeat_ms": 100u32,
        "fault": "SIGSTOP of the primary (its sockets stay open, as a hung host looks to its peer)",
        "guest": "netecho, output_commit = received, shared disk, one NIC on a bridge with the client",
        "method": "detect = SIGSTOP → the secondary's stderr line `primary silent for N ms`; catch-up = that line → `going live at stop`; go-live = that line → the first reply to an echo (64 B, a new one every 2 ms, all sent after the SIGSTOP); lines timed as they arrive on the harness's pipe. Re-protect = `tandem pair --host a` started (after kill -9 of the frozen primary) → the live side's `secondary joined at stop`; pause from its `full sync point ... guest paused X ms` line",
        "mem_32m": pair::trials_json("32M", &t32),
        "mem_256m": pair::trials_json("256M", &t256),
        "fill_mib": FILL_MIB,
        "mem_256m_filled": pair::trials_json("256M", &t256_filled),
    });
    for (key, json) in by_fault {
        out[key] = json;
    }
    out
}

/// A spare host taking a lost host's slot (`tests/etcd.rs`'s three-host
/// cluster with TLS and auth on, run by cargo): host a killed → spare c's
/// "standing in" line, and → c's side protecting the VM again. Nodes follow
/// the cluster with a watch, or (as before watches) list it every 300 ms.
fn spare_takeover(ctx: &Ctx) -> Value {
    let reps = ctx.reps(3, 1);
    let mut modes = serde_json::Map::new();
    for (mode, poll) in [("watch", None), ("poll_300ms", Some("300"))] {
        let out = std::env::temp_dir().join(format!("tandem-bench-spare-{mode}.jsonl"));
        let _ = std::fs::remove_file(&out);
        for i in 0..reps {
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.current_dir(workspace_root())
                .args(["test", "--release", "--locked", "--test", "etcd", "--"])
                .args(["--exact", "a_spare_host_re_protects_a_vm_whose_host_died"])
                .env("TANDEM_SPARE_BENCH_OUT", &out);
            match poll {
                Some(ms) => cmd.env("TANDEM_CLUSTER_POLL_MS", ms),
                None => cmd.env_remove("TANDEM_CLUSTER_POLL_MS"),
            };
            let ok = cmd.output().is_ok_and(|o| o.status.success());
            ctx.progress(&format!(
                "spare takeover ({mode}) trial {}/{reps}: {}",
                i + 1,
                if ok { "done" } else { "FAILED" }
            ));
        }
        let trials: Vec<Value> = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let median = |key: &str| {
            let mut v: Vec<f64> = trials.iter().filter_map(|t| t[key].as_f64()).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied()
        };
        modes.insert(
            mode.into(),
            json!({
                "reps": trials.len(),
                "stand_in_ms_median": median("stand_in_ms"),
                "protected_ms_median": median("protected_ms"),
                "trials": trials,
            }),
        );
    }
    json!({
        "method": "tests/etcd.rs a_spare_host_re_protects_a_vm_whose_host_died: three hosts in network namespaces run `tandem node` on a 3-member etcd cluster (TLS client certificates, auth on); host a (primary) is killed with SIGKILL; stand-in = kill → spare c's `standing in for it in slot a` line; protected = kill → c's side reports secondary. Node membership lease 2 s.",
        "modes": modes,
    })
}

fn measure_all(ctx: &Ctx, machine: Value, no_qemu: bool, no_net: bool) -> Result<Value, String> {
    // The commit measured: the binaries are built before the run starts,
    // whatever is committed while it runs.
    let measured = git(&ctx.root);
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let reps = ctx.reps(5, 3);
    let qreps = ctx.reps(3, 1);
    // Failover + re-protection trials: (32 MiB guest, 256 MiB guest).
    let fo_reps = (ctx.reps(20, 3), ctx.reps(3, 2));
    let mut skipped: Vec<(String, String)> = Vec::new();

    // Namespaces of an earlier, interrupted harness.
    netecho::sweep_stale();
    // The network namespace for netecho (root only).
    let mut workloads = tandem::workloads(ctx);
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.split(',').map(str::to_string).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    workloads.retain(|w| wanted(&w.name));
    let fo_reps = if wanted("failover") { fo_reps } else { (0, 0) };
    let ns = if no_net {
        skipped.push(("netecho".into(), "--no-net given".into()));
        None
    } else {
        match netecho::NetNs::new() {
            Ok(ns) => Some(ns),
            Err(e) => {
                skipped.push((
                    "netecho".into(),
                    format!("no network namespace with a tap: {e}"),
                ));
                None
            }
        }
    };
    if ns.is_none() {
        workloads.retain(|w| !matches!(w.kind, tandem::Kind::NetEcho { .. }));
    }
    let qemu_ok = !no_qemu && !proc::capture(qemu::QEMU, &["--version"]).is_empty();
    if !qemu_ok {
        let why = if no_qemu {
            "--no-qemu given"
        } else {
            "qemu-system-x86_64 not installed (bench/setup.sh installs it)"
        };
        skipped.push(("qemu".into(), why.into()));
    }
    let planned = workloads
        .iter()
        .map(|w| reps * tandem::runs_per_rep(w))
        .sum::<usize>()
        + if qemu_ok {
            qemu::workloads(ctx).len() * qreps * qemu::runs_per_rep()
        } else {
            0
        }
        + 2
        + if ns.is_some() && fo_reps != (0, 0) {
            fo_reps.0 + fo_reps.1 + ctx.reps(fo_reps.1, 0) + ctx.reps(4 * 5, 3)
        } else {
            0
        }
        + if ns.is_some() && wanted("storage") {
            storage::planned(ctx)
        } else {
            0
        }
        + if ns.is_some() && wanted("throughput") {
            throughput::planned(ctx)
        } else {
            0
        }
        + if ns.is_some() && wanted("crash") {
            storage::crash_planned(ctx)
        } else {
            0
        };
    ctx.planned.set(planned);
    ctx.note(&format!(
        "tandem-bench: {} mode, {reps} reps per tandem figure, {qreps} per QEMU figure, {planned} runs; VMM pinned to CPU {}",
        if ctx.quick { "quick" } else { "full" },
        ctx.cpu
    ));

    let mut tjson = Vec::new();
    let mut all_runs = Vec::new();
    let keep = tandem::kept_log(ctx);
    for w in &workloads {
        let keep_here = (w.name == "compute-1kHz").then_some(keep.as_path());
        let runs = tandem::measure(ctx, w, reps, ns.as_ref(), keep_here);
        tjson.push(tandem::to_json(w, &runs));
        all_runs.push((w.name.clone(), runs));
    }
    let failover = if ns.is_some() && fo_reps != (0, 0) {
        failover(ctx, fo_reps)
    } else {
        Value::Null
    };
    let storage = if ns.is_some() && wanted("storage") {
        storage::measure(ctx)
    } else {
        Value::Null
    };
    let throughput = if ns.is_some() && wanted("throughput") {
        throughput::measure(ctx)
    } else {
        Value::Null
    };
    let crash = if ns.is_some() && wanted("crash") {
        storage::crash_measure(ctx)
    } else {
        Value::Null
    };
    drop(ns);
    let find = |n: &str| all_runs.iter().find(|(name, _)| name == n).map(|(_, r)| r);
    let costs = match (find("compute-100Hz"), find("compute-1kHz")) {
        (Some(a), Some(b)) => tandem::costs(a, b),
        _ => Value::Null,
    };
    let qjson = if qemu_ok {
        qemu::measure(ctx, qreps)
    } else {
        Value::Null
    };
    let micro = micro::measure(ctx, &keep);
    let duration = ctx.started.elapsed().as_secs_f64();
    ctx.note(&format!("tandem-bench: done in {duration:.1} s"));

    let skipped: Vec<Value> = skipped
        .into_iter()
        .map(|(what, why)| json!({ "what": what, "why": why }))
        .collect();
    Ok(json!({
        "schema": 1u32,
        "mode": if ctx.quick { "quick" } else { "full" },
        "started_unix": started_unix,
        "duration_s": duration,
        "machine": machine,
        "git": measured,
        "method": {
            "reps": reps,
            "qemu_reps": qreps,
            "pinning": format!("every measured VMM process runs under `taskset -c {}`; the harness runs on the other CPUs", ctx.cpu),
            "interleaving": "live and recorded runs alternate within each rep (ABBA order across reps); each ratio is per rep, from the pair",
            "ratio": "recorded work rate / live work rate (1.0 = no overhead, like VMware FT's published 0.94-0.98)",
            "pair_pinning": format!("a protected pair's primary runs under `taskset -c {}`, its secondary and witness under `taskset -c {}`; each pair runs in a fresh network namespace", ctx.cpu, ctx.cpu2),
        },
        "tandem": { "workloads": tjson, "costs": costs },
        "pair": failover,
        "storage": storage,
        "throughput": throughput,
        "crash": crash,
        "qemu": qjson,
        "micro": micro,
        "skipped": skipped,
    }))
}
