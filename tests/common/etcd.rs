//! A 3-member etcd cluster for the tests (Debian's etcd-server, installed
//! by `make deps`).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::netns::NetNs;
use super::pair::Proc;

pub const CLIENT: [u16; 3] = [2379, 2479, 2579];
pub const PEER: [u16; 3] = [2380, 2480, 2580];

pub fn etcd_member(ns: &NetNs, dir: &std::path::Path, i: usize) -> Proc {
    etcd_member_at(ns, dir, i, "127.0.0.1")
}

/// Member `i` of a 3-member cluster whose members all listen on `ip`.
pub fn etcd_member_at(ns: &NetNs, dir: &std::path::Path, i: usize, ip: &str) -> Proc {
    let cluster: Vec<String> = (0..3)
        .map(|j| format!("m{j}=http://{ip}:{}", PEER[j]))
        .collect();
    let data = dir.join(format!("etcd-m{i}"));
    let client = format!("http://{ip}:{}", CLIENT[i]);
    let peer = format!("http://{ip}:{}", PEER[i]);
    let mut cmd = ns.command("etcd");
    cmd.args(["--name", &format!("m{i}"), "--data-dir"])
        .arg(&data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &cluster.join(",")])
        .args([
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "tandem-test",
        ])
        .args(["--log-level", "error"]);
    Proc::from_command(cmd)
}

/// etcd's `/health` on member `i`, from inside the namespace.
pub fn healthy(ns: &NetNs, i: usize) -> bool {
    healthy_at(ns, i, "127.0.0.1")
}

pub fn healthy_at(ns: &NetNs, i: usize, ip: &str) -> bool {
    let Ok(mut c) = ns.tcp_connect(&format!("{ip}:{}", CLIENT[i])) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    if c.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    text.contains("\"health\":\"true\"")
}

pub fn have_etcd() -> bool {
    let ok = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: no etcd binary (make deps installs Debian's etcd-server)");
    }
    ok
}

/// Starts the three members on `ip` (data under `dir`) and waits until
/// every one is healthy.
pub fn start_cluster(ns: &NetNs, dir: &std::path::Path, ip: &str) -> Vec<Proc> {
    let members: Vec<Proc> = (0..3).map(|i| etcd_member_at(ns, dir, i, ip)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..3).all(|i| healthy_at(ns, i, ip)) {
        assert!(
            Instant::now() < deadline,
            "the etcd cluster never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    members
}

/// `etcd://` for the three members on `ip`, keys under `prefix`.
pub fn url(ip: &str, prefix: &str) -> String {
    let members: Vec<String> = CLIENT.iter().map(|p| format!("{ip}:{p}")).collect();
    format!("etcd://{}/{prefix}", members.join(","))
}
