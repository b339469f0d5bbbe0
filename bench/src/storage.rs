//! Storage and switch-over figures: the log a disk workload ships with
//! shared vs mirrored storage, the re-sync of a replica delta, and the
//! pause of a `tandem switchover`.
//!
//! * **Log bytes.** `diskseq` writes N MiB, flushes and reads it back in a
//!   protected pair, once with `storage = "shared"` (read data travels in
//!   the log) and once `"mirrored"` (the log carries a hash per read), back
//!   to back; the primary's exit line `replication: N log bytes shipped`.
//! * **Re-sync.** After that mirrored run both replicas' bitmaps hold the
//!   N MiB written since their last sync; a new pair on the same replicas
//!   copies exactly that delta before the guest starts (the primary's
//!   `disks: K chunks (X MiB) copied ... in T ms`). A first sync (no
//!   sidecars) copies the whole disk: measured too, for contrast.
//! * **Switch-over.** A netecho pair; a client sends a tagged echo every
//!   2 ms; `tandem switchover` runs; figures: the live side's own
//!   `handed over in T ms`, the command's wall time, and the longest gap
//!   between echo replies around it.

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ctx::{make_image, Ctx};
use crate::netecho;
use crate::pair::{err_tail, number_after, wait_line, watch_stdout, Pair, PairSpec};
use crate::stats::summary_json;

/// One diskseq pair run to the guest's end: (log bytes, wall seconds).
fn diskseq_run(
    ctx: &Ctx,
    disks: &[&Path; 2],
    state: &Path,
    kib: u64,
    mirrored: bool,
) -> Result<(f64, f64), String> {
    let guest = ctx.guest("diskseq");
    let cmdline = format!("count={} chunk=128", kib * 2);
    let spec = PairSpec {
        disk: Some(disks[0]),
        replicas: mirrored.then_some(*disks),
        state: Some(state),
        ..PairSpec::new(&guest, &cmdline)
    };
    let mut pair = Pair::start(ctx, &spec)?;
    let primary = pair.primary.take().ok_or("no primary")?;
    let out = primary.finish(Duration::from_secs(300));
    if out.status != 0 || !out.stdout.contains("diskseq: sectors=") {
        let tail: Vec<&str> = out.stderr.lines().rev().take(4).collect();
        return Err(format!(
            "diskseq pair failed ({}, stdout {:?}): {}",
            out.status,
            out.stdout.lines().last().unwrap_or(""),
            tail.join(" | ")
        ));
    }
    let bytes = out
        .stderr
        .lines()
        .find_map(|l| number_after(l, "replication:"))
        .ok_or_else(|| {
            let tail: Vec<&str> = out.stderr.lines().rev().take(4).collect();
            format!("no `replication: N log bytes` line: {}", tail.join(" | "))
        })?;
    // The secondary replays to the end too.
    if let Some(s) = pair.secondary.take() {
        let _ = s.finish(Duration::from_secs(60));
    }
    Ok((bytes, out.wall))
}

/// A disk copy's figures (chunks, MiB, ms) as JSON.
fn copy_json((chunks, mib, ms): (f64, f64, f64)) -> Value {
    json!({ "chunks": chunks, "mib": mib, "ms": ms })
}

/// A mirrored netecho pair on existing replicas: the primary's disk-copy
/// line, as (chunks, MiB, ms).
fn resync_run(ctx: &Ctx, disks: &[&Path; 2], state: &Path) -> Result<(f64, f64, f64), String> {
    let guest = ctx.guest("netecho");
    let cmdline = format!("ip={}", netecho::GUEST_IP);
    let spec = PairSpec {
        disk: Some(disks[0]),
        net: true,
        replicas: Some(*disks),
        state: Some(state),
        ..PairSpec::new(&guest, &cmdline)
    };
    let pair = Pair::start(ctx, &spec)?;
    let primary = pair.primary.as_ref().ok_or("no primary")?;
    let (_, line) = primary
        .wait_err(
            "copied to the secondary in",
            Instant::now() + Duration::from_secs(120),
        )
        .ok_or_else(|| format!("no disk copy line: {}", err_tail(primary)))?;
    // Both sides record the sync before the pair is stopped.
    primary
        .wait_err(
            "replicas are in sync",
            Instant::now() + Duration::from_secs(30),
        )
        .ok_or_else(|| format!("the sync was never confirmed: {}", err_tail(primary)))?;
    let chunks = number_after(&line, "disks:").ok_or("no chunk count")?;
    let mib = line
        .find('(')
        .and_then(|i| number_after(&line[i..], "("))
        .unwrap_or(0.0);
    let ms = number_after(&line, "secondary in").ok_or("no duration")?;
    Ok((chunks, mib, ms))
}

