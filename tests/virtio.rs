//! virtio-blk and virtio-net under real KVM: real image files, real taps in
//! network namespaces the test creates.

mod common;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{guest, run_guest};

const LIMIT: Duration = Duration::from_secs(120);

fn temp_image(name: &str, bytes: usize) -> PathBuf {
    let path = std::env::temp_dir().join(format!("tandem-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; bytes]).unwrap();
    path
}

/// The bytes diskseq writes to sector `s` (guest-images/diskseq.c).
fn diskseq_sector(seed: u32, s: u32) -> [u8; 512] {
    let mut x = seed ^ s;
    if x == 0 {
        x = 0x6d2b_79f5;
    }
    let mut out = [0u8; 512];
    for b in &mut out {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    out
}

fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[test]
fn diskseq_writes_a_real_image_file_and_reads_it_back() {
    let (seed, start, count) = (7u32, 16u32, 128u32);
    let image = temp_image("diskseq", 1 << 20);
    let disk = image.display().to_string();
    let cmdline = format!("seed={seed} start={start} count={count} chunk=8");
    let f = run_guest(
        "diskseq",
        &["--disk", &disk, "--cmdline", &cmdline],
        None,
        LIMIT,
    );
    assert_eq!(f.status, 0, "{f:?}");
    let bytes = std::fs::read(&image).unwrap();
    let mut expected = Vec::new();
    for s in start..start + count {
        let want = diskseq_sector(seed, s);
        let at = s as usize * 512;
        assert_eq!(
            &bytes[at..at + 512],
            &want[..],
            "sector {s} of the image file"
        );
        expected.extend_from_slice(&want);
    }
    assert!(
        bytes[..start as usize * 512].iter().all(|&b| b == 0),
        "wrote before start"
    );
    assert!(
        bytes[(start + count) as usize * 512..]
            .iter()
            .all(|&b| b == 0),
        "wrote past the end"
    );
    let line = format!(
        "diskseq: sectors={count} checksum={:#010x}",
        fnv1a32(&expected)
    );
    assert_eq!(f.stdout.lines().last(), Some(line.as_str()), "{f:?}");
    let _ = std::fs::remove_file(image);
}

#[test]
fn a_read_only_disk_rejects_writes_and_keeps_its_bytes() {
    let image = temp_image("ro", 256 << 10);
    std::fs::write(&image, vec![0xa5u8; 256 << 10]).unwrap();
    let disk = format!("{},ro", image.display());
    let f = run_guest(
        "diskseq",
        &["--disk", &disk, "--cmdline", "count=16"],
        None,
        LIMIT,
    );
    assert_eq!(f.status, 0, "{f:?}");
    assert!(
        f.stdout.contains("diskseq: write rejected (read-only)"),
        "{f:?}"
    );
    assert_eq!(std::fs::read(&image).unwrap(), vec![0xa5u8; 256 << 10]);
    let _ = std::fs::remove_file(image);
}

#[test]
fn missing_disk_image_is_a_clean_error() {
    let f = run_guest("diskseq", &["--disk", "/nonexistent/disk.img"], None, LIMIT);
    common::assert_clean_error(&f, 3, "disk image /nonexistent/disk.img");
}

#[test]
fn virtio_abuse_leaves_the_vm_alive() {
    let image = temp_image("abuse", 1 << 20);
    let disk = image.display().to_string();
    let f = run_guest("virtio-abuse", &["--disk", &disk], None, LIMIT);
    assert_eq!(f.status, 0, "{f:?}");
    assert!(f.stdout.contains("virtio-abuse: survived"), "{f:?}");
    assert!(!f.stderr.contains("panicked"), "{f:?}");
    let _ = std::fs::remove_file(image);
}

/// A netecho VM in its own namespace.
struct NetechoVm {
    ns: NetNs,
    child: Option<Child>,
    rest: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    head: Vec<String>,
}

const GUEST_IP: &str = "10.77.0.2";

impl NetechoVm {
    fn start(ns: NetNs, disk: &str) -> Self {
        Self::start_with(ns, disk, &[])
    }

    fn start_with(ns: NetNs, disk: &str, extra: &[&str]) -> Self {
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_tandem"));
        cmd.args(["run", "--kernel"])
            .arg(guest("netecho"))
            .args([
                "--mem",
                "32M",
                "--disk",
                disk,
                "--net",
                "tap=tap0,mac=52:54:00:00:77:02",
            ])
            .args(["--cmdline", &format!("ip={GUEST_IP}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut vm = Self {
            ns,
            child: Some(cmd.spawn().expect("spawn tandem")),
            rest: Default::default(),
            head: Vec::new(),
        };
        vm.head = vm.lines_until("netecho: up");
        vm
    }

    /// Console lines up to and including the first starting with `prefix`;
    /// the rest are collected in the background into `self.rest`.
    fn lines_until(&mut self, prefix: &str) -> Vec<String> {
        use std::io::{BufRead, BufReader};
        let child = self.child.as_mut().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let done = line.starts_with(prefix);
                    seen.push(line);
                    if done {
                        let rest = self.rest.clone();
                        // Keep draining so the guest never blocks on a full pipe.
                        std::thread::spawn(move || {
                            while let Ok(line) = rx.recv() {
                                rest.lock().unwrap().push(line);
                            }
                        });
                        return seen;
                    }
                }
                Err(_) => panic!("netecho never printed {prefix:?}"),
            }
        }
    }

    fn socket(&self) -> UdpSocket {
        let s = self.ns.udp_socket("10.77.0.1:0");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn stop(&mut self) {
        let s = self.socket();
        let _ = s.send_to(b"quit", format!("{GUEST_IP}:9001"));
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "netecho exited with {status}");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            panic!("netecho did not exit on quit");
        }
    }
}

impl Drop for NetechoVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn counter_request(s: &UdpSocket, client: u32, request: u32) -> u64 {
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&client.to_le_bytes());
    req[4..].copy_from_slice(&request.to_le_bytes());
    for _attempt in 0..5 {
        s.send_to(&req, format!("{GUEST_IP}:9000")).unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = s.recv(&mut buf) {
            if n == 20 && buf[..8] == req {
                return u64::from_le_bytes(buf[8..16].try_into().unwrap());
            }
        }
    }
    panic!("no counter reply for request {request}");
}

