//! A 3-member etcd cluster for the tests (Debian's etcd-server and
//! etcd-client, installed by `make deps`), set up as production clusters
//! are: clients speak TLS and must show a certificate signed by the
//! cluster's CA, and etcd's authentication is on, with a user `tandem`
//! that may read and write the prefixes the tests use. The certificates
//! (made with openssl) and the password files live under the test's
//! directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::netns::NetNs;
use super::pair::Proc;

pub const CLIENT: [u16; 3] = [2379, 2479, 2579];
pub const PEER: [u16; 3] = [2380, 2480, 2580];
/// Plain-HTTP `/health` of each member (`--listen-metrics-urls`).
pub const METRICS: [u16; 3] = [2382, 2482, 2582];

/// The etcd user tandem connects as, and its password.
pub const USER: &str = "tandem";
const PASSWORD: &str = "tandem-test-password";
const ROOT_PASSWORD: &str = "root-test-password";

/// The test cluster's certificates and password files.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }
    pub fn password_file(&self) -> PathBuf {
        self.dir.join("tandem.password")
    }
    /// A password file that holds another password.
    pub fn wrong_password_file(&self) -> PathBuf {
        self.dir.join("wrong.password")
    }

    /// The `[ft]` / `[cluster]` lines for TLS with a client certificate
    /// and the user `tandem`.
    pub fn access_lines(&self) -> String {
        format!(
            "etcd_ca = \"{}\"\netcd_cert = \"{}\"\netcd_key = \"{}\"\netcd_user = \"{USER}\"\netcd_password_file = \"{}\"\n",
            self.ca().display(),
            self.client_cert().display(),
            self.client_key().display(),
            self.password_file().display()
        )
    }

    /// etcdctl as root, on member 0 at `ip`.
    fn etcdctl(&self, ns: &NetNs, ip: &str, args: &[&str], root: bool) -> std::process::Output {
        let mut cmd = ns.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://{ip}:{}", CLIENT[0]))
            .arg(format!("--cacert={}", self.ca().display()))
            .arg(format!("--cert={}", self.client_cert().display()))
            .arg(format!("--key={}", self.client_key().display()));
        if root {
            cmd.arg(format!("--user=root:{ROOT_PASSWORD}"));
        }
        cmd.args(args)
            .output()
            .expect("etcdctl (make deps installs etcd-client)")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The certificates under `dir/etcd-pki` (made once): a CA, a server
/// certificate for 127.0.0.1 and 10.78.0.1, and a client certificate.
pub fn pki(dir: &Path) -> Pki {
    let pki = Pki {
        dir: dir.join("etcd-pki"),
    };
    if pki.password_file().exists() {
        return pki;
    }
    std::fs::create_dir_all(&pki.dir).unwrap();
    let d = &pki.dir;
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tandem-test-ca",
        ],
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,IP:10.78.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "etcd"), ("client", USER)] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pki.client_key(), std::fs::Permissions::from_mode(0o600)).unwrap();
    write_private(&pki.wrong_password_file(), "not-the-password\n");
    write_private(&pki.password_file(), &format!("{PASSWORD}\n"));
    pki
}

pub fn etcd_member(ns: &NetNs, dir: &Path, i: usize) -> Proc {
    etcd_member_at(ns, dir, i, "127.0.0.1")
}

/// Member `i` of a 3-member cluster whose members all listen on `ip`:
/// clients over TLS with certificates, peers in the clear (inside the
/// test's namespace).
pub fn etcd_member_at(ns: &NetNs, dir: &Path, i: usize, ip: &str) -> Proc {
    let pki = pki(dir);
    let cluster: Vec<String> = (0..3)
        .map(|j| format!("m{j}=http://{ip}:{}", PEER[j]))
        .collect();
    let data = dir.join(format!("etcd-m{i}"));
    let client = format!("https://{ip}:{}", CLIENT[i]);
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
        .arg("--client-cert-auth")
        .arg(format!("--trusted-ca-file={}", pki.ca().display()))
        .arg(format!(
            "--cert-file={}",
            pki.dir.join("server.pem").display()
        ))
        .arg(format!(
            "--key-file={}",
            pki.dir.join("server-key.pem").display()
        ))
        .arg(format!("--listen-metrics-urls=http://{ip}:{}", METRICS[i]))
        .args(["--log-level", "error"]);
    Proc::from_command(cmd)
}

/// etcd's `/health` on member `i`, from inside the namespace.
pub fn healthy(ns: &NetNs, i: usize) -> bool {
    healthy_at(ns, i, "127.0.0.1")
}

pub fn healthy_at(ns: &NetNs, i: usize, ip: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = ns.tcp_connect(&format!("{ip}:{}", METRICS[i])) else {
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

/// etcd is required: `make deps` installs it, so a missing one fails the
/// test instead of skipping it.
pub fn have_etcd() -> bool {
    for (tool, arg) in [
        ("etcd", "--version"),
        ("etcdctl", "version"),
        ("openssl", "version"),
    ] {
        assert!(
            Command::new(tool).arg(arg).output().is_ok(),
            "no {tool} binary: run `make deps` (it installs etcd-server, etcd-client and openssl)"
        );
    }
    true
}

/// Starts the three members on `ip` (data under `dir`), waits until every
/// one is healthy, and turns etcd's authentication on: a root user, and
/// the user `tandem` with read and write on every key under `/tandem`.
pub fn start_cluster(ns: &NetNs, dir: &Path, ip: &str) -> Vec<Proc> {
    have_etcd();
    let pki = pki(dir);
    let members: Vec<Proc> = (0..3).map(|i| etcd_member_at(ns, dir, i, ip)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..3).all(|i| healthy_at(ns, i, ip)) {
        assert!(
            Instant::now() < deadline,
            "the etcd cluster never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let steps: [&[&str]; 6] = [
        &[
            "user",
            "add",
            &format!("root:{ROOT_PASSWORD}"),
            "--interactive=false",
        ],
        &["role", "add", USER],
        &[
            "role",
            "grant-permission",
            USER,
            "--prefix=true",
            "readwrite",
            "/tandem",
        ],
        &[
            "user",
            "add",
            &format!("{USER}:{PASSWORD}"),
            "--interactive=false",
        ],
        &["user", "grant-role", USER, USER],
        &["auth", "enable"],
    ];
    for step in steps {
        // A fresh cluster may still be settling its leader: try again,
        // and take "already exists" as done (an earlier try applied).
        let mut tries = 0;
        loop {
            let out = pki.etcdctl(ns, ip, step, false);
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            if out.status.success() || err.contains("already exists") {
                break;
            }
            tries += 1;
            assert!(tries < 10, "etcdctl {step:?}: {err}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Authentication is on: a request without a user is refused now.
    let out = pki.etcdctl(ns, ip, &["user", "list"], true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    members
}

/// `etcd://` for the three members on `ip`, keys under `prefix`.
pub fn url(ip: &str, prefix: &str) -> String {
    let members: Vec<String> = CLIENT.iter().map(|p| format!("{ip}:{p}")).collect();
    format!("etcd://{}/{prefix}", members.join(","))
}

/// The `[ft]` lines of a pair arbitrated by the cluster on `ip` (keys
/// under `prefix`), with TLS, a client certificate and the user `tandem`.
pub fn ft_lines(dir: &Path, ip: &str, prefix: &str) -> String {
    format!(
        "witness = \"{}\"\n{}",
        url(ip, prefix),
        pki(dir).access_lines()
    )
}