/// A netecho pair on a fresh shared disk `disk`, up and answering echoes.
pub fn netecho_pair(ctx: &Ctx, disk: &Path) -> Result<Pair, String> {
    netecho_pair_with(ctx, disk, "")
}

/// [`netecho_pair`] with more `[ft]` lines.
pub fn netecho_pair_with(ctx: &Ctx, disk: &Path, ft_extra: &str) -> Result<Pair, String> {
    make_image(disk, 64 << 10).map_err(|e| e.to_string())?;
    let guest = ctx.guest("netecho");
    let cmdline = format!("ip={}", netecho::GUEST_IP);
    let spec = PairSpec {
        disk: Some(disk),
        net: true,
        ft_extra,
        ..PairSpec::new(&guest, &cmdline)
    };
    let mut pair = Pair::start(ctx, &spec)?;
    let out = watch_stdout(pair.primary.as_mut().ok_or("no primary")?);
    if !wait_line(
        &out,
        "netecho: up",
        Instant::now() + Duration::from_secs(60),
    ) {
        return Err("netecho never came up".into());
    }
    netecho::client(&pair.ns, 20)?;
    Ok(pair)
}

/// One switch-over of a netecho pair: (handed-over ms, command ms, longest
/// echo gap ms).
fn switchover_run(ctx: &Ctx) -> Result<(f64, f64, f64), String> {
    let disk = ctx.tmp.join("switchover.img");
    let pair = netecho_pair(ctx, &disk)?;
    // Echoes every 2 ms in the background; reply times recorded.
    let s = pair.ns.udp_socket(&format!("{}:0", netecho::HOST_IP))?;
    let replies: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let (replies, stop) = (replies.clone(), stop.clone());
        let s: UdpSocket = s.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_millis(2)));
            let to = format!("{}:7", netecho::GUEST_IP);
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Acquire) {
                let _ = s.send_to(b"tdmswitch-echo", &to);
                let until = Instant::now() + Duration::from_millis(2);
                while Instant::now() < until {
                    if let Ok(n) = s.recv(&mut buf) {
                        if &buf[..n] == b"tdmswitch-echo" {
                            replies
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Instant::now());
                        }
                    }
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let began = Instant::now();
    let cmd = Command::new(&ctx.tandem)
        .args(["switchover", "--config"])
        .arg(&pair.config)
        .output()
        .map_err(|e| format!("tandem switchover: {e}"))?;
    let took = began.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let _ = pinger.join();
    let text = String::from_utf8_lossy(&cmd.stdout).into_owned();
    if !cmd.status.success() {
        return Err(format!(
            "switchover failed: {text}{}",
            String::from_utf8_lossy(&cmd.stderr)
        ));
    }
    let handed = number_after(&text, "handed over in").ok_or("no `handed over in` figure")?;
    let times = replies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let gap = times
        .windows(2)
        .filter(|w| w[1] >= began - Duration::from_millis(50))
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .fold(0.0f64, f64::max);
    drop(pair);
    let _ = std::fs::remove_file(&disk);
    Ok((handed, took, gap))
}

/// diskseq sizes, KiB (quick mode: one small size, so it stays quick).
fn sizes(ctx: &Ctx) -> &'static [u64] {
    if ctx.quick {
        &[128]
    } else {
        &[1024, 2048]
    }
}

