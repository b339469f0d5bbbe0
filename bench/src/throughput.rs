//! Network throughput with FT on vs off: a windowed stream of UDP echoes
//! (1024-byte datagrams, 32 outstanding) to the netecho guest, unprotected
//! (`tandem run`) and as a protected pair (`received` mode), interleaved;
//! the figure is the echoed payload rate, Mbit/s, and the ratio per rep.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ctx::{make_image, Ctx};
use crate::netecho::{self, NetNs};
use crate::proc;
use crate::stats::summary_json;

/// Datagram size of the stream.
const DATAGRAM: usize = 1024;
/// Echoes kept outstanding.
const WINDOW: u32 = 32;

/// Streams echoes for `secs`: echoed Mbit/s of payload.
pub fn stream(ns: &NetNs, secs: f64) -> Result<f64, String> {
    let s = ns.udp_socket(&format!("{}:0", netecho::HOST_IP))?;
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let to = format!("{}:7", netecho::GUEST_IP);
    let mut msg = vec![0u8; DATAGRAM];
    msg[4..12].copy_from_slice(b"tdmstrm!");
    let mut buf = vec![0u8; 2048];
    let mut seq = 0u32;
    let mut send = |seq: &mut u32| {
        msg[..4].copy_from_slice(&seq.to_le_bytes());
        *seq += 1;
        let _ = s.send_to(&msg, &to);
    };
    for _ in 0..WINDOW {
        send(&mut seq);
    }
    let start = Instant::now();
    let mut echoed = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        match s.recv(&mut buf) {
            Ok(n) if n == DATAGRAM && &buf[4..12] == b"tdmstrm!" => {
                echoed += n as u64;
                send(&mut seq);
            }
            Ok(_) => {}
            // A lost datagram would shrink the window: refill on silence.
            Err(_) => send(&mut seq),
        }
    }
    Ok(echoed as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6)
}

fn unprotected(ctx: &Ctx, secs: f64, n: usize) -> Result<f64, String> {
    let ns = NetNs::create(&format!("-tu{n}"), &[netecho::TAP])?;
    let disk = ctx.tmp.join(format!("tput-{n}.img"));
    make_image(&disk, 64 << 10).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "taskset", "-c"])
        .arg(ctx.cpu.to_string())
        .arg(&ctx.tandem)
        .args(["run", "--mem", "32M", "--kernel"])
        .arg(ctx.guest("netecho"))
        .args(["--cmdline", &format!("ip={}", netecho::GUEST_IP), "--disk"])
        .arg(&disk)
        .args([
            "--net",
            &format!("tap={},mac={}", netecho::TAP, netecho::GUEST_MAC),
        ]);
    let mut running = proc::spawn(cmd).map_err(|e| format!("spawn: {e}"))?;
    let lines = crate::pair::watch_stdout(&mut running);
    if !crate::pair::wait_line(
        &lines,
        "netecho: up",
        Instant::now() + Duration::from_secs(60),
    ) {
        running.kill();
        return Err("netecho never came up".into());
    }
    let result = netecho::client(&ns, 20).and_then(|_| stream(&ns, secs));
    running.kill();
    let _ = running.finish(Duration::ZERO);
    let _ = std::fs::remove_file(&disk);
    result
}

/// The protected pair: its replication link encrypted (the default) or,
/// with `encrypt` false, only authenticated.
fn protected(ctx: &Ctx, secs: f64, n: usize, encrypt: bool) -> Result<f64, String> {
    let disk = ctx.tmp.join(format!("tput-pair-{n}.img"));
    let extra = if encrypt { "" } else { "encrypt = false\n" };
    let pair = crate::storage::netecho_pair_with(ctx, &disk, extra)?;
    let result = stream(&pair.ns, secs);
    drop(pair);
    let _ = std::fs::remove_file(&disk);
    result
}

/// Runs [`measure`] makes.
pub fn planned(ctx: &Ctx) -> usize {
    3 * ctx.reps(5, 1)
}

/// FT on vs off stream throughput, interleaved.
pub fn measure(ctx: &Ctx) -> Value {
    let secs = if ctx.quick { 2.0 } else { 4.0 };
    let (mut off, mut on, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut clear, mut clear_ratio, mut encrypted_over_clear) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut failures = 0;
    for i in 0..ctx.reps(5, 1) {
        let a = unprotected(ctx, secs, i);
        ctx.progress(&format!(
            "throughput rep {} unprotected: {a:?} Mbit/s",
            i + 1
        ));
        let b = protected(ctx, secs, i, true);
        ctx.progress(&format!(
            "throughput rep {} protected:   {b:?} Mbit/s",
            i + 1
        ));
        let c = protected(ctx, secs, i, false);
        ctx.progress(&format!(
            "throughput rep {} protected, link not encrypted: {c:?} Mbit/s",
            i + 1
        ));
        match (a, b, c) {
            (Ok(a), Ok(b), Ok(c)) => {
                off.push(a);
                on.push(b);
                clear.push(c);
                if a > 0.0 {
                    ratio.push(b / a);
                    clear_ratio.push(c / a);
                }
                if c > 0.0 {
                    encrypted_over_clear.push(b / c);
                }
            }
            _ => failures += 1,
        }
    }
    json!({
        "method": format!("a client keeps {WINDOW} UDP echoes of {DATAGRAM} bytes outstanding for {secs} s against netecho (echo port 7), unprotected (`tandem run`, VMM on CPU {}) and as a protected pair (`received` mode, primary on CPU {}, secondary on CPU {}) with its replication link encrypted (the default) and not (`encrypt = false`), interleaved; echoed payload Mbit/s; ratio per rep", ctx.cpu, ctx.cpu, ctx.cpu2),
        "failures": failures as f64,
        "unprotected_mbit_s": summary_json(&off, "Mbit/s"),
        "protected_mbit_s": summary_json(&on, "Mbit/s"),
        "protected_over_unprotected": summary_json(&ratio, "ratio"),
        "protected_clear_mbit_s": summary_json(&clear, "Mbit/s"),
        "protected_clear_over_unprotected": summary_json(&clear_ratio, "ratio"),
        "encrypted_over_clear": summary_json(&encrypted_over_clear, "ratio"),
    })
}
