//! netecho under UDP load: a network namespace with a bridge and the taps,
//! tandem inside it, and a closed-loop UDP echo client bound on the bridge.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proc::{self, Outcome};

pub const TAP: &str = "tap0";
pub const HOST_IP: &str = "10.78.0.1";
pub const GUEST_IP: &str = "10.78.0.2";
pub const GUEST_MAC: &str = "52:54:00:00:78:02";

/// A network namespace (lo up, and a bridge with taps), deleted on drop.
pub struct NetNs {
    pub name: String,
}

/// The prefix of every namespace this harness creates (`tdm-bench-PID...`).
const PREFIX: &str = "tdm-bench-";

/// Deletes namespaces left by an earlier harness that is gone (killed before
/// its drops ran).
pub fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// `tdm-bench-<pid>` with lo up and tap0 on bridge br0 at 10.78.0.1/24
    /// (the same path as the pair's, whose two taps share one bridge).
    pub fn new() -> Result<Self, String> {
        Self::create("", &[TAP])
    }

    /// `tdm-bench-<pid><tag>` with lo up and, if `taps` is not empty, those
    /// taps on bridge br0, which has 10.78.0.1/24.
    pub fn create(tag: &str, taps: &[&str]) -> Result<Self, String> {
        let name = format!("{PREFIX}{}{tag}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        if taps.is_empty() {
            return Ok(ns);
        }
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
        for tap in taps {
            ip(&["-n", n, "tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["-n", n, "link", "set", tap, "master", "br0"])?;
            ip(&["-n", n, "link", "set", tap, "up"])?;
        }
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NS taskset -c CPU program`.
    pub fn pinned(&self, cpu: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, "taskset", "-c"])
            .arg(cpu.to_string())
            .arg(program);
        c
    }

    /// A UDP socket bound inside the namespace.
    pub fn udp_socket(&self, bind: &str) -> Result<UdpSocket, String> {
        let path = format!("/var/run/netns/{}", self.name);
        let bind = bind.to_string();
        // setns changes only the calling thread's namespace; the socket
        // keeps the namespace it was created in.
        std::thread::spawn(move || -> Result<UdpSocket, String> {
            let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this
            // short-lived thread's network namespace.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if ret != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            UdpSocket::bind(&bind).map_err(|e| format!("bind {bind}: {e}"))
        })
        .join()
        .map_err(|_| "netns thread panicked".to_string())?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// What one loaded netecho run gave.
pub struct Driven {
    pub out: Outcome,
    /// Time the client took for all requests.
    pub client_secs: f64,
    /// Round-trip time per request, ms.
    pub rtts: Vec<f64>,
}

/// Starts `cmd` (tandem running netecho in `ns`), waits for `netecho: up`,
/// sends `requests` UDP echoes one at a time, then `quit`.
pub fn drive(
    ns: &NetNs,
    cmd: Command,
    requests: usize,
    limit: Duration,
) -> Result<Driven, (Outcome, String)> {
    match proc::spawn(cmd) {
        Ok(r) => drive_running(ns, r, requests, limit),
        Err(e) => Err((Outcome::default(), format!("spawn: {e}"))),
    }
}

/// `drive` for an already started tandem (a pair's primary).
pub fn drive_running(
    ns: &NetNs,
    mut running: proc::Running,
    requests: usize,
    limit: Duration,
) -> Result<Driven, (Outcome, String)> {
    let text = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let reader = running.stdout.take().map(|o| {
        let text = text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(o).lines().map_while(Result::ok) {
                let mut t = text.lock().unwrap_or_else(|e| e.into_inner());
                t.push_str(&line);
                t.push('\n');
                let _ = tx.send(line);
            }
        })
    });
    let fail = |running: proc::Running, e: String| {
        running.kill();
        let mut out = running.finish(Duration::from_secs(10));
        out.stdout = text.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Err((out, e))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("netecho: up") => break,
            Ok(_) => {}
            Err(_) => return fail(running, "netecho never printed `netecho: up`".into()),
        }
    }
    let client = match client(ns, requests) {
        Ok(c) => c,
        Err(e) => return fail(running, e),
    };
    // Ask it to quit until it says bye (or exits: a pair's primary may end
    // before its last console line is released).
    let sock = ns.udp_socket(&format!("{HOST_IP}:0"));
    let bye = Instant::now() + Duration::from_secs(10);
    while Instant::now() < bye
        && !running.exited()
        && !text
            .lock()
            .map(|t| t.contains("netecho: bye"))
            .unwrap_or(true)
    {
        if let Ok(s) = &sock {
            let _ = s.send_to(b"quit", format!("{GUEST_IP}:9001"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = running.start.elapsed() + Duration::from_secs(10);
    let mut out = running.finish(left.min(limit));
    if let Some(h) = reader {
        let _ = h.join();
    }
    out.stdout = text.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Driven {
        out,
        client_secs: client.0,
        rtts: client.1,
    })
}

/// Sends a new tagged 64-byte echo every `every` until one of them is
/// answered: when that first reply arrived, or `None` at `deadline`.
pub fn first_reply(
    ns: &NetNs,
    every: Duration,
    deadline: Instant,
) -> Result<Option<Instant>, String> {
    let s = ns.udp_socket(&format!("{HOST_IP}:0"))?;
    s.set_read_timeout(Some(every)).map_err(|e| e.to_string())?;
    let to = format!("{GUEST_IP}:7");
    let mut buf = [0u8; 2048];
    let mut seq = 0u32;
    while Instant::now() < deadline {
        let mut msg = [0u8; 64];
        msg[..4].copy_from_slice(&seq.to_le_bytes());
        msg[4..12].copy_from_slice(b"tdmfailo");
        seq += 1;
        // A frozen primary's tap may refuse more frames: ignore send errors.
        let _ = s.send_to(&msg, &to);
        let next = Instant::now() + every;
        while Instant::now() < next {
            match s.recv(&mut buf) {
                Ok(n) if n == 64 && &buf[4..12] == b"tdmfailo" => return Ok(Some(Instant::now())),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    Ok(None)
}

/// Closed-loop echo: returns (seconds for all requests, RTTs in ms).
/// Milliseconds until the guest first answers a UDP echo (one probe every
/// 10 ms, each waiting 10 ms; gives up after `limit`).
pub fn first_reply_ms(ns: &NetNs, limit: Duration) -> Result<f64, String> {
    let s = ns.udp_socket(&format!("{HOST_IP}:0"))?;
    s.set_read_timeout(Some(Duration::from_millis(10)))
        .map_err(|e| e.to_string())?;
    let to = format!("{GUEST_IP}:7");
    let mut buf = [0u8; 64];
    let start = Instant::now();
    while start.elapsed() < limit {
        s.send_to(b"first-reply", &to).map_err(|e| e.to_string())?;
        while let Ok(n) = s.recv(&mut buf) {
            if &buf[..n] == b"first-reply" {
                return Ok(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Err(format!("no UDP echo reply within {} ms", limit.as_millis()))
}

pub fn client(ns: &NetNs, requests: usize) -> Result<(f64, Vec<f64>), String> {
    let s = ns.udp_socket(&format!("{HOST_IP}:0"))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let to = format!("{GUEST_IP}:7");
    let mut buf = [0u8; 2048];
    // Warm-up: ARP and the first reply.
    let warm = Instant::now() + Duration::from_secs(10);
    'warm: loop {
        if Instant::now() > warm {
            return Err("no UDP echo reply within 10 s".into());
        }
        s.send_to(b"warm-up", &to).map_err(|e| e.to_string())?;
        while let Ok(n) = s.recv(&mut buf) {
            if &buf[..n] == b"warm-up" {
                break 'warm;
            }
        }
    }
    let mut rtts = Vec::with_capacity(requests);
    let start = Instant::now();
    for seq in 0..requests as u32 {
        let mut msg = [0u8; 64];
        msg[..4].copy_from_slice(&seq.to_le_bytes());
        msg[4..12].copy_from_slice(b"tdmbench");
        let mut answered = false;
        for _attempt in 0..25 {
            let sent = Instant::now();
            s.send_to(&msg, &to).map_err(|e| e.to_string())?;
            while let Ok(n) = s.recv(&mut buf) {
                if buf[..n] == msg {
                    rtts.push(sent.elapsed().as_secs_f64() * 1e3);
                    answered = true;
                    break;
                }
            }
            if answered {
                break;
            }
        }
        if !answered {
            return Err(format!("no echo reply for request {seq} after 25 tries"));
        }
    }
    Ok((start.elapsed().as_secs_f64(), rtts))
}