/// Runs [`measure`] makes (for the progress count).
pub fn planned(ctx: &Ctx) -> usize {
    sizes(ctx).len() * 4 + ctx.reps(5, 2)
}

/// One guest crash in a netecho pair under `policy` (`on_guest_crash`): ms
/// from the request that makes the guest crash ("crash": a pvpanic report;
/// "hang": its 500 ms watchdog expires; "fragile": a timer tick inside a
/// 15 ms window) to the first answer of the recovered guest: a UDP echo
/// after a reboot, the fragile request's own echo after a rollback.
fn crash_run(ctx: &Ctx, what: &str, policy: &str) -> Result<f64, String> {
    let disk = ctx.tmp.join("crash.img");
    let ft = format!("on_guest_crash = \"{policy}\"");
    let pair = netecho_pair_with(ctx, &disk, &ft)?;
    let s = pair.ns.udp_socket(&format!("{}:0", netecho::HOST_IP))?;
    let sent = Instant::now();
    s.send_to(what.as_bytes(), format!("{}:9002", netecho::GUEST_IP))
        .map_err(|e| e.to_string())?;
    let primary = pair.primary.as_ref().ok_or("no primary")?;
    let deadline = sent + Duration::from_secs(30);
    let reply = if what == "fragile" {
        primary
            .wait_err(
                "rolled back to the checkpoint",
                sent + Duration::from_secs(10),
            )
            .ok_or_else(|| format!("no rollback: {}", err_tail(primary)))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        loop {
            if let Ok(n) = s.recv(&mut buf) {
                if &buf[..n] == b"fragile" {
                    break Instant::now();
                }
            }
            if Instant::now() > deadline {
                return Err("the fragile request was never answered".into());
            }
        }
    } else {
        // The crash itself stops the echoes; wait for it to be seen.
        primary
            .wait_err("rebooting the guest", sent + Duration::from_secs(10))
            .ok_or_else(|| format!("no reboot: {}", err_tail(primary)))?;
        netecho::first_reply(&pair.ns, Duration::from_millis(2), deadline)?
            .ok_or("no echo after the reboot")?
    };
    drop(pair);
    let _ = std::fs::remove_file(&disk);
    Ok((reply - sent).as_secs_f64() * 1e3)
}

/// The guest-crash trials: (request, policy, JSON key).
const CRASH_TRIALS: [(&str, &str, &str); 4] = [
    ("crash", "reboot", "panic_to_reply_ms"),
    ("hang", "reboot", "hang_to_reply_ms"),
    (
        "fragile",
        "restart-checkpoint",
        "timing_crash_rollback_to_reply_ms",
    ),
    (
        "crash",
        "restart-checkpoint",
        "panic_checkpoint_mode_to_reply_ms",
    ),
];

/// Runs [`crash_measure`] makes (for the progress count).
pub fn crash_planned(ctx: &Ctx) -> usize {
    CRASH_TRIALS.len() * ctx.reps(5, 1)
}

/// The guest-crash recovery figures, per trial.
pub fn crash_measure(ctx: &Ctx) -> Value {
    let mut crash_ms: Vec<Vec<f64>> = vec![Vec::new(); CRASH_TRIALS.len()];
    let mut crash_failures = 0;
    for i in 0..ctx.reps(5, 1) {
        for (&(what, policy, _), out) in CRASH_TRIALS.iter().zip(crash_ms.iter_mut()) {
            match crash_run(ctx, what, policy) {
                Ok(ms) => {
                    ctx.progress(&format!(
                        "guest {what} ({policy}) {}: served again after {ms:.0} ms",
                        i + 1
                    ));
                    out.push(ms);
                }
                Err(e) => {
                    crash_failures += 1;
                    ctx.progress(&format!("guest {what} ({policy}) {} FAILED: {e}", i + 1));
                }
            }
        }
    }
    let mut crash = json!({ "failures": crash_failures as f64 });
    for (&(_, _, key), ms) in CRASH_TRIALS.iter().zip(&crash_ms) {
        crash[key] = summary_json(ms, "ms");
    }
    crash
}

