//! Authenticated replication under attack: a secondary with another key
//! (or none) is refused, and a proxy on the replication path that flips a
//! byte or replays a message from an earlier session causes a channel reset
//! and a resume, never accepted data, a divergence or a failover.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::pair::*;
use common::proxy::{self, Corruption};

/// Where the proxied secondary thinks the primary is.
const PROXY: &str = "127.0.0.3:7401";
/// Where the primary really listens (host a of the pair file).
const PRIMARY: &str = "127.0.0.1:7401";

/// The pair file `config` with host a at the proxy: what the secondary uses.
fn via_proxy(config: &Path) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(PRIMARY));
    let path = config.with_file_name("pair-via-proxy.toml");
    std::fs::write(&path, text.replace(PRIMARY, PROXY)).unwrap();
    path
}

/// A pair of `t` whose secondary reaches the primary through a proxy.
struct ProxiedPair {
    _witness: Proc,
    proxy: std::sync::Arc<proxy::ProxyState>,
    primary: Proc,
    secondary: Proc,
}

impl ProxiedPair {
    /// Starts the witness, the proxy (told the pair only authenticates,
    /// with `mac_only`), the primary and the proxied secondary, and waits
    /// for the guest.
    fn start(t: &Topology, mac_only: bool) -> Self {
        let proxied = via_proxy(&t.config);
        let _witness = spawn_witness(&t.ns, &t.dir);
        let proxy = proxy::start(&t.ns, PROXY, PRIMARY);
        if mac_only {
            proxy.mac_only();
        }
        let config = t.config.display().to_string();
        let primary = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
        std::thread::sleep(Duration::from_millis(300));
        let proxied = proxied.display().to_string();
        let secondary = Proc::spawn(&t.ns, &["secondary", "--config", &proxied, "--host", "b"]);
        primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
        Self {
            _witness,
            proxy,
            primary,
            secondary,
        }
    }
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the pair with the secondary behind a tampering proxy: the pair
/// keeps serving, the secondary rejects the bad message, resets and
/// resumes, nobody fails over, no epoch diverges, and a later kill -9 of
/// the primary still hands over with no counter value handed out twice.
fn tampered_pair_resumes(tag: &str, corruption: Corruption, resets: usize) {
    let t = topology(tag, 3000, "received");
    let ProxiedPair {
        _witness: witness,
        proxy,
        primary,
        secondary,
    } = ProxiedPair::start(&t, false);

    let s = t.ns.udp_socket("10.78.0.1:0");
    let mut replies = Vec::new();
    let mut next = 0;
    // Some traffic first, then one corrupt message.
    let mut armed = false;
    wait_until(Duration::from_secs(30), "the tampering", || {
        let (n, _) = serve(&s, next, 1, Duration::from_secs(5), &mut replies);
        next = n;
        if !armed && proxy.log_messages.load(Ordering::SeqCst) >= 40 {
            proxy.arm(corruption);
            armed = true;
        }
        proxy.injected.load(Ordering::SeqCst) > 0
    });
    wait_until(Duration::from_secs(15), "the resumes", || {
        secondary.stderr().matches("resuming from frame").count() >= resets
    });
    let err = secondary.stderr();
    assert!(err.contains("failed authentication"), "{err}");
    let (next2, more) = serve(&s, next, 10, Duration::from_secs(30), &mut replies);
    assert!(more.is_some(), "the pair stopped serving after the reset");
    // Longer than the failover timeout: nobody took the reset for a failure.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !secondary.stderr().contains("going live"),
        "{}",
        secondary.stderr()
    );
    assert!(
        !secondary.stderr().contains("fenc"),
        "{}",
        secondary.stderr()
    );
    assert!(
        !primary.stderr().contains("unprotected"),
        "{}",
        primary.stderr()
    );
    let b = status(&t, "b").expect("secondary status");
    assert_eq!(status_figure(&b, "divergences"), 0, "{b}");
    assert!(proxy.connections.load(Ordering::SeqCst) > resets as u32);

