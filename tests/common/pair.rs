//! Helpers for tests of a protected pair: a namespace with a bridge and one
//! tap per host, the netecho counter guest, a witness, the pair processes
//! and a UDP client with the counter invariants.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::guest;
use super::netns::NetNs;

pub const GUEST_IP: &str = "10.78.0.2";

/// Hosts as separate network namespaces on one L2 segment: a client
/// namespace `tag` with bridge br0 (10.78.0.1/24), and per host `h` in
/// `hosts` (address 10.78.0.(11+i)/24) a namespace `tag-h` whose own br0
/// carries its taps (`taps(h)`) and a veth uplink to the client's bridge.
/// Returns (client namespace, host namespaces).
pub fn split_hosts(
    tag: &str,
    hosts: &[&str],
    taps: impl Fn(&str) -> Vec<String>,
) -> (NetNs, Vec<NetNs>) {
    let ns = NetNs::new(tag);
    ip(&ns, &["link", "add", "br0", "type", "bridge"]);
    ip(&ns, &["addr", "add", "10.78.0.1/24", "dev", "br0"]);
    ip(&ns, &["link", "set", "br0", "up"]);
    let mut out = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let h = NetNs::new(&format!("{tag}-{host}"));
        ip(&h, &["link", "add", "br0", "type", "bridge"]);
        for tap in taps(host) {
            ip(&h, &["tuntap", "add", "dev", &tap, "mode", "tap"]);
            ip(&h, &["link", "set", &tap, "master", "br0"]);
            ip(&h, &["link", "set", &tap, "up"]);
        }
        ip(
            &h,
            &[
                "addr",
                "add",
                &format!("10.78.0.{}/24", 11 + i),
                "dev",
                "br0",
            ],
        );
        ip(&h, &["link", "set", "br0", "up"]);
        // The host's uplink: a veth from its bridge to the client's.
        let (up, down) = (format!("up{host}"), format!("dn{host}"));
        ip(
            &ns,
            &["link", "add", &down, "type", "veth", "peer", "name", &up],
        );
        ip(&ns, &["link", "set", &up, "netns", &h.name]);
        ip(&ns, &["link", "set", &down, "master", "br0"]);
        ip(&ns, &["link", "set", &down, "up"]);
        ip(&h, &["link", "set", &up, "master", "br0"]);
        ip(&h, &["link", "set", &up, "up"]);
        out.push(h);
    }
    (ns, out)
}

/// A counter VM (netecho) whose hosts a and b are the namespaces of
/// [`split_hosts`] (10.78.0.11 and 10.78.0.12).
pub struct SplitVm<'a> {
    pub name: &'a str,
    /// The guest's address.
    pub ip: &'a str,
    /// The last byte of its MAC.
    pub mac: usize,
    /// Host a's and b's replication ports.
    pub ports: [u16; 2],
    /// Host a's and b's taps.
    pub taps: [&'a str; 2],
    /// The `[ft]` lines that name the arbiter (`witness = "..."`, and for
    /// etcd its TLS and user settings).
    pub arbiter: &'a str,
    pub state: &'a Path,
}

/// Writes `DIR/NAME.toml` (and its 64 KiB disk) for `vm`.
pub fn split_pair_file(dir: &Path, vm: &SplitVm) -> PathBuf {
    let disk = dir.join(format!("{}.img", vm.name));
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let path = dir.join(format!("{}.toml", vm.name));
    std::fs::write(
        &path,
        format!(
            r#"[vm]
name = "{name}"
kernel = "{kernel}"
cmdline = "ip={ip}"
mem = "32M"
disk = ["{disk}"]
net = [{{ mac = "52:54:00:00:78:0{mac}" }}]

[hosts]
a = {{ address = "10.78.0.11:{pa}", tap = "{ta}" }}
b = {{ address = "10.78.0.12:{pb}", tap = "{tb}" }}

[ft]
heartbeat_ms = 50
failover_timeout_ms = 1500
{arbiter}
state_dir = "{state}"
psk_file = "{psk}"
witness_key_file = "{witness_key}"
"#,
            name = vm.name,
            kernel = super::guest("netecho").display(),
            ip = vm.ip,
            disk = disk.display(),
            mac = vm.mac,
            pa = vm.ports[0],
            pb = vm.ports[1],
            ta = vm.taps[0],
            tb = vm.taps[1],
            arbiter = vm.arbiter,
            state = vm.state.display(),
            psk = write_psk(dir).display(),
            witness_key = write_witness_key(dir).display(),
        ),
    )
    .unwrap();
    path
}