/// All storage and switch-over figures.
pub fn measure(ctx: &Ctx) -> Value {
    let mut rows = Vec::new();
    let sizes = sizes(ctx);
    for &kib in sizes {
        let mib = kib as f64 / 1024.0;
        let dir = ctx.tmp.join(format!("storage-{kib}"));
        let _ = std::fs::create_dir_all(dir.join("a"));
        let _ = std::fs::create_dir_all(dir.join("b"));
        let (a, b) = (dir.join("a/disk.img"), dir.join("b/disk.img"));
        let size = (kib << 10) + (1 << 20);
        let made = [&a, &b].iter().all(|p| make_image(p, size).is_ok());
        let mut row = json!({ "mib": mib });
        if !made {
            row["error"] = "cannot create the images".into();
            rows.push(row);
            continue;
        }
        let disks = [a.as_path(), b.as_path()];
        let state = dir.join("state");
        // A first sync of never-synced replicas copies everything.
        let first = resync_run(ctx, &disks, &state);
        ctx.progress(&format!("storage {mib} MiB: first sync {first:?}"));
        if let Ok(copy) = first {
            row["first_sync"] = copy_json(copy);
        }
        let shared = diskseq_run(ctx, &disks, &state, kib, false);
        ctx.progress(&format!("storage {mib} MiB: diskseq shared {shared:?}"));
        let mirrored = diskseq_run(ctx, &disks, &state, kib, true);
        ctx.progress(&format!("storage {mib} MiB: diskseq mirrored {mirrored:?}"));
        match (&shared, &mirrored) {
            (Ok((sb, sw)), Ok((mb, mw))) => {
                row["shared_log_bytes"] = (*sb).into();
                row["mirrored_log_bytes"] = (*mb).into();
                row["shared_mbit_s"] = (sb * 8.0 / sw / 1e6).into();
                row["mirrored_mbit_s"] = (mb * 8.0 / mw / 1e6).into();
                row["mirrored_over_shared"] = (mb / sb).into();
            }
            _ => {
                row["error"] = format!("{:?} / {:?}", shared.err(), mirrored.as_ref().err()).into();
            }
        }
        // The mirrored run left its writes in both bitmaps: the next pair
        // copies that delta.
        let delta = resync_run(ctx, &disks, &state);
        ctx.progress(&format!("storage {mib} MiB: delta re-sync {delta:?}"));
        if let Ok(copy) = delta {
            row["delta_sync"] = copy_json(copy);
        }
        let _ = std::fs::remove_dir_all(&dir);
        rows.push(row);
    }
    let mut handed = Vec::new();
    let mut took = Vec::new();
    let mut gaps = Vec::new();
    let mut failures = 0;
    for i in 0..ctx.reps(5, 2) {
        match switchover_run(ctx) {
            Ok((h, t, g)) => {
                ctx.progress(&format!("switch-over {}: handed over in {h:.0} ms, command {t:.0} ms, longest echo gap {g:.0} ms", i + 1));
                handed.push(h);
                took.push(t);
                gaps.push(g);
            }
            Err(e) => {
                failures += 1;
                ctx.progress(&format!("switch-over {} FAILED: {e}", i + 1));
            }
        }
    }
    json!({
        "method": "diskseq writes N MiB (128-sector requests), flushes and reads it back in a protected pair, shared then mirrored storage, back to back; log bytes from the primary's `replication: N log bytes shipped`, Mbit/s over the run's wall time. Re-sync: a pair started on the replicas copies the chunks either side wrote since their last sync (the primary's `disks: K chunks ... copied ... in T ms`); the first row of each size is a first sync with no sidecars (everything). Switch-over: `tandem switchover` on a netecho pair while a client sends a UDP echo every 2 ms",
        "disk": rows,
        "switchover": {
            "failures": failures as f64,
            "handed_over_ms": summary_json(&handed, "ms"),
            "command_ms": summary_json(&took, "ms"),
            "longest_echo_gap_ms": summary_json(&gaps, "ms"),
        },
    })
}
