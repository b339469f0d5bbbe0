//! QEMU as a peer: the same PVH images under TCG, TCG with icount, TCG
//! recording (`-icount shift=auto,rr=record`) and replaying. Only QEMU's own
//! ratios are comparable with tandem's, never absolute speeds.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::ctx::{make_image, Ctx};
use crate::proc::{self, Outcome};
use crate::stats::summary_json;

pub const QEMU: &str = "qemu-system-x86_64";

/// One QEMU workload.
pub struct QWorkload {
    pub name: &'static str,
    pub guest: &'static str,
    pub append: String,
    pub expect: &'static str,
    /// Extra device options (pc machine).
    pub devices: Vec<&'static str>,
    /// A virtio-blk disk on the microvm machine, this many bytes.
    pub disk_bytes: Option<u64>,
}

pub fn workloads(ctx: &Ctx) -> Vec<QWorkload> {
    let q = ctx.quick;
    let rounds = if q { 4 } else { 8 };
    let pio = if q { 1_000_000 } else { 3_000_000 };
    let count = if q { 256 } else { 512 };
    let compute = |name, hz| QWorkload {
        name,
        guest: "compute",
        append: format!("size=4194304 rounds={rounds} hz={hz}"),
        expect: "compute: size=",
        devices: Vec::new(),
        disk_bytes: None,
    };
    vec![
        QWorkload {
            name: "boot (hello)",
            guest: "hello",
            append: String::new(),
            expect: "hello from tandem",
            devices: Vec::new(),
            disk_bytes: None,
        },
        compute("compute-100Hz", 100),
        compute("compute-1kHz", 1000),
        QWorkload {
            name: "piostorm",
            guest: "piostorm",
            append: format!("port=0xe0 n={pio}"),
            expect: "piostorm: n=",
            devices: vec!["-device", "pc-testdev"],
            disk_bytes: None,
        },
        QWorkload {
            name: "ticker",
            guest: "ticker",
            append: String::new(),
            expect: "ticks=2000",
            devices: Vec::new(),
            disk_bytes: None,
        },
        QWorkload {
            name: "diskseq",
            guest: "diskseq",
            append: format!("lapic_extint=1 count={count} chunk=64"),
            expect: "diskseq: sectors=",
            devices: Vec::new(),
            disk_bytes: Some(1 << 20),
        },
        QWorkload {
            name: "diskio",
            guest: "diskseq",
            append: format!("lapic_extint=1 count={count} chunk=64 bench=1"),
            expect: "diskseq: bench sectors=",
            devices: Vec::new(),
            disk_bytes: Some(1 << 20),
        },
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    Icount,
    Record,
    Replay,
}

const MODES: [Mode; 4] = [Mode::Plain, Mode::Icount, Mode::Record, Mode::Replay];

fn command(ctx: &Ctx, w: &QWorkload, mode: Mode, rr: &Path, disk: Option<&Path>) -> Command {
    let mut cmd = ctx.pinned(QEMU);
    let machine = if disk.is_some() {
        "microvm,pic=on,pit=on,rtc=on,isa-serial=on,ioapic2=off,acpi=off"
    } else {
        "pc"
    };
    cmd.args([
        "-M", machine, "-m", "32", "-display", "none", "-serial", "stdio",
    ])
    .args(["-monitor", "none", "-no-reboot"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"])
    .args(&w.devices)
    .arg("-kernel")
    .arg(ctx.guest(w.guest));
    if !w.append.is_empty() {
        cmd.args(["-append", &w.append]);
    }
    let rr = rr.display().to_string();
    match mode {
        Mode::Plain => {}
        Mode::Icount => {
            cmd.args(["-icount", "shift=auto"]);
        }
        Mode::Record => {
            cmd.args(["-icount", &format!("shift=auto,rr=record,rrfile={rr}")]);
        }
        Mode::Replay => {
            cmd.args(["-icount", &format!("shift=auto,rr=replay,rrfile={rr}")]);
        }
    }
    if let Some(d) = disk {
        cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
        let file = format!("file={},format=raw,if=none", d.display());
        if matches!(mode, Mode::Record | Mode::Replay) {
            // Record/replay needs the blkreplay filter over the drive.
            cmd.args(["-drive", &format!("{file},id=img-direct")])
                .args(["-drive", "driver=blkreplay,if=none,image=img-direct,id=d0"]);
        } else {
            cmd.args(["-drive", &format!("{file},id=d0")]);
        }
        cmd.args(["-device", "virtio-blk-device,drive=d0"]);
    }
    cmd
}

/// Runs every workload `reps` times in all four modes, interleaved.
pub fn measure(ctx: &Ctx, reps: usize) -> Value {
    let version = proc::capture(QEMU, &["--version"]);
    let version = version.lines().next().unwrap_or("").to_string();
    let mut out = Vec::new();
    for w in workloads(ctx) {
        let mut runs: Vec<Vec<Option<Outcome>>> = vec![Vec::new(); MODES.len()];
        let mut rr_bytes = Vec::new();
        let mut first_error = None;
        for rep in 0..reps {
            let rr = ctx.tmp.join(format!("qemu-{}-{rep}.rr", w.guest));
            // Plain and icount swap places every other rep; record precedes
            // its replay.
            let order = if rep % 2 == 0 {
                MODES
            } else {
                [Mode::Icount, Mode::Record, Mode::Replay, Mode::Plain]
            };
            for mode in order {
                let disk = w.disk_bytes.map(|b| {
                    let p = ctx.tmp.join(format!("qemu-{rep}.img"));
                    let _ = make_image(&p, b);
                    p
                });
                let o = proc::run(
                    command(ctx, &w, mode, &rr, disk.as_deref()),
                    Duration::from_secs(120),
                );
                // isa-debug-exit: status (0 << 1) | 1.
                let ok = o.status == 1 && o.stdout.contains(w.expect);
                let mut line = format!(
                    "qemu {:<13} rep {}/{} {:<7}",
                    w.name,
                    rep + 1,
                    reps,
                    format!("{mode:?}").to_lowercase()
                );
                if ok {
                    line += &format!(" {:>7.3} s wall", o.wall);
                    if mode == Mode::Record {
                        let b = std::fs::metadata(&rr)
                            .map(|m| m.len() as f64)
                            .unwrap_or(f64::NAN);
                        rr_bytes.push(b);
                        line += &format!("  rr log {b} B");
                    }
                } else {
                    let e = format!(
                        "exit {} stdout ends {:?} stderr {:?}",
                        o.status,
                        o.last_line(),
                        o.stderr.lines().last().unwrap_or("")
                    );
                    line += &format!(" FAILED: {e}");
                    first_error.get_or_insert(format!("{mode:?}: {e}"));
                }
                ctx.progress(&line);
                let i = MODES.iter().position(|m| *m == mode).unwrap_or(0);
                runs[i].push(ok.then_some(o));
                if let Some(d) = disk {
                    let _ = std::fs::remove_file(d);
                }
            }
            let _ = std::fs::remove_file(&rr);
        }
        let wall = |m: usize| -> Vec<f64> { runs[m].iter().flatten().map(|o| o.wall).collect() };
        let ratio = |num: usize, den: usize| -> Vec<f64> {
            runs[num]
                .iter()
                .zip(&runs[den])
                .filter_map(|(a, b)| Some(a.as_ref()?.wall / b.as_ref()?.wall))
                .collect()
        };
        let mbit: Vec<f64> = runs[2]
            .iter()
            .flatten()
            .zip(&rr_bytes)
            .map(|(o, b)| b * 8.0 / 1e6 / o.wall)
            .collect();
        out.push(json!({
            "name": w.name,
            "guest": w.guest,
            "append": w.append,
            "plain_wall_s": summary_json(&wall(0), "s"),
            "icount_wall_s": summary_json(&wall(1), "s"),
            "record_wall_s": summary_json(&wall(2), "s"),
            "replay_wall_s": summary_json(&wall(3), "s"),
            // Work rate ratios: fixed work, so rate ratio = inverse wall ratio.
            "ratio_record_over_plain": summary_json(&ratio(0, 2), "ratio"),
            "ratio_icount_over_plain": summary_json(&ratio(0, 1), "ratio"),
            "ratio_record_over_icount": summary_json(&ratio(1, 2), "ratio"),
            "replay_over_record_wall": summary_json(&ratio(3, 2), "ratio"),
            "replay_over_plain_wall": summary_json(&ratio(3, 0), "ratio"),
            "rr_log_bytes": summary_json(&rr_bytes, "B"),
            "rr_mbit_per_s": summary_json(&mbit, "Mbit/s"),
            "failures": runs.iter().flatten().filter(|o| o.is_none()).count(),
            "first_error": first_error,
        }));
    }
    json!({
        "version": version,
        "modes": "plain = TCG; icount = TCG -icount shift=auto; record = icount + rr=record; replay = rr=replay; diskseq runs on microvm with blkreplay under record/replay",
        "workloads": out,
    })
}

/// Runs per rep, for the progress count.
pub fn runs_per_rep() -> usize {
    MODES.len()
}