pub fn ip(ns: &NetNs, args: &[&str]) {
    let out = Command::new("ip")
        .arg("-n")
        .arg(&ns.name)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process whose console lines are collected in the background.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(ns: &NetNs, args: &[&str]) -> Self {
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_tandem"));
        cmd.args(args);
        Self::from_command(cmd)
    }

    /// Runs `cmd` (any program) with its console lines collected.
    pub fn from_command(mut cmd: std::process::Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        for (pipe, sink) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                lines.clone(),
            ),
            (Box::new(child.stderr.take().unwrap()), errors.clone()),
        ] {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Self {
            child,
            lines,
            errors,
        }
    }

    /// Whether `what` shows on stdout within `limit`.
    fn saw(&self, what: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.lines.lock().unwrap().iter().any(|l| l.contains(what)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn wait_for(&self, what: &str, limit: Duration) {
        if !self.saw(what, limit) {
            panic!(
                "never saw {what:?}; stdout {:?} stderr {:?}",
                self.lines.lock().unwrap(),
                self.errors.lock().unwrap()
            );
        }
    }

    pub fn stderr(&self) -> String {
        self.errors.lock().unwrap().join("\n")
    }

    /// [`Proc::wait_for`], failing with `other`'s stderr too (the peer of
    /// a pair often says why this side never got going), and where each
    /// side's threads wait.
    pub fn wait_for_with(&self, what: &str, limit: Duration, other: &Proc) {
        if !self.saw(what, limit) {
            panic!(
                "never saw {what:?}; stdout {:?} stderr {:?}\nother side's stderr: {}\n{}{}",
                self.lines.lock().unwrap(),
                self.errors.lock().unwrap(),
                other.stderr(),
                self.threads(),
                other.threads()
            );
        }
    }

    /// Where every thread of the process waits (name, state, wait channel,
    /// system call number), or that it has exited.
    pub fn threads(&self) -> String {
        use std::fmt::Write as _;
        let pid = self.child.id();
        let mut s = format!("--- threads of pid {pid}:\n");
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            s.push_str("(gone)\n");
            return s;
        };
        for task in tasks.flatten() {
            let read = |f: &str| {
                std::fs::read_to_string(task.path().join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let syscall = read("syscall");
            let _ = writeln!(
                s,
                "{:<16} {:<3} wchan={} syscall={}",
                read("comm"),
                read("stat").split(' ').nth(2).unwrap_or("?"),
                read("wchan"),
                syscall.split(' ').next().unwrap_or("")
            );
        }
        // A process that exited but is not reaped yet (a zombie): its
        // wait status is the last field of /proc/PID/stat.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.first() == Some(&"Z") {
            let status: i32 = fields.last().and_then(|f| f.parse().ok()).unwrap_or(-1);
            let _ = writeln!(
                s,
                "(exited: status {}, signal {})",
                (status >> 8) & 0xff,
                status & 0x7f
            );
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Topology {
    pub ns: NetNs,
    pub dir: PathBuf,
    pub config: PathBuf,
}

pub fn topology(tag: &str, failover_ms: u64, commit: &str) -> Topology {
    topology_with(tag, failover_ms, commit, "", "")
}

pub fn topology_with(
    tag: &str,
    failover_ms: u64,
    commit: &str,
    vm_extra: &str,
    ft_extra: &str,
) -> Topology {
    let ns = NetNs::new(tag);
    ip(&ns, &["link", "add", "br0", "type", "bridge"]);
    for tap in ["tapa", "tapb"] {
        ip(&ns, &["tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&ns, &["link", "set", tap, "master", "br0"]);
        ip(&ns, &["link", "set", tap, "up"]);
    }
    ip(&ns, &["addr", "add", "10.78.0.1/24", "dev", "br0"]);
    ip(&ns, &["link", "set", "br0", "up"]);
    let dir = test_dir(tag);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let config = dir.join("pair.toml");
    std::fs::write(
        &config,
        format!(
            r#"[vm]
name = "counter"
kernel = "{kernel}"
cmdline = "ip={GUEST_IP}"
mem = "32M"
disk = ["{disk}"]
net = [{{ mac = "52:54:00:00:78:02" }}]
{vm_extra}

[hosts]
a = {{ address = "127.0.0.1:7401", tap = "tapa" }}
b = {{ address = "127.0.0.2:7402", tap = "tapb" }}

[ft]
heartbeat_ms = 50
failover_timeout_ms = {failover_ms}
output_commit = "{commit}"
{ft_extra}
witness = "tcp://127.0.0.1:7500"
state_dir = "{state}"
psk_file = "{psk}"
witness_key_file = "{witness_key}"
"#,
            kernel = guest("netecho").display(),
            disk = disk.display(),
            state = dir.join("state").display(),
            psk = write_psk(&dir).display(),
            witness_key = write_witness_key(&dir).display(),
        ),
    )
    .unwrap();
    Topology { ns, dir, config }
}

pub fn counter(s: &UdpSocket, client: u32, request: u32, wait: Duration) -> Vec<(u32, u64)> {
    counter_at(s, GUEST_IP, client, request, wait)
}

/// A counter request to the guest at `ip`; the replies that came within
/// `wait` (until the one for `request`).
pub fn counter_at(
    s: &UdpSocket,
    ip: &str,
    client: u32,
    request: u32,
    wait: Duration,
) -> Vec<(u32, u64)> {
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&client.to_le_bytes());
    req[4..].copy_from_slice(&request.to_le_bytes());
    s.send_to(&req, format!("{ip}:9000")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let deadline = Instant::now() + wait;
    let mut replies = Vec::new();
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        if let Ok(n) = s.recv(&mut buf) {
            if n == 20 {
                let id = u32::from_le_bytes(buf[4..8].try_into().unwrap());
                replies.push((id, u64::from_le_bytes(buf[8..16].try_into().unwrap())));
                if id == request {
                    break;
                }
            }
        }
    }
    replies
}

/// A running pair: witness, primary on host a, secondary on host b.
pub struct Pair {
    pub t: Topology,
    pub _witness: Proc,
    pub primary: Proc,
    pub secondary: Proc,
}

pub fn start_pair(tag: &str, failover_ms: u64) -> Pair {
    start_pair_committing(tag, failover_ms, "received")
}

pub fn start_pair_committing(tag: &str, failover_ms: u64, commit: &str) -> Pair {
    start_topology(topology(tag, failover_ms, commit))
}

pub fn start_topology(t: Topology) -> Pair {
    let (witness, primary, secondary) = spawn_pair(&t.ns, &t.dir, &t.config);
    primary.wait_for_with("netecho: up", Duration::from_secs(60), &secondary);
    Pair {
        t,
        _witness: witness,
        primary,
        secondary,
    }
}

/// The pair's pre-shared key, `dir/pair.psk` (mode 0600), written once.
pub fn write_psk(dir: &Path) -> PathBuf {
    write_key(dir, "pair.psk")
}

/// The witness's own key, `dir/witness.psk` (mode 0600), written once: the
/// pair files name it as `[ft] witness_key_file`.
pub fn write_witness_key(dir: &Path) -> PathBuf {
    write_key(dir, "witness.psk")
}

/// A key in `tandem keygen`'s format at `dir/name`, written once.
fn write_key(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    if !path.exists() {
        // A key in `tandem keygen`'s format (64 hex digits), different
        // for every test directory.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (std::process::id(), dir, name).hash(&mut h);
        let seed = h.finish();
        let key: String = (0..4u64)
            .map(|i| format!("{:016x}", seed.rotate_left(16 * i as u32) ^ i))
            .collect();
        std::fs::write(&path, format!("{key}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

/// Starts the witness, then the primary (host a) and, 300 ms later, the
/// secondary (host b) of the pair file `config`, in `ns`.
pub fn spawn_pair(ns: &NetNs, dir: &Path, config: &Path) -> (Proc, Proc, Proc) {
    let witness = spawn_witness(ns, dir);
    let config = config.display().to_string();
    let primary = Proc::spawn(ns, &["primary", "--config", &config, "--host", "a"]);
    std::thread::sleep(Duration::from_millis(300));
    let secondary = Proc::spawn(ns, &["secondary", "--config", &config, "--host", "b"]);
    (witness, primary, secondary)
}

/// Starts the secondary (host b) of `t` with one test hook set in its
/// environment.
#[allow(dead_code)]
pub fn spawn_secondary_with_hook(t: &Topology, hook: &str, value: &str) -> Proc {
    let config = t.config.display().to_string();
    let mut cmd = t.ns.command(env!("CARGO_BIN_EXE_tandem"));
    cmd.args(["secondary", "--config", &config, "--host", "b"])
        .env(hook, value);
    Proc::from_command(cmd)
}

/// Starts the witness and the primary (host a) of `t`, and waits until the
/// primary waits for its secondary: (witness, primary).
#[allow(dead_code)]
pub fn spawn_waiting_primary(t: &Topology) -> (Proc, Proc) {
    spawn_waiting_primary_with_hook(t, None)
}

/// As [`spawn_waiting_primary`], the primary with a test hook's variable
/// (name, value) set.
#[allow(dead_code)]
pub fn spawn_waiting_primary_with_hook(t: &Topology, hook: Option<(&str, &str)>) -> (Proc, Proc) {
    let witness = spawn_witness(&t.ns, &t.dir);
    let config = t.config.display().to_string();
    let mut cmd = t.ns.command(env!("CARGO_BIN_EXE_tandem"));
    cmd.args(["primary", "--config", &config, "--host", "a"]);
    if let Some((name, value)) = hook {
        cmd.env(name, value);
    }
    let primary = Proc::from_command(cmd);
    wait_stderr(
        &primary,
        "waiting for the secondary",
        Duration::from_secs(30),
        &witness,
    );
    (witness, primary)
}

/// Starts the pair's witness (with its key) on 127.0.0.1:7500 in `ns`.
pub fn spawn_witness(ns: &NetNs, dir: &Path) -> Proc {
    spawn_witness_at(ns, dir, "127.0.0.1:7500")
}

/// Starts the pair's witness (with its key) on `listen` in `ns`.
pub fn spawn_witness_at(ns: &NetNs, dir: &Path, listen: &str) -> Proc {
    let state = dir.join("witness.state").display().to_string();
    let psk = write_witness_key(dir).display().to_string();
    let witness = Proc::spawn(
        ns,
        &[
            "witness",
            "--listen",
            listen,
            "--state",
            &state,
            "--psk-file",
            &psk,
        ],
    );
    witness.wait_for("listening on", Duration::from_secs(10));
    witness
}

pub fn signal(p: &Proc, sig: libc::c_int) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(p.child.id() as libc::pid_t, sig) }, 0);
}

/// Frames a tap has carried from its VM (the tap's rx side).
pub fn frames_from_vm(ns: &NetNs, tap: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-s", "-o", "link", "show", tap])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = text.split_whitespace().collect();
    let rx = fields.iter().position(|f| *f == "RX:").expect("RX stats");
    let values: Vec<u64> = fields[rx..].iter().filter_map(|f| f.parse().ok()).collect();
    values[1]
}

/// No counter value went to two different requests, and no request got two
/// different values (repeats must be exact duplicates: output is
/// at-least-once).
pub fn assert_no_value_reused(replies: impl IntoIterator<Item = (u32, u64)>) {
    let mut by_value: BTreeMap<u64, u32> = BTreeMap::new();
    let mut by_request: BTreeMap<u32, u64> = BTreeMap::new();
    for (id, value) in replies {
        if let Some(other) = by_value.insert(value, id) {
            assert_eq!(
                other, id,
                "value {value} handed to requests {other} and {id}"
            );
        }
        if let Some(v) = by_request.insert(id, value) {
            assert_eq!(v, value, "request {id} answered {v} and {value}");
        }
    }
}

/// Runs `nft ARGS` in `ns` (the project's set-up installs nftables).
pub fn nft(ns: &NetNs, args: &str) {
    let out = ns.command("nft").args(args.split(' ')).output().unwrap();
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks the counter invariants over every reply the client saw: no value
/// reused, and every answer to a request from `split` on is above every
/// value answered before it.
pub fn assert_counter_invariants(replies: &[(u32, u64)], split: u32) {
    assert_no_value_reused(replies.iter().copied());
    let before = replies
        .iter()
        .filter(|(id, _)| *id < split)
        .map(|r| r.1)
        .max()
        .unwrap_or(0);
    let after: Vec<u64> = replies
        .iter()
        .filter(|(id, _)| *id >= split)
        .map(|r| r.1)
        .collect();
    assert!(!after.is_empty(), "nothing answered after the fault");
    assert!(
        after.iter().all(|&v| v > before),
        "after the fault {after:?}, before {before}"
    );
}

/// Sends requests until `count` of them (from `first`) were answered or
/// `limit` passes; returns the next request id and when the first answer came.
pub fn serve(
    s: &UdpSocket,
    first: u32,
    count: usize,
    limit: Duration,
    replies: &mut Vec<(u32, u64)>,
) -> (u32, Option<Duration>) {
    serve_at(s, GUEST_IP, first, count, limit, replies)
}

/// [`serve`] for the guest at `ip`.
pub fn serve_at(
    s: &UdpSocket,
    ip: &str,
    first: u32,
    count: usize,
    limit: Duration,
    replies: &mut Vec<(u32, u64)>,
) -> (u32, Option<Duration>) {
    let start = Instant::now();
    let mut request = first;
    let mut answered = 0;
    let mut first_reply = None;
    while start.elapsed() < limit && answered < count {
        let got = counter_at(s, ip, 1, request, Duration::from_millis(300));
        if got.iter().any(|(id, _)| *id == request) {
            answered += 1;
            first_reply.get_or_insert(start.elapsed());
        }
        replies.extend(got);
        request += 1;
    }
    (request, first_reply)
}

/// A host's status JSON from its control socket (`state_dir/<host>.ctl`).
pub fn status(t: &Topology, host: &str) -> Option<String> {
    status_at(&t.dir.join("state").join(format!("{host}.ctl")))
}

/// The status a control socket answers (None: nobody answers).
pub fn status_at(control: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(control).ok()?;
    // Only the status is wanted: no command follows.
    s.shutdown(std::net::Shutdown::Write).ok()?;
    // A frozen side accepts (the kernel does) but never answers.
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Waits until `host` reports itself fenced.
pub fn wait_fenced(t: &Topology, host: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = status(t, host).filter(|s| s.contains("\"role\":\"fenced\"")) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "host {host} never fenced: {:?}",
            status(t, host)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn wait_exit(p: &mut Proc, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The role a control socket reports ("" if nobody answers).
pub fn role_at(control: &Path) -> String {
    status_at(control)
        .unwrap_or_default()
        .split("\"role\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_string()
}

pub fn status_figure(line: &str, name: &str) -> u64 {
    line.split(&format!("\"{name}\":"))
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// Waits until `p`'s stderr contains `what`; on time-out fails with both
/// `p`'s and `other`'s stderr.
pub fn wait_stderr(p: &Proc, what: &str, limit: Duration, other: &Proc) {
    let deadline = Instant::now() + limit;
    while !p.stderr().contains(what) {
        assert!(
            Instant::now() < deadline,
            "never saw {what:?}\nthis side: {}\nother side: {}",
            p.stderr(),
            other.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh directory for test `tag` (removed first if left over).
pub fn test_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-pair-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `dir/pair.toml` for `guest` with no NIC or disk (`cmdline`,
/// `mem`), hosts a and b on loopback, the witness on 127.0.0.1:7500, the
/// pair's key, and `ft` as extra `[ft]` lines; returns its path.
pub fn plain_pair_file(
    dir: &Path,
    guest_name: &str,
    cmdline: &str,
    mem: &str,
    ft: &str,
) -> PathBuf {
    let config = dir.join("pair.toml");
    std::fs::write(
        &config,
        format!(
            r#"[vm]
name = "{guest_name}"
kernel = "{kernel}"
cmdline = "{cmdline}"
mem = "{mem}"

[hosts]
a = {{ address = "127.0.0.1:7401" }}
b = {{ address = "127.0.0.2:7402" }}

[ft]
heartbeat_ms = 50
witness = "tcp://127.0.0.1:7500"
state_dir = "{state}"
psk_file = "{psk}"
witness_key_file = "{witness_key}"
{ft}
"#,
            kernel = guest(guest_name).display(),
            state = dir.join("state").display(),
            psk = write_psk(dir).display(),
            witness_key = write_witness_key(dir).display(),
        ),
    )
    .unwrap();
    config
}
