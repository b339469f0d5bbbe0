//! Network namespaces for tests: every packet a test sends stays inside a
//! namespace the test created (and deletes on drop).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// Creates `tdm-<tag>-<pid>` with loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!("tdm-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Creates tap `tap` in the namespace with `cidr` on it, up.
    pub fn add_tap(&self, tap: &str, cidr: &str) {
        ip(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", &self.name, "addr", "add", cidr, "dev", tap]);
        ip(&["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// A UDP socket bound inside the namespace to `bind` (e.g. "10.0.0.1:0").
    pub fn udp_socket(&self, bind: &str) -> UdpSocket {
        let path = format!("/var/run/netns/{}", self.name);
        let bind = bind.to_string();
        // setns affects only the calling thread; the socket keeps the
        // namespace it was created in after the thread ends.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this
            // thread's network namespace.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            UdpSocket::bind(bind).expect("bind udp in netns")
        })
        .join()
        .expect("netns thread")
    }
}

impl NetNs {
    /// A TCP connection to `addr` from inside the namespace.
    #[allow(dead_code)]
    pub fn tcp_connect(&self, addr: &str) -> std::io::Result<std::net::TcpStream> {
        let path = format!("/var/run/netns/{}", self.name);
        let addr: std::net::SocketAddr = addr.parse().expect("an IP:PORT");
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this
            // thread's network namespace.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1))
        })
        .join()
        .expect("netns thread")
    }
}

impl NetNs {
    /// The namespace's name.
    #[allow(dead_code)]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A TCP connection to `addr` from source address `from` (an IP),
    /// inside the namespace: tests put attackers on their own addresses.
    #[allow(dead_code)]
    pub fn tcp_connect_from(
        &self,
        from: std::net::Ipv4Addr,
        addr: std::net::SocketAddrV4,
    ) -> std::io::Result<std::net::TcpStream> {
        tcp_connect_in(&self.name, from, addr)
    }
}

/// [`NetNs::tcp_connect_from`] in the namespace called `ns` (for threads
/// that do not own the namespace).
#[allow(dead_code)]
pub fn tcp_connect_in(
    ns: &str,
    from: std::net::Ipv4Addr,
    addr: std::net::SocketAddrV4,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path)?;
        // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this
        // thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: plain socket(2); the fd is owned by the stream below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let sockaddr = |a: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(a).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sockaddr(from, 0);
        // SAFETY: `local` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*addr.ip(), addr.port());
        // SAFETY: `remote` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    })
    .join()
    .expect("netns thread")
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
