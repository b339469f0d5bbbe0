//! Helpers for the integration tests: run the real `tandem` binary on the
//! real guests under real KVM.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest image `name`, built by `make guests`.
pub fn guest(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/guests")
        .join(format!("{name}.elf"));
    assert!(
        path.is_file(),
        "{} is missing: run `make guests` (make test does)",
        path.display()
    );
    path
}

/// What a finished `tandem` process left.
#[derive(Debug)]
pub struct Finished {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    /// User + system CPU time of the process.
    pub cpu: Duration,
    pub wall: Duration,
}

pub fn tandem() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `tandem run --kernel <guest> <args>` to completion (killing it after
/// `limit`), feeding `input` to its stdin.
pub fn run_guest(name: &str, args: &[&str], input: Option<&[u8]>, limit: Duration) -> Finished {
    let mut cmd = tandem();
    cmd.arg("run").arg("--kernel").arg(guest(name)).args(args);
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    run_command(cmd, input, limit)
}

pub fn run_command(mut cmd: Command, input: Option<&[u8]>, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn tandem");
    if let Some(bytes) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(bytes).unwrap();
        // Keep stdin open until the child exits: closing it is not an event
        // the guest sees, but keeps the test honest about delivery timing.
        std::mem::forget(stdin);
    }
    let (stdout, stderr) = drain(&mut child);
    let (status, cpu) = wait_with_rusage(&mut child, start, limit);
    Finished {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        cpu,
        wall: start.elapsed(),
    }
}

fn drain(
    child: &mut Child,
) -> (
    std::thread::JoinHandle<String>,
    std::thread::JoinHandle<String>,
) {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let read = |r: &mut dyn Read| {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    };
    (
        std::thread::spawn(move || read(&mut out)),
        std::thread::spawn(move || read(&mut err)),
    )
}

/// Waits for the child, killing it after `limit`; returns its exit status
/// (128+signal if killed) and its CPU time.
fn wait_with_rusage(child: &mut Child, start: Instant, limit: Duration) -> (i32, Duration) {
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own child; status and usage are valid out-pointers.
        let ret = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if ret == pid {
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return (code, cpu);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("tandem did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts tandem failed the way a user should see: one line, no panic.
pub fn assert_clean_error(f: &Finished, status: i32, needle: &str) {
    assert_eq!(f.status, status, "{f:?}");
    assert!(!f.stderr.contains("panicked"), "panic: {}", f.stderr);
    assert!(
        !f.stderr.contains("RUST_BACKTRACE"),
        "backtrace hint: {}",
        f.stderr
    );
    let lines: Vec<&str> = f.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got {:?}",
        f.stderr
    );
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
}
pub mod etcd;
pub mod netns;
pub mod pair;
pub mod proxy;

/// The `compute` guest's hash, as documented in guest-images/compute.c.
pub fn compute_hash(size: usize, rounds: u32) -> u64 {
    let mut buf: Vec<u8> = (0..size)
        .map(|i| (i as u64).wrapping_mul(31) as u8)
        .collect();
    let mut state = 0u64;
    for r in 0..rounds {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for &b in &buf {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        state = state.rotate_left(13) ^ h;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (*b ^ (state >> (8 * (i % 8))) as u8).wrapping_add(r as u8);
        }
    }
    state
}
