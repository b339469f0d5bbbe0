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
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path)?;
        // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this
        // thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        connect_from(
            Some(std::net::IpAddr::V4(from)),
            std::net::SocketAddr::V4(addr),
        )
    })
    .join()
    .expect("netns thread")
}

/// A TCP connection to `to` from address `from` (any port; None: any
/// address), in the calling thread's namespace.
#[allow(dead_code)]
pub fn connect_from(
    from: Option<std::net::IpAddr>,
    to: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(from) = from {
        socket.bind(&std::net::SocketAddr::new(from, 0).into())?;
    }
    socket.connect(&to.into())?;
    Ok(socket.into())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
