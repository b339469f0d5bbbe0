//! `tandem witness` end to end: the process serves the line protocol on
//! loopback, keeps its grants across a restart (even after SIGKILL), refuses
//! to start on a damaged state file. The arbiter logic itself is unit tested
//! in `ft/src/arbiter/`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// `EXIT_START_FAILED` in src/main.rs.
const EXIT_START_FAILED: i32 = 3;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tandem-witness-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `tandem witness`, killed on drop.
struct Witness {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn witness_command(state: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
    cmd.args([
        "witness",
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--state",
    ])
    .arg(state);
    cmd
}

fn not_wired(stderr: &str) {
    assert!(
        !stderr.contains("unrecognized subcommand 'witness'"),
        "`tandem witness` is not wired into src/main.rs yet (ft::arbiter::witness_command)"
    );
}

/// Starts a witness and waits for its `listening on ADDR` line.
fn start(state: &Path) -> Witness {
    let mut child = witness_command(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        not_wired(&stderr);
        panic!("witness did not start: stdout {line:?}, stderr {stderr}");
    };
    Witness {
        addr: addr.parse().unwrap(),
        child,
    }
}

/// One request on a fresh connection: the reply line without newline.
fn ask(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end_matches('\n').to_string()
}

#[test]
fn witness_serves_and_survives_kill() {
    let dir = TempDir::new("serve");
    let state = dir.0.join("state");
    let w = start(&state);
    assert_eq!(ask(w.addr, "QUERY vm1"), "STATE 0 -");
    for g in 0..3 {
        assert_eq!(
            ask(w.addr, &format!("CLAIM vm1 {g} host-a")),
            format!("GRANTED {}", g + 1)
        );
    }
    assert_eq!(ask(w.addr, "CLAIM vm1 1 host-b"), "REFUSED 3 host-a");
    assert!(ask(w.addr, "FROB").starts_with("ERROR "));
    assert_eq!(ask(w.addr, "QUERY vm1"), "STATE 3 host-a");
    drop(w); // SIGKILL: every answered grant is already on disk

    let w = start(&state);
    assert_eq!(ask(w.addr, "CLAIM vm1 2 host-b"), "REFUSED 3 host-a");
    assert_eq!(ask(w.addr, "CLAIM vm1 3 host-b"), "GRANTED 4");
    assert_eq!(ask(w.addr, "QUERY vm1"), "STATE 4 host-b");
}

#[test]
fn witness_refuses_damaged_state() {
    let dir = TempDir::new("damaged");
    let state = dir.0.join("state");
    std::fs::write(&state, "tandem-witness-state 1\nvm vm1 3 a\n").unwrap();
    let out = witness_command(&state).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    not_wired(&stderr);
    assert_eq!(out.status.code(), Some(EXIT_START_FAILED), "{stderr}");
    assert!(
        stderr.contains("corrupt") && stderr.contains(&*state.to_string_lossy()),
        "{stderr}"
    );
    // Left alone for a human to look at.
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "tandem-witness-state 1\nvm vm1 3 a\n"
    );
}

#[test]
fn witness_without_a_key_needs_insecure() {
    let dir = TempDir::new("keyless");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["witness", "--listen", "127.0.0.1:0", "--state"])
        .arg(dir.0.join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_START_FAILED), "{stderr}");
    assert!(
        stderr.contains("--psk-file") && stderr.contains("--insecure"),
        "{stderr}"
    );
    // Nothing was created: it never started.
    assert!(!dir.0.join("state").exists());
}

/// Asks without panicking: None when the witness is gone mid-request.
fn try_ask(addr: SocketAddr, req: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{req}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    (!line.is_empty()).then(|| line.trim_end_matches('\n').to_string())
}

#[test]
fn kill_9_in_the_middle_of_grants_never_loses_or_repeats_one() {
    // Claims stream in while the witness is killed at varying moments:
    // after each restart the state file loads, and it holds every
    // generation that was answered GRANTED (fsync and rename before the
    // answer), so none is granted twice.
    let dir = TempDir::new("crash");
    let state = dir.0.join("state");
    let mut granted_max = 0u64;
    for round in 0..12u64 {
        let w = start(&state);
        let addr = w.addr;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let claimer = std::thread::spawn(move || {
            let mut granted = Vec::new();
            let mut expected = granted_max;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match try_ask(addr, &format!("CLAIM vm1 {expected} host-a")) {
                    Some(r) if r.starts_with("GRANTED ") => {
                        expected += 1;
                        granted.push(expected);
                    }
                    Some(r) => panic!("unexpected reply {r:?} for generation {expected}"),
                    None => break,
                }
            }
            granted
        });
        std::thread::sleep(Duration::from_millis(20 + round * 13));
        drop(w); // SIGKILL, at whatever point the grants are
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let granted = claimer.join().unwrap();
        granted_max = granted.last().copied().unwrap_or(granted_max);
        let w = start(&state);
        let reply = ask(w.addr, "QUERY vm1");
        let generation: u64 = reply
            .strip_prefix("STATE ")
            .and_then(|r| r.split(' ').next())
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| panic!("{reply}"));
        // Never behind an answered grant; at most one ahead (persisted,
        // killed before answering).
        assert!(
            generation == granted_max || generation == granted_max + 1,
            "round {round}: state {generation}, last answered grant {granted_max}"
        );
        granted_max = generation;
        if generation > 0 {
            let stale = format!("CLAIM vm1 {} host-b", generation - 1);
            assert!(ask(w.addr, &stale).starts_with("REFUSED"));
        }
    }
    assert!(granted_max >= 12, "too few grants to tell: {granted_max}");
}