#[test]
fn netecho_answers_ping_udp_echo_and_a_persistent_counter() {
    let ns = NetNs::new("echo");
    ns.add_tap("tap0", "10.77.0.1/24");
    let image = temp_image("counter", 64 << 10);
    let disk = image.display().to_string();
    let mut vm = NetechoVm::start(ns, &disk);

    let ping = vm
        .ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "5", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let s = vm.socket();
    s.send_to(b"tandem echo", format!("{GUEST_IP}:7")).unwrap();
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf).expect("udp echo reply");
    assert_eq!(&buf[..n], b"tandem echo");

    let mut last = 0;
    for request in 0..1000 {
        let value = counter_request(&s, 1, request);
        assert!(value > last, "request {request}: {value} after {last}");
        last = value;
    }
    vm.stop();

    // A new VM on the same disk continues above the last value served.
    let ns = NetNs::new("echo2");
    ns.add_tap("tap0", "10.77.0.1/24");
    let mut vm = NetechoVm::start(ns, &disk);
    let s = vm.socket();
    let next = counter_request(&s, 2, 0);
    assert!(next > last, "after restart: {next}, last served {last}");
    vm.stop();
    let _ = std::fs::remove_file(image);
}

#[test]
fn netecho_with_client_traffic_replays_identically() {
    let ns = NetNs::new("rec");
    ns.add_tap("tap0", "10.77.0.1/24");
    let image = temp_image("rec-counter", 64 << 10);
    let disk = image.display().to_string();
    let log = std::env::temp_dir().join(format!("tandem-{}-netecho.log", std::process::id()));
    let log_arg = log.display().to_string();
    let mut vm = NetechoVm::start_with(ns, &disk, &["--record", &log_arg]);
    let s = vm.socket();
    s.send_to(b"recorded", format!("{GUEST_IP}:7")).unwrap();
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"recorded");
    for request in 0..50 {
        counter_request(&s, 9, request);
    }
    vm.stop();
    std::thread::sleep(Duration::from_millis(200));
    let mut recorded = vm.head.join("\n");
    for line in vm.rest.lock().unwrap().iter() {
        recorded.push('\n');
        recorded.push_str(line);
    }
    recorded.push('\n');
    assert!(recorded.contains("netecho: bye"), "{recorded}");

    // Replay needs neither the tap nor the disk: frames and reads are in the log.
    std::fs::remove_file(&image).unwrap();
    let mut cmd = common::tandem();
    cmd.arg("replay").arg(&log);
    let replayed = common::run_command(cmd, None, LIMIT);
    assert_eq!(replayed.status, 0, "{replayed:?}");
    assert_eq!(replayed.stdout, recorded);
    assert!(replayed.stderr.contains(" 0 divergences"), "{replayed:?}");
    assert_eq!(replayed.stderr.lines().count(), 1, "{replayed:?}");
    let _ = std::fs::remove_file(log);
}