    // What the secondary holds is the primary's VM: take over from it.
    let mut primary = primary;
    primary.child.kill().unwrap();
    let (_, after) = serve(&s, next2, 10, Duration::from_secs(30), &mut replies);
    assert!(after.is_some(), "no takeover: {}", secondary.stderr());
    assert_counter_invariants(&replies, next2);
    // Shown with --nocapture: the reset and resume as the sides saw them.
    eprintln!(
        "primary:\n{}\nsecondary:\n{}",
        primary.stderr(),
        secondary.stderr()
    );
    drop((witness, secondary));
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn a_flipped_byte_resets_the_channel_and_the_secondary_resumes() {
    tampered_pair_resumes("flip", Corruption::FlipBit, 1);
}

#[test]
fn a_message_replayed_from_an_earlier_session_is_rejected() {
    // One reset when the proxy closes the first connection, one when the
    // replayed message fails authentication.
    tampered_pair_resumes("replay", Corruption::ReplayOld, 2);
}

#[test]
fn a_secondary_with_another_key_or_none_is_refused() {
    let t = topology("wrongkey", 3000, "received");
    let _witness = spawn_witness(&t.ns, &t.dir);
    let config = t.config.display().to_string();
    let primary = Proc::spawn(&t.ns, &["primary", "--config", &config, "--host", "a"]);
    std::thread::sleep(Duration::from_millis(300));

    // Another key.
    let other_key = t.dir.join("other.psk");
    std::fs::write(&other_key, format!("{}\n", "e7".repeat(32))).unwrap();
    std::fs::set_permissions(
        &other_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let text = std::fs::read_to_string(&t.config).unwrap();
    let psk_line = text
        .lines()
        .find(|l| l.starts_with("psk_file"))
        .unwrap()
        .to_string();
    let wrong = t.dir.join("wrong-key.toml");
    std::fs::write(
        &wrong,
        text.replace(
            &psk_line,
            &format!("psk_file = \"{}\"", other_key.display()),
        ),
    )
    .unwrap();
    let mut impostor = Proc::spawn(
        &t.ns,
        &[
            "secondary",
            "--config",
            &wrong.display().to_string(),
            "--host",
            "b",
        ],
    );
    assert_eq!(wait_exit(&mut impostor, Duration::from_secs(20)), Some(3));
    assert!(
        impostor.stderr().contains("key differs"),
        "{}",
        impostor.stderr()
    );

    // No key at all.
    let keyless = t.dir.join("keyless.toml");
    std::fs::write(&keyless, text.replace(&psk_line, "")).unwrap();
    let mut open = Proc::spawn(
        &t.ns,
        &[
            "secondary",
            "--config",
            &keyless.display().to_string(),
            "--host",
            "b",
            "--insecure",
        ],
    );
    assert_eq!(wait_exit(&mut open, Duration::from_secs(20)), Some(3));
    assert!(
        open.stderr().contains("authentication required"),
        "{}",
        open.stderr()
    );

    // The primary refused both and ran nothing; it still waits, and the
    // real secondary is taken.
    let err = primary.stderr();
    assert!(err.contains("keys differ"), "{err}");
    assert!(err.contains("did not authenticate"), "{err}");
    assert!(!primary
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("netecho: up")));
    let _secondary = Proc::spawn(&t.ns, &["secondary", "--config", &config, "--host", "b"]);
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &_secondary);
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// Runs a pair (encrypting or not) with a tap on its replication link, sends
/// the guest frames carrying a marker, and says whether the marker crossed
/// the link readable.
fn marker_crosses_the_link(tag: &str, encrypt: bool) -> bool {
    const MARKER: &[u8] = b"TANDEM-SECRET-MARKER-5f0c2e";
    let ft = if encrypt { "" } else { "encrypt = false" };
    let t = topology_with(tag, 3000, "received", "", ft);
    // Every part bound: a part left out would be dropped (killed) here.
    let ProxiedPair {
        _witness,
        proxy,
        primary: _primary,
        secondary,
    } = ProxiedPair::start(&t, !encrypt);
    proxy.record();
    // Frames the guest receives: each goes into its memory and, as an
    // input of the log, across the link.
    let s = t.ns.udp_socket("10.78.0.1:0");
    for _ in 0..20 {
        let mut frame = b"\x00\x00\x00\x00\x00\x00\x00\x00".to_vec();
        frame.extend_from_slice(MARKER);
        s.send_to(&frame, format!("{GUEST_IP}:9000")).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut replies = Vec::new();
    let (_, more) = serve(&s, 1, 5, Duration::from_secs(30), &mut replies);
    assert!(more.is_some(), "the pair stopped serving");
    // Let the log that carries the frames go through.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        proxy.recorded_len() > 10_000,
        "the tap saw only {} bytes ({} connections, {} log messages)\nsecondary: {}",
        proxy.recorded_len(),
        proxy.connections.load(Ordering::SeqCst),
        proxy.log_messages.load(Ordering::SeqCst),
        secondary.stderr()
    );
    let seen = proxy.recorded_contains(MARKER);
    let _ = std::fs::remove_dir_all(&t.dir);
    seen
}

#[test]
fn the_replication_link_is_encrypted_unless_turned_off() {
    assert!(
        !marker_crosses_the_link("enc", true),
        "the marker crossed the encrypted link readable"
    );
    // The same capture finds it when the link is not encrypted: the test
    // can tell.
    assert!(
        marker_crosses_the_link("clear", false),
        "the marker never crossed the unencrypted link"
    );
}
