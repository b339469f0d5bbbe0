//! Attackers on the pair's network, on real processes and sockets: peers
//! that open connections and never finish a handshake must not keep a
//! secondary from joining, nor a dropped connection from resuming.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{tcp_connect_in, NetNs};
use common::pair::*;

/// Where the primary (host a) takes its secondary.
const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 7401);

/// The wire header of a message (tag, generation, payload length) claiming
/// `len` payload bytes: the length is what a reader must not trust before
/// the peer authenticated.
fn header(len: u32) -> [u8; 13] {
    let mut h = [0u8; 13];
    h[0] = 17;
    h[9..13].copy_from_slice(&len.to_le_bytes());
    h
}

/// Connections that never finish a handshake: `per_source` from each of
/// `sources` to `target`, each sending `greeting` and then (with `every`)
/// one byte every `every`; one the server closes is opened again.
struct Crowd {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Crowd {
    fn start(
        ns: &NetNs,
        sources: &[Ipv4Addr],
        per_source: usize,
        target: SocketAddrV4,
        greeting: fn(usize) -> Vec<u8>,
        every: Option<Duration>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let name = ns.name().to_string();
        let open = move |i: usize, from: Ipv4Addr| -> Option<TcpStream> {
            let mut s = tcp_connect_in(&name, from, target).ok()?;
            s.write_all(&greeting(i)).ok()?;
            s.set_nonblocking(true).ok()?;
            Some(s)
        };
        let slots: Vec<Ipv4Addr> = sources
            .iter()
            .flat_map(|a| std::iter::repeat(*a).take(per_source))
            .collect();
        let mut conns: Vec<Option<TcpStream>> =
            slots.iter().enumerate().map(|(i, a)| open(i, *a)).collect();
        opened.fetch_add(conns.iter().flatten().count(), Ordering::SeqCst);
        let (stop2, opened2) = (stop.clone(), opened.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                for (i, c) in conns.iter_mut().enumerate() {
                    let alive = c.as_mut().is_some_and(|s| {
                        let mut buf = [0u8; 64];
                        let open = match std::io::Read::read(s, &mut buf) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        };
                        open && (every.is_none() || s.write_all(b"x").is_ok())
                    });
                    if !alive {
                        *c = open(i, slots[i]);
                        if c.is_some() {
                            opened2.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                let pause = every.unwrap_or(Duration::from_millis(500));
                let until = Instant::now() + pause;
                while Instant::now() < until && !stop2.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Self {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Half claim a 256 MiB message, half a small one (so the dribble itself
/// is what holds their handshake).
fn replication_greeting(i: usize) -> Vec<u8> {
    header(if i % 2 == 0 { 256 << 20 } else { 32 }).to_vec()
}

/// Lets this process hold `n` more descriptors.
fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = (lim.rlim_cur + n).min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

#[test]
fn clients_that_never_finish_a_handshake_do_not_keep_a_secondary_out() {
    // Behind NAT (no peer address check), so the attackers' connections
    // reach the handshake: what holds them off is its deadline and the
    // admission limits.
    let t = topology_with("drib", 3000, "received", "", "verify_peer_address = false");
    let (_witness, primary) = spawn_waiting_primary(&t);
    let config = t.config.display().to_string();

    // One lone dribbler, and a crowd of 100 from another address, both
    // there before the secondary comes.
    let lone = Crowd::start(
        &t.ns,
        &[Ipv4Addr::new(127, 0, 0, 5)],
        1,
        PRIMARY,
        replication_greeting,
        Some(Duration::from_secs(3)),
    );
    let crowd = Crowd::start(
        &t.ns,
        &[Ipv4Addr::new(127, 0, 0, 6)],
        100,
        PRIMARY,
        replication_greeting,
        Some(Duration::from_secs(2)),
    );
    assert!(crowd.opened() > 0, "no attacker connected");
    let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &config, "--host", "b"]);
    let started = Instant::now();
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    eprintln!(
        "the secondary joined {:?} after it started, with {} attacker connections opened",
        started.elapsed(),
        lone.opened() + crowd.opened()
    );
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, more) = serve(&s, 0, 10, Duration::from_secs(30), &mut replies);
    assert!(more.is_some(), "the protected VM does not answer");

    // Break the replication connection while they go on: it resumes.
    let out =
        t.ns.command("ss")
            .args(["-K", "dst", "127.0.0.1", "dport", "7401"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "ss -K: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The resume, under attack.
    wait_stderr(
        &secondary,
        "resuming from frame",
        Duration::from_secs(10),
        &primary,
    );
    let (_, more) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    assert!(more.is_some(), "the pair stopped serving after the resume");
    assert!(
        !secondary.stderr().contains("going live"),
        "{}",
        secondary.stderr()
    );
    // The primary said why it dropped them.
    let err = primary.stderr();
    assert!(
        err.contains("handshake took too long") || err.contains("over the limit"),
        "{err}"
    );
    assert!(err.contains("not admitted"), "{err}");
    drop((lone, crowd));
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn a_thousand_idle_connections_to_the_witness_do_not_stop_a_failover() {
    raise_fd_limit(1100);
    let mut p = start_pair("widle", 1500);
    let s = p.t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (next, _) = serve(&s, 0, 10, Duration::from_secs(30), &mut replies);
    // 1,000 connections from four addresses of their own that open and
    // then say nothing.
    let witness = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 7500);
    let sources: Vec<Ipv4Addr> = (10..14).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let idle = Crowd::start(&p.t.ns, &sources, 250, witness, |_| Vec::new(), None);
    assert!(idle.opened() >= 1000, "only {} opened", idle.opened());
    std::thread::sleep(Duration::from_secs(1));
    // The secondary must claim the next generation at that witness.
    p.primary.child.kill().unwrap();
    let (_, after) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    assert!(
        after.is_some(),
        "no takeover with the witness under load\nsecondary: {}\nwitness: {}",
        p.secondary.stderr(),
        p._witness.stderr()
    );
    assert!(
        p._witness.stderr().contains("not admitted"),
        "{}",
        p._witness.stderr()
    );
    assert_counter_invariants(&replies, next);
    drop(idle);
    let _ = std::fs::remove_dir_all(&p.t.dir);
}

/// Runs `tandem args…` as user nobody; (exit success, stdout + stderr).
fn as_nobody(ns: &NetNs, args: &[&str]) -> (bool, String) {
    let out = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Connects to the unix socket `path` as nobody, sends `input`, and
/// returns what came back within a second (or why it could not connect).
fn console_as_nobody(ns: &NetNs, path: &Path, input: &str) -> String {
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({path:?})\nexcept OSError as e:\n    print('connect:', e); sys.exit(0)\ns.settimeout(1)\ntry:\n    s.sendall({input:?}.encode())\nexcept OSError as e:\n    print('send:', e)\nout=b''\ntry:\n    while True:\n        b=s.recv(4096)\n        if not b: break\n        out+=b\nexcept OSError:\n    pass\nprint(out.decode(errors='replace'))\n",
        path = path.display().to_string(),
    );
    let out = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", &script])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn under_umask_000_the_local_sockets_are_their_owners_only() {
    let t = {
        let dir = test_dir("sock");
        let console = dir.join("run").join("console.sock");
        topology_with(
            "sock",
            3000,
            "received",
            &format!("console = \"unix:{}\"", console.display()),
            "",
        )
    };
    let console = t.dir.join("run").join("console.sock");
    let control = t.dir.join("state").join("a.ctl");
    let config = t.config.display().to_string();
    let _witness = spawn_witness(&t.ns, &t.dir);
    let spawn = |host: &str| {
        let mut cmd = t.ns.command("sh");
        cmd.args([
            "-c",
            &format!(
                "umask 000; exec {} {} --config {config} --host {host}",
                env!("CARGO_BIN_EXE_tandem"),
                if host == "a" { "primary" } else { "secondary" }
            ),
        ]);
        Proc::from_command(cmd)
    };
    let primary = spawn("a");
    std::thread::sleep(Duration::from_millis(300));
    let secondary = spawn("b");
    // The guest's console goes to the socket: wait for it to answer.
    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let (_, up) = serve(&s, 0, 1, Duration::from_secs(60), &mut replies);
    assert!(
        up.is_some(),
        "the VM never answered\nprimary: {}\nsecondary: {}",
        primary.stderr(),
        secondary.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(console.exists() && control.exists()) {
        assert!(Instant::now() < deadline, "sockets never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode(&control), 0o600, "control socket under umask 000");
    assert_eq!(mode(&console), 0o600, "console socket under umask 000");
    assert_eq!(
        mode(console.parent().unwrap()),
        0o700,
        "the console's directory"
    );

    // As nobody, with the files as they are: no way in.
    let (ok, text) = as_nobody(&t.ns, &["switchover", "--config", &config]);
    assert!(!ok, "nobody switched over: {text}");
    let (ok, text) = as_nobody(&t.ns, &["status", "--config", &config, "--json"]);
    assert!(
        !text.contains("\"generation\""),
        "nobody read the status: {text}"
    );
    let _ = ok;
    let seen = console_as_nobody(&t.ns, &console, "typed by nobody\n");
    assert!(
        seen.contains("connect:"),
        "nobody reached the console: {seen}"
    );

    // Even with the files opened up by mistake, the credentials check
    // refuses, with a message.
    for dir in [t.dir.join("state"), t.dir.join("run")] {
        chmod(&dir, 0o777);
    }
    chmod(&control, 0o777);
    chmod(&console, 0o777);
    let (ok, text) = as_nobody(&t.ns, &["switchover", "--config", &config]);
    assert!(!ok, "nobody switched over: {text}");
    assert!(
        text.contains("permission denied: uid 65534"),
        "no reason given: {text}"
    );
    let seen = console_as_nobody(&t.ns, &console, "typed by nobody\n");
    assert!(
        seen.contains("permission denied: uid 65534") && !seen.contains("netecho"),
        "nobody used the console: {seen}"
    );
    // Still live where it was.
    let status = status(&t, "a").unwrap_or_default();
    assert!(status.contains("\"role\":\"primary\""), "{status}");
    assert!(
        !primary.stderr().contains("switch-over") && !secondary.stderr().contains("going live"),
        "{}",
        secondary.stderr()
    );
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn weak_open_foreign_or_linked_key_files_are_refused_in_one_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = test_dir("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let good = write("good.psk", &format!("{}\n", "5a".repeat(32)), 0o600);
    let weak = write("weak.psk", "password1234567890\n", 0o600);
    let open = write("open.psk", &format!("{}\n", "5b".repeat(32)), 0o644);
    let foreign = write("foreign.psk", &format!("{}\n", "5c".repeat(32)), 0o600);
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let link = dir.join("link.psk");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let state = dir.join("witness.state").display().to_string();
    for (key, why) in [
        (&weak, "weak keys are refused"),
        (&open, "is open to other users (mode 644)"),
        (&foreign, "belongs to uid 65534"),
        (&link, "is a symbolic link"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["witness", "--listen", "127.0.0.1:0", "--state", &state])
            .args(["--psk-file", &key.display().to_string()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} accepted: {err}", key.display());
        assert!(err.contains(why), "{}: {err}", key.display());
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `tandem secondary` with pair file `text` (as host `host`) and
/// returns its stderr once it has exited (within 20 s).
fn refused_secondary(t: &Topology, name: &str, text: &str, host: &str) -> String {
    let path = t.dir.join(name);
    std::fs::write(&path, text).unwrap();
    let config = path.display().to_string();
    let mut p = Proc::spawn(&t.ns, &["secondary", "--config", &config, "--host", host]);
    let code = wait_exit(&mut p, Duration::from_secs(20));
    assert!(
        code.is_some_and(|c| c != 0),
        "{name}: the secondary was not refused: {}",
        p.stderr()
    );
    p.stderr()
}

#[test]
fn keys_serve_one_pair_and_one_purpose_and_the_secondary_must_be_the_peer() {
    let t = topology("keys", 3000, "received");
    let (_witness, primary) = spawn_waiting_primary(&t);
    let config = t.config.display().to_string();
    let text = std::fs::read_to_string(&t.config).unwrap();
    let psk_line = |path: &Path| format!("psk_file = \"{}\"", path.display());
    let pair_key = write_psk(&t.dir);
    let witness_key = write_witness_key(&t.dir);

    // The same key file, another pair (another VM): its derived key differs.
    let other_vm = text.replace("name = \"counter\"", "name = \"other\"");
    let err = refused_secondary(&t, "other-vm.toml", &other_vm, "b");
    assert!(err.contains("failed authentication"), "{err}");
    // The witness's key as a replication key.
    let with_witness_key = text.replace(&psk_line(&pair_key), &psk_line(&witness_key));
    let err = refused_secondary(&t, "witness-key.toml", &with_witness_key, "b");
    assert!(err.contains("failed authentication"), "{err}");
    // A secondary that claims to be host a (the primary's own entry), from
    // host b's address: the files' two entries swapped.
    let swapped = text
        .replace(
            "a = { address = \"127.0.0.1:7401\"",
            "x = { address = \"127.0.0.1:7401\"",
        )
        .replace(
            "b = { address = \"127.0.0.2:7402\"",
            "a = { address = \"127.0.0.2:7402\"",
        )
        .replace(
            "x = { address = \"127.0.0.1:7401\"",
            "b = { address = \"127.0.0.1:7401\"",
        );
    let err = refused_secondary(&t, "swapped.toml", &swapped, "a");
    assert!(
        err.contains("this primary's peer is host b, not a"),
        "{err}"
    );
    // Host b's entry, from another address.
    let moved = text.replace("127.0.0.2:7402", "127.0.0.9:7402");
    let err = refused_secondary(&t, "moved.toml", &moved, "b");
    assert!(
        err.contains("a connection from 127.0.0.9 refused: the peer host's address is 127.0.0.2"),
        "{err}"
    );
    // The pair's replication key file at the witness, as the pair's key
    // there: the witness holds only its own key and refuses it.
    let pair_key_at_witness = text.replace(
        &format!("witness_key_file = \"{}\"", witness_key.display()),
        &format!("witness_key_file = \"{}\"", pair_key.display()),
    );
    assert_ne!(pair_key_at_witness, text);
    let path = t.dir.join("pair-key-at-witness.toml");
    std::fs::write(&path, &pair_key_at_witness).unwrap();
    let out =
        t.ns.command(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "primary",
                "--config",
                &path.display().to_string(),
                "--host",
                "b",
                "--alone",
            ])
            .output()
            .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("does not hold the client's key"), "{err}");

    // The real secondary still joins.
    let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &config, "--host", "b"]);
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    let _ = std::fs::remove_dir_all(&t.dir);
}
