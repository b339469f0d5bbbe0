//! No service gap when a replacement secondary joins: a client whose
//! timeout is 2 s keeps asking the protected counter VM while the secondary
//! is lost and a new one joins, `JOIN_REPS` times (default 3; `make chaos`
//! runs 20). Every request sent once the primary runs unprotected, through
//! the join and the 2 s after it, is answered; the slowest answer around
//! each join is printed. `CHAOS_POSITION=auto` (or `kvm-insn-stat`) runs
//! the pair with that `[ft] position`.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pair::*;

fn reps() -> usize {
    std::env::var("JOIN_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// One request: when it was sent and how long its answer took (None: not
/// answered within the client's timeout).
#[derive(Clone, Copy, Debug)]
struct Asked {
    sent: Instant,
    answer: Option<Duration>,
}

/// A client asking the counter one request at a time, each with a 2 s
/// timeout, until `stop`.
fn client(s: UdpSocket, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Asked>>>) {
    let mut request = 1000u32;
    while !stop.load(Ordering::Acquire) {
        let sent = Instant::now();
        let got = counter(&s, 9, request, Duration::from_secs(2));
        let answer = got
            .iter()
            .any(|(id, _)| *id == request)
            .then(|| sent.elapsed());
        log.lock().unwrap().push(Asked { sent, answer });
        request += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(p: &Proc, what: &str) -> usize {
    p.stderr().matches(what).count()
}

fn wait_count(p: &Proc, what: &str, n: usize, limit: Duration, other: &Proc) {
    let deadline = Instant::now() + limit;
    while count(p, what) < n {
        assert!(
            Instant::now() < deadline,
            "never saw {what:?} {n} times\nthis side: {}\nother side: {}",
            p.stderr(),
            other.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_request_is_answered_while_a_new_secondary_joins() {
    let Pair {
        t,
        _witness,
        primary,
        secondary,
    } = match std::env::var("CHAOS_POSITION")
        .ok()
        .filter(|v| !v.is_empty() && v != "none")
    {
        // `make chaos` with CHAOS_POSITION: the pair places its kicks.
        Some(position) => start_topology(topology_with(
            "joingap",
            1500,
            "received",
            "",
            &format!("position = \"{position}\""),
        )),
        None => start_pair("joingap", 1500),
    };
    let config = t.config.display().to_string();
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    serve(&s, 0, 5, Duration::from_secs(30), &mut replies);

    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Asked>>> = Arc::default();
    let c = {
        let (stop, log) = (stop.clone(), log.clone());
        std::thread::spawn(move || client(s, stop, log))
    };
    let mut windows = Vec::new();
    // (process, host) of the live side and of its secondary.
    let (mut live, mut live_host) = (primary, "a");
    let (mut backup, mut backup_host) = (secondary, "b");
    for rep in 0..reps() {
        if rep % 2 == 0 {
            // Lose the secondary: the primary runs on unprotected.
            let before = count(&live, "running unprotected");
            backup.child.kill().unwrap();
            let _ = backup.child.wait();
            wait_count(
                &live,
                "running unprotected",
                before + 1,
                Duration::from_secs(20),
                &backup,
            );
        } else {
            // Lose the primary: its secondary goes live (as in `make demo`).
            live.child.kill().unwrap();
            let _ = live.child.wait();
            wait_count(&backup, "going live", 1, Duration::from_secs(20), &live);
            std::mem::swap(&mut live, &mut backup);
            std::mem::swap(&mut live_host, &mut backup_host);
        }
        // The replacement joins; the window checked starts here.
        let from = Instant::now();
        let joins = count(&live, "secondary joined at stop");
        backup = Proc::spawn(&t.ns, &["pair", "--config", &config, "--host", backup_host]);
        wait_count(
            &live,
            "secondary joined at stop",
            joins + 1,
            Duration::from_secs(60),
            &backup,
        );
        let joined = Instant::now();
        std::thread::sleep(Duration::from_millis(2500));
        windows.push((from, joined, joined + Duration::from_secs(2)));
    }
    stop.store(true, Ordering::Release);
    c.join().unwrap();
    let log = log.lock().unwrap().clone();
    for (i, &(from, joined, until)) in windows.iter().enumerate() {
        let around: Vec<&Asked> = log
            .iter()
            .filter(|a| a.sent >= from && a.sent <= until)
            .collect();
        let lost = around.iter().filter(|a| a.answer.is_none()).count();
        let slowest = around.iter().filter_map(|a| a.answer).max();
        let first_after = log
            .iter()
            .filter(|a| a.sent >= joined)
            .find_map(|a| a.answer);
        eprintln!(
            "join {i}: {} requests from the replacement's start to 2 s after the join, {lost} unanswered, slowest answer {slowest:?}, first answer after the join {first_after:?}",
            around.len()
        );
        assert!(around.len() > 3, "the client hardly asked: {around:?}");
        assert_eq!(
            lost,
            0,
            "join {i}: requests went unanswered around the join\nlive side: {}\nsecondary: {}",
            live.stderr(),
            backup.stderr()
        );
    }
    let _ = std::fs::remove_dir_all(&t.dir);
}
